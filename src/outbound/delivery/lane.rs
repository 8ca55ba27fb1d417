//! Lanes: a site runs up to `max_connections` of them per egress source. A lane owns one
//! connection at a time, takes due jobs round-robin from the site's domains ([`super::pick`]),
//! and sends them ([`super::transact`]) until the site has nothing due, a throttle says wait, its
//! connection fails or delivery stops.
//!
//! Each transaction goes from a source of its campaign's pool, picked by smooth weighted
//! round-robin per (site, pool) ([`Site::pick_source`]); the lane switches to a connection of
//! that source (pooling the one it had). Every source has `max_connections` connections to the
//! site ([`stats::Slot`]); when all of the picked source's are busy, the lane waits for one (up
//! to [`MAX_LANE_WAIT`]) rather than sending from another source, so shares follow the weights.
//!
//! Throttles answer "not before T": a short wait is taken holding only the connection; a long one
//! ends the lane and the site's domains are rescheduled for T. Apart from that wait for a busy
//! source, nothing waits while holding a job. Idle connections stay in the site's pool up to
//! `idle_timeout` and are reused up to `max_messages_per_connection` transactions.

use std::sync::Arc;
use std::time::Duration;

use super::pick::{Prepared, group_recipients};
use super::site::{Site, throttle};
use super::stats::Slot;
use super::{Delivery, stats};
use crate::outbound::outcome::Outcome;
use crate::scheduler::index::PendingJob;

/// Jobs a lane takes at once when no message rate applies.
const LANE_BATCH: usize = 8;
/// Jobs deferred per failed connection round of a site.
const FAIL_BATCH: usize = 32;
/// How often a lane looks again for a free connection of a source whose connections are all
/// busy (for up to [`MAX_LANE_WAIT`]).
const SOURCE_BUSY_POLL: Duration = Duration::from_millis(2);
/// A throttle wait up to this long is taken inside the lane; longer ends the lane.
const MAX_LANE_WAIT: Duration = Duration::from_secs(1);

/// Why a lane could not get a connection.
enum NoConnection {
    /// The connection rate allows a new one only after this wait.
    Throttled(Duration),
    /// Every host failed; the outcome of the last try.
    Failed(Outcome),
}

impl Delivery {
    /// Starts one more lane if the site has work, room and is not backed off.
    pub(super) fn ensure_lanes(self: &Arc<Self>, site: &Arc<Site>) {
        let mut g = site.lock();
        // Each source has max_connections of its own (see `connection`).
        let max_lanes = site
            .shaping
            .max_connections
            .saturating_mul(self.sources.len() as u32);
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
        let batch = if site.message_rate.is_some() {
            1
        } else {
            LANE_BATCH
        };
        while !self.stop.is_cancelled() {
            if let Some(wait) = throttle(&site.message_rate) {
                if wait <= MAX_LANE_WAIT {
                    tokio::time::sleep(wait).await;
                    continue;
                }
                return crate::now_ms() + wait.as_millis() as u64;
            }
            let jobs = site.pop(&self.node, crate::now_ms(), batch);
            if jobs.is_empty() {
                return 0;
            }
            let _in_flight = site.stats.hold(jobs.len());
            if site.has_work() {
                self.ensure_lanes(site);
            }
            let (groups, _topped_up) = self.take_groups(site, jobs).await;
            let mut groups = groups.into_iter();
            while let Some(g) = groups.next() {
                if self.stop.is_cancelled() {
                    // Stopping: the transaction under way has finished; the rest stays queued.
                    self.requeue(g.into_iter().chain(groups.flatten()));
                    return 0;
                }
                let pool = self.pool_of(&g[0].campaign);
                let members = &self.pools[pool].members;
                let Some(source) = site.pick_source(pool, members) else {
                    tracing::error!(pool = %self.pools[pool].name, "pool without a weighted source");
                    self.requeue(g.into_iter().chain(groups.flatten()));
                    return crate::now_ms() + MAX_LANE_WAIT.as_millis() as u64;
                };
                match self.connection(site, source, conn).await {
                    Ok(c) => self.attempt(g, site, c).await,
                    Err(NoConnection::Throttled(wait)) => {
                        // Put the jobs back untouched; the site is retried when allowed.
                        self.requeue(g.into_iter().chain(groups.flatten()));
                        return crate::now_ms() + wait.as_millis() as u64;
                    }
                    Err(NoConnection::Failed(o)) => {
                        let rest = g.into_iter().chain(groups.flatten()).collect();
                        return self.fail_round(site, rest, o).await;
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
        &self,
        site: &Site,
        source: usize,
        conn: &'c mut Option<stats::Held>,
    ) -> Result<&'c mut stats::Held, NoConnection> {
        let usable = |c: &stats::Held| {
            c.is_reusable() && c.transactions < site.shaping.max_messages_per_connection
        };
        let fresh = conn
            .as_ref()
            .is_some_and(|c| c.source == source && usable(c));
        let mut waited = Duration::ZERO;
        if !fresh {
            if let Some(old) = conn.take() {
                if old.source != source && usable(&old) {
                    site.lock().idle.push(old.idle());
                } else {
                    // Closed before a new one opens, so max_connections holds at the receiver.
                    old.quit().await;
                }
            }
            let slot = loop {
                *conn = site.take_idle(source);
                if conn.is_some() {
                    break None;
                }
                if let Some(slot) = Slot::take(&site.open, source, site.shaping.max_connections) {
                    break Some(slot);
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
                if let Some(wait) = throttle(&site.connection_rate) {
                    return Err(NoConnection::Throttled(wait));
                }
                let c = self
                    .connect(site, source)
                    .await
                    .map_err(NoConnection::Failed)?;
                site.lock().failures = 0;
                *conn = Some(site.stats.track(c, slot));
            }
        }
        Ok(conn.as_mut().expect("a connection was just set"))
    }

    /// A connection round failed: `rest` and up to [`FAIL_BATCH`] more of the site's due jobs are
    /// deferred with the failure `o` (so every recipient's log shows what happened), and the site
    /// backs off. Returns the end of the backoff.
    async fn fail_round(&self, site: &Site, mut rest: Vec<Prepared>, o: Outcome) -> u64 {
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
        site.failed(&self.config.delivery)
    }
}
