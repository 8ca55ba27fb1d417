//! Suppression lists over HTTP (`/v1/suppressions…`, import and export), raw reports
//! (`POST /v1/feedback`) and the one-click unsubscribe pages (`/u/{token}`).
//!
//! Handlers only: entries and their index live in [`crate::suppression`], report handling in
//! [`crate::feedback`]. Spool reads and scans run on the blocking pool.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use super::{ApiError, ApiResult, AppState, now_ms, parse_json, read_body};
use crate::campaign::Campaign;
use crate::node::Node;
use crate::spool::SpoolError;

// --- Suppressions -------------------------------------------------------------------------------

fn suppression_address(raw: &str) -> Result<String, ApiError> {
    crate::suppression::normalise(raw).map_err(|e| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("address: {e}"),
        )
        .field("address")
    })
}

fn suppression_reason(r: &str) -> Result<crate::suppression::Reason, ApiError> {
    crate::suppression::Reason::parse(r).ok_or_else(|| {
        ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("reason: {r:?} is not one of hard_bounce, complaint, unsubscribe, manual"),
        )
        .field("reason")
    })
}

fn suppression_scope(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    raw.map(|s| {
        crate::suppression::normalise_scope(s).map_err(|e| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("scope: {e}"),
            )
            .field("scope")
        })
    })
    .transpose()
}

/// The stored entries of one address, in every scope. Blocking reads go to the blocking pool.
async fn suppression_entries(
    node: &Arc<Node>,
    address: &str,
) -> Result<Vec<crate::suppression::Entry>, ApiError> {
    let scopes = node.suppressions.scopes(address);
    let node = Arc::clone(node);
    let address = address.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for scope in scopes {
            let key = crate::suppression::key(&scope, &address);
            if let Some(v) = node.spool.get_suppression(&key)?
                && let Ok(e) = crate::suppression::Entry::decode(&v)
            {
                out.push(e);
            }
        }
        Ok::<_, SpoolError>(out)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("reading suppressions: {e}"),
        )
    })?
    .map_err(ApiError::from)
}

/// `GET /v1/suppressions/{address}`: the address's entries (global and per sending domain).
pub(super) async fn get_one(State(s): State<AppState>, Path(raw): Path<String>) -> ApiResult {
    let address = suppression_address(&raw)?;
    let entries = suppression_entries(&s.node, &address).await?;
    if entries.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_suppressed",
            format!("{address} is not on any suppression list"),
        )
        .field("address"));
    }
    Ok(axum::Json(json!({"address": address, "entries": entries})).into_response())
}

#[derive(serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PutSuppression {
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    source: Option<String>,
}

/// `PUT /v1/suppressions/{address}` with an optional `{reason, scope, source}` body (defaults:
/// `manual`, `global`): adds or replaces the entry, synced before the answer. Queued mail to the
/// address is stopped when delivery reaches it.
pub(super) async fn put_one(
    State(s): State<AppState>,
    Path(raw): Path<String>,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let address = suppression_address(&raw)?;
    let body = read_body(body, 64 * 1024, node.config.http.body_read_timeout).await?;
    let req: PutSuppression = if body.iter().all(u8::is_ascii_whitespace) {
        PutSuppression::default()
    } else {
        parse_json(&body)?
    };
    let reason = match req.reason.as_deref() {
        None => crate::suppression::Reason::Manual,
        Some(r) => suppression_reason(r)?,
    };
    let scope = suppression_scope(req.scope.as_deref())?
        .unwrap_or_else(|| crate::suppression::GLOBAL.to_owned());
    if let Some(src) = &req.source
        && (src.len() > 256 || src.chars().any(char::is_control))
    {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "source: at most 256 bytes without control characters",
        )
        .field("source"));
    }
    let entry = crate::suppression::Entry {
        address,
        scope,
        reason,
        created_at_ms: now_ms(),
        source: Some(req.source.unwrap_or_else(|| "api".into())),
        campaign: None,
        job: None,
        category: None,
        detail: None,
    };
    let mut batch = node.spool.batch();
    batch.put_suppression(&entry.key(), &entry.encode());
    node.spool
        .write(batch, crate::spool::Durability::Sync)
        .await?;
    if node.suppressions.insert(&entry) {
        crate::suppression::ADDED
            .with_label_values(&[entry.reason.as_str()])
            .inc();
    }
    Ok(axum::Json(json!(entry)).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScopeQuery {
    #[serde(default)]
    scope: Option<String>,
}

/// `DELETE /v1/suppressions/{address}[?scope=global|domain]`: removes the entry of that scope, or
/// every entry of the address without `scope`.
pub(super) async fn delete_one(
    State(s): State<AppState>,
    Path(raw): Path<String>,
    axum::extract::Query(q): axum::extract::Query<ScopeQuery>,
) -> ApiResult {
    let node = &s.node;
    let address = suppression_address(&raw)?;
    let scope = suppression_scope(q.scope.as_deref())?;
    let scopes: Vec<String> = node
        .suppressions
        .scopes(&address)
        .into_iter()
        .filter(|s| scope.as_ref().is_none_or(|want| want == s))
        .collect();
    if scopes.is_empty() {
        return Err(ApiError::new(
            StatusCode::NOT_FOUND,
            "not_suppressed",
            format!("{address} is not on that suppression list"),
        )
        .field("address"));
    }
    let mut batch = node.spool.batch();
    for sc in &scopes {
        batch.delete_suppression(&crate::suppression::key(sc, &address));
    }
    node.spool
        .write(batch, crate::spool::Durability::Sync)
        .await?;
    for sc in &scopes {
        node.suppressions.remove(&address, sc);
    }
    Ok(axum::Json(json!({"address": address, "deleted": scopes})).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    reason: Option<String>,
}

const MAX_SUPPRESSION_PAGE: usize = 1000;

/// `GET /v1/suppressions?cursor=&limit=&reason=`: entries in key order (scope, then address),
/// `limit` per page (default 100, at most 1000); `next_cursor` continues after the last one.
pub(super) async fn list(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<ListQuery>,
) -> ApiResult {
    let limit = q.limit.unwrap_or(100);
    if !(1..=MAX_SUPPRESSION_PAGE).contains(&limit) {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            format!("limit: between 1 and {MAX_SUPPRESSION_PAGE}"),
        )
        .field("limit"));
    }
    let reason = q.reason.as_deref().map(suppression_reason).transpose()?;
    let after = match &q.cursor {
        None => None,
        Some(c) => Some(decode_cursor(c).ok_or_else(|| {
            ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                "cursor: not a cursor this API returned",
            )
            .field("cursor")
        })?),
    };
    let node = Arc::clone(&s.node);
    let (items, last) = tokio::task::spawn_blocking(move || {
        let mut items = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        node.spool.scan_suppressions(after.as_deref(), |k, v| {
            last = Some(k.to_vec());
            if let Ok(e) = crate::suppression::Entry::decode(v)
                && reason.is_none_or(|r| r == e.reason)
            {
                items.push(e);
            }
            items.len() < limit
        })?;
        Ok::<_, SpoolError>((items, last))
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            format!("listing suppressions: {e}"),
        )
    })??;
    let next = if items.len() == limit {
        last.map(|k| encode_cursor(&k))
    } else {
        None
    };
    Ok(axum::Json(json!({"items": items, "next_cursor": next})).into_response())
}

fn encode_cursor(key: &[u8]) -> String {
    key.iter().map(|b| format!("{b:02x}")).collect()
}

fn decode_cursor(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || s.len() > 2048 {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

// --- One-click unsubscribe (RFC 8058) ---------------------------------------------------------

/// Why an unsubscribe link gets no page or no unsubscribe.
enum LinkRefused {
    /// The spool is still being recovered.
    Starting,
    /// The token does not verify, or its job or campaign is gone.
    NotFound,
}

impl IntoResponse for LinkRefused {
    fn into_response(self) -> Response {
        match self {
            LinkRefused::Starting => (
                StatusCode::SERVICE_UNAVAILABLE,
                [(header::RETRY_AFTER, "5")],
                "Starting up; try again in a few seconds.\n",
            )
                .into_response(),
            LinkRefused::NotFound => (
                StatusCode::NOT_FOUND,
                [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
                "This unsubscribe link is not valid.\n",
            )
                .into_response(),
        }
    }
}

/// The job an unsubscribe token names, once the node is ready and the token verifies.
fn unsubscribe_token(node: &Node, token: &str) -> Result<crate::spool::JobId, LinkRefused> {
    if !node.is_ready() {
        return Err(LinkRefused::Starting);
    }
    node.assembler
        .tokens()
        .verify(crate::tokens::Purpose::Unsubscribe, token)
        .ok_or(LinkRefused::NotFound)
}

/// The recipient and campaign an unsubscribe token names, if it authenticates and its job
/// still exists.
async fn unsubscribe_target(
    node: &Arc<Node>,
    token: &str,
) -> Result<(String, Arc<Campaign>), LinkRefused> {
    let job = unsubscribe_token(node, token)?;
    let Some(campaign) = node.campaigns.by_seq(job.campaign) else {
        return Err(LinkRefused::NotFound);
    };
    let read = Arc::clone(node);
    let bytes = tokio::task::spawn_blocking(move || read.spool.get_job(job))
        .await
        .ok()
        .and_then(Result::ok)
        .flatten();
    let address = bytes
        .as_deref()
        .and_then(|b| crate::spool::JobRecord::decode(b).ok())
        .map(|r| r.address.to_lowercase());
    match address {
        Some(a) => Ok((a, campaign)),
        None => Err(LinkRefused::NotFound),
    }
}

/// `GET /u/{token}`: a plain page with a button that POSTs, so link scanners that follow GETs
/// unsubscribe no one.
pub(super) async fn unsubscribe_page(
    State(s): State<AppState>,
    Path(token): Path<String>,
) -> Response {
    let (address, campaign) = match unsubscribe_target(&s.node, &token).await {
        Ok(t) => t,
        Err(r) => return r.into_response(),
    };
    let domain = crate::address::domain_of(&campaign.record.from);
    let esc = |t: &str| {
        t.replace('&', "&amp;")
            .replace('<', "&lt;")
            .replace('>', "&gt;")
            .replace('"', "&quot;")
    };
    let html = format!(
        "<!doctype html><html><head><meta charset=\"utf-8\"><title>Unsubscribe</title></head>\
         <body><p>Stop mail from {domain} to {address}?</p>\
         <form method=\"post\"><button type=\"submit\">Unsubscribe</button></form></body></html>\n",
        domain = esc(domain),
        address = esc(&address),
    );
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
        html,
    )
        .into_response()
}

/// `POST /u/{token}`: RFC 8058 one-click unsubscribe (the body, `List-Unsubscribe=One-Click` or
/// the page's empty form, is not needed). Suppresses the recipient for the campaign's From
/// domain; idempotent: a repeat changes nothing and answers the same.
pub(super) async fn unsubscribe(State(s): State<AppState>, Path(token): Path<String>) -> Response {
    let node = &s.node;
    let job = match unsubscribe_token(node, &token) {
        Ok(j) => j,
        Err(r) => return r.into_response(),
    };
    match crate::feedback::unsubscribe_job(node, job, "unsubscribe").await {
        Ok(None) => LinkRefused::NotFound.into_response(),
        Ok(Some((address, scope))) => (
            StatusCode::OK,
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            format!("{address} is unsubscribed from {scope}.\n"),
        )
            .into_response(),
        Err(e) => ApiError::from(e).into_response(),
    }
}

// --- Import and export ------------------------------------------------------------------------

/// Rows written per spool batch during an import.
const IMPORT_BATCH: usize = 8192;

/// One import row as NDJSON; also the shape an export writes, so an export imports back.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ImportRow {
    #[serde(default, alias = "email")]
    address: Option<String>,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    scope: Option<String>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    created_at_ms: Option<u64>,
    #[serde(default)]
    campaign: Option<uuid::Uuid>,
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    category: Option<crate::outcome::rules::Category>,
    #[serde(default)]
    detail: Option<String>,
}

impl ImportRow {
    /// Checks and normalises the row into an entry.
    fn entry(self, now: u64) -> Result<crate::suppression::Entry, String> {
        let raw = self.address.ok_or("address: missing")?;
        let address = crate::suppression::normalise(&raw).map_err(|e| format!("address: {e}"))?;
        let reason = match self.reason.as_deref().map(str::trim) {
            None | Some("") => crate::suppression::Reason::Manual,
            Some(r) => crate::suppression::Reason::parse(r).ok_or_else(|| {
                format!("reason: {r:?} is not one of hard_bounce, complaint, unsubscribe, manual")
            })?,
        };
        let scope = match self.scope.as_deref().map(str::trim) {
            None | Some("") => crate::suppression::GLOBAL.to_owned(),
            Some(s) => crate::suppression::normalise_scope(s).map_err(|e| format!("scope: {e}"))?,
        };
        for (name, v) in [
            ("source", &self.source),
            ("job", &self.job),
            ("detail", &self.detail),
        ] {
            if let Some(v) = v
                && (v.len() > 1000 || v.chars().any(|c| c == '\r' || c == '\n'))
            {
                return Err(format!("{name}: at most 1000 bytes on one line"));
            }
        }
        Ok(crate::suppression::Entry {
            address,
            scope,
            reason,
            created_at_ms: self.created_at_ms.unwrap_or(now),
            source: Some(self.source.unwrap_or_else(|| "import".into())),
            campaign: self.campaign,
            job: self.job,
            category: self.category,
            detail: self.detail,
        })
    }
}

/// Splits one CSV record (RFC 4180 quoting; no line breaks inside fields).
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut chars = line.chars().peekable();
    loop {
        let mut field = String::new();
        if chars.peek() == Some(&'"') {
            chars.next();
            loop {
                match chars.next() {
                    None => return Err("unterminated quoted field".into()),
                    Some('"') if chars.peek() == Some(&'"') => {
                        chars.next();
                        field.push('"');
                    }
                    Some('"') => break,
                    Some(c) => field.push(c),
                }
            }
            match chars.next() {
                None => {
                    out.push(field);
                    return Ok(out);
                }
                Some(',') => {}
                Some(c) => return Err(format!("{c:?} after a closing quote")),
            }
        } else {
            loop {
                match chars.next() {
                    None => {
                        out.push(field.trim().to_owned());
                        return Ok(out);
                    }
                    Some(',') => break,
                    Some('"') => return Err("a quote inside an unquoted field".into()),
                    Some(c) => field.push(c),
                }
            }
            field = field.trim().to_owned();
        }
        out.push(field);
    }
}

/// CSV columns an import understands, in the order an export writes them.
const CSV_COLUMNS: [&str; 9] = [
    "address",
    "scope",
    "reason",
    "created_at",
    "source",
    "campaign",
    "job",
    "category",
    "detail",
];

/// Reads a CSV row into an import row by the header's columns.
fn csv_row(columns: &[usize], fields: Vec<String>) -> Result<ImportRow, String> {
    let mut row = ImportRow {
        address: None,
        reason: None,
        scope: None,
        source: None,
        created_at_ms: None,
        campaign: None,
        job: None,
        category: None,
        detail: None,
    };
    if fields.len() > columns.len() {
        return Err(format!(
            "{} fields, the header has {}",
            fields.len(),
            columns.len()
        ));
    }
    for (value, &col) in fields.into_iter().zip(columns) {
        if value.is_empty() {
            continue;
        }
        match CSV_COLUMNS[col] {
            "address" => row.address = Some(value),
            "scope" => row.scope = Some(value),
            "reason" => row.reason = Some(value),
            "created_at" => {
                let t = humantime::parse_rfc3339_weak(&value)
                    .map_err(|e| format!("created_at: {e}"))?;
                row.created_at_ms = t
                    .duration_since(std::time::UNIX_EPOCH)
                    .ok()
                    .map(|d| d.as_millis() as u64);
            }
            "source" => row.source = Some(value),
            "campaign" => {
                row.campaign = Some(value.parse().map_err(|_| "campaign: not a campaign id")?)
            }
            "job" => row.job = Some(value),
            "category" => {
                row.category = Some(
                    crate::outcome::rules::Category::parse(&value)
                        .ok_or_else(|| format!("category: {value:?} is not a bounce category"))?,
                )
            }
            _ => row.detail = Some(value),
        }
    }
    Ok(row)
}

enum ImportFormat {
    Csv { columns: Option<Vec<usize>> },
    Ndjson,
}

/// Import state: rows checked and written in batches, bad rows listed by line.
struct Import {
    node: Arc<Node>,
    format: ImportFormat,
    pending: Vec<crate::suppression::Entry>,
    imported: u64,
    replaced: u64,
    rejected: Vec<serde_json::Value>,
    rejected_count: u64,
    rows: u64,
    now: u64,
}

impl Import {
    fn reject(&mut self, line: u64, error: String) {
        self.rejected_count += 1;
        if self.rejected.len() < self.node.config.limits.max_rejected_reported {
            self.rejected
                .push(json!({"line": line + 1, "error": error}));
        }
    }

    async fn line(&mut self, raw: &[u8], n: u64) -> Result<(), ApiError> {
        let raw = raw.strip_suffix(b"\r").unwrap_or(raw);
        if raw.iter().all(u8::is_ascii_whitespace) {
            return Ok(());
        }
        let Ok(text) = std::str::from_utf8(raw) else {
            self.reject(n, "not UTF-8".into());
            return Ok(());
        };
        let row = match &mut self.format {
            ImportFormat::Ndjson => {
                serde_json::from_str::<ImportRow>(text).map_err(|e| e.to_string())
            }
            ImportFormat::Csv { columns } => match csv_fields(text) {
                Err(e) => Err(e),
                Ok(fields) => match columns {
                    Some(cols) => csv_row(cols, fields),
                    None => {
                        let first = fields.first().map(|f| f.to_ascii_lowercase());
                        if matches!(first.as_deref(), Some("address" | "email")) {
                            let mut cols = Vec::new();
                            for f in &fields {
                                let f = f.to_ascii_lowercase();
                                let f = if f == "email" { "address".into() } else { f };
                                match CSV_COLUMNS.iter().position(|c| *c == f) {
                                    Some(i) => cols.push(i),
                                    None => {
                                        return Err(ApiError::new(
                                            StatusCode::UNPROCESSABLE_ENTITY,
                                            "invalid_field",
                                            format!(
                                                "line {}: unknown column {f:?}; known: {}",
                                                n + 1,
                                                CSV_COLUMNS.join(", ")
                                            ),
                                        )
                                        .field(format!("line {}", n + 1)));
                                    }
                                }
                            }
                            *columns = Some(cols);
                            return Ok(());
                        }
                        // No header: address, reason, scope, source.
                        *columns = Some(vec![0, 2, 1, 4]);
                        csv_row(&[0, 2, 1, 4], fields)
                    }
                },
            },
        };
        self.rows += 1;
        let max = self.node.config.limits.max_recipients_per_upload as u64;
        if self.rows > max {
            return Err(ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_rows",
                format!(
                    "more than {max} rows in one import; the rows before were kept: split the file"
                ),
            ));
        }
        match row.and_then(|r| r.entry(self.now)) {
            Ok(e) => {
                self.pending.push(e);
                if self.pending.len() >= IMPORT_BATCH {
                    self.flush(crate::spool::Durability::Buffered).await?;
                }
            }
            Err(e) => self.reject(n, e),
        }
        Ok(())
    }

    /// Writes the pending rows, then makes them visible in the index.
    async fn flush(&mut self, durability: crate::spool::Durability) -> Result<(), ApiError> {
        let entries = std::mem::take(&mut self.pending);
        if !entries.is_empty() {
            self.node.spool.check_space()?;
        }
        let mut batch = self.node.spool.batch();
        for e in &entries {
            batch.put_suppression(&e.key(), &e.encode());
        }
        self.node.spool.write(batch, durability).await?;
        for e in &entries {
            if self.node.suppressions.insert(e) {
                self.imported += 1;
                crate::suppression::ADDED
                    .with_label_values(&[e.reason.as_str()])
                    .inc();
            } else {
                self.replaced += 1;
            }
        }
        Ok(())
    }
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct FormatQuery {
    #[serde(default)]
    format: Option<String>,
    #[serde(default)]
    reason: Option<String>,
}

fn format_of(q: Option<&str>, headers: &axum::http::HeaderMap) -> Result<bool, ApiError> {
    let ct = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    match q.unwrap_or(match ct.as_str() {
        "text/csv" => "csv",
        "application/x-ndjson" | "application/ndjson" | "application/jsonl" => "ndjson",
        _ => "",
    }) {
        "csv" => Ok(true),
        "ndjson" => Ok(false),
        _ => Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            "send text/csv or application/x-ndjson (or ?format=csv|ndjson)",
        )
        .field("Content-Type")),
    }
}

/// `POST /v1/suppressions/import`: CSV (`address,reason,scope,source`, header optional; the
/// columns of an export are understood) or NDJSON rows, streamed. Good rows are kept, written in
/// batches and synced before the answer; bad ones are listed by line number. Existing entries of
/// the same address and scope are replaced.
pub(super) async fn import(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<FormatQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult {
    use futures_util::StreamExt;
    let node = &s.node;
    let csv = format_of(q.format.as_deref(), &headers)?;
    if q.reason.is_some() {
        return Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "invalid_field",
            "reason: give the reason per row",
        )
        .field("reason"));
    }
    let mut import = Import {
        node: Arc::clone(node),
        format: if csv {
            ImportFormat::Csv { columns: None }
        } else {
            ImportFormat::Ndjson
        },
        pending: Vec::with_capacity(IMPORT_BATCH),
        imported: 0,
        replaced: 0,
        rejected: Vec::new(),
        rejected_count: 0,
        rows: 0,
        now: now_ms(),
    };
    let mut split = super::lines::LineSplitter::new(node.config.limits.max_line_bytes);
    let mut stream = body.into_data_stream();
    let timeout = node.config.http.body_read_timeout;
    let mut failure = None;
    loop {
        let chunk = match tokio::time::timeout(timeout, stream.next()).await {
            Err(_) => {
                failure = Some(super::body_timeout());
                break;
            }
            Ok(None) => break,
            Ok(Some(Ok(c))) => c,
            Ok(Some(Err(e))) => {
                failure = Some(ApiError::new(
                    StatusCode::BAD_REQUEST,
                    "body_read_error",
                    format!("reading the body failed: {e}"),
                ));
                break;
            }
        };
        let mut pos = 0;
        while let Some(p) = split.next_piece(&chunk, &mut pos) {
            match p {
                super::lines::Piece::Line(n, l) => import.line(l, n).await?,
                super::lines::Piece::TooLong(n) => import.reject(
                    n,
                    format!("longer than {} bytes", node.config.limits.max_line_bytes),
                ),
            }
        }
    }
    match split.finish() {
        Some(super::lines::Piece::Line(n, l)) if failure.is_none() => import.line(l, n).await?,
        Some(super::lines::Piece::TooLong(n)) => import.reject(n, "line too long".into()),
        _ => {}
    }
    // Rows read before a broken upload are kept, as the answer says.
    import.flush(crate::spool::Durability::Sync).await?;
    if let Some(mut e) = failure {
        e.message = format!(
            "{}; {} rows before it were imported",
            e.message,
            import.imported + import.replaced
        );
        return Err(e);
    }
    Ok(axum::Json(json!({
        "imported": import.imported,
        "replaced": import.replaced,
        "rejected_count": import.rejected_count,
        "rejected": import.rejected,
    }))
    .into_response())
}

fn csv_quote(out: &mut String, v: &str) {
    if v.contains([',', '"', '\r', '\n']) {
        out.push('"');
        out.push_str(&v.replace('"', "\"\""));
        out.push('"');
    } else {
        out.push_str(v);
    }
}

/// Keys scanned per step of an export; each step's output is one body chunk.
const EXPORT_STEP: usize = 4096;

/// `GET /v1/suppressions/export?format=ndjson|csv&reason=`: every entry, streamed in key order
/// as the spool is scanned (NDJSON by default; CSV with a header row).
pub(super) async fn export(
    State(s): State<AppState>,
    axum::extract::Query(q): axum::extract::Query<FormatQuery>,
) -> ApiResult {
    let csv = match q.format.as_deref() {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                "invalid_field",
                format!("format: {other:?} is not csv or ndjson"),
            )
            .field("format"));
        }
    };
    let reason = q.reason.as_deref().map(suppression_reason).transpose()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let node = Arc::clone(&s.node);
    tokio::task::spawn_blocking(move || {
        let mut after: Option<Vec<u8>> = None;
        if csv {
            let head = format!("{}\n", CSV_COLUMNS.join(",")).into_bytes();
            if tx.blocking_send(Ok(head)).is_err() {
                return;
            }
        }
        loop {
            let mut out = Vec::with_capacity(EXPORT_STEP * 96);
            let mut seen = 0;
            let mut last = None;
            let scanned = node.spool.scan_suppressions(after.as_deref(), |k, v| {
                seen += 1;
                last = Some(k.to_vec());
                if let Ok(e) = crate::suppression::Entry::decode(v)
                    && reason.is_none_or(|r| r == e.reason)
                {
                    if csv {
                        let mut line = String::new();
                        let created = humantime::format_rfc3339_millis(
                            std::time::UNIX_EPOCH
                                + std::time::Duration::from_millis(e.created_at_ms),
                        )
                        .to_string();
                        let campaign = e.campaign.map(|c| c.to_string()).unwrap_or_default();
                        let fields = [
                            e.address.as_str(),
                            e.scope.as_str(),
                            e.reason.as_str(),
                            &created,
                            e.source.as_deref().unwrap_or(""),
                            &campaign,
                            e.job.as_deref().unwrap_or(""),
                            e.category.map(|c| c.as_str()).unwrap_or(""),
                            e.detail.as_deref().unwrap_or(""),
                        ];
                        for (i, f) in fields.iter().enumerate() {
                            if i > 0 {
                                line.push(',');
                            }
                            csv_quote(&mut line, f);
                        }
                        out.extend_from_slice(line.as_bytes());
                    } else {
                        let _ = serde_json::to_writer(&mut out, &e);
                    }
                    out.push(b'\n');
                }
                seen < EXPORT_STEP
            });
            if let Err(e) = scanned {
                tracing::error!(error = %e, "suppression export failed");
                let _ = tx.blocking_send(Err(std::io::Error::other(e.to_string())));
                return;
            }
            if !out.is_empty() && tx.blocking_send(Ok(out)).is_err() {
                return;
            }
            if seen < EXPORT_STEP {
                return;
            }
            after = last;
        }
    });
    let stream = futures_util::stream::unfold(rx, |mut rx| async move {
        rx.recv().await.map(|item| (item, rx))
    });
    let content_type = if csv {
        "text/csv; charset=utf-8"
    } else {
        "application/x-ndjson"
    };
    Ok((
        [(header::CONTENT_TYPE, content_type)],
        Body::from_stream(stream),
    )
        .into_response())
}

// --- Raw reports ------------------------------------------------------------------------------

/// `POST /v1/feedback`: one raw DSN or ARF message (`message/rfc822` or any type), processed
/// as if it had come to the bounce listener. Answers what it found and did.
pub(super) async fn feedback(State(s): State<AppState>, body: Body) -> ApiResult {
    let node = &s.node;
    let limit = node.config.bounce.max_message_bytes;
    let raw = read_body(body, limit, node.config.http.body_read_timeout)
        .await
        .map_err(|e| {
            if e.code == "body_too_large" {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the message is larger than bounce.max_message_bytes ({limit} bytes)"),
                )
            } else {
                e
            }
        })?;
    match crate::feedback::process(node, &raw, &[], "http").await {
        Ok(p) if p.kind == "ignored" => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "not_a_report",
            format!(
                "not a delivery status notification or feedback report ({})",
                p.detail.unwrap_or_default()
            ),
        )
        .field("body")),
        Ok(p) => Ok(axum::Json(p).into_response()),
        Err(crate::feedback::FeedbackError::Parse(e)) => Err(ApiError::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            "unparseable_report",
            e.to_string(),
        )
        .field("body")),
        Err(crate::feedback::FeedbackError::Spool(e)) => Err(e.into()),
    }
}
