//! Campaigns: `POST /v1/campaigns` (shared with `POST /v1/messages`), the NDJSON recipient
//! upload, `GET` one or the list, and pause / resume / cancel.
//!
//! Handlers only: validation and the staged, all-or-nothing upload live in [`crate::intake::ingest`];
//! state changes in [`crate::node::Node::set_campaign_state`].

use std::sync::Arc;

use axum::Extension;
use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde_json::{Value, json};
use uuid::Uuid;

use super::extract::{Path, Query};
use super::idempotency::{self, Fingerprinter, IdempotencyCheck};
use super::lines::{self, LineLimits, ReadError, Rows};
use super::{
    ApiError, ApiResult, AppState, MAX_LIST_LIMIT, PageQuery, admit_recipients,
    check_sending_domain, json_response, now_ms, page_limit, parse_json, read_body,
    require_content_type,
};
use crate::intake::ingest::{self, ComposeRequest, FieldError, RecipientRules, Rejected, Upload};
use crate::node::Node;
use crate::store::campaign::{
    ArchivedCampaign, Campaign, CampaignKind, CampaignRecord, CampaignState, Change, CountsSnapshot,
};
use crate::store::tenants::Caller;

/// Collects per-recipient rejections, keeping at most `cap` of them.
pub(super) struct RejectList {
    items: Vec<Rejected>,
    count: u64,
    cap: usize,
}

impl RejectList {
    pub(super) fn new(cap: usize) -> RejectList {
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
pub(super) struct SuppressedList {
    items: Vec<Value>,
    count: u64,
    cap: usize,
}

impl SuppressedList {
    pub(super) fn new(cap: usize) -> SuppressedList {
        SuppressedList {
            items: Vec::new(),
            count: 0,
            cap,
        }
    }

    /// Notes the outcome of [`Upload::add`] for the recipient at `index`.
    pub(super) fn note(
        &mut self,
        index: u64,
        email: &str,
        added: Option<crate::effects::suppression::Reason>,
    ) {
        if let Some(reason) = added {
            self.count += 1;
            if self.items.len() < self.cap {
                self.items
                    .push(json!({"index": index, "email": email, "reason": reason.as_str()}));
            }
        }
    }
}

/// The 202 body: `ids` (the new campaign's or message's) and what became of the recipients.
pub(super) fn accepted_body(
    ids: Value,
    accepted: usize,
    suppressed: SuppressedList,
    rejected: RejectList,
) -> Vec<u8> {
    crate::metrics::RECIPIENTS_REJECTED.inc_by(rejected.count);
    let mut body = ids;
    body["accepted"] = json!(accepted);
    body["suppressed"] = json!(suppressed.items);
    body["suppressed_count"] = json!(suppressed.count);
    body["rejected"] = json!(rejected.items);
    body["rejected_count"] = json!(rejected.count);
    serde_json::to_vec(&body).expect("a JSON value serialises")
}

/// How a `POST /v1/campaigns` or `/v1/messages` begins: a stored answer to replay, or the
/// request's idempotency record to write and its body.
pub(super) enum Composed {
    Replay(axum::response::Response),
    Fresh(Option<idempotency::Idempotency>, axum::body::Bytes),
}

pub(super) const JSON: &[&str] = &["application/json"];

/// Checks the content type (one of `types`) and the `Idempotency-Key` of a `route` request and
/// reads its body within the limits; the key is bound to the body and `query`.
pub(super) async fn read_compose(
    node: &Arc<Node>,
    caller: &Caller,
    headers: &HeaderMap,
    (body, query): (Body, &str),
    route: &str,
    types: &[&str],
) -> Result<Composed, ApiError> {
    require_content_type(headers, types)?;
    let check = idempotency::check(node, headers, caller, route.to_owned()).await?;
    let limits = &node.config.limits;
    let body = read_body(
        body,
        limits.max_request_bytes,
        node.config.http.body_read_timeout,
    )
    .await?;
    let request = || idempotency::fingerprint(query, &body);
    let idem = match check {
        IdempotencyCheck::Stored(stored) => return stored.replay(&request()).map(Composed::Replay),
        IdempotencyCheck::Fresh(pending) => Some(pending.bind(request())),
        IdempotencyCheck::None => None,
    };
    Ok(Composed::Fresh(idem, body))
}

/// `POST /v1/campaigns`: a new campaign and its recipients, atomically.
#[utoipa::path(
    post,
    path = "/campaigns",
    operation_id = "create_campaign",
    tag = "campaigns",
    summary = "Create a campaign with its first recipients",
    params(("Idempotency-Key" = Option<String>, Header, description = "the same key and request within `http.idempotency_ttl` answers the first answer again; the same key with another request: 422 `idempotency_key_reused`")),
    request_body(content = super::schema::NewCampaign, content_type = "application/json"),
    responses(
        (status = 202, description = "accepted and synced to disk", body = super::schema::Accepted)
    )
)]
pub(super) async fn create(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let limits = &node.config.limits;
    let route = "POST /v1/campaigns";
    let (idem, body) = match read_compose(node, &caller, &headers, (body, ""), route, JSON).await? {
        Composed::Replay(resp) => return Ok(resp),
        Composed::Fresh(idem, body) => (idem, body),
    };
    let req: ComposeRequest<'_> = parse_json(&body)?;
    let (fields, recipients) = req.into_parts();
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
    let (mut record, rules) =
        ingest::validate_campaign(fields, CampaignKind::Bulk, limits, now_ms())
            .map_err(ApiError::invalid)?;
    take_tenant(&caller, &mut record)?;
    check_pool(node, &record)?;
    check_preflight(node, &record.from).await?;
    // A campaign from a sending domain whose breaker is tripped starts paused.
    if node.config.guard.enabled
        && let Some(reason) = node.guard.tripped_reason(&record.from)
    {
        record.state = CampaignState::Paused;
        record.breaker.paused_reason = Some(reason);
    }
    let seq = node.campaigns.allocate_seq().ok_or_else(|| {
        ApiError::new(
            StatusCode::INSUFFICIENT_STORAGE,
            "campaigns_exhausted",
            "no campaign numbers left",
        )
    })?;
    let id = record.id;
    let record_bytes = record.encode();
    let created = node.cluster().map(|_| Change::Create {
        record: Box::new(record.clone()),
    });
    let campaign = Arc::new(Campaign::new(seq, record, 0));
    if let Some(c) = &rules.compiled {
        node.assembler.install_compiled(seq, Arc::clone(c));
    }
    let mut upload = Upload::for_new_campaign(Arc::clone(node), Arc::clone(&campaign));
    let mut rejected = RejectList::new(limits.max_rejected_reported);
    let mut suppressed = SuppressedList::new(limits.max_rejected_reported);

    for (i, raw) in list.iter().enumerate() {
        match ingest::parse_recipient(raw.get(), &rules, limits) {
            Ok(valid) => {
                let added = upload.add(&valid).await?;
                suppressed.note(i as u64, valid.address.as_str(), added);
            }
            Err((email, e)) => reject(
                &mut upload,
                &mut rejected,
                Rejected {
                    index: i as u64,
                    line: None,
                    email,
                    field: join_field(&format!("recipients[{i}]"), &e.field),
                    error: e.message,
                },
            ),
        }
    }
    let accepted = upload.len();
    let quota = admit_recipients(node, &caller, accepted as u64)?;
    let body = accepted_body(json!({"id": id}), accepted, suppressed, rejected);
    upload
        .commit(|batch| {
            quota.stage(batch);
            batch.put_campaign(seq, &record_bytes);
            if let Some(i) = &idem {
                i.put(batch, StatusCode::ACCEPTED, &body);
            }
            // Cluster mode: every node creates it too, and takes uploads for it.
            if let Some(created) = created {
                crate::cluster::sync::stage(batch, &created.to_json());
            }
        })
        .await?;
    quota.confirm();
    Ok(json_response(StatusCode::ACCEPTED, body))
}

/// Makes `record` the caller's tenant's: 422 naming `from` outside its sending domains; its
/// pool when the record names none.
pub(super) fn take_tenant(caller: &Caller, record: &mut CampaignRecord) -> Result<(), ApiError> {
    check_sending_domain(caller, &record.from)?;
    record.tenant = crate::store::tenants::record_field(caller.tenant.name());
    if record.pool.is_none() {
        record.pool.clone_from(&caller.tenant.spec.pool);
    }
    Ok(())
}

/// With `preflight.enforce`: 422 naming `from` when its domain fails an authentication check.
pub(super) async fn check_preflight(node: &Node, from: &str) -> Result<(), ApiError> {
    if !node.config.preflight.enforce {
        return Ok(());
    }
    let domain = crate::effects::guard::domain_of(from);
    let report = node
        .preflight
        .report(&node.config, &node.assembler.dkim(), &domain)
        .await
        .map_err(|e| ApiError::internal("preflight", e))?;
    let failures = report.failures();
    if failures.is_empty() {
        return Ok(());
    }
    Err(ApiError::invalid_field(
        "from",
        format!(
            "{domain} fails authentication preflight, so receivers would reject or junk its mail: {} (see GET /v1/sending-domains/{domain})",
            failures.join("; ")
        ),
    ))
}

/// 422 naming `pool` when the record names a pool the config does not have.
pub(super) fn check_pool(node: &Node, record: &CampaignRecord) -> Result<(), ApiError> {
    match &record.pool {
        Some(p) if !node.config.has_pool(p) => {
            let mut known: Vec<&str> = node.config.pools.iter().map(|p| p.name.as_str()).collect();
            if !known.contains(&crate::config::DEFAULT_POOL) {
                known.insert(0, crate::config::DEFAULT_POOL);
            }
            Err(ApiError::invalid(FieldError::new(
                "pool",
                format!("no pool is named {p:?}; the pools are {}", known.join(", ")),
            )))
        }
        _ => Ok(()),
    }
}

fn join_field(prefix: &str, field: &str) -> String {
    if field.is_empty() {
        prefix.to_owned()
    } else {
        format!("{prefix}.{field}")
    }
}

/// A campaign that can still change (not archived): 404 when there is no such campaign, 409
/// when it is archived.
async fn find_campaign(
    node: &Arc<Node>,
    caller: &Caller,
    id: &str,
) -> Result<Arc<Campaign>, ApiError> {
    match find_any(node, caller, id).await? {
        (c, false) => Ok(c),
        (_, true) => Err(archived(id)),
    }
}

/// The caller's tenant's campaign `id`, in memory or, failing that, read from the archive
/// (then `true`: it is registered nowhere and cannot change). Another tenant's is not found,
/// as if it did not exist.
async fn find_any(
    node: &Arc<Node>,
    caller: &Caller,
    id: &str,
) -> Result<(Arc<Campaign>, bool), ApiError> {
    let uuid = Uuid::parse_str(id).map_err(|_| not_found(id))?;
    let found = match node.campaigns.get(&uuid) {
        Some(c) => (c, false),
        None => {
            let n = Arc::clone(node);
            let stored = tokio::task::spawn_blocking(move || n.spool.get_archived(uuid.as_bytes()))
                .await
                .map_err(|e| ApiError::internal("archive read task", e))??;
            let Some((seq, bytes)) = stored else {
                return Err(not_found(id));
            };
            (Arc::new(from_archive(seq, &bytes)?), true)
        }
    };
    if found.0.record.tenant() != caller.tenant.name() {
        return Err(not_found(id));
    }
    Ok(found)
}

/// An archived campaign as stored, made a campaign to show.
fn from_archive(seq: u32, bytes: &[u8]) -> Result<Campaign, ApiError> {
    let a = ArchivedCampaign::decode(bytes)
        .map_err(|e| ApiError::internal("archived campaign record", e))?;
    Ok(a.into_campaign(seq))
}

fn archived(id: &str) -> ApiError {
    ApiError::new(
        StatusCode::CONFLICT,
        "campaign_archived",
        format!(
            "campaign {id} finished and was archived by retention; it can be read but not \
             changed: create a new campaign"
        ),
    )
    .field("id")
}

fn campaign_json(c: &Campaign) -> serde_json::Value {
    let time = crate::effects::delivery_log::rfc3339;
    let mut v = json!({
        "id": c.record.id,
        "kind": c.record.kind,
        "state": c.state(),
        "from": c.record.from,
        "subject": c.record.subject,
        "tags": c.record.tags,
        "personalised": c.record.personalised,
        "created_at": time(c.record.created_at_ms),
        "counts": c.counts.snapshot(),
    });
    let mark = c.breaker();
    if let Some(reason) = mark
        .paused_reason
        .as_ref()
        .filter(|_| c.state() == CampaignState::Paused)
    {
        v["paused_reason"] = reason_json(reason);
    }
    if let Some(ms) = mark.breaker_override_at_ms {
        v["breaker_override_at"] = json!(time(ms));
    }
    if let Some(stream) = &c.record.stream {
        v["stream"] = json!(stream);
    }
    // Scheduling: the effective priority and weight, and what was asked for.
    let sched = &c.record.schedule;
    let params = crate::node::schedule_params(&c.record);
    v["priority"] = json!(params.priority);
    v["weight"] = json!(params.weight);
    if let Some(rate) = sched.max_rate {
        v["max_rate"] = json!(rate.to_string());
    }
    if let Some(ms) = sched.send_at_ms {
        v["send_at"] = json!(time(ms));
    }
    v["pool"] = json!(
        c.record
            .pool
            .as_deref()
            .unwrap_or(crate::config::DEFAULT_POOL)
    );
    v["scheduled"] = json!(
        sched.send_at_ms.is_some_and(|ms| ms > crate::now_ms())
            && c.state() != CampaignState::Cancelled
    );
    // Retention's steps, once taken (see `[retention]`).
    let l = c.lifecycle();
    for (name, at) in [
        ("finished_at", l.finished_at_ms),
        ("tombstones_deleted_at", l.tombstones_deleted_at_ms),
        ("compacted_at", l.compacted_at_ms),
        ("archived_at", l.archived_at_ms),
    ] {
        if let Some(ms) = at {
            v[name] = json!(time(ms));
        }
    }
    v
}

/// A breaker's reason as the API shows it (the time in RFC 3339).
pub(super) fn reason_json(r: &crate::store::campaign::PausedReason) -> Value {
    let mut v = json!(r);
    if let Some(o) = v.as_object_mut() {
        o.remove("at_ms");
        o.insert(
            "at".into(),
            json!(crate::effects::delivery_log::rfc3339(r.at_ms)),
        );
    }
    v
}

/// A campaign's breaker measures: each rate, its threshold and level (`ok`, `warning`,
/// `tripped`), and whether breakers judge it (not a stream's bucket, not exempted with
/// `force`).
fn guard_json(node: &Node, c: &Campaign) -> Value {
    use crate::effects::guard;
    let limits = guard::Limits::of(&node.config.guard, c.record.guard.as_ref());
    let sample = node.guard.campaign(c.seq);
    let measures = guard::judge(&sample, &limits);
    let mut v = json!({
        "judged": node.config.guard.enabled
            && c.record.kind == CampaignKind::Bulk
            && c.breaker().breaker_override_at_ms.is_none(),
        "delivered": sample.delivered,
        "attempted": sample.attempted,
        "hard_bounced": sample.hard_bounced,
        "complained": sample.complained,
        "unsubscribed": sample.unsubscribed,
        "bounced_by_category": sample.bounced,
    });
    for m in measures {
        v[m.name] = json!(m);
    }
    v
}

/// `GET /v1/campaigns/{id}`: the campaign, and while it has recipients queued, its place in
/// the queue: recipients waiting in domain queues and for its `max_rate`, the share of its
/// domains' sending it gets now, and when its next recipient may be attempted. `guard` shows
/// its breaker rates.
#[utoipa::path(
    get,
    path = "/campaigns/{id}",
    operation_id = "get_campaign",
    tag = "campaigns",
    summary = "A campaign: state, counts, queue, breakers",
    params(("id" = String, Path, description = "the campaign's id")),
    responses(
        (status = 200, description = "the campaign", body = super::schema::Campaign),
        (status = 404, description = "no such campaign (or another tenant's)", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn get(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    let (c, archived) = find_any(&s.node, &caller, &id).await?;
    let mut v = campaign_json(&c);
    if !archived {
        v["guard"] = guard_json(&s.node, &c);
    }
    if let Some(cluster) = s.node.cluster()
        && c.record.kind == CampaignKind::Bulk
    {
        add_cluster_counts(cluster, &c, &mut v).await;
    }
    if !archived {
        let q = s.node.scheduler.campaign_view(c.seq);
        let mut queue = json!({
            "pending": q.pending,
            "rate_held": q.rate_held,
            "share": (q.share * 1000.0).round() / 1000.0,
        });
        if let Some(ms) = q.next_due_ms {
            queue["next_attempt_at"] = json!(crate::effects::delivery_log::rfc3339(ms));
        }
        v["queue"] = queue;
    }
    Ok(axum::Json(v).into_response())
}

/// Cluster mode: `counts` become the sum of every node's counts (as each published them, at
/// most a second old; this node's are current) with `counts_scope: "cluster"`, and
/// `counts_by_node` shows each node's. Without an answer from Redis they stay this node's
/// (`counts_scope: "node"`).
async fn add_cluster_counts(cluster: &crate::cluster::Cluster, c: &Campaign, v: &mut Value) {
    let own = c.counts.snapshot();
    let mut by_node = serde_json::Map::new();
    by_node.insert(cluster.node_id().to_owned(), json!(own));
    match cluster.counts(&c.record.id.to_string()).await {
        Ok(all) => {
            let mut total = own;
            for (node, counts) in all {
                if node == cluster.node_id() {
                    continue;
                }
                match serde_json::from_str::<CountsSnapshot>(&counts) {
                    Ok(n) => {
                        total.add(&n);
                        by_node.insert(node, json!(n));
                    }
                    Err(e) => tracing::warn!(%node, error = %e, "cluster: unreadable counts"),
                }
            }
            v["counts"] = json!(total);
            v["counts_scope"] = json!("cluster");
        }
        Err(_) => v["counts_scope"] = json!("node"),
    }
    v["counts_by_node"] = Value::Object(by_node);
}

/// Where a page of `GET /v1/campaigns` continues: among the campaigns in memory below a
/// sequence number, or in the archive below one (`None`: from its newest).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CampaignCursor {
    Memory(u32),
    Archive(Option<u32>),
}

impl CampaignCursor {
    fn encode(self) -> String {
        match self {
            CampaignCursor::Memory(seq) => format!("m{seq}"),
            CampaignCursor::Archive(Some(seq)) => format!("a{seq}"),
            CampaignCursor::Archive(None) => "a".to_owned(),
        }
    }

    fn decode(s: &str) -> Option<CampaignCursor> {
        match s.split_at_checked(1)? {
            ("m", seq) => seq.parse().ok().map(CampaignCursor::Memory),
            ("a", "") => Some(CampaignCursor::Archive(None)),
            ("a", seq) => seq.parse().ok().map(|s| CampaignCursor::Archive(Some(s))),
            _ => None,
        }
    }
}

/// `GET /v1/campaigns?cursor=&limit=`: the campaigns in memory, newest first, then the archived
/// ones, newest first; `limit` per page (default 100, at most 10,000), `next_cursor` continues
/// after the last one. A campaign still in memory can be older than an archived one (it has not
/// finished), so the whole list is not strictly by age. A campaign archived while the list is
/// read may show in both parts.
///
/// A tenant's key lists that tenant's campaigns only; `total` is then its campaigns in memory
/// plus those in the archive pages read (the archive is not counted by tenant).
#[utoipa::path(
    get,
    path = "/campaigns",
    operation_id = "list_campaigns",
    tag = "campaigns",
    summary = "List campaigns, newest first",
    params(("cursor" = Option<String>, Query, description = "`next_cursor` of the previous page"), ("limit" = Option<usize>, Query, minimum = 1, maximum = 10000, description = "items per page (default 100)")),
    responses(
        (status = 200, description = "a page of campaigns", body = super::schema::CampaignList)
    )
)]
pub(super) async fn list(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Query(q): Query<PageQuery>,
) -> ApiResult {
    let limit = page_limit(q.limit, MAX_LIST_LIMIT)?;
    let cursor = super::page_cursor(q.cursor.as_deref(), CampaignCursor::decode)?;
    let tenant = caller.tenant.name();
    let all: Vec<Arc<Campaign>> = s
        .node
        .campaigns
        .all()
        .into_iter()
        .filter(|c| c.record.tenant() == tenant)
        .collect();
    let mut campaigns: Vec<serde_json::Value> = Vec::new();
    let mut next = None;
    if let None | Some(CampaignCursor::Memory(_)) = cursor {
        let below = match cursor {
            Some(CampaignCursor::Memory(seq)) => seq,
            _ => u32::MAX,
        };
        for c in all.iter().filter(|c| c.seq < below) {
            if campaigns.len() == limit {
                // More in memory: the next page starts after the last one shown.
                next = Some(CampaignCursor::Memory(c.seq + 1));
                break;
            }
            campaigns.push(campaign_json(c));
        }
    }
    let archived = s.node.campaigns.archived();
    let mut archived_seen = 0u64;
    let mut after = match cursor {
        Some(CampaignCursor::Archive(seq)) => seq,
        _ => None,
    };
    // The archive holds every tenant's campaigns: read it a page at a time until one more of
    // this tenant's than fits is found (so that the answer knows whether more follow) or it
    // ends.
    while next.is_none() && archived > 0 {
        let n = Arc::clone(&s.node);
        let page_size = (limit - campaigns.len()).max(100);
        let page = tokio::task::spawn_blocking(move || n.spool.archived_page(after, page_size))
            .await
            .map_err(|e| ApiError::internal("archive read task", e))??;
        let done = page.len() < page_size;
        for (seq, bytes) in page {
            let c = from_archive(seq, &bytes)?;
            if c.record.tenant() == tenant {
                archived_seen += 1;
                if campaigns.len() == limit {
                    next = Some(CampaignCursor::Archive(after));
                    break;
                }
                campaigns.push(campaign_json(&c));
            }
            after = Some(seq);
        }
        if done {
            break;
        }
    }
    let total = if caller.tenant.is_default() && s.node.tenants.all().len() == 1 {
        all.len() as u64 + archived
    } else {
        all.len() as u64 + archived_seen
    };
    Ok(axum::Json(json!({
        "campaigns": campaigns,
        "total": total,
        "next_cursor": next.map(CampaignCursor::encode),
    }))
    .into_response())
}

async fn change_state(
    s: &AppState,
    caller: &Caller,
    id: &str,
    to: CampaignState,
    force: bool,
) -> ApiResult {
    let c = find_campaign(&s.node, caller, id).await?;
    let from = c.state();
    if from == CampaignState::Cancelled && to != CampaignState::Cancelled {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "campaign_cancelled",
            "a cancelled campaign cannot be paused or resumed",
        ));
    }
    let mark = if to == CampaignState::Active {
        resume_mark(&s.node, &c, force)?
    } else {
        None
    };
    let changed = if from == to && mark.is_none() {
        true
    } else {
        s.node.set_campaign_state_marked(&c, to, mark).await?
    };
    if !changed {
        return Err(archived(id));
    }
    Ok(
        axum::Json(json!({"id": c.record.id, "state": c.state(), "counts": c.counts.snapshot()}))
            .into_response(),
    )
}

/// The breaker state a resume leaves: `None` (unchanged) for a campaign no breaker paused.
/// One a breaker paused resumes only when its breakers would not trip again now (its own
/// rate, its sending domain's state), else only with `force`, which exempts it from the
/// breakers from then on; 409 `breaker_tripped` otherwise.
fn resume_mark(
    node: &Node,
    c: &Campaign,
    force: bool,
) -> Result<Option<crate::store::campaign::BreakerMark>, ApiError> {
    use crate::effects::guard;
    let mut mark = c.breaker();
    if mark.paused_reason.is_none() || mark.breaker_override_at_ms.is_some() {
        return Ok(None);
    }
    let config = &node.config.guard;
    let own = guard::campaign_trip(config, &node.guard, c).map(|m| {
        format!(
            "its {} is {:.3}%, over {}%",
            m.name.replace('_', " "),
            m.rate_percent.unwrap_or(0.0),
            m.threshold_percent
        )
    });
    let domain = node
        .guard
        .domain_state(&guard::domain_of(&c.record.from))
        .tripped
        .map(|r| format!("its sending domain's breaker is tripped ({})", r.message));
    let blocking: Vec<String> = own.into_iter().chain(domain).collect();
    if !config.enabled || blocking.is_empty() {
        mark.paused_reason = None;
    } else if force {
        mark.paused_reason = None;
        mark.breaker_override_at_ms = Some(now_ms());
        tracing::warn!(campaign = %c.record.id, "campaign resumed with force; breakers no longer judge it");
    } else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            "breaker_tripped",
            format!(
                "the campaign was paused by a breaker and {}; resume with ?force=true to send anyway (breakers then no longer judge this campaign)",
                blocking.join(", and ")
            ),
        )
        .field("force"));
    }
    Ok(Some(mark))
}

/// `?force=true` on resume.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ForceQuery {
    #[serde(default)]
    pub(super) force: bool,
}

#[utoipa::path(
    post,
    path = "/campaigns/{id}/pause",
    operation_id = "pause_campaign",
    tag = "campaigns",
    summary = "Pause a campaign",
    params(("id" = String, Path, description = "the campaign's id")),
    responses(
        (status = 200, description = "paused", body = super::schema::CampaignState),
        (status = 404, description = "no such campaign (or another tenant's)", body = super::openapi::ErrorBody),
        (status = 409, description = "cancelled or archived", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn pause(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    change_state(&s, &caller, &id, CampaignState::Paused, false).await
}

/// `POST /v1/campaigns/{id}/resume[?force=true]`: see [`resume_mark`] for a campaign a breaker
/// paused.
#[utoipa::path(
    post,
    path = "/campaigns/{id}/resume",
    operation_id = "resume_campaign",
    tag = "campaigns",
    summary = "Resume a campaign",
    params(("id" = String, Path, description = "the campaign's id"), ("force" = Option<bool>, Query, description = "resume a campaign a breaker paused even though it would trip again; breakers then no longer judge it")),
    responses(
        (status = 200, description = "active again", body = super::schema::CampaignState),
        (status = 404, description = "no such campaign (or another tenant's)", body = super::openapi::ErrorBody),
        (status = 409, description = "cancelled, archived, or a breaker would trip again", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn resume(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    Query(q): Query<ForceQuery>,
) -> ApiResult {
    change_state(&s, &caller, &id, CampaignState::Active, q.force).await
}

#[utoipa::path(
    post,
    path = "/campaigns/{id}/cancel",
    operation_id = "cancel_campaign",
    tag = "campaigns",
    summary = "Cancel a campaign: its queued recipients are not sent",
    params(("id" = String, Path, description = "the campaign's id")),
    responses(
        (status = 200, description = "cancelled", body = super::schema::CampaignState),
        (status = 404, description = "no such campaign (or another tenant's)", body = super::openapi::ErrorBody),
        (status = 409, description = "archived", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn cancel(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
) -> ApiResult {
    change_state(&s, &caller, &id, CampaignState::Cancelled, false).await
}

/// `POST /v1/campaigns/{id}/recipients`: an NDJSON stream of `{email, vars?}`, parsed as it
/// arrives and committed at the end: all accepted lines become visible at once, or none do.
#[utoipa::path(
    post,
    path = "/campaigns/{id}/recipients",
    operation_id = "add_recipients",
    tag = "campaigns",
    summary = "Add recipients as NDJSON, all or none",
    params(("id" = String, Path, description = "the campaign's id"), ("Idempotency-Key" = Option<String>, Header, description = "the same key and request within `http.idempotency_ttl` answers the first answer again; the same key with another request: 422 `idempotency_key_reused`")),
    request_body(content = super::schema::Recipient, description = "one recipient object per line", content_type = "application/x-ndjson"),
    responses(
        (status = 202, description = "accepted and synced to disk", body = super::schema::Accepted),
        (status = 404, description = "no such campaign (or another tenant's)", body = super::openapi::ErrorBody),
        (status = 409, description = "cancelled, full or compacted; or the Idempotency-Key's first request is in progress", body = super::openapi::ErrorBody)
    )
)]
pub(super) async fn add_recipients(
    State(s): State<AppState>,
    Extension(caller): Extension<Caller>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let node = &s.node;
    let campaign = find_campaign(node, &caller, &id).await?;
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
    let route = format!("POST /v1/campaigns/{}/recipients", campaign.record.id);
    let timeout = node.config.http.body_read_timeout;
    let pending = match idempotency::check(node, &headers, &caller, route).await? {
        IdempotencyCheck::Stored(stored) => {
            let request = lines::fingerprint_body(body, timeout, Fingerprinter::new("")).await?;
            return stored.replay(&request);
        }
        IdempotencyCheck::Fresh(pending) => Some(pending),
        IdempotencyCheck::None => None,
    };
    let mut fingerprint = pending.as_ref().map(|_| Fingerprinter::new(""));
    let limits = &node.config.limits;
    let mut lines = LineIngest {
        upload: Upload::new(Arc::clone(node), Arc::clone(&campaign))?,
        rules: ingest::rules_for(&campaign, &node.assembler),
        rejected: RejectList::new(limits.max_rejected_reported),
        suppressed: SuppressedList::new(limits.max_rejected_reported),
        node: Arc::clone(node),
    };
    let line_limits = LineLimits {
        max_line_bytes: limits.max_line_bytes,
        max_rows: limits.max_recipients_per_upload as u64,
        too_many: |max| {
            ApiError::new(
                StatusCode::PAYLOAD_TOO_LARGE,
                "too_many_recipients",
                format!(
                    "more than {max} recipients in one upload; nothing was accepted: split the list into several uploads"
                ),
            )
        },
        piece_timeout: timeout,
    };
    // Nothing stands unless the whole body arrived: the upload rolls back when dropped.
    lines::read_lines(body, &line_limits, &mut lines, fingerprint.as_mut())
        .await
        .map_err(|(ReadError::Body(e) | ReadError::Rows(e))| match e.code {
            "body_read_error" => ApiError {
                message: format!("{}; nothing was accepted", e.message),
                ..e
            },
            _ => e,
        })?;
    let LineIngest {
        upload,
        rejected,
        suppressed,
        ..
    } = lines;
    let idem = pending.zip(fingerprint).map(|(p, f)| p.bind(f.finish()));
    let accepted = upload.len();
    let quota = admit_recipients(node, &caller, accepted as u64)?;
    let body = accepted_body(
        json!({"id": campaign.record.id}),
        accepted,
        suppressed,
        rejected,
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

/// A recipient refused by validation: listed in the 202 (up to its cap) and reported as a
/// `rejected` event when the upload commits.
fn reject(upload: &mut Upload, list: &mut RejectList, r: Rejected) {
    upload.reject(&r);
    list.push(r);
}

/// Per-line state of an NDJSON upload.
struct LineIngest {
    upload: Upload,
    rules: RecipientRules,
    rejected: RejectList,
    suppressed: SuppressedList,
    node: Arc<Node>,
}

impl Rows for LineIngest {
    fn refuse(&mut self, line_no: u64, error: String) {
        let r = Rejected {
            index: line_no,
            line: Some(line_no + 1),
            email: None,
            field: format!("line {}", line_no + 1),
            error,
        };
        reject(&mut self.upload, &mut self.rejected, r);
    }

    async fn row(&mut self, text: &str, line_no: u64) -> Result<(), ApiError> {
        match ingest::parse_recipient(text, &self.rules, &self.node.config.limits) {
            Ok(valid) => {
                let added = self.upload.add(&valid).await?;
                self.suppressed.note(line_no, valid.address.as_str(), added);
            }
            Err((email, e)) => {
                let r = Rejected {
                    index: line_no,
                    line: Some(line_no + 1),
                    email,
                    field: join_field(&format!("line {}", line_no + 1), &e.field),
                    error: e.message,
                };
                reject(&mut self.upload, &mut self.rejected, r);
            }
        }
        Ok(())
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
