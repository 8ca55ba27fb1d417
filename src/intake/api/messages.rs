//! Transactional messages: `POST /v1/messages`.
//!
//! A message is one job of its stream's bucket for the day ([`Node::stream_bucket`]), with its
//! own record (templates, sender, tags) stored beside the job, so a message costs a job and a
//! record, not a campaign. Its id is its job id. The same validation as a campaign's, with `to`
//! and `vars` instead of `recipients`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde_json::json;

use super::campaigns::{RejectList, SuppressedList, accepted_body};
use super::idempotency::{self, IdempotencyCheck};
use super::{
    ApiError, ApiResult, AppState, json_response, now_ms, parse_json, read_body,
    require_content_type,
};
use crate::intake::ingest::{self, ComposeRequest, FieldError, Upload};
use crate::node::{BucketError, Node};
use crate::store::campaign::CampaignKind;

pub(super) async fn send(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let node = &s.node;
    let limits = &node.config.limits;
    require_content_type(&headers, &["application/json"])?;
    let idem = match idempotency::check(node, &headers, "POST /v1/messages".to_owned()).await? {
        IdempotencyCheck::Replay(resp) => return Ok(resp),
        IdempotencyCheck::Fresh(i) => Some(i),
        IdempotencyCheck::None => None,
    };
    let body = read_body(
        body,
        limits.max_request_bytes,
        node.config.http.body_read_timeout,
    )
    .await?;
    let req: ComposeRequest<'_> = parse_json(&body)?;
    let (fields, recipients) = req.into_parts();
    if recipients.list.is_some() {
        return Err(ApiError::invalid(FieldError::new(
            "recipients",
            "a message has one recipient: use \"to\" and \"vars\"",
        )));
    }
    let to = recipients
        .to
        .ok_or_else(|| ApiError::invalid(FieldError::new("to", "missing field `to`")))?;
    let now = now_ms();
    let (mut record, rules) =
        ingest::validate_campaign(fields, CampaignKind::Transactional, limits, now)
            .map_err(ApiError::invalid)?;
    let valid =
        ingest::check_recipient(to, recipients.vars, &rules, limits).map_err(|(_, e)| {
            let field = if e.field == "email" {
                "to".to_owned()
            } else {
                e.field.clone()
            };
            ApiError::invalid(FieldError {
                field,
                message: e.message,
            })
        })?;
    let stream = record.stream.clone().unwrap_or_default();
    let bucket = bucket(node, &stream, now).await?;
    // The message is reported under its bucket: its Message-ID and events name the bucket.
    record.id = bucket.record.id;
    let mut upload = Upload::for_message(Arc::clone(node), Arc::clone(&bucket), record)?;
    let mut suppressed = SuppressedList::new(limits.max_rejected_reported);
    let added = upload.add(&valid).await?;
    suppressed.note(0, valid.address.as_str(), added);
    let job = upload
        .last_job()
        .ok_or_else(|| ApiError::internal("message upload", "no job was added"))?;
    let ids = json!({"id": job.to_string(), "campaign": bucket.record.id, "stream": stream});
    let body = accepted_body(
        ids,
        upload.len(),
        suppressed,
        RejectList::new(limits.max_rejected_reported),
    );
    upload
        .commit(|batch| {
            if let Some(i) = &idem {
                i.put(batch, StatusCode::ACCEPTED, &body);
            }
        })
        .await?;
    Ok(json_response(StatusCode::ACCEPTED, body))
}

async fn bucket(
    node: &Arc<Node>,
    stream: &str,
    now: u64,
) -> Result<Arc<crate::store::campaign::Campaign>, ApiError> {
    node.stream_bucket(stream, now).await.map_err(|e| match e {
        BucketError::Spool(e) => e.into(),
        BucketError::Exhausted => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "campaigns_exhausted",
            "no campaign numbers left",
        ),
    })
}
