//! DSN (RFC 3464) and ARF (RFC 5965) parsing of whatever arrives at the bounce listener.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = sluice::feedback::parse(data);
    let _ = sluice::feedback::parse_delivery_status(data);
});
