//! What is kept: the RocksDB spool, the campaign records and registry built on it, the
//! retention that deletes what finished campaigns no longer need, and the tenants and their keys.

pub mod campaign;
pub mod retention;
pub mod spool;
pub mod tenants;
