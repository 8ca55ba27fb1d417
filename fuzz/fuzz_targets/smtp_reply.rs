//! The SMTP reply parser and the outcome classification behind it: any bytes a receiver sends,
//! line by line, must give a reply or an error, never a panic.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sluice::outbound::outcome::rules::Rules;
use sluice::outbound::smtp::reply::{Command, EnhancedCode, ReplyBuilder};

static RULES: LazyLock<Rules> = LazyLock::new(Rules::builtin);

fuzz_target!(|data: &[u8]| {
    let mut builder = ReplyBuilder::default();
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        match builder.push(line, Command::Rcpt) {
            Ok(Some(reply)) => {
                let _ = reply.summary();
                let outcome = sluice::outbound::outcome::from_reply(&reply);
                let _ = sluice::outbound::outcome::classify(outcome, &RULES);
            }
            Ok(None) => {}
            Err(_) => builder = ReplyBuilder::default(),
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = EnhancedCode::parse_prefix(text);
    }
});
