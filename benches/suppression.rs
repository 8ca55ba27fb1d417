//! Suppression benchmark, against references measured in the same run:
//!
//! * importing 1,000,000 suppressions as CSV over HTTP (target ≤ 10 s);
//! * the NDJSON ingest rate with those 1,000,000 loaded against the rate with none (target ≥ 80%);
//!   none of the ingested recipients is suppressed, so both runs write every recipient and the
//!   difference is the lookup;
//! * one in-memory check against a 1,000,000-entry index (target well under a microsecond).
//!
//! `cargo bench --bench suppression` (`SLUICE_BENCH_SUPPRESSIONS=N`, `SLUICE_BENCH_RECIPIENTS=N`).
//! Writes `target/bench/suppression.csv`.

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::{KEY, Process, client, url};
use serde_json::{Value, json};

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(
        env_or("SLUICE_BENCH_SUPPRESSIONS", 1_000_000),
        env_or("SLUICE_BENCH_RECIPIENTS", 300_000),
    ));
}

fn chunks(body: Vec<u8>) -> reqwest::Body {
    let pieces: Vec<Result<Vec<u8>, std::io::Error>> =
        body.chunks(256 * 1024).map(|c| Ok(c.to_vec())).collect();
    reqwest::Body::wrap_stream(futures_util::stream::iter(pieces))
}

/// Creates a campaign and streams `n` recipients to it; recipients/s.
async fn ingest(addr: std::net::SocketAddr, n: u64, round: u64) -> f64 {
    let r = client()
        .post(url(addr, "/v1/campaigns"))
        .bearer_auth(KEY)
        .json(&json!({"from": "news@example.com", "subject": "Hi {{ first_name }}", "text": "Hello {{ first_name }}"}))
        .send()
        .await
        .unwrap();
    let id = r.json::<Value>().await.unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let mut body = Vec::with_capacity(n as usize * 80);
    for i in 0..n {
        body.extend_from_slice(
            format!(
                "{{\"email\":\"r{round}u{i:07}@d{:03}.example\",\"vars\":{{\"first_name\":\"F{i}\"}}}}\n",
                i % 1000
            )
            .as_bytes(),
        );
    }
    let started = Instant::now();
    let resp = client()
        .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
        .bearer_auth(KEY)
        .header("content-type", "application/x-ndjson")
        .body(chunks(body))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let out: Value = resp.json().await.unwrap();
    let secs = started.elapsed().as_secs_f64();
    assert_eq!(status, 202, "{out}");
    assert_eq!(out["accepted"].as_u64(), Some(n), "{out}");
    n as f64 / secs
}

async fn run(suppressions: u64, recipients: u64) {
    let dir = tempfile::tempdir().unwrap();
    let spool = dir.path().join("spool");
    let server = Process::spawn(dir.path(), &spool);
    server.wait_ready(Duration::from_secs(30)).await;

    eprintln!("ingest with no suppressions ({recipients} recipients, twice)...");
    let none = ingest(server.addr, recipients, 0)
        .await
        .max(ingest(server.addr, recipients, 1).await);

    let mut csv = Vec::with_capacity(suppressions as usize * 40);
    csv.extend_from_slice(b"address,reason,scope\n");
    for i in 0..suppressions {
        let reason = ["hard_bounce", "complaint", "unsubscribe", "manual"][(i % 4) as usize];
        let scope = if i % 3 == 0 {
            "news.example.com"
        } else {
            "global"
        };
        csv.extend_from_slice(
            format!("s{i:07}@d{:03}.example,{reason},{scope}\n", i % 1000).as_bytes(),
        );
    }
    eprintln!(
        "importing {suppressions} suppressions ({} bytes)...",
        csv.len()
    );
    let started = Instant::now();
    let resp = client()
        .post(url(server.addr, "/v1/suppressions/import"))
        .bearer_auth(KEY)
        .header("content-type", "text/csv")
        .body(chunks(csv))
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let out: Value = resp.json().await.unwrap();
    let import_secs = started.elapsed().as_secs_f64();
    assert_eq!(status, 200, "{out}");
    assert_eq!(out["imported"].as_u64(), Some(suppressions), "{out}");

    eprintln!("ingest with {suppressions} suppressions loaded (twice)...");
    let loaded = ingest(server.addr, recipients, 2)
        .await
        .max(ingest(server.addr, recipients, 3).await);
    drop(server);

    // The index alone: the check ingest and delivery make per recipient.
    let index = sluice::effects::suppression::Suppressions::default();
    for i in 0..suppressions {
        index.insert(&sluice::effects::suppression::Entry {
            address: format!("s{i:07}@d{:03}.example", i % 1000),
            scope: sluice::effects::suppression::GLOBAL.into(),
            reason: sluice::effects::suppression::Reason::Manual,
            created_at_ms: 0,
            source: None,
            campaign: None,
            job: None,
            category: None,
            detail: None,
        });
    }
    let probes: Vec<String> = (0..1_000_000u64)
        .map(|i| {
            if i % 2 == 0 {
                format!(
                    "s{:07}@d{:03}.example",
                    i % suppressions,
                    (i % suppressions) % 1000
                )
            } else {
                format!("r9u{i:07}@d{:03}.example", i % 1000)
            }
        })
        .collect();
    let started = Instant::now();
    let mut hits = 0u64;
    for p in &probes {
        hits += u64::from(
            index
                .check(std::hint::black_box(p), "news.example.com", "default")
                .is_some(),
        );
    }
    let check_ns = started.elapsed().as_nanos() as f64 / probes.len() as f64;
    assert_eq!(hits, 500_000);

    let rows = [
        ("suppressions", suppressions.to_string()),
        ("import_seconds", format!("{import_secs:.2}")),
        (
            "import_rows_per_s",
            format!("{:.0}", suppressions as f64 / import_secs),
        ),
        ("ingest_rcpt_per_s_no_suppressions", format!("{none:.0}")),
        (
            "ingest_rcpt_per_s_with_suppressions",
            format!("{loaded:.0}"),
        ),
        ("ratio_with_to_without", format!("{:.3}", loaded / none)),
        ("index_check_ns", format!("{check_ns:.0}")),
    ];
    common::report("suppression", "suppression benchmark", &rows);
}
