//! The order in which one destination domain's pending jobs are taken: priority classes first,
//! then weighted fair queuing across the tenants of a class, then across a tenant's campaigns.
//!
//! A domain's jobs are grouped into *flows*, one per campaign (a stream's messages share their
//! bucket's flow), flows into *groups* by tenant, and groups into *classes* by the campaign's
//! priority. Within a flow, jobs go in (due time, job id) order ([`Pending`]).
//!
//! * **Classes.** The highest class with a due job is served, except that the classes below it
//!   (together) get `share` of the jobs taken while they have due jobs: each job taken from a
//!   class while a lower one waits adds `share / (1 - share)` to the class's credit; at a credit
//!   of 1 the next take goes one class down (where the same rule applies again) and the credit
//!   pays for what that take got. A class with nothing below it keeps no credit, so a lower
//!   class cannot bank a burst while it has nothing due.
//! * **Tenants, then flows.** The same start-time fair queuing (below) picks a group among the
//!   class's due groups, by the tenant's weight, then a flow within it, by the campaign's: a
//!   tenant with one campaign gets as much as a tenant with a hundred, and one tenant's
//!   million-recipient campaign does not slow another's mail to the same domain.
//! * **Flows.** Start-time fair queuing: each flow has a virtual time, advanced by
//!   `jobs taken / weight`; the due flow with the smallest one is served, and its start becomes
//!   the class's virtual clock. A flow's time is never below that clock when it is compared, so a
//!   flow that had nothing due (a new campaign, retries waiting) joins at the clock and is
//!   served its share from then on, never a burst for the time it was away. Two flows of equal
//!   weight alternate; weights 3 and 1 get three jobs to one. A take of several jobs (a lane's
//!   batch, a merged message's recipients) is charged in full, so shares hold in jobs.
//!
//! Per domain this costs a few vectors; picking is linear in the domain's flows (a handful;
//! hundreds for the largest providers), taking a job from a flow O(1) as before.

use super::pending::Pending;

/// The lowest and highest priority; higher is served first.
pub const PRIORITY_MAX: u8 = 9;
/// `"low"`.
pub const PRIORITY_LOW: u8 = 2;
/// `"normal"`: campaigns without a priority.
pub const PRIORITY_NORMAL: u8 = 5;
/// `"high"`: transactional messages without a priority.
pub const PRIORITY_HIGH: u8 = 7;
/// The largest weight a campaign may have.
pub const WEIGHT_MAX: u32 = 1000;

/// One campaign's jobs for one domain.
struct Flow {
    campaign: u32,
    weight: u32,
    vtime: f64,
    pending: Pending,
}

/// Start-time fair queuing's choice among `(due, start tag)` items: the smallest tag of a due
/// one (the first on a tie), and its position.
fn earliest(items: impl Iterator<Item = (bool, f64)>) -> Option<(f64, usize)> {
    let mut best: Option<(f64, usize)> = None;
    for (i, (due, tag)) in items.enumerate() {
        if due && best.is_none_or(|(t, _)| tag < t) {
            best = Some((tag, i));
        }
    }
    best
}

/// The flows of one tenant within a class, sorted by campaign.
struct Group {
    tenant: u32,
    weight: u32,
    vtime: f64,
    /// The start time of the flow served last.
    vclock: f64,
    flows: Vec<Flow>,
}

impl Group {
    fn has_due(&self, now: u64) -> bool {
        self.flows.iter().any(|f| f.pending.is_due(now))
    }

    /// The due flow with the smallest virtual time, and that time (its service's start).
    fn next(&self, now: u64) -> Option<(f64, usize)> {
        earliest(
            self.flows
                .iter()
                .map(|f| (f.pending.is_due(now), f.vtime.max(self.vclock))),
        )
    }

    /// The sum of the weights of its due flows.
    fn due_weight(&self, now: u64) -> u64 {
        self.flows
            .iter()
            .filter(|f| f.pending.is_due(now))
            .map(|f| u64::from(f.weight))
            .sum()
    }
}

/// The tenants' groups of one priority, sorted by tenant.
struct Class {
    priority: u8,
    /// Jobs owed to the classes below (see the module documentation).
    credit: f64,
    /// The start time of the group served last.
    vclock: f64,
    groups: Vec<Group>,
}

impl Class {
    fn has_due(&self, now: u64) -> bool {
        self.groups.iter().any(|g| g.has_due(now))
    }

    /// Serves the due group with the smallest virtual time, and in it the due flow with the
    /// smallest: up to `max` of its due entries.
    fn pop(&mut self, now: u64, max: usize, out: &mut Vec<(u64, u64)>) -> usize {
        let groups = self.groups.iter();
        let tags = groups.map(|g| (g.has_due(now), g.vtime.max(self.vclock)));
        let Some((start, gi)) = earliest(tags) else {
            return 0;
        };
        let Some((flow_start, fi)) = self.groups[gi].next(now) else {
            return 0;
        };
        self.vclock = start;
        self.take(gi, fi, start, flow_start, now, max, out)
    }

    /// Where `campaign`'s flow is: (group, flow).
    fn find(&self, campaign: u32) -> Option<(usize, usize)> {
        self.groups.iter().enumerate().find_map(|(gi, g)| {
            g.flows
                .binary_search_by_key(&campaign, |f| f.campaign)
                .ok()
                .map(|fi| (gi, fi))
        })
    }

    /// Takes up to `max` due entries of flow `fi` of group `gi`, whose services start at
    /// virtual times `start` (the group's) and `flow_start` (the flow's).
    #[allow(clippy::too_many_arguments)]
    fn take(
        &mut self,
        gi: usize,
        fi: usize,
        start: f64,
        flow_start: f64,
        now: u64,
        max: usize,
        out: &mut Vec<(u64, u64)>,
    ) -> usize {
        let g = &mut self.groups[gi];
        g.vclock = flow_start;
        let f = &mut g.flows[fi];
        let n = f.pending.pop_due_into(now, max, out);
        f.vtime = flow_start + n as f64 / f64::from(f.weight);
        g.vtime = start + n as f64 / f64::from(g.weight);
        if f.pending.is_empty() {
            g.flows.remove(fi);
            if g.flows.is_empty() {
                self.groups.remove(gi);
            }
        }
        n
    }

    fn flows(&self) -> impl Iterator<Item = &Flow> + '_ {
        self.groups.iter().flat_map(|g| &g.flows)
    }

    fn len(&self) -> usize {
        self.flows().map(|f| f.pending.len()).sum()
    }
}

/// One domain's pending jobs, in the order described by the module documentation.
#[derive(Default)]
pub(super) struct FairQueue {
    /// Sorted by priority, highest first; none without flows.
    classes: Vec<Class>,
    len: usize,
}

/// What decides a campaign's place among a domain's flows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FlowParams {
    pub priority: u8,
    /// Its share against its tenant's other campaigns of the same priority.
    pub weight: u32,
    /// Its tenant (a number the registry of tenants gives) and the tenant's weight: its share
    /// against the other tenants of the same priority.
    pub tenant: u32,
    pub tenant_weight: u32,
}

/// A campaign's place in one domain's queue, for reports ([`FairQueue::flow_view`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FlowView {
    pub pending: usize,
    /// The due time of its first job.
    pub next_due_ms: Option<u64>,
    /// The fraction of the domain's jobs it gets now: its class's share times its weight over
    /// the weights of the due flows of its class; 0 while none of its jobs is due.
    pub share: f64,
}

impl FairQueue {
    /// Adds entry `(due, job id)` of `campaign`, with its scheduling parameters.
    pub fn push(&mut self, params: FlowParams, campaign: u32, entry: (u64, u64)) {
        let priority = params.priority;
        let ci = match self.classes.binary_search_by(|c| priority.cmp(&c.priority)) {
            Ok(i) => i,
            Err(i) => {
                self.classes.insert(
                    i,
                    Class {
                        priority,
                        credit: 0.0,
                        vclock: 0.0,
                        groups: Vec::new(),
                    },
                );
                i
            }
        };
        let class = &mut self.classes[ci];
        let gi = match class
            .groups
            .binary_search_by_key(&params.tenant, |g| g.tenant)
        {
            Ok(i) => i,
            Err(i) => {
                class.groups.insert(
                    i,
                    Group {
                        tenant: params.tenant,
                        weight: params.tenant_weight.max(1),
                        vtime: class.vclock,
                        vclock: 0.0,
                        flows: Vec::new(),
                    },
                );
                i
            }
        };
        let group = &mut class.groups[gi];
        let fi = match group.flows.binary_search_by_key(&campaign, |f| f.campaign) {
            Ok(i) => i,
            Err(i) => {
                group.flows.insert(
                    i,
                    Flow {
                        campaign,
                        weight: params.weight.max(1),
                        vtime: group.vclock,
                        pending: Pending::default(),
                    },
                );
                i
            }
        };
        group.flows[fi].pending.push(entry);
        self.len += 1;
    }

    /// The index of the first class from `from` on with a due job.
    fn due_class(&self, from: usize, now: u64) -> Option<usize> {
        (from..self.classes.len()).find(|&i| self.classes[i].has_due(now))
    }

    /// Takes up to `max` due entries of one flow, chosen as the module documentation says,
    /// into `out`; returns how many.
    pub fn pop(&mut self, now: u64, max: usize, share: f64, out: &mut Vec<(u64, u64)>) -> usize {
        if max == 0 {
            return 0;
        }
        let Some(mut k) = self.due_class(0, now) else {
            return 0;
        };
        // Classes passed over for the ones below (at most one per priority).
        let mut passed: u32 = 0;
        let mut lower = self.due_class(k + 1, now);
        while let Some(l) = lower {
            // A hair under 1, so credits summed in floating point pay out on time.
            if self.classes[k].credit < 1.0 - 1e-9 {
                break;
            }
            passed |= 1 << k;
            k = l;
            lower = self.due_class(k + 1, now);
        }
        let n = self.classes[k].pop(now, max, out);
        self.charge(k, n, lower.is_some(), share);
        for i in 0..self.classes.len() {
            if passed & (1 << i) != 0 {
                self.classes[i].credit -= n as f64;
            }
        }
        self.finish_take(k, n);
        n
    }

    /// Takes up to `max` due entries of `campaign` (more recipients for a message already being
    /// sent), charged to its flow as any take is.
    pub fn pop_campaign(
        &mut self,
        campaign: u32,
        now: u64,
        max: usize,
        share: f64,
        out: &mut Vec<(u64, u64)>,
    ) -> usize {
        for k in 0..self.classes.len() {
            let class = &mut self.classes[k];
            let Some((gi, fi)) = class.find(campaign) else {
                continue;
            };
            let g = &class.groups[gi];
            let start = g.vtime.max(class.vclock);
            let flow_start = g.flows[fi].vtime.max(g.vclock);
            let n = class.take(gi, fi, start, flow_start, now, max, out);
            let lower = self.due_class(k + 1, now).is_some();
            self.charge(k, n, lower, share);
            self.finish_take(k, n);
            return n;
        }
        0
    }

    /// Credits class `k` for `n` jobs taken while a lower class had due jobs (`lower`).
    fn charge(&mut self, k: usize, n: usize, lower: bool, share: f64) {
        let class = &mut self.classes[k];
        if lower {
            class.credit += n as f64 * share / (1.0 - share);
        } else {
            class.credit = 0.0;
        }
    }

    fn finish_take(&mut self, k: usize, n: usize) {
        self.len -= n;
        if self.classes[k].groups.is_empty() {
            self.classes.remove(k);
        }
    }

    /// The earliest due time of any entry.
    pub fn peek_due(&self) -> Option<u64> {
        self.classes
            .iter()
            .flat_map(Class::flows)
            .filter_map(|f| f.pending.peek().map(|(due, _)| due))
            .min()
    }

    /// Makes `campaign`'s entries due by `now` at the latest.
    pub fn expedite(&mut self, campaign: u32, now: u64) {
        for c in &mut self.classes {
            if let Some((gi, fi)) = c.find(campaign) {
                c.groups[gi].flows[fi].pending.expedite(now);
            }
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Every entry, in no particular order.
    pub fn iter(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.classes
            .iter()
            .flat_map(Class::flows)
            .flat_map(|f| f.pending.iter())
    }

    /// Entries per priority, highest first.
    pub fn by_priority(&self) -> impl Iterator<Item = (u8, usize)> + '_ {
        self.classes.iter().map(|c| (c.priority, c.len()))
    }

    /// Entry slots allocated, for the memory estimate.
    pub fn capacity(&self) -> usize {
        self.classes
            .iter()
            .flat_map(Class::flows)
            .map(|f| f.pending.capacity())
            .sum()
    }

    /// Flows held, for the memory estimate.
    pub fn flow_count(&self) -> usize {
        self.classes.iter().map(|c| c.flows().count()).sum()
    }

    /// `campaign`'s place in this queue at `now`, if it has jobs here.
    pub fn flow_view(&self, campaign: u32, now: u64, share: f64) -> Option<FlowView> {
        let (k, gi, fi) = self
            .classes
            .iter()
            .enumerate()
            .find_map(|(k, c)| c.find(campaign).map(|(gi, fi)| (k, gi, fi)))?;
        let class = &self.classes[k];
        let group = &class.groups[gi];
        let flow = &group.flows[fi];
        let mut view = FlowView {
            pending: flow.pending.len(),
            next_due_ms: flow.pending.peek().map(|(due, _)| due),
            share: 0.0,
        };
        if !flow.pending.is_due(now) {
            return Some(view);
        }
        // The class's share: (1 - s) for each due class above it that has one below, then s.
        let due: Vec<usize> = (0..self.classes.len())
            .filter(|&i| self.classes[i].has_due(now))
            .collect();
        let position = due.iter().position(|&i| i == k).unwrap_or(0);
        let mut class_share = share.powi(position as i32);
        if position + 1 < due.len() {
            class_share *= 1.0 - share;
        }
        // Its tenant's share of the class, then its own of the tenant's.
        let group_weights: u64 = class
            .groups
            .iter()
            .filter(|g| g.has_due(now))
            .map(|g| u64::from(g.weight))
            .sum();
        let group_share = f64::from(group.weight) / group_weights.max(1) as f64;
        let weights = group.due_weight(now);
        view.share = class_share * group_share * f64::from(flow.weight) / weights.max(1) as f64;
        Some(view)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The parameters of a campaign of the default tenant.
    fn fp(priority: u8, weight: u32) -> FlowParams {
        FlowParams {
            priority,
            weight,
            tenant: 0,
            tenant_weight: 1,
        }
    }

    fn entry(campaign: u32, index: u32, due: u64) -> (u64, u64) {
        (due, (u64::from(campaign) << 32) | u64::from(index))
    }

    /// Fills `q` with `n` jobs due at 0 of each `(campaign, priority, weight)`, then takes `takes`
    /// batches of `batch` and counts the jobs each campaign got.
    fn shares(
        flows: &[(u32, u8, u32)],
        n: u32,
        takes: usize,
        batch: usize,
        share: f64,
    ) -> Vec<usize> {
        let mut q = FairQueue::default();
        for &(c, p, w) in flows {
            for i in 0..n {
                q.push(fp(p, w), c, entry(c, i, 0));
            }
        }
        let mut got = vec![0; flows.len()];
        let mut out = Vec::new();
        for _ in 0..takes {
            out.clear();
            q.pop(10, batch, share, &mut out);
            for (_, id) in &out {
                let c = (id >> 32) as u32;
                let pos = flows
                    .iter()
                    .position(|f| f.0 == c)
                    .expect("a known campaign");
                got[pos] += 1;
            }
        }
        got
    }

    #[test]
    fn equal_weights_alternate_and_weights_split_three_to_one() {
        assert_eq!(
            shares(&[(1, 5, 1), (2, 5, 1)], 1000, 100, 1, 0.1),
            vec![50, 50]
        );
        assert_eq!(
            shares(&[(1, 5, 3), (2, 5, 1)], 1000, 400, 1, 0.1),
            vec![300, 100]
        );
        // Batches are charged in full: 8 at a time still splits 3:1 over time.
        assert_eq!(
            shares(&[(1, 5, 3), (2, 5, 1)], 10_000, 400, 8, 0.1),
            vec![2400, 800]
        );
    }

    #[test]
    fn higher_classes_go_first_but_lower_ones_keep_their_share() {
        // 10% for everything below the top class, whatever the batch.
        assert_eq!(
            shares(&[(1, 7, 1), (2, 5, 1)], 1000, 100, 1, 0.1),
            vec![90, 10]
        );
        let got = shares(&[(1, 7, 1), (2, 5, 1)], 10_000, 100, 8, 0.1);
        assert_eq!(got[0] + got[1], 800);
        assert!((70..=90).contains(&got[1]), "{got:?}");
        // Three classes: the middle gets 90% of the 10%, the lowest the rest.
        let got = shares(&[(1, 9, 1), (2, 5, 1), (3, 2, 1)], 10_000, 10_000, 1, 0.1);
        assert_eq!(got, vec![9000, 900, 100]);
        // Strict priority when the share is 0.
        assert_eq!(
            shares(&[(1, 7, 1), (2, 5, 1)], 1000, 100, 1, 0.0),
            vec![100, 0]
        );
    }

    #[test]
    fn a_flow_that_waited_joins_at_the_clock_without_a_burst() {
        let mut q = FairQueue::default();
        let mut out = Vec::new();
        for i in 0..100 {
            q.push(fp(5, 1), 1, entry(1, i, 0));
        }
        for _ in 0..50 {
            q.pop(10, 1, 0.1, &mut out);
        }
        // Campaign 2 arrives late: from then on the two alternate.
        for i in 0..100 {
            q.push(fp(5, 1), 2, entry(2, i, 0));
        }
        out.clear();
        for _ in 0..10 {
            q.pop(10, 1, 0.1, &mut out);
        }
        let late = out.iter().filter(|(_, id)| id >> 32 == 2).count();
        assert_eq!(late, 5);
        assert_eq!(q.len(), 140);
    }

    #[test]
    fn jobs_not_yet_due_wait_and_do_not_block_others() {
        let mut q = FairQueue::default();
        let mut out = Vec::new();
        q.push(fp(7, 1), 1, entry(1, 0, 500));
        q.push(fp(5, 1), 2, entry(2, 0, 0));
        assert_eq!(q.peek_due(), Some(0));
        assert_eq!(q.pop(10, 8, 0.1, &mut out), 1);
        assert_eq!(out, vec![entry(2, 0, 0)]);
        assert_eq!(q.pop(10, 8, 0.1, &mut out), 0);
        assert_eq!(q.peek_due(), Some(500));
        q.expedite(1, 20);
        assert_eq!(q.peek_due(), Some(20));
        assert_eq!(q.pop(20, 8, 0.1, &mut out), 1);
        assert!(q.is_empty());
        assert_eq!(q.flow_count(), 0);
    }

    #[test]
    fn a_campaign_can_be_topped_up_and_shares_are_reported() {
        let mut q = FairQueue::default();
        let mut out = Vec::new();
        for i in 0..10 {
            q.push(fp(5, 3), 1, entry(1, i, 0));
            q.push(fp(5, 1), 2, entry(2, i, 0));
            q.push(fp(2, 1), 3, entry(3, i, 0));
        }
        assert_eq!(q.pop_campaign(2, 10, 4, 0.1, &mut out), 4);
        assert!(out.iter().all(|(_, id)| id >> 32 == 2));
        let v = q.flow_view(1, 10, 0.1).expect("campaign 1 has jobs");
        assert_eq!(v.pending, 10);
        assert!((v.share - 0.9 * 0.75).abs() < 1e-9, "{v:?}");
        let low = q.flow_view(3, 10, 0.1).expect("campaign 3 has jobs");
        assert!((low.share - 0.1).abs() < 1e-9, "{low:?}");
        assert_eq!(q.flow_view(9, 10, 0.1), None);
        assert_eq!(q.by_priority().collect::<Vec<_>>(), vec![(5, 16), (2, 10)]);
    }

    #[test]
    fn tenants_share_a_class_by_their_weights_whatever_their_campaigns() {
        // Tenant 1 has ten campaigns, tenant 2 one: equal tenant weights split 1:1.
        let mut q = FairQueue::default();
        let tenant = |t: u32, w: u32| FlowParams {
            priority: 5,
            weight: 1,
            tenant: t,
            tenant_weight: w,
        };
        for c in 1..=10 {
            for i in 0..1000 {
                q.push(tenant(1, 1), c, entry(c, i, 0));
            }
        }
        for i in 0..1000 {
            q.push(tenant(2, 1), 11, entry(11, i, 0));
        }
        let count = |q: &mut FairQueue, takes: usize| {
            let mut out = Vec::new();
            for _ in 0..takes {
                q.pop(10, 4, 0.1, &mut out);
            }
            out.iter().filter(|(_, id)| id >> 32 == 11).count()
        };
        assert_eq!(count(&mut q, 200), 400);
        let v = q.flow_view(11, 10, 0.1).expect("campaign 11 has jobs");
        assert!((v.share - 0.5).abs() < 1e-9, "{v:?}");
        // Weights 3 (tenant 3) and 1 (tenant 4): three jobs to one.
        let mut q = FairQueue::default();
        for i in 0..1000 {
            q.push(tenant(3, 3), 1, entry(1, i, 0));
            q.push(tenant(4, 1), 2, entry(2, i, 0));
        }
        let mut out = Vec::new();
        for _ in 0..400 {
            q.pop(10, 1, 0.1, &mut out);
        }
        let second = out.iter().filter(|(_, id)| id >> 32 == 2).count();
        assert_eq!(second, 100);
    }
}
