//! The shapes of the bodies the handlers write, for the OpenAPI description
//! ([`super::openapi`]). Handlers build most answers as JSON values (fields appear only when
//! they apply); these types say which fields an answer always has (`required`), which it may
//! have, and their types. The contract test (`scripts/acceptance/openapi-contract.sh`) checks
//! every answer it gets against them, and the generated-client test reads real ones through
//! them. Nested reports whose shape follows the config (breaker measures, warm-up standings,
//! preflight checks) are described as objects and documented in the README.

#![allow(dead_code)] // descriptions only: never built

use serde_json::Value;
use utoipa::ToSchema;

/// A JSON object (its keys are documented in the README).
type Object = serde_json::Map<String, Value>;

/// A recipient of `POST /v1/campaigns` or a line of `POST /v1/campaigns/{id}/recipients`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Recipient {
    /// The address.
    #[schema(format = "email")]
    email: String,
    /// Template variables (`null` or absent: none).
    #[schema(value_type = Option<Object>)]
    vars: Option<Value>,
}

/// A recipient refused at ingest.
#[derive(ToSchema)]
pub(super) struct RejectedRecipient {
    /// Its position in `recipients` (0-based).
    index: u64,
    /// Its line in an NDJSON upload (1-based).
    line: Option<u64>,
    email: Option<String>,
    /// The field at fault (`recipients[3].vars.name`, `email`).
    field: String,
    error: String,
}

/// A recipient found on a suppression list, not queued.
#[derive(ToSchema)]
pub(super) struct SuppressedRecipient {
    index: u64,
    email: String,
    /// The suppression's reason.
    reason: String,
}

/// The 202 of `POST /v1/campaigns` and `POST /v1/campaigns/{id}/recipients`: synced to disk.
#[derive(ToSchema)]
pub(super) struct Accepted {
    /// The campaign's id.
    id: String,
    /// Recipients queued.
    accepted: u64,
    /// Recipients on a suppression list (at most `limits.max_rejected_reported` listed).
    suppressed: Vec<SuppressedRecipient>,
    suppressed_count: u64,
    /// Recipients refused (at most `limits.max_rejected_reported` listed).
    rejected: Vec<RejectedRecipient>,
    rejected_count: u64,
}

/// The 202 of `POST /v1/messages` and `POST /v1/messages/raw`: synced to disk.
#[derive(ToSchema)]
pub(super) struct MessageAccepted {
    /// The message's id (`GET /v1/messages/{id}`); `null` when no recipient was queued.
    id: Option<String>,
    /// The bucket campaign of its stream.
    campaign: String,
    stream: Option<String>,
    accepted: u64,
    suppressed: Vec<SuppressedRecipient>,
    suppressed_count: u64,
    rejected: Vec<RejectedRecipient>,
    rejected_count: u64,
}

/// A campaign's recipients by state.
#[derive(ToSchema)]
pub(super) struct Counts {
    queued: u64,
    deferred: u64,
    delivered: u64,
    bounced: u64,
    expired: u64,
    suppressed: u64,
    cancelled: u64,
    complained: u64,
    unsubscribed: u64,
}

/// Where a campaign stands in the queue.
#[derive(ToSchema)]
pub(super) struct CampaignQueue {
    /// Recipients in domain queues.
    pending: u64,
    /// Recipients waiting for the campaign's `max_rate`.
    rate_held: u64,
    /// The share of its domains' sending it gets now, 0 to 1.
    share: f64,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
}

/// A campaign.
#[derive(ToSchema)]
pub(super) struct Campaign {
    id: String,
    /// `bulk` (a campaign) or `transactional` (a stream's bucket).
    kind: String,
    /// `active`, `paused` or `cancelled`.
    state: String,
    from: String,
    subject: String,
    tags: Vec<String>,
    personalised: bool,
    #[schema(format = DateTime)]
    created_at: String,
    counts: Counts,
    stream: Option<String>,
    priority: u8,
    weight: u32,
    pool: String,
    /// True until `send_at`.
    scheduled: bool,
    max_rate: Option<String>,
    #[schema(format = DateTime)]
    send_at: Option<String>,
    /// Why a breaker paused it (while it holds it paused).
    paused_reason: Option<Object>,
    #[schema(format = DateTime)]
    breaker_override_at: Option<String>,
    #[schema(format = DateTime)]
    finished_at: Option<String>,
    #[schema(format = DateTime)]
    tombstones_deleted_at: Option<String>,
    #[schema(format = DateTime)]
    compacted_at: Option<String>,
    #[schema(format = DateTime)]
    archived_at: Option<String>,
    /// Its breaker counts and measures (not for archived campaigns).
    guard: Option<Object>,
    /// Its place in the queue (not for archived campaigns).
    queue: Option<CampaignQueue>,
    /// Cluster mode: `cluster` (the fleet's counts) or `node`.
    counts_scope: Option<String>,
    counts_by_node: Option<Object>,
}

/// A page of campaigns.
#[derive(ToSchema)]
pub(super) struct CampaignList {
    campaigns: Vec<Campaign>,
    /// Campaigns in all (for a tenant's key, a lower bound: see the README).
    total: u64,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// A campaign after pause, resume or cancel.
#[derive(ToSchema)]
pub(super) struct CampaignState {
    id: String,
    state: String,
    counts: Counts,
}

/// A message or campaign recipient: its state and history.
#[derive(ToSchema)]
pub(super) struct Message {
    id: String,
    campaign: String,
    kind: String,
    recipient: String,
    /// `queued`, `deferred`, `delivered`, `bounced`, `expired`, `suppressed`, `cancelled`…
    state: String,
    attempts: u32,
    #[schema(format = DateTime)]
    accepted_at: String,
    from: String,
    subject: String,
    tags: Vec<String>,
    /// Attempts, fates and later reports, oldest first.
    events: Vec<Object>,
    stream: Option<String>,
    last_response: Option<String>,
    #[schema(format = DateTime)]
    next_attempt_at: Option<String>,
    #[schema(format = DateTime)]
    final_at: Option<String>,
}

/// A suppression.
#[derive(ToSchema)]
pub(super) struct Suppression {
    address: String,
    /// `global`, or the sending domain it applies to.
    scope: String,
    /// `hard_bounce`, `complaint`, `unsubscribe`, `manual`.
    reason: String,
    #[schema(format = DateTime)]
    created_at: String,
    source: Option<String>,
    campaign: Option<String>,
    job: Option<String>,
    category: Option<String>,
    detail: Option<String>,
}

/// A page of suppressions.
#[derive(ToSchema)]
pub(super) struct SuppressionList {
    items: Vec<Suppression>,
    next_cursor: Option<String>,
}

/// An address's suppressions.
#[derive(ToSchema)]
pub(super) struct AddressSuppressions {
    address: String,
    entries: Vec<Suppression>,
}

/// What `DELETE /v1/suppressions/{address}` removed.
#[derive(ToSchema)]
pub(super) struct SuppressionsDeleted {
    address: String,
    /// The scopes removed.
    deleted: Vec<String>,
}

/// A row an import refused.
#[derive(ToSchema)]
pub(super) struct RejectedRow {
    line: u64,
    error: String,
}

/// What an import did.
#[derive(ToSchema)]
pub(super) struct ImportResult {
    imported: u64,
    replaced: u64,
    rejected_count: u64,
    rejected: Vec<RejectedRow>,
}

/// A sending domain: its breaker, rates, DKIM selectors and preflight.
#[derive(ToSchema)]
pub(super) struct SendingDomain {
    domain: String,
    breaker: Object,
    last_24h: Object,
    last_7d: Object,
    dkim_selectors: Vec<String>,
    preflight: Option<Object>,
}

#[derive(ToSchema)]
pub(super) struct SendingDomainList {
    sending_domains: Vec<SendingDomain>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// What resuming a sending domain did.
#[derive(ToSchema)]
pub(super) struct SendingDomainResumed {
    domain: String,
    /// Campaigns resumed.
    resumed: Vec<String>,
    tripped: bool,
}

/// What a DSN or feedback report was found to be, and what was done.
#[derive(ToSchema)]
pub(super) struct FeedbackResult {
    /// `dsn`, `arf`, …
    kind: String,
    detail: Option<String>,
}

/// A kept inbound message.
#[derive(ToSchema)]
pub(super) struct InboundSummary {
    id: String,
}

#[derive(ToSchema)]
pub(super) struct InboundList {
    items: Vec<InboundSummary>,
    next_cursor: Option<String>,
}

#[derive(ToSchema)]
pub(super) struct InboundDeleted {
    id: String,
    deleted: bool,
}

/// Destinations: sites and the domains with the most queued.
#[derive(ToSchema)]
pub(super) struct DomainReport {
    sites: Vec<Object>,
    domains: Vec<Object>,
    domain_count: u64,
    suspended: Vec<String>,
}

/// Totals over the queue.
#[derive(ToSchema)]
pub(super) struct QueueTotals {
    queued: u64,
    held: u64,
    in_flight: u64,
    parked_for_paused_campaigns: u64,
    domains: u64,
    sites: u64,
    suspended_domains: u64,
    connections: i64,
    oldest_queued_seconds: Option<u64>,
    /// Campaigns by state.
    campaigns: Object,
    /// Whether delivery runs.
    delivery: bool,
}

/// A domain suspended or resumed.
#[derive(ToSchema)]
pub(super) struct DomainSuspension {
    domain: String,
    suspended: bool,
    queued: u64,
    known: bool,
}

/// Shaping actions and AIMD limits in force.
#[derive(ToSchema)]
pub(super) struct Shaping {
    actions: Vec<Object>,
    aimd: Vec<Object>,
}

#[derive(ToSchema)]
pub(super) struct ShapingLifted {
    lifted: Object,
}

#[derive(ToSchema)]
pub(super) struct Sources {
    sources: Vec<Object>,
}

/// The fleet as this node sees it.
#[derive(ToSchema)]
pub(super) struct Cluster {
    /// `single`, or the cluster mode.
    mode: String,
    node_id: Option<String>,
    alive_nodes: Option<u64>,
    conflict: Option<Value>,
    limit_mismatches: Option<Vec<Object>>,
    nodes: Vec<Object>,
}

/// Today's TLS reporting counts and the MTA-STS policies held.
#[derive(ToSchema)]
pub(super) struct TlsReports {
    date: String,
    domains: Vec<Object>,
    mta_sts_policies: Vec<Object>,
}

/// A tenant: its limits as configured, where it comes from, its use today.
#[derive(ToSchema)]
pub(super) struct Tenant {
    name: String,
    /// `config` or `api`.
    origin: String,
    used_today: u64,
}

#[derive(ToSchema)]
pub(super) struct TenantList {
    tenants: Vec<Tenant>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// An API key (never the key itself, except in the 201 that creates it).
#[derive(ToSchema)]
pub(super) struct ApiKey {
    id: String,
    tenant: String,
    name: String,
    origin: String,
    #[schema(format = DateTime)]
    created_at: Option<String>,
    #[schema(format = DateTime)]
    last_used_at: Option<String>,
    /// The key: only in the answer that creates it.
    key: Option<String>,
    /// In the answer that revokes it.
    revoked: Option<bool>,
}

#[derive(ToSchema)]
pub(super) struct ApiKeyList {
    keys: Vec<ApiKey>,
    /// The `cursor` of the next page; `null` on the last.
    next_cursor: Option<String>,
}

/// A priority: 0 (lowest) to 9, or a name (`low` 2, `normal` 5, `high` 8).
#[derive(ToSchema, serde::Deserialize)]
#[serde(untagged)]
pub(super) enum Priority {
    Level(u8),
    Name(PriorityName),
}

#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub(super) enum PriorityName {
    Low,
    Normal,
    High,
}

/// Why an address is suppressed.
#[derive(ToSchema, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub(super) enum Reason {
    HardBounce,
    Complaint,
    Unsubscribe,
    Manual,
}

/// A file attached to every message of a campaign.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Attachment {
    filename: String,
    content_type: String,
    content_base64: String,
}

/// A campaign's own breaker thresholds (the config's `[guard]` otherwise).
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct Thresholds {
    max_complaint_percent: Option<f64>,
    min_delivered: Option<u64>,
    max_hard_bounce_percent: Option<f64>,
    min_attempted: Option<u64>,
}

/// The body of `POST /v1/campaigns`: the template, the sender and the first recipients (more
/// follow as NDJSON to `POST /v1/campaigns/{id}/recipients`). Unknown fields are refused.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewCampaign {
    /// The sender address (in a sending domain of the key's tenant), or `Name <address>`.
    #[schema(format = "email")]
    from: String,
    from_name: Option<String>,
    reply_to: Option<String>,
    /// A template (minijinja) of the recipient's `vars`.
    subject: String,
    /// The text part (a template); a message needs `text`, `html` or both.
    text: Option<String>,
    /// The HTML part (a template).
    html: Option<String>,
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    headers: Option<Value>,
    tags: Option<Vec<String>>,
    attachments: Option<Vec<Attachment>>,
    /// `false`: every recipient gets the same message (recipients carry no `vars`).
    personalised: Option<bool>,
    priority: Option<Priority>,
    /// A share of its domains' sending among campaigns of its priority, 1 to 1000.
    #[schema(minimum = 1, maximum = 1000)]
    weight: Option<u32>,
    /// RFC 3339: not before then.
    #[schema(format = DateTime)]
    send_at: Option<String>,
    /// `"100/s"`, `"5000/h"`.
    max_rate: Option<String>,
    /// An egress pool of the config.
    pool: Option<String>,
    guard: Option<Thresholds>,
    recipients: Option<Vec<Recipient>>,
}

/// The body of `POST /v1/messages`: one message to one recipient, on a stream.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewMessage {
    #[schema(format = "email")]
    from: String,
    from_name: Option<String>,
    reply_to: Option<String>,
    subject: String,
    /// The text part (a template); a message needs `text`, `html` or both.
    text: Option<String>,
    /// The HTML part (a template).
    html: Option<String>,
    #[schema(value_type = Option<std::collections::BTreeMap<String, String>>)]
    headers: Option<Value>,
    tags: Option<Vec<String>>,
    attachments: Option<Vec<Attachment>>,
    /// The stream (default `transactional`).
    stream: Option<String>,
    priority: Option<Priority>,
    pool: Option<String>,
    #[schema(format = "email")]
    to: String,
    #[schema(value_type = Option<Object>)]
    vars: Option<Value>,
}

/// The body of `PUT /v1/suppressions/{address}` (may be empty).
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct PutSuppression {
    /// `manual` unless given.
    reason: Option<Reason>,
    /// `global` unless given, or a sending domain.
    scope: Option<String>,
    source: Option<String>,
}

/// The body of `POST /v1/admin/tenants`: `[[tenant]]`'s fields, without keys.
#[derive(ToSchema)]
pub(super) struct NewTenant {
    name: String,
    sending_domains: Vec<String>,
    pool: Option<String>,
    /// `"10/s"`: API requests.
    rate: Option<String>,
    daily_quota: Option<u64>,
    max_queued: Option<u64>,
    weight: Option<u32>,
}

/// The body of `POST /v1/admin/keys`.
#[derive(ToSchema, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct NewKey {
    tenant: String,
    name: Option<String>,
}
