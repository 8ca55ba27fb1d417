//! Out: due jobs to SMTP transactions. The delivery engine and what it uses to reach a site,
//! build and sign a message, speak SMTP and classify the answer.

pub mod dane;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod outcome;
pub mod preflight;
pub mod render;
pub mod resolver_health;
pub mod retry;
pub mod shaping;
pub mod smtp;
pub mod sts;
pub mod sts_cache;
pub mod tokens;
pub mod trust;
