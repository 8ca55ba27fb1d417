//! `/v1/inbound`: mail the bounce listener took for the postmaster and abuse addresses of the
//! bounce domain and kept because no `bounce.operator_address` is set
//! ([`crate::feedback::postmaster`]): list, read one as `message/rfc822`, delete.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::json;

use super::extract::{Path, Query};
use super::{ApiError, ApiResult, AppState};
use crate::feedback::postmaster::{MAX_KEPT, decode, key_of};
use crate::store::spool::Durability;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// `GET /v1/inbound?cursor=&limit=`: kept messages, newest first, `limit` per page (default 100,
/// at most 1000); `next_cursor` continues after the last one.
#[utoipa::path(
    get,
    path = "/inbound",
    operation_id = "list_inbound",
    tag = "operator",
    summary = "Kept postmaster and abuse mail, newest first",
    params(("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "items per page (default 100)")),
    responses(
        (status = 200, description = "a page", body = super::schema::InboundList)
    )
)]
pub(super) async fn list(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = super::page_limit(q.limit, MAX_KEPT)?;
    let before = super::page_cursor(q.cursor.as_deref(), key_of)?;
    let node = Arc::clone(&s.node);
    let page = tokio::task::spawn_blocking(move || {
        node.spool
            .inbound_page(before.as_ref().map(|k| &k[..]), limit)
    })
    .await
    .map_err(|e| ApiError::internal("listing inbound mail", e))??;
    let items: Vec<_> = page
        .iter()
        .filter_map(|(_, v)| decode(v).map(|(summary, _)| summary))
        .collect();
    let next = if page.len() == limit {
        items.last().map(|s| s.id.clone())
    } else {
        None
    };
    Ok(axum::Json(json!({"items": items, "next_cursor": next})).into_response())
}

fn not_found(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "inbound_not_found",
        format!("no kept inbound message {id:?}"),
    )
    .field("id")
}

/// The stored value of kept message `id`, or a 404 naming `id`.
async fn kept(s: &AppState, id: &str) -> Result<([u8; 16], Vec<u8>), ApiError> {
    let key = key_of(id).ok_or_else(|| not_found(id))?;
    let node = Arc::clone(&s.node);
    let value = tokio::task::spawn_blocking(move || node.spool.get_inbound(&key))
        .await
        .map_err(|e| ApiError::internal("reading inbound mail", e))??;
    value.map(|v| (key, v)).ok_or_else(|| not_found(id))
}

/// `GET /v1/inbound/{id}`: the message as it arrived (`message/rfc822`).
#[utoipa::path(
    get,
    path = "/inbound/{id}",
    operation_id = "get_inbound",
    tag = "operator",
    summary = "A kept message",
    params(("id" = String, Path, description = "the message's id")),
    responses(
        (status = 200, description = "the message", body = String, content_type = "message/rfc822"),
        (status = 404, description = "no such message", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn get(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let (_, value) = kept(&s, &id).await?;
    let Some((_, message)) = decode(&value) else {
        return Err(not_found(&id));
    };
    Ok(([(header::CONTENT_TYPE, "message/rfc822")], message.to_vec()).into_response())
}

/// `DELETE /v1/inbound/{id}`: forgets a kept message.
#[utoipa::path(
    delete,
    path = "/inbound/{id}",
    operation_id = "delete_inbound",
    tag = "operator",
    summary = "Delete a kept message",
    params(("id" = String, Path, description = "the message's id")),
    responses(
        (status = 200, description = "deleted", body = super::schema::InboundDeleted),
        (status = 404, description = "no such message", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn delete(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let (key, _) = kept(&s, &id).await?;
    let mut batch = s.node.spool.batch();
    batch.delete_inbound(&key);
    s.node.spool.write(batch, Durability::Sync).await?;
    Ok(axum::Json(json!({"id": id, "deleted": true})).into_response())
}
