//! `GET /v1/tls-reports`: today's TLS reporting aggregates (RFC 8460) per policy domain, and the
//! MTA-STS policies in the cache.

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::{ApiResult, AppState};
use crate::effects::delivery_log::rfc3339;
use crate::effects::tls_reports::DAY_MS;

/// `{"date", "domains": [{"domain", "policies": [...]}], "mta_sts_policies": [...]}`: each
/// policy with its type (`sts`, `tlsa`), what was published, successful and failed session
/// counts and the failures by result type, receiving host and address.
#[utoipa::path(
    get,
    path = "/tls-reports",
    operation_id = "get_tls_reports",
    tag = "operator",
    summary = "Today's TLS reporting counts and MTA-STS policies",
    responses(
        (status = 200, description = "the counts", body = super::schema::TlsReports)
    )
)]
pub(super) async fn today(State(s): State<AppState>) -> ApiResult {
    let now = crate::now_ms();
    let day = now / DAY_MS;
    let mut domains: Vec<Value> = Vec::new();
    for (domain, a) in s.node.tls_reports.day(day) {
        let failures: Vec<Value> = a
            .failures
            .iter()
            .map(|((result, host, ip), n)| {
                json!({
                    "result_type": result,
                    "receiving_mx_hostname": host,
                    "receiving_ip": ip,
                    "failed_sessions": n,
                })
            })
            .collect();
        let policy = json!({
            "policy_type": a.policy_type,
            "policy_string": a.policy_string,
            "mx_host": a.mx_host,
            "successful_sessions": a.successes,
            "failed_sessions": a.failure_count(),
            "failure_details": failures,
        });
        match domains.last_mut() {
            Some(last) if last["domain"] == domain.as_str() => {
                if let Some(list) = last["policies"].as_array_mut() {
                    list.push(policy);
                }
            }
            _ => domains.push(json!({ "domain": domain, "policies": [policy] })),
        }
    }
    let policies: Vec<Value> = s
        .node
        .sts
        .snapshot()
        .into_iter()
        .map(|(domain, c)| {
            json!({
                "domain": domain,
                "id": c.id,
                "mode": c.policy.mode,
                "mx": c.policy.mx,
                "max_age": c.policy.max_age,
                "fetched_at": rfc3339(c.fetched_ms),
                "expires_at": rfc3339(c.expires_ms()),
            })
        })
        .collect();
    let date = rfc3339(day * DAY_MS);
    Ok(axum::Json(json!({
        "date": date.get(..10).unwrap_or(&date),
        "domains": domains,
        "mta_sts_policies": policies,
    }))
    .into_response())
}
