//! The HTTP API (axum): the router, authentication, load shedding and the request plumbing
//! every handler shares (content type, bounded body reads, JSON parsing that names the field).
//! One file per resource below; every error is an [`ApiError`], answered as the JSON body
//! `{"error": {"code", "message", "field"}}`.
//!
//! * [`campaigns`]: `POST /v1/campaigns`, the NDJSON recipient upload, `GET`, pause / resume /
//!   cancel. [`messages`]: `POST /v1/messages` and `GET /v1/messages/{id}` (any job's lookup).
//! * [`suppressions`]: `/v1/suppressions…`, import and export. [`feedback`]: `POST /v1/feedback`.
//!   [`inbound`]: `/v1/inbound…`, postmaster and abuse mail kept for the operator.
//!   [`unsubscribe`]: `/u/{token}` (no API key).
//! * [`domains`]: `GET /v1/domains`, `GET /v1/queue`, suspend / resume a domain.
//!   [`sending_domains`]: `/v1/sending-domains…`, the From domains' breaker state and rates.
//!   [`tls_reports`]: `GET /v1/tls-reports`, today's TLS reporting counts and MTA-STS policies.
//! * [`admin`]: `/v1/admin/…`, tenants and API keys (operator keys only).
//! * [`idempotency`]: `Idempotency-Key`. [`lines`]: the line-by-line reader of both uploads.
//! * [`openapi`]: the OpenAPI description (`GET /v1/openapi.json`), generated from each
//!   handler's `#[utoipa::path]`; the router below is built from the same annotations.
//!   [`schema`]: the shapes of the answers handlers build as JSON. [`extract`]: query and path
//!   extractors whose refusals name the parameter.
//!
//! Handlers validate through [`crate::intake::ingest`] and persist through the spool; they never speak
//! SMTP. RocksDB reads go to the blocking pool.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::{Body, Bytes};
use axum::extract::{MatchedPath, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use futures_util::StreamExt;
use tokio::sync::Semaphore;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

mod admin;
mod campaigns;
mod cluster;
mod domains;
mod error;
mod extract;
mod feedback;
mod idempotency;
mod inbound;
mod lines;
mod messages;
pub mod openapi;
mod schema;
mod sending_domains;
mod shaping;
mod suppressions;
mod tls_reports;
mod unsubscribe;

pub use error::ApiError;
use error::ApiResult;
pub use idempotency::expire as expire_idempotency;

use crate::node::Node;
use crate::store::tenants::{Caller, QuotaExceeded, Reservation};

#[derive(Clone)]
struct AppState {
    node: Arc<Node>,
    engine: crate::outbound::delivery::EngineHandle,
    slots: Arc<Semaphore>,
}

/// Builds the router. `/healthz`, `/readyz` and `/metrics` need no key; `/v1` does.
/// The position a cursor-paged list continues from: `None` without a cursor, an error naming
/// `cursor` when `decode` does not take it.
fn page_cursor<T>(
    cursor: Option<&str>,
    decode: impl FnOnce(&str) -> Option<T>,
) -> Result<Option<T>, ApiError> {
    cursor
        .map(|c| {
            decode(c)
                .ok_or_else(|| ApiError::invalid_field("cursor", "not a cursor this API returned"))
        })
        .transpose()
}

/// A cursor that names a key: the key in hex (suppressions, and the lists of [`page_of`]).
fn encode_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

/// The key of an [`encode_cursor`] cursor; `None` for anything else.
fn decode_cursor(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2048 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// One page of `items` (sorted by `key`, which is unique) after the one a cursor names, and the
/// cursor of the next page (the last key shown, in hex) when more follow. For the lists kept in
/// memory: tenants, API keys, sending domains.
fn page_of<T>(
    items: Vec<T>,
    key: impl Fn(&T) -> String,
    q: &PageQuery,
    max: usize,
) -> Result<(Vec<T>, Option<String>), ApiError> {
    let limit = page_limit(q.limit, max)?;
    let after = page_cursor(q.cursor.as_deref(), |c| {
        String::from_utf8(decode_cursor(c)?).ok()
    })?;
    let mut rest: Vec<T> = items
        .into_iter()
        .filter(|t| after.as_ref().is_none_or(|a| key(t) > *a))
        .collect();
    if rest.len() <= limit {
        return Ok((rest, None));
    }
    rest.truncate(limit);
    let next = rest.last().map(|t| encode_cursor(key(t).as_bytes()));
    Ok((rest, next))
}

/// A tenant's routes: its own campaigns, messages, suppressions, sending domains.
fn tenant_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(campaigns::create, campaigns::list))
        .routes(routes!(campaigns::get))
        .routes(routes!(campaigns::add_recipients))
        .routes(routes!(campaigns::pause))
        .routes(routes!(campaigns::resume))
        .routes(routes!(campaigns::cancel))
        .routes(routes!(messages::send))
        .routes(routes!(messages::send_raw))
        .routes(routes!(messages::show))
        .routes(routes!(suppressions::list))
        .routes(routes!(suppressions::import))
        .routes(routes!(suppressions::export))
        .routes(routes!(
            suppressions::get,
            suppressions::put,
            suppressions::delete
        ))
        .routes(routes!(sending_domains::list))
        .routes(routes!(sending_domains::get))
        .routes(routes!(sending_domains::resume))
}

/// The operator's routes: the fleet's destinations, sources, reports and tenants.
fn operator_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(feedback::post))
        .routes(routes!(inbound::list))
        .routes(routes!(inbound::get, inbound::delete))
        .routes(routes!(domains::list))
        .routes(routes!(shaping::list))
        .routes(routes!(shaping::lift))
        .routes(routes!(shaping::sources))
        .routes(routes!(cluster::show))
        .routes(routes!(domains::queue))
        .routes(routes!(tls_reports::today))
        .routes(routes!(domains::suspend))
        .routes(routes!(domains::resume))
        .routes(routes!(admin::tenants, admin::add_tenant))
        .routes(routes!(admin::tenant))
        .routes(routes!(admin::keys, admin::add_key))
        .routes(routes!(admin::revoke_key))
}

/// The routes without a key: probes, metrics, the unsubscribe page.
fn public_routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(healthz))
        .routes(routes!(readyz))
        .routes(routes!(metrics))
        .routes(routes!(openapi::serve))
        .routes(routes!(unsubscribe::page, unsubscribe::post))
}

/// Every route, without the layers: what [`openapi::description`] describes.
fn routes() -> OpenApiRouter<AppState> {
    public_routes().nest("/v1", tenant_routes().merge(operator_routes()))
}

/// Builds the router. `/healthz`, `/readyz`, `/metrics`, `/u/{token}` and
/// `/v1/openapi.json` need no key; the rest of `/v1` does.
pub fn router(node: Arc<Node>, engine: crate::outbound::delivery::EngineHandle) -> Router {
    let state = AppState {
        engine,
        slots: Arc::new(Semaphore::new(node.config.http.max_concurrent_requests)),
        node,
    };
    let operator = operator_routes().route_layer(middleware::from_fn(operator_only));
    let v1 = tenant_routes()
        .merge(operator)
        .fallback(|| async {
            ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such API route")
        })
        .route_layer(middleware::from_fn_with_state(state.clone(), guard));
    let (router, _) = public_routes().nest("/v1", v1).split_for_parts();
    router.layer(middleware::from_fn(observe)).with_state(state)
}

#[utoipa::path(get, path = "/healthz", operation_id = "healthz", tag = "health",
    summary = "Liveness: the process answers",
    responses((status = 200, description = "alive", body = String, content_type = "text/plain")))]
async fn healthz() -> &'static str {
    "ok\n"
}

#[utoipa::path(get, path = "/metrics", operation_id = "metrics", tag = "health",
    summary = "Prometheus metrics",
    responses((status = 200, description = "the text exposition format", body = String, content_type = "text/plain")))]
async fn metrics() -> Response {
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        crate::metrics::render(),
    )
        .into_response()
}

#[utoipa::path(get, path = "/readyz", operation_id = "readyz", tag = "health",
    summary = "Readiness: recovered and not draining",
    responses(
        (status = 200, description = "ready (in cluster mode, and which mode)", body = String, content_type = "text/plain"),
        (status = 503, description = "recovering or draining", body = String, content_type = "text/plain")))]
async fn readyz(State(s): State<AppState>) -> Response {
    if s.node.is_ready() {
        // In cluster mode the body says which mode: a degraded node is ready (it sends on
        // local shares), and says so.
        match s.node.cluster() {
            Some(c) => (StatusCode::OK, format!("ready\ncluster: {}\n", c.mode())).into_response(),
            None => (StatusCode::OK, "ready\n").into_response(),
        }
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
    let caller = match authenticate(&s.node, req.headers()) {
        Ok(c) => c,
        Err(e) => return e.into_response(),
    };
    if let Err(wait) = caller.tenant.admit_request() {
        let rate = caller
            .tenant
            .spec
            .rate
            .map_or_else(String::new, |r| r.to_string());
        let limit = format!(
            "tenant {:?} may make {rate} API requests",
            caller.tenant.name()
        );
        return rate_limited(&caller, limit, wait).into_response();
    }
    if let Err((rate, wait)) = s.node.tenants.admit_key(&caller) {
        let limit = format!("API key {} may make {rate} requests", caller.key.record.id);
        return rate_limited(&caller, limit, wait).into_response();
    }
    let mut req = req;
    req.extensions_mut().insert(caller);
    let Ok(_slot) = Arc::clone(&s.slots).try_acquire_owned() else {
        return ApiError::unavailable("overloaded", "too many requests in progress; retry shortly")
            .into_response();
    };
    next.run(req).await
}

/// Lets only the operator's keys through (after [`guard`] has named the caller).
async fn operator_only(req: Request, next: Next) -> Response {
    let admin = req.extensions().get::<Caller>().is_some_and(Caller::admin);
    if admin {
        next.run(req).await
    } else {
        ApiError::new(
            StatusCode::FORBIDDEN,
            "operator_only",
            "this route takes the operator's keys ([auth] api_keys), not a tenant's",
        )
        .field("Authorization")
        .into_response()
    }
}

/// The caller a request's bearer key stands for (see [`crate::store::tenants`]).
fn authenticate(node: &Node, headers: &HeaderMap) -> Result<Caller, ApiError> {
    let unauthorized =
        |m: &str| ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", m).field("Authorization");
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
    node.tenants
        .authenticate(token.as_bytes())
        .ok_or_else(|| unauthorized("invalid API key"))
}

/// 429 `rate_limited` for `caller` over `limit` (what it may do), for `wait`.
fn rate_limited(caller: &Caller, limit: String, wait: std::time::Duration) -> ApiError {
    let secs = wait.as_secs_f64().ceil() as u64;
    too_many(
        caller,
        "rate_limited",
        format!("{limit}; retry after {secs} s"),
        secs,
    )
}

/// 429 `code` for `caller`'s tenant (counted): come back in `retry_after` seconds.
fn too_many(caller: &Caller, code: &'static str, message: String, retry_after: u64) -> ApiError {
    crate::metrics::TENANT_REFUSED
        .with_label_values(&[caller.tenant.label.as_str(), code])
        .inc();
    ApiError {
        retry_after: Some(retry_after.max(1)),
        ..ApiError::new(StatusCode::TOO_MANY_REQUESTS, code, message)
    }
}

/// Holds `n` recipients of the caller's tenant's limits until the request commits: 429 (and
/// nothing accepted) when they would take it past its `max_queued` or its `daily_quota`.
fn admit_recipients(node: &Node, caller: &Caller, n: u64) -> Result<Reservation, ApiError> {
    let tenant = &caller.tenant;
    if let Some(max) = tenant.spec.max_queued {
        let queued: u64 = node
            .campaigns
            .all()
            .iter()
            .filter(|c| c.record.tenant() == tenant.name())
            .map(|c| c.counts.snapshot().queued)
            .sum();
        if queued.saturating_add(n) > max {
            return Err(too_many(
                caller,
                "max_queued",
                format!(
                    "tenant {:?} has {queued} recipients queued and may have {max}; these {n} were not accepted: retry when some have been sent",
                    tenant.name()
                ),
                60,
            ));
        }
    }
    tenant
        .reserve(n, now_ms())
        .map_err(|q| quota_error(caller, n, q))
}

/// 429 `daily_quota_exceeded` for `n` recipients (0: the request's) over the caller's quota.
fn quota_error(caller: &Caller, n: u64, q: QuotaExceeded) -> ApiError {
    let these = if n == 0 {
        "this request's recipients were".to_owned()
    } else {
        format!("these {n} were")
    };
    too_many(
        caller,
        "daily_quota_exceeded",
        format!(
            "tenant {:?} may have {} recipients accepted a day (UTC) and has had {}; {these} not accepted",
            caller.tenant.name(),
            q.quota,
            q.used
        ),
        q.retry_after_s,
    )
}

/// 422 naming `from` when the caller's tenant may not send as `from`'s domain.
fn check_sending_domain(caller: &Caller, from: &str) -> Result<(), ApiError> {
    let domain = crate::effects::guard::domain_of(from);
    if caller.tenant.may_send_as(&domain) {
        return Ok(());
    }
    Err(ApiError::invalid_field(
        "from",
        format!(
            "{domain} is not a sending domain of tenant {:?} (its sending_domains are {}); nothing was accepted",
            caller.tenant.name(),
            caller.tenant.spec.sending_domains.join(", ")
        ),
    ))
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

/// `?limit=` of a report that shows its top entries (`GET /v1/domains`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ListQuery {
    limit: Option<usize>,
}

/// `?cursor=&limit=` of a paged list.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct PageQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
}

/// Upper bound of `limit` in the campaign list and the domain report.
const MAX_LIST_LIMIT: usize = 10_000;

fn list_limit(q: &ListQuery) -> Result<usize, ApiError> {
    page_limit(q.limit, MAX_LIST_LIMIT)
}

/// The `limit` of a list: 100 unless given, 1 to `max`.
fn page_limit(limit: Option<usize>, max: usize) -> Result<usize, ApiError> {
    match limit {
        None => Ok(100),
        Some(n) if (1..=max).contains(&n) => Ok(n),
        Some(_) => Err(ApiError::invalid_field(
            "limit",
            format!("must be between 1 and {max}"),
        )),
    }
}

fn json_response(status: StatusCode, body: Vec<u8>) -> Response {
    (status, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
