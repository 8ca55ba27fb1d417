//! Cluster mode: three in-process nodes, each with its own spool, sharing limits through a real
//! six-process Redis Cluster on loopback.

mod common;

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use common::redis::RedisCluster;
use common::sink::{Sink, SinkOptions};
use common::{delivery_config, get_json, post_json};

/// One test at a time: each runs a Redis Cluster and three nodes, and measures rates.
static SERIAL: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster_config(
    dir: &std::path::Path,
    sink: &Sink,
    redis: &RedisCluster,
    node: &str,
) -> sluice::config::Config {
    let mut cfg = delivery_config(dir, sink);
    cfg.cluster = Some(sluice::config::ClusterConfig::new(node, redis.urls()));
    cfg
}

fn limited(cfg: &mut sluice::config::Config, rate: &str, connections: u32) {
    cfg.rules.push(
        toml::from_str(&format!(
            "match = \"sink.test\"\nmessage_rate = \"{rate}\"\nmax_connections = {connections}\n"
        ))
        .unwrap(),
    );
}

async fn post_campaign(addr: std::net::SocketAddr, tag: &str, n: usize) -> String {
    let recipients: Vec<Value> = (0..n)
        .map(|i| json!({"email": format!("{tag}-{i}@sink.test")}))
        .collect();
    let (status, got) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": tag, "text": "Hello.\n",
                "recipients": recipients}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    got["id"].as_str().unwrap().to_owned()
}

/// Three nodes, `node-0` to `node-2`, each sending to the sink under one rule of 300/s and six
/// connections.
async fn three_nodes(
    dirs: &[tempfile::TempDir],
    sink: &Sink,
    redis: &RedisCluster,
) -> Vec<sluice::server::Running> {
    let mut nodes = Vec::new();
    for (i, dir) in dirs.iter().enumerate() {
        let mut cfg = cluster_config(dir.path(), sink, redis, &format!("node-{i}"));
        limited(&mut cfg, "300/s", 6);
        nodes.push(common::start(cfg).await);
    }
    nodes
}

/// Messages the sink took in each whole second from the first message: over the whole run
/// (`all`), and over the seconds while every node still had mail to send (`together`: up to the
/// last message of the node that finished first, ramp-up second left out).
fn per_second(sink: &Sink, tags: &[&str]) -> (Vec<usize>, Vec<usize>) {
    let msgs = sink.messages();
    let Some(first) = msgs.iter().map(|m| m.at).min() else {
        return (Vec::new(), Vec::new());
    };
    let last = msgs.iter().map(|m| m.at).max().unwrap_or(first);
    let mut all = vec![0usize; last.duration_since(first).as_secs() as usize + 1];
    for m in &msgs {
        all[m.at.duration_since(first).as_secs() as usize] += 1;
    }
    let first_done = tags
        .iter()
        .map(|tag| {
            msgs.iter()
                .filter(|m| m.rcpts.iter().any(|r| r.starts_with(tag)))
                .map(|m| m.at)
                .max()
                .unwrap_or(first)
        })
        .min()
        .unwrap_or(first);
    let whole = first_done.duration_since(first).as_secs() as usize;
    let together = all.get(1..whole).map(<[usize]>::to_vec).unwrap_or_default();
    (all, together)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_nodes_share_one_rate_and_one_connection_limit() {
    let _serial = SERIAL.lock().await;
    let redis = RedisCluster::start(2000);
    let sink = Sink::start(SinkOptions::default()).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(&dirs, &sink, &redis).await;
    redis.reset_stats();
    const EACH: usize = 1000;
    let started = Instant::now();
    let mut ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        ids.push(post_campaign(n.http_addr, &format!("n{i}"), EACH).await);
    }
    for (n, id) in nodes.iter().zip(&ids) {
        common::wait_counts(n.http_addr, id, Duration::from_secs(60), |c| {
            c["delivered"] == EACH
        })
        .await;
    }
    let took = started.elapsed();
    let calls = redis.calls();
    let (all, together) = per_second(&sink, &["n0-", "n1-", "n2-"]);
    let max_open = sink
        .stats
        .max_open
        .load(std::sync::atomic::Ordering::SeqCst);
    common::report(
        "cluster_shared_limits",
        "3 nodes, 1,000 queued on each for one site limited to 300/s and 6 connections",
        &[
            ("delivered", sink.messages().len().to_string()),
            ("took", format!("{:.1} s", took.as_secs_f64())),
            ("messages per second, whole seconds", format!("{all:?}")),
            ("of which all three nodes sending", format!("{together:?}")),
            ("most connections open at once", max_open.to_string()),
            (
                "Redis calls per message",
                format!("{:.3}", calls as f64 / (3 * EACH) as f64),
            ),
        ],
    );
    assert_eq!(sink.messages().len(), 3 * EACH);
    assert!(max_open <= 6, "{max_open} connections open at once");
    assert!(
        together.len() >= 3,
        "too few seconds with all three nodes sending: {all:?}"
    );
    // Never over the limit (10% for the burst a site's limiter allows) ...
    for r in &all {
        assert!(*r <= 330, "{r} messages in a second, limit 300/s: {all:?}");
    }
    // ... and at it while there is mail on every node.
    let mean = together.iter().sum::<usize>() as f64 / together.len() as f64;
    assert!(
        (270.0..=330.0).contains(&mean),
        "{mean:.0}/s while all three nodes had mail, limit 300/s: {together:?}"
    );
    let (_, c) = get_json(nodes[0].http_addr, "/v1/cluster").await;
    let listed = c["nodes"].as_array().unwrap();
    assert_eq!(listed.len(), 3, "{c}");
    assert!(listed.iter().all(|n| n["alive"] == true), "{c}");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_redis_hung_nodes_go_on_under_their_local_shares_and_lose_nothing() {
    let _serial = SERIAL.lock().await;
    let redis = RedisCluster::start(2000);
    let sink = Sink::start(SinkOptions::default()).await;
    let dirs: Vec<_> = (0..3).map(|_| tempfile::tempdir().unwrap()).collect();
    let nodes = three_nodes(&dirs, &sink, &redis).await;
    // Heartbeats have counted the three nodes.
    tokio::time::sleep(Duration::from_millis(1500)).await;
    const EACH: usize = 1200;
    let mut ids = Vec::new();
    for (i, n) in nodes.iter().enumerate() {
        ids.push(post_campaign(n.http_addr, &format!("n{i}"), EACH).await);
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.signal_all("-STOP");
    let stopped = Instant::now();
    // Nodes keep accepting while Redis hangs.
    let late = post_campaign(nodes[1].http_addr, "late", 100).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let during: Vec<Instant> = sink
        .messages()
        .iter()
        .map(|m| m.at)
        .filter(|&t| t > stopped + Duration::from_secs(1) && t <= stopped + Duration::from_secs(5))
        .collect();
    let metrics = common::metrics(nodes[0].http_addr).await;
    redis.signal_all("-CONT");
    let rate_during = during.len() as f64 / 4.0;
    for (n, id) in nodes.iter().zip(&ids) {
        common::wait_counts(n.http_addr, id, Duration::from_secs(60), |c| {
            c["delivered"] == EACH
        })
        .await;
    }
    common::wait_counts(nodes[1].http_addr, &late, Duration::from_secs(30), |c| {
        c["delivered"] == 100
    })
    .await;
    common::report(
        "cluster_degraded",
        "Redis hung (SIGSTOP) for 5 s while 3 nodes send to a site limited to 300/s",
        &[
            (
                "messages per second while hung",
                format!("{rate_during:.0}"),
            ),
            ("delivered in all", sink.messages().len().to_string()),
        ],
    );
    assert_eq!(
        common::metric_value(&metrics, "sluice_cluster_degraded", "").unwrap_or(0.0),
        1.0,
        "the node said it was degraded"
    );
    assert!(rate_during > 0.0, "nothing was delivered while Redis hung");
    assert!(
        rate_during <= 300.0,
        "{rate_during}/s while degraded: over the cluster-wide limit"
    );
    assert_eq!(sink.messages().len(), 3 * EACH + 100, "nothing is lost");
    for n in nodes {
        n.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_id_in_use_by_another_node_is_refused() {
    let _serial = SERIAL.lock().await;
    let redis = RedisCluster::start(2000);
    let sink = Sink::start(SinkOptions::default()).await;
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let first = common::start(cluster_config(a.path(), &sink, &redis, "twin")).await;
    let second =
        sluice::server::start(Arc::new(cluster_config(b.path(), &sink, &redis, "twin"))).await;
    let Err(e) = second else {
        panic!("a second node with the same node_id started");
    };
    let text = format!("{e:#}");
    assert!(text.contains("cluster.node_id"), "{text}");
    // The same spool restarted keeps its id.
    first.shutdown().await;
    let again = common::start(cluster_config(a.path(), &sink, &redis, "twin")).await;
    again.shutdown().await;
}
