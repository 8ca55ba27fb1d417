//! A real DNSSEC-signed DNS tree for the transport security and resolver tests: NSD serving
//! `test.`, signed with a key of its own that is the trust anchor, and zones below it, each
//! either signed (its DS in `test.`) or not (an insecure delegation that `test.`'s NSEC records
//! prove). Keys come from `ldns-keygen`, signatures from `ldns-signzone` (Debian's ldnsutils,
//! which the test command's setup installs). Negative answers may be cached for a second (the
//! SOA minimum).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One zone below `test.`, or one outside it served on its own (a reverse zone).
pub struct Zone {
    /// Its name without the trailing dot, e.g. `dane.test`.
    pub name: String,
    /// Records in zone-file syntax, relative to the zone (`@ MX 10 mx`, `mx A 127.0.2.1`).
    pub records: Vec<String>,
    pub signed: bool,
    /// Replacements made in the signed file after signing: a record changed this way keeps
    /// its old signature, which no longer verifies (a bogus answer).
    pub tamper: Vec<(String, String)>,
}

/// NSD serving the tree; stopped (its whole process group) when dropped.
pub struct SignedDns {
    pub addr: SocketAddr,
    /// The DNSKEY records of `test.`, for `dane.trust_anchor`.
    pub anchor: PathBuf,
    child: Child,
}

fn run(dir: &Path, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| panic!("{program} (install ldnsutils and nsd): {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Signs `<zone>.zone` in `dir` with a new KSK and ZSK; returns the DS record of the KSK.
fn sign(dir: &Path, zone: &str) -> String {
    let zsk = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", zone]);
    let ksk = run(dir, "ldns-keygen", &["-a", "ECDSAP256SHA256", "-k", zone]);
    run(dir, "ldns-signzone", &[&format!("{zone}.zone"), &zsk, &ksk]);
    std::fs::read_to_string(dir.join(format!("{ksk}.ds"))).expect("the KSK's DS record")
}

fn zone_file(name: &str, records: &[String]) -> String {
    let mut text = format!(
        "$ORIGIN {name}.\n$TTL 300\n@ IN SOA ns.test. hostmaster.test. 1 3600 600 86400 1\n@ IN NS ns.test.\n"
    );
    for r in records {
        text.push_str(r);
        text.push('\n');
    }
    text
}

impl SignedDns {
    /// Writes, signs and serves the zones from `dir` (blocking; a second or so).
    pub fn start(dir: &Path, zones: &[Zone]) -> SignedDns {
        SignedDns::start_at(dir, zones, None)
    }

    /// As [`SignedDns::start`], on `port` when given (to serve other zones in place of a
    /// stopped server: drop it first), else on a free one.
    pub fn start_at(dir: &Path, zones: &[Zone], port: Option<u16>) -> SignedDns {
        std::fs::create_dir_all(dir).expect("zone dir");
        let mut parent = vec!["ns IN A 127.0.0.1".to_owned()];
        let mut served = Vec::new();
        for z in zones {
            // A zone outside test. (a reverse zone) is served on its own, unsigned.
            if let Some(label) = z.name.strip_suffix(".test") {
                parent.push(format!("{label} IN NS ns.test."));
            }
            std::fs::write(
                dir.join(format!("{}.zone", z.name)),
                zone_file(&z.name, &z.records),
            )
            .expect("zone file");
            if z.signed {
                parent.push(sign(dir, &z.name));
                let path = dir.join(format!("{}.zone.signed", z.name));
                let mut text = std::fs::read_to_string(&path).expect("signed zone");
                for (from, to) in &z.tamper {
                    // ldns prints hex data in either case.
                    let upper = from.to_ascii_uppercase();
                    let found = [from.as_str(), upper.as_str()]
                        .into_iter()
                        .find(|f| text.contains(f))
                        .unwrap_or_else(|| panic!("{from:?} is not in {}", z.name))
                        .to_owned();
                    text = text.replace(&found, to);
                }
                std::fs::write(&path, text).expect("signed zone");
                served.push((z.name.clone(), format!("{}.zone.signed", z.name)));
            } else {
                served.push((z.name.clone(), format!("{}.zone", z.name)));
            }
        }
        std::fs::write(dir.join("test.zone"), zone_file("test", &parent)).expect("zone file");
        sign(dir, "test");
        // The keys of test. (each .key file is a DNSKEY record) are the trust anchor: all of
        // them, as a validator that trusts only part of a zone's keys asks the parent for DS
        // records, and test. has no parent here.
        let mut keys = String::new();
        for entry in std::fs::read_dir(dir)
            .expect("zone dir")
            .filter_map(|e| e.ok())
        {
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with("Ktest.+") && name.ends_with(".key") {
                keys.push_str(&std::fs::read_to_string(entry.path()).expect("key file"));
            }
        }
        let anchor = dir.join("anchor.keys");
        std::fs::write(&anchor, keys).expect("anchor file");
        served.push(("test".into(), "test.zone.signed".into()));

        let port = port.unwrap_or_else(|| {
            let l = std::net::TcpListener::bind("127.0.0.1:0").expect("free port");
            l.local_addr().expect("port").port()
        });
        let d = dir.display();
        let mut conf = format!(
            "server:\n  ip-address: 127.0.0.1@{port}\n  do-ip6: no\n  username: \"\"\n  chroot: \"\"\n  zonesdir: \"{d}\"\n  pidfile: \"{d}/nsd.pid\"\n  xfrdfile: \"{d}/xfrd.state\"\n  zonelistfile: \"{d}/zone.list\"\n  database: \"\"\n  logfile: \"{d}/nsd.log\"\n  verbosity: 1\nremote-control:\n  control-enable: no\n"
        );
        for (name, file) in &served {
            conf.push_str(&format!("zone:\n  name: {name}.\n  zonefile: {file}\n"));
        }
        std::fs::write(dir.join("nsd.conf"), conf).expect("nsd.conf");
        let child = {
            use std::os::unix::process::CommandExt;
            Command::new("nsd")
                .args(["-d", "-c"])
                .arg(dir.join("nsd.conf"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .process_group(0)
                .spawn()
                .expect("nsd starts (install nsd)")
        };
        let addr: SocketAddr = ([127, 0, 0, 1], port).into();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "nsd did not start: see {d}/nsd.log"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        SignedDns {
            addr,
            anchor,
            child,
        }
    }
}

impl Drop for SignedDns {
    fn drop(&mut self) {
        // NSD forks its workers into its process group.
        let _ = Command::new("kill")
            .args(["--", &format!("-{}", self.child.id())])
            .status();
        let _ = self.child.wait();
    }
}
