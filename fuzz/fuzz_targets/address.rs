//! Address validation, host names and suppression-list normalisation.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|text: &str| {
    if let Ok(a) = sluice::intake::address::Address::parse(text) {
        // A valid address parses again to itself.
        let again = sluice::intake::address::Address::parse(a.as_str())
            .expect("a parsed address re-parses");
        assert_eq!(again.as_str(), a.as_str());
    }
    let _ = sluice::intake::address::domain_of(text);
    let _ = sluice::intake::address::check_host_name(text);
    let _ = sluice::effects::suppression::normalise(text);
});
