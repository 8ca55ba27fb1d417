//! `GET /v1/cluster`: this node's cluster mode and every node as of its last heartbeat.

use axum::extract::State;
use axum::response::IntoResponse;
use serde_json::json;

use super::{ApiResult, AppState};
use crate::effects::delivery_log::rfc3339;

/// Without `[cluster]`: `{"mode": "single"}`. Otherwise the node's id, its mode (`connected`,
/// or `degraded` while Redis is unreachable and limits are local shares), a `conflict` when
/// another live node claims the same id, the limit settings (`shaping`, `rule[i]`) that differ
/// from another live node's, and the nodes with when each was last seen.
#[utoipa::path(
    get,
    path = "/cluster",
    operation_id = "get_cluster",
    tag = "operator",
    summary = "The fleet as this node sees it",
    responses(
        (status = 200, description = "the fleet", body = super::schema::Cluster)
    )
)]
pub(super) async fn show(State(s): State<AppState>) -> ApiResult {
    let Some(c) = s.node.cluster() else {
        return Ok(axum::Json(json!({ "mode": "single", "nodes": [] })).into_response());
    };
    let nodes: Vec<_> = c
        .nodes()
        .into_iter()
        .map(|n| {
            json!({
                "node_id": n.node_id,
                "alive": n.alive,
                "last_seen": rfc3339(n.last_seen_ms),
                "queued": n.queued,
                "rate": n.rate,
                "degraded": n.degraded,
                "http": n.http,
            })
        })
        .collect();
    let conflict = c.conflict.lock().expect("conflict").clone();
    let mismatches: Vec<_> = c
        .limit_mismatches()
        .into_iter()
        .map(|(node, key)| json!({ "node_id": node, "key": key }))
        .collect();
    Ok(axum::Json(json!({
        "node_id": c.node_id(),
        "mode": c.mode(),
        "alive_nodes": c.alive_nodes(),
        "conflict": conflict,
        "limit_mismatches": mismatches,
        "nodes": nodes,
    }))
    .into_response())
}
