//! The end-to-end tests, one module per area, in one binary: each starts Sluice in-process (or
//! as a process) with its own spool, sinks and ports, so they run side by side. Two have a
//! binary of their own: the full-disk test (`tests/full_disk.rs`) reads a gauge every node in a
//! process sets, and `tests/scheduler.rs` and `tests/fairness.rs` measure delivery's rates,
//! which tests running beside them on the same cores would skew.

mod common;

mod admin;
mod api;
mod bad_input;
mod bounces;
mod cli;
mod crash;
mod delivery;
mod dns_faults;
mod fates;
mod faults;
mod guard;
mod lookup;
mod merged;
mod message;
mod preflight;
mod reputation;
mod resolver_sanity;
mod retention;
mod security;
mod shutdown;
mod sources;
mod streams;
mod submission;
mod suppression;
mod tenants;
mod transport;
mod webhooks;
