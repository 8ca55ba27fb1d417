//! Sending reputation: what providers said about each (source, site), and what Sluice does
//! about it.
//!
//! * [`rules`]: the shaping rules file (provider groups, reply → suspend / throttle / ignore,
//!   AIMD settings), compiled in from `config/shaping.toml` or loaded from
//!   `delivery.shaping_rules`.
//! * [`actions`]: the suspensions and throttles in force per (source, site), kept in the spool.
//! * [`warmup`]: what each warming source has sent per provider group this hour and day.
//!
//! The per-(source, site) state that changes with every message (rate limiters, AIMD, the
//! connection count) lives with the site in the delivery engine; this module holds what must
//! outlive a site or a restart, and what the API shows.

pub mod actions;
pub mod rules;
pub mod warmup;
