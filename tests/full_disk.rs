//! Full disk: the spool on a small tmpfs that fills up while a campaign is being delivered.
//!
//! Below `spool.min_free_bytes` ingest answers 507 and writes nothing; with the filesystem
//! completely full RocksDB's own writes fail (delivery outcomes), delivery waits rather than
//! send mail it cannot record, and once space is freed both resume by themselves: every accepted
//! recipient is delivered and the refused requests left no trace. Needs root (mounts a tmpfs).

mod common;

use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::{Value, json};

/// A tmpfs of `mib` MiB mounted at `path`, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, mib: u64) -> Tmpfs {
        std::fs::create_dir_all(path).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(path)
            .output()
            .expect("run mount");
        assert!(
            out.status.success(),
            "mounting a {mib} MiB tmpfs at {} failed (this test needs root): {}",
            path.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(path.to_owned())
    }

    fn free(&self) -> u64 {
        let out = Command::new("df")
            .args(["--output=avail", "-B1"])
            .arg(&self.0)
            .output()
            .expect("run df");
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .nth(1)
            .and_then(|l| l.trim().parse().ok())
            .expect("df prints the free bytes")
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Grows `file` until the filesystem has at most `leave` bytes free (0: until it is full).
fn fill(fs: &Tmpfs, file: &Path, leave: u64) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(file)
        .unwrap();
    let mut chunk = 1 << 20;
    while fs.free() > leave {
        let want = if leave == 0 {
            chunk
        } else {
            chunk.min((fs.free() - leave) as usize).max(4096)
        };
        if f.write_all(&vec![0x5a; want])
            .and_then(|()| f.flush())
            .is_err()
        {
            if chunk == 4096 {
                break;
            }
            chunk = 4096;
        }
    }
}

/// POSTs JSON: status, body, and whether a `Retry-After` came with it.
async fn post(addr: std::net::SocketAddr, path: &str, body: Value) -> (u16, Value, bool) {
    let (status, headers, body) = post_body(addr, path, "application/json", body.to_string()).await;
    (status, body, headers.contains_key("retry-after"))
}

fn campaign(prefix: &str, n: usize) -> Value {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("{prefix}{i}@sink.test"), "vars": {"name": "N"}}))
        .collect();
    json!({"from": "news@example.com", "subject": "Hello {{ name }}", "text": "Hi {{ name }}",
           "recipients": recipients})
}

/// The tests share the process's metrics (the free-space gauge); one at a time.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_disk_refuses_ingest_loses_nothing_and_recovers() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), 128);
    let filler = fs.0.join("filler");
    // Every answer takes 20 ms, so delivery is still going when the disk fills.
    let sink = Sink::start(SinkOptions {
        data_delay: Duration::from_millis(20),
        ..SinkOptions::default()
    })
    .await;
    let mut cfg = delivery_config(dir.path(), &sink);
    cfg.spool.path = fs.0.join("spool");
    cfg.spool.min_free_bytes = 32 << 20;
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;

    let (status, a, _) = post(addr, "/v1/campaigns", campaign("a", 3000)).await;
    assert_eq!(status, 202, "{a}");
    let a = a["id"].as_str().unwrap().to_owned();

    // Under the floor: ingest is refused with 507 and a clear error, and writes nothing.
    fill(&fs, &filler, 16 << 20);
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let before = spool_counts(&node).await;
    let (status, body, retry_after) = post(addr, "/v1/campaigns", campaign("b", 50)).await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(body["error"]["code"], "spool_full", "{body}");
    let message = body["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("spool.min_free_bytes") && message.contains("nothing was accepted"),
        "{message}"
    );
    assert!(retry_after, "507 without Retry-After");
    let (status, body, _) = post(
        addr,
        "/v1/messages",
        json!({"from": "news@example.com", "to": "one@sink.test", "subject": "s", "text": "t"}),
    )
    .await;
    assert_eq!(status, 507, "{body}");
    assert_eq!(spool_counts(&node).await, before, "a refused request wrote");
    let m = metrics(addr).await;
    let free = metric_value(&m, "sluice_spool_free_bytes", "").expect("free-space gauge");
    assert!(free < (32 << 20) as f64, "gauge says {free} bytes free");

    // Completely full, but for the room RocksDB preallocated for its log: delivery goes on
    // (its outcome writes are not held to the floor), ingest stays refused.
    fill(&fs, &filler, 0);
    let delivered_when_full = sink.messages().len();
    tokio::time::sleep(Duration::from_secs(3)).await;
    let delivered_later = sink.messages().len();
    assert!(
        delivered_later < 3000,
        "the campaign finished before the disk filled; the test proves nothing"
    );
    eprintln!(
        "disk full: {delivered_when_full} messages at the receiver when it filled, \
         {delivered_later} three seconds later"
    );
    let (status, body, _) = post(addr, "/v1/campaigns", campaign("b", 50)).await;
    assert_eq!(status, 507, "{body}");

    // Space comes back: ingest and delivery resume by themselves.
    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    let c = loop {
        let (status, body, _) = post(addr, "/v1/campaigns", campaign("c", 50)).await;
        if status == 202 {
            break body["id"].as_str().unwrap().to_owned();
        }
        assert_eq!(status, 507, "{body}");
        assert!(
            freed.elapsed() < Duration::from_secs(60),
            "ingest did not recover within 60 s of freeing space: {body}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    eprintln!(
        "ingest accepted again {:?} after space was freed",
        freed.elapsed()
    );
    for (id, n) in [(&a, 3000), (&c, 50)] {
        let got = wait_counts(addr, id, Duration::from_secs(90), |c| {
            c["delivered"].as_u64() == Some(n)
        })
        .await;
        assert_eq!(got["queued"], 0, "{got}");
    }
    let seen: HashSet<String> = sink.messages().into_iter().flat_map(|m| m.rcpts).collect();
    for (prefix, n) in [("a", 3000), ("c", 50)] {
        for i in 0..n {
            assert!(
                seen.contains(&format!("{prefix}{i}@sink.test")),
                "{prefix}{i} never arrived"
            );
        }
    }
    assert!(
        !seen
            .iter()
            .any(|r| r.starts_with('b') || r.starts_with("one@")),
        "a refused recipient was delivered"
    );
    let (_, list) = get_json(addr, "/v1/campaigns").await;
    assert_eq!(
        list["campaigns"].as_array().map(Vec::len),
        Some(2),
        "only the accepted campaigns exist: {list}"
    );

    // The outcomes written after the recovery are durable: a restart finds everything delivered.
    node.shutdown().await;
    let node = start(cfg).await;
    for (id, n) in [(&a, 3000u64), (&c, 50)] {
        let (_, got) = get_json(node.http_addr, &format!("/v1/campaigns/{id}")).await;
        assert_eq!(got["counts"]["delivered"], n, "{got}");
    }
    node.shutdown().await;
}

/// NDJSON lines of `n` recipients `prefix<i>@sink.test`, each with `pad` bytes of variables.
fn ndjson(prefix: &str, n: usize, pad: usize) -> String {
    // Varied text, so nothing along the way compresses it away.
    let filler: String = (0..pad)
        .map(|i| (b'a' + ((i * 7 + i / 26) % 26) as u8) as char)
        .collect();
    (0..n)
        .map(|i| {
            format!("{{\"email\":\"{prefix}{i}@sink.test\",\"vars\":{{\"name\":\"N\",\"pad\":\"{filler}\"}}}}\n")
        })
        .collect()
}

async fn upload(addr: std::net::SocketAddr, id: &str, body: String) -> (u16, Value) {
    let path = format!("/v1/campaigns/{id}/recipients");
    let (status, _, body) = post_body(addr, &path, "application/x-ndjson", body).await;
    (status, body)
}

/// With the floor off, an upload runs RocksDB itself out of space: the upload is refused whole,
/// and once space is freed RocksDB recovers (its own error handler) and ingest works again
/// without a restart; after one, only what was accepted is there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rocksdb_out_of_space_refuses_the_upload_and_recovers_when_space_frees() {
    let _serial = SERIAL.lock().await;
    let dir = tempfile::tempdir().unwrap();
    let fs = Tmpfs::mount(&dir.path().join("fs"), 128);
    let filler = fs.0.join("filler");
    let mut cfg = config(&fs.0.join("spool"));
    cfg.log.delivery_log = dir.path().join("delivery.jsonl");
    cfg.spool.min_free_bytes = 0;
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;
    let (status, d, _) = post(addr, "/v1/campaigns", campaign("d", 10)).await;
    assert_eq!(status, 202, "{d}");
    let d = d["id"].as_str().unwrap().to_owned();

    fill(&fs, &filler, 24 << 20);
    // About 60 MB of recipients into 24 MB of room.
    let (status, body) = upload(addr, &d, ndjson("big", 7_500, 8_000)).await;
    eprintln!("upload into a full disk: {status} {}", body["error"]);
    assert!(status == 507 || status == 503, "{status} {body}");
    assert!(
        body["error"]["message"]
            .as_str()
            .is_some_and(|m| m.contains("nothing was accepted")),
        "{body}"
    );
    let (_, got) = get_json(addr, &format!("/v1/campaigns/{d}")).await;
    assert_eq!(
        got["counts"]["queued"], 10,
        "the refused upload is visible: {got}"
    );

    std::fs::remove_file(&filler).unwrap();
    let freed = Instant::now();
    loop {
        let (status, body) = upload(addr, &d, ndjson("e", 20, 100)).await;
        if status == 202 {
            break;
        }
        assert!(
            freed.elapsed() < Duration::from_secs(60),
            "ingest did not recover within 60 s of freeing space: {status} {body}"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    eprintln!(
        "RocksDB accepted writes again {:?} after space was freed",
        freed.elapsed()
    );
    let (_, got) = get_json(addr, &format!("/v1/campaigns/{d}")).await;
    assert_eq!(got["counts"]["queued"], 30, "{got}");

    node.shutdown().await;
    let node = start(cfg).await;
    let (_, got) = get_json(node.http_addr, &format!("/v1/campaigns/{d}")).await;
    assert_eq!(got["counts"]["queued"], 30, "after a restart: {got}");
    let jobs = {
        let n = std::sync::Arc::clone(&node.node);
        tokio::task::spawn_blocking(move || {
            n.spool.count_keys(sluice::store::spool::CF_JOBS).unwrap()
        })
        .await
        .unwrap()
    };
    assert_eq!(jobs, 30, "job records of the refused upload remain");
    node.shutdown().await;
}
