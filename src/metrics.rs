//! Process-wide Prometheus metrics that belong to no single module, and the text exposition.
//!
//! Metrics live in the `prometheus` crate's default registry; each is declared next to the code it
//! measures (spool metrics in `spool`, HTTP metrics here because the router owns them). No I/O.

use std::sync::LazyLock;

use prometheus::{
    Encoder, HistogramVec, IntCounter, IntCounterVec, IntGauge, TextEncoder,
    register_histogram_vec, register_int_counter, register_int_counter_vec, register_int_gauge,
};

pub static RECIPIENTS_ACCEPTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_recipients_accepted_total",
        "Recipients durably accepted at ingest (after the synced commit). rate() is ingest throughput."
    )
    .expect("metric registers once")
});

pub static RECIPIENTS_SUPPRESSED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_recipients_suppressed_at_ingest_total",
        "Recipients recorded but not queued at ingest because they are on a suppression list."
    )
    .expect("metric registers once")
});

pub static RECIPIENTS_REJECTED: LazyLock<IntCounter> = LazyLock::new(|| {
    register_int_counter!(
        "sluice_recipients_rejected_total",
        "Recipients refused at ingest (bad address, bad variables). A rise points at a client sending bad lists."
    )
    .expect("metric registers once")
});

pub static HTTP_REQUESTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_http_requests_total",
        "HTTP requests by route template and status code. 4xx are client mistakes, 503 is load shedding.",
        &["route", "status"]
    )
    .expect("metric registers once")
});

pub static HTTP_SECONDS: LazyLock<HistogramVec> = LazyLock::new(|| {
    register_histogram_vec!(
        "sluice_http_request_seconds",
        "HTTP request duration by route template, including the synced spool commit for ingest routes.",
        &["route"],
        prometheus::exponential_buckets(0.0005, 2.0, 18).expect("static buckets")
    )
    .expect("metric registers once")
});

pub static QUEUED_JOBS: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_queue_jobs",
        "Recipients waiting for delivery (queued or deferred), all sites."
    )
    .expect("metric registers once")
});

pub static TENANT_ACCEPTED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_tenant_recipients_accepted_total",
        "Recipients accepted per tenant (the first 100 tenants by name, then other).",
        &["tenant"]
    )
    .expect("metric registers once")
});

pub static TENANT_REFUSED: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_tenant_requests_refused_total",
        "API requests and submitted messages refused with 429 (or 451 over SMTP) per tenant by limit: rate_limited, daily_quota_exceeded, max_queued.",
        &["tenant", "limit"]
    )
    .expect("metric registers once")
});

/// Registers every metric without labels, so each appears in `/metrics` (at zero) from the
/// start rather than from its first use; dashboards and alerts then always find them.
pub fn init() {
    use std::sync::LazyLock as L;
    L::force(&RECIPIENTS_ACCEPTED);
    L::force(&RECIPIENTS_SUPPRESSED);
    L::force(&RECIPIENTS_REJECTED);
    L::force(&QUEUED_JOBS);
    L::force(&crate::outbound::delivery::TRANSACTION_SECONDS);
    L::force(&crate::outbound::delivery::ASSEMBLY_SECONDS);
    L::force(&crate::outbound::delivery::ASSEMBLY_WAIT_SECONDS);
    L::force(&crate::outbound::delivery::ASSEMBLY_QUEUED);
    L::force(&crate::outbound::delivery::SUPPRESSED_AT_DELIVERY);
    L::force(&crate::outbound::delivery::JOB_READS);
    L::force(&crate::outbound::delivery::LATENCY_SECONDS);
    L::force(&crate::effects::delivery_log::DROPPED);
    L::force(&crate::outbound::smtp::client::CONNECT_SECONDS);
    L::force(&crate::outbound::smtp::client::TLS_SECONDS);
    L::force(&crate::outbound::dkim::SIGN_SECONDS);
    L::force(&crate::store::spool::WRITE_SECONDS);
    L::force(&crate::store::spool::SYNC_SECONDS);
    L::force(&crate::store::spool::GROUP_SIZE);
    L::force(&crate::effects::transition::COMPLAINED);
    L::force(&crate::effects::transition::UNSUBSCRIBED);
}

/// Renders every registered metric in the Prometheus text format.
pub fn render() -> String {
    let mut out = Vec::new();
    let families = prometheus::gather();
    // Encoding into a Vec cannot fail on I/O; an error would mean a malformed metric.
    if let Err(e) = TextEncoder::new().encode(&families, &mut out) {
        tracing::error!(error = %e, "encoding metrics failed");
    }
    String::from_utf8(out).unwrap_or_default()
}
