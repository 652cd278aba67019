//! The integration tests, one module per area, in one crate: a change in `src/` links librdkafka
//! into one test binary (the fault scenarios of `tests/reliability/` are the other). They run
//! against the real broker and PostgreSQL that `scripts/test.sh` provides; `structure` needs
//! neither.

#[path = "../common/mod.rs"]
mod common;

mod batch;
mod container;
mod database;
mod failloud;
mod harness;
mod monitoring;
mod operations;
mod packaging;
mod structure;
mod switchover;
mod systemd;
mod worker;
