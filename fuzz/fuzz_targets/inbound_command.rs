//! The SMTP listeners' command parser (submission and bounces): any line a client sends parses to a command.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::intake::smtp::Command;

fuzz_target!(|data: &[u8]| {
    for line in data.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        // As the listener does: invalid UTF-8 is replaced, not refused.
        let text = String::from_utf8_lossy(line);
        let _ = Command::parse(&text);
    }
});
