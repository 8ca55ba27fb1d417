//! Our SMTP client: typed replies ([`reply`]) and connections ([`client`]).

pub mod client;
pub mod reply;
