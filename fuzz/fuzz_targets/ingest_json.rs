//! The ingest JSON as `POST /v1/campaigns` reads it: the request, the campaign checks and
//! template compilation, then every recipient.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use sluice::config::LimitsConfig;
use sluice::intake::ingest::{self, ComposeRequest};
use sluice::store::campaign::CampaignKind;

static LIMITS: LazyLock<LimitsConfig> =
    LazyLock::new(|| serde_json::from_str("{}").expect("limits have defaults"));

fuzz_target!(|data: &[u8]| {
    let Ok(req) = serde_json::from_slice::<ComposeRequest<'_>>(data) else {
        return;
    };
    let (fields, recipients) = req.into_parts();
    let Ok((_record, rules)) = ingest::validate_campaign(fields, CampaignKind::Bulk, &LIMITS, 0)
    else {
        return;
    };
    for raw in recipients.list.into_iter().flatten() {
        let _ = ingest::parse_recipient(raw.get(), &rules, &LIMITS);
    }
});
