//! Sluice: a high-throughput bulk outbound mail engine.
//!
//! Platform engineers POST campaigns (one template, many recipients with variables) over HTTP;
//! Sluice answers 202 once every accepted recipient is synced to its RocksDB spool, then delivers
//! them over pooled, pipelined SMTP connections, shaped per destination site.
//! This page is for contributors: how the crate is laid out and why. Users read the README.
//!
//! # Layout
//!
//! The folders of `src/` are the stages a recipient passes through, in this order: `intake/`,
//! `store/`, `scheduler/`, `outbound/`, `effects/`, `feedback/`, then `cluster/`, what a fleet
//! of nodes shares; the few files beside them are the process around the stages. Below, each module with the state it owns. Locks are private to
//! their module; where two are held at once the order is written in the module that allows it (a
//! delivery site's lock, then the scheduler's, which is a leaf).
//!
//! **[`intake`]: HTTP and SMTP to durable jobs.**
//!
//! * [`intake::api`]: the axum router, one file per resource (`campaigns`, `messages`,
//!   `suppressions`, `feedback`, `inbound`, `unsubscribe`, `domains`, `sending_domains`,
//!   `admin`), plus `idempotency` and `lines`, the line-by-line reader shared by NDJSON uploads
//!   and suppression imports. Authentication (a Bearer key names a
//!   [`store::tenants::Caller`], put in the request's extensions for the handlers), the
//!   tenant's request rate (429 + `Retry-After`), readiness, load shedding (503 + `Retry-After`
//!   past `http.max_concurrent_requests`), [`intake::api::ApiError`] with the field at fault.
//!   Routes come in two groups: a tenant's (its campaigns, messages, suppressions, sending
//!   domains; another tenant's ids are 404) and the operator's (everything else, 403 for a
//!   tenant's key). Owns the in-flight `Idempotency-Key` set (through the node). Never speaks
//!   SMTP. The OpenAPI description (`intake::api::openapi`) is generated from each handler's
//!   `#[utoipa::path]`, and the router is built from the same annotations (utoipa-axum), so
//!   no route is served undescribed; `schema` holds the shapes of the answers handlers build as
//!   JSON, which the schemathesis contract test checks every answer against. `extract` wraps
//!   axum's query and path extractors so their refusals are API errors naming the parameter.
//! * [`intake::ingest`]: validation of campaign fields, templates and recipients, and the
//!   [`intake::ingest::Upload`], which stages a request's jobs in the spool chunk by chunk and
//!   makes them visible in one synced commit (or deletes them if the request fails or the client
//!   leaves). [`intake::address`] is the one definition of a valid address (RFC 5321/6531; IDN to
//!   punycode); [`intake::template`] the minijinja settings shared by ingest and rendering.
//! * [`intake::raw`]: messages given whole (MIME), from `POST /v1/messages/raw` and the
//!   submission listener: the header and line checks, the `X-Sluice-*` choices, and the upload
//!   of one message of a stream's bucket whose bytes are stored once (under its first job's key,
//!   in `messages`) with a job per recipient pointing at them ([`store::campaign::RawMeta`]).
//!   Delivery puts the trace field in front and signs; the recipients of one message share a
//!   transaction. Also the task that queues DSNs to submitters ([`effects::dsn`]).
//! * [`intake::submission`]: the SMTP submission listener (STARTTLS and implicit TLS, AUTH PLAIN
//!   and LOGIN with an API key, trusted networks, PIPELINING with replies batched, BDAT, DSN
//!   parameters). [`intake::smtp`] is the server side of SMTP it shares with the bounce listener:
//!   bounded line reads, DATA and BDAT, the pure command parser (fuzzed), connection limits.
//!
//! **[`store`]: what is kept.**
//!
//! * [`store::spool`]: RocksDB, its column families and the single writer thread that does group
//!   commit; [`store::spool::codec`] is the compact, versioned job encoding. Queued jobs live in
//!   `jobs`; a job that becomes final moves, in the batch that ends it, to a compact tombstone in
//!   `finals`, and its campaign's final counts and next free index go to `tallies` as a merge
//!   operand. Recovery therefore reads the live jobs and one tally per campaign, never history. A thread samples the
//!   filesystem's free space: under `spool.min_free_bytes` ingest is refused (507) before it
//!   writes, so RocksDB itself rarely meets a full disk; when it does, its error handler resumes
//!   writes once space is back, and delivery retries its outcome writes rather than drop them.
//!   The `meta` column family also holds, for campaigns that are not personalised only, an
//!   address → job index written with each job (reports about a shared message name the
//!   recipient by address). `messages` holds each transactional message's own record beside its
//!   job (below).
//! * [`store::campaign`]: the stored campaign record (the template, written once) and the
//!   in-memory registry with state, per-state counts, live recipients, open uploads and the
//!   campaign's lifecycle after sending. A transactional message is not a campaign: it is one
//!   job of its stream's *bucket* (a campaign record per stream and `retention.message_buckets`
//!   period, holding counts and state), with the message's templates in `messages` under the
//!   job's key. Delivery and reports build a short-lived [`store::campaign::Campaign::message`]
//!   from it that shares the bucket's counts and state, so every layer treats it as a campaign;
//!   the registry holds buckets, never one entry per message, and the transition that ends the
//!   job compacts the record.
//! * [`store::tenants`]: the tenants (`[[tenant]]`, and those the admin API made, in `meta`
//!   under `tenant/`) and their API keys, known by SHA-256 and looked up in a map; each tenant's
//!   request rate (governor), and, for a tenant with a daily quota, its recipients accepted per
//!   UTC day as merge operands summed by RocksDB, staged in the batch that accepts them. Every record names its tenant: the
//!   campaign record's `tenant` (unset: the default tenant, the operator's), suppression scopes
//!   (`<tenant>:<scope>`), delivery-log records and events; stream buckets are per tenant.
//! * [`store::retention`]: a periodic pass that marks idle campaigns finished and, per
//!   `[retention]`, deletes their tombstones (and a bucket's message records) by key range and
//!   later drops their templates. A bucket finishes only after its period. A campaign with both
//!   done can never change again: it moves, with its final counts, from `campaigns` and
//!   `tallies` to `archive` (indexed by id in `meta`), which recovery never reads, so start-up
//!   and the registry hold recent campaigns only; `GET /v1/campaigns` reads the archive.
//!
//! **[`scheduler`]: which job when.** It owns the pending-job index ([`scheduler::index`], 16 bytes
//! a job, per destination domain), the jobs parked for paused campaigns, the suspended domains and
//! the engine's wake-up, behind one private lock. Its `//!` states where a job is at every moment
//! and what may be held when. Uploads are indexed in slices, so a million-recipient commit never
//! stalls delivery. Within a domain, [`scheduler::fair`] orders jobs: one flow per campaign (a
//! sorted run plus a heap for out-of-order jobs, `scheduler::pending`), flows grouped by tenant
//! and tenants by priority; the highest priority with due mail goes first while lower ones keep
//! a guaranteed share, and within a priority start-time fair queuing picks a tenant by its
//! weight, then one of its flows by the campaign's weight. `send_at` is just the jobs' due time. A campaign's `max_rate` holds its
//! jobs in a per-campaign queue (`scheduler::rate`, a GCRA) that lets them into the domain
//! queues at that rate, so a limit across thousands of domains costs one schedule entry, not a
//! wake-up per domain. Campaigns register their parameters with the scheduler before their jobs
//! are queued ([`node::Node::register`]).
//!
//! **[`outbound`]: due jobs to SMTP transactions.**
//!
//! * [`outbound::delivery`]: the engine, one file per step of an attempt: the coordinator (mod)
//!   takes due domains from the scheduler, `route` resolves a domain to a *site* (its MX set with
//!   preferences, or a static route; kept per domain while the MX answer's TTL and the MTA-STS
//!   recheck last, so a domain due again is attached by the coordinator itself with one map
//!   look-up) and opens connections, `site` keeps a site's throttles,
//!   lanes, idle connections and backoff, `lane` runs up to `max_connections` lanes per site,
//!   `pick` reads and decodes each leased job once (on the task when RocksDB holds the records in
//!   memory, as it does for mail sent soon after it came in, else on the blocking pool, which also
//!   reads the campaign's next records into the block cache so the batches after it stay on the
//!   task; `sluice_job_reads_total` counts both) and sorts
//!   out paused, cancelled, suppressed and expired ones, `assembly` renders and signs a group's
//!   message (on the assembly pool when signing is costly, submitted ahead of its turn),
//!   `transact` sends one message (one transaction for
//!   several recipients of a campaign that is not personalised), `finish` classifies the outcome
//!   and applies it as an [`effects::transition::Transition`] through one batching writer (WAL
//!   synced every 100 ms). Throttles (governor) answer "not before T" and the domains are
//!   rescheduled for T. Each transaction goes from an egress source of its campaign's pool
//!   (`[[source]]`, `[[pool]]`), picked by smooth weighted round-robin per (site, pool) among the
//!   sources that may send there now (not suspended, not over their warm-up cap, not
//!   rate-limited past a lane's wait; a pool whose sources are all over their caps hands the
//!   message to its `overflow` pool). The site keeps the per-(source, site) state: its own
//!   connection count and configured limiters (or one for all, `per = "site"`), the shaping
//!   actions in force (cached by the actions' generation number), AIMD and the measured rate.
//!   A site whose connection rounds keep failing is dead for a while: its mail waits untouched.
//!   [`outbound::delivery::stats`] gives sites their bounded metric label and
//!   builds the reports of `GET /v1/domains` and `GET /v1/queue`; the API reaches them through an
//!   [`outbound::delivery::EngineHandle`], so nothing below the API knows the engine.
//! * [`outbound::shaping`]: sending reputation that outlives a site or a restart:
//!   [`outbound::shaping::rules`] (the shaping rules file, `config/shaping.toml` compiled in:
//!   provider groups, replies → suspend / throttle / ignore, AIMD settings), the actions in force
//!   ([`outbound::shaping::actions`], in `meta` under `shaping/`, listed and lifted through
//!   `/v1/shaping`) and the warm-up counts ([`outbound::shaping::warmup`], in `meta` under
//!   `warmup/`, written once a second). [`outbound::delivery`] consults them when it picks a
//!   source, and reports a transaction's first failure reply to them (`finish::react`).
//! * [`outbound::dns`]: MX, address, TXT and TLSA lookups (hickory, TTL-cached, and a resolver
//!   without a cache for lookups that must ask again); tells permanent answers (NXDOMAIN, null
//!   MX) from temporary ones, and with DANE on, secure from insecure and bogus ones. PTR lookups
//!   ask the configured servers directly, since hickory answers loopback reverse lookups itself.
//!   [`outbound::resolver_health`] decides whether an NXDOMAIN is believed (a canary, the share
//!   of NXDOMAIN answers lately, domains that resolved lately, a confirming second lookup);
//!   delivery's `route` asks it before bouncing a domain.
//! * [`outbound::preflight`]: the authentication preflight of a sending domain: mail-auth's DKIM,
//!   SPF and DMARC verifiers run on a sample message signed with our keys, through the
//!   configured name servers, plus PTR and MTA-STS/TLS-RPT presence; reports kept per domain
//!   in the [`node::Node`] for `preflight.ttl`, read by the API, campaign creation and
//!   `check-config --dns`.
//! * [`outbound::render`]: message assembly. [`outbound::render::compile`] once per campaign (the
//!   compiled templates are cached in the [`outbound::render::Assembler`], not in the campaign
//!   record); the assembler renders, builds the MIME message (mail-builder) with
//!   List-Unsubscribe, Feedback-ID and the trace header, and signs it: on the assembly pool
//!   (`outbound::delivery::assembly`: one thread per core, one FIFO queue) when an RSA key signs
//!   or the templates are large, else on the delivery task itself. A lane submits the messages
//!   of its batch ahead of their turn (up to 256 KiB of templates), so they are signed while it
//!   sends the ones before them, and it wakes for a finished signature about once per batch.
//!   Deterministic, so a retry sends the same message (DKIM `t=` aside). The signature fields
//!   and the message stay two buffers ([`outbound::render::Rendered`]), written to the socket
//!   together by one vectored write rather than joined.
//!   [`outbound::render::check_vars`] is the same render at ingest, with a no-render fast path
//!   for templates of bare `{{ name }}` expressions.
//! * [`outbound::dkim`]: `[[dkim]]` keys loaded once into mail-auth signers (AWS-LC backend),
//!   keyed by domain; every key of the From domain (or its nearest parent) signs. Swapped whole
//!   on SIGHUP. The body is hashed once per message for all keys, in one SHA-256 call over the
//!   body as built when a branch-free pass finds it already in relaxed canonical form (the
//!   bodies we build are, unless their text has tabs or runs of spaces); else through
//!   mail-auth's canonicaliser. Header hashing and the signature itself are mail-auth's.
//! * [`outbound::tokens`]: HMAC job tokens for VERP, unsubscribe links and the trace header, with
//!   a purpose byte so one kind cannot stand in for another, and key rotation (first key signs,
//!   all verify).
//! * [`outbound::smtp`]: our SMTP client: [`outbound::smtp::reply`] parses replies into typed
//!   data, and [`outbound::smtp::client`] runs a connection over any byte stream (EHLO/HELO,
//!   STARTTLS with rustls, PIPELINING, SIZE, 8BITMIME, SMTPUTF8, DSN parameters, dot-stuffing or
//!   one `BDAT … LAST` chunk once a recipient is accepted, RFC 5321 timeouts; the content goes
//!   out as vectored writes of the pieces it was built in and the stuffed dots), unit-tested
//!   against scripted servers on an in-memory pipe.
//! * Transport security: [`outbound::sts`] parses the MTA-STS TXT record and policy file and
//!   matches MX hosts (RFC 8461); [`outbound::sts_cache`] keeps fetched policies (in memory and
//!   in `meta` under `mta-sts/`, for their `max_age`) and fetches them over HTTPS (no
//!   redirects, 64 KiB, a deadline). [`outbound::dane`] says which TLSA records are usable for
//!   SMTP and checks a server's certificate against them in a rustls verifier of our own
//!   (DANE-EE and DANE-TA, RFC 7672, on rustls-webpki); [`outbound::dns`] validates MX, address
//!   and TLSA answers with hickory's own DNSSEC code when `[dane]` is on. `delivery::secure`
//!   decides each connection's TLS: DANE for a host with secure TLSA records, else the domain's
//!   MTA-STS policy (a domain with one in `enforce` or `testing` gets a site of its own, keyed
//!   by the policy id, made of the matching MX hosts under `enforce`), else the rule's `tls`.
//!   [`outbound::trust`] reads the extra CA certificates and the DNSSEC trust anchors.
//!   [`effects::tls_reports`] counts sessions per policy domain and day (in `meta` under
//!   `tls-rpt/`), and `delivery::tlsrpt` sends each day's reports to the `rua` of
//!   `_smtp._tls.<domain>` (mail through our own queue, or HTTPS POST).
//! * [`outbound::outcome`]: the one classifier from replies, transport errors and DNS answers to
//!   delivered, deferred, bounced or expired; [`outbound::outcome::rules`] then names the bounce
//!   category from the rules file (`config/bounce-rules.toml`, compiled in, replaceable and
//!   reloaded on SIGHUP), retries a 5xx of a soft category and says whether a hard bounce
//!   suppresses. [`outbound::retry`] is the backoff schedule (deferred recipients, webhook
//!   receivers).
//!
//! **[`effects`]: what happened, one write path for every effect.**
//!
//! * [`effects::transition`]: a job's change of state, with everything it touches (record,
//!   campaign counts, delivery-log record and webhook event, a suppression it causes), staged
//!   into the caller's spool batch and applied in memory once written. Delivery and feedback use
//!   it and nothing else, so record, counts and events cannot drift apart.
//! * [`effects::suppression`]: entries (global or per sending domain) in the `suppressions`
//!   column family, mirrored in an in-memory index checked at ingest and again before each
//!   delivery. Every new entry goes through [`effects::suppression::Suppressions::added`] (index,
//!   metric, log): from a transition, or [`effects::suppression::Suppressions::add`] for the API
//!   and imports. Entries that name a campaign are counted back into its
//!   `unsubscribed`/`complained` at recovery (those counts are not stored).
//! * [`effects::guard`]: the deliverability breakers. [`effects::transition::Transition::apply`]
//!   counts each delivery, bounce, complaint and unsubscribe per campaign and per sending domain
//!   (10-minute buckets for 7 days, in `meta` under `guard/`); [`effects::breakers`], a task,
//!   judges complaint and hard-bounce rates every `guard.interval` and pauses the campaigns over
//!   a threshold through
//!   [`node::Node::set_campaign_state_marked`], the [`store::campaign::PausedReason`] written
//!   with the campaign record (and a `campaign_paused` event in the same batch). A tripped
//!   sending domain is a state record of its own; the API refuses to resume what a breaker
//!   would pause again unless told `force`.
//! * [`effects::delivery_log`]: the JSON delivery log, written on its own thread (which gathers
//!   records for 20 ms between writes rather than waking for each) and rotated.
//! * [`effects::dsn`]: the RFC 3464 reports to the submitters of SMTP mail that bounces or
//!   expires: a transition that fails such a job hands a notice over once applied (after the
//!   failure is written), [`intake::raw`] builds and queues it with a null return path.
//! * [`effects::webhook`]: events for HTTP receivers. An event (a delivery-log record plus id and
//!   type) is staged into the same spool batch as the change it reports; the spool's writer
//!   numbers it in write order into the `events` column family (the outbox); one sender per
//!   receiver reads its events from a cursor, POSTs signed batches and deletes what was
//!   acknowledged.
//!
//! **[`feedback`]: reports about mail sent, back.** It parses RFC 3464 DSNs (mail-parser for
//! MIME, the delivery-status fields here) and RFC 5965 ARF (mail-auth), maps each to its job
//! through the VERP token of the envelope recipient or the trace header / VERP Return-Path of the
//! returned headers, and applies it as a transition. A report about a shared message names its
//! first recipient's job; the recipient the report names is found through the spool's
//! per-campaign address index. [`feedback::listener`] is the SMTP listener on `[bounce] listen`
//! that feeds it; the pure [`intake::smtp::Command::parse`] reads each command line, the
//! dialogue applies it; it accepts only addresses whose tokens authenticate, configured
//! feedback addresses and the bounce domain's postmaster and abuse addresses (whose mail
//! [`feedback::postmaster`] forwards to the operator, wrapped, through our own delivery, or keeps
//! in the spool's `inbound` column family), with limits on connections, lines, size and errors,
//! and answers the final dot after the effect is synced. `POST /v1/feedback` is the same over HTTP. In cluster mode a
//! token also names the node that sent its job ([`outbound::tokens`]): a report or an
//! unsubscribe about another node's job is stored and handed to that node through the change
//! stream ([`feedback::Change`], applied by [`replication`]).
//!
//! **[`cluster`]: what a fleet shares (cluster mode, `[cluster]`).** The link to Redis Cluster:
//! every call under a deadline behind a circuit breaker, and the node's mode (`connected`, or
//! `degraded` while Redis is away, when every shared limit falls back to a local share: limit ×
//! 0.8 ÷ live nodes, which the connected nodes leave out of the rates they share while a node
//! is silent). [`cluster::budget`] makes a (source, site)'s limits fleet-wide: rates as runs
//! of slots reserved on a GCRA schedule in our own Lua and spent locally at their times,
//! connections as expiring leases with a fair share while other nodes wait (a site runs as many
//! lanes as it holds leases, plus one asking); a site asks it through
//! [`outbound::delivery`] when its rule's `scope` is `cluster`. [`cluster::nodes`]: heartbeats,
//! the claim on a `node_id`, the limit fingerprints compared across nodes. [`cluster::sync`]: the
//! change stream (a Redis stream) and the spool records (`cluster-out/` in `meta`) that stage a
//! change in the batch of the write that makes it, so nothing taken while Redis is away is lost.
//! It knows nothing of what changes mean: [`replication`] (beside `node`) publishes the staged
//! changes and applies the other nodes' (suppressions, shaping actions, campaigns created and
//! their state changes) through the same spool writes and index updates the API uses, minus the
//! staging, and publishes this node's campaign counts ([`cluster::counts`]), which
//! `GET /v1/campaigns/{id}` adds up on any node.
//!
//! **Around the stages** (the files beside the folders).
//!
//! * [`node`]: one process's state (config, spool, registry, scheduler, suppressions, assembler,
//!   delivery log, webhook receivers, rules, the cluster link) and start-up recovery, which
//!   rebuilds the registry, the counts, the suppression index and the scheduler from the spool.
//! * [`replication`]: cluster mode's task that publishes staged changes and applies the
//!   other nodes' (see [`cluster`]).
//! * [`server`]: [`server::Settings`] (the config and the files it names, DKIM keys and bounce
//!   rules, each loaded once), start and graceful stop (delivery first, bounded by
//!   `delivery.shutdown_timeout`, then the API, listener and webhook senders, then the delivery
//!   log and the spool), used by the binary and by in-process tests. HTTPS on the API is served
//!   here with hyper's HTTP/1 connection builder, since `axum::serve` speaks plain TCP only.
//! * [`config`]: the TOML schema, defaults and validation with file/key/reason errors; it names
//!   files but reads none but itself. [`tls`]: certificate and key files into a rustls acceptor.
//!   [`metrics`]: the registry and the metrics that belong to no one module.
//!
//! No import cycles between modules: `scripts/lib/module_cycles.py`, run by the test script,
//! reads the `crate::` paths of every file and fails on a cycle between modules (a top-level
//! module, or one level down inside a stage folder).
//!
//! The binary (`src/main.rs`) adds `src/cli/`: operator commands (`domains`, `queue`, `suspend`,
//! `campaign`, `suppressions`, `sources`, `shaping`, `send --csv`) that are plain clients of the HTTP API,
//! and `sink`, the development capture server `scripts/run` starts beside the node (`--list`
//! checks captured signatures against the config's own keys, through a resolver with no
//! servers, so nothing is looked up outside).
//!
//! Around the crate: `tests/` (end-to-end, Sluice in-process or as a process, with SMTP sinks and
//! a programmable DNS server on loopback; one module per area of one binary, `tests/e2e.rs`, so
//! RocksDB is linked once; the full-disk test and the rate-measuring scheduler, fairness and
//! cluster tests apart, the cluster tests against a six-process Redis Cluster they start),
//! `benches/`, `scripts/` (run, test, setup, `cluster` for a local fleet, the peer
//! acceptance scripts with Postfix's smtp-sink, NSD, dkimpy and Prometheus, and `scripts/fuzz`),
//! and `fuzz/`, the `cargo fuzz` crate: one target per parser that meets outside input (SMTP
//! replies, inbound commands, DSN/ARF reports, addresses, ingest JSON). It is a crate of its own
//! at the top, where cargo fuzz looks for it, because it builds with libFuzzer's instrumentation.
//!
//! # Durability
//!
//! A 202 means synced to disk. Every write goes through the spool's writer thread, which applies
//! queued batches and then syncs the WAL once for all of them that asked for it, so concurrent
//! requests share one `fsync`. When the last sync served several requests, a synced write waits
//! `spool.commit_window` (200 µs) for more before its sync: under many concurrent committers
//! (SMTP sessions) that halves the syncs. WAL files are recycled, so a sync overwrites data in
//! place and writes no inode. A request's recipients are written as they stream in, each job
//! tagged with its upload id, next to an "open upload" record; the final batch removes that record
//! and adds the campaign and idempotency records. Recovery deletes jobs of uploads still open, so
//! a crash at any moment leaves either the whole request or nothing.
//!
//! # Choices and their reasons
//!
//! Decisions a contributor might otherwise undo, each with why it was made.
//!
//! * Idempotency records have a column family of their own: the stored answer is written in the
//!   same batch as the data, so a retried request can never add recipients twice.
//! * Final counts are stored per campaign as RocksDB merge operands (`tallies`), added in the
//!   batch of each transition; queued counts come from the live jobs recovery scans anyway.
//! * Final jobs leave the `jobs` column family for `finals`, so restart time and memory follow
//!   what is queued; retention deletes a finished campaign's tombstones by key range, then
//!   compacts the range so the space comes back at once. Old campaigns move to an `archive`
//!   column family that start-up does not read.
//! * A transactional message is a job of its stream's bucket (one campaign per stream and
//!   period) with its own record in `messages`, not a campaign of its own: a campaign per
//!   message would exhaust the 32-bit campaign numbers and keep a record per message in memory.
//!   Its id is its job id, so a lookup needs no index.
//! * The OpenAPI description is generated (utoipa), not written by hand, and the router is
//!   built from it; handlers still build most answers as JSON values, whose shapes are
//!   described beside them (`intake::api::schema`) rather than serialised from typed structs:
//!   answers carry fields only where they apply, and the contract test (schemathesis) checks
//!   every answer it provokes against the description, so a drift fails the tests.
//! * A `history` column family keeps every report about a job (attempts, fates, later DSNs and
//!   complaints) for `GET /v1/messages/{id}`, keyed so it is deleted with the tombstones.
//! * The connection pool is per site rather than per (source IP, MX host): a site *is* a set of
//!   MX hosts, so the two coincide, and keeping idle connections with the site lets
//!   `max_connections` count pooled and busy connections together. A domain with an MTA-STS
//!   policy is the exception: its connections are checked for its policy, so it has a site of
//!   its own. DANE needs no such split: TLSA records belong to the MX host, whatever domain's
//!   mail goes to it.
//! * A domain's route (its site) is cached beside the resolver's own TTL cache rather than
//!   rebuilt from it on each visit: with thousands of domains of a few messages each, the
//!   look-up by `Name`, the MTA-STS look, rule matching and the site key's formatting cost as
//!   much per visit as sending a message. The entry lasts as long as the MX answer (and, with
//!   MTA-STS on, until the next policy look or the policy's expiry; a fetched policy drops it),
//!   so routing follows DNS as promptly as before. An NXDOMAIN or failed lookup is never cached
//!   here, and the resolver-health check still sees the domains served from it (once per half
//!   of its window), so its share of NXDOMAIN answers means what it meant.
//! * DNSSEC validation is hickory's own, from configured trust anchors, rather than the AD bit
//!   of a validating resolver: a node needs nothing besides its name servers, and a test can
//!   trust a signed test zone. With it on, every MX and address answer is validated, so an MX
//!   set that fails validation is deferred instead of sent to unauthenticated hosts; TLSA is
//!   only asked for hosts whose addresses are secure (RFC 7672 §2.2.2).
//! * There is no separate queue manager: the [`scheduler`] also owns parked jobs and suspended
//!   domains, so everything that decides whether a job may be taken sits behind one lock.
//! * Fair share is per destination domain (a site serves its domains in turn), not per site:
//!   the queue index is per domain, and campaigns of one site mostly share its domains, so the
//!   two agree; campaigns sending to different domains of one site split it by domain, whatever
//!   their weights. Tenants are a level above campaigns in the same structure.
//! * A stream's messages share one flow per priority (their bucket), rather than a flow each:
//!   a flow per message would make fair queuing degenerate into FIFO among messages anyway.
//! * The DKIM signed header list includes Reply-To; absent headers are signed as empty, so none
//!   of them can be added in transit.
//! * Ingest renders each recipient's variables against the templates (a recipient who cannot
//!   render is refused at ingest, not at delivery), skipping the render when a template is plain
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
//! * Suppression scopes carry the tenant (`<tenant>:*`, `<tenant>:<domain>`) instead of a
//!   column family or key prefix per tenant: the operator's entries keep their plain scopes
//!   and apply to every tenant, a delivery-time check is still one hash lookup per address, and
//!   a tenant's list is one key range.
//! * API keys are hashed with SHA-256, not Argon2: they are 32 random bytes, so nothing is
//!   gained by a slow hash, and a lookup per request must be cheap.
//! * Signing has threads of its own rather than tokio's blocking pool: the blocking pool handed
//!   each message through a sleeping thread and held a slot per core until the waiting task ran,
//!   so signers idled; own threads take the next message while the queue has any. The queue has
//!   no constant bound: each lane puts at most its batch in it, so its depth follows from the
//!   connections open.
//! * The runtime's workers and the assembly threads run under `SCHED_BATCH`
//!   ([`schedule_as_batch`]): with signing on both cores, a worker woken for every SMTP reply
//!   preempted a signer each time, about four context switches per message; batched, a woken
//!   worker waits for the tick or a free core and takes what came in meanwhile. Only wake-up
//!   latency under full load changes (a tick at most); the threads keep their CPU share, and
//!   Sluice preempts its neighbours less, not more.
//! * Campaign ids are UUIDv7 (time-ordered, unique across nodes); the spool keys campaigns by a
//!   local 32-bit sequence so job keys stay 8 bytes.

pub mod cluster;
pub mod config;
pub mod effects;
pub mod feedback;
pub mod intake;
pub mod metrics;
pub mod node;
pub mod outbound;
pub mod replication;
pub mod scheduler;
pub mod server;
pub mod store;
pub mod tls;

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// Puts the calling thread under `SCHED_BATCH` (Linux): its wake-ups no longer preempt a running
/// thread, they wait for the scheduler's next tick or a free core. For the runtime's workers and
/// the assembly threads: when signing keeps both cores busy, a worker woken for each SMTP reply
/// would otherwise preempt a signer every time (several switches per message); batched, it
/// handles the replies that came in meanwhile in one go. The threads keep their nice value and
/// their share of the CPU; only their wake-up latency under full load grows, by at most a tick.
/// A failure (not Linux, a seccomp filter) leaves the thread as it was.
pub fn schedule_as_batch() {
    #[cfg(target_os = "linux")]
    {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: sched_setscheduler reads `param` (a valid, initialised sched_param for the
        // duration of the call) and changes only the calling thread's (pid 0) policy.
        let rc = unsafe { libc::sched_setscheduler(0, libc::SCHED_BATCH, &param) };
        if rc != 0 {
            tracing::debug!(
                error = %std::io::Error::last_os_error(),
                "cannot set SCHED_BATCH; the thread keeps its scheduling policy"
            );
        }
    }
}
