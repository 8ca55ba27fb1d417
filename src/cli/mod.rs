//! Operator commands of the `sluice` binary that talk to a running node over its HTTP API:
//! sites and domains, the queue, campaigns, suppressions, and `send` (a campaign from a CSV file).
//!
//! Part of the binary, not the library: it only speaks HTTP, like any other API client.

mod send;
mod sink;

use std::io::IsTerminal;
use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use reqwest::{Method, StatusCode};
use serde_json::{Value, json};

pub use send::{SendArgs, send};
pub use sink::{SinkArgs, sink};

/// Where the API is and how to get in.
#[derive(Args, Clone)]
pub struct ApiArgs {
    /// Base URL of the node's HTTP API. `send` takes several (repeated, or comma-separated)
    /// to spread its uploads over the nodes of a cluster; other commands use the first.
    #[arg(
        long,
        env = "SLUICE_URL",
        default_value = "http://127.0.0.1:8025",
        global = true,
        value_delimiter = ','
    )]
    pub url: Vec<String>,
    /// An API key from the node's `auth.api_keys`.
    #[arg(long, env = "SLUICE_API_KEY", global = true, hide_env_values = true)]
    pub api_key: Option<String>,
    /// Print the API's JSON answer instead of a table.
    #[arg(long, global = true)]
    pub json: bool,
}

#[derive(Subcommand)]
pub enum CampaignCommand {
    /// The newest campaigns with their counts.
    List {
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
    /// One campaign's state and counts.
    Show {
        id: String,
    },
    /// Stop sending a campaign's queued mail until resumed.
    Pause {
        id: String,
    },
    Resume {
        id: String,
    },
    /// Drop a campaign's queued mail for good.
    Cancel {
        id: String,
    },
}

#[derive(Subcommand)]
pub enum MessageCommand {
    /// A message (the id its 202 gave) or a campaign recipient (the `job` of an event or log
    /// record): recipient, state and history.
    Show { id: String },
}

#[derive(Subcommand)]
pub enum SuppressionCommand {
    /// Entries in key order, a page at a time.
    List {
        #[arg(long, default_value_t = 100)]
        limit: usize,
        /// hard_bounce, complaint, unsubscribe or manual.
        #[arg(long)]
        reason: Option<String>,
        /// The `next_cursor` of the previous page.
        #[arg(long)]
        cursor: Option<String>,
    },
    /// Every entry of one address.
    Get { address: String },
    /// Suppress an address (globally unless --scope names a sending domain).
    Add {
        address: String,
        #[arg(long)]
        scope: Option<String>,
        #[arg(long, default_value = "manual")]
        reason: String,
    },
    /// Lift an address's suppression (every scope unless --scope).
    Remove {
        address: String,
        #[arg(long)]
        scope: Option<String>,
    },
    /// Load a CSV or NDJSON file (a `.csv` name is read as CSV).
    ///
    /// CSV: a header row names the columns, in any order: address (or email), reason, scope,
    /// source, created_at, campaign, job, category, detail; other columns are ignored. Without
    /// a header the columns are address,reason,scope,source. reason is hard_bounce, complaint,
    /// unsubscribe or manual (the default); scope is global (the default) or a sending domain.
    /// A byte-order mark, quoted fields and CRLF line ends are fine. Example file:
    ///
    ///     address,reason,scope
    ///     ann@example.org,hard_bounce,global
    ///     bob@example.org,unsubscribe,news.example.com
    ///
    /// NDJSON: one {"address", "reason", "scope", "source"} object per line (all but address
    /// optional), as `export` writes them.
    #[command(verbatim_doc_comment)]
    Import { file: std::path::PathBuf },
    /// Write every entry to stdout.
    Export {
        #[arg(long, default_value = "ndjson")]
        format: String,
        #[arg(long)]
        reason: Option<String>,
    },
}

#[derive(Subcommand)]
pub enum ShapingCommand {
    /// The shaping actions in force (suspensions, throttles) and the AIMD limits.
    List,
    /// Lift a shaping action before it expires.
    Lift { id: String },
}

#[derive(Subcommand)]
pub enum TenantCommand {
    /// Every tenant: sending domains, pool, limits, usage today.
    List,
    /// Add a tenant (stored in the node's spool; `[[tenant]]` in the config does the same).
    Add {
        name: String,
        /// A From domain it may send as: `example.com`, `*.example.com` or `*` (repeatable).
        #[arg(long = "sending-domain", required = true)]
        sending_domains: Vec<String>,
        /// The pool its mail uses when it names none.
        #[arg(long)]
        pool: Option<String>,
        /// API requests it may make, e.g. 50/s.
        #[arg(long)]
        rate: Option<String>,
        /// Recipients it may have accepted per UTC day.
        #[arg(long)]
        daily_quota: Option<u64>,
        /// Recipients it may have queued at once.
        #[arg(long)]
        max_queued: Option<u64>,
        /// Its share of a domain against other tenants (1 to 1000).
        #[arg(long)]
        weight: Option<u32>,
    },
    /// API keys (of one tenant with --tenant): id, name, created, last used.
    Keys {
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Make an API key for a tenant; the key is printed once and stored only hashed.
    KeyAdd {
        tenant: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke an API key by id (refused from the moment this returns).
    KeyRevoke { id: String },
    /// Read a key on stdin and print `sha256:<hex>` for `api_key_hashes` (needs no node).
    HashKey,
}

/// A thin authenticated JSON client of the API.
pub struct Api {
    base: String,
    /// Every `--url` given, the first being `base`.
    pub urls: Vec<String>,
    key: String,
    pub client: reqwest::Client,
    pub json: bool,
}

impl Api {
    pub fn new(args: &ApiArgs) -> anyhow::Result<Api> {
        let Some(key) = args.api_key.clone() else {
            bail!("no API key: pass --api-key or set SLUICE_API_KEY");
        };
        // reqwest is built without a bundled TLS provider; use the ring one Sluice uses.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let client = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .build()
            .context("building the HTTP client")?;
        let urls: Vec<String> = args
            .url
            .iter()
            .map(|u| u.trim().trim_end_matches('/').to_owned())
            .filter(|u| !u.is_empty())
            .collect();
        let Some(base) = urls.first().cloned() else {
            bail!("--url is empty");
        };
        Ok(Api {
            base,
            urls,
            key,
            client,
            json: args.json,
        })
    }

    /// The same client and key, for the node at `base`.
    pub fn at(&self, base: &str) -> Api {
        Api {
            base: base.to_owned(),
            urls: vec![base.to_owned()],
            key: self.key.clone(),
            client: self.client.clone(),
            json: self.json,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn request(&self, method: Method, path: &str) -> reqwest::RequestBuilder {
        self.client
            .request(method, self.url(path))
            .bearer_auth(&self.key)
    }

    /// Sends `req` and returns the JSON answer, or the API's error message.
    pub async fn send(&self, req: reqwest::RequestBuilder) -> anyhow::Result<Value> {
        let r = req
            .send()
            .await
            .with_context(|| format!("reaching the Sluice API at {}", self.base))?;
        let status = r.status();
        let retry_after = r
            .headers()
            .get(reqwest::header::RETRY_AFTER)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok())
            .map(std::time::Duration::from_secs);
        let text = r.text().await.context("reading the API's answer")?;
        let body: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok(body);
        }
        Err(anyhow::Error::new(ApiFailure {
            status,
            retry_after,
            body,
        }))
    }

    pub async fn call(
        &self,
        method: Method,
        path: &str,
        body: Option<Value>,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, path);
        if let Some(b) = body {
            req = req.json(&b);
        }
        self.send(req).await
    }

    /// Every page of a cursor-paged list at `path` (which has a query string or not): the
    /// first answer with the `items` of every page in its `items` array.
    pub async fn all_pages(&self, path: &str, items: &str) -> anyhow::Result<Value> {
        let sep = if path.contains('?') { '&' } else { '?' };
        let mut first = self.call(Method::GET, path, None).await?;
        let mut cursor = first["next_cursor"].as_str().map(str::to_owned);
        while let Some(c) = cursor {
            let next = format!("{path}{sep}cursor={}", segment(&c));
            let page = self.call(Method::GET, &next, None).await?;
            if let (Some(all), Some(more)) = (first[items].as_array_mut(), page[items].as_array()) {
                all.extend(more.iter().cloned());
            }
            cursor = page["next_cursor"].as_str().map(str::to_owned);
        }
        first["next_cursor"] = Value::Null;
        Ok(first)
    }
}

/// An answer of the API that is not a success: its status and error body.
#[derive(Debug)]
pub struct ApiFailure {
    pub status: StatusCode,
    pub retry_after: Option<std::time::Duration>,
    pub body: Value,
}

impl ApiFailure {
    /// Whether the same request may succeed later: a timeout, a retry still in progress, a
    /// rate limit, an overloaded, full or failing server.
    pub fn transient(&self) -> bool {
        match self.status.as_u16() {
            408 | 429 => true,
            409 => self.body["error"]["code"] == "idempotency_in_progress",
            s => s >= 500,
        }
    }
}

impl std::fmt::Display for ApiFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let (status, e) = (self.status, &self.body["error"]);
        match (e["message"].as_str(), e["field"].as_str()) {
            (Some(m), Some(field)) => write!(f, "{status}: {field}: {m}"),
            (Some(m), None) => write!(f, "{status}: {m}"),
            _ => write!(f, "{status}: {}", self.body),
        }
    }
}

impl std::error::Error for ApiFailure {}

/// Percent-encodes a path segment (addresses hold `@` and `+`).
pub fn segment(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~' | b'@') {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// The values of a JSON array as text (none when it is not an array).
fn strings(v: &Value) -> Vec<String> {
    v.as_array().into_iter().flatten().map(s).collect()
}

fn s(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

pub async fn domains(api: &Api, limit: usize) -> anyhow::Result<()> {
    let v = api
        .call(Method::GET, &format!("/v1/domains?limit={limit}"), None)
        .await?;
    if api.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<40} {:<10} {:>9} {:>8} {:>9} {:>8}  LAST REPLY",
        "SITE", "STATE", "QUEUED", "IN FLIGHT", "CONN", "RATE/S"
    );
    for site in v["sites"].as_array().into_iter().flatten() {
        let c = &site["connections"];
        println!(
            "{:<40} {:<10} {:>9} {:>8} {:>9} {:>8}  {}",
            s(&site["label"]),
            s(&site["state"]),
            s(&site["queued"]),
            s(&site["in_flight"]),
            format!("{}/{}", s(&c["in_use"]), s(&c["max"])),
            s(&site["rate_per_second"]),
            s(&site["last_reply"]).chars().take(60).collect::<String>(),
        );
    }
    println!();
    println!(
        "{:<40} {:>9} {:>6}  {:<9} SITE",
        "DOMAIN", "QUEUED", "HELD", "SUSPENDED"
    );
    for d in v["domains"].as_array().into_iter().flatten() {
        println!(
            "{:<40} {:>9} {:>6}  {:<9} {}",
            s(&d["domain"]),
            s(&d["queued"]),
            s(&d["held"]),
            if d["suspended"] == true { "yes" } else { "" },
            s(&d["site"]),
        );
    }
    let shown = v["domains"].as_array().map_or(0, Vec::len);
    let total = v["domain_count"].as_u64().unwrap_or(0) as usize;
    if total > shown {
        println!("… and {} more domains (--limit)", total - shown);
    }
    Ok(())
}

pub async fn queue(api: &Api) -> anyhow::Result<()> {
    let v = api.call(Method::GET, "/v1/queue", None).await?;
    if api.json {
        print_json(&v);
        return Ok(());
    }
    for key in [
        "queued",
        "in_flight",
        "held",
        "parked_for_paused_campaigns",
        "domains",
        "sites",
        "suspended_domains",
        "connections",
        "oldest_queued_seconds",
        "delivery",
    ] {
        println!("{key:<28} {}", s(&v[key]));
    }
    println!("{:<28} {}", "campaigns", v["campaigns"]);
    Ok(())
}

pub async fn set_domain(api: &Api, domain: &str, suspend: bool) -> anyhow::Result<()> {
    let action = if suspend { "suspend" } else { "resume" };
    let v = api
        .call(
            Method::POST,
            &format!("/v1/domains/{}/{action}", segment(domain)),
            None,
        )
        .await?;
    if api.json {
        print_json(&v);
    } else {
        println!(
            "{} {}; {} queued",
            s(&v["domain"]),
            if suspend { "suspended" } else { "resumed" },
            s(&v["queued"])
        );
    }
    Ok(())
}

pub async fn shaping(api: &Api, cmd: ShapingCommand) -> anyhow::Result<()> {
    match cmd {
        ShapingCommand::Lift { id } => {
            let v = api
                .call(
                    Method::DELETE,
                    &format!("/v1/shaping/{}", segment(&id)),
                    None,
                )
                .await?;
            if api.json {
                print_json(&v);
            } else {
                let a = &v["lifted"];
                println!(
                    "lifted {} ({} of {} at {})",
                    s(&a["id"]),
                    s(&a["kind"]),
                    s(&a["source"]),
                    s(&a["site_label"])
                );
            }
        }
        ShapingCommand::List => {
            let v = api.call(Method::GET, "/v1/shaping", None).await?;
            if api.json {
                print_json(&v);
                return Ok(());
            }
            println!(
                "{:<32} {:<9} {:<10} {:<28} {:<26} {:<21}  REPLY",
                "ID", "KIND", "SOURCE", "SITE", "RULE", "UNTIL"
            );
            for a in v["actions"].as_array().into_iter().flatten() {
                let kind = match (&a["message_rate"], &a["max_connections"]) {
                    (Value::Null, Value::Null) => s(&a["kind"]),
                    (r, c) => format!("{} {}/{}", s(&a["kind"]), s(r), s(c)),
                };
                println!(
                    "{:<32} {:<9} {:<10} {:<28} {:<26} {:<21}  {}",
                    s(&a["id"]),
                    kind,
                    s(&a["source"]),
                    s(&a["site_label"]),
                    s(&a["rule"]),
                    s(&a["expires_at"]),
                    s(&a["reply"]).chars().take(60).collect::<String>(),
                );
            }
            let aimd = v["aimd"].as_array().map_or(&[][..], Vec::as_slice);
            if !aimd.is_empty() {
                println!();
                println!(
                    "{:<10} {:<28} {:>10} {:>10} {:>6}  LAST REPLY",
                    "SOURCE", "SITE", "RATE/S", "CEILING/S", "CONN"
                );
                for a in aimd {
                    println!(
                        "{:<10} {:<28} {:>10} {:>10} {:>6}  {}",
                        s(&a["source"]),
                        s(&a["site_label"]),
                        s(&a["rate_per_second"]),
                        s(&a["ceiling_per_second"]),
                        s(&a["connections"]),
                        s(&a["reply"]).chars().take(60).collect::<String>(),
                    );
                }
            }
        }
    }
    Ok(())
}

pub async fn tenant(api: &Api, cmd: TenantCommand) -> anyhow::Result<()> {
    let v = match cmd {
        TenantCommand::List => api.all_pages("/v1/admin/tenants", "tenants").await?,
        TenantCommand::Add {
            name,
            sending_domains,
            pool,
            rate,
            daily_quota,
            max_queued,
            weight,
        } => {
            let mut body = json!({"name": name, "sending_domains": sending_domains});
            for (k, v) in [
                ("pool", pool.map(Value::from)),
                ("rate", rate.map(Value::from)),
                ("daily_quota", daily_quota.map(Value::from)),
                ("max_queued", max_queued.map(Value::from)),
                ("weight", weight.map(Value::from)),
            ] {
                if let Some(v) = v {
                    body[k] = v;
                }
            }
            api.call(Method::POST, "/v1/admin/tenants", Some(body))
                .await?
        }
        TenantCommand::Keys { tenant } => {
            let path = match tenant {
                Some(t) => format!("/v1/admin/keys?tenant={}", segment(&t)),
                None => "/v1/admin/keys".to_owned(),
            };
            api.all_pages(&path, "keys").await?
        }
        TenantCommand::KeyAdd { tenant, name } => {
            let body = json!({"tenant": tenant, "name": name});
            let v = api.call(Method::POST, "/v1/admin/keys", Some(body)).await?;
            if !api.json {
                println!("{}", s(&v["key"]));
                eprintln!(
                    "key {} of tenant {}: keep it now, it is not shown again",
                    s(&v["id"]),
                    s(&v["tenant"])
                );
                return Ok(());
            }
            v
        }
        TenantCommand::KeyRevoke { id } => {
            api.call(
                Method::DELETE,
                &format!("/v1/admin/keys/{}", segment(&id)),
                None,
            )
            .await?
        }
        TenantCommand::HashKey => return hash_key(),
    };
    if api.json {
        print_json(&v);
        return Ok(());
    }
    if let Some(list) = v["tenants"].as_array() {
        println!(
            "{:<20} {:<7} {:<32} {:<10} {:>8} {:>12} {:>12} {:>6}",
            "TENANT",
            "ORIGIN",
            "SENDING DOMAINS",
            "POOL",
            "RATE",
            "DAILY QUOTA",
            "USED TODAY",
            "WEIGHT"
        );
        for t in list {
            let domains = strings(&t["sending_domains"]);
            println!(
                "{:<20} {:<7} {:<32} {:<10} {:>8} {:>12} {:>12} {:>6}",
                s(&t["name"]),
                s(&t["origin"]),
                domains.join(","),
                s(&t["pool"]),
                s(&t["rate"]),
                s(&t["daily_quota"]),
                s(&t["used_today"]),
                s(&t["weight"]),
            );
        }
    } else if let Some(list) = v["keys"].as_array() {
        println!(
            "{:<17} {:<20} {:<24} {:<7} {:<25} LAST USED",
            "ID", "TENANT", "NAME", "ORIGIN", "CREATED"
        );
        for k in list {
            println!(
                "{:<17} {:<20} {:<24} {:<7} {:<25} {}",
                s(&k["id"]),
                s(&k["tenant"]),
                s(&k["name"]),
                s(&k["origin"]),
                s(&k["created_at"]),
                s(&k["last_used_at"]),
            );
        }
    } else if v["revoked"] == true {
        println!("revoked key {} of tenant {}", s(&v["id"]), s(&v["tenant"]));
    } else {
        println!("added tenant {}", s(&v["name"]));
    }
    Ok(())
}

/// `sluice tenant hash-key`: the key on stdin (one line) as `sha256:<hex>`.
pub fn hash_key() -> anyhow::Result<()> {
    let mut line = String::new();
    std::io::stdin()
        .read_line(&mut line)
        .context("reading the key from stdin")?;
    let key = line.trim();
    if key.is_empty() {
        bail!("give the key on stdin, e.g. echo \"$KEY\" | sluice tenant hash-key");
    }
    let hash = sluice::config::hash_key(key.as_bytes());
    let hex: String = hash.iter().map(|b| format!("{b:02x}")).collect();
    println!("sha256:{hex}");
    Ok(())
}

pub async fn sources(api: &Api) -> anyhow::Result<()> {
    let v = api.call(Method::GET, "/v1/sources", None).await?;
    if api.json {
        print_json(&v);
        return Ok(());
    }
    println!(
        "{:<12} {:<16} {:<28} {:<24} {:>7}  WARM-UP",
        "SOURCE", "ADDRESS", "EHLO", "POOLS", "ACTIONS"
    );
    for src in v["sources"].as_array().into_iter().flatten() {
        let pools: Vec<String> = src["pools"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|p| format!("{}:{}", s(&p["pool"]), s(&p["weight"])))
            .collect();
        let w = &src["warmup"];
        let warmup = if w.is_null() {
            "-".to_owned()
        } else if w["warm"] == true {
            format!("{} done (day {})", s(&w["schedule"]), s(&w["day"]))
        } else {
            let groups: Vec<String> = w["groups"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|g| {
                    format!(
                        "{} {}/{} today, {}/{} this hour",
                        s(&g["group"]),
                        s(&g["sent_today"]),
                        s(&g["per_day"]),
                        s(&g["sent_this_hour"]),
                        s(&g["per_hour"])
                    )
                })
                .collect();
            format!(
                "{} day {}/{}{}{}",
                s(&w["schedule"]),
                s(&w["day"]),
                s(&w["days"]),
                if groups.is_empty() { "" } else { ": " },
                groups.join("; ")
            )
        };
        println!(
            "{:<12} {:<16} {:<28} {:<24} {:>7}  {}",
            s(&src["name"]),
            s(&src["address"]),
            s(&src["ehlo_name"]),
            pools.join(","),
            s(&src["actions"]),
            warmup
        );
    }
    Ok(())
}

fn print_campaign(c: &Value) {
    let k = &c["counts"];
    println!(
        "{}  {:<9} {}  queued {} delivered {} deferred {} bounced {} expired {} suppressed {} complained {} unsubscribed {}",
        s(&c["id"]),
        s(&c["state"]),
        s(&c["created_at"]),
        s(&k["queued"]),
        s(&k["delivered"]),
        s(&k["deferred"]),
        s(&k["bounced"]),
        s(&k["expired"]),
        s(&k["suppressed"]),
        s(&k["complained"]),
        s(&k["unsubscribed"]),
    );
}

pub async fn campaign(api: &Api, cmd: CampaignCommand) -> anyhow::Result<()> {
    let v = match &cmd {
        CampaignCommand::List { limit } => {
            api.call(Method::GET, &format!("/v1/campaigns?limit={limit}"), None)
                .await?
        }
        CampaignCommand::Show { id } => {
            api.call(Method::GET, &format!("/v1/campaigns/{}", segment(id)), None)
                .await?
        }
        CampaignCommand::Pause { id }
        | CampaignCommand::Resume { id }
        | CampaignCommand::Cancel { id } => {
            let action = match cmd {
                CampaignCommand::Pause { .. } => "pause",
                CampaignCommand::Resume { .. } => "resume",
                _ => "cancel",
            };
            api.call(
                Method::POST,
                &format!("/v1/campaigns/{}/{action}", segment(id)),
                None,
            )
            .await?
        }
    };
    if api.json {
        print_json(&v);
    } else if let Some(list) = v["campaigns"].as_array() {
        for c in list {
            print_campaign(c);
        }
    } else {
        print_campaign(&v);
    }
    Ok(())
}

pub async fn message(api: &Api, cmd: MessageCommand) -> anyhow::Result<()> {
    let MessageCommand::Show { id } = cmd;
    let v = api
        .call(Method::GET, &format!("/v1/messages/{}", segment(&id)), None)
        .await?;
    if api.json {
        print_json(&v);
        return Ok(());
    }
    for key in [
        "id",
        "recipient",
        "state",
        "attempts",
        "accepted_at",
        "next_attempt_at",
        "final_at",
        "last_response",
        "campaign",
        "stream",
        "from",
        "subject",
    ] {
        if !v[key].is_null() {
            println!("{key:<16} {}", s(&v[key]));
        }
    }
    println!();
    println!(
        "{:<25} {:<16} {:>7}  {:<7}  REPLY",
        "TIME", "EVENT", "ATTEMPT", "STATUS"
    );
    for e in v["events"].as_array().into_iter().flatten() {
        let reply = match (&e["reply_code"], e["dsn_diag"].as_str()) {
            (_, Some(d)) => d.to_owned(),
            (Value::Null, None) => String::new(),
            (c, None) => c.to_string(),
        };
        println!(
            "{:<25} {:<16} {:>7}  {:<7}  {}",
            s(&e["time"]),
            s(&e["event"]),
            s(&e["attempt"]),
            s(&e["dsn_status"]),
            reply.chars().take(100).collect::<String>(),
        );
    }
    Ok(())
}

pub async fn suppressions(api: &Api, cmd: SuppressionCommand) -> anyhow::Result<()> {
    let v = match cmd {
        SuppressionCommand::List {
            limit,
            reason,
            cursor,
        } => {
            let mut path = format!("/v1/suppressions?limit={limit}");
            if let Some(r) = reason {
                path.push_str(&format!("&reason={}", segment(&r)));
            }
            if let Some(c) = cursor {
                path.push_str(&format!("&cursor={}", segment(&c)));
            }
            api.call(Method::GET, &path, None).await?
        }
        SuppressionCommand::Get { address } => {
            api.call(
                Method::GET,
                &format!("/v1/suppressions/{}", segment(&address)),
                None,
            )
            .await?
        }
        SuppressionCommand::Add {
            address,
            scope,
            reason,
        } => {
            let mut body = json!({"reason": reason});
            if let Some(sc) = scope {
                body["scope"] = json!(sc);
            }
            api.call(
                Method::PUT,
                &format!("/v1/suppressions/{}", segment(&address)),
                Some(body),
            )
            .await?
        }
        SuppressionCommand::Remove { address, scope } => {
            let mut path = format!("/v1/suppressions/{}", segment(&address));
            if let Some(sc) = scope {
                path.push_str(&format!("?scope={}", segment(&sc)));
            }
            api.call(Method::DELETE, &path, None).await?
        }
        SuppressionCommand::Import { file } => {
            let data = tokio::fs::read(&file)
                .await
                .with_context(|| format!("reading {}", file.display()))?;
            let ctype = if file.extension().is_some_and(|e| e == "csv") {
                "text/csv"
            } else {
                "application/x-ndjson"
            };
            api.send(
                api.request(Method::POST, "/v1/suppressions/import")
                    .header("content-type", ctype)
                    .body(data),
            )
            .await?
        }
        SuppressionCommand::Export { format, reason } => {
            let mut path = format!("/v1/suppressions/export?format={}", segment(&format));
            if let Some(r) = reason {
                path.push_str(&format!("&reason={}", segment(&r)));
            }
            let mut r = api
                .request(Method::GET, &path)
                .send()
                .await
                .context("reaching the Sluice API")?;
            if !r.status().is_success() {
                let status = r.status();
                let body: Value = r.json().await.unwrap_or(Value::Null);
                return Err(ApiFailure {
                    status,
                    retry_after: None,
                    body,
                }
                .into());
            }
            use std::io::Write;
            let mut out = std::io::stdout().lock();
            while let Some(chunk) = r.chunk().await.context("reading the export")? {
                out.write_all(&chunk)?;
            }
            return Ok(());
        }
    };
    print_json(&v);
    Ok(())
}

/// Whether progress goes to an interactive terminal (a bar) or a log (plain lines).
pub fn interactive() -> bool {
    std::io::stderr().is_terminal()
}
