"""End-to-end delivery benchmark; run through `scripts/bench`, which installs the peers and builds.

Every figure is measured as a ratio to a limit measured in the same run, because this machine is
shared and noisy:
  * the loopback limit: Postfix's smtp-source -> smtp-sink on reused connections, run just before
    and just after each scenario at the scenario's message size (the mean of the two);
  * the signing limit: `openssl speed rsa2048` on one core, before and after each DKIM scenario;
  * for the scale figures, Sluice itself with a small queue (CPU time per message) or idle
    (resident memory).

Rates are counted at the sinks (smtp-sink -c): messages from the first delivery until the
campaign's last one. Campaigns that are not personalised put several recipients in one message,
so they and their personalised twins are compared in recipients per second from Sluice's counts.
CPU time is Sluice's own (user + system, /proc/PID/stat) over a window of deliveries. Writes the
table to stdout and target/bench/bench.csv.
"""

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
BIN = os.path.join(ROOT, "target", "release", "sluice")
KEY = "bench-key-0123456789"
TENANT_KEY = "bench-tenant-key-"
DNS_PORT = 5399
TICKS = os.sysconf("SC_CLK_TCK")

# MX hosts of the bench zone: smtp-sink on 127.0.0.x:25.
MX = {"mx1": "127.0.0.2", "mx2": "127.0.0.3", "mx3": "127.0.0.5", "slow": "127.0.0.4"}
# The MX host of chunking.bench.test: Postfix's smtpd, started by the part that needs it.
POSTFIX = "127.0.0.7"


def log(msg):
    print(msg, file=sys.stderr, flush=True)


# --- peers ----------------------------------------------------------------------------------------


class Sink:
    """smtp-sink with live counters (-c): a thread reads them as they are printed."""

    PATTERN = re.compile(rb"mesg=(\d+)")

    def __init__(self, ip, *options):
        self.ip = ip
        self.count = 0
        self.changed_at = 0.0
        self.proc = subprocess.Popen(
            ["smtp-sink", "-c", "-u", "nobody", *options, f"{ip}:25", "1024"],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
        )
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        fd = self.proc.stdout.fileno()
        tail = b""
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return
            now = time.monotonic()
            text = tail + chunk
            # Counter lines end with \r; a line cut by the read is completed by the next one.
            cut = text.rfind(b"\r")
            tail = text[cut + 1 :]
            found = self.PATTERN.findall(text[: cut + 1])
            if found:
                self.count, self.changed_at = int(found[-1]), now

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def stop(self):
        self.proc.kill()


def stat_cpu(path):
    """The name and the user and system CPU seconds so far in a `/proc/.../stat` file."""
    with open(path) as f:
        head, rest = f.read().rsplit(")", 1)
    fields = rest.split()
    return head.split("(", 1)[1], (int(fields[11]) + int(fields[12])) / TICKS


def cpu_seconds(pid):
    """User and system CPU time of a process so far."""
    return stat_cpu(f"/proc/{pid}/stat")[1]


def rocksdb_cpu_seconds(pid):
    """The CPU time of RocksDB's flush and compaction threads (named `rocksdb:...`) so far."""
    total = 0.0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            name, seconds = stat_cpu(f"/proc/{pid}/task/{tid}/stat")
        except OSError:
            continue
        if name.startswith("rocksdb:"):
            total += seconds
    return total


def port_free(ip, port):
    import socket

    s = socket.socket()
    s.settimeout(0.2)
    try:
        return s.connect_ex((ip, port)) != 0
    finally:
        s.close()


def make_keys(work):
    """The DKIM keys the bench config names: rsa.pem (2048 bits) and ed25519.pem in `work`."""
    for algorithm, options in (("RSA", ["-pkeyopt", "rsa_keygen_bits:2048"]), ("ed25519", [])):
        subprocess.run(["openssl", "genpkey", "-algorithm", algorithm, *options,
                        "-out", f"{work}/{algorithm.lower()}.pem"], check=True, capture_output=True)


def start_nsd(work, domains):
    """NSD serving bench.test on 127.0.0.1:DNS_PORT: one.bench.test and slow.bench.test, plus
    d0..d{domains-1}.bench.test spread over three MX hosts."""
    os.makedirs(f"{work}/nsd", exist_ok=True)
    lines = [
        "$ORIGIN bench.test.",
        "$TTL 3600",
        "@ SOA ns.bench.test. admin.bench.test. 1 3600 600 86400 3600",
        "@ NS ns.bench.test.",
        "ns A 127.0.0.1",
    ]
    lines += [f"{name} A {ip}" for name, ip in MX.items()]
    lines += ["one MX 10 mx1", "slow MX 10 slow", f"postfix A {POSTFIX}", "chunking MX 10 postfix"]
    lines += [f"d{i} MX 10 mx{i % 3 + 1}" for i in range(domains)]
    with open(f"{work}/nsd/bench.test.zone", "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(f"{work}/nsd/nsd.conf", "w") as f:
        f.write(
            f"""server:
  ip-address: 127.0.0.1@{DNS_PORT}
  do-ip6: no
  username: ""
  chroot: ""
  zonesdir: "{work}/nsd"
  pidfile: "{work}/nsd/nsd.pid"
  xfrdfile: "{work}/nsd/xfrd.state"
  zonelistfile: "{work}/nsd/zone.list"
  database: ""
  logfile: "{work}/nsd/nsd.log"
  verbosity: 1
  # No response rate limiting: one client asks thousands of names a second here, and NSD's
  # default limit (200 answers a second per kind) would truncate the rest into TCP retries.
  rrl-ratelimit: 0
remote-control:
  control-enable: no
zone:
  name: bench.test
  zonefile: bench.test.zone
"""
        )
    proc = subprocess.Popen(["nsd", "-d", "-c", f"{work}/nsd/nsd.conf"], start_new_session=True)
    for _ in range(100):
        out = subprocess.run(
            ["dig", "+short", "+time=1", "+tries=1", "@127.0.0.1", "-p", str(DNS_PORT), "MX", "one.bench.test"],
            capture_output=True,
            text=True,
        ).stdout
        if "mx1" in out:
            return proc
        time.sleep(0.1)
    raise SystemExit(f"bench: NSD did not answer; see {work}/nsd/nsd.log")


class Postfix:
    """Postfix's smtpd on `ip`:25 (it offers CHUNKING), passing each message on in real time to
    the SMTP server at `proxy` (smtpd_proxy_filter) before it answers: no queue, no fsync, so a
    comparison of the ways in is not drowned by the disk. Its own instance: configuration, queue
    and log in `work`/postfix."""

    def __init__(self, work, ip, proxy):
        if not port_free(ip, 25):
            raise SystemExit(f"bench: {ip}:25 is busy")
        self.dir = d = f"{work}/postfix"
        os.makedirs(f"{d}/queue")
        os.makedirs(f"{d}/data")
        subprocess.run(["chown", "postfix", f"{d}/data"], check=True)
        with open(f"{d}/main.cf", "w") as f:
            f.write(f"""compatibility_level = 3.6
queue_directory = {d}/queue
data_directory = {d}/data
maillog_file = {d}/maillog
maillog_file_prefixes = {work}
inet_interfaces = all
inet_protocols = ipv4
myhostname = receiver.bench.test
mydestination =
mynetworks = 127.0.0.0/8
smtpd_relay_restrictions = permit_mynetworks, reject
smtpd_proxy_filter = {proxy}
smtpd_client_connection_count_limit = 0
default_process_limit = 200
default_transport = discard
""")
        services = [
            f"{ip}:25 inet n - n - - smtpd",
            "pickup unix n - n 60 1 pickup",
            "cleanup unix n - n - 0 cleanup",
            "qmgr unix n - n 300 1 qmgr",
            "rewrite unix - - n - - trivial-rewrite",
            "bounce unix - - n - 0 bounce",
            "defer unix - - n - 0 bounce",
            "trace unix - - n - 0 bounce",
            "verify unix - - n - 1 verify",
            "proxymap unix - - n - - proxymap",
            "showq unix n - n - - showq",
            "error unix - - n - - error",
            "retry unix - - n - - error",
            "discard unix - - n - - discard",
            "anvil unix - - n - 1 anvil",
            "scache unix - - n - 1 scache",
            "postlog unix-dgram n - n - 1 postlogd",
        ]
        with open(f"{d}/master.cf", "w") as f:
            f.write("\n".join(services) + "\n")
        subprocess.run(["postfix", "-c", d, "start"], check=True, capture_output=True)
        for _ in range(100):
            if not port_free(ip, 25):
                return
            time.sleep(0.1)
        raise SystemExit(f"bench: Postfix did not listen on {ip}:25; see {d}/maillog")

    def commands(self, name):
        """How many times smtpd logged command `name` (its `disconnect` lines count them)."""
        n = 0
        with open(f"{self.dir}/maillog", errors="replace") as f:
            for m in re.finditer(rf" {name}=(\d+)", f.read()):
                n += int(m.group(1))
        return n

    def stop(self):
        subprocess.run(["postfix", "-c", self.dir, "stop"], capture_output=True)


# --- Sluice ---------------------------------------------------------------------------------------


class Sluice:
    """A Sluice process with the bench config (plus `extra` TOML), started and ready."""

    def __init__(self, work, name, api_port, extra="", delivery=""):
        if not port_free("127.0.0.1", api_port):
            raise SystemExit(f"bench: 127.0.0.1:{api_port} is busy")
        self.api = f"127.0.0.1:{api_port}"
        # The key requests go with: the operator's, or a tenant's.
        self.key = KEY
        self.dir = f"{work}/{name}"
        os.makedirs(self.dir)
        with open(f"{self.dir}/sluice.toml", "w") as f:
            f.write(
                f"""[http]
listen = "{self.api}"
[auth]
api_keys = ["{KEY}"]
[secrets]
token_keys = ["bench-token-key-0123456789"]
[spool]
path = "{self.dir}/spool"
[log]
level = "warn"
delivery_log = "{self.dir}/delivery.jsonl"
[dns]
nameservers = ["127.0.0.1:{DNS_PORT}"]
[delivery]
ehlo_name = "bench.sluice.test"
retry_initial = "1h"
{delivery}
[shaping]
max_connections = 20
max_messages_per_connection = 1000
[[dkim]]
domain = "rsa.bench.test"
selector = "s1"
algorithm = "rsa-sha256"
key_file = "{work}/rsa.pem"
[[dkim]]
domain = "dual.bench.test"
selector = "s1"
algorithm = "rsa-sha256"
key_file = "{work}/rsa.pem"
[[dkim]]
domain = "dual.bench.test"
selector = "s2"
algorithm = "ed25519-sha256"
key_file = "{work}/ed25519.pem"
{extra}"""
            )
        self.start()

    def start(self):
        """Starts the process; returns the seconds until /readyz answered 200."""
        started = time.monotonic()
        self.proc = subprocess.Popen(
            [BIN, "serve", "--config", f"{self.dir}/sluice.toml"],
            stderr=open(f"{self.dir}/sluice.log", "a"),
        )
        for _ in range(30000):
            try:
                with urllib.request.urlopen(f"http://{self.api}/readyz", timeout=1) as r:
                    if r.status == 200:
                        return time.monotonic() - started
            except OSError:
                pass
            if self.proc.poll() is not None:
                break
            time.sleep(0.01)
        raise SystemExit(f"bench: Sluice did not start; see {self.dir}/sluice.log")

    def call(self, method, path, body=None, raw=None, ctype="application/json"):
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(
            f"http://{self.api}{path}",
            method=method,
            data=data,
            headers={"Authorization": f"Bearer {self.key}", "Content-Type": ctype},
        )
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.loads(r.read() or b"{}")

    def campaign(self, sender, size, recipients, personalised=True):
        """Creates a campaign whose text part is about `size` bytes once rendered and uploads
        `recipients` (an iterable of (email, name)) as one NDJSON request, whose duration is kept
        in `upload_seconds`. Personalised: the name is in the subject and the text; otherwise
        the campaign is `"personalised": false` and recipients carry no variables."""
        # Text wrapped at 72 characters, as mail clients write it (and as smtp-source's payload
        # is): lines over 76 would be quoted-printable encoded.
        line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
        filler = (line * (size // len(line) + 1))[: max(size - 40, 0)]
        if personalised:
            fields = {"subject": "Bench {{ name }}", "text": "Hello {{ name }},\n" + filler}
            lines = (json.dumps({"email": email, "vars": {"name": name}}) for email, name in recipients)
        else:
            fields = {"subject": "Bench", "text": "Hello,\n" + filler, "personalised": False}
            lines = (json.dumps({"email": email}) for email, _ in recipients)
        body = "".join(line + "\n" for line in lines).encode()
        cid = self.call("POST", "/v1/campaigns", {"from": sender, **fields})["id"]
        started = time.monotonic()
        r = self.call("POST", f"/v1/campaigns/{cid}/recipients", raw=body, ctype="application/x-ndjson")
        self.upload_seconds = time.monotonic() - started
        return cid, r["accepted"]

    def drained(self, cid, n, deadline=600):
        """Recipients delivered per second by campaign `cid` (counted by Sluice: a merged message
        is one message at the sink for several recipients), from the first delivery to the n-th."""
        end = time.monotonic() + deadline
        first = None
        while time.monotonic() < end:
            c = self.counts(cid)
            now = time.monotonic()
            if first is None and c["delivered"] > 0:
                first = (now, c["delivered"])
            if c["delivered"] >= n:
                return (n - first[1]) / (now - first[0]) if now > first[0] else float("nan")
            time.sleep(0.02)
        raise SystemExit(f"bench: campaign {cid} did not finish: {c}")

    def counts(self, cid):
        return self.call("GET", f"/v1/campaigns/{cid}")["counts"]

    def cpu_seconds(self):
        return cpu_seconds(self.proc.pid)

    def rocksdb_cpu_seconds(self):
        return rocksdb_cpu_seconds(self.proc.pid)

    def rss_bytes(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def settle(self, quiet=0.02, limit=120):
        """Waits until the process uses under `quiet` of a core for a second (RocksDB done with
        its flushes and compactions); returns the seconds waited."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            c0 = self.cpu_seconds()
            time.sleep(1)
            if self.cpu_seconds() - c0 < quiet:
                break
        return time.monotonic() - started

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


# --- measurements ---------------------------------------------------------------------------------


def total(sinks):
    return sum(s.count for s in sinks)


def deliveries(sinks, n, start, sluice=None, marks=(), deadline=600):
    """Runs `start()` and waits for `n` more messages at `sinks`. Returns the rate from the first
    message to the n-th, and at each count in `marks` (counted from the first of these messages)
    Sluice's CPU seconds and those of its RocksDB threads. A process `start()` returns is waited
    for at the end."""
    base = total(sinks)
    started = start()
    end = time.monotonic() + deadline
    first = None
    cpu = {}
    while True:
        got = total(sinks) - base
        if first is None and got > 0:
            first = max(s.changed_at for s in sinks if s.count)
            first_count = got
        for m in marks:
            if m not in cpu and got >= m:
                cpu[m] = (sluice.cpu_seconds(), sluice.rocksdb_cpu_seconds())
        if got >= n:
            last = max(s.changed_at for s in sinks)
            break
        if time.monotonic() > end:
            raise SystemExit(f"bench: only {got} of {n} messages arrived in {deadline} s")
        time.sleep(0.005)
    if isinstance(started, subprocess.Popen) and started.wait() != 0:
        raise SystemExit(f"bench: {started.args[0]} failed")
    rate = (n - first_count) / (last - first) if last > first else float("nan")
    return rate, cpu


def foreground(before, after, n, what):
    """CPU seconds per message over `n` messages between two (Sluice, its RocksDB threads) CPU
    readings, without RocksDB's flush and compaction threads: they run when a memtable fills or
    files are due for compaction, and fall whole into whichever window that happens in. Logs
    both, so what was left out is in the output."""
    (c0, r0), (c1, r1) = before, after
    log(f"  {what}: {(c1 - c0) / n * 1e6:.1f} µs a message, of which RocksDB's flushes and "
        f"compactions {(r1 - r0) / n * 1e6:.1f}")
    return ((c1 - c0) - (r1 - r0)) / n


def smtp_source(sinks, ip, size, n):
    """The loopback limit: smtp-source, 20 sessions on reused connections."""
    return smtp_source_costs(sinks, ip, size, n)[0]


def smtp_source_costs(sinks, ip, size, n):
    """`smtp_source`'s rate, and the CPU seconds per message of the sinks and of smtp-source."""
    sink0 = sum(s.cpu_seconds() for s in sinks)
    source0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    rate, _ = deliveries(
        sinks,
        n,
        lambda: subprocess.Popen(
            ["smtp-source", "-s", "20", "-m", str(n), "-l", str(size), "-d", f"{ip}:25"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        ),
    )
    source1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    sink = (sum(s.cpu_seconds() for s in sinks) - sink0) / n
    source = (source1.ru_utime + source1.ru_stime - source0.ru_utime - source0.ru_stime) / n
    return rate, sink, source


def openssl_rsa2048():
    out = subprocess.run(
        ["openssl", "speed", "-seconds", "3", "rsa2048"], capture_output=True, text=True, check=True
    ).stdout
    for line in out.splitlines():
        if re.match(r"^rsa\s+2048 bits", line):
            return float(line.split()[-2])
    raise SystemExit("bench: could not read openssl speed's output")


def people(domain_of, n, offset=0):
    return ((f"u{offset + i}@{domain_of(i)}", f"User {offset + i}") for i in range(n))


# --- the run --------------------------------------------------------------------------------------


class Bench:
    """The peers, the rows of the table, and the parts of the run."""

    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.rows = []
        self.procs = []
        for ip in MX.values():
            if not port_free(ip, 25):
                raise SystemExit(f"bench: {ip}:25 is busy")
        if not port_free("127.0.0.1", DNS_PORT):
            raise SystemExit(f"bench: 127.0.0.1:{DNS_PORT} is busy")
        make_keys(self.work)
        self.nsd = start_nsd(self.work, MANY)
        self.sinks = {name: Sink(ip) for name, ip in MX.items() if name != "slow"}
        self.slow = Sink(MX["slow"], "-w", "5")
        self.one = [self.sinks["mx1"]]
        self.three = list(self.sinks.values())

    def n(self, count):
        return max(int(count * self.args.scale), 100)

    def stop(self):
        for p in self.procs:
            p.stop()
        for s in [*self.sinks.values(), self.slow]:
            s.stop()
        os.killpg(self.nsd.pid, 15)

    def sluice(self, name, port, extra="", delivery=""):
        s = Sluice(self.work, name, port, extra, delivery)
        self.procs.append(s)
        return s

    def done(self, s):
        s.stop()
        self.procs.remove(s)

    def row(self, name, rate, ref, ref_what, target=None, unit="msg/s", cpu=None, sink=None):
        ratio = rate / ref if ref else float("nan")
        self.rows.append((name, rate, unit, ref, ref_what, ratio, target, cpu, sink))
        log(f"  {name}: {rate:,.0f} {unit}, reference {ref:,.0f} ({ref_what}), ratio {ratio:.2f}")

    def rates(self):
        """Delivery rate per message size, signing and destination spread, and fairness."""
        n, one, three = self.n, self.one, self.three
        a = self.sluice("rates", 18031)
        # Warm-up: connections, DNS cache and the allocator, so the first scenario is not penalised;
        # and the signers, whose first RSA signature seeds the crypto library's random generator
        # (tens of milliseconds, once per thread).
        deliveries(one, 2000, lambda: a.campaign(PLAIN, 1024, people(SITE, 2000)))
        deliveries(one, 200, lambda: a.campaign(RSA, 1024, people(SITE, 200, offset=10**6)))

        def wanted(name):
            return not self.args.rows or any(t in name for t in self.args.rows.split("|"))

        def scenario(name, size, sender, count, domain_of, at, reference, target=None):
            if not wanted(name):
                return None
            log(f"{name} ...")
            # The smtp-source reference's costs are measured at this size either way, so that
            # every row shows what the peers need per message.
            costs = smtp_source_costs(one, MX["mx1"], size, reference if reference != "openssl" else n(4_000))
            if reference == "openssl":
                before = openssl_rsa2048()
            else:
                before = costs[0]
            cpu0, sink0 = a.cpu_seconds(), sum(s.cpu_seconds() for s in at)
            rate, _ = deliveries(at, count, lambda: a.campaign(sender, size, people(domain_of, count)))
            cpu = (a.cpu_seconds() - cpu0) / count
            sink = (sum(s.cpu_seconds() for s in at) - sink0) / count
            if reference == "openssl":
                ref = (before + openssl_rsa2048()) / 2
                what = f"openssl speed rsa2048, one core ({1e6 / ref:,.0f} µs per signature)"
            else:
                after = smtp_source_costs(one, MX["mx1"], size, reference)
                ref = (before + after[0]) / 2
                costs = tuple((c + d) / 2 for c, d in zip(costs, after))
                what = f"smtp-source, {size // 1024} KB, reused connections"
            what += (f"; smtp-source → sink: sink {costs[1] * 1e6:,.0f} µs/msg,"
                     f" smtp-source {costs[2] * 1e6:,.0f} µs/msg")
            self.row(name, rate, ref, what, target, cpu=cpu, sink=sink)
            return rate, cpu, ref

        spread = lambda i: f"d{i % 1000}.bench.test"  # noqa: E731
        scenario("1 KB, no DKIM, one site", 1024, PLAIN, n(40_000), SITE, one, n(40_000))
        plain10 = scenario("10 KB, no DKIM, one site", 10_240, PLAIN, n(20_000), SITE, one, n(20_000), ">= 0.50")
        scenario("100 KB, no DKIM, one site", 102_400, PLAIN, n(4_000), SITE, one, n(4_000))
        rsa10 = scenario("10 KB, RSA-2048, one site", 10_240, RSA, n(8_000), SITE, one, "openssl", ">= 0.70")
        scenario("10 KB, RSA-2048 + ed25519, one site", 10_240, DUAL, n(8_000), SITE, one, "openssl")
        scenario("100 KB, RSA-2048, one site", 102_400, RSA, n(3_000), SITE, one, n(3_000), ">= 0.60")
        scenario("10 KB, no DKIM, 1,000 domains over 3 MX hosts", 10_240, PLAIN, n(20_000), spread, three, n(20_000))
        scenario("10 KB, RSA-2048, 1,000 domains over 3 MX hosts", 10_240, RSA, n(8_000), spread, three, "openssl")
        if rsa10 is not None:
            self.rows.append(("10 KB, RSA-2048, one site (absolute)", rsa10[0], "msg/s", 2500, "target 2,500 msg/s",
                              rsa10[0] / 2500, ">= 1.00", None))
        if rsa10 is not None and plain10 is not None:
            # What signing costs beyond its one indispensable part: Sluice's CPU per signed
            # message against a bare signature (openssl's one-core rate, from the signed row)
            # plus Sluice's CPU for the same message unsigned (from the unsigned row).
            bare = 1 / rsa10[2]
            self.row("CPU per message, 10 KB, RSA-2048, one site (µs)", rsa10[1] * 1e6, (bare + plain10[1]) * 1e6,
                     f"a bare RSA-2048 signature ({bare * 1e6:,.0f} µs, openssl) + the same message unsigned"
                     f" ({plain10[1] * 1e6:,.0f} µs)", "<= 1.10", unit="µs")

        # Campaigns that are not personalised: several recipients per message, signed once.
        # Both variants are counted the same way (recipients delivered, from the campaign's
        # counts), in turn.
        def merged(name, size, sender, count, domain_of):
            if not wanted(name):
                return
            log(f"{name} ...")
            rate = {}
            for personalised in (True, False):
                cid, _ = a.campaign(sender, size, people(domain_of, count), personalised)
                rate[personalised] = a.drained(cid, count)
            self.row(name, rate[False], rate[True], "the same campaign, personalised", unit="rcpt/s")

        merged("10 KB, no DKIM, not personalised, one domain", 10_240, PLAIN, n(20_000), SITE)
        merged("10 KB, RSA-2048, not personalised, one domain", 10_240, RSA, n(8_000), SITE)
        merged("10 KB, RSA-2048, not personalised, 1,000 domains", 10_240, RSA, n(8_000), spread)

        # Fairness: the same campaign beside a site that takes 5 s per message.
        if not wanted("10 KB, one site beside a slow site"):
            self.done(a)
            return
        log("fairness ...")
        count = n(20_000)
        alone, _ = deliveries(one, count, lambda: a.campaign(PLAIN, 10_240, people(SITE, count)))
        held, _ = a.campaign(PLAIN, 10_240, people(lambda i: "slow.bench.test", 200))
        beside, _ = deliveries(one, count, lambda: a.campaign(PLAIN, 10_240, people(SITE, count)))
        a.call("POST", f"/v1/campaigns/{held}/cancel")
        self.row("10 KB, one site beside a slow site (5 s per message)", beside, alone, "the same campaign alone")
        self.done(a)

    def transport(self):
        """Delivery to 1,000 domains with MTA-STS on (a TXT lookup beside each domain's MX
        lookup; none publishes a policy, as most do not) against the same with it off, two runs
        each, alternated, each node's first run with cold DNS caches."""
        log("transport ...")
        on = self.sluice("sts-on", 18048)
        off = self.sluice("sts-off", 18049, "[mta_sts]\nenabled = false\n")
        count = self.n(20_000)
        spread = lambda i: f"d{i % 1000}.bench.test"  # noqa: E731
        rate = {"on": 0.0, "off": 0.0}
        for which, s in (("off", off), ("on", on), ("off", off), ("on", on)):
            r, _ = deliveries(self.three, count, lambda: s.campaign(PLAIN, 10_240, people(spread, count)))
            log(f"  MTA-STS {which}: {r:,.0f} msg/s")
            rate[which] += r / 2
        self.row("10 KB, no DKIM, 1,000 domains over 3 MX hosts, MTA-STS on", rate["on"], rate["off"],
                 "the same with MTA-STS off (two runs each, alternated)", ">= 0.95")
        self.done(on)
        self.done(off)

    def tenants(self):
        """Ingest, then delivery, with 100 tenants configured and the campaigns posted by ten of
        them, against one tenant posting them all: ten campaigns of a tenth each, uploaded while
        the site is suspended (so ingest is measured alone), then delivered; three runs each,
        alternated."""
        log("tenants ...")

        def tenants(k):
            return "".join(f'[[tenant]]\nname = "t{i}"\napi_keys = ["{TENANT_KEY}{i}"]\n'
                           f'sending_domains = ["*.bench.test"]\n' for i in range(k))

        one = self.sluice("tenants-1", 18050, tenants(1))
        many = self.sluice("tenants-100", 18051, tenants(100))
        count = self.n(100_000) // 10 * 10
        runs = 3
        ingest = {1: 0.0, 100: 0.0}
        rate = {1: 0.0, 100: 0.0}
        # A warm-up run on each (not counted): a fresh spool's first uploads are slower.
        for run, (k, s) in enumerate([(1, one), (100, many)] * (runs + 1)):
            warm = run >= 2
            s.call("POST", "/v1/domains/one.bench.test/suspend")
            uploads = 0.0
            for j in range(10):
                s.key = f"{TENANT_KEY}{j % k}"
                s.campaign(PLAIN, 10_240, people(SITE, count // 10, offset=(run * 10 + j) * count))
                uploads += s.upload_seconds
            s.key = KEY
            r, _ = deliveries(self.one, count, lambda: s.call("POST", "/v1/domains/one.bench.test/resume"))
            log(f"  {k} tenant(s): ingest {count / uploads:,.0f} rcpt/s, delivery {r:,.0f} msg/s"
                + ("" if warm else " (warm-up)"))
            if warm:
                ingest[k] += count / uploads / runs
                rate[k] += r / runs
        same = f"the same from 1 tenant configured ({runs} runs each, alternated)"
        self.row("ingest, 10 campaigns from 10 of 100 tenants", ingest[100], ingest[1], same, ">= 0.95",
                 unit="rcpt/s")
        self.row("10 KB, no DKIM, one site, from 10 of 100 tenants", rate[100], rate[1], same, ">= 0.95")
        self.done(one)
        self.done(many)

    def domains(self):
        """CPU per message to 10 and to 10,000 domains over the same 3 MX hosts."""
        log("domains ...")
        a = self.sluice("domains", 18032)
        count = self.n(30_000)
        cpu = {10: 0.0, MANY: 0.0}
        # One message to each domain first, so that both runs find their MX answers cached.
        deliveries(self.three, MANY, lambda: a.campaign(PLAIN, 1024, people(lambda i: f"d{i}.bench.test", MANY)))
        # Alternated and averaged, so a slow moment of the machine does not fall on one side only.
        # RocksDB's flushes are left out (see `foreground`): the runs come in a fixed order, so
        # the memtable fills in the same one each time.
        for domains in (10, MANY, 10, MANY):
            before = (a.cpu_seconds(), a.rocksdb_cpu_seconds())
            deliveries(self.three, count, lambda: a.campaign(PLAIN, 10_240,
                                                             people(lambda i: f"d{i % domains}.bench.test", count)))
            after = (a.cpu_seconds(), a.rocksdb_cpu_seconds())
            cpu[domains] += foreground(before, after, count, f"{domains:,} domains") / 2
        self.row(f"CPU per message, 10 KB to {MANY:,} domains (µs)", cpu[MANY] * 1e6, cpu[10] * 1e6,
                 "the same to 10 domains (two runs each, alternated); RocksDB flushes and compactions left out",
                 "<= 1.10",
                 unit="µs")
        self.done(a)

    def queue(self):
        """CPU per message with a million queued against the same with a small queue, and the
        resident memory a queued recipient costs. Two processes warmed the same way: one holds
        the million (its domain suspended, resumed for each of its windows), the other delivers
        campaigns of `small` recipients; their windows are alternated, three each, so a slow
        moment of the machine does not fall on one side only (two windows of the same kind a
        minute apart read up to 0.07 apart)."""
        log("queue at scale ...")
        one = self.one
        big = self.sluice("queue", 18033)
        ref = self.sluice("queue-ref", 18043)
        small = self.n(30_000)
        lo, hi = small // 10, small - small // 10
        offset = [0]

        def campaign(s, count):
            offset[0] += count
            return s.campaign(PLAIN, 10_240, people(SITE, count, offset=offset[0]))

        # Warm-up of both (connections, DNS cache, allocator): the same deliveries each.
        for s in (big, ref):
            deliveries(one, 2000, lambda: s.campaign(PLAIN, 1024, people(SITE, 2000, offset=2 * 10**7)))
            deliveries(one, small, lambda: campaign(s, small))
        time.sleep(2)
        idle = big.rss_bytes()
        big.call("POST", "/v1/domains/one.bench.test/suspend")
        _, accepted = big.campaign(PLAIN, 10_240, people(SITE, self.args.queue, offset=10**7))
        ingest = accepted / big.upload_seconds
        # RocksDB flushes and compacts the upload in the background: that is ingest's cost, so
        # delivery is measured once the spool is quiet.
        settled = big.settle()
        queued = big.rss_bytes()
        per_recipient = (queued - idle) / accepted

        def quiet():
            # Until the sink has had nothing for half a second: the messages a suspended domain's
            # lanes had in flight are not counted in the next window.
            while True:
                n = total(one)
                time.sleep(0.5)
                if total(one) == n:
                    return

        def resumed():
            big.call("POST", "/v1/domains/one.bench.test/resume")

        runs = 3
        per = {"small": 0.0, "big": 0.0}
        for run in range(runs):
            for which, s, start in (("small", ref, lambda: campaign(ref, small)), ("big", big, resumed)):
                _, cpu = deliveries(one, hi, start, sluice=s, marks=(lo, hi))
                if which == "big":
                    big.call("POST", "/v1/domains/one.bench.test/suspend")
                quiet()
                what = f"{small:,} queued" if which == "small" else f"{accepted:,} queued"
                per[which] += foreground(cpu[lo], cpu[hi], hi - lo, what) / runs
        self.row(f"CPU per message, {accepted:,} queued (µs)", per["big"] * 1e6, per["small"] * 1e6,
                 f"the same with {small:,} queued, in another process ({runs} windows each, alternated); "
                 "RocksDB flushes and compactions left out", "<= 1.10", unit="µs")
        self.rows.append((f"resident memory per queued recipient, {accepted:,} queued", per_recipient, "bytes",
                          idle / 2**20, "idle resident set (MiB)", float("nan"), "<= 300 bytes", None))
        self.rows.append((f"ingest of {accepted:,} recipients (one NDJSON request)", ingest, "rcpt/s",
                          float("nan"), f"then {settled:.1f} s until the spool was quiet", float("nan"), None, None))
        self.done(big)
        self.done(ref)

    def sources(self):
        """The same campaign from one egress source and from a pool of three (127.0.0.61-63,
        weight 1 each), in two processes, alternated and averaged."""
        log("sources ...")
        three = "".join(
            f'[[source]]\nname = "s{i}"\naddress = "127.0.0.6{i}"\nehlo_name = "s{i}.bench.sluice.test"\n'
            for i in (1, 2, 3))
        single = Sluice(self.work, "one-source", 18034)
        pooled = Sluice(self.work, "three-sources", 18035, three)
        self.procs += [single, pooled]
        count = self.n(20_000)
        rate = {"one": 0.0, "three": 0.0}
        for which, s in (("one", single), ("three", pooled)):
            # Warm-up: connections, DNS cache, allocator.
            deliveries(self.one, 2000, lambda: s.campaign(PLAIN, 1024, people(SITE, 2000, offset=3 * 10**7)))
        for run, (which, s) in enumerate((("one", single), ("three", pooled), ("one", single), ("three", pooled))):
            r, _ = deliveries(self.one, count, lambda: s.campaign(PLAIN, 10_240,
                                                                   people(SITE, count, offset=run * count)))
            rate[which] += r / 2
        self.row("10 KB, no DKIM, one site, from a pool of three sources", rate["three"], rate["one"],
                 "the same from one source (two runs each, alternated)", ">= 0.90")
        self.done(single)
        self.done(pooled)

    def submission(self):
        """SMTP submission: smtp-source (20 sessions, a new connection per message, as the issue
        of the listener asks) into the submission listener, each 250 after a synced commit, and
        delivered to smtp-sink, against the same smtp-source straight to smtp-sink; alternated,
        two runs each. The rate is the sink's, first message to last."""
        log("submission ...")
        port = 12589
        if not port_free("127.0.0.1", port):
            raise SystemExit(f"bench: 127.0.0.1:{port} is busy")
        s = self.sluice("submission", 18044,
                        f'[submission]\nlisten = "127.0.0.1:{port}"\ntrusted_networks = ["127.0.0.1/32"]\n')
        n = self.n(20_000)

        def source(target):
            return lambda: subprocess.Popen(
                ["smtp-source", "-s", "20", "-m", str(n), "-l", "10240", "-f", PLAIN,
                 "-t", f"someone@{SITE(0)}", target],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

        deliveries(self.one, 1000, deadline=60, start=lambda: subprocess.Popen(
            ["smtp-source", "-s", "20", "-m", "1000", "-l", "10240", "-f", PLAIN, "-t", f"someone@{SITE(0)}",
             f"127.0.0.1:{port}"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        rate = {"direct": 0.0, "listener": 0.0}
        cpu = 0.0
        for run in range(4):
            time.sleep(1.5)
            which = ("direct", "listener")[run % 2]
            target = f"{MX['mx1']}:25" if which == "direct" else f"127.0.0.1:{port}"
            cpu0 = s.cpu_seconds()
            r, _ = deliveries(self.one, n, source(target))
            if which == "listener":
                cpu += (s.cpu_seconds() - cpu0) / n / 2
            log(f"  run {run + 1}: {which}: {r:,.0f} msg/s")
            rate[which] += r / 2
        self.row("10 KB submitted over SMTP, delivered (smtp-source -s 20, no -d)", rate["listener"],
                 rate["direct"], "smtp-source straight to smtp-sink, same options", ">= 0.50", cpu=cpu)
        self.done(s)

    def chunking(self):
        """BDAT against DATA (RFC 3030): the same campaign from a node that sends every message
        with BDAT when the receiver offers CHUNKING (`bdat_min_bytes = 0`) and from one that never
        does (`bdat = false`), alternated, two runs each, at 10 KB and 100 KB. The receiver is
        Postfix's smtpd, which offers CHUNKING, passing each message to smtp-sink (mx1, where it is
        counted) before answering. smtp-sink itself offers no CHUNKING, so against it every
        message goes over DATA either way."""
        log("chunking ...")
        postfix = Postfix(self.work, POSTFIX, f"{MX['mx1']}:25")
        try:
            bdat = self.sluice("bdat", 18046, delivery="bdat_min_bytes = 0")
            data = self.sluice("data", 18047, delivery="bdat = false")
            site = lambda i: "chunking.bench.test"  # noqa: E731
            for s in (bdat, data):
                deliveries(self.one, 500, lambda: s.campaign(PLAIN, 1024, people(site, 500)), deadline=60)
            before = postfix.commands("bdat")
            offset = 0
            for size, count in ((10_240, self.n(10_000)), (102_400, self.n(3_000))):
                rate = {"bdat": 0.0, "data": 0.0}
                cpu = {"bdat": 0.0, "data": 0.0}
                for run in range(4):
                    which, s = (("bdat", bdat), ("data", data))[run % 2]
                    offset += count
                    cpu0 = s.cpu_seconds()
                    r, _ = deliveries(self.one, count,
                                      lambda: s.campaign(PLAIN, size, people(site, count, offset=offset)))
                    cpu[which] += (s.cpu_seconds() - cpu0) / count / 2
                    log(f"  {size // 1024} KB, run {run + 1}: {which}: {r:,.0f} msg/s")
                    rate[which] += r / 2
                self.row(f"{size // 1024} KB, no DKIM, BDAT to Postfix smtpd", rate["bdat"], rate["data"],
                         f"the same over DATA (two runs each, alternated; CPU over DATA "
                         f"{cpu['data'] * 1e6:,.0f} µs/msg)", cpu=cpu["bdat"])
            # smtpd logs its command counts when a connection ends.
            self.done(bdat)
            self.done(data)
            time.sleep(1)
            used = postfix.commands("bdat") - before
            log(f"  Postfix counted {used:,} BDAT commands")
            if used == 0:
                raise SystemExit("bench: no message went over BDAT")
        finally:
            postfix.stop()

    def cluster(self):
        """Cluster mode's overhead: the same campaign through one node without `[cluster]`, split
        over three nodes sharing a six-process Redis Cluster, and split over three nodes without
        `[cluster]` (what three processes cost on this machine, whatever they share), alternated
        and averaged; and Redis commands per delivered message, from Redis's own INFO
        commandstats."""
        log("cluster ...")
        redis = RedisCluster(self.work, REDIS_PORTS)
        try:
            # 60 connections to the site, for the fleet in cluster mode and for each process
            # otherwise: with the bench's usual 20 split over three processes on two cores, a
            # cluster run measures how latency grows with three processes at a fixed concurrency,
            # not what coordinating costs.
            site = '[[rule]]\nmatch = "one.bench.test"\nmax_connections = 60\n'
            # smtp-sink serves at most 256 connections at once (the 257th waits for its
            # greeting): each group's pooled connections close a second after its run, before
            # the next group's opens 60 or 180.
            quick = 'idle_timeout = "1s"'
            solo = self.sluice("solo", 18036, site, quick)
            urls = ", ".join(f'"redis://127.0.0.1:{p}"' for p in REDIS_PORTS)
            nodes = [self.sluice(f"node{i}", 18037 + i,
                                 site + f'[cluster]\nnode_id = "node-{i}"\nredis = [{urls}]\n', quick)
                     for i in range(3)]
            plain = [self.sluice(f"plain{i}", 18040 + i, site, quick) for i in range(3)]
            count = self.n(30_000) // 3 * 3
            for s in (solo, *nodes, *plain):
                # Warm-up: connections, DNS cache, allocator.
                deliveries(self.one, 1000, lambda s=s: s.campaign(PLAIN, 1024, people(SITE, 1000, offset=4 * 10**7)))
                time.sleep(1.5)
            rate = {"solo": 0.0, "three": 0.0, "plain": 0.0}
            commands = delivered = 0

            def split(group, offset):
                def start_all():
                    threads = [threading.Thread(target=node.campaign, args=(
                        PLAIN, 10_240, people(SITE, count // 3, offset=offset + k * count)))
                        for k, node in enumerate(group)]
                    for t in threads:
                        t.start()
                    for t in threads:
                        t.join()
                return start_all

            for run in range(6):
                time.sleep(2.5)
                offset = 5 * 10**7 + run * count
                which = ("solo", "three", "plain")[run % 3]
                if which == "solo":
                    r, _ = deliveries(self.one, count, lambda: solo.campaign(
                        PLAIN, 10_240, people(SITE, count, offset=offset)))
                elif which == "plain":
                    r, _ = deliveries(self.one, count, split(plain, offset))
                else:
                    redis.reset_stats()
                    r, _ = deliveries(self.one, count, split(nodes, offset))
                    commands += redis.commands()
                    delivered += count
                log(f"  run {run + 1}: {which}: {r:,.0f} msg/s")
                rate[which] += r / 2
            self.row("10 KB, no DKIM, one site, split over 3 cluster nodes", rate["three"], rate["solo"],
                     "the same through one node without [cluster] (two runs each, alternated)", ">= 0.85")
            self.row("10 KB, no DKIM, one site, split over 3 nodes without [cluster]", rate["plain"],
                     rate["solo"], "the same through one node (what three processes cost on this machine)")
            self.row("Redis commands per 1,000 delivered messages (3 cluster nodes)",
                     1000 * commands / delivered, 50, "the target (0.05 per message)", "<= 50", unit="cmd")
            # A suppression import through one node, until the last entry is on every node.
            imported = self.n(1_000_000)
            csv = "".join(f"bench-import{i}@example.net,manual\n" for i in range(imported)).encode()
            started = time.monotonic()
            r = nodes[0].call("POST", "/v1/suppressions/import", raw=csv, ctype="text/csv")
            on_first = time.monotonic() - started
            if r.get("imported") != imported:
                raise SystemExit(f"bench: the import answered {r}")
            last = urllib.parse.quote(f"bench-import{imported - 1}@example.net")
            for node in nodes[1:]:
                while True:
                    try:
                        node.call("GET", f"/v1/suppressions/{last}")
                        break
                    except urllib.error.HTTPError as e:
                        if e.code != 404 or time.monotonic() - started > 600:
                            raise
                        time.sleep(0.05)
            everywhere = time.monotonic() - started
            self.row(f"{imported:,} suppressions imported through one node, on all 3 after",
                     everywhere * 1000, on_first * 1000, "the import's answer on the first node", unit="ms")
            for s in (solo, *nodes, *plain):
                self.done(s)
        finally:
            redis.stop()

    def report(self):
        print()
        # CPU per message: Sluice's and the sink's; cores: the share of the machine's cores the
        # two kept busy (rate × CPU per message), how close the row is to what the machine can do.
        print(f"{'scenario':<62} {'result':>14} {'reference':>16} {'ratio':>6}  {'target':<12} {'CPU µs/msg':>10}"
              f" {'sink µs/msg':>11} {'cores':>5}")
        for name, rate, unit, ref, what, ratio, target, cpu, *rest in self.rows:
            sink = rest[0] if rest else None
            cpu_s = f"{cpu * 1e6:,.0f}" if cpu is not None else ""
            sink_s = f"{sink * 1e6:,.0f}" if sink is not None else ""
            cores = f"{rate * (cpu + sink):.2f}" if cpu is not None and sink is not None else ""
            print(f"{name:<62} {rate:>8,.0f} {unit:<5} {ref:>16,.0f} {ratio:>6.2f}  {target or '':<12} {cpu_s:>10}"
                  f" {sink_s:>11} {cores:>5}")
            if what:
                print(f"{'':<64}reference: {what}")
        csv_path = self.args.csv
        os.makedirs(os.path.dirname(csv_path), exist_ok=True)
        with open(csv_path, "w") as f:
            f.write("scenario,result,unit,reference,reference_is,ratio,target,cpu_us_per_msg,sink_cpu_us_per_msg\n")
            for name, rate, unit, ref, what, ratio, target, cpu, *rest in self.rows:
                cpu_s = f"{cpu * 1e6:.1f}" if cpu is not None else ""
                sink_s = f"{rest[0] * 1e6:.1f}" if rest and rest[0] is not None else ""
                f.write(f'"{name}",{rate:.1f},{unit},{ref:.1f},"{what}",{ratio:.3f},"{target or ""}",{cpu_s},'
                        f'{sink_s}\n')
        log(f"written to {csv_path}")


class RedisCluster:
    """Six redis-server processes (three masters, three replicas) made a cluster on loopback."""

    # What Sluice sends itself; Redis also counts the commands its scripts run, and its own
    # replication and cluster housekeeping.
    CLIENT_COMMANDS = {"evalsha", "eval", "script|load", "zrem", "xadd", "xrange", "wait"}

    def __init__(self, work, ports):
        self.ports = ports
        self.procs = []
        for p in ports:
            d = f"{work}/redis-{p}"
            os.makedirs(d)
            self.procs.append(subprocess.Popen(
                ["redis-server", "--port", str(p), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--dir", d, "--save", "", "--appendonly", "no",
                 "--logfile", f"{d}/redis.log"]))
        for p in ports:
            while self.cli(p, "ping").strip() != "PONG":
                time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create", *(f"127.0.0.1:{p}" for p in ports),
                        "--cluster-replicas", "1", "--cluster-yes"], check=True, capture_output=True)
        while not all("cluster_state:ok" in self.cli(p, "cluster", "info") for p in ports):
            time.sleep(0.1)

    @staticmethod
    def cli(port, *args):
        return subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True).stdout

    def reset_stats(self):
        for p in self.ports:
            self.cli(p, "config", "resetstat")

    def commands(self):
        n = 0
        for p in self.ports:
            for m in re.finditer(r"^cmdstat_([^:]+):calls=(\d+)", self.cli(p, "info", "commandstats"), re.M):
                if m.group(1) in self.CLIENT_COMMANDS:
                    n += int(m.group(2))
        return n

    def stop(self):
        for p in self.procs:
            p.kill()
            p.wait()


REDIS_PORTS = [17000, 17001, 17002, 17003, 17004, 17005]

PLAIN, RSA, DUAL = "news@plain.bench.test", "news@rsa.bench.test", "news@dual.bench.test"
MANY = 10_000


def SITE(i):
    return "one.bench.test"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--scale", type=float, default=1.0, help="multiplies every message count")
    ap.add_argument("--queue", type=int, default=1_000_000, help="recipients of the queue-at-scale run")
    ap.add_argument("--only", choices=["rates", "transport", "tenants", "domains", "queue", "sources", "submission",
                                       "chunking", "cluster"],
                    action="append",
                    help="run only this part (repeatable)")
    ap.add_argument("--rows", metavar="TEXT",
                    help="in the rates part, run only the scenarios whose name contains TEXT (or one of several"
                         " TEXTs separated by |)")
    ap.add_argument("--csv", default=os.path.join(ROOT, "target", "bench", "bench.csv"))
    args = ap.parse_args()
    bench = Bench(args)
    try:
        for part in ("rates", "transport", "tenants", "domains", "queue", "sources", "submission", "chunking",
                     "cluster"):
            if not args.only or part in args.only:
                getattr(bench, part)()
    finally:
        bench.stop()
    bench.report()


if __name__ == "__main__":
    main()
