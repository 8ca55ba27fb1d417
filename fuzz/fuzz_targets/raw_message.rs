//! The raw-message checks of the submission listener and `POST /v1/messages/raw`: any bytes are
//! either refused with a reason or give a From address, and the message kept never grows.
#![no_main]

use libfuzzer_sys::fuzz_target;
use sluice::intake::raw::{check, normalise_line_endings};

fuzz_target!(|data: &[u8]| {
    for message in [data.to_vec(), normalise_line_endings(data.to_vec())] {
        if let Ok(checked) = check(&message) {
            assert!(!checked.from.is_empty());
            assert!(checked.bytes.len() <= message.len());
        }
    }
});
