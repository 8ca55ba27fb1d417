//! In: HTTP requests and SMTP submissions to durable jobs. The API, the submission listener, the
//! validation of what they are given, and the upload that writes a request's jobs to the spool
//! in one synced commit.

pub mod address;
pub mod api;
pub mod ingest;
pub mod raw;
pub mod smtp;
pub mod submission;
pub mod template;
