//! The HTTP API (axum): routes, authentication, load shedding, error bodies, idempotency.
//!
//! Owns the HTTP contract of DESIGN §7. Handlers validate through `ingest` and persist through the
//! spool; they never speak SMTP. RocksDB reads go to the blocking pool. Every error is a JSON body
//! `{"error": {"code", "message", "field"}}`.

use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Path, Query, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures_util::StreamExt;
use serde_json::{Value, json};
use subtle::ConstantTimeEq;
use tokio::sync::Semaphore;
use uuid::Uuid;

mod lines;
mod suppressions;

use crate::campaign::{Campaign, CampaignKind, CampaignState};
use crate::ingest::{
    self, ComposeRequest, FieldError, RecipientRules, Rejected, Upload, UploadError,
};
use crate::node::Node;
use crate::spool::{SpoolBatch, SpoolError};

/// An API error: status, stable machine code, human message, and the field at fault.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
    pub field: Option<String>,
    pub retry_after: Option<u64>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            field: None,
            retry_after: None,
        }
    }

    pub fn field(mut self, field: impl Into<String>) -> ApiError {
        let f = field.into();
        self.field = if f.is_empty() { None } else { Some(f) };
        self
    }

    fn invalid(e: FieldError) -> ApiError {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("{}: {}", e.field, e.message),
        )
        .field(e.field)
    }

    fn unavailable(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            retry_after: Some(1),
            ..ApiError::new(StatusCode::SERVICE_UNAVAILABLE, code, message)
        }
    }

    fn not_found(id: &str) -> ApiError {
        ApiError::new(
            StatusCode::NOT_FOUND,
            "campaign_not_found",
            format!("no campaign with id {id:?}"),
        )
        .field("id")
    }
}

impl From<SpoolError> for ApiError {
    fn from(e: SpoolError) -> ApiError {
        match e {
            SpoolError::NoSpace(_) => ApiError {
                retry_after: Some(30),
                ..ApiError::new(
                    StatusCode::INSUFFICIENT_STORAGE,
                    "spool_full",
                    format!("nothing was accepted: {e}"),
                )
            },
            SpoolError::Closed => ApiError::unavailable(
                "shutting_down",
                "the server is shutting down; nothing was accepted",
            ),
            other => {
                tracing::error!(error = %other, "spool write failed");
                ApiError::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "spool_error",
                    format!("nothing was accepted: {other}"),
                )
            }
        }
    }
}

impl From<UploadError> for ApiError {
    fn from(e: UploadError) -> ApiError {
        match e {
            UploadError::Spool(s) => s.into(),
            UploadError::CampaignFull => ApiError::new(
                StatusCode::CONFLICT,
                "campaign_full",
                "the campaign has no room for more recipients; nothing was accepted",
            ),
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut error = json!({"code": self.code, "message": self.message});
        if let Some(f) = self.field {
            error["field"] = Value::String(f);
        }
        let mut resp = (self.status, axum::Json(json!({ "error": error }))).into_response();
        if let Some(secs) = self.retry_after {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(secs));
        }
        resp
    }
}

type ApiResult = Result<Response, ApiError>;

#[derive(Clone)]
struct AppState {
    node: Arc<Node>,
    slots: Arc<Semaphore>,
}

/// Builds the router. `/healthz`, `/readyz` and `/metrics` need no key; `/v1` does.
pub fn router(node: Arc<Node>) -> Router {
    let state = AppState {
        slots: Arc::new(Semaphore::new(node.config.http.max_concurrent_requests)),
        node,
    };
    let v1 = Router::new()
        .route("/campaigns", post(create_campaign).get(list_campaigns))
        .route("/campaigns/{id}", get(get_campaign))
        .route("/campaigns/{id}/recipients", post(add_recipients))
        .route("/campaigns/{id}/pause", post(pause_campaign))
        .route("/campaigns/{id}/resume", post(resume_campaign))
        .route("/campaigns/{id}/cancel", post(cancel_campaign))
        .route("/messages", post(send_message))
        .route("/suppressions", get(suppressions::list))
        .route("/suppressions/import", post(suppressions::import))
        .route("/suppressions/export", get(suppressions::export))
        .route(
            "/suppressions/{address}",
            get(suppressions::get_one)
                .put(suppressions::put_one)
                .delete(suppressions::delete_one),
        )
        .route("/feedback", post(suppressions::feedback))
        .route("/domains", get(list_domains))
        .route("/queue", get(queue_summary))
        .route("/domains/{domain}/suspend", post(suspend_domain))
        .route("/domains/{domain}/resume", post(resume_domain))
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route")
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
                    crate::metrics::render(),
                )
            }),
        )
        .route(
            "/u/{token}",
            get(suppressions::unsubscribe_page).post(suppressions::unsubscribe),
        )
        .nest("/v1", v1)
        .layer(middleware::from_fn(observe))
        .with_state(state)
}

async fn readyz(State(s): State<AppState>) -> Response {
    if s.node.is_ready() {
        (StatusCode::OK, "ready\n").into_response()
    } else if s.node.is_draining() {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n").into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "recovering\n").into_response()
    }
}

/// Counts and times every request by route template (bounded labels).
async fn observe(req: Request, next: Next) -> Response {
    let route = req
        .extensions()
        .get::<MatchedPath>()
        .map_or("unmatched", |m| m.as_str())
        .to_owned();
    let started = std::time::Instant::now();
    let resp = next.run(req).await;
    crate::metrics::HTTP_SECONDS
        .with_label_values(&[&route])
        .observe(started.elapsed().as_secs_f64());
    crate::metrics::HTTP_REQUESTS
        .with_label_values(&[&route, resp.status().as_str()])
        .inc();
    resp
}

/// Readiness, load shedding and authentication for `/v1`.
async fn guard(State(s): State<AppState>, req: Request, next: Next) -> Response {
    if s.node.is_draining() {
        return ApiError::unavailable("shutting_down", "the server is shutting down")
            .into_response();
    }
    if !s.node.is_ready() {
        return ApiError::unavailable("recovering", "the spool is being recovered; retry shortly")
            .into_response();
    }
    if let Err(e) = authenticate(&s.node, req.headers()) {
        return e.into_response();
    }
    let Ok(_slot) = Arc::clone(&s.slots).try_acquire_owned() else {
        return ApiError::unavailable("overloaded", "too many requests in progress; retry shortly")
            .into_response();
    };
    next.run(req).await
}

fn authenticate(node: &Node, headers: &HeaderMap) -> Result<(), ApiError> {
    let unauthorized = |m: &str| {
        let mut e = ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m);
        e.field = Some("Authorization".into());
        e
    };
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("missing Authorization: Bearer <API key>"))?;
    let token = value
        .to_str()
        .ok()
        .and_then(|v| {
            v.strip_prefix("Bearer ")
                .or_else(|| v.strip_prefix("bearer "))
        })
        .ok_or_else(|| unauthorized("the Authorization header must be 'Bearer <API key>'"))?
        .trim();
    // Compare against every key without stopping early, so timing reveals neither which key nor
    // how much of it matched.
    let mut ok = subtle::Choice::from(0u8);
    for key in &node.config.auth.api_keys {
        ok |= key.as_bytes().ct_eq(token.as_bytes());
    }
    if bool::from(ok) {
        Ok(())
    } else {
        Err(unauthorized("invalid API key"))
    }
}

fn now_ms() -> u64 {
    crate::now_ms()
}

fn require_content_type(headers: &HeaderMap, accepted: &[&str]) -> Result<(), ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let essence = ct
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    if accepted.contains(&essence.as_str()) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!(
                "Content-Type must be {} (got {:?})",
                accepted.join(" or "),
                ct
            ),
        )
        .field("Content-Type"))
    }
}

/// Reads a whole body up to `limit` bytes, with a time limit between pieces.
async fn read_body(body: Body, limit: usize, piece_timeout: Duration) -> Result<Bytes, ApiError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    loop {
        let piece = tokio::time::timeout(piece_timeout, stream.next())
            .await
            .map_err(|_| body_timeout())?;
        match piece {
            None => return Ok(Bytes::from(buf)),
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_read_error",
                    format!("reading the body failed: {e}"),
                ));
            }
            Some(Ok(bytes)) => {
                if buf.len() + bytes.len() > limit {
                    return Err(ApiError::new(
                        StatusCode::PAYLOAD_TOO_LARGE,
                        "body_too_large",
                        format!(
                            "the body is larger than {limit} bytes; send large recipient lists to /v1/campaigns/{{id}}/recipients as NDJSON"
                        ),
                    ));
                }
                buf.extend_from_slice(&bytes);
            }
        }
    }
}

fn body_timeout() -> ApiError {
    ApiError::new(
        StatusCode::REQUEST_TIMEOUT,
        "body_timeout",
        "the client stopped sending the body; nothing was accepted",
    )
}

/// Parses a JSON body, naming the field of a type error and the position of a syntax error.
fn parse_json<'a, T: serde::Deserialize<'a>>(body: &'a [u8]) -> Result<T, ApiError> {
    let malformed = |e: serde_json::Error| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            format!("the body is not valid JSON: {e}"),
        )
    };
    if body.trim_ascii_start().first() != Some(&b'{') {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "malformed_json",
            "the body is not valid JSON: it must be a JSON object",
        ));
    }
    let mut de = serde_json::Deserializer::from_slice(body);
    let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        match inner.classify() {
            serde_json::error::Category::Data => {
                let text = inner.to_string();
                let named = ["missing field `", "unknown field `"]
                    .iter()
                    .find_map(|p| text.strip_prefix(p))
                    .and_then(|rest| rest.split('`').next())
                    .map(str::to_owned);
                // serde reports a missing field at the parent's path and an unknown one at its own.
                let field = match named {
                    Some(name) if path == "." => name,
                    Some(name) if path != name && !path.ends_with(&format!(".{name}")) => {
                        format!("{path}.{name}")
                    }
                    _ if path == "." => String::new(),
                    _ => path,
                };
                let text = text.split(" at line ").next().unwrap_or(&text);
                let message = if field.is_empty() {
                    text.to_owned()
                } else {
                    format!("{field}: {text}")
                };
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", message)
                    .field(field)
            }
            // A syntax error inside a value (a lone surrogate, bytes that are not UTF-8) still
            // has a path: name the field.
            _ if path != "." && !path.is_empty() => {
                let text = inner.to_string();
                let text = text.split(" at line ").next().unwrap_or(&text);
                let text = if text.contains("invalid unicode code point") {
                    format!("{text} (the value is not valid UTF-8)")
                } else {
                    text.to_owned()
                };
                ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "malformed_json",
                    format!("the body is not valid JSON at {path}: {text}"),
                )
                .field(path)
            }
            _ => malformed(inner),
        }
    })?;
    de.end().map_err(malformed)?;
    Ok(value)
}

/// An `Idempotency-Key` being served: stored with the response in the same commit.
struct Idempotency {
    key: Vec<u8>,
    route: String,
    node: Arc<Node>,
}

impl Idempotency {
    /// Encodes the stored answer: created_ms (u64) | status (u16) | route len (u8) | route | body.
    fn put(&self, batch: &mut SpoolBatch, status: StatusCode, body: &[u8]) {
        let mut v = Vec::with_capacity(11 + self.route.len() + body.len());
        v.extend_from_slice(&now_ms().to_be_bytes());
        v.extend_from_slice(&status.as_u16().to_be_bytes());
        v.push(self.route.len().min(255) as u8);
        v.extend_from_slice(&self.route.as_bytes()[..self.route.len().min(255)]);
        v.extend_from_slice(body);
        batch.put_idempotency(&self.key, &v);
    }
}

impl Drop for Idempotency {
    fn drop(&mut self) {
        if let Ok(key) = std::str::from_utf8(&self.key)
            && let Ok(mut set) = self.node.idempotency_in_flight.lock()
        {
            set.remove(key);
        }
    }
}

/// A stored answer decoded: (created_ms, status, route, body).
pub fn decode_idempotency(v: &[u8]) -> Option<(u64, u16, &str, &[u8])> {
    let created = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let status = u16::from_be_bytes(v.get(8..10)?.try_into().ok()?);
    let len = usize::from(*v.get(10)?);
    let route = std::str::from_utf8(v.get(11..11 + len)?).ok()?;
    Some((created, status, route, v.get(11 + len..)?))
}

enum IdempotencyCheck {
    None,
    Fresh(Idempotency),
    Replay(Response),
}

async fn check_idempotency(
    node: &Arc<Node>,
    headers: &HeaderMap,
    route: String,
) -> Result<IdempotencyCheck, ApiError> {
    let Some(value) = headers.get("idempotency-key") else {
        return Ok(IdempotencyCheck::None);
    };
    let bad = |m: &str| {
        ApiError::new(StatusCode::BAD_REQUEST, "invalid_idempotency_key", m)
            .field("Idempotency-Key")
    };
    let key = value
        .to_str()
        .map_err(|_| bad("must be printable ASCII"))?
        .to_owned();
    if key.is_empty() || key.len() > 255 || !key.bytes().all(|b| b.is_ascii_graphic()) {
        return Err(bad(
            "must be 1 to 255 printable ASCII characters without spaces",
        ));
    }
    {
        let mut set = node.idempotency_in_flight.lock().expect("idempotency lock");
        if !set.insert(key.clone()) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                "idempotency_in_progress",
                "a request with this Idempotency-Key is still in progress",
            )
            .field("Idempotency-Key"));
        }
    }
    let guard = Idempotency {
        key: key.into_bytes(),
        route,
        node: Arc::clone(node),
    };
    let lookup_node = Arc::clone(node);
    let lookup_key = guard.key.clone();
    let stored =
        tokio::task::spawn_blocking(move || lookup_node.spool.get_idempotency(&lookup_key))
            .await
            .map_err(|e| {
                ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", e.to_string())
            })??;
    if let Some(stored) = stored
        && let Some((created, status, route, body)) = decode_idempotency(&stored)
    {
        let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
        if now_ms().saturating_sub(created) < ttl {
            if route != guard.route {
                return Err(ApiError::new(
                    StatusCode::UNPROCESSABLE_ENTITY,
                    "idempotency_key_reused",
                    format!("this Idempotency-Key was used for {route}"),
                )
                .field("Idempotency-Key"));
            }
            let status = StatusCode::from_u16(status).unwrap_or(StatusCode::ACCEPTED);
            let mut resp = (
                status,
                [(header::CONTENT_TYPE, "application/json")],
                body.to_vec(),
            )
                .into_response();
            resp.headers_mut()
                .insert("idempotent-replayed", HeaderValue::from_static("true"));
            return Ok(IdempotencyCheck::Replay(resp));
        }
    }
    Ok(IdempotencyCheck::Fresh(guard))
}

/// Collects per-recipient rejections, keeping at most `cap` of them.
struct RejectList {
    items: Vec<Rejected>,
    count: u64,
    cap: usize,
}

impl RejectList {
    fn new(cap: usize) -> RejectList {
        RejectList {
            items: Vec::new(),
            count: 0,
            cap,
        }
    }

    fn push(&mut self, r: Rejected) {
        self.count += 1;
        if self.items.len() < self.cap {
            self.items.push(r);
        }
    }
}

/// Recipients found on a suppression list, as the 202 reports them (capped like `rejected`).
struct SuppressedList {
    items: Vec<Value>,
    count: u64,
    cap: usize,
}

impl SuppressedList {
    fn new(cap: usize) -> SuppressedList {
        SuppressedList {
            items: Vec::new(),
            count: 0,
            cap,
        }
    }

    /// Notes the outcome of [`Upload::add`] for the recipient at `index`.
    fn note(&mut self, index: u64, email: &str, added: Option<crate::suppression::Reason>) {
        if let Some(reason) = added {
            self.count += 1;
            if self.items.len() < self.cap {
                self.items
                    .push(json!({"index": index, "email": email, "reason": reason.as_str()}));
            }
        }
    }
}

fn accepted_body(
    id: Uuid,
    accepted: usize,
    suppressed: SuppressedList,
    rejected: RejectList,
) -> Vec<u8> {
    crate::metrics::RECIPIENTS_REJECTED.inc_by(rejected.count);
    let body = json!({
        "id": id,
        "accepted": accepted,
        "suppressed": suppressed.items,
        "suppressed_count": suppressed.count,
        "rejected": rejected.items,
        "rejected_count": rejected.count,
    });
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}

async fn create_campaign(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    compose(s, headers, body, CampaignKind::Bulk).await
}

async fn send_message(State(s): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    compose(s, headers, body, CampaignKind::Transactional).await
}

/// `POST /v1/campaigns` and `POST /v1/messages`: a new campaign and its recipients, atomically.
async fn compose(s: AppState, headers: HeaderMap, body: Body, kind: CampaignKind) -> ApiResult {
    let node = &s.node;
    let limits = &node.config.limits;
    require_content_type(&headers, &["application/json"])?;
    let route = match kind {
        CampaignKind::Bulk => "POST /v1/campaigns",
        CampaignKind::Transactional => "POST /v1/messages",
    };
    let idem = match check_idempotency(node, &headers, route.to_owned()).await? {
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
    let single = match kind {
        CampaignKind::Bulk => {
            if recipients.to.is_some() || recipients.vars.is_some() {
                let field = if recipients.to.is_some() {
                    "to"
                } else {
                    "vars"
                };
                return Err(ApiError::invalid(FieldError::new(
                    field,
                    "not a campaign field; give recipients as [{\"email\", \"vars\"}]",
                )));
            }
            None
        }
        CampaignKind::Transactional => {
            if recipients.list.is_some() {
                return Err(ApiError::invalid(FieldError::new(
                    "recipients",
                    "a message has one recipient: use \"to\" and \"vars\"",
                )));
            }
            let to = recipients
                .to
                .clone()
                .ok_or_else(|| ApiError::invalid(FieldError::new("to", "missing field `to`")))?;
            Some(to)
        }
    };
    let list = recipients.list.unwrap_or_default();
    if list.len() > limits.max_recipients_per_request {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "too_many_recipients",
            format!(
                "{} recipients in one request; the limit is {}: create the campaign, then stream recipients as NDJSON to /v1/campaigns/{{id}}/recipients",
                list.len(),
                limits.max_recipients_per_request
            ),
        )
        .field("recipients"));
    }
    let (record, rules) =
        ingest::validate_campaign(fields, kind, limits, now_ms()).map_err(ApiError::invalid)?;
    let seq = node.campaigns.allocate_seq().ok_or_else(|| {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "campaigns_exhausted",
            "no campaign numbers left",
        )
    })?;
    let id = record.id;
    let record_bytes = record.encode();
    let campaign = Arc::new(Campaign::new(seq, record, 0));
    if let Some(c) = &rules.compiled {
        campaign.set_compiled(Arc::clone(c));
    }
    let mut upload = Upload::new(Arc::clone(node), Arc::clone(&campaign));
    let mut rejected = RejectList::new(limits.max_rejected_reported);
    let mut suppressed = SuppressedList::new(limits.max_rejected_reported);

    if let Some(to) = single {
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
        let added = upload.add(&valid).await?;
        suppressed.note(0, valid.address.as_str(), added);
    }
    for (i, raw) in list.iter().enumerate() {
        match ingest::parse_recipient(raw.get(), &rules, limits) {
            Ok(valid) => {
                let added = upload.add(&valid).await?;
                suppressed.note(i as u64, valid.address.as_str(), added);
            }
            Err((email, e)) => rejected.push(Rejected {
                index: i as u64,
                line: None,
                email,
                field: join_field(&format!("recipients[{i}]"), &e.field),
                error: e.message,
            }),
        }
    }
    let accepted = upload.len();
    let body = accepted_body(id, accepted, suppressed, rejected);
    upload
        .commit(|batch| {
            batch.put_campaign(seq, &record_bytes);
            if let Some(i) = &idem {
                i.put(batch, StatusCode::ACCEPTED, &body);
            }
        })
        .await?;
    node.campaigns.insert(campaign);
    Ok(json_response(StatusCode::ACCEPTED, body))
}

fn join_field(prefix: &str, field: &str) -> String {
    if field.is_empty() {
        prefix.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

fn find_campaign(node: &Node, id: &str) -> Result<Arc<Campaign>, ApiError> {
    let uuid = Uuid::parse_str(id).map_err(|_| ApiError::not_found(id))?;
    node.campaigns
        .get(&uuid)
        .ok_or_else(|| ApiError::not_found(id))
}

fn campaign_json(c: &Campaign) -> serde_json::Value {
    let created = UNIX_EPOCH + Duration::from_millis(c.record.created_at_ms);
    json!({
        "id": c.record.id,
        "kind": c.record.kind,
        "state": c.state(),
        "from": c.record.from,
        "subject": c.record.subject,
        "tags": c.record.tags,
        "personalised": c.record.personalised,
        "created_at": humantime::format_rfc3339_millis(created).to_string(),
        "counts": c.counts.snapshot(),
    })
}

async fn get_campaign(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    let c = find_campaign(&s.node, &id)?;
    Ok(axum::Json(campaign_json(&c)).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
}

/// Upper bound of `limit` in list endpoints without a cursor.
const MAX_LIST_LIMIT: usize = 10_000;

fn list_limit(q: &ListQuery) -> Result<usize, ApiError> {
    match q.limit {
        None => Ok(100),
        Some(n) if (1..=MAX_LIST_LIMIT).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("limit must be between 1 and {MAX_LIST_LIMIT}"),
        )
        .field("limit")),
    }
}

/// `GET /v1/campaigns?limit=`: the newest campaigns with their counts.
async fn list_campaigns(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = list_limit(&q)?;
    let all = s.node.campaigns.all();
    let campaigns: Vec<serde_json::Value> =
        all.iter().take(limit).map(|c| campaign_json(c)).collect();
    Ok(axum::Json(json!({"campaigns": campaigns, "total": all.len()})).into_response())
}

/// `GET /v1/domains?limit=`: every site (queue, connections, rate, state, last reply) and the
/// domains with the most queued recipients.
async fn list_domains(State(s): State<AppState>, Query(q): Query<ListQuery>) -> ApiResult {
    let limit = list_limit(&q)?;
    let report = s.node.report().await;
    let mut suspended: Vec<String> = s
        .node
        .suspended
        .lock()
        .expect("suspended lock")
        .iter()
        .cloned()
        .collect();
    suspended.sort_unstable();
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
async fn queue_summary(State(s): State<AppState>) -> ApiResult {
    let report = s.node.report().await;
    let parked: usize = s
        .node
        .parked
        .lock()
        .expect("parked lock")
        .values()
        .map(Vec::len)
        .sum();
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
    let suspended = s.node.suspended.lock().expect("suspended lock").len();
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
        "delivery": s.node.delivery.get().is_some(),
    }))
    .into_response())
}

async fn change_state(s: &AppState, id: &str, to: CampaignState) -> ApiResult {
    let c = find_campaign(&s.node, id)?;
    let from = c.state();
    if from == CampaignState::Cancelled && to != CampaignState::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "campaign_cancelled",
            "a cancelled campaign cannot be paused or resumed",
        ));
    }
    if from != to {
        s.node.set_campaign_state(&c, to).await?;
    }
    Ok(
        axum::Json(json!({"id": c.record.id, "state": c.state(), "counts": c.counts.snapshot()}))
            .into_response(),
    )
}

async fn pause_campaign(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    change_state(&s, &id, CampaignState::Paused).await
}

async fn resume_campaign(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    change_state(&s, &id, CampaignState::Active).await
}

async fn cancel_campaign(State(s): State<AppState>, Path(id): Path<String>) -> ApiResult {
    change_state(&s, &id, CampaignState::Cancelled).await
}

fn normalise_domain(raw: &str) -> Result<String, ApiError> {
    let bad = |m: String| {
        ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_field", m).field("domain")
    };
    let ascii = idna::domain_to_ascii_strict(raw)
        .map_err(|_| bad(format!("{raw:?} is not a valid domain")))?;
    crate::address::check_host_name(&ascii).map_err(|e| bad(format!("{raw:?}: {e}")))?;
    Ok(ascii)
}

async fn set_suspended(s: &AppState, raw: &str, suspended: bool) -> ApiResult {
    let domain = normalise_domain(raw)?;
    let known = s.node.set_domain_suspended(&domain, suspended);
    let queued = {
        let q = s.node.queue.lock().expect("queue lock");
        q.find_domain(&domain).map_or(0, |d| q.domain_len(d))
    };
    tracing::info!(%domain, suspended, "domain delivery {}", if suspended { "suspended" } else { "resumed" });
    Ok(axum::Json(
        json!({"domain": domain, "suspended": suspended, "queued": queued, "known": known}),
    )
    .into_response())
}

/// `POST /v1/domains/{domain}/suspend`: no new connections or transactions for the domain until
/// resumed; queued mail waits. Runtime state: a restart resumes every domain.
async fn suspend_domain(State(s): State<AppState>, Path(domain): Path<String>) -> ApiResult {
    set_suspended(&s, &domain, true).await
}

async fn resume_domain(State(s): State<AppState>, Path(domain): Path<String>) -> ApiResult {
    set_suspended(&s, &domain, false).await
}

/// `POST /v1/campaigns/{id}/recipients`: an NDJSON stream of `{email, vars?}`, parsed as it
/// arrives and committed at the end: all accepted lines become visible at once, or none do.
async fn add_recipients(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let campaign = find_campaign(node, &id)?;
    if campaign.state() == CampaignState::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "campaign_cancelled",
            "the campaign is cancelled; nothing was accepted",
        ));
    }
    require_content_type(
        &headers,
        &[
            "application/x-ndjson",
            "application/ndjson",
            "application/jsonl",
        ],
    )?;
    let idem = match check_idempotency(
        node,
        &headers,
        format!("POST /v1/campaigns/{}/recipients", campaign.record.id),
    )
    .await?
    {
        IdempotencyCheck::Replay(resp) => return Ok(resp),
        IdempotencyCheck::Fresh(i) => Some(i),
        IdempotencyCheck::None => None,
    };
    let limits = &node.config.limits;
    let mut lines = LineIngest {
        upload: Upload::new(Arc::clone(node), Arc::clone(&campaign)),
        rules: ingest::rules_for(&campaign),
        rejected: RejectList::new(limits.max_rejected_reported),
        suppressed: SuppressedList::new(limits.max_rejected_reported),
        seen: 0,
        node: Arc::clone(node),
    };
    let mut stream = body.into_data_stream();
    let mut split = lines::LineSplitter::new(limits.max_line_bytes);
    let timeout = node.config.http.body_read_timeout;
    loop {
        let piece = tokio::time::timeout(timeout, stream.next())
            .await
            .map_err(|_| body_timeout())?;
        let chunk = match piece {
            None => break,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                return Err(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_read_error",
                    format!("reading the body failed: {e}; nothing was accepted"),
                ));
            }
        };
        let mut pos = 0;
        while let Some(p) = split.next_piece(&chunk, &mut pos) {
            match p {
                lines::Piece::Line(n, l) => lines.line(l, n).await?,
                lines::Piece::TooLong(n) => lines.too_long(n)?,
            }
        }
    }
    match split.finish() {
        Some(lines::Piece::Line(n, l)) => lines.line(l, n).await?,
        Some(lines::Piece::TooLong(n)) => lines.too_long(n)?,
        None => {}
    }
    let LineIngest {
        upload,
        rejected,
        suppressed,
        ..
    } = lines;
    let accepted = upload.len();
    let body = accepted_body(campaign.record.id, accepted, suppressed, rejected);
    upload
        .commit(|batch| {
            if let Some(i) = &idem {
                i.put(batch, StatusCode::ACCEPTED, &body);
            }
        })
        .await?;
    Ok(json_response(StatusCode::ACCEPTED, body))
}

/// Per-line state of an NDJSON upload.
struct LineIngest {
    upload: Upload,
    rules: RecipientRules,
    rejected: RejectList,
    suppressed: SuppressedList,
    seen: u64,
    node: Arc<Node>,
}

impl LineIngest {
    fn count(&mut self) -> Result<(), ApiError> {
        self.seen += 1;
        let max = self.node.config.limits.max_recipients_per_upload as u64;
        if self.seen > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_recipients",
                format!(
                    "more than {max} recipients in one upload; nothing was accepted: split the list into several uploads"
                ),
            ));
        }
        Ok(())
    }

    fn too_long(&mut self, line_no: u64) -> Result<(), ApiError> {
        self.count()?;
        let max = self.node.config.limits.max_line_bytes;
        self.rejected.push(Rejected {
            index: line_no,
            line: Some(line_no + 1),
            email: None,
            field: format!("line {}", line_no + 1),
            error: format!("line is longer than {max} bytes"),
        });
        Ok(())
    }

    async fn line(&mut self, raw: &[u8], line_no: u64) -> Result<(), ApiError> {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        self.count()?;
        let reject = |email: Option<String>, field: &str, error: String| Rejected {
            index: line_no,
            line: Some(line_no + 1),
            email,
            field: join_field(&format!("line {}", line_no + 1), field),
            error,
        };
        let Ok(text) = std::str::from_utf8(raw) else {
            self.rejected
                .push(reject(None, "", "line is not valid UTF-8".into()));
            return Ok(());
        };
        match ingest::parse_recipient(text, &self.rules, &self.node.config.limits) {
            Ok(valid) => {
                let added = self.upload.add(&valid).await?;
                self.suppressed.note(line_no, valid.address.as_str(), added);
            }
            Err((email, e)) => self.rejected.push(reject(email, &e.field, e.message)),
        }
        Ok(())
    }
}

/// Deletes idempotency records older than the configured TTL.
pub async fn expire_idempotency(node: Arc<Node>) -> Result<usize, SpoolError> {
    let ttl = node.config.spool.idempotency_ttl.as_millis() as u64;
    let scan_node = Arc::clone(&node);
    let expired = tokio::task::spawn_blocking(move || {
        let now = crate::now_ms();
        let mut expired = Vec::new();
        scan_node.spool.scan_idempotency(|k, v| {
            let created = decode_idempotency(v).map_or(0, |(c, ..)| c);
            if now.saturating_sub(created) >= ttl {
                expired.push(k.to_vec());
            }
        })?;
        Ok::<_, SpoolError>(expired)
    })
    .await
    .map_err(|e| SpoolError::Rocks(format!("idempotency expiry task failed: {e}")))??;
    if expired.is_empty() {
        return Ok(0);
    }
    let mut batch = node.spool.batch();
    for k in &expired {
        batch.delete_idempotency(k);
    }
    node.spool
        .write(batch, crate::spool::Durability::Buffered)
        .await?;
    Ok(expired.len())
}
