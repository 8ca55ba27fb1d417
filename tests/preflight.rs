//! Authentication preflight against a real name server (NSD): one domain with everything right,
//! and one for each thing that goes wrong (a DKIM record with another key, SPF without the
//! source, SPF needing 11 lookups, no DMARC record, DMARC `p=reject` with a DKIM `d=` that does
//! not align strictly, a PTR that does not give the EHLO name). Each gets its verdict and
//! message from `GET /v1/sending-domains/{domain}` and from `sluice check-config --dns`, and with
//! `preflight.enforce` only the failing ones are refused a campaign.

use crate::common;

use common::nsd::{SignedDns, Zone};
use common::*;
use serde_json::{Value, json};
use sluice::config::{DkimAlgorithm, DkimEntry};

/// A public key that is not ours (RFC 8032's first test vector).
const OTHER_KEY: &str = "11qYAYKxCrfVS/7TyWQHOg7hcvPapiMlrwIaaPcHURo=";

fn key_file() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim/ed25519.pem")
}

fn entry(domain: &str) -> DkimEntry {
    DkimEntry {
        domain: domain.into(),
        selector: "s1".into(),
        algorithm: DkimAlgorithm::Ed25519Sha256,
        key_file: key_file(),
    }
}

fn zone(name: &str, records: &[String]) -> Zone {
    Zone {
        name: name.into(),
        records: records.to_vec(),
        signed: false,
        tamper: Vec::new(),
    }
}

/// The zones: per domain, its DKIM record (ours or another key), SPF and DMARC.
fn zones(ours: &str) -> Vec<Zone> {
    let dkim = |key: &str| format!("s1._domainkey IN TXT \"{key}\"");
    let other = ours.replace(ours.split("p=").nth(1).expect("a p= tag"), OTHER_KEY);
    let spf_ok = "@ IN TXT \"v=spf1 ip4:127.0.0.1 -all\"".to_owned();
    let dmarc = |p: &str| format!("_dmarc IN TXT \"v=DMARC1; p={p}\"");
    let mut eleven: Vec<String> = (1..=11)
        .map(|i| format!("i{i} IN TXT \"v=spf1 -all\""))
        .collect();
    let includes: Vec<String> = (1..=11)
        .map(|i| format!("include:i{i}.spf11.test"))
        .collect();
    // Two strings: one TXT string holds at most 255 bytes; receivers join them.
    eleven.push(format!(
        "@ IN TXT \"v=spf1 {} \" \"{} ip4:127.0.0.1 -all\"",
        includes[..6].join(" "),
        includes[6..].join(" ")
    ));
    eleven.push(dkim(ours));
    eleven.push(dmarc("none"));
    vec![
        zone(
            "good.test",
            &[
                dkim(ours),
                spf_ok.clone(),
                dmarc("reject"),
                "mx 1 IN A 127.0.0.1".into(),
                "mx2 1 IN A 127.0.0.2".into(),
                "wrong 1 IN A 127.0.0.9".into(),
                "_mta-sts IN TXT \"v=STSv1; id=20261203\"".into(),
                "_smtp._tls IN TXT \"v=TLSRPTv1; rua=mailto:tls@good.test\"".into(),
            ],
        ),
        zone(
            "badkey.test",
            &[dkim(&other), spf_ok.clone(), dmarc("none")],
        ),
        zone(
            "nospf.test",
            &[
                dkim(ours),
                "@ IN TXT \"v=spf1 ip4:192.0.2.1 -all\"".into(),
                dmarc("none"),
            ],
        ),
        zone("spf11.test", &eleven),
        zone("nodmarc.test", &[dkim(ours), spf_ok.clone()]),
        // news.strict.test is signed by strict.test's key: d= is the parent, which strict
        // alignment refuses, and news.strict.test has no SPF record to align instead.
        zone(
            "strict.test",
            &[
                dkim(ours),
                "_dmarc IN TXT \"v=DMARC1; p=reject; adkim=s\"".into(),
            ],
        ),
        zone(
            "0.0.127.in-addr.arpa",
            &[
                "1 IN PTR mx.good.test.".into(),
                "2 IN PTR wrong.good.test.".into(),
            ],
        ),
    ]
}

/// The check of `report` named `check` (and `subject`, when given), asserted to have `verdict`
/// and a message containing `says`.
fn expect<'a>(
    report: &'a Value,
    check: &str,
    subject: Option<&str>,
    verdict: &str,
    says: &str,
) -> &'a Value {
    let c = report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["check"] == check && subject.is_none_or(|s| c["subject"] == s))
        .unwrap_or_else(|| panic!("no {check} check in {report}"));
    assert_eq!(c["verdict"], verdict, "{report}");
    let message = c["message"].as_str().unwrap_or_default();
    assert!(message.contains(says), "{check}: {message}");
    c
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn preflight_judges_each_domain_and_enforce_refuses_only_the_failing() {
    let dir = tempfile::tempdir().unwrap();
    let ours = sluice::outbound::dkim::public_record(&entry("good.test")).unwrap();
    let dns = SignedDns::start(&dir.path().join("dns"), &zones(&ours));
    let signed = [
        "good.test",
        "badkey.test",
        "nospf.test",
        "spf11.test",
        "nodmarc.test",
        "strict.test",
    ];
    let mut cfg = config(dir.path());
    cfg.dns.nameservers = vec![dns.addr];
    cfg.dns.timeout = std::time::Duration::from_secs(2);
    cfg.dkim = signed.iter().map(|d| entry(d)).collect();
    let mut source = egress_source("a", "127.0.0.1");
    source.ehlo_name = Some("mx.good.test".into());
    cfg.sources = vec![source];
    cfg.preflight.enforce = true;
    let node = start(cfg.clone()).await;
    let addr = node.http_addr;

    let report = |domain: &str| {
        let domain = domain.to_owned();
        async move {
            let (status, v) = get_json(addr, &format!("/v1/sending-domains/{domain}")).await;
            assert_eq!(status, 200, "{v}");
            v["preflight"].clone()
        }
    };
    let good = report("good.test").await;
    assert_eq!(good["verdict"], "pass", "{good}");
    expect(&good, "dkim", None, "pass", "verifies our signature");
    expect(
        &good,
        "spf",
        Some("127.0.0.1"),
        "pass",
        "authorises 127.0.0.1",
    );
    expect(&good, "dmarc", None, "pass", "aligned through DKIM and SPF");
    expect(&good, "ptr", None, "pass", "127.0.0.1 ↔ mx.good.test");
    expect(&good, "mta_sts", None, "pass", "published");

    let r = report("badkey.test").await;
    let c = expect(&r, "dkim", None, "fail", "does not verify our signature");
    assert!(c["seen"].as_str().unwrap().contains(OTHER_KEY), "{c}");
    let publish = format!("s1._domainkey.badkey.test TXT \"{ours}\"");
    assert_eq!(c["publish"], publish.as_str(), "{c}");

    let r = report("nospf.test").await;
    let c = expect(
        &r,
        "spf",
        Some("127.0.0.1"),
        "fail",
        "does not authorise 127.0.0.1",
    );
    assert_eq!(c["seen"], "v=spf1 ip4:192.0.2.1 -all", "{c}");
    assert!(
        c["publish"].as_str().unwrap().contains("ip4:127.0.0.1"),
        "{c}"
    );

    let r = report("spf11.test").await;
    let limit = "needs 11 DNS lookups, over the limit of 10";
    expect(&r, "spf", Some("127.0.0.1"), "fail", limit);

    let r = report("nodmarc.test").await;
    let c = expect(&r, "dmarc", None, "fail", "publishes no DMARC record");
    let publish = c["publish"].as_str().unwrap();
    assert!(
        publish.starts_with("_dmarc.nodmarc.test TXT \"v=DMARC1; p=none"),
        "{c}"
    );
    expect(&r, "dkim", None, "pass", "verifies our signature");

    // news.strict.test has no key of its own and is not listed: ask for it by name.
    let (status, _) = get_json(addr, "/v1/sending-domains/news.strict.test").await;
    assert_eq!(status, 404);

    // Enforce: only good.test may send; each refusal names from and the failing check.
    for (domain, want) in [
        ("good.test", None),
        ("badkey.test", Some("dkim s1._domainkey.badkey.test")),
        ("nospf.test", Some("spf 127.0.0.1")),
        ("spf11.test", Some("spf 127.0.0.1")),
        ("nodmarc.test", Some("dmarc _dmarc.nodmarc.test")),
        (
            "news.strict.test",
            Some("dmarc _dmarc.news.strict.test: p=reject"),
        ),
    ] {
        let (status, body) = post_json(
            addr,
            "/v1/campaigns",
            &json!({"from": format!("news@{domain}"), "subject": "s", "text": "t",
                    "recipients": [{"email": "a@sink.test"}]}),
        )
        .await;
        match want {
            None => assert_eq!(status, 202, "{domain}: {body}"),
            Some(check) => {
                assert_eq!(status, 422, "{domain}: {body}");
                assert_eq!(body["error"]["field"], "from", "{domain}: {body}");
                let message = body["error"]["message"].as_str().unwrap();
                assert!(message.contains(check), "{domain}: {message}");
            }
        }
    }
    node.shutdown().await;

    // check-config --dns, with a second source whose PTR names another host.
    let config_file = dir.path().join("preflight.toml");
    let mut text = String::from("profile = \"development\"\n[auth]\napi_keys = [\"0123456789\"]\n");
    text.push_str(&format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"2s\"\n",
        dns.addr
    ));
    text.push_str(
        "[[source]]\nname = \"a\"\naddress = \"127.0.0.1\"\nehlo_name = \"mx.good.test\"\n",
    );
    text.push_str(
        "[[source]]\nname = \"b\"\naddress = \"127.0.0.2\"\nehlo_name = \"mx2.good.test\"\n",
    );
    for domain in ["good.test", "strict.test"] {
        text.push_str(&format!(
            "[[dkim]]\ndomain = \"{domain}\"\nselector = \"s1\"\nalgorithm = \"ed25519-sha256\"\nkey_file = \"{}\"\n",
            key_file().display()
        ));
    }
    std::fs::write(&config_file, text).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args([
            "check-config",
            "--dns",
            "--domain",
            "news.strict.test",
            "-c",
        ])
        .arg(&config_file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("sluice check-config --dns:\n{stdout}");
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("fail  ptr      127.0.0.2: the PTR record of 127.0.0.2 gives wrong.good.test, not the EHLO name mx2.good.test"),
        "{stdout}"
    );
    assert!(stdout.contains("pass  ptr      127.0.0.1"), "{stdout}");
    assert!(
        stderr.contains(
            "source[1].ehlo_name: warning: the PTR record of 127.0.0.2 gives wrong.good.test"
        ),
        "{stderr}"
    );
    let strict: String = stdout
        .lines()
        .skip_while(|l| !l.starts_with("news.strict.test:"))
        .take_while(|l| !l.starts_with("strict.test:"))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        strict.contains("fail  dmarc    _dmarc.news.strict.test: p=reject"),
        "{stdout}"
    );
    assert!(strict.contains("adkim=s"), "{strict}");
}
