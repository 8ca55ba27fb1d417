//! Resolver sanity against a real name server (NSD): when the resolver starts answering
//! NXDOMAIN for every name (a canary included) in the middle of a run, recipients at 100
//! domains are deferred, none bounced or suppressed, and delivered once it recovers; a domain
//! that really does not exist still bounces, after a second lookup confirms it.

use crate::common;

use std::time::{Duration, Instant};

use common::nsd::{SignedDns, Zone};
use common::sink::{Sink, SinkOptions};
use common::*;
use serde_json::{Value, json};

const DOMAINS: usize = 100;
const CANARY: &str = "canary.mail.test";

/// `mail.test` with `d0`..`d99`, `r0`..`r19` and the canary, every MX `mx.mail.test`
/// (127.0.0.1), with one-second TTLs; or, `hijacked`, with no names at all, so every lookup
/// below it is NXDOMAIN.
fn zone(hijacked: bool) -> Vec<Zone> {
    let mut records = Vec::new();
    if !hijacked {
        records.push("mx 1 IN A 127.0.0.1".to_owned());
        records.push("canary 1 IN MX 10 mx".to_owned());
        for i in 0..DOMAINS {
            records.push(format!("d{i} 1 IN MX 10 mx"));
        }
        for i in 0..20 {
            records.push(format!("r{i} 1 IN MX 10 mx"));
        }
    }
    vec![Zone {
        name: "mail.test".into(),
        records,
        signed: false,
        tamper: Vec::new(),
    }]
}

async fn post(addr: std::net::SocketAddr, emails: Vec<String>) -> String {
    let recipients: Vec<Value> = emails.into_iter().map(|e| json!({"email": e})).collect();
    let (status, v) = post_json(
        addr,
        "/v1/campaigns",
        &json!({"from": "news@example.com", "subject": "Hello", "text": "Hi.", "recipients": recipients}),
    )
    .await;
    assert_eq!(status, 202, "{v}");
    v["id"].as_str().unwrap().to_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nxdomain_for_everything_defers_and_a_confirmed_one_bounces() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let dns = SignedDns::start(&d.join("dns1"), &zone(false));
    let port = dns.addr.port();
    let sink = Sink::start(SinkOptions::default()).await;
    let mut cfg = delivery_config(d, &sink);
    cfg.delivery.smtp_port = sink.addr.port();
    cfg.dns.nameservers = vec![dns.addr];
    cfg.dns.timeout = Duration::from_secs(2);
    cfg.dns.canary = vec![CANARY.into()];
    cfg.dns.canary_interval = Duration::from_millis(300);
    cfg.dns.fault_window = Duration::from_secs(3);
    cfg.dns.confirm_nxdomain_after = Duration::from_secs(2);
    cfg.mta_sts.enabled = false;
    let node = start(cfg).await;
    let addr = node.http_addr;

    // Every domain resolves and takes mail.
    let first = post(
        addr,
        (0..DOMAINS).map(|i| format!("a@d{i}.mail.test")).collect(),
    )
    .await;
    wait_counts(addr, &first, Duration::from_secs(30), |c| {
        c["delivered"] == DOMAINS
    })
    .await;

    // The name server answers NXDOMAIN for every name from now on.
    drop(dns);
    let dns = SignedDns::start_at(&d.join("dns2"), &zone(true), Some(port));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let emails: Vec<String> = (0..500)
        .map(|i| format!("u{i}@d{}.mail.test", i % DOMAINS))
        .collect();
    let second = post(addr, emails).await;
    // Well past the confirmation delay, with retries every few hundred ms.
    let started = Instant::now();
    let mut fault_seen = false;
    while started.elapsed() < Duration::from_secs(6) {
        let m = metrics(addr).await;
        fault_seen |= metric_value(&m, "sluice_dns_resolver_fault", "") == Some(1.0);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(fault_seen, "the fault gauge never showed");
    let (_, v) = get_json(addr, &format!("/v1/campaigns/{second}")).await;
    let c = &v["counts"];
    assert_eq!(
        (c["bounced"].as_u64(), c["delivered"].as_u64()),
        (Some(0), Some(0)),
        "{v}"
    );
    assert_eq!(c["deferred"], 500, "{v}");
    let (_, s) = get_json(addr, "/v1/suppressions").await;
    assert_eq!(s["items"].as_array().map(Vec::len), Some(0), "{s}");
    let log = log_records(d);
    let deferrals: Vec<&Value> = log
        .iter()
        .filter(|r| r["campaign"] == second.as_str() && r["type"] == "t")
        .collect();
    assert!(deferrals.len() >= 500, "{} deferrals", deferrals.len());
    assert!(deferrals.iter().all(|r| r["dsn_status"] == "4.4.3"));
    assert!(
        deferrals.iter().all(|r| r["dsn_diag"]
            .as_str()
            .unwrap_or_default()
            .contains("NXDOMAIN not trusted")),
        "{:?}",
        deferrals.first()
    );

    // The name server answers again: the deferred recipients go, and a domain that does not
    // exist among resolving ones bounces once a second lookup confirms it.
    drop(dns);
    let _dns = SignedDns::start_at(&d.join("dns3"), &zone(false), Some(port));
    let mut emails: Vec<String> = (0..20).map(|i| format!("b@r{i}.mail.test")).collect();
    emails.push("b@nope.mail.test".into());
    let third = post(addr, emails).await;
    wait_counts(addr, &third, Duration::from_secs(30), |c| {
        c["delivered"] == 20 && c["bounced"] == 1
    })
    .await;
    wait_counts(addr, &second, Duration::from_secs(60), |c| {
        c["delivered"] == 500
    })
    .await;
    let log = log_records(d);
    let nope: Vec<&Value> = log
        .iter()
        .filter(|r| r["recipient"] == "b@nope.mail.test")
        .collect();
    let bounce = nope.iter().find(|r| r["type"] == "b").expect("bounced");
    assert_eq!(
        (bounce["dsn_status"].as_str(), bounce["bounce_cat"].as_str()),
        (Some("5.1.2"), Some("bad-domain")),
        "{bounce}"
    );
    assert!(
        nope.iter().any(|r| r["type"] == "t"
            && r["dsn_diag"]
                .as_str()
                .unwrap_or_default()
                .contains("to be confirmed")),
        "{nope:?}"
    );
    let (status, e) = get_json(addr, "/v1/suppressions/b@nope.mail.test").await;
    assert_eq!(status, 200, "{e}");
    assert_eq!(e["entries"][0]["category"], "bad-domain", "{e}");
    node.shutdown().await;
}
