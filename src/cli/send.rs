//! `sluice send --csv list.csv --template campaign.json`: creates a campaign from a template file
//! and streams the CSV's rows to it as NDJSON uploads, with progress and a summary.
//!
//! The CSV has a header row; the `email` column is the address and every other column becomes a
//! template variable of the same name. A row the CSV parser cannot read (wrong number of fields,
//! invalid UTF-8) or without an address is reported by its line number and skipped; the API
//! reports rows it refuses or finds suppressed, which are mapped back to line numbers too.
//! Each chunk of `--chunk` rows is one upload: accepted whole or not at all. Every request
//! carries an `Idempotency-Key`, so a chunk whose answer was lost (a dropped connection, a
//! timeout) or refused for now (429, 503, 507, a 5xx) is sent again, up to [`ATTEMPTS`] times,
//! without adding its rows twice.
//!
//! With several `--url`s (the nodes of a cluster), the campaign is created on the first and
//! the chunks go to the nodes in turn, once each node knows the campaign; each node delivers
//! the recipients it accepted.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use bytes::Bytes;
use clap::Args;
use reqwest::Method;
use serde_json::{Map, Value, json};

use super::Api;

#[derive(Args)]
pub struct SendArgs {
    /// The recipient list: a header row, an `email` column, other columns as variables.
    #[arg(long)]
    pub csv: PathBuf,
    /// The campaign as JSON, like the body of `POST /v1/campaigns` without `recipients`:
    /// {"from", "subject", "text"/"html", "reply_to", "headers", "tags", "priority", "weight",
    /// "send_at", "max_rate", ...}.
    #[arg(long)]
    pub template: PathBuf,
    /// Overrides the template's `from`.
    #[arg(long)]
    pub from: Option<String>,
    /// Overrides the template's `subject`.
    #[arg(long)]
    pub subject: Option<String>,
    /// Rows per upload; each upload is accepted whole or not at all.
    #[arg(long, default_value_t = 100_000)]
    pub chunk: usize,
}

/// A row that was not sent or not queued, for the summary.
struct Problem {
    line: u64,
    what: String,
}

#[derive(Default)]
struct Totals {
    rows: u64,
    accepted: u64,
    suppressed: u64,
    rejected: u64,
    malformed: Vec<Problem>,
    refused: Vec<Problem>,
    suppressed_rows: Vec<Problem>,
}

/// How many rows to list per kind in the summary.
const LIST: usize = 20;

/// Progress: a bar on a terminal, a line per tenth otherwise (logs, CI).
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    total: u64,
    done: u64,
    next_line: u64,
    started: Instant,
}

impl Progress {
    fn new(total: u64) -> Progress {
        let bar = super::interactive().then(|| {
            let b = indicatif::ProgressBar::new(total);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{elapsed_precise} [{bar:40}] {pos}/{len} rows ({per_sec}, {eta} left) {msg}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
                .progress_chars("=> "),
            );
            b
        });
        Progress {
            bar,
            total,
            done: 0,
            next_line: 0,
            started: Instant::now(),
        }
    }

    fn add(&mut self, n: u64) {
        self.done += n;
        match &self.bar {
            Some(b) => b.inc(n),
            None => {
                if self.done >= self.next_line || self.done == self.total {
                    eprintln!(
                        "sent {}/{} rows ({:.0} rows/s)",
                        self.done,
                        self.total,
                        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-3)
                    );
                    self.next_line = self.done + (self.total / 10).max(1);
                }
            }
        }
    }

    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn reader(path: &PathBuf) -> anyhow::Result<csv::Reader<std::fs::File>> {
    csv::ReaderBuilder::new()
        .has_headers(true)
        .flexible(false)
        .from_path(path)
        .with_context(|| format!("opening {}", path.display()))
}

fn row_error(e: &csv::Error) -> (u64, String) {
    let line = e.position().map_or(0, |p| p.line());
    let what = match e.kind() {
        csv::ErrorKind::UnequalLengths {
            expected_len, len, ..
        } => {
            format!("{len} fields where the header has {expected_len}")
        }
        csv::ErrorKind::Utf8 { .. } => "not valid UTF-8".into(),
        _ => e.to_string(),
    };
    (line, what)
}

/// Counts the rows to send (first pass, for the progress total).
fn count_rows(path: &PathBuf) -> anyhow::Result<u64> {
    let mut r = reader(path)?;
    let mut n = 0;
    let mut rec = csv::ByteRecord::new();
    loop {
        match r.read_byte_record(&mut rec) {
            Ok(true) => n += 1,
            Ok(false) => break,
            // Counted: the sending pass reports it.
            Err(e) if e.position().is_some() => n += 1,
            Err(e) => return Err(e).context("reading the CSV"),
        }
    }
    Ok(n)
}

pub async fn send(api: &Api, args: SendArgs) -> anyhow::Result<bool> {
    let text = tokio::fs::read_to_string(&args.template)
        .await
        .with_context(|| format!("reading {}", args.template.display()))?;
    let mut template: Map<String, Value> = serde_json::from_str(&text)
        .with_context(|| format!("{}: not a JSON object", args.template.display()))?;
    if template.contains_key("recipients") {
        bail!(
            "{}: remove `recipients`; they come from the CSV",
            args.template.display()
        );
    }
    if let Some(f) = args.from {
        template.insert("from".into(), json!(f));
    }
    if let Some(s) = args.subject {
        template.insert("subject".into(), json!(s));
    }
    if args.chunk == 0 {
        bail!("--chunk must be at least 1");
    }

    let path = args.csv.clone();
    let total = tokio::task::spawn_blocking(move || count_rows(&path)).await??;
    let mut csv = reader(&args.csv)?;
    let headers = csv.headers().context("reading the CSV header")?.clone();
    let Some(email_col) = headers
        .iter()
        .position(|h| h.trim().eq_ignore_ascii_case("email"))
    else {
        bail!(
            "{}: the header row has no `email` column (found: {})",
            args.csv.display(),
            headers.iter().collect::<Vec<_>>().join(", ")
        );
    };
    let names: Vec<String> = headers.iter().map(|h| h.trim().to_owned()).collect();

    template.insert("recipients".into(), json!([]));
    // This run's keys: the campaign's, and one per chunk after it.
    let run = uuid::Uuid::now_v7();
    let template = Bytes::from(serde_json::to_vec(&Value::Object(template))?);
    let created = retrying(&format!("sluice-send-{run}"), |key| {
        api.send(
            api.request(Method::POST, "/v1/campaigns")
                .header("content-type", "application/json")
                .header("idempotency-key", key)
                .body(template.clone()),
        )
    })
    .await
    .context("creating the campaign")?;
    let id = created["id"]
        .as_str()
        .context("the API answered without a campaign id")?
        .to_owned();
    eprintln!(
        "campaign {id}: sending {total} rows from {}",
        args.csv.display()
    );
    let nodes: Vec<Api> = api.urls.iter().map(|u| api.at(u)).collect();
    for node in nodes.iter().skip(1) {
        await_campaign(node, &id).await?;
    }

    let mut totals = Totals::default();
    let mut progress = Progress::new(total);
    let mut records = csv.into_records();
    let mut finished = false;
    let mut chunks = 0usize;
    while !finished {
        // One chunk: NDJSON lines and, per line, the CSV line it came from.
        let mut body = Vec::with_capacity(args.chunk.min(100_000) * 64);
        let mut lines: Vec<u64> = Vec::with_capacity(args.chunk.min(100_000));
        let mut read = 0u64;
        while lines.len() < args.chunk {
            let Some(rec) = records.next() else {
                finished = true;
                break;
            };
            read += 1;
            totals.rows += 1;
            let rec = match rec {
                Ok(r) => r,
                Err(e) => {
                    let (line, what) = row_error(&e);
                    totals.malformed.push(Problem { line, what });
                    continue;
                }
            };
            let line = rec.position().map_or(0, |p| p.line());
            let email = rec.get(email_col).unwrap_or("").trim();
            if email.is_empty() {
                totals.malformed.push(Problem {
                    line,
                    what: "no address in the email column".into(),
                });
                continue;
            }
            let mut vars = Map::new();
            for (i, v) in rec.iter().enumerate() {
                if i != email_col {
                    vars.insert(names[i].clone(), json!(v));
                }
            }
            serde_json::to_writer(&mut body, &json!({"email": email, "vars": vars}))?;
            body.push(b'\n');
            lines.push(line);
        }
        if lines.is_empty() {
            progress.add(read);
            continue;
        }
        let node = &nodes[chunks % nodes.len()];
        chunks += 1;
        let body = Bytes::from(body);
        let mut progress = Some(&mut progress);
        let answer = retrying(&format!("sluice-send-{run}-{chunks}"), |key| {
            upload(node, &id, key, body.clone(), read, progress.take())
        })
        .await
        .with_context(|| {
            format!(
                "uploading rows up to line {} to {}; campaign {id} holds {} rows accepted \
                     before",
                lines.last().copied().unwrap_or(0),
                node.base,
                totals.accepted
            )
        })?;
        totals.accepted += answer["accepted"].as_u64().unwrap_or(0);
        totals.suppressed += answer["suppressed_count"].as_u64().unwrap_or(0);
        totals.rejected += answer["rejected_count"].as_u64().unwrap_or(0);
        let line_of = |v: &Value| {
            v["index"]
                .as_u64()
                .and_then(|i| lines.get(i as usize).copied())
                .unwrap_or(0)
        };
        for r in answer["rejected"].as_array().into_iter().flatten() {
            // `line 12.email` or `line 12.vars.name`: the upload's line, then the field.
            let field = r["field"].as_str().unwrap_or("");
            let field = field.split_once('.').map_or("", |(_, f)| f);
            totals.refused.push(Problem {
                line: line_of(r),
                what: format!(
                    "refused: {}{}",
                    if field.is_empty() {
                        String::new()
                    } else {
                        format!("{field}: ")
                    },
                    r["error"].as_str().unwrap_or("")
                ),
            });
        }
        for r in answer["suppressed"].as_array().into_iter().flatten() {
            totals.suppressed_rows.push(Problem {
                line: line_of(r),
                what: format!(
                    "suppressed ({}): {}",
                    r["reason"].as_str().unwrap_or("?"),
                    r["email"].as_str().unwrap_or("")
                ),
            });
        }
    }
    progress.finish();
    summary(&id, &totals);
    Ok(totals.malformed.is_empty() && totals.rejected == 0)
}

/// How long another node of the cluster may take to learn of a campaign created on the first.
const CAMPAIGN_SPREAD: Duration = Duration::from_secs(10);

/// Waits until `node` knows campaign `id` (created on another node of its cluster).
async fn await_campaign(node: &Api, id: &str) -> anyhow::Result<()> {
    let started = Instant::now();
    loop {
        let r = node
            .request(Method::GET, &format!("/v1/campaigns/{id}"))
            .send()
            .await
            .with_context(|| format!("reaching the Sluice API at {}", node.base))?;
        if r.status().is_success() {
            return Ok(());
        }
        if r.status() != reqwest::StatusCode::NOT_FOUND || started.elapsed() > CAMPAIGN_SPREAD {
            bail!(
                "{} does not know campaign {id} ({}): is it a node of the same cluster?",
                node.base,
                r.status()
            );
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Tries a request up to this many times.
const ATTEMPTS: u32 = 5;

/// Runs `request` with idempotency key `key` until it succeeds, it fails for good, or
/// [`ATTEMPTS`] are used: a request that failed for now (no answer, 408, 409 while the key's
/// first try is still in progress, 429, a 5xx) waits (its `Retry-After`, else 1, 2, 4, 8 s)
/// and goes again with the same key.
async fn retrying<F, Fut>(key: &str, mut request: F) -> anyhow::Result<Value>
where
    F: FnMut(String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<Value>>,
{
    let mut attempt = 1;
    loop {
        let err = match request(key.to_owned()).await {
            Ok(v) => return Ok(v),
            Err(e) => e,
        };
        let wait = match err.downcast_ref::<super::ApiFailure>() {
            Some(f) if !f.transient() => return Err(err),
            Some(f) => f.retry_after,
            None => None,
        };
        if attempt == ATTEMPTS {
            return Err(err.context(format!("gave up after {ATTEMPTS} tries")));
        }
        let wait = wait
            .unwrap_or(Duration::from_secs(1 << (attempt - 1)))
            .min(Duration::from_secs(60));
        eprintln!("{err:#}; trying again in {} s", wait.as_secs_f32());
        tokio::time::sleep(wait).await;
        attempt += 1;
    }
}

/// Streams one chunk as an NDJSON upload with idempotency key `key`, advancing the progress (if
/// given) as pieces go out.
async fn upload(
    api: &Api,
    id: &str,
    key: String,
    body: Bytes,
    rows: u64,
    mut progress: Option<&mut Progress>,
) -> anyhow::Result<Value> {
    // Pieces of about 64 KiB; the progress moves by the share of rows each piece carries.
    let len = body.len().max(1);
    let pieces: Vec<Bytes> = (0..body.len())
        .step_by(64 * 1024)
        .map(|at| body.slice(at..(at + 64 * 1024).min(body.len())))
        .collect();
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<u64>();
    let mut sent_rows = 0u64;
    let mut sent_bytes = 0usize;
    let stream = futures_util::stream::iter(pieces.into_iter().map(move |p| {
        sent_bytes += p.len();
        let now = rows * sent_bytes as u64 / len as u64;
        let _ = tx.send(now - sent_rows);
        sent_rows = now;
        Ok::<Bytes, std::io::Error>(p)
    }));
    let req = api
        .request(Method::POST, &format!("/v1/campaigns/{id}/recipients"))
        .header("content-type", "application/x-ndjson")
        .header("idempotency-key", key)
        .timeout(Duration::from_secs(3600))
        .body(reqwest::Body::wrap_stream(stream));
    let call = api.send(req);
    tokio::pin!(call);
    let mut reported = 0u64;
    let mut report = |n: u64| {
        reported += n;
        if let Some(p) = progress.as_deref_mut().filter(|_| n > 0) {
            p.add(n);
        }
        reported
    };
    let answer = loop {
        tokio::select! {
            r = &mut call => break r,
            Some(n) = rx.recv() => {
                report(n);
            }
        }
    };
    let mut sent = report(0);
    while let Ok(n) = rx.try_recv() {
        sent = report(n);
    }
    // Rows of a short or failed upload not yet reported as sent are done now.
    report(rows.saturating_sub(sent));
    answer
}

fn summary(id: &str, t: &Totals) {
    println!("campaign {id}");
    println!(
        "rows {}: accepted {}, suppressed {}, refused {}, malformed {}",
        t.rows,
        t.accepted,
        t.suppressed,
        t.rejected,
        t.malformed.len()
    );
    for (kind, list, count) in [
        ("malformed: ", &t.malformed, t.malformed.len() as u64),
        ("", &t.refused, t.rejected),
        ("", &t.suppressed_rows, t.suppressed),
    ] {
        for p in list.iter().take(LIST) {
            println!("line {}: {kind}{}", p.line, p.what);
        }
        let shown = LIST.min(list.len()) as u64;
        if count > shown {
            println!("… and {} more", count - shown);
        }
    }
}
