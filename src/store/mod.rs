//! What is kept: the RocksDB spool, the campaign records and registry built on it, and the
//! retention that deletes what finished campaigns no longer need.

pub mod campaign;
pub mod retention;
pub mod spool;
