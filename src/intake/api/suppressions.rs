//! Suppression lists over HTTP: one address (`GET|PUT|DELETE /v1/suppressions/{address}`), the
//! list by cursor, and bulk import (CSV or NDJSON, streamed through the shared line reader) and
//! export (streamed as the spool is scanned).
//!
//! Each key works on its tenant's list: a tenant's entries, or for the operator's keys the
//! operator's list, which applies to every tenant's mail. Scopes are shown and taken as
//! `global`/`*` or a domain; how a tenant's are stored is
//! [`crate::effects::suppression::stored_scope`].
//!
//! Handlers only: entries, their index and the one write path live in [`crate::effects::suppression`].
//! Spool reads and scans run on the blocking pool.

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use serde_json::{Value, json};

use super::extract::{Path, Query};
use super::lines::{self, LineLimits, ReadError, Rows};
use super::{ApiError, ApiResult, AppState, now_ms, parse_json, read_body};
use crate::effects::suppression::{Entry, split_scope, stored_scope};
use crate::node::Node;
use crate::store::spool::SpoolError;
use crate::store::tenants::Caller;

/// Whose list a stored scope is on: its tenant's name (the operator's: the default tenant).
fn owner(stored: &str) -> &str {
    split_scope(stored)
        .0
        .unwrap_or(crate::config::DEFAULT_TENANT)
}

/// An entry as its tenant sees it: the scope without the tenant, and in the words the API
/// takes (`global` rather than the stored `*`).
fn shown(mut e: Entry) -> Entry {
    e.scope = shown_scope(&e.scope).to_owned();
    e
}

/// An entry as the API answers it: [`shown`], with `created_at` in RFC 3339.
fn entry_json(e: Entry) -> Value {
    let e = shown(e);
    let mut v = json!(e);
    if let Some(o) = v.as_object_mut() {
        o.remove("created_at_ms");
        o.insert(
            "created_at".into(),
            crate::effects::delivery_log::rfc3339(e.created_at_ms).into(),
        );
    }
    v
}

fn shown_scope(stored: &str) -> &str {
    match split_scope(stored).1 {
        crate::effects::suppression::GLOBAL => "global",
        domain => domain,
    }
}

/// What a scan of the spool's suppressions does with a key for `tenant`'s list: where it
/// starts, and per key whether it is the tenant's (`Some(true)`), another's (`Some(false)`), or
/// past the tenant's keys (`None`: stop).
struct ListKeys {
    prefix: Option<Vec<u8>>,
}

impl ListKeys {
    fn of(tenant: &str) -> ListKeys {
        ListKeys {
            prefix: (tenant != crate::config::DEFAULT_TENANT)
                .then(|| format!("{tenant}:").into_bytes()),
        }
    }

    /// The key to scan after: `after`, or the start of the tenant's keys.
    fn start(&self, after: Option<Vec<u8>>) -> Option<Vec<u8>> {
        match (&self.prefix, after) {
            (Some(p), Some(a)) if a < *p => Some(p.clone()),
            (Some(p), None) => Some(p.clone()),
            (_, a) => a,
        }
    }

    fn classify(&self, key: &[u8]) -> Option<bool> {
        match &self.prefix {
            Some(p) => key.starts_with(p).then_some(true),
            // The operator's: a scope without a colon.
            None => {
                let scope = key.split(|&b| b == 0).next().unwrap_or(key);
                Some(!scope.contains(&b':'))
            }
        }
    }
}

fn suppression_address(raw: &str) -> Result<String, ApiError> {
    crate::effects::suppression::normalise(raw)
        .map_err(|e| ApiError::invalid_field("address", e.to_string()))
}

fn suppression_reason(r: &str) -> Result<crate::effects::suppression::Reason, ApiError> {
    crate::effects::suppression::Reason::parse(r).ok_or_else(|| {
        ApiError::invalid_field(
            "reason",
            format!("{r:?} is not one of hard_bounce, complaint, unsubscribe, manual"),
        )
    })
}

fn suppression_scope(raw: Option<&str>) -> Result<Option<String>, ApiError> {
    raw.map(|s| {
        crate::effects::suppression::normalise_scope(s)
            .map_err(|e| ApiError::invalid_field("scope", e))
    })
    .transpose()
}

/// The stored entries of one address on `tenant`'s list, in every scope (shown as the tenant
/// sees them). Blocking reads go to the blocking pool.
async fn suppression_entries(
    node: &Arc<Node>,
    tenant: &str,
    address: &str,
) -> Result<Vec<Value>, ApiError> {
    let scopes: Vec<String> = node
        .suppressions
        .scopes(address)
        .into_iter()
        .filter(|s| owner(s) == tenant)
        .collect();
    let node = Arc::clone(node);
    let address = address.to_owned();
    tokio::task::spawn_blocking(move || {
        let mut out = Vec::new();
        for scope in scopes {
            let key = crate::effects::suppression::key(&scope, &address);
            if let Some(v) = node.spool.get_suppression(&key)?
                && let Ok(e) = Entry::decode(&v)
            {
                out.push(entry_json(e));
            }
        }
        Ok::<_, SpoolError>(out)
    })
    .await
    .map_err(|e| ApiError::internal("reading suppressions", e))?
    .map_err(ApiError::from)
}

/// 404 `not_suppressed`: `address` is not on `list`.
fn not_suppressed(address: &str, list: &str) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_suppressed",
        format!("{address} is not on {list}"),
    )
    .field("address")
}

/// `GET /v1/suppressions/{address}`: the address's entries (global and per sending domain).
#[utoipa::path(
    get,
    path = "/suppressions/{address}",
    operation_id = "get_suppression",
    tag = "suppressions",
    summary = "An address's suppressions",
    params(("address" = String, Path, format = "email", description = "the address")),
    responses(
        (status = 200, description = "its entries", body = super::schema::AddressSuppressions),
        (status = 404, description = "not suppressed", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
) -> ApiResult {
    let address = suppression_address(&raw)?;
    let entries = suppression_entries(&s.node, caller.tenant.name(), &address).await?;
    if entries.is_empty() {
        return Err(not_suppressed(&address, "any suppression list"));
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
#[utoipa::path(
    put,
    path = "/suppressions/{address}",
    operation_id = "put_suppression",
    tag = "suppressions",
    summary = "Suppress an address",
    params(("address" = String, Path, format = "email", description = "the address")),
    request_body(content = Option<super::schema::PutSuppression>, content_type = "application/json"),
    responses(
        (status = 200, description = "the entry, synced to disk", body = super::schema::Suppression),
        (status = 413, description = "the body is over 64 KiB", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn put(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
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
        None => crate::effects::suppression::Reason::Manual,
        Some(r) => suppression_reason(r)?,
    };
    let scope = suppression_scope(req.scope.as_deref())?
        .unwrap_or_else(|| crate::effects::suppression::GLOBAL.to_owned());
    if let Some(src) = &req.source
        && (src.len() > 256 || src.chars().any(char::is_control))
    {
        return Err(ApiError::invalid_field(
            "source",
            "at most 256 bytes without control characters",
        ));
    }
    let entry = Entry {
        address,
        scope: stored_scope(caller.tenant.name(), &scope),
        reason,
        created_at_ms: now_ms(),
        source: Some(req.source.unwrap_or_else(|| "api".into())),
        campaign: None,
        job: None,
        category: None,
        detail: None,
    };
    let entries = std::slice::from_ref(&entry);
    node.suppressions
        .add(&node.spool, entries, crate::store::spool::Durability::Sync)
        .await?;
    Ok(axum::Json(entry_json(entry)).into_response())
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ScopeQuery {
    #[serde(default)]
    scope: Option<String>,
}

/// `DELETE /v1/suppressions/{address}[?scope=global|domain]`: removes the entry of that scope, or
/// every entry of the address without `scope`.
#[utoipa::path(
    delete,
    path = "/suppressions/{address}",
    operation_id = "delete_suppression",
    tag = "suppressions",
    summary = "Remove an address's suppressions",
    params(("address" = String, Path, format = "email", description = "the address"), ("scope" = Option<String>, Query, description = "only this scope (`global` or a sending domain); every scope without it")),
    responses(
        (status = 200, description = "what was removed", body = super::schema::SuppressionsDeleted),
        (status = 404, description = "not suppressed", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn delete(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(raw): Path<String>,
    Query(q): Query<ScopeQuery>,
) -> ApiResult {
    let node = &s.node;
    let tenant = caller.tenant.name();
    let address = suppression_address(&raw)?;
    let scope = suppression_scope(q.scope.as_deref())?.map(|s| stored_scope(tenant, &s));
    let scopes: Vec<String> = node
        .suppressions
        .scopes(&address)
        .into_iter()
        .filter(|s| owner(s) == tenant && scope.as_ref().is_none_or(|want| want == s))
        .collect();
    if scopes.is_empty() {
        return Err(not_suppressed(&address, "that suppression list"));
    }
    let mut batch = node.spool.batch();
    for sc in &scopes {
        batch.delete_suppression(&crate::effects::suppression::key(sc, &address));
        if node.suppressions.replicating() {
            let change = crate::effects::suppression::Change::Delete {
                address: address.clone(),
                scope: sc.clone(),
            };
            crate::cluster::sync::stage(&mut batch, &change.to_json());
        }
    }
    node.spool
        .write(batch, crate::store::spool::Durability::Sync)
        .await?;
    for sc in &scopes {
        node.suppressions.remove(&address, sc);
    }
    let deleted: Vec<&str> = scopes.iter().map(|s| shown_scope(s)).collect();
    Ok(axum::Json(json!({"address": address, "deleted": deleted})).into_response())
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
#[utoipa::path(
    get,
    path = "/suppressions",
    operation_id = "list_suppressions",
    tag = "suppressions",
    summary = "List suppressions in key order",
    params(("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 1000, description = "items per page (default 100)"), ("reason" = Option<String>, Query, pattern = "^(hard_bounce|complaint|unsubscribe|manual)$", description = "only this reason")),
    responses(
        (status = 200, description = "a page of suppressions", body = super::schema::SuppressionList)
    )
)]
pub(super) async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<ListQuery>,
) -> ApiResult {
    let limit = super::page_limit(q.limit, MAX_SUPPRESSION_PAGE)?;
    let reason = q.reason.as_deref().map(suppression_reason).transpose()?;
    let keys = ListKeys::of(caller.tenant.name());
    let after = keys.start(super::page_cursor(
        q.cursor.as_deref(),
        super::decode_cursor,
    )?);
    let node = Arc::clone(&s.node);
    let (items, last) = tokio::task::spawn_blocking(move || {
        let mut items = Vec::new();
        let mut last: Option<Vec<u8>> = None;
        node.spool.scan_suppressions(after.as_deref(), |k, v| {
            let Some(own) = keys.classify(k) else {
                return false;
            };
            last = Some(k.to_vec());
            if own
                && let Ok(e) = Entry::decode(v)
                && reason.is_none_or(|r| r == e.reason)
            {
                items.push(entry_json(e));
            }
            items.len() < limit
        })?;
        Ok::<_, SpoolError>((items, last))
    })
    .await
    .map_err(|e| ApiError::internal("listing suppressions", e))??;
    let next = if items.len() == limit {
        last.map(|k| super::encode_cursor(&k))
    } else {
        None
    };
    Ok(axum::Json(json!({"items": items, "next_cursor": next})).into_response())
}

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
    /// RFC 3339, as exports write it.
    #[serde(default)]
    created_at: Option<String>,
    /// Milliseconds since the epoch, as exports before RFC 3339 times wrote it.
    #[serde(default)]
    created_at_ms: Option<u64>,
    #[serde(default)]
    campaign: Option<uuid::Uuid>,
    #[serde(default)]
    job: Option<String>,
    #[serde(default)]
    category: Option<crate::outbound::outcome::rules::Category>,
    #[serde(default)]
    detail: Option<String>,
}

impl ImportRow {
    /// Checks and normalises the row into an entry.
    fn entry(self, now: u64, tenant: &str) -> Result<Entry, String> {
        let raw = self.address.ok_or("address: missing")?;
        let address =
            crate::effects::suppression::normalise(&raw).map_err(|e| format!("address: {e}"))?;
        let reason = match self.reason.as_deref().map(str::trim) {
            None | Some("") => crate::effects::suppression::Reason::Manual,
            Some(r) => crate::effects::suppression::Reason::parse(r).ok_or_else(|| {
                format!("reason: {r:?} is not one of hard_bounce, complaint, unsubscribe, manual")
            })?,
        };
        let scope = match self.scope.as_deref().map(str::trim) {
            None | Some("") => crate::effects::suppression::GLOBAL.to_owned(),
            Some(s) => crate::effects::suppression::normalise_scope(s)
                .map_err(|e| format!("scope: {e}"))?,
        };
        let created_at_ms = self
            .created_at
            .as_deref()
            .map(|t| {
                humantime::parse_rfc3339_weak(t)
                    .map_err(|e| format!("created_at: {e}"))
                    .map(|t| {
                        t.duration_since(std::time::UNIX_EPOCH)
                            .map_or(0, |d| d.as_millis() as u64)
                    })
            })
            .transpose()?;
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
        Ok(Entry {
            address,
            scope: stored_scope(tenant, &scope),
            reason,
            created_at_ms: created_at_ms.or(self.created_at_ms).unwrap_or(now),
            source: Some(self.source.unwrap_or_else(|| "import".into())),
            campaign: self.campaign,
            job: self.job,
            category: self.category,
            detail: self.detail,
        })
    }
}

/// Splits one CSV record (RFC 4180 quoting, read by the `csv` crate; no line breaks inside
/// fields), each field trimmed.
fn csv_fields(line: &str) -> Result<Vec<String>, String> {
    // Quotes come in pairs (a quote inside a quoted field is doubled): an odd count means a
    // field that never closes, which the reader would take to the end of the line.
    if line.bytes().filter(|&b| b == b'"').count() % 2 == 1 {
        return Err("unterminated quoted field".into());
    }
    let mut reader = csv::ReaderBuilder::new()
        .has_headers(false)
        .flexible(true)
        .trim(csv::Trim::All)
        .buffer_capacity(line.len() + 1)
        .from_reader(line.as_bytes());
    let mut record = csv::StringRecord::new();
    match reader.read_record(&mut record) {
        Ok(true) => Ok(record.iter().map(str::to_owned).collect()),
        Ok(false) => Ok(Vec::new()),
        Err(e) => Err(e.to_string()),
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

/// The columns of a headerless CSV file: address, reason, scope, source.
const CSV_HEADERLESS: [Option<usize>; 4] = [Some(0), Some(2), Some(1), Some(4)];

/// The columns a CSV header names (`email` for `address`, any case); `None` for a column the
/// import does not know, whose values are ignored (exports of other systems carry more). Not a
/// header unless it names an address column.
fn csv_header(fields: &[String]) -> Option<Vec<Option<usize>>> {
    let columns: Vec<Option<usize>> = fields
        .iter()
        .map(|f| {
            let f = f.to_ascii_lowercase();
            let f = if f == "email" { "address" } else { f.as_str() };
            CSV_COLUMNS.iter().position(|c| *c == f)
        })
        .collect();
    columns.contains(&Some(0)).then_some(columns)
}

/// Reads a CSV row into an import row by the header's columns.
fn csv_row(columns: &[Option<usize>], fields: Vec<String>) -> Result<ImportRow, String> {
    let mut row = ImportRow {
        address: None,
        reason: None,
        scope: None,
        source: None,
        created_at: None,
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
        let Some(col) = col.filter(|_| !value.is_empty()) else {
            continue;
        };
        match CSV_COLUMNS[col] {
            "address" => row.address = Some(value),
            "scope" => row.scope = Some(value),
            "reason" => row.reason = Some(value),
            "created_at" => row.created_at = Some(value),
            "source" => row.source = Some(value),
            "campaign" => {
                row.campaign = Some(value.parse().map_err(|_| "campaign: not a campaign id")?)
            }
            "job" => row.job = Some(value),
            "category" => {
                row.category = Some(
                    crate::outbound::outcome::rules::Category::parse(&value)
                        .ok_or_else(|| format!("category: {value:?} is not a bounce category"))?,
                )
            }
            _ => row.detail = Some(value),
        }
    }
    Ok(row)
}

enum ImportFormat {
    Csv { columns: Option<Vec<Option<usize>>> },
    Ndjson,
}

/// Import state: rows checked and written in batches, bad rows listed by line.
struct Import {
    node: Arc<Node>,
    /// Whose list the rows go on.
    tenant: String,
    format: ImportFormat,
    pending: Vec<Entry>,
    imported: u64,
    replaced: u64,
    rejected: Vec<serde_json::Value>,
    rejected_count: u64,
    now: u64,
}

impl Rows for Import {
    fn refuse(&mut self, line: u64, error: String) {
        self.rejected_count += 1;
        if self.rejected.len() < self.node.config.limits.max_rejected_reported {
            self.rejected
                .push(json!({"line": line + 1, "error": error}));
        }
    }

    async fn row(&mut self, text: &str, n: u64) -> Result<(), ApiError> {
        // A byte-order mark, as spreadsheets save UTF-8, is not part of the first row.
        let text = if n == 0 {
            text.strip_prefix('\u{feff}').unwrap_or(text)
        } else {
            text
        };
        let row = match &mut self.format {
            ImportFormat::Ndjson => {
                serde_json::from_str::<ImportRow>(text).map_err(|e| e.to_string())
            }
            ImportFormat::Csv { columns } => match (csv_fields(text), columns) {
                (Err(e), _) => Err(e),
                (Ok(fields), Some(cols)) => csv_row(cols, fields),
                (Ok(fields), columns @ None) => match csv_header(&fields) {
                    Some(header) => {
                        *columns = Some(header);
                        return Ok(());
                    }
                    None => {
                        *columns = Some(CSV_HEADERLESS.to_vec());
                        csv_row(&CSV_HEADERLESS, fields)
                    }
                },
            },
        };
        match row.and_then(|r| r.entry(self.now, &self.tenant)) {
            Ok(e) => {
                self.pending.push(e);
                if self.pending.len() >= IMPORT_BATCH {
                    self.flush(crate::store::spool::Durability::Buffered)
                        .await?;
                }
            }
            Err(e) => self.refuse(n, e),
        }
        Ok(())
    }
}

impl Import {
    /// Writes the pending rows, then makes them visible in the index.
    async fn flush(&mut self, durability: crate::store::spool::Durability) -> Result<(), ApiError> {
        let entries = std::mem::take(&mut self.pending);
        if !entries.is_empty() {
            self.node.spool.check_space()?;
        }
        let new = self
            .node
            .suppressions
            .add(&self.node.spool, &entries, durability)
            .await?;
        self.imported += new as u64;
        self.replaced += (entries.len() - new) as u64;
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
#[utoipa::path(
    post,
    path = "/suppressions/import",
    operation_id = "import_suppressions",
    tag = "suppressions",
    summary = "Import suppressions (CSV or NDJSON)",
    params(("format" = Option<String>, Query, pattern = "^(csv|ndjson)$", description = "`csv` or `ndjson` (else from the Content-Type)")),
    request_body(content = String, description = "CSV with a header (`address,reason,scope,source`; other columns ignored) or NDJSON rows", content_type = "text/csv"),
    responses(
        (status = 200, description = "what was imported", body = super::schema::ImportResult)
    )
)]
pub(super) async fn import(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<FormatQuery>,
    headers: axum::http::HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let csv = format_of(q.format.as_deref(), &headers)?;
    if q.reason.is_some() {
        return Err(ApiError::invalid_field("reason", "give the reason per row"));
    }
    let mut import = Import {
        node: Arc::clone(node),
        tenant: caller.tenant.name().to_owned(),
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
        now: now_ms(),
    };
    let line_limits = LineLimits {
        max_line_bytes: node.config.limits.max_line_bytes,
        max_rows: node.config.limits.max_recipients_per_upload as u64,
        too_many: |max| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_rows",
                format!(
                    "more than {max} rows in one import; the rows before were kept: split the file"
                ),
            )
        },
        piece_timeout: node.config.http.body_read_timeout,
    };
    match lines::read_lines(body, &line_limits, &mut import, None).await {
        Ok(()) => {}
        Err(ReadError::Rows(e)) => return Err(e),
        Err(ReadError::Body(mut e)) => {
            // Rows read before a broken upload are kept, as the answer says.
            import.flush(crate::store::spool::Durability::Sync).await?;
            e.message = format!(
                "{}; {} rows before it were imported",
                e.message,
                import.imported + import.replaced
            );
            return Err(e);
        }
    }
    import.flush(crate::store::spool::Durability::Sync).await?;
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
#[utoipa::path(
    get,
    path = "/suppressions/export",
    operation_id = "export_suppressions",
    tag = "suppressions",
    summary = "Export every suppression, streamed",
    params(("format" = Option<String>, Query, pattern = "^(csv|ndjson)$", description = "`ndjson` (default) or `csv`"), ("reason" = Option<String>, Query, pattern = "^(hard_bounce|complaint|unsubscribe|manual)$", description = "only this reason")),
    responses(
        (status = 200, description = "every entry, one per line", content((String = "application/x-ndjson"), (String = "text/csv")))
    )
)]
pub(super) async fn export(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<FormatQuery>,
) -> ApiResult {
    let keys = ListKeys::of(caller.tenant.name());
    let csv = match q.format.as_deref() {
        None | Some("ndjson") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(ApiError::invalid_field(
                "format",
                format!("{other:?} is not csv or ndjson"),
            ));
        }
    };
    let reason = q.reason.as_deref().map(suppression_reason).transpose()?;
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    let node = Arc::clone(&s.node);
    tokio::task::spawn_blocking(move || {
        let mut after: Option<Vec<u8>> = keys.start(None);
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
            let mut ended = false;
            let scanned = node.spool.scan_suppressions(after.as_deref(), |k, v| {
                let Some(own) = keys.classify(k) else {
                    ended = true;
                    return false;
                };
                seen += 1;
                last = Some(k.to_vec());
                if own
                    && let Ok(e) = Entry::decode(v)
                    && reason.is_none_or(|r| r == e.reason)
                {
                    let e = shown(e);
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
                        let _ = serde_json::to_writer(&mut out, &entry_json(e));
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
            if ended || seen < EXPORT_STEP {
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
