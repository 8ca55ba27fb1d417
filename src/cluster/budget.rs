//! Cluster-wide limits of a (source, site): message rates as reservations on a GCRA kept in
//! Redis, and connection counts as leases with an expiry.
//!
//! **Rates.** A node reserves a run of the budget's next slots in one script call (`RESERVE`):
//! twice what it spent of the last run (so it ramps up in a few calls and one that cannot send
//! reserves little), at most a third of a short horizon (at least 300 ms, at least two slots),
//! no further ahead of the cluster's schedule than the horizon. It then spends those slots
//! locally, one message per slot at the slot's time ([`SharedRate::try_take`]), so the receiver
//! sees the configured rate however the nodes interleave, and Redis sees one call per run of
//! slots. Slots a node lets pass unused are lost (the limit is an upper bound). While the node
//! is degraded, a local limiter at its share of the rate ([`super::Cluster::local_share`])
//! stands in, from when the others count the node silent
//! ([`super::Cluster::local_share_from`]); while peers may be degraded, a connected node
//! reserves slots spaced for the rate less their shares ([`super::Cluster::connected_rate`]),
//! so each slot takes more of the schedule.
//!
//! **Connections.** A connection holds a lease: a member of a sorted set per (source, site),
//! scored by its expiry. Taking one (`ACQUIRE`) drops expired members and adds one if fewer than
//! the limit remain and, while other nodes wait for a lease, the node holds less than its fair
//! share. The node renews all of its leases every third of their lifetime (at least every
//! second, which also tells it whether other nodes wait) and drops each lease when its
//! connection closes (pooled connections with a lease close after a second idle). A node that
//! dies frees its leases when they expire. A refused node does not ask again for a tenth of a
//! second unless it frees a lease of its own meanwhile. A connection that replaces another of
//! the same (source, site) takes over its lease, and a connection that runs out of work keeps
//! its lease in the pool, unless other nodes wait for a place (`KEEP`, asked only while this
//! node has lately seen others waiting: refused itself, or told by `ACQUIRE` or the renewal):
//! then a connection with nothing to do gives its place back, and so does a connection of a
//! node over its fair share, when it is replaced or after a transaction, so a node that got
//! there first does not keep the site's connections from the others. The node runs as many lanes for a site as it holds leases, plus one to ask for the
//! next (see `outbound::delivery`'s lanes), so a lane waiting for a place holds no more than one
//! batch of jobs.
//!
//! Keys hash-tag the (source, site), so each script touches one slot.

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};
use std::time::Duration;

use super::{Cluster, Unavailable};
use crate::scheduler::rate::Gcra;

/// The server's clock in ms as `now`, first in every script: slots and expiries are on one
/// clock whichever node asks.
const NOW: &str = "local t = redis.call('TIME')\nlocal now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)\n";

fn script(body: &str) -> redis::Script {
    redis::Script::new(&format!("{NOW}{body}"))
}

/// What the lease scripts ask of a (source, site)'s keys: how many nodes other than `node`
/// wait for a place (wishes in `wanted` not yet expired), and how many of the leases in
/// `leases` are `node`'s (members are `<node>:<n>`).
const LEASE_COUNTS: &str = r"
local function others_waiting(wanted, node)
  local n = 0
  for _, w in ipairs(redis.call('ZRANGEBYSCORE', wanted, '(' .. now, '+inf')) do
    if w ~= node then n = n + 1 end
  end
  return n
end
local function held_by(leases, node)
  local prefix = node .. ':'
  local n = 0
  for _, m in ipairs(redis.call('ZRANGE', leases, 0, -1)) do
    if string.sub(m, 1, #prefix) == prefix then n = n + 1 end
  end
  return n
end
";

fn lease_script(body: &str) -> redis::Script {
    script(&format!("{LEASE_COUNTS}{body}"))
}

/// Reserves up to `want` slots of `interval` ms no further than `horizon` ms ahead of the
/// server's clock. Returns `{count, server now, first slot (ms, as text)}`; with count 0 the
/// first slot is when the schedule is next free.
static RESERVE: LazyLock<redis::Script> = LazyLock::new(|| {
    script(
        r"
local interval = tonumber(ARGV[1])
local horizon = tonumber(ARGV[2])
local want = tonumber(ARGV[3])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local k = math.floor((now + horizon - tat) / interval)
if k > want then k = want end
if k < 1 then return {0, now, string.format('%.3f', tat - horizon + interval)} end
local after = tat + k * interval
redis.call('SET', KEYS[1], string.format('%.3f', after), 'PX', math.ceil(after - now) + 1000)
return {k, now, string.format('%.3f', tat)}
",
    )
});

/// Takes lease `ARGV[3]` for node `ARGV[4]`, for `ARGV[2]` ms, if fewer than `ARGV[1]` live
/// ones are held and, while other nodes wait for one (`KEYS[2]`, their wish kept `ARGV[5]` ms),
/// the node holds fewer than its fair share. A refused node records its wish. Answers
/// `{taken (0 or 1), other nodes waiting}`.
static ACQUIRE: LazyLock<redis::Script> = LazyLock::new(|| {
    lease_script(
        r"
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local node = ARGV[4]
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
local mine = held_by(KEYS[1], node)
local others = others_waiting(KEYS[2], node)
if held >= limit or (others > 0 and mine >= math.ceil(limit / (others + 1))) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), node)
  redis.call('PEXPIRE', KEYS[2], ttl)
  return {0, others}
end
redis.call('ZREM', KEYS[2], node)
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return {1, others}
",
    )
});

/// Keeps lease `ARGV[3]` of node `ARGV[4]` (renewed for `ARGV[2]` ms) unless other nodes wait
/// for one and either the connection has nothing to do (`ARGV[5]` = 1) or the node holds more
/// than its fair share of the `ARGV[1]` places: then the lease is given back. Answers `{kept (0
/// or 1), other nodes waiting}`.
static KEEP: LazyLock<redis::Script> = LazyLock::new(|| {
    lease_script(
        r"
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
local member = ARGV[3]
local node = ARGV[4]
if not redis.call('ZSCORE', KEYS[1], member) then return {0, 0} end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local others = others_waiting(KEYS[2], node)
local give = false
if others > 0 then
  give = ARGV[5] == '1' or held_by(KEYS[1], node) > math.ceil(limit / (others + 1))
end
if give then
  redis.call('ZREM', KEYS[1], member)
  return {0, others}
end
redis.call('ZADD', KEYS[1], now + ttl, member)
return {1, others}
",
    )
});

/// Extends the leases `ARGV[3..]` of node `ARGV[2]` by `ARGV[1]` ms; answers how many other
/// nodes wait for one.
static RENEW: LazyLock<redis::Script> = LazyLock::new(|| {
    lease_script(
        r"
local ttl = tonumber(ARGV[1])
for i = 3, #ARGV do redis.call('ZADD', KEYS[1], now + ttl, ARGV[i]) end
redis.call('PEXPIRE', KEYS[1], ttl * 2)
return others_waiting(KEYS[2], ARGV[2])
",
    )
});

/// How late a reserved slot may still be spent: a tenth of a second, the burst every local
/// limiter allows too.
const LATENESS_MS: f64 = 100.0;

/// The Redis keys of a (source, site): `source` is `*` when the limits count per site.
pub fn keys(site: &str, source: &str) -> (String, String) {
    let tag = format!("{{{site}|{source}}}");
    (format!("sluice:rate:{tag}"), format!("sluice:conns:{tag}"))
}

/// A message rate shared by the cluster, as this node spends it.
pub struct SharedRate {
    key: String,
    /// Messages per second, cluster-wide.
    rate: f64,
    state: Mutex<RateState>,
}

/// Slots reserved and not yet spent.
struct Run {
    /// The next slot's time on the local clock, in ms.
    next: f64,
    left: u32,
    /// Between two slots, in ms: the interval the run was reserved at.
    interval: f64,
}

struct RateState {
    /// Runs of slots reserved and not yet spent, in order.
    runs: VecDeque<Run>,
    /// A reservation call is under way.
    asking: bool,
    /// Not before this (the schedule was full, or Redis failed).
    retry_at_ms: u64,
    /// Slots spent since the last reservation: the next asks for twice that (up to a third of
    /// the horizon), so a node that cannot spend what it reserves (no connection) reserves
    /// little, and a busy one ramps up in a few calls.
    spent: u32,
    /// Stands in while degraded: the local share, for the number of nodes it was built for.
    local: Option<(usize, Gcra)>,
}

impl RateState {
    fn left(&self) -> u32 {
        self.runs.iter().map(|r| r.left).sum()
    }
}

impl SharedRate {
    pub fn new(key: String, rate: f64) -> SharedRate {
        SharedRate {
            key,
            rate: rate.max(1e-6),
            state: Mutex::new(RateState {
                runs: VecDeque::new(),
                asking: false,
                retry_at_ms: 0,
                spent: 0,
                local: None,
            }),
        }
    }

    /// Between two slots, in ms, for a rate of `rate` a second.
    fn interval_ms(rate: f64) -> f64 {
        1000.0 / rate.max(1e-6)
    }

    fn horizon_ms(interval: f64) -> f64 {
        (interval * 2.0).max(300.0)
    }

    /// Takes one message's slot at `now` (ms), or says how long to wait. Never waits for Redis:
    /// when the reserved slots run low it asks for more in the background.
    pub fn try_take(self: &Arc<Self>, cluster: &Arc<Cluster>, now: u64) -> Option<Duration> {
        let mut s = self.state.lock().expect("shared rate");
        if cluster.degraded() {
            s.runs.clear();
            // Not before the others have left this node's share out of theirs.
            let from = cluster.local_share_from();
            if now < from {
                return Some(Duration::from_millis(from - now));
            }
            let nodes = cluster.alive_nodes();
            if s.local.as_ref().is_none_or(|(n, _)| *n != nodes) {
                s.local = Some((nodes, Gcra::per_second(cluster.local_share(self.rate))));
            }
            let (_, gcra) = s.local.as_mut().expect("just set");
            if gcra.try_take(now) {
                return None;
            }
            return Some(Duration::from_millis(
                gcra.next_allowed().saturating_sub(now).max(1),
            ));
        }
        s.local = None;
        let nowf = now as f64;
        // Slots that passed unused are gone; a slot is still spent up to LATENESS_MS (or two
        // slots) after its time, so a node's run need not keep the cluster's full pace. Over
        // any window the cluster sends at most LATENESS_MS more of its rate.
        while let Some(run) = s.runs.front_mut() {
            let lateness = (2.0 * run.interval).max(LATENESS_MS);
            let late = ((nowf - run.next - lateness) / run.interval).ceil();
            if late >= 1.0 {
                let missed = (late as u64).min(u64::from(run.left)) as u32;
                run.left -= missed;
                run.next += f64::from(missed) * run.interval;
            }
            if run.left == 0 {
                s.runs.pop_front();
            } else {
                break;
            }
        }
        let answer = match s.runs.front_mut() {
            Some(run) if run.next <= nowf => {
                run.left -= 1;
                run.next += run.interval;
                if run.left == 0 {
                    s.runs.pop_front();
                }
                s.spent += 1;
                None
            }
            Some(run) => Some(Duration::from_millis((run.next - nowf).ceil() as u64)),
            // Nothing reserved: wait for the reservation under way (or the retry time).
            None => Some(Duration::from_millis(
                s.retry_at_ms.saturating_sub(now).max(2),
            )),
        };
        // Ask ahead, when what is left covers less than half a reservation (at the full rate:
        // the rate left by silent peers is worked out only for the call).
        let want =
            (s.spent.saturating_mul(2)).clamp(1, Self::max_want(Self::interval_ms(self.rate)));
        if !s.asking && now >= s.retry_at_ms && f64::from(s.left()) < f64::from(want) / 2.0 {
            s.asking = true;
            s.spent = 0;
            let interval = Self::interval_ms(cluster.connected_rate(self.rate));
            let want = want.min(Self::max_want(interval));
            let me = Arc::clone(self);
            let cluster = Arc::clone(cluster);
            tokio::spawn(async move { me.reserve(&cluster, interval, want).await });
        }
        answer
    }

    /// The most slots asked for per call: a third of the horizon.
    fn max_want(interval: f64) -> u32 {
        (Self::horizon_ms(interval) / interval / 3.0)
            .ceil()
            .max(1.0) as u32
    }

    async fn reserve(&self, cluster: &Cluster, interval: f64, want: u32) {
        let key = self.key.clone();
        let horizon = Self::horizon_ms(interval);
        let got: Result<(u32, u64, String), Unavailable> = cluster
            .call(|mut c| async move {
                RESERVE
                    .key(key)
                    .arg(interval)
                    .arg(horizon)
                    .arg(want)
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        let now = crate::now_ms();
        let mut s = self.state.lock().expect("shared rate");
        s.asking = false;
        match got {
            Ok((count, server_now, first)) => {
                // Server times to local ones: the answer came back at about the server's now.
                let first: f64 = first.parse().unwrap_or(server_now as f64);
                let local_first = now as f64 + (first - server_now as f64);
                if count == 0 {
                    s.retry_at_ms = local_first.max(now as f64 + 1.0) as u64;
                } else {
                    s.runs.push_back(Run {
                        next: local_first,
                        left: count,
                        interval,
                    });
                    s.retry_at_ms = 0;
                }
            }
            Err(_) => s.retry_at_ms = now + 10,
        }
    }
}

/// How long after Redis refused a lease (all held) this node asks again for that key, unless
/// it frees one of its own meanwhile: waiting lanes must not poll Redis.
const REFUSED_BACKOFF_MS: u64 = 100;

/// The leases this node holds: key → members; until when each refused key is not asked; until
/// when each key counts as contended, and how many other nodes were last seen waiting for a
/// place under it; and the leases given back while Redis did not answer, to remove when it
/// does.
#[derive(Default)]
pub struct Leases {
    held: Mutex<HashMap<String, HashSet<String>>>,
    /// (key, member, when it was given back in ms).
    unreleased: Mutex<Vec<(String, String, u64)>>,
    refused: Mutex<HashMap<String, u64>>,
    contended: Mutex<HashMap<String, (u64, u32)>>,
    seq: AtomicU64,
}

/// A connection's lease; given back when dropped.
pub struct Lease {
    cluster: Arc<Cluster>,
    key: String,
    member: String,
}

impl Drop for Lease {
    fn drop(&mut self) {
        {
            let mut held = self.cluster.leases.held.lock().expect("leases");
            if let Some(set) = held.get_mut(&self.key) {
                set.remove(&self.member);
                if set.is_empty() {
                    held.remove(&self.key);
                }
            }
        }
        // A place this node frees may be taken by its own waiting lanes at once.
        self.cluster
            .leases
            .refused
            .lock()
            .expect("leases")
            .remove(&self.key);
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let cluster = Arc::clone(&self.cluster);
        let (key, member) = (self.key.clone(), std::mem::take(&mut self.member));
        rt.spawn(async move {
            if cluster.release(&key, &member).await.is_err() {
                cluster.leases.unreleased.lock().expect("leases").push((
                    key,
                    member,
                    crate::now_ms(),
                ));
            }
        });
    }
}

impl Cluster {
    /// A lease on one of `limit` connections counted under `key`: `Ok(None)` when all are
    /// held; `Err` when Redis cannot say (the caller falls back to its local share).
    pub async fn acquire_lease(
        self: &Arc<Self>,
        key: &str,
        limit: u32,
    ) -> Result<Option<Lease>, Unavailable> {
        let now = crate::now_ms();
        if self
            .leases
            .refused
            .lock()
            .expect("leases")
            .get(key)
            .is_some_and(|&until| until > now)
        {
            return Ok(None);
        }
        let member = format!(
            "{}:{}",
            self.config.node_id,
            self.leases.seq.fetch_add(1, Ordering::Relaxed)
        );
        let ttl = self.config.lease_ttl.as_millis() as u64;
        let (k, m, node) = (key.to_owned(), member.clone(), self.config.node_id.clone());
        let (got, others): (i64, i64) = self
            .call(|mut c| async move {
                ACQUIRE
                    .key(&k)
                    .key(format!("{k}:wanted"))
                    .arg(limit)
                    .arg(ttl)
                    .arg(m)
                    .arg(node)
                    .arg(REFUSED_BACKOFF_MS * 3)
                    .invoke_async(&mut c)
                    .await
            })
            .await?;
        self.contended(key, others);
        if got == 0 {
            self.leases
                .refused
                .lock()
                .expect("leases")
                .insert(key.to_owned(), crate::now_ms() + REFUSED_BACKOFF_MS);
            return Ok(None);
        }
        self.leases
            .held
            .lock()
            .expect("leases")
            .entry(key.to_owned())
            .or_default()
            .insert(member.clone());
        Ok(Some(Lease {
            cluster: Arc::clone(self),
            key: key.to_owned(),
            member,
        }))
    }

    /// Whether `lease` (one of `limit` places) stays with this node: for a connection that
    /// replaces its holder (`idle` false) unless other nodes wait for a place and this node
    /// holds more than its fair share; for a connection with nothing to do (`idle`) unless
    /// other nodes wait at all. A lease given back is gone from Redis already (drop it). Kept
    /// when Redis cannot say.
    pub async fn keep_lease(&self, lease: &Lease, limit: u32, idle: bool) -> bool {
        // No other node was seen waiting lately: nothing to ask Redis.
        if self.waiting(&lease.key) == 0 {
            return true;
        }
        let ttl = self.config.lease_ttl.as_millis() as u64;
        let (key, member, node) = (
            lease.key.clone(),
            lease.member.clone(),
            self.config.node_id.clone(),
        );
        let k = key.clone();
        let kept: Result<(i64, i64), _> = self
            .call(|mut c| async move {
                KEEP.key(&k)
                    .key(format!("{k}:wanted"))
                    .arg(limit)
                    .arg(ttl)
                    .arg(member)
                    .arg(node)
                    .arg(u8::from(idle))
                    .invoke_async(&mut c)
                    .await
            })
            .await;
        match kept {
            Ok((kept, others)) => {
                self.contended(&key, others);
                kept != 0
            }
            Err(_) => true,
        }
    }

    /// Whether this node holds more than its fair share of the `limit` places under `key` while
    /// other nodes wait for one, as last seen (no Redis call): then one of its connections
    /// should ask [`Cluster::keep_lease`] whether to give its place back.
    pub fn over_share(&self, key: &str, limit: u32) -> bool {
        let others = self.waiting(key);
        others > 0
            && self.leases_held(key) as u64 > u64::from(limit).div_ceil(u64::from(others) + 1)
    }

    /// How many other nodes were lately seen waiting for a place under `key`.
    fn waiting(&self, key: &str) -> u32 {
        let now = crate::now_ms();
        self.leases
            .contended
            .lock()
            .expect("leases")
            .get(key)
            .filter(|(until, _)| *until > now)
            .map_or(0, |(_, others)| *others)
    }

    /// Notes how many other nodes wait for a place under `key` (kept until the next renewal
    /// says again).
    fn contended(&self, key: &str, others: i64) {
        let now = crate::now_ms();
        let mut contended = self.leases.contended.lock().expect("leases");
        contended.retain(|_, (until, _)| *until > now);
        if others > 0 {
            let until = now + 2 * self.renew_every().as_millis() as u64;
            let others = u32::try_from(others).unwrap_or(u32::MAX);
            contended.insert(key.to_owned(), (until, others));
        } else {
            contended.remove(key);
        }
    }

    /// How many leases this node holds under `key`.
    pub fn leases_held(&self, key: &str) -> usize {
        self.leases
            .held
            .lock()
            .expect("leases")
            .get(key)
            .map_or(0, HashSet::len)
    }

    /// Removes lease `member` from `key`'s set.
    async fn release(&self, key: &str, member: &str) -> Result<i64, Unavailable> {
        let (key, member) = (key.to_owned(), member.to_owned());
        self.call(|mut c| async move {
            redis::cmd("ZREM")
                .arg(&key)
                .arg(&member)
                .query_async(&mut c)
                .await
        })
        .await
    }

    /// Extends every lease this node holds (one call per key), and removes those it gave back
    /// while Redis did not answer: left in place, they would keep their places from every node
    /// until they expire, when a node coming back from an outage wants places for its new
    /// connections.
    pub(super) async fn renew_leases(&self) {
        let ttl = self.config.lease_ttl.as_millis() as u64;
        let mut unreleased =
            std::mem::take(&mut *self.leases.unreleased.lock().expect("leases")).into_iter();
        let mut still = Vec::new();
        while let Some((key, member, at)) = unreleased.next() {
            // One given back a lifetime ago has expired from the set by now.
            if at + ttl < crate::now_ms() {
                continue;
            }
            if self.release(&key, &member).await.is_err() {
                // Redis is still away: the rest wait for the next renewal.
                still.push((key, member, at));
                still.extend(unreleased);
                break;
            }
        }
        self.leases.unreleased.lock().expect("leases").extend(still);
        let held: Vec<(String, Vec<String>)> = self
            .leases
            .held
            .lock()
            .expect("leases")
            .iter()
            .map(|(k, set)| (k.clone(), set.iter().cloned().collect()))
            .collect();
        for (key, members) in held {
            let (k, node) = (key.clone(), self.config.node_id.clone());
            let others: Result<i64, _> = self
                .call(|mut c| async move {
                    let mut inv = RENEW.key(&k);
                    inv.key(format!("{k}:wanted"));
                    inv.arg(ttl).arg(node);
                    for m in &members {
                        inv.arg(m);
                    }
                    inv.invoke_async(&mut c).await
                })
                .await;
            if let Ok(n) = others {
                self.contended(&key, n);
            }
        }
    }
}
