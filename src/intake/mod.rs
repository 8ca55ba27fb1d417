//! In: HTTP requests to durable jobs. The API, the validation of what it is given, and the
//! upload that writes a request's jobs to the spool in one synced commit.

pub mod address;
pub mod api;
pub mod ingest;
pub mod template;
