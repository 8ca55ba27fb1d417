//! Sending domains (the From addresses' domains): `GET /v1/sending-domains` (each with its
//! breaker state and rates), `GET /v1/sending-domains/{domain}` (the reputation view: delivered,
//! bounced by category, complaint and unsubscribe rates over 24 hours and 7 days, the breaker
//! window and state) and `POST /v1/sending-domains/{domain}/resume`, which lifts a tripped
//! domain breaker. The counts and states are [`crate::effects::guard`]'s; each domain also
//! shows its authentication preflight ([`crate::outbound::preflight`], kept for
//! `preflight.ttl`).

use axum::Extension;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::campaigns::{ForceQuery, reason_json};
use super::domains::normalise_domain;
use super::extract::{Path, Query};
use super::{ApiError, ApiResult, AppState, PageQuery, page_of};
use crate::effects::guard::{self, DomainView, Level, Sample};
use crate::node::Node;
use crate::store::campaign::CampaignState;
use crate::store::tenants::Caller;

/// Rates of a span, in percent (4 decimals); `null` with nothing to divide by.
fn rates(s: &Sample) -> Value {
    let pct = |n: u64, d: u64| {
        (d > 0).then(|| ((n as f64 * 100.0 / d as f64) * 10_000.0).round() / 10_000.0)
    };
    json!({
        "counts": s,
        "complaint_rate_percent": pct(s.complained, s.delivered),
        "unsubscribe_rate_percent": pct(s.unsubscribed, s.delivered),
        "hard_bounce_rate_percent": pct(s.hard_bounced, s.attempted),
        "bounce_rate_percent": pct(s.bounced.values().sum(), s.attempted),
    })
}

fn view_json(node: &Node, v: &DomainView) -> Value {
    let config = &node.config.guard;
    let worst = v
        .measures
        .iter()
        .map(|m| m.level)
        .max()
        .unwrap_or(Level::Ok);
    let state = match (&v.state.tripped, v.state.exempt_until_ms) {
        (Some(_), _) => "tripped",
        (None, Some(_)) => "exempt",
        (None, None) if worst == Level::Warning => "warning",
        _ => "ok",
    };
    let mut out = json!({
        "domain": v.domain,
        "breaker": {
            "state": state,
            "enabled": config.enabled && config.domain_breaker,
            "window": humantime::format_duration(config.domain_window).to_string(),
            "complaint_rate": v.measures[0],
            "hard_bounce_rate": v.measures[1],
        },
        "last_24h": rates(&v.last_24h),
        "last_7d": rates(&v.last_7d),
        "dkim_selectors": node
            .assembler
            .dkim()
            .for_domain(&v.domain)
            .iter()
            .map(|k| format!("{}._domainkey.{}", k.selector, k.domain))
            .collect::<Vec<_>>(),
    });
    if let Some(r) = &v.state.tripped {
        out["breaker"]["reason"] = reason_json(r);
    }
    if let Some(ms) = v.state.exempt_until_ms {
        out["breaker"]["exempt_until"] = json!(crate::effects::delivery_log::rfc3339(ms));
    }
    out
}

/// The domains to list: those with counts or a breaker state, and those with a DKIM key.
fn known(node: &Node) -> Vec<String> {
    let mut v = node.guard.domains();
    v.extend(
        node.config
            .dkim
            .iter()
            .map(|d| d.domain.to_ascii_lowercase()),
    );
    v.sort_unstable();
    v.dedup();
    v
}

/// The domain's view with its preflight report.
async fn full_view(node: &Node, domain: &str) -> Value {
    let view = node.guard.view(&node.config.guard, domain, crate::now_ms());
    let mut v = view_json(node, &view);
    v["preflight"] = match node
        .preflight
        .report(&node.config, &node.assembler.dkim(), domain)
        .await
    {
        Ok(r) => {
            let mut p = json!(*r);
            if let Some(o) = p.as_object_mut() {
                o.remove("checked_at_ms");
                o.insert(
                    "checked_at".into(),
                    json!(crate::effects::delivery_log::rfc3339(r.checked_at_ms)),
                );
            }
            p
        }
        Err(e) => json!({"error": e}),
    };
    v
}

/// `GET /v1/sending-domains`.
///
/// A tenant's key sees the domains it may send as only.
#[utoipa::path(
    get,
    path = "/sending-domains",
    operation_id = "list_sending_domains",
    tag = "sending-domains",
    summary = "Sending domains: breakers, rates, DKIM, preflight",
    params(("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "items per page (default 100)")),
    responses(
        (status = 200, description = "the domains the key may send as", body = super::schema::SendingDomainList)
    )
)]
pub(super) async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> ApiResult {
    let mine: Vec<String> = known(&s.node)
        .into_iter()
        .filter(|d| caller.tenant.may_send_as(d))
        .collect();
    let (page, next) = page_of(mine, String::clone, &q, 1000)?;
    let mut domains = Vec::new();
    for d in page {
        domains.push(full_view(&s.node, &d).await);
    }
    Ok(axum::Json(json!({"sending_domains": domains, "next_cursor": next})).into_response())
}

/// `GET /v1/sending-domains/{domain}`: 404 for a domain nothing was sent from and no key signs.
#[utoipa::path(
    get,
    path = "/sending-domains/{domain}",
    operation_id = "get_sending_domain",
    tag = "sending-domains",
    summary = "A sending domain",
    params(("domain" = String, Path, format = "hostname", description = "the domain")),
    responses(
        (status = 200, description = "the domain", body = super::schema::SendingDomain),
        (status = 404, description = "nothing sent from it and no DKIM key for it", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> ApiResult {
    let domain = normalise_domain(&raw)?;
    if !caller.tenant.may_send_as(&domain) || !known(&s.node).contains(&domain) {
        return Err(not_found(&domain));
    }
    Ok(axum::Json(full_view(&s.node, &domain).await).into_response())
}

fn not_found(domain: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "sending_domain_not_found",
        format!("nothing was sent from {domain} and no [[dkim]] key signs for it"),
    )
    .field("domain")
}

/// `POST /v1/sending-domains/{domain}/resume[?force=true]`: lifts the domain's tripped breaker
/// and resumes the campaigns it paused (those whose own breaker would not trip). While the
/// window's rates are still over a threshold only with `force`, which exempts the domain from
/// its breaker for one window; 409 `breaker_tripped` otherwise.
#[utoipa::path(
    post,
    path = "/sending-domains/{domain}/resume",
    operation_id = "resume_sending_domain",
    tag = "sending-domains",
    summary = "Resume a sending domain a breaker tripped",
    params(("domain" = String, Path, format = "hostname", description = "the domain"), ("force" = Option<bool>, Query, description = "resume even though its rates would trip again")),
    responses(
        (status = 200, description = "resumed", body = super::schema::SendingDomainResumed),
        (status = 404, description = "no such sending domain", body = super::openapi::ErrorBody),
        (status = 409, description = "its rates would trip the breaker again", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn resume(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    Query(q): Query<ForceQuery>,
) -> ApiResult {
    let node = &s.node;
    let domain = normalise_domain(&raw)?;
    if !caller.tenant.may_send_as(&domain) {
        return Err(not_found(&domain));
    }
    let now = crate::now_ms();
    let config = &node.config.guard;
    let view = node.guard.view(config, &domain, now);
    let Some(reason) = view.state.tripped.clone() else {
        return Ok(
            axum::Json(json!({"domain": domain, "resumed": [], "tripped": false})).into_response(),
        );
    };
    let over = view.measures.iter().find(|m| m.level == Level::Tripped);
    let mut state = view.state.clone();
    state.tripped = None;
    match over {
        Some(m) if !q.force => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "breaker_tripped",
                format!(
                    "{domain}'s {} over the last {} is {:.3}%, still over {}%; resume with ?force=true to send anyway (the breaker then leaves the domain alone for one window)",
                    m.name.replace('_', " "),
                    humantime::format_duration(config.domain_window),
                    m.rate_percent.unwrap_or(0.0),
                    m.threshold_percent
                ),
            )
            .field("force"));
        }
        Some(_) => state.exempt_until_ms = Some(now + guard::window_ms(config)),
        None => {}
    }
    node.guard
        .set_domain_state(&node.spool, &domain, state)
        .await?;
    tracing::warn!(%domain, force = q.force, was = %reason.message, "sending domain breaker lifted");
    let mut resumed = Vec::new();
    for c in node.campaigns.all() {
        let mark = c.breaker();
        let paused_by_domain = mark
            .paused_reason
            .as_ref()
            .is_some_and(|r| r.breaker == "domain" && r.domain == domain);
        if c.state() != CampaignState::Paused
            || !paused_by_domain
            || guard::campaign_trip(config, &node.guard, &c).is_some()
        {
            continue;
        }
        let mark = crate::store::campaign::BreakerMark {
            paused_reason: None,
            ..mark
        };
        if node
            .set_campaign_state_marked(&c, CampaignState::Active, Some(mark))
            .await?
        {
            resumed.push(c.record.id.to_string());
        }
    }
    Ok(axum::Json(json!({"domain": domain, "resumed": resumed, "tripped": false})).into_response())
}
