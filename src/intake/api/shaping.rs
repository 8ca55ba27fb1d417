//! Sending reputation: `GET /v1/shaping` (the shaping actions and AIMD limits in force),
//! `DELETE /v1/shaping/{id}` (lift an action early) and `GET /v1/sources` (egress sources, their
//! pools and where each warming source stands).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use serde_json::json;

use super::extract::Path;
use super::{ApiError, ApiResult, AppState};
use crate::effects::delivery_log::rfc3339;
use crate::outbound::shaping::actions::ActionRecord;

fn action_json(a: &ActionRecord) -> serde_json::Value {
    let mut v = serde_json::to_value(a).unwrap_or_default();
    if let Some(o) = v.as_object_mut() {
        o.remove("created_at_ms");
        o.remove("expires_at_ms");
        o.insert("created_at".into(), rfc3339(a.created_at_ms).into());
        o.insert("expires_at".into(), rfc3339(a.expires_at_ms).into());
    }
    v
}

/// `GET /v1/shaping`: the actions in force (oldest first) and the (source, site) pairs AIMD
/// holds below their configured limits.
#[utoipa::path(
    get,
    path = "/shaping",
    operation_id = "list_shaping",
    tag = "operator",
    summary = "Shaping actions and AIMD limits in force",
    responses(
        (status = 200, description = "in force", body = super::schema::Shaping)
    )
)]
pub(super) async fn list(State(s): State<AppState>) -> ApiResult {
    let actions: Vec<_> = s
        .node
        .actions
        .list(crate::now_ms())
        .iter()
        .map(action_json)
        .collect();
    let aimd = s.engine.aimd();
    Ok(axum::Json(json!({ "actions": actions, "aimd": aimd })).into_response())
}

/// `DELETE /v1/shaping/{id}`: lifts an action before it expires; the (source, site) sends again
/// at once.
#[utoipa::path(
    delete,
    path = "/shaping/{id}",
    operation_id = "lift_shaping_action",
    tag = "operator",
    summary = "Lift a shaping action",
    params(("id" = String, Path, description = "the action's id")),
    responses(
        (status = 200, description = "lifted", body = super::schema::ShapingLifted),
        (status = 404, description = "no such action in force", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn lift(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    match s.node.actions.lift(&s.node.spool, &id).await? {
        Some(a) => {
            tracing::info!(id = %a.id, rule = %a.rule, source = %a.source, site = %a.site_label, "shaping action lifted");
            Ok(axum::Json(json!({ "lifted": action_json(&a) })).into_response())
        }
        None => Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "shaping_action_not_found",
            format!("no shaping action {id:?} is in force"),
        )
        .field("id")),
    }
}

/// `GET /v1/sources`: each egress source with its address, EHLO name, pools, actions in force
/// and, while it warms up, its standing per provider group.
#[utoipa::path(
    get,
    path = "/sources",
    operation_id = "list_sources",
    tag = "operator",
    summary = "Egress sources, pools and warm-up",
    responses(
        (status = 200, description = "the sources", body = super::schema::Sources)
    )
)]
pub(super) async fn sources(State(s): State<AppState>) -> ApiResult {
    let config = &s.node.config;
    let now = crate::now_ms();
    let pools = config.egress_pools();
    let actions = s.node.actions.list(now);
    let sources: Vec<_> = config
        .egress_sources()
        .iter()
        .enumerate()
        .map(|(i, src)| {
            let in_pools: Vec<_> = pools
                .iter()
                .filter_map(|p| {
                    let w = p.members.iter().find(|m| m.0 == i)?.1;
                    Some(json!({ "pool": p.name, "weight": w }))
                })
                .collect();
            let warmup = src.warmup.as_ref().map(|(schedule, start)| {
                let day = now.saturating_sub(*start) / schedule.day_ms + 1;
                json!({
                    "schedule": schedule.name,
                    "start": rfc3339(*start),
                    "day": day,
                    "days": schedule.days.len(),
                    "warm": day as usize > schedule.days.len(),
                    "groups": s.node.warmup.standing(&src.name, schedule, *start, now),
                })
            });
            json!({
                "name": src.name,
                "address": src.address.map(|a| a.to_string()),
                "ehlo_name": src.ehlo_name,
                "pools": in_pools,
                "actions": actions.iter().filter(|a| a.source == src.name).count(),
                "warmup": warmup,
            })
        })
        .collect();
    Ok(axum::Json(json!({ "sources": sources })).into_response())
}
