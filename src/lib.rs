//! booking-worker: consumes booking and cancellation events from Apache Kafka and keeps the
//! `bookings` table of the shared PostgreSQL database in step, losing nothing and doubling nothing.
//!
//! [`run`] is the whole service; the binary parses the command line, installs the signal handler
//! and maps the result to an exit code. The modules are listed in the data's order: from the
//! configuration and Kafka, through the channel to the writers, to the handlers and the database.

pub mod allocator;
pub mod baggage;
pub mod budget;
pub mod commands;
pub mod config;
pub mod database;
pub mod halt;
pub mod handlers;
pub mod health;
pub mod http;
pub mod kafka;
pub mod loadgen;
pub mod logger;
pub mod metrics;
pub mod models;
pub mod offsets;
pub mod pipeline;
pub mod repository;
pub mod service;
pub mod shutdown;
pub mod writer;

pub use service::{run, RunError};
