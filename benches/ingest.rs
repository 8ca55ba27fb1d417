//! Ingest benchmark: 1,000,000 recipients (about 60 bytes of variables each) streamed as NDJSON to
//! a `sluice` process, against a reference measured in the same run: the spool's own write path
//! (the same job records written through the writer thread, no HTTP, no parsing).
//!
//! Reports recipients/s for both and their ratio, resident memory growth per queued recipient, and
//! the time to `/readyz` after a SIGKILL and restart with everything queued. Writes
//! `target/bench/ingest.csv`.
//!
//! `cargo bench --bench ingest` (`SLUICE_BENCH_RECIPIENTS=N` to change the count).

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{KEY, Process, client, url};
use serde_json::{Value, json};
use sluice::store::spool::{Durability, JobId, JobRecord, JobState, Spool};

fn line(i: u64) -> String {
    format!(
        "{{\"email\":\"user{i:07}@d{:03}.example\",\"vars\":{{\"first_name\":\"Firstname{}\",\"last_name\":\"Lastname\",\"id\":\"{i:08}\"}}}}\n",
        i % 1000,
        i % 97
    )
}

fn rss_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

/// The reference: the same job records, already encoded, written through the spool's writer
/// thread in batches of 4096, then one synced batch.
async fn reference(n: u64, dir: &std::path::Path) -> f64 {
    // Records are encoded before the clock starts: this is the storage limit alone.
    let records: Vec<Vec<u8>> = (0..n)
        .map(|i| {
            let l = line(i);
            let v: Value = serde_json::from_str(&l).unwrap();
            let vars = v["vars"].to_string();
            let address = v["email"].as_str().unwrap().to_owned();
            JobRecord {
                state: JobState::Queued,
                upload: 1,
                accepted_at_ms: 1,
                attempts: 0,
                next_attempt_ms: 1,
                address: &address,
                vars: &vars,
                last_response: "",
            }
            .encode()
        })
        .collect();
    let spool = Spool::open(&dir.join("reference")).expect("open reference spool");
    let started = Instant::now();
    let mut batch = spool.batch();
    let mut pending = Vec::new();
    for (i, rec) in records.iter().enumerate() {
        batch.put_job(
            JobId {
                campaign: 1,
                index: i as u32,
            },
            rec,
        );
        if batch.len() == 4096 {
            let full = std::mem::replace(&mut batch, spool.batch());
            pending.push(spool.submit(full, Durability::Buffered).await.unwrap());
        }
    }
    spool.write(batch, Durability::Sync).await.unwrap();
    for p in pending {
        p.wait().await.unwrap();
    }
    let secs = started.elapsed().as_secs_f64();
    spool.close().await.unwrap();
    n as f64 / secs
}

fn main() {
    // `cargo bench` passes --bench; nothing else to parse.
    let n: u64 = std::env::var("SLUICE_BENCH_RECIPIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(n));
}

async fn run(n: u64) {
    let dir = tempfile::tempdir().unwrap();
    eprintln!("generating {n} NDJSON lines...");
    let mut body = Vec::with_capacity(n as usize * 110);
    for i in 0..n {
        body.extend_from_slice(line(i).as_bytes());
    }
    eprintln!(
        "{} bytes, {:.1} bytes/line",
        body.len(),
        body.len() as f64 / n as f64
    );

    let reference_rate = reference(n, dir.path()).await;

    let spool = dir.path().join("spool");
    let mut server = Process::spawn(dir.path(), &spool);
    server.wait_ready(Duration::from_secs(30)).await;
    let pid = server.child.id();
    let r = client()
        .post(url(server.addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(&json!({"from": "news@example.com", "subject": "Hi {{ first_name }}", "text": "Hello {{ first_name }} {{ last_name }}"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let rss_before = rss_kib(pid, "VmRSS:");

    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    drop(body);
    let started = Instant::now();
    let resp = client()
        .post(url(server.addr, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
            pieces,
        )))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let out: Value = resp.json().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(status, 202, "{out}");
    assert_eq!(out["accepted"].as_u64(), Some(n), "{out}");
    let rate = n as f64 / secs;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let rss_after = rss_kib(pid, "VmRSS:");
    let hwm = rss_kib(pid, "VmHWM:");
    let per_recipient = (rss_after.saturating_sub(rss_before) * 1024) as f64 / n as f64;

    server.kill();
    let server = Process::spawn(dir.path(), &spool);
    let ready = server.wait_ready(Duration::from_secs(120)).await;
    let got: Value = client()
        .get(url(server.addr, &format!("/v1/campaigns/{id}")))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(got["counts"]["queued"].as_u64(), Some(n), "{got}");
    drop(server);

    let rows = [
        ("ndjson_ingest_recipients_per_s", format!("{rate:.0}")),
        (
            "reference_spool_write_recipients_per_s",
            format!("{reference_rate:.0}"),
        ),
        (
            "ratio_ingest_to_reference",
            format!("{:.3}", rate / reference_rate),
        ),
        (
            "rss_growth_bytes_per_queued_recipient",
            format!("{per_recipient:.0}"),
        ),
        ("rss_before_kib", rss_before.to_string()),
        ("rss_after_kib", rss_after.to_string()),
        ("rss_peak_kib", hwm.to_string()),
        (
            "rss_peak_growth_bytes_per_queued_recipient",
            format!(
                "{:.0}",
                (hwm.saturating_sub(rss_before) * 1024) as f64 / n as f64
            ),
        ),
        (
            "readyz_after_restart_s",
            format!("{:.3}", ready.as_secs_f64()),
        ),
    ];
    common::report(
        "ingest",
        &format!("ingest benchmark, {n} recipients"),
        &rows,
    );
}
