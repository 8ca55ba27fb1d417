//! Crash safety: SIGKILL the server while a client streams recipients, restart, and check that
//! every acknowledged recipient is in the spool and no upload is visible in part.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use common::{KEY, Process, client, url};
use serde_json::{Value, json};

const UPLOADS: u64 = 20;
const PER_UPLOAD: u64 = 10_000;

fn ndjson(upload: u64) -> Vec<u8> {
    let mut s = String::with_capacity(PER_UPLOAD as usize * 90);
    for i in 0..PER_UPLOAD {
        s.push_str(&format!(
            "{{\"email\":\"u{upload}-{i}@d{}.example\",\"vars\":{{\"first_name\":\"Name{i}\",\"code\":\"{upload}-{i}\"}}}}\n",
            i % 50
        ));
    }
    s.into_bytes()
}

/// Streams uploads one after another; counts recipients whose 202 arrived.
async fn stream_uploads(addr: std::net::SocketAddr, id: String, acked: Arc<AtomicU64>) {
    let c = client();
    for u in 0..UPLOADS {
        let pieces: Vec<Result<Vec<u8>, std::io::Error>> = ndjson(u)
            .chunks(16 * 1024)
            .map(|c| Ok(c.to_vec()))
            .collect();
        let r = c
            .post(url(addr, &format!("/v1/campaigns/{id}/recipients")))
            .bearer_auth(KEY)
            .header("content-type", "application/x-ndjson")
            .body(reqwest::Body::wrap_stream(futures_util::stream::iter(
                pieces,
            )))
            .send()
            .await;
        match r {
            Ok(resp) if resp.status() == 202 => {
                let body: Value = resp.json().await.unwrap_or(Value::Null);
                assert_eq!(body["accepted"].as_u64(), Some(PER_UPLOAD), "{body}");
                acked.fetch_add(PER_UPLOAD, Ordering::SeqCst);
            }
            _ => return,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigkill_during_uploads_loses_nothing_acknowledged() {
    // Kill after this many acknowledged uploads, plus a few milliseconds into the next one.
    let kill_points: [(u64, u64); 5] = [(0, 3), (2, 25), (6, 1), (11, 60), (17, 12)];
    for (after, extra_ms) in kill_points {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("spool");
        let mut server = Process::spawn(dir.path(), &spool);
        server.wait_ready(Duration::from_secs(30)).await;
        let r = client()
            .post(url(server.addr, "/v1/campaigns"))
            .bearer_auth(KEY)
            .json(&json!({"from": "news@example.com", "subject": "Hi {{ first_name }}", "text": "{{ code }}"}))
            .send()
            .await
            .unwrap();
        assert_eq!(r.status(), 202);
        let id = r.json::<Value>().await.unwrap()["id"]
            .as_str()
            .unwrap()
            .to_owned();

        let acked = Arc::new(AtomicU64::new(0));
        let client_task = tokio::spawn(stream_uploads(server.addr, id.clone(), Arc::clone(&acked)));
        while acked.load(Ordering::SeqCst) < after * PER_UPLOAD && !client_task.is_finished() {
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        tokio::time::sleep(Duration::from_millis(extra_ms)).await;
        server.kill();
        let _ = client_task.await;
        let acked = acked.load(Ordering::SeqCst);

        let server = Process::spawn(dir.path(), &spool);
        server.wait_ready(Duration::from_secs(30)).await;
        let got: Value = client()
            .get(url(server.addr, &format!("/v1/campaigns/{id}")))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        let queued = got["counts"]["queued"].as_u64().unwrap();
        assert!(
            queued >= acked,
            "kill point {after}: {queued} queued < {acked} acknowledged"
        );
        assert!(
            queued == acked || queued == acked + PER_UPLOAD,
            "kill point {after}: {queued} queued, {acked} acknowledged: an upload is visible in part"
        );
        assert_eq!(
            queued % PER_UPLOAD,
            0,
            "kill point {after}: partial upload visible"
        );
        eprintln!(
            "kill point {after}+{extra_ms}ms: acknowledged {acked}, queued after restart {queued}"
        );
        drop(server);

        // Nothing staged is left behind: the jobs on disk are exactly the queued ones.
        let spool_for_check = spool.clone();
        let jobs = tokio::task::spawn_blocking(move || {
            let s = sluice::spool::Spool::open(&spool_for_check).unwrap();
            (
                s.count_keys(sluice::spool::CF_JOBS).unwrap(),
                s.count_keys(sluice::spool::CF_META).unwrap(),
            )
        })
        .await
        .unwrap();
        assert_eq!(
            jobs,
            (queued as usize, 1),
            "kill point {after}: jobs and meta records on disk"
        );
    }
}
