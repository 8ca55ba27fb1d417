"""Data-lifecycle benchmark; run through `scripts/bench-lifecycle`, which installs the peers and
builds. Two parts, each figure a ratio to a reference measured in the same run:

  restart   A node that has delivered --history recipients (1 KB, "personalised": false) and has
            --queued more queued (a paused campaign), restarted: seconds until /readyz answers
            and resident memory once settled, against a node that never sent anything and has
            the same number queued. Restarts alternate between the two nodes, three each; the
            medians are compared. Then the history node is restarted with short retention
            settings, and its spool's size on disk once retention has run is compared with its
            size before.
  messages  POST /v1/messages at --rate per second for --seconds (HTTP keep-alive clients on
            loopback, 1 KB messages to smtp-sink) with short retention settings (5 s buckets and
            tombstones): resident memory and spool size sampled every 5 s. The peak of each over
            the second half of the run is compared with its peak over the first: about 1 when
            they level off, about 2 if they grew with every message.

Writes the table to stdout and target/bench/lifecycle.csv.
"""

import argparse
import http.client
import json
import os
import re
import statistics
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import (  # noqa: E402
    DNS_PORT,
    KEY,
    MX,
    PLAIN,
    ROOT,
    Sink,
    Sluice,
    log,
    make_keys,
    people,
    port_free,
    start_nsd,
)

SHORT_RETENTION = """[retention]
job_tombstones = "5s"
campaigns = "10s"
message_buckets = "5s"
interval = "1s"
"""


def du(path):
    """Bytes of the files under `path`."""
    n = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                n += os.stat(os.path.join(root, f)).st_size
            except FileNotFoundError:
                pass
    return n


RESTARTS = 5


def last_recovery_seconds(s):
    """The recovery time of the node's last start, from its log."""
    found = float("nan")
    with open(f"{s.dir}/sluice.log", errors="replace") as f:
        for line in f:
            if "recovery done" in line:
                m = re.search(r'seconds="([0-9.]+)"', line)
                if m:
                    found = float(m.group(1))
    return found


def settled_rss(s):
    s.settle()
    return s.rss_bytes()


class Lifecycle:
    def __init__(self, args):
        self.args = args
        self.work = args.work
        self.rows = []
        self.procs = []
        if not port_free(MX["mx1"], 25):
            raise SystemExit(f"bench: {MX['mx1']}:25 is busy")
        if not port_free("127.0.0.1", DNS_PORT):
            raise SystemExit(f"bench: 127.0.0.1:{DNS_PORT} is busy")
        make_keys(self.work)
        self.nsd = start_nsd(self.work, 10)
        self.sink = Sink(MX["mx1"])

    def sluice(self, name, port, extra=""):
        s = Sluice(self.work, name, port, extra)
        self.procs.append(s)
        # Info level from the next start on: the log then says how long recovery took.
        with open(f"{s.dir}/sluice.toml") as f:
            cfg = f.read()
        with open(f"{s.dir}/sluice.toml", "w") as f:
            f.write(cfg.replace('level = "warn"', 'level = "info"'))
        return s

    def stop(self):
        for p in self.procs:
            if p.proc.poll() is None:
                p.stop()
        self.sink.stop()
        os.killpg(self.nsd.pid, 15)

    def row(self, name, value, unit, ref, what, target):
        ratio = value / ref if ref else float("nan")
        self.rows.append((name, value, unit, ref, what, ratio, target))
        log(f"  {name}: {value:,.3f} {unit}, reference {ref:,.3f} ({what}), ratio {ratio:.2f}")

    def queue_paused(self, s, n, offset):
        """Queues `n` recipients in a paused campaign (the domain is suspended while they are
        uploaded, so none leaves)."""
        s.call("POST", "/v1/domains/one.bench.test/suspend")
        cid, accepted = s.campaign(PLAIN, 1024, people(lambda i: "one.bench.test", n, offset), personalised=False)
        s.call("POST", f"/v1/campaigns/{cid}/pause")
        s.call("POST", "/v1/domains/one.bench.test/resume")
        return cid, accepted

    def restart(self):
        a = self.args
        log(f"restart after {a.history:,} delivered, {a.queued:,} queued ...")
        h = self.sluice("history", 18041, '[retention]\njob_tombstones = "30d"\ncampaigns = "90d"\n')
        started = time.monotonic()
        cid, accepted = h.campaign(PLAIN, 1024, people(lambda i: "one.bench.test", a.history), personalised=False)
        h.drained(cid, accepted, deadline=3600)
        log(f"  {accepted:,} delivered in {time.monotonic() - started:.0f} s")
        self.queue_paused(h, a.queued, 10**8)
        h.stop()
        r = self.sluice("fresh", 18042)
        self.queue_paused(r, a.queued, 10**8)
        r.stop()
        spool_before = du(f"{h.dir}/spool")

        ready = {"history": [], "fresh": []}
        rss = {"history": [], "fresh": []}
        recovery = {"history": [], "fresh": []}
        for _ in range(RESTARTS):
            for name, s in (("history", h), ("fresh", r)):
                ready[name].append(s.start())
                rss[name].append(settled_rss(s))
                s.stop()
                recovery[name].append(last_recovery_seconds(s))
        for what, d in (("/readyz seconds", ready), ("recovery seconds", recovery), ("RSS", rss)):
            log(f"  {what}: history {[round(x, 3) for x in d['history']]}, fresh {[round(x, 3) for x in d['fresh']]}")
        med = {k: statistics.median(v) for k, v in ready.items()}
        self.row(f"/readyz after restart, {accepted:,} sent + {a.queued:,} queued (s)", med["history"], "s",
                 med["fresh"], f"a node that never sent, {a.queued:,} queued (median of {RESTARTS})", "<= 1.2")
        med = {k: statistics.median(v) for k, v in recovery.items()}
        self.row("  of which recovery, as the node logs it (ms)", med["history"] * 1e3, "ms",
                 med["fresh"] * 1e3, f"the same for the node that never sent (median of {RESTARTS})", "<= 1.2")
        m = {k: statistics.median(v) for k, v in rss.items()}
        self.row("resident memory after restart (MiB)", m["history"] / 2**20, "MiB",
                 m["fresh"] / 2**20, f"the same for the node that never sent (median of {RESTARTS})", "<= 1.2")

        # Retention with short settings: the delivered campaign's tombstones, histories and
        # templates go; the paused one stays.
        with open(f"{h.dir}/sluice.toml") as f:
            cfg = f.read()
        cfg = cfg.replace('job_tombstones = "30d"', 'job_tombstones = "1s"').replace(
            'campaigns = "90d"', 'campaigns = "1s"\ninterval = "1s"')
        with open(f"{h.dir}/sluice.toml", "w") as f:
            f.write(cfg)
        h.start()
        deadline = time.monotonic() + 600
        while "compacted_at" not in h.call("GET", f"/v1/campaigns/{cid}"):
            if time.monotonic() > deadline:
                raise SystemExit("bench: retention did not run")
            time.sleep(0.5)
        h.settle()
        h.stop()
        spool_after = du(f"{h.dir}/spool")
        self.row("spool on disk after retention (MiB)", spool_after / 2**20, "MiB", spool_before / 2**20,
                 f"before retention, {accepted:,} tombstones and histories", None)
        log(f"  disk per million delivered before retention: "
            f"{(spool_before - du(f'{r.dir}/spool')) / accepted * 1e6 / 2**20:,.0f} MiB")

    def messages(self):
        a = self.args
        log(f"/v1/messages at {a.rate:,}/s for {a.seconds} s ...")
        m = self.sluice("messages", 18043, SHORT_RETENTION)
        line = "Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmod.\n"
        text = "Hello {{ name }},\n" + (line * 14)[:980]
        sent = [0]
        errors = [0]
        stop = threading.Event()
        lock = threading.Lock()
        clients = 32
        start = time.monotonic()

        def client(k):
            conn = http.client.HTTPConnection(m.api, timeout=30)
            i = k
            while not stop.is_set():
                due = start + i / a.rate
                now = time.monotonic()
                if now - start >= a.seconds:
                    break
                if due > now:
                    time.sleep(due - now)
                body = json.dumps({"from": PLAIN, "subject": "Receipt {{ name }}", "text": text,
                                   "to": f"m{i}@one.bench.test", "vars": {"name": f"N{i}"},
                                   "stream": "receipts"})
                try:
                    conn.request("POST", "/v1/messages", body=body,
                                 headers={"Authorization": f"Bearer {KEY}",
                                          "Content-Type": "application/json"})
                    resp = conn.getresponse()
                    resp.read()
                    ok = resp.status == 202
                except (OSError, http.client.HTTPException):
                    conn.close()
                    conn = http.client.HTTPConnection(m.api, timeout=30)
                    ok = False
                with lock:
                    if ok:
                        sent[0] += 1
                    else:
                        errors[0] += 1
                i += clients

        threads = [threading.Thread(target=client, args=(k,), daemon=True) for k in range(clients)]
        for t in threads:
            t.start()
        samples = []
        base_sink = self.sink.count
        spool = f"{m.dir}/spool"
        while True:
            t = time.monotonic() - start
            samples.append((t, sent[0], self.sink.count - base_sink, m.rss_bytes(), du(spool)))
            if t >= a.seconds + 15:
                break
            time.sleep(5)
        stop.set()
        for t in threads:
            t.join()
        print()
        print(f"{'t (s)':>6} {'accepted':>9} {'delivered':>9} {'RSS MiB':>8} {'spool MiB':>9}")
        for t, s_, d, rss, disk in samples:
            print(f"{t:>6.0f} {s_:>9,} {d:>9,} {rss / 2**20:>8.1f} {disk / 2**20:>9.1f}")
        os.makedirs(os.path.dirname(self.args.csv), exist_ok=True)
        with open(os.path.join(os.path.dirname(self.args.csv), "lifecycle-messages.csv"), "w") as f:
            f.write("seconds,accepted,delivered,rss_bytes,spool_bytes\n")
            for row in samples:
                f.write(",".join(str(round(x, 1)) for x in row) + "\n")
        rate = sent[0] / a.seconds
        log(f"  {sent[0]:,} accepted ({rate:,.0f}/s), {errors[0]} errors")
        # The peak of the second half of the sending against the peak of the first: about 1 when
        # they level off, about 2 when they grow with every message.
        half = a.seconds / 2
        first = [s for s in samples if s[0] <= half + 1]
        second = [s for s in samples if half + 1 < s[0] <= a.seconds + 1]
        for name, k in (("spool on disk", 4), ("resident memory", 3)):
            self.row(f"{name}, peak over the 2nd half of {a.seconds} s of /v1/messages (MiB)",
                     max(s[k] for s in second) / 2**20, "MiB", max(s[k] for s in first) / 2**20,
                     "peak over the 1st half (growth per message would double it)", "~1, not 2")
        self.rows.append((f"/v1/messages accepted ({a.rate:,}/s offered)", rate, "msg/s", float(a.rate),
                          f"{errors[0]} errors", rate / a.rate, None))
        m.stop()

    def report(self):
        print()
        print(f"{'scenario':<66} {'result':>12} {'reference':>12} {'ratio':>6}  {'target':<12}")
        for name, value, unit, ref, what, ratio, target in self.rows:
            print(f"{name:<66} {value:>8,.2f} {unit:<4}{ref:>12,.2f} {ratio:>6.2f}  {target or '':<12}")
            if what:
                print(f"{'':<68}reference: {what}")
        os.makedirs(os.path.dirname(self.args.csv), exist_ok=True)
        with open(self.args.csv, "w") as f:
            f.write("scenario,result,unit,reference,reference_is,ratio,target\n")
            for name, value, unit, ref, what, ratio, target in self.rows:
                f.write(f'"{name}",{value:.3f},{unit},{ref:.3f},"{what}",{ratio:.3f},"{target or ""}"\n')
        log(f"written to {self.args.csv}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", required=True)
    ap.add_argument("--history", type=int, default=2_000_000, help="recipients delivered before the restart")
    ap.add_argument("--queued", type=int, default=10_000, help="recipients queued at the restart")
    ap.add_argument("--rate", type=int, default=2000, help="/v1/messages per second")
    ap.add_argument("--seconds", type=int, default=60, help="length of the /v1/messages run")
    ap.add_argument("--only", choices=["restart", "messages"], action="append")
    ap.add_argument("--csv", default=os.path.join(ROOT, "target", "bench", "lifecycle.csv"))
    args = ap.parse_args()
    bench = Lifecycle(args)
    try:
        for part in ("restart", "messages"):
            if not args.only or part in args.only:
                getattr(bench, part)()
    finally:
        bench.stop()
    bench.report()


if __name__ == "__main__":
    main()
