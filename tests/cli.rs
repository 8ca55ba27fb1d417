//! The operator CLI against a running node: `sluice send` with a 100,000-row CSV (progress, a
//! summary that adds up, bad rows named by line), the admin commands, and `sluice sink`
//! capturing a development node's mail and checking its DKIM signatures.

use crate::common;

use std::io::Write;
use std::process::Output;

use common::*;
use serde_json::Value;

async fn sluice(addr: std::net::SocketAddr, args: &[&str]) -> Output {
    sluice_as(addr, KEY, args).await
}

async fn sluice_as(addr: std::net::SocketAddr, key: &str, args: &[&str]) -> Output {
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"));
    cmd.args(["--url", &format!("http://{addr}"), "--api-key", key])
        .args(args)
        .env_remove("SLUICE_URL")
        .env_remove("SLUICE_API_KEY");
    tokio::task::spawn_blocking(move || cmd.output().expect("run sluice"))
        .await
        .unwrap()
}

/// `sluice send` of `csv` with `template`, `chunk` rows per upload.
fn send_args<'a>(
    csv: &'a std::path::Path,
    template: &'a std::path::Path,
    chunk: &'a str,
) -> [&'a str; 7] {
    let path = |p: &'a std::path::Path| p.to_str().expect("a UTF-8 temporary path");
    [
        "send",
        "--csv",
        path(csv),
        "--template",
        path(template),
        "--chunk",
        chunk,
    ]
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_posts_a_csv_with_progress_and_a_summary() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;

    // Suppressed before the send: reported, recorded, not queued.
    let r = client()
        .put(url(addr, "/v1/suppressions/user500@sink.test"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);

    let rows = 100_000usize;
    let csv_path = dir.path().join("list.csv");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&csv_path).unwrap());
    writeln!(f, "email,name").unwrap();
    // Line numbers: the header is line 1, row i is line i + 2.
    let (malformed_row, bad_address_row) = (1234usize, 77_777usize);
    for i in 0..rows {
        if i == malformed_row {
            writeln!(f, "user{i}@sink.test,Name {i},extra").unwrap();
        } else if i == bad_address_row {
            writeln!(f, "not-an-address,Name {i}").unwrap();
        } else {
            writeln!(f, "user{i}@sink.test,\"Name, {i}\"").unwrap();
        }
    }
    drop(f);
    let template = dir.path().join("campaign.json");
    std::fs::write(
        &template,
        r#"{"from": "news@example.com", "subject": "Hello {{ name }}", "text": "Hi {{ name }}"}"#,
    )
    .unwrap();

    let out = sluice(addr, &send_args(&csv_path, &template, "30000")).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert_eq!(
        out.status.code(),
        Some(1),
        "stdout: {stdout}\nstderr: {stderr}"
    );
    // Progress (plain lines when stderr is not a terminal): rising, ending at the total.
    let progress: Vec<u64> = stderr
        .lines()
        .filter_map(|l| l.strip_prefix("sent ")?.split('/').next()?.parse().ok())
        .collect();
    assert!(progress.len() >= 5, "{stderr}");
    assert!(progress.windows(2).all(|w| w[0] < w[1]), "{stderr}");
    assert_eq!(progress.last(), Some(&100_000), "{stderr}");
    assert!(
        stdout.contains("rows 100000: accepted 99997, suppressed 1, refused 1, malformed 1"),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!(
            "line {}: malformed: 3 fields where the header has 2",
            malformed_row + 2
        )),
        "{stdout}"
    );
    assert!(
        stdout.contains(&format!("line {}: refused: email:", bad_address_row + 2)),
        "{stdout}"
    );
    assert!(
        stdout.contains("line 502: suppressed (manual): user500@sink.test"),
        "{stdout}"
    );
    let id = stdout
        .lines()
        .next()
        .and_then(|l| l.strip_prefix("campaign "))
        .unwrap()
        .to_owned();
    let (_, c) = get_json(addr, &format!("/v1/campaigns/{id}")).await;
    assert_eq!(c["counts"]["queued"], 99_997);
    assert_eq!(c["counts"]["suppressed"], 1);

    // A template that carries recipients is refused before anything is created.
    std::fs::write(
        &template,
        r#"{"from": "a@example.com", "subject": "s", "text": "t", "recipients": []}"#,
    )
    .unwrap();
    let out = sluice(
        addr,
        &[
            "send",
            "--csv",
            csv_path.to_str().unwrap(),
            "--template",
            template.to_str().unwrap(),
        ],
    )
    .await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("remove `recipients`"));
    let (_, list) = get_json(addr, "/v1/campaigns").await;
    assert_eq!(list["total"], 1);
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn send_tries_a_refused_chunk_again_with_its_key_and_adds_it_once() {
    // A tenant allowed one request a second: most of the chunks are refused with 429 and
    // Retry-After at first, and go again.
    let dir = tempfile::tempdir().unwrap();
    let key = "tenant-key-0123456789";
    let base = config(dir.path());
    let toml = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n\
         [secrets]\ntoken_keys = [\"test-token-key-0123456789\"]\n\
         [spool]\npath = \"{}\"\n[log]\nlevel = \"warn\"\ndelivery_log = \"{}\"\n\
         [delivery]\nenabled = false\n\
         [[tenant]]\nname = \"slow\"\napi_keys = [\"{key}\"]\nsending_domains = [\"example.com\"]\nrate = \"1/s\"\n",
        base.spool.path.display(),
        base.log.delivery_log.display(),
    );
    let node = start(sluice::config::Config::from_toml("test.toml", &toml, None).unwrap()).await;
    let csv_path = dir.path().join("list.csv");
    let mut rows = String::from("email,name\n");
    for i in 0..50 {
        rows.push_str(&format!("user{i}@sink.test,N{i}\n"));
    }
    std::fs::write(&csv_path, rows).unwrap();
    let template = dir.path().join("campaign.json");
    std::fs::write(
        &template,
        r#"{"from": "news@example.com", "subject": "Hello {{ name }}", "text": "Hi"}"#,
    )
    .unwrap();
    let out = sluice_as(node.http_addr, key, &send_args(&csv_path, &template, "10")).await;
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "stdout: {stdout}\nstderr: {stderr}");
    assert!(
        stderr.contains("429") && stderr.contains("trying again"),
        "{stderr}"
    );
    assert!(stdout.contains("rows 50: accepted 50"), "{stdout}");
    assert_eq!(node.node.scheduler.len(), 50, "each row queued once");
    node.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_commands_use_the_api() {
    let dir = tempfile::tempdir().unwrap();
    let node = start(config(dir.path())).await;
    let addr = node.http_addr;
    let id = post_campaign(addr, recipients(3)).await;

    let out = sluice(addr, &["suspend", "Sink.Test"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "sink.test suspended; 3 queued");
    let out = sluice(addr, &["domains"]).await;
    let stdout = text(&out.stdout);
    assert!(stdout.contains("unresolved"), "{stdout}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("sink.test") && l.contains(" 3 ") && l.contains("yes")),
        "{stdout}"
    );
    let out = sluice(addr, &["--json", "queue"]).await;
    let q: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(q["queued"], 3);
    assert_eq!(q["suspended_domains"], 1);
    assert!(
        sluice(addr, &["resume", "sink.test"])
            .await
            .status
            .success()
    );

    let out = sluice(addr, &["campaign", "pause", &id]).await;
    assert!(
        text(&out.stdout).contains("paused"),
        "{}",
        text(&out.stdout)
    );
    let out = sluice(addr, &["campaign", "list"]).await;
    assert!(text(&out.stdout).starts_with(&id));

    let out = sluice(
        addr,
        &[
            "suppressions",
            "add",
            "Someone+x@Example.com",
            "--reason",
            "complaint",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let out = sluice(addr, &["suppressions", "get", "someone+x@example.com"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["entries"][0]["reason"], "complaint");
    // The example file of `suppressions import --help` imports as it says.
    let help = sluice(addr, &["suppressions", "import", "--help"]).await;
    let help = text(&help.stdout);
    let example: String = help
        .lines()
        .skip_while(|l| !l.contains("Example file:"))
        .skip(1)
        .skip_while(|l| l.trim().is_empty())
        .take_while(|l| !l.trim().is_empty())
        .map(|l| format!("{}\n", l.trim()))
        .collect();
    assert!(example.starts_with("address,reason,scope\n"), "{help}");
    let file = tempfile::Builder::new().suffix(".csv").tempfile().unwrap();
    std::fs::write(file.path(), &example).unwrap();
    let out = sluice(
        addr,
        &["suppressions", "import", file.path().to_str().unwrap()],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (v["imported"].as_u64(), v["rejected_count"].as_u64()),
        (Some(2), Some(0)),
        "{v}"
    );
    let out = sluice(addr, &["suppressions", "get", "bob@example.org"]).await;
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(
        (
            v["entries"][0]["reason"].as_str(),
            v["entries"][0]["scope"].as_str()
        ),
        (Some("unsubscribe"), Some("news.example.com")),
        "{v}"
    );

    let out = sluice(addr, &["suppressions", "export", "--format", "csv"]).await;
    assert!(text(&out.stdout).contains("someone+x@example.com"));
    let out = sluice(addr, &["suppressions", "remove", "someone+x@example.com"]).await;
    assert!(out.status.success());

    // API errors come through with their message; a missing key is named.
    let out = sluice(addr, &["campaign", "show", "nope"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("404"), "{}", text(&out.stderr));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["--url", &format!("http://{addr}"), "queue"])
        .env_remove("SLUICE_API_KEY")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    assert!(text(&out.stderr).contains("no API key"));

    // Tenants: add one, make it a key (printed once), list, revoke.
    let out = sluice(
        addr,
        &[
            "tenant",
            "add",
            "acme",
            "--sending-domain",
            "acme.example",
            "--daily-quota",
            "1000",
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(text(&out.stdout).trim(), "added tenant acme");
    let out = sluice(addr, &["tenant", "key-add", "acme", "--name", "ci"]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let key = text(&out.stdout).trim().to_owned();
    assert!(key.starts_with("sk_"), "{key}");
    let out = sluice(addr, &["tenant", "list"]).await;
    let stdout = text(&out.stdout);
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("acme") && l.contains("acme.example") && l.contains("1000")),
        "{stdout}"
    );
    let out = sluice(addr, &["--json", "tenant", "keys", "--tenant", "acme"]).await;
    let keys: Value = serde_json::from_slice(&out.stdout).unwrap();
    let id = keys["keys"][0]["id"].as_str().unwrap().to_owned();
    assert_eq!(keys["keys"][0]["name"], "ci");
    let out = sluice(addr, &["tenant", "key-revoke", &id]).await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert_eq!(
        text(&out.stdout).trim(),
        format!("revoked key {id} of tenant acme")
    );
    let mut hash = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["tenant", "hash-key"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    hash.stdin
        .take()
        .unwrap()
        .write_all(format!("{key}\n").as_bytes())
        .unwrap();
    let out = hash.wait_with_output().unwrap();
    assert!(out.status.success());
    assert_eq!(
        text(&out.stdout).trim(),
        format!("sha256:{}", sha256_hex(&key))
    );
    node.shutdown().await;
}

fn sha256_hex(s: &str) -> String {
    ring::digest::digest(&ring::digest::SHA256, s.as_bytes())
        .as_ref()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Waits until something accepts connections on `addr`.
async fn wait_listening(addr: std::net::SocketAddr) {
    for _ in 0..500 {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            return;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    panic!("nothing listens on {addr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sink_captures_a_campaign_signed_and_lists_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mail = dir.path().join("sink");
    let mut sink = std::process::Command::new(env!("CARGO_BIN_EXE_sluice"))
        .args(["sink", "--listen", &format!("127.0.0.1:{port}"), "--dir"])
        .arg(&mail)
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("start the sink");
    wait_listening(([127, 0, 0, 1], port).into()).await;

    // A development config: every domain to the sink, signed with a test key pair.
    let keys = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/dkim");
    let config = dir.path().join("sluice.toml");
    std::fs::write(
        &config,
        format!(
            "profile = \"development\"\n[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n\
             [spool]\npath = \"{}\"\n[log]\nlevel = \"warn\"\ndelivery_log = \"{}\"\n\
             [[route]]\ndomain = \"*\"\nrelay = \"127.0.0.1:{port}\"\n\
             [[dkim]]\ndomain = \"example.com\"\nselector = \"s1\"\nalgorithm = \"rsa-sha256\"\nkey_file = \"{}\"\n\
             [[dkim]]\ndomain = \"example.com\"\nselector = \"s2\"\nalgorithm = \"ed25519-sha256\"\nkey_file = \"{}\"\n",
            dir.path().join("spool").display(),
            dir.path().join("delivery.jsonl").display(),
            keys.join("rsa2048.pem").display(),
            keys.join("ed25519.pem").display(),
        ),
    )
    .unwrap();
    let node = start(sluice::config::Config::load(&config).unwrap()).await;
    let addr = node.http_addr;
    let (status, got) = post_json(
        addr,
        "/v1/campaigns",
        &serde_json::json!({"from": "news@example.com", "subject": "Hello {{ name }}",
            "text": "Hi {{ name }}.\n", "recipients": [
                {"email": "alice@example.org", "vars": {"name": "Alice"}},
                {"email": "bob@example.net", "vars": {"name": "Bob"}}]}),
    )
    .await;
    assert_eq!(status, 202, "{got}");
    let id = got["id"].as_str().unwrap().to_owned();
    let counts = wait_counts(addr, &id, std::time::Duration::from_secs(30), |c| {
        c["delivered"] == 2
    })
    .await;
    assert_eq!(counts["bounced"], 0, "{counts}");
    // Nothing bounced, so nothing was suppressed.
    let (_, s) = get_json(addr, "/v1/suppressions").await;
    assert_eq!(s["items"].as_array().map(Vec::len), Some(0), "{s}");

    let out = sluice(
        addr,
        &[
            "--json",
            "sink",
            "--list",
            "--dir",
            mail.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await;
    assert!(out.status.success(), "{}", text(&out.stderr));
    let listed: Value = serde_json::from_slice(&out.stdout).unwrap();
    let messages = listed["messages"].as_array().unwrap();
    assert_eq!(messages.len(), 2, "{listed}");
    let mut to: Vec<&str> = messages
        .iter()
        .map(|m| m["rcpt_to"][0].as_str().unwrap())
        .collect();
    to.sort();
    assert_eq!(to, ["alice@example.org", "bob@example.net"]);
    for m in messages {
        assert_eq!(
            m["dkim"], "pass (d=example.com s=s2); pass (d=example.com s=s1)",
            "{m}"
        );
        assert!(m["unsubscribe"].as_str().unwrap().contains("/u/"), "{m}");
        assert!(m["subject"].as_str().unwrap().starts_with("Hello "), "{m}");
    }
    // A changed body fails the check.
    let file = mail.join(messages[0]["file"].as_str().unwrap());
    let raw = std::fs::read_to_string(&file).unwrap();
    std::fs::write(&file, raw.replace("Hi ", "Bye ")).unwrap();
    let out = sluice(
        addr,
        &[
            "sink",
            "--list",
            "--dir",
            mail.to_str().unwrap(),
            "--config",
            config.to_str().unwrap(),
        ],
    )
    .await;
    let listing = text(&out.stdout);
    assert!(listing.contains("DKIM: fail: "), "{listing}");
    assert!(listing.contains("2 of 2 messages"), "{listing}");

    // The sink keeps to loopback unless told otherwise.
    let out = sluice(addr, &["sink", "--listen", "0.0.0.0:0"]).await;
    assert_eq!(out.status.code(), Some(2));
    assert!(
        text(&out.stderr).contains("--allow-remote"),
        "{}",
        text(&out.stderr)
    );
    let _ = sink.kill();
    let _ = sink.wait();
    node.shutdown().await;
}
