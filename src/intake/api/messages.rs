//! Transactional messages: `POST /v1/messages`, and `GET /v1/messages/{id}`, the lookup of one
//! message or one campaign recipient by job id.
//!
//! A message is one job of its stream's bucket for the day ([`Node::stream_bucket`]), with its
//! own record (templates, sender, tags) stored beside the job, so a message costs a job and a
//! record, not a campaign. Its id is its job id. The same validation as a campaign's, with `to`
//! and `vars` instead of `recipients`.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::campaigns::{Composed, JSON, RejectList, SuppressedList, accepted_body, read_compose};
use super::extract::Path;
use super::{ApiError, ApiResult, AppState, admit_recipients, json_response, now_ms, parse_json};
use crate::intake::address::Address;
use crate::intake::ingest::{self, ComposeRequest, FieldError, Upload};
use crate::intake::raw;
use crate::node::BucketError;
use crate::store::campaign::CampaignKind;
use crate::store::spool::{JobId, JobRecord};
use crate::store::tenants::Caller;

#[utoipa::path(
    post,
    path = "/messages",
    operation_id = "send_message",
    tag = "messages",
    summary = "Send one message to one recipient",
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key and request within `http.idempotency_ttl` answers the first answer again; the same key with another request: 422 `idempotency_key_reused`")),
    request_body(content = super::schema::NewMessage, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted and synced to disk", body = super::schema::MessageAccepted)
    )
)]
pub(super) async fn send(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let limits = &node.config.limits;
    let route = "POST /v1/messages";
    let (idem, body) = match read_compose(node, &caller, &headers, (body, ""), route, JSON).await? {
        Composed::Replay(resp) => return Ok(resp),
        Composed::Fresh(idem, body) => (idem, body),
    };
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
    super::campaigns::take_tenant(&caller, &mut record)?;
    super::campaigns::check_pool(node, &record)?;
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
    // A message has one recipient: a suppressed one means nothing to send, said now rather
    // than in a 202 that sends nothing, and before anything (its stream's bucket) is written.
    let suppressed = |reason: crate::effects::suppression::Reason| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "recipient_suppressed",
            format!(
                "{} is on the suppression list ({}); nothing was queued",
                valid.address.as_str(),
                reason.as_str()
            ),
        )
        .field("to")
    };
    if let Some(reason) = node.suppressions.check(
        valid.address.as_str(),
        crate::intake::address::domain_of(&record.from),
        record.tenant(),
    ) {
        return Err(suppressed(reason));
    }
    let stream = record.stream.clone().unwrap_or_default();
    let quota = admit_recipients(node, &caller, 1)?;
    let bucket = node
        .stream_bucket(caller.tenant.name(), &stream, record.schedule.priority, now)
        .await
        .map_err(bucket_error)?;
    // The message is reported under its bucket: its Message-ID and events name the bucket.
    record.id = bucket.record.id;
    let mut upload = Upload::for_message(Arc::clone(node), Arc::clone(&bucket), record)?;
    // Suppressed meanwhile: the upload rolls back when dropped.
    if let Some(reason) = upload.add(&valid).await? {
        return Err(suppressed(reason));
    }
    let job = upload
        .last_job()
        .ok_or_else(|| ApiError::internal("message upload", "no job was added"))?;
    let ids = json!({"id": job.to_string(), "campaign": bucket.record.id, "stream": stream});
    let body = accepted_body(
        ids,
        upload.len(),
        SuppressedList::new(limits.max_rejected_reported),
        RejectList::new(limits.max_rejected_reported),
    );
    upload
        .commit(|batch| {
            quota.stage(batch);
            if let Some(i) = &idem {
                i.put(batch, StatusCode::ACCEPTED, &body);
            }
        })
        .await?;
    quota.confirm();
    Ok(json_response(StatusCode::ACCEPTED, body))
}

/// `POST /v1/messages/raw?to=…[&to=…][&mail_from=…]`: a message given whole
/// (`message/rfc822`), checked and queued once for its recipients ([`crate::intake::raw`]). A
/// file with LF line endings is taken as CRLF. `mail_from` is where DSNs about it would go
/// (kept with it; none is sent for mail taken over HTTP).
#[utoipa::path(
    post,
    path = "/messages/raw",
    operation_id = "send_raw_message",
    tag = "messages",
    summary = "Send a whole message (message/rfc822) to its recipients",
    params(("to" = Vec<String>, Query, description = "recipients (repeat the parameter, or separate with commas)"), ("mail_from" = Option<String>, Query, description = "the envelope sender DSNs would go to"), ("Idempotency-Key" = Option<String>, Header, description = "the same key and request within `http.idempotency_ttl` answers the first answer again; the same key with another request: 422 `idempotency_key_reused`")),
    request_body(content = String, content_type = "message/rfc822"),
    responses(
        (status = 202, description = "accepted and synced to disk", body = super::schema::MessageAccepted)
    )
)]
pub(super) async fn send_raw(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    query: Result<Query<Vec<(String, String)>>, QueryRejection>,
    RawQuery(raw_query): RawQuery,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let Query(pairs) = query.map_err(|e| ApiError::invalid_field("query", e.body_text()))?;
    let route = "POST /v1/messages/raw";
    // The envelope is in the query: a retry must repeat it too.
    let request = (body, raw_query.as_deref().unwrap_or(""));
    let (idem, body) = match read_compose(node, &caller, &headers, request, route, RFC822).await? {
        Composed::Replay(resp) => return Ok(resp),
        Composed::Fresh(idem, body) => (idem, body),
    };
    let mut recipients = Vec::new();
    let mut mail_from = String::new();
    for (key, value) in pairs {
        match key.as_str() {
            "to" => {
                for a in value.split(',').map(str::trim).filter(|a| !a.is_empty()) {
                    let address = Address::parse(a)
                        .map_err(|e| ApiError::invalid_field("to", format!("{a:?}: {e}")))?;
                    recipients.push(raw::Recipient {
                        address,
                        notify: None,
                        orcpt: None,
                    });
                }
            }
            "mail_from" => {
                if !value.is_empty() {
                    Address::parse(&value).map_err(|e| {
                        ApiError::invalid_field("mail_from", format!("{value:?}: {e}"))
                    })?;
                }
                mail_from = value;
            }
            other => {
                return Err(ApiError::invalid_field(
                    other,
                    "unknown parameter: the envelope is `to` (repeatable, or comma-separated) and `mail_from`",
                ));
            }
        }
    }
    if recipients.is_empty() {
        return Err(ApiError::invalid_field(
            "to",
            "give the envelope recipients as ?to=someone@example.com (repeatable)",
        ));
    }
    let bytes = raw::normalise_line_endings(body.to_vec());
    let checked = raw::check(&bytes).map_err(ApiError::invalid)?;
    let submission = raw::Submission {
        checked,
        recipients,
        mail_from,
        ret: None,
        envid: None,
        via: "http",
        received: Some(format!(
            "Received: by {} (Sluice) with HTTP; {}",
            node.config.delivery.ehlo_name,
            raw::rfc2822_date(now_ms())
        )),
        tenant: Some(Arc::clone(&caller.tenant)),
    };
    let cap = node.config.limits.max_rejected_reported;
    let queued = raw::ingest(node, submission, |q, batch| {
        if let Some(i) = &idem {
            i.put(batch, StatusCode::ACCEPTED, &raw_accepted(q, cap));
        }
    })
    .await
    .map_err(|e| match e {
        raw::IngestError::Invalid(f) => ApiError::invalid(f),
        raw::IngestError::Upload(u) => u.into(),
        raw::IngestError::Bucket(b) => bucket_error(b),
        raw::IngestError::Quota(q) => super::quota_error(&caller, 0, q),
    })?;
    Ok(json_response(
        StatusCode::ACCEPTED,
        raw_accepted(&queued, cap),
    ))
}

const RFC822: &[&str] = &["message/rfc822"];

/// The 202 of a raw message: its id, bucket and stream, and what became of its recipients.
fn raw_accepted(q: &raw::Queued, cap: usize) -> Vec<u8> {
    let mut suppressed = SuppressedList::new(cap);
    for (i, email, reason) in &q.suppressed {
        suppressed.note(*i as u64, email, Some(*reason));
    }
    let ids = json!({
        "id": q.id.map(|j| j.to_string()),
        "campaign": q.campaign,
        "stream": q.stream,
    });
    accepted_body(ids, q.queued, suppressed, RejectList::new(cap))
}

fn bucket_error(e: BucketError) -> ApiError {
    match e {
        BucketError::Spool(e) => e.into(),
        BucketError::Exhausted => ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "campaigns_exhausted",
            "no campaign numbers left",
        ),
    }
}

/// `GET /v1/messages/{id}`: a message (the id its 202 gave) or a campaign recipient (a job id
/// from an event or the delivery log): recipient, state, and every attempt, fate and later
/// report with its reply, oldest first. 404 once retention has deleted its tombstone.
#[utoipa::path(
    get,
    path = "/messages/{id}",
    operation_id = "get_message",
    tag = "messages",
    summary = "A message or campaign recipient: state and history",
    params(("id" = String, Path, description = "the message's id")),
    responses(
        (status = 200, description = "the message", body = super::schema::Message),
        (status = 404, description = "no such message, or past retention", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn show(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let job: JobId = id.parse().map_err(|()| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "message_not_found",
            format!("{id:?} is not a message id (<campaign>.<index>)"),
        )
        .field("id")
    })?;
    let node = Arc::clone(&s.node);
    let found = tokio::task::spawn_blocking(move || {
        let Some(loaded) = node.load_job(job)? else {
            return Ok(None);
        };
        node.spool.history(job).map(|h| Some((loaded, h)))
    })
    .await
    .map_err(|e| ApiError::internal("message read task", e))?
    .map_err(ApiError::from)?;
    // Another tenant's message is not found, as if it did not exist.
    let found = found.filter(|((c, _), _)| c.record.tenant() == caller.tenant.name());
    let Some(((campaign, bytes), history)) = found else {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "message_not_found",
            format!("no message {id}: never accepted, or its record is past retention"),
        )
        .field("id"));
    };
    let rec = JobRecord::decode(&bytes).map_err(|e| ApiError::internal("job record", e))?;
    let time = crate::effects::delivery_log::rfc3339;
    let r = &campaign.record;
    let mut v = json!({
        "id": job.to_string(),
        "campaign": r.id,
        "kind": r.kind,
        "recipient": rec.address,
        "state": rec.state.name(rec.attempts),
        "attempts": rec.attempts,
        "accepted_at": time(rec.accepted_at_ms),
        "from": r.from,
        "subject": r.subject,
        "tags": r.tags,
        "events": history
            .iter()
            .map(|e| serde_json::from_slice(e).unwrap_or(Value::Null))
            .collect::<Vec<Value>>(),
    });
    if let Some(stream) = &r.stream {
        v["stream"] = json!(stream);
    }
    if !rec.last_response.is_empty() {
        v["last_response"] = json!(rec.last_response);
    }
    // A queued record holds its next attempt; a tombstone the time it became final.
    let at = if rec.state.is_final() {
        "final_at"
    } else {
        "next_attempt_at"
    };
    v[at] = json!(time(rec.next_attempt_ms));
    Ok(axum::Json(v).into_response())
}
