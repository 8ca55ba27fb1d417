//! What happened: a job's change of state and everything it touches (record, counts,
//! suppression list, delivery log, webhook outbox), written through one path.

pub mod breakers;
pub mod delivery_log;
pub mod dsn;
pub mod guard;
pub mod suppression;
pub mod tls_reports;
pub mod transition;
pub mod webhook;
