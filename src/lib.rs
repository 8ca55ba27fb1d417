//! Sluice: a high-throughput bulk outbound mail engine.
//!
//! Platform engineers POST campaigns (one template, many recipients with variables) over HTTP;
//! Sluice answers 202 once every accepted recipient is synced to its RocksDB spool, then delivers
//! them over pooled, pipelined SMTP connections, shaped per destination site.
//! This page is for contributors: how the crate is laid out and why. Users read the README.
//!
//! # Layout
//!
//! The request path, in the order data flows:
//!
//! * [`api`]: the axum router (suppression, import/export, feedback and unsubscribe handlers in
//!   its `suppressions` module; the streamed-body line splitter in `lines`). Authentication (Bearer keys, constant-time), readiness, load
//!   shedding (503 + `Retry-After` past `http.max_concurrent_requests`), JSON error bodies that name
//!   the field, `Idempotency-Key`. Handlers validate through `ingest` and never speak SMTP.
//! * [`ingest`]: validation of campaign fields, templates and recipients, and the
//!   [`ingest::Upload`], which stages a request's jobs in the spool chunk by chunk and makes them
//!   visible in one synced commit (or deletes them if the request fails or the client leaves).
//! * [`address`]: the one definition of a valid address (RFC 5321/6531; IDN to punycode).
//! * [`template`]: minijinja settings shared by ingest (compile, find header variables) and
//!   delivery (render).
//! * [`spool`]: RocksDB, its column families and the single writer thread that does group commit;
//!   [`spool::codec`] is the compact, versioned job encoding. A thread samples the filesystem's
//!   free space: under `spool.min_free_bytes` ingest is refused (507) before it writes, so RocksDB
//!   itself rarely meets a full disk; when it does, its error handler resumes writes once space
//!   is back, and delivery retries its outcome writes rather than drop them. The `meta` column
//!   family also holds, for campaigns that are not personalised only, an address → job index
//!   written with each job (reports about a shared message name the recipient by address).
//! * [`campaign`]: the stored campaign record (the template, written once) and the in-memory
//!   registry with state and per-state counts.
//! * [`queue`]: the in-memory index of pending jobs per destination domain, 16 bytes a job, which
//!   the delivery engine consumes. Jobs that arrive in (due, id) order, as an upload's do, sit in
//!   a sorted run taken from the front; only out-of-order ones go to a heap.
//! * [`suppression`]: suppression entries (global or per sending domain) stored in the
//!   `suppressions` column family and mirrored in an in-memory index; checked by
//!   [`ingest::Upload::add`] (suppressed recipients are recorded, never queued) and again by
//!   delivery before each message. [`api`] also serves `/u/{token}`, the one-click unsubscribe
//!   that adds an entry scoped to the campaign's From domain. Entries that name a campaign are
//!   counted back into its `unsubscribed`/`complained` at recovery (those counts are not stored).
//! * [`node`]: one process's state (config, spool, registry, queue, parked jobs of paused
//!   campaigns, suspended domains) and start-up recovery.
//!
//! The delivery path:
//!
//! * [`delivery`]: the engine. A coordinator takes domains whose next job is due from the queue
//!   index, resolves each to a *site* (its MX set with preferences, or a static route) and attaches it; each site
//!   runs up to `max_connections` lanes that take jobs round-robin across its domains, read the
//!   records on the blocking pool, render, send and record the outcome. Jobs of a campaign that
//!   is not personalised are grouped into one transaction per domain (up to the site's
//!   `max_recipients_per_message`) with one shared message; each recipient's outcome comes from
//!   its own RCPT reply. Throttles (governor)
//!   answer "not before T" and the domains are rescheduled for T. Outcome updates go to the spool
//!   in batches with the WAL synced every 100 ms; [`delivery::log`] writes the JSON delivery log
//!   on its own thread and rotates it. [`delivery::stats`] gives sites their bounded metric
//!   label, keeps the per-site gauges (connections open and in use, in flight, queue and oldest
//!   job, refreshed every 5 s) and builds the reports of `GET /v1/domains` and `GET /v1/queue`.
//! * [`dns`]: MX and address lookups (hickory, TTL-cached); tells permanent answers (NXDOMAIN,
//!   null MX) from temporary ones.
//! * [`smtp`]: our SMTP client: [`smtp::reply`] parses replies into typed data, and
//!   [`smtp::client`] runs a connection (EHLO/HELO, STARTTLS with rustls, PIPELINING, SIZE,
//!   8BITMIME, SMTPUTF8, dot-stuffing, RFC 5321 timeouts).
//! * [`outcome`]: the one classifier from replies, transport errors and DNS answers to delivered,
//!   deferred, bounced or expired; [`outcome::rules`] then names the bounce category from the
//!   rules file (`config/bounce-rules.toml`, compiled in, replaceable and reloaded on SIGHUP),
//!   retries a 5xx of a soft category and says whether a hard bounce suppresses. Delivery writes
//!   that suppression in the same batch as the job's outcome.
//! * [`render`]: message assembly. [`render::compile`] once per campaign (templates, attachments
//!   MIME-encoded once); [`render::Assembler`] renders, builds the MIME message (mail-builder) with
//!   List-Unsubscribe, Feedback-ID and the trace header, and signs it: on the blocking pool one
//!   message per core at a time when an RSA key signs or the templates are large, else on the
//!   delivery task itself (tens of microseconds, cheaper than two thread hand-offs). Deterministic, so a retry sends the same message (DKIM `t=` aside).
//!   [`render::check_vars`] is the same render at ingest, with a no-render fast path for templates
//!   of bare `{{ name }}` expressions.
//! * [`dkim`]: `[[dkim]]` keys loaded once into mail-auth signers (AWS-LC backend), keyed by domain;
//!   every key of the From domain (or its nearest parent) signs. Swapped whole on SIGHUP.
//! * [`tokens`]: HMAC job tokens for VERP, unsubscribe links and the trace header, with a purpose
//!   byte so one kind cannot stand in for another, and key rotation (first key signs, all verify).
//! * [`feedback`]: reports that come back later. Parses RFC 3464 DSNs (mail-parser for MIME, the
//!   delivery-status fields here) and RFC 5965 ARF (mail-auth), maps each to its job through the
//!   VERP token of the envelope recipient or the trace header / VERP Return-Path of the returned
//!   headers, and applies it: job state and counts, suppression, a delivery-log record. A report
//!   about a shared message (a campaign that is not personalised) names its first recipient's
//!   job; the recipient the report names is found through the spool's per-campaign address index.
//! * [`inbound`]: the SMTP listener on `[bounce] listen` that feeds [`feedback`]; a pure
//!   [`inbound::Command::parse`] reads each command line, the dialogue applies it; it accepts only
//!   addresses whose tokens authenticate and configured feedback addresses, with limits on
//!   connections, lines, size and errors, and answers the final dot after the effect is synced.
//!   `POST /v1/feedback` is the same over HTTP.
//! * [`webhook`]: events for HTTP receivers. An event (a delivery-log record plus id and type) is
//!   staged into the same spool batch as the change it reports; the spool's writer numbers it in
//!   write order into the `events` column family (the outbox); one sender per receiver reads its
//!   events from a cursor, POSTs signed batches and deletes what was acknowledged.
//! * [`server`]: start and graceful stop (delivery first, bounded by `delivery.shutdown_timeout`,
//!   then the API, listener and webhook senders, then the delivery log and the spool), used by
//!   the binary and by in-process tests. HTTPS on the API is served here with hyper's HTTP/1
//!   connection builder, since `axum::serve` speaks plain TCP only.
//! * [`tls`]: certificate and key files into a rustls acceptor (API, listener STARTTLS).
//! * [`config`]: the TOML schema, defaults and validation with file/key/reason errors.
//! * [`metrics`]: Prometheus registry plumbing and the metrics that belong to no one module.
//!
//! The binary (`src/main.rs`) adds `src/cli/`: operator commands (`domains`, `queue`, `suspend`,
//! `campaign`, `suppressions`, `send --csv`) that are plain clients of the HTTP API.
//!
//! Around the crate: `tests/` (end-to-end, Sluice in-process or as a process, with SMTP sinks and
//! a programmable DNS server on loopback), `benches/`, `scripts/` (run, test, setup, the peer
//! acceptance scripts with Postfix's smtp-sink, NSD, dkimpy and Prometheus, and `scripts/fuzz`),
//! and `fuzz/`, the `cargo fuzz` crate: one target per parser that meets outside input (SMTP
//! replies, inbound commands, DSN/ARF reports, addresses, ingest JSON). It is a crate of its own
//! at the top, where cargo fuzz looks for it, because it builds with libFuzzer's instrumentation.
//!
//! # Durability
//!
//! A 202 means synced to disk. Every write goes through the spool's writer thread, which applies
//! queued batches and then syncs the WAL once for all of them that asked for it, so concurrent
//! requests share one `fsync`. A request's recipients are written as they stream in, each job
//! tagged with its upload id, next to an "open upload" record; the final batch removes that record
//! and adds the campaign and idempotency records. Recovery deletes jobs of uploads still open, so
//! a crash at any moment leaves either the whole request or nothing.
//!
//! # Where this departs from the design notes
//!
//! * An `idempotency` column family joins the five of the design: the stored answer is written in
//!   the same batch as the data, so a retried request can never add recipients twice.
//! * Campaign counts are not stored; recovery derives them from job states while it scans the jobs
//!   to rebuild the queue anyway. This keeps ingest to one write per recipient.
//! * The connection pool is per site rather than per (source IP, MX host): a site *is* a set of
//!   MX hosts, so the two coincide, and keeping idle connections with the site lets
//!   `max_connections` count pooled and busy connections together.
//! * Campaigns share a site in queue order (due time, then job id), not round-robin by campaign.
//! * The signed header list adds Reply-To to the design's; absent headers are signed as empty, so
//!   none of them can be added in transit.
//! * Ingest renders each recipient's variables against the templates (the rule that a
//!   recipient who cannot render is refused at ingest), skipping the render when a template is plain
//!   substitution and every name is present.
//! * Suppression entries also carry the bounce `category` and the `detail` (reply or report) that
//!   caused them, for people asking why an address is blocked.
//! * Complaints are scoped to the campaign's From domain, like unsubscribes, not global.
//! * The `events` column family is the webhook outbox only; the delivery log is a rotated file
//!   written by its own thread (a log shipper reads it), not a second consumer of the outbox.
//! * Metrics use a `site` label (the rule name, route, or primary MX host of the first 100
//!   sites), never the recipient domain; per-domain detail is in `GET /v1/domains`.
//! * "Same content for all" is a campaign's choice (`"personalised": false`), not detected: every
//!   personalised message carries per-recipient headers (To, List-Unsubscribe, trace token), so
//!   no two are ever the same. Such campaigns give up one-click unsubscribe and per-recipient
//!   VERP; an address index in `meta` maps their reports back to recipients.
//! * Campaign ids are UUIDv7 (time-ordered, unique across nodes); the spool keys campaigns by a
//!   local 32-bit sequence so job keys stay 8 bytes.

pub mod address;
pub mod api;
pub mod campaign;
pub mod config;
pub mod delivery;
pub mod dkim;
pub mod dns;
pub mod feedback;
pub mod inbound;
pub mod ingest;
pub mod metrics;
pub mod node;
pub mod outcome;
pub mod queue;
pub mod render;
pub mod server;
pub mod smtp;
pub mod spool;
pub mod suppression;
pub mod template;
pub mod tls;
pub mod tokens;
pub mod webhook;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}
