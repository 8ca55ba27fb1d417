//! A Redis Cluster on loopback for the cluster-mode tests: six `redis-server` processes (three
//! masters, three replicas) made into a cluster by `redis-cli --cluster create`, in a temporary
//! directory, killed when dropped. Debian's `redis-server` (scripts/setup installs it).

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct RedisCluster {
    pub ports: Vec<u16>,
    children: Vec<Option<Child>>,
    dir: tempfile::TempDir,
}

/// A base port with `n` free ports from it and their cluster bus ports (port + 10000).
fn free_ports(n: u16) -> u16 {
    let seed = std::process::id() as u16;
    for attempt in 0..500u16 {
        let base = 20000 + (seed.wrapping_mul(7).wrapping_add(attempt * 17)) % 9000;
        let all_free = (0..n).all(|i| {
            TcpListener::bind(("127.0.0.1", base + i)).is_ok()
                && TcpListener::bind(("127.0.0.1", base + i + 10000)).is_ok()
        });
        if all_free {
            return base;
        }
    }
    panic!("no {n} free ports for a Redis Cluster");
}

fn redis_cli(args: &[&str]) -> String {
    let out = Command::new("redis-cli")
        .args(args)
        .output()
        .expect("redis-cli runs (scripts/setup installs redis-tools)");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

impl RedisCluster {
    /// Starts six servers and makes them a cluster; `node_timeout_ms` is how soon a replica
    /// takes over from a failed master.
    pub fn start(node_timeout_ms: u64) -> RedisCluster {
        assert!(
            Command::new("redis-server")
                .arg("--version")
                .stdout(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            "redis-server is not installed: run scripts/setup (it installs Debian's redis-server)"
        );
        let dir = tempfile::tempdir().unwrap();
        let base = free_ports(6);
        let ports: Vec<u16> = (base..base + 6).collect();
        let mut cluster = RedisCluster {
            ports: ports.clone(),
            children: Vec::new(),
            dir,
        };
        for &p in &ports {
            let child = cluster.spawn(p, node_timeout_ms);
            cluster.children.push(Some(child));
        }
        for &p in &ports {
            let deadline = Instant::now() + Duration::from_secs(10);
            while redis_cli(&["-p", &p.to_string(), "ping"]).trim() != "PONG" {
                assert!(Instant::now() < deadline, "redis on {p} did not start");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        let addrs: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
        let mut args = vec!["--cluster", "create"];
        args.extend(addrs.iter().map(String::as_str));
        args.extend(["--cluster-replicas", "1", "--cluster-yes"]);
        let out = Command::new("redis-cli").args(&args).output().unwrap();
        assert!(
            out.status.success(),
            "cluster create: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_ok(Duration::from_secs(20));
        // Each master has its replica in sync (the first writes are then replicated too).
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let online: usize = ports
                .iter()
                .map(|p| {
                    redis_cli(&["-p", &p.to_string(), "info", "replication"])
                        .lines()
                        .filter(|l| l.starts_with("slave") && l.contains("state=online"))
                        .count()
                })
                .sum();
            if online >= 3 {
                break;
            }
            assert!(Instant::now() < deadline, "replicas not in sync");
            std::thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    fn spawn(&self, port: u16, node_timeout_ms: u64) -> Child {
        let d = self.dir.path().join(port.to_string());
        std::fs::create_dir_all(&d).unwrap();
        Command::new("redis-server")
            .args([
                "--port",
                &port.to_string(),
                "--bind",
                "127.0.0.1",
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                &node_timeout_ms.to_string(),
                "--dir",
                &d.display().to_string(),
                "--save",
                "",
                "--appendonly",
                "no",
                "--protected-mode",
                "no",
                "--logfile",
                &d.join("redis.log").display().to_string(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server starts")
    }

    /// Waits until every running server reports `cluster_state:ok`.
    pub fn wait_ok(&self, within: Duration) {
        let deadline = Instant::now() + within;
        for (i, &p) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            while !redis_cli(&["-p", &p.to_string(), "cluster", "info"])
                .contains("cluster_state:ok")
            {
                assert!(Instant::now() < deadline, "cluster on {p} not ok");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// `redis://` URLs of every server, for `cluster.redis`.
    pub fn urls(&self) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://127.0.0.1:{p}"))
            .collect()
    }

    /// `redis://` URLs of every server for the ACL user `user` with `password`.
    pub fn urls_as(&self, user: &str, password: &str) -> Vec<String> {
        self.ports
            .iter()
            .map(|p| format!("redis://{user}:{password}@127.0.0.1:{p}"))
            .collect()
    }

    /// Makes (or makes again) ACL user `user`, allowed everything, on every running server.
    pub fn set_user(&self, user: &str, password: &str) {
        let pass = format!(">{password}");
        for (i, &p) in self.ports.iter().enumerate() {
            if self.children[i].is_some() {
                let out = redis_cli(&[
                    "-p",
                    &p.to_string(),
                    "acl",
                    "setuser",
                    user,
                    "reset",
                    "on",
                    &pass,
                    "~*",
                    "&*",
                    "+@all",
                ]);
                assert_eq!(out.trim(), "OK", "ACL SETUSER on {p}");
            }
        }
    }

    /// Deletes ACL user `user` on every running server, which closes its connections: a
    /// client of that user can reach no server, while the others go on.
    pub fn delete_user(&self, user: &str) {
        for (i, &p) in self.ports.iter().enumerate() {
            if self.children[i].is_some() {
                redis_cli(&["-p", &p.to_string(), "acl", "deluser", user]);
            }
        }
    }

    /// Pauses (SIGSTOP) or resumes (SIGCONT) every server: Redis hangs, as a partitioned or
    /// overloaded cluster does.
    pub fn signal_all(&self, signal: &str) {
        for c in self.children.iter().flatten() {
            let _ = Command::new("kill")
                .args([signal, &c.id().to_string()])
                .status();
        }
    }

    /// Kills (SIGKILL) server `i` for good, as a crashed master.
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.children[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Whether server `i` is a master now (from its own `ROLE`).
    pub fn is_master(&self, i: usize) -> bool {
        self.children[i].is_some()
            && redis_cli(&["-p", &self.ports[i].to_string(), "role"]).starts_with("master")
    }

    /// Commands clients sent, summed over every server, from INFO commandstats: script calls
    /// (`evalsha`, `eval`), script loads and the plain commands Sluice sends (`zrem`, and
    /// `xadd`, `xrange`, `wait` for the change stream). Redis
    /// also counts the commands a script runs inside it (`get`, `zadd`...), which are not round
    /// trips, and replication and cluster housekeeping, which are not Sluice's: both left out.
    pub fn calls(&self) -> u64 {
        let mut total = 0;
        for (i, &p) in self.ports.iter().enumerate() {
            if self.children[i].is_none() {
                continue;
            }
            for line in redis_cli(&["-p", &p.to_string(), "info", "commandstats"]).lines() {
                // cmdstat_evalsha:calls=12,usec=...
                let Some(rest) = line.strip_prefix("cmdstat_") else {
                    continue;
                };
                let name = rest.split(':').next().unwrap_or("");
                if !matches!(
                    name,
                    "evalsha" | "eval" | "script|load" | "zrem" | "xadd" | "xrange" | "wait"
                ) {
                    continue;
                }
                if let Some(n) = rest
                    .split("calls=")
                    .nth(1)
                    .and_then(|s| s.split(',').next())
                    .and_then(|s| s.parse::<u64>().ok())
                {
                    total += n;
                }
            }
        }
        total
    }

    /// Resets every server's command statistics.
    pub fn reset_stats(&self) {
        for (i, &p) in self.ports.iter().enumerate() {
            if self.children[i].is_some() {
                redis_cli(&["-p", &p.to_string(), "config", "resetstat"]);
            }
        }
    }
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        self.signal_all("-CONT");
        for c in self.children.iter_mut().flatten() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
