//! Lanes: a site runs up to `max_connections` of them per egress source (or `max_connections`
//! in all with `per = "site"`); in cluster mode, as many as the node holds connection leases
//! for the site plus one that asks for the next, so lanes without a place hold no jobs. A lane
//! owns one connection at a time, takes due jobs round-robin from the site's domains
//! ([`super::pick`]), and sends them ([`super::transact`]) until the site has nothing due, a
//! throttle says wait, its connection fails or delivery stops.
//!
//! Each transaction goes from a source of its campaign's pool ([`Delivery::choose`]): smooth
//! weighted round-robin per (site, pool) ([`Site::pick_source`]) over the sources that may send
//! to the site now (not suspended, not over their warm-up cap, not rate-limited past a lane's
//! wait); a pool whose sources are all over their caps hands the message to its `overflow`
//! pool; when none may send, the message is requeued for the time one may, untouched, and the
//! lane goes on with the rest. The lane switches to a connection of the chosen source (pooling
//! the one it had). Every source has its connection places at the site ([`stats::Slot`]): one
//! until a connection of it has worked, then `max_connections`, lowered by a throttle action or
//! AIMD; when all are busy, the lane waits for one (up to [`MAX_LANE_WAIT`]) rather than sending
//! from another source, so shares follow the weights.
//!
//! Rate limits answer "not before T": a wait up to [`MAX_LANE_WAIT`] is taken in the lane (with
//! the message), in line behind the lanes already waiting for that source, so messages leave in
//! the order the scheduler gave them out (its fair order) rather than by a race for each token;
//! a longer wait passes the source over until T. A connection that fails with a
//! reply a shaping rule acts on defers only its message (the other sources go on); other failed
//! rounds back the whole site off. Idle connections stay in the site's pool up to
//! `idle_timeout` and are reused up to `max_messages_per_connection` transactions.

use std::sync::Arc;
use std::time::Duration;

use super::assembly::Ahead;
use super::pick::{Prepared, group_recipients};
use super::site::Site;
use super::stats::Slot;
use super::{Delivery, stats};
use crate::outbound::outcome::Outcome;
use crate::scheduler::index::PendingJob;
use crate::store::campaign::CampaignState;

/// Jobs a lane takes at once when no message rate applies.
const LANE_BATCH: usize = 8;
/// Jobs deferred per failed connection round of a site.
const FAIL_BATCH: usize = 32;
/// How often a lane looks again for a free connection of a source whose connections are all
/// busy (for up to [`MAX_LANE_WAIT`]).
const SOURCE_BUSY_POLL: Duration = Duration::from_millis(2);
/// How often a lane asks again for a cluster-wide connection lease when all are held.
const LEASE_POLL: Duration = Duration::from_millis(25);
/// A throttle wait up to this long is taken inside the lane; longer ends the lane.
const MAX_LANE_WAIT: Duration = Duration::from_secs(1);

/// What [`Delivery::try_choose`] picked.
enum Choice {
    /// Let through: the message goes from this source now.
    Taken(usize),
    /// The message waits its turn for this source's rate.
    WaitFor(usize),
}

/// One source's answer to a message ([`Delivery::take_source`]).
enum Step {
    /// Let through now (and counted).
    Go,
    /// Its rate allows the message after this wait (at most [`MAX_LANE_WAIT`]).
    Wait(Duration),
    /// Not before this time; `true` when because of its warm-up cap.
    Out(u64, bool),
}

/// Why a lane could not get a connection.
enum NoConnection {
    /// The connection rate allows a new one only after this wait.
    Throttled(Duration),
    /// Every host failed; the outcome of the last try, and the connection place it held: kept
    /// until the reply has been acted on, so a lane waiting for the place cannot open another
    /// connection from a source the reply is about to suspend.
    Failed(Outcome, Slot),
    /// The source was suspended while the lane waited for a connection place.
    Suspended,
}

impl Delivery {
    /// Starts one more lane if the site has work, room and is not backed off.
    pub(super) fn ensure_lanes(self: &Arc<Self>, site: &Arc<Site>) {
        // Each source has max_connections of its own (see `connection`); in cluster mode, the
        // lanes that hold a lease and one more to ask for the next.
        let mut max_lanes = site
            .shaping
            .max_connections
            .saturating_mul(site.open.len() as u32);
        if let Some(leased) = site.leased_lanes() {
            max_lanes = max_lanes.min(leased);
        }
        let mut g = site.lock();
        if g.active.is_empty() || g.lanes >= max_lanes || self.stop.is_cancelled() {
            return;
        }
        if crate::now_ms() < g.backoff_until_ms {
            let until = g.backoff_until_ms;
            self.node.scheduler.deactivate(g.active.drain(..), until);
            return;
        }
        g.lanes += 1;
        drop(g);
        self.lanes.spawn(Arc::clone(self).lane(Arc::clone(site)));
    }

    async fn lane(self: Arc<Self>, site: Arc<Site>) {
        let mut conn = None;
        let not_before = self.serve(&site, &mut conn).await;
        if let Some(c) = conn {
            if c.is_reusable()
                && c.transactions < site.shaping.max_messages_per_connection
                && !self.stop.is_cancelled()
                && self.keep_lease(&site, &c, true).await
            {
                site.lock().idle.push(c.idle());
            } else {
                c.quit().await;
            }
        }
        let again = {
            let mut g = site.lock();
            g.lanes -= 1;
            if g.lanes > 0 || g.active.is_empty() {
                false
            } else if not_before > crate::now_ms() || self.stop.is_cancelled() {
                // The last lane hands the site's domains back, to be scheduled after the wait.
                self.node
                    .scheduler
                    .deactivate(g.active.drain(..), not_before);
                false
            } else {
                true
            }
        };
        if again {
            self.ensure_lanes(&site);
        }
    }

    /// Sends the site's due jobs on `conn` until there are none, a throttle or a failed
    /// connection says wait, or delivery stops. Returns the time before which the site must not
    /// be served again (0: no constraint).
    async fn serve(self: &Arc<Self>, site: &Arc<Site>, conn: &mut Option<stats::Held>) -> u64 {
        let batch = if site.rate_limited() { 1 } else { LANE_BATCH };
        while !self.stop.is_cancelled() {
            let jobs = site.pop(&self.node, crate::now_ms(), batch);
            if jobs.is_empty() {
                return 0;
            }
            let _in_flight = site.stats.hold(jobs.len());
            if site.has_work() {
                self.ensure_lanes(site);
            }
            let (groups, _topped_up) = self.take_groups(site, jobs).await;
            // Each group's message is submitted for assembly ahead of its turn, so it is
            // signed while the lane sends the ones before it.
            let mut groups = Ahead::new(self, groups);
            while let Some((g, assembly)) = groups.next(self) {
                if self.stop.is_cancelled() {
                    // Stopping: the transaction under way has finished; the rest stays queued.
                    self.requeue(g.into_iter().chain(groups.rest()));
                    return 0;
                }
                let pool = self.pool_of(&g[0].campaign);
                let source = match self.choose(site, pool, g.len()).await {
                    Ok(s) => s,
                    Err(until) => {
                        // No source of the pool (or its overflow) may send to the site before
                        // `until`: this message waits for it, untouched, and the lane goes on
                        // with the others, which may be of other pools.
                        self.requeue_at(g.into_iter().map(|p| p.job).collect(), until);
                        continue;
                    }
                };
                // A new connection's TLS policy results are reported for this domain.
                let domain = g[0].record.address.rsplit('@').next().unwrap_or("");
                match self.connection(site, source, conn, domain).await {
                    // Paused or cancelled while the lane waited for its turn or a connection
                    // (on any node, in cluster mode): back untouched, to be parked or dropped.
                    Ok(_)
                        if g.iter()
                            .any(|p| p.campaign.state() != CampaignState::Active) =>
                    {
                        self.requeue(g.into_iter());
                    }
                    Ok(c) => {
                        self.attempt(g, assembly, site, c).await;
                        // Cluster mode: over its fair share while other nodes wait for a
                        // place, the node gives one back; the lane ends with it.
                        if self.yield_lease(site, conn).await {
                            self.requeue(groups.rest());
                            return 0;
                        }
                    }
                    Err(NoConnection::Throttled(wait)) => {
                        // Put the jobs back untouched; the site is retried when allowed.
                        self.requeue(g.into_iter().chain(groups.rest()));
                        return crate::now_ms() + wait.as_millis() as u64;
                    }
                    Err(NoConnection::Suspended) => {
                        // Back untouched, to go from another source.
                        self.requeue(g.into_iter());
                        continue;
                    }
                    Err(NoConnection::Failed(o, slot)) => {
                        if self.react(site, source, &o).await {
                            drop(slot);
                            // The provider refused this source, not the site: the shaping
                            // rules acted on the (source, site); the message is deferred with
                            // the reply and the others go on from the other sources.
                            for p in &g {
                                self.finish(p, o.clone(), Some(site), None, 0).await;
                            }
                            continue;
                        }
                        let rest = g.into_iter().chain(groups.rest()).collect();
                        let until = self.fail_round(site, rest, o).await;
                        drop(slot);
                        return until;
                    }
                }
            }
        }
        0
    }

    /// Reads the leased jobs and groups them into transactions. Jobs of a campaign that is not
    /// personalised are topped up with more of its due jobs for the domain, so one message goes
    /// to as many of its recipients as the site allows; the guard counts those as in flight.
    async fn take_groups<'s>(
        &self,
        site: &'s Site,
        jobs: Vec<PendingJob>,
    ) -> (Vec<Vec<Prepared>>, Option<stats::InFlight<'s>>) {
        let mut prepared = self.prepare(jobs, Some(site)).await;
        let max_rcpt = site.shaping.max_recipients_per_message as usize;
        let mut topped_up = None;
        if max_rcpt > 1
            && let Some(first) = prepared.first()
            && !first.campaign.record.personalised
            && prepared.len() < max_rcpt
        {
            let more = self.pop_more(
                first.job.domain,
                first.job.id.campaign,
                max_rcpt - prepared.len(),
            );
            topped_up = Some(site.stats.hold(more.len()));
            prepared.extend(self.prepare(more, Some(site)).await);
        }
        (group_recipients(prepared, max_rcpt), topped_up)
    }

    /// The lane's connection from `source`: the current one if it is of that source and still
    /// good, else a pooled one of the source, else a new one if the source has a connection
    /// place free and the connection rate allows. A good connection of another source goes
    /// back to the pool.
    async fn connection<'c>(
        self: &Arc<Self>,
        site: &Arc<Site>,
        source: usize,
        conn: &'c mut Option<stats::Held>,
        domain: &str,
    ) -> Result<&'c mut stats::Held, NoConnection> {
        let usable = |c: &stats::Held| {
            c.is_reusable() && c.transactions < site.shaping.max_messages_per_connection
        };
        let fresh = conn
            .as_ref()
            .is_some_and(|c| c.source == source && usable(c));
        let mut waited = Duration::ZERO;
        // Cluster mode: the lease of a connection this one replaces (same source and site)
        // goes to the new one, rather than back to Redis and maybe to another node.
        let mut carried = None;
        if !fresh {
            if let Some(mut old) = conn.take() {
                if old.source != source && usable(&old) {
                    site.lock().idle.push(old.idle());
                } else {
                    if old.source == source && self.keep_lease(site, &old, false).await {
                        carried = old.take_lease();
                    }
                    // Closed before a new one opens, so max_connections holds at the receiver.
                    old.quit().await;
                }
            }
            let slot = loop {
                *conn = site.take_idle(source);
                if conn.is_some() {
                    break None;
                }
                let cap = site.connection_cap(source);
                if let Some(mut slot) = Slot::take(&site.open, site.counted(source), source, cap) {
                    let Some((cluster, key)) = site.lease_key(source) else {
                        break Some(slot);
                    };
                    if let Some(lease) = carried.take() {
                        slot.lease = Some(lease);
                        break Some(slot);
                    }
                    // Cluster mode: the place must be free cluster-wide too. Without an answer
                    // from Redis the node is degraded and its cap above is its local share.
                    match cluster
                        .acquire_lease(key, site.shaping.max_connections)
                        .await
                    {
                        Ok(Some(lease)) => {
                            slot.lease = Some(lease);
                            // Room for one more lane, to ask for the next lease.
                            self.ensure_lanes(site);
                            break Some(slot);
                        }
                        Err(_) => break Some(slot),
                        Ok(None) => {
                            drop(slot);
                            if waited >= MAX_LANE_WAIT {
                                return Err(NoConnection::Throttled(LEASE_POLL));
                            }
                            tokio::time::sleep(LEASE_POLL).await;
                            waited += LEASE_POLL;
                            continue;
                        }
                    }
                }
                // With limits per site, an idle connection of another source holds a place
                // this one needs: close it.
                if let Some(other) = site.take_idle_of_another(source) {
                    other.quit().await;
                    continue;
                }
                // Every connection of this source is busy: its share waits for one, as a
                // source's queue does in any MTA, rather than going out from another source.
                if waited >= MAX_LANE_WAIT {
                    return Err(NoConnection::Throttled(SOURCE_BUSY_POLL));
                }
                tokio::time::sleep(SOURCE_BUSY_POLL).await;
                waited += SOURCE_BUSY_POLL;
            };
            if let Some(slot) = slot {
                // A lane that waited for the place may find the source suspended meanwhile
                // (by the reply that freed the place).
                let now = crate::now_ms();
                {
                    let mut g = site.lock();
                    site.refresh(&mut g, &self.node, source, &self.sources[source].name, now);
                    if Site::source_blocked(&g, source, now).is_some() {
                        return Err(NoConnection::Suspended);
                    }
                    // Or the site backed off (or died) while it waited: no attempt until then.
                    if g.backoff_until_ms > now {
                        let wait = Duration::from_millis(g.backoff_until_ms - now);
                        return Err(NoConnection::Throttled(wait));
                    }
                }
                if let Some(wait) = site.connection_throttle(source) {
                    return Err(NoConnection::Throttled(wait));
                }
                let c = match self.connect(site, source, domain).await {
                    Ok(c) => c,
                    Err(o) => {
                        if let Some(s) = site.lock().sources.get_mut(source) {
                            s.proven = false;
                        }
                        return Err(NoConnection::Failed(o, slot));
                    }
                };
                {
                    let mut g = site.lock();
                    if let Some(s) = g.sources.get_mut(source) {
                        s.proven = true;
                    }
                    if g.dead {
                        tracing::info!(site = %site.key, "dead site answers again");
                    }
                    g.failures = 0;
                    g.dead = false;
                }
                *conn = Some(site.stats.track(c, slot));
            }
        }
        Ok(conn.as_mut().expect("a connection was just set"))
    }

    /// Cluster mode: closes the lane's connection, giving back its lease, when the node holds
    /// more than its fair share of the site's places while other nodes wait and Redis agrees
    /// ([`crate::cluster::Cluster::over_share`]). True when it did.
    async fn yield_lease(&self, site: &Site, conn: &mut Option<stats::Held>) -> bool {
        let Some(c) = conn.as_ref() else {
            return false;
        };
        let (Some(_), Some((cluster, key))) = (c.lease(), site.lease_key(c.source)) else {
            return false;
        };
        if !cluster.over_share(key, site.shaping.max_connections)
            || self.keep_lease(site, c, false).await
        {
            return false;
        }
        if let Some(c) = conn.take() {
            c.quit().await;
        }
        true
    }

    /// Cluster mode: whether connection `c` keeps its lease, for a replacement (`idle` false)
    /// or in the pool (`idle`), see [`crate::cluster::Cluster::keep_lease`]. True without a
    /// lease.
    async fn keep_lease(&self, site: &Site, c: &stats::Held, idle: bool) -> bool {
        let (Some(lease), Some((cluster, _))) = (c.lease(), site.lease_key(c.source)) else {
            return true;
        };
        cluster
            .keep_lease(lease, site.shaping.max_connections, idle)
            .await
    }

    /// The source a message of `n` recipients of pool `pool` goes from: picked by weight among
    /// the pool's sources that are not suspended, rate-limited past a lane's wait or over their
    /// warm-up cap for this site, and let through by its rate limits. A short wait for the
    /// rate is taken here, in line behind the lanes already waiting for that source's turn
    /// ([`Site::turns`]). When every source is over its warm-up cap, the pool's `overflow`
    /// pool is tried. `Err(t)`: none may send before `t`.
    async fn choose(&self, site: &Site, pool: usize, n: usize) -> Result<usize, u64> {
        loop {
            let source = match self.try_choose(site, pool, n, crate::now_ms()) {
                Ok(Choice::Taken(source)) => return Ok(source),
                Ok(Choice::WaitFor(source)) => source,
                Err(until) => return Err(until),
            };
            let _turn = site.turns[source].lock().await;
            loop {
                let now = crate::now_ms();
                let step = {
                    let mut g = site.lock();
                    site.refresh(&mut g, &self.node, source, &self.sources[source].name, now);
                    if Site::source_blocked(&g, source, now).is_some() {
                        break;
                    }
                    self.take_source(site, &mut g, source, n, now)
                };
                match step {
                    Step::Go => return Ok(source),
                    Step::Wait(wait) => tokio::time::sleep(wait).await,
                    // Passed over meanwhile: choose again.
                    Step::Out(..) => break,
                }
            }
        }
    }

    /// One go of [`Delivery::choose`] under the site lock: the source picked, either taken
    /// (its limits let the message through) or to wait for (its rate says wait a little, or
    /// other lanes wait for it already); `Err(t)`: none may send before `t`.
    fn try_choose(&self, site: &Site, pool: usize, n: usize, now: u64) -> Result<Choice, u64> {
        let node = &self.node;
        let mut g = site.lock();
        let mut pool = pool;
        for hop in 0..2 {
            let members = &self.pools[pool].members;
            for &(source, _) in members {
                site.refresh(&mut g, node, source, &self.sources[source].name, now);
            }
            // Why each member may not send now, by source: (until, because of warm-up).
            let mut out: Vec<Option<(u64, bool)>> = vec![None; self.sources.len()];
            for &(source, _) in members {
                if let Some(t) = Site::source_blocked(&g, source, now) {
                    out[source] = Some((t, false));
                } else if let Some((schedule, start)) = &self.sources[source].warmup
                    && let Err(t) = node.warmup.room(
                        &self.sources[source].name,
                        &site.group,
                        schedule,
                        *start,
                        now,
                    )
                {
                    out[source] = Some((t, true));
                }
            }
            loop {
                let picked = Site::pick_source(&mut g, pool, members, |s| out[s].is_none());
                let Some(source) = picked else { break };
                // Lanes already wait for this source's rate: this one queues behind them.
                if site.turns[source].try_lock().is_err() {
                    return Ok(Choice::WaitFor(source));
                }
                match self.take_source(site, &mut g, source, n, now) {
                    Step::Go => return Ok(Choice::Taken(source)),
                    Step::Wait(_) => return Ok(Choice::WaitFor(source)),
                    Step::Out(until, warm) => out[source] = Some((until, warm)),
                }
            }
            let weighted = members.iter().filter(|m| m.1 > 0);
            let until = weighted
                .clone()
                .filter_map(|m| out[m.0].map(|o| o.0))
                .min()
                .unwrap_or(now + MAX_LANE_WAIT.as_millis() as u64);
            let warm_capped = weighted.clone().any(|m| out[m.0].is_some_and(|o| o.1));
            match self.pools[pool].overflow {
                Some(o) if hop == 0 && warm_capped => pool = o,
                _ => return Err(until),
            }
        }
        Err(now + MAX_LANE_WAIT.as_millis() as u64)
    }
    /// Lets a message of `n` recipients through `source`'s rate limits and warm-up cap at
    /// `now`, counting it as sent, or says why not.
    fn take_source(
        &self,
        site: &Site,
        g: &mut super::site::SiteInner,
        source: usize,
        n: usize,
        now: u64,
    ) -> Step {
        match site.take_rate(g, source, now) {
            None => {}
            Some(wait) if wait <= MAX_LANE_WAIT => return Step::Wait(wait),
            Some(wait) => {
                let until = now + wait.as_millis() as u64;
                Site::block(g, source, until);
                return Step::Out(until, false);
            }
        }
        if let Some((schedule, start)) = &self.sources[source].warmup
            && let Err(t) = self.node.warmup.take(
                &self.sources[source].name,
                &site.group,
                schedule,
                *start,
                now,
                n as u64,
            )
        {
            return Step::Out(t, true);
        }
        Site::count_sent(g, source, n as u32, now);
        Step::Go
    }

    /// A connection round failed: `rest` and up to [`FAIL_BATCH`] more of the site's due jobs are
    /// deferred with the failure `o` (so every recipient's log shows what happened), and the site
    /// backs off. Returns the end of the backoff.
    ///
    /// A round that makes the site dead (`delivery.dead_site_after`) defers nothing: its jobs go
    /// back untouched and the site's mail waits out the dead period without attempts.
    async fn fail_round(&self, site: &Site, mut rest: Vec<Prepared>, o: Outcome) -> u64 {
        let until = site.failed(&self.config.delivery);
        if site.lock().dead {
            self.requeue(rest.into_iter());
            return until;
        }
        let more = site.pop(
            &self.node,
            crate::now_ms(),
            FAIL_BATCH.saturating_sub(rest.len()),
        );
        let _more = site.stats.hold(more.len());
        rest.extend(self.prepare(more, Some(site)).await);
        for p in rest {
            self.finish(&p, o.clone(), Some(site), None, 0).await;
        }
        until
    }
}
