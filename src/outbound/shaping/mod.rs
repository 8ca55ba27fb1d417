//! Sending reputation: what providers said about each (source, site), and what Sluice does
//! about it.
//!
//! * [`rules`]: the shaping rules file (provider groups, reply → suspend / throttle, AIMD
//!   settings).

pub mod rules;
