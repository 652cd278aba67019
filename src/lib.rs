//! booking-worker: consumes booking and cancellation events from Apache Kafka and keeps the
//! `bookings` table of the shared PostgreSQL database in step, losing nothing and doubling nothing.
//!
//! [`run`] is the whole service; the binary parses the command line, installs the signal handler
//! and maps the result to an exit code. The modules are listed in layers: each uses only those above it.

// The ground everything stands on: configuration, logs, memory, the shutdown latch.
pub mod config;

pub mod exit;

pub mod logger;

pub mod allocator;

pub mod shutdown;

// A consumed record: the event contract, its baggage, its offset.
pub mod models;

pub mod baggage;

pub mod offsets;

// What travels from the partition threads to the writers, and the state the threads share.
pub mod budget;

pub mod align;

pub mod pipeline;

pub mod metrics;

// PostgreSQL: the client and its error classes, the halt, the health it feeds, the SQL.
pub mod database;

pub mod halt;

pub mod health;

pub mod readiness;

pub mod repository;

// The stages, in the data's order: handlers, the observer of each end, writers, the consumer; and
// the HTTP endpoint.
pub mod handlers;

pub mod observe;

pub mod writer;

pub mod kafka;

pub mod http;

// The whole service, the other commands, and the load generator.
pub mod service;

pub mod commands;

pub mod loadgen;

pub use service::{run, RunError};
