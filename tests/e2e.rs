//! The end-to-end tests, one module per area, in one binary: each starts Sluice in-process (or
//! as a process) with its own spool, sinks and ports, so they run side by side. The full-disk
//! test is a binary of its own (`tests/full_disk.rs`): it reads a gauge every node in a process
//! sets.

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
mod lookup;
mod merged;
mod message;
mod retention;
mod scheduler;
mod security;
mod shutdown;
mod streams;
mod suppression;
mod webhooks;
