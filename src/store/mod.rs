//! What is kept: the RocksDB spool and the campaign records and registry built on it.

pub mod campaign;
pub mod spool;
