//! Helpers shared by the end-to-end tests: an in-process node on 127.0.0.1:0 with its own spool,
//! and the `sluice` binary started as a process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod nsd;
pub mod redis;
pub mod sink;
pub mod smtp;

use sink::Sink;

use serde_json::{Value, json};
use sluice::config::{Config, Route};
use sluice::server::Running;

pub const KEY: &str = "test-key-0123456789";

pub fn config(spool: &Path) -> Config {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n[spool]\npath = \"{}\"\n[log]\nlevel = \"warn\"\ndelivery_log = \"{}\"\n[delivery]\nenabled = false\n",
        spool.display(),
        spool.join("delivery.jsonl").display()
    );
    Config::from_toml("test.toml", &text, None).expect("test config is valid")
}

/// Starts a node in-process and waits until it is ready.
pub async fn start(config: Config) -> Running {
    let running = sluice::server::start(Arc::new(config))
        .await
        .expect("node starts");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !running.node.is_ready() {
        assert!(Instant::now() < deadline, "node not ready after 30 s");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    running
}

pub fn client() -> reqwest::Client {
    // reqwest is built without a bundled TLS provider; ring is the one Sluice uses.
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client builds")
}

pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// The `/metrics` text.
pub async fn metrics(addr: SocketAddr) -> String {
    client()
        .get(url(addr, "/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// The value of the first sample of `name` whose labels contain `labels` (`site="x"`, or
/// several in the exposition's order, `a="1",b="2"`), if any.
pub fn metric_value(text: &str, name: &str, labels: &str) -> Option<f64> {
    text.lines()
        .find(|l| {
            l.strip_prefix(name)
                .is_some_and(|rest| rest.starts_with(['{', ' ']) && rest.contains(labels))
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// An authenticated GET: status and JSON body (`null` when there is none).
pub async fn get_json(addr: SocketAddr, path: &str) -> (u16, Value) {
    let r = client()
        .get(url(addr, path))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    (status, r.json().await.unwrap_or(Value::Null))
}

/// An authenticated POST of `body` as `content_type`: status, response headers and JSON body
/// (`null` when there is none).
pub async fn post_body(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    post_body_as(addr, KEY, path, content_type, body).await
}

/// [`post_body`] with API key `key`.
pub async fn post_body_as(
    addr: SocketAddr,
    key: &str,
    path: &str,
    content_type: &str,
    body: impl Into<reqwest::Body>,
) -> (u16, reqwest::header::HeaderMap, Value) {
    let r = client()
        .post(url(addr, path))
        .bearer_auth(key)
        .header("content-type", content_type)
        .body(body)
        .send()
        .await
        .expect("request");
    let status = r.status().as_u16();
    let headers = r.headers().clone();
    (status, headers, r.json().await.unwrap_or(Value::Null))
}

/// An authenticated POST of JSON: status and JSON body.
pub async fn post_json(addr: SocketAddr, path: &str, body: &Value) -> (u16, Value) {
    let (status, _, body) = post_body(addr, path, "application/json", body.to_string()).await;
    (status, body)
}

/// A webhook receiver on 127.0.0.1 (`/hook`) that keeps every event it is sent, answering 204.
pub async fn event_receiver(events: Arc<std::sync::Mutex<Vec<Value>>>) -> SocketAddr {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let events = Arc::clone(&events);
            async move {
                let batch: Vec<Value> = serde_json::from_slice(&body).unwrap();
                events.lock().unwrap().extend(batch);
                axum::http::StatusCode::NO_CONTENT
            }
        }),
    );
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    addr
}

/// Prints a benchmark's metrics as a table and writes them to `target/bench/<name>.csv`.
pub fn report(name: &str, title: &str, rows: &[(&str, String)]) {
    println!("\n{title}");
    println!("{:<42} {:>14}", "metric", "value");
    for (k, v) in rows {
        println!("{k:<42} {v:>14}");
    }
    let csv: String = std::iter::once("metric,value\n".to_owned())
        .chain(rows.iter().map(|(k, v)| format!("{k},{v}\n")))
        .collect();
    let out_dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench");
    std::fs::create_dir_all(&out_dir).expect("create target/bench");
    std::fs::write(out_dir.join(format!("{name}.csv")), csv).expect("write the CSV");
}

/// Record counts of every column family, to assert that a refused request changed nothing.
/// Live and final jobs are counted together: delivery moves jobs from one to the other meanwhile.
pub async fn spool_counts(running: &Running) -> Vec<(String, usize)> {
    use sluice::store::spool::{
        CF_CAMPAIGNS, CF_FINALS, CF_IDEMPOTENCY, CF_JOBS, CF_META, CF_TALLIES,
    };
    let node = Arc::clone(&running.node);
    tokio::task::spawn_blocking(move || {
        let cfs = [
            CF_CAMPAIGNS,
            CF_JOBS,
            CF_FINALS,
            CF_TALLIES,
            CF_META,
            CF_IDEMPOTENCY,
        ];
        let n = node.spool.count_keys_together(&cfs).expect("count");
        vec![
            (CF_CAMPAIGNS.to_owned(), n[0]),
            ("jobs+finals".to_owned(), n[1] + n[2]),
            (CF_TALLIES.to_owned(), n[3]),
            (CF_META.to_owned(), n[4]),
            (CF_IDEMPOTENCY.to_owned(), n[5]),
        ]
    })
    .await
    .expect("count task")
}

/// A node that delivers, with static routes from `sink.test` to `sink`, retrying fast.
pub fn delivery_config(dir: &std::path::Path, sink: &Sink) -> Config {
    let mut cfg = config(dir);
    cfg.delivery.enabled = true;
    cfg.delivery.retry_initial = Duration::from_millis(300);
    cfg.delivery.retry_max = Duration::from_secs(2);
    cfg.delivery.site_backoff = Duration::from_millis(300);
    cfg.log.delivery_log = dir.join("delivery.jsonl");
    cfg.routes.push(Route {
        domain: "sink.test".into(),
        relay: sink.addr.to_string(),
    });
    cfg
}

/// Posts a small templated campaign from news@example.com; returns its id.
pub async fn post_campaign(addr: std::net::SocketAddr, recipients: Vec<Value>) -> String {
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(&json!({"from": "news@example.com", "subject": "Hello {{ name }}", "text": "Hi {{ name }}.\n.dot line\n",
                      "recipients": recipients}))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 202);
    r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// The trace token (`X-Sluice-Ref`) of a captured message.
pub fn trace_token(data: &str) -> String {
    data.lines()
        .find_map(|l| l.strip_prefix("X-Sluice-Ref: "))
        .expect("trace header")
        .trim()
        .to_owned()
}

/// A report from `tests/data/reports/<name>.eml` (its first line is a comment) about a message
/// sent from `verp` to `rcpt` whose trace token was `reference`.
pub fn report_eml(name: &str, verp: &str, rcpt: &str, reference: &str) -> Vec<u8> {
    let text = std::fs::read_to_string(format!(
        "{}/tests/data/reports/{name}.eml",
        env!("CARGO_MANIFEST_DIR")
    ))
    .unwrap();
    let (_, rest) = text.split_once('\n').unwrap();
    rest.replace("{{VERP}}", verp)
        .replace("{{RCPT}}", rcpt)
        .replace("{{REF}}", reference)
        .replace("{{FEEDBACK}}", "fbl@example.com")
        .into_bytes()
}

/// `n` of `<user{n}@sink.test>` (the sink hands over the address in angle brackets or bare).
pub fn index_of(rcpt: &str) -> usize {
    rcpt.trim_start_matches('<')
        .trim_start_matches("user")
        .split('@')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(usize::MAX)
}

/// `user{i}@sink.test` with a `name` variable.
pub fn recipients(n: usize) -> Vec<Value> {
    (0..n).map(|i| json!({"email": format!("user{i}@sink.test"), "vars": {"name": format!("User {i}")}})).collect()
}

/// Polls the campaign until `done(counts)` or the timeout.
pub async fn wait_counts(
    addr: std::net::SocketAddr,
    id: &str,
    within: Duration,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let started = Instant::now();
    loop {
        let got: Value = client()
            .get(url(addr, &format!("/v1/campaigns/{id}")))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        if done(&got["counts"]) {
            return got["counts"].clone();
        }
        assert!(
            started.elapsed() < within,
            "timed out; counts now {}",
            got["counts"]
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// The delivery log's records.
/// The delivery log's records, once it has stopped growing: its thread writes what it gathered
/// every 20 ms, so a record may follow the counts it reports by that much.
pub fn log_records(dir: &std::path::Path) -> Vec<Value> {
    let read = || -> Vec<Value> {
        std::fs::read_to_string(dir.join("delivery.jsonl"))
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).expect("log line is JSON"))
            .collect()
    };
    let mut records = read();
    for _ in 0..20 {
        std::thread::sleep(Duration::from_millis(60));
        let again = read();
        if again.len() == records.len() {
            break;
        }
        records = again;
    }
    records
}

/// The delivery log is written by its own thread; wait until it has `n` records.
/// The delivery log's records once it holds at least `n` of type `kind` (the log is written on
/// its own thread, a moment after the counts move), or after 2 s.
pub async fn wait_log_kind(dir: &std::path::Path, kind: &str, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let r = log_records(dir);
        if r.iter().filter(|r| r["type"] == kind).count() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log_records(dir)
}

pub async fn wait_log(dir: &std::path::Path, n: usize) -> Vec<Value> {
    for _ in 0..200 {
        let r = log_records(dir);
        if r.len() >= n {
            return r;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    log_records(dir)
}

/// The `sluice` binary running as a child process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Writes a config for `spool` and starts `sluice serve`; returns once the API is listening.
    pub fn spawn(dir: &Path, spool: &Path) -> Process {
        Process::spawn_with(dir, spool, "[delivery]\nenabled = false\n")
    }

    /// Like [`Process::spawn`], with `more` TOML (which must include a `[delivery]` table).
    pub fn spawn_with(dir: &Path, spool: &Path, more: &str) -> Process {
        let cfg = dir.join("sluice.toml");
        std::fs::write(
            &cfg,
            format!(
                "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n[spool]\npath = \"{}\"\n[log]\nlevel = \"info\"\ndelivery_log = \"{}\"\n{more}",
                spool.display(),
                dir.join("delivery.jsonl").display()
            ),
        )
        .expect("write config");
        let mut child = Command::new(env!("CARGO_BIN_EXE_sluice"))
            .args(["serve", "--config"])
            .arg(&cfg)
            .env_remove("RUST_LOG")
            .env_remove("SLUICE_API_KEYS")
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn sluice");
        let stderr = child.stderr.take().expect("stderr piped");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut sent = false;
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if !sent && let Some(rest) = line.split("http_addr=").nth(1) {
                    let addr = rest.split_whitespace().next().unwrap_or("").to_owned();
                    let _ = tx.send(addr);
                    sent = true;
                }
                if std::env::var_os("SLUICE_TEST_VERBOSE").is_some() {
                    eprintln!("[sluice] {line}");
                }
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(60))
            .expect("sluice printed its address");
        Process {
            child,
            addr: addr.parse().expect("address parses"),
        }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM (graceful stop); returns its exit status once it has exited.
    pub fn terminate(&mut self, within: Duration) -> std::process::ExitStatus {
        self.send_term();
        self.wait_exit(within)
    }

    pub fn send_term(&self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
    }

    /// Waits for the process to exit; panics after `within`.
    pub fn wait_exit(&mut self, within: Duration) -> std::process::ExitStatus {
        let started = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                return status;
            }
            assert!(
                started.elapsed() < within,
                "not stopped within {within:?} of SIGTERM"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until `/readyz` answers 200; returns how long that took.
    pub async fn wait_ready(&self, within: Duration) -> Duration {
        let started = Instant::now();
        let c = client();
        loop {
            if let Ok(r) = c.get(url(self.addr, "/readyz")).send().await
                && r.status() == 200
            {
                return started.elapsed();
            }
            assert!(started.elapsed() < within, "not ready within {within:?}");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.kill();
    }
}

/// An egress source at `address` with EHLO name `<name>.mta.test`.
pub fn egress_source(name: &str, address: &str) -> sluice::config::SourceConfig {
    sluice::config::SourceConfig {
        name: name.into(),
        address: address.parse().expect("an IP address"),
        ehlo_name: Some(format!("{name}.mta.test")),
        warmup: None,
        warmup_start: None,
    }
}

/// Waits until the spool's column families `cfs` hold `want` keys between them, in order, and
/// returns. Counts in memory lead the delivery's outcome writes by up to one batch, so a test
/// that saw a count reach its value waits here before it looks at the spool.
pub async fn wait_keys(node: &Running, cfs: &'static [&'static str], want: &[usize]) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let n = Arc::clone(&node.node);
        let got = tokio::task::spawn_blocking(move || n.spool.count_keys_together(cfs).unwrap())
            .await
            .unwrap();
        if got == want {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the spool holds {got:?} keys in {cfs:?}, not {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
