//! Destinations: `GET /v1/domains` (sites and domains), `GET /v1/queue` (totals), and an
//! operator's suspend / resume of a domain. Reports come from the delivery engine's handle and
//! the scheduler; suspension is the scheduler's (runtime only: a restart resumes every domain).

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::json;

use super::extract::{Path, Query};
use super::{ApiError, ApiResult, AppState, ListQuery, list_limit};
use crate::store::campaign::CampaignState;

/// `GET /v1/domains?limit=`: every site (queue, connections, rate, state, last reply) and the
/// domains with the most queued recipients.
#[utoipa::path(
    get,
    path = "/domains",
    operation_id = "list_domains",
    tag = "operator",
    summary = "Destinations: sites and the domains with most queued",
    params(("limit" = Option<usize>, Query, minimum = 1, maximum = 10000, description = "domains shown (default 100)")),
    responses(
        (status = 200, description = "the report", body = super::schema::DomainReport)
    )
)]
pub(super) async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = list_limit(&q)?;
    let report = s.engine.report(&s.node).await;
    let suspended = s.node.scheduler.suspended();
    let domain_count = report.domains.len();
    let domains: Vec<_> = report.domains.into_iter().take(limit).collect();
    Ok(axum::Json(json!({
        "sites": report.sites,
        "domains": domains,
        "domain_count": domain_count,
        "suspended": suspended,
    }))
    .into_response())
}

/// `GET /v1/queue`: totals over the whole queue.
#[utoipa::path(
    get,
    path = "/queue",
    operation_id = "get_queue",
    tag = "operator",
    summary = "Totals over the queue",
    responses(
        (status = 200, description = "the totals", body = super::schema::QueueTotals)
    )
)]
pub(super) async fn queue(State(s): State<AppState>) -> ApiResult {
    let report = s.engine.report(&s.node).await;
    let parked = s.node.scheduler.parked_jobs();
    let mut campaigns = std::collections::BTreeMap::<&str, u64>::new();
    for c in s.node.campaigns.all() {
        let state = match c.state() {
            CampaignState::Active => "active",
            CampaignState::Paused => "paused",
            CampaignState::Cancelled => "cancelled",
        };
        *campaigns.entry(state).or_default() += 1;
    }
    let in_flight: u64 = report.sites.iter().map(|x| x.in_flight).sum();
    let connections: i64 = report.sites.iter().map(|x| x.connections.open).sum();
    let suspended = s.node.scheduler.suspended().len();
    Ok(axum::Json(json!({
        "queued": report.queued,
        "held": report.held,
        "in_flight": in_flight,
        "parked_for_paused_campaigns": parked,
        "domains": report.domains.len(),
        "sites": report.sites.len(),
        "suspended_domains": suspended,
        "connections": connections,
        "oldest_queued_seconds": report.oldest_queued_seconds,
        "campaigns": campaigns,
        "delivery": s.engine.is_running(),
    }))
    .into_response())
}

/// `raw` as an A-label domain name, or a 422 naming `domain`.
pub(super) fn normalise_domain(raw: &str) -> Result<String, ApiError> {
    let bad = |m: String| ApiError::invalid_field("domain", m);
    let ascii = idna::domain_to_ascii_strict(raw)
        .map_err(|_| bad(format!("{raw:?} is not a valid domain")))?;
    crate::intake::address::check_host_name(&ascii).map_err(|e| bad(format!("{raw:?}: {e}")))?;
    Ok(ascii)
}

async fn set_suspended(s: &AppState, raw: &str, suspended: bool) -> ApiResult {
    let domain = normalise_domain(raw)?;
    let r = s.node.scheduler.set_suspended(&domain, suspended);
    let (known, queued) = (r.known, r.queued);
    tracing::info!(%domain, suspended, "domain delivery {}", if suspended { "suspended" } else { "resumed" });
    Ok(axum::Json(
        json!({"domain": domain, "suspended": suspended, "queued": queued, "known": known}),
    )
    .into_response())
}

/// `POST /v1/domains/{domain}/suspend`: no new connections or transactions for the domain until
/// resumed; queued mail waits. Runtime state: a restart resumes every domain.
#[utoipa::path(
    post,
    path = "/domains/{domain}/suspend",
    operation_id = "suspend_domain",
    tag = "operator",
    summary = "Suspend delivery to a domain",
    params(("domain" = String, Path, format = "hostname", description = "the domain")),
    responses(
        (status = 200, description = "suspended", body = super::schema::DomainSuspension)
    )
)]
pub(super) async fn suspend(State(s): State<AppState>, Path(domain): Path<String>) -> ApiResult {
    set_suspended(&s, &domain, true).await
}

#[utoipa::path(
    post,
    path = "/domains/{domain}/resume",
    operation_id = "resume_domain",
    tag = "operator",
    summary = "Resume delivery to a domain",
    params(("domain" = String, Path, format = "hostname", description = "the domain")),
    responses(
        (status = 200, description = "resumed", body = super::schema::DomainSuspension)
    )
)]
pub(super) async fn resume(State(s): State<AppState>, Path(domain): Path<String>) -> ApiResult {
    set_suspended(&s, &domain, false).await
}
