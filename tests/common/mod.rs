//! Helpers shared by the end-to-end tests: an in-process node on 127.0.0.1:0 with its own spool,
//! and the `sluice` binary started as a process.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub mod sink;

use sluice::config::Config;
use sluice::server::Running;

pub const KEY: &str = "test-key-0123456789";

pub fn config(spool: &Path) -> Config {
    let text = format!(
        "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[spool]\npath = \"{}\"\n[log]\nlevel = \"warn\"\ndelivery_log = \"{}\"\n[delivery]\nenabled = false\n",
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
    reqwest::Client::builder()
        .no_proxy()
        .build()
        .expect("client builds")
}

pub fn url(addr: SocketAddr, path: &str) -> String {
    format!("http://{addr}{path}")
}

/// Record counts of every column family, to assert that a refused request changed nothing.
pub async fn spool_counts(running: &Running) -> Vec<(String, usize)> {
    let node = Arc::clone(&running.node);
    tokio::task::spawn_blocking(move || {
        [
            sluice::spool::CF_CAMPAIGNS,
            sluice::spool::CF_JOBS,
            sluice::spool::CF_META,
            sluice::spool::CF_IDEMPOTENCY,
        ]
        .iter()
        .map(|cf| (cf.to_string(), node.spool.count_keys(cf).expect("count")))
        .collect()
    })
    .await
    .expect("count task")
}

/// The `sluice` binary running as a child process.
pub struct Process {
    pub child: Child,
    pub addr: SocketAddr,
}

impl Process {
    /// Writes a config for `spool` and starts `sluice serve`; returns once the API is listening.
    pub fn spawn(dir: &Path, spool: &Path) -> Process {
        let cfg = dir.join("sluice.toml");
        std::fs::write(
            &cfg,
            format!(
                "[http]\nlisten = \"127.0.0.1:0\"\n[auth]\napi_keys = [\"{KEY}\"]\n[spool]\npath = \"{}\"\n[log]\nlevel = \"info\"\ndelivery_log = \"{}\"\n[delivery]\nenabled = false\n",
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
