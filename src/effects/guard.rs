//! Deliverability guards: the counts and judgement of the complaint and hard-bounce breakers.
//!
//! Every transition that reports a delivery, a bounce, a complaint or an unsubscribe is
//! counted here ([`Guard::observe`]): per campaign over its whole life, and per sending domain
//! (the From address's) in ten-minute buckets kept for seven days. [`judge`] compares them with
//! the thresholds: complaint rate = complaints ÷ delivered, hard-bounce rate = (`bad-mailbox` +
//! `bad-domain`) ÷ attempted (delivered + bounced), each once its denominator reaches the minimum
//! sample. Every `guard.interval` [`crate::effects::breakers`] pauses a campaign over a threshold
//! with a [`PausedReason`]; a sending domain over one over `guard.domain_window` trips, and every
//! campaign from it pauses (now, and any created while it stays tripped). A paused campaign
//! stays paused until an operator resumes it: while its breaker would trip again, only with
//! `force`, which exempts the campaign from the breakers from then on; a tripped domain is
//! resumed through `/v1/sending-domains/{domain}/resume` (with `force` while its window is still
//! over, which exempts the domain for one window).
//!
//! Transactional mail is counted in its sending domain's rates but never paused: a stream's
//! bucket holds every From domain's messages, and password resets must not wait on a
//! newsletter's complaints.
//!
//! Counts live in memory and are written to the spool (`meta`, under `guard/`) at each
//! evaluation, so a crash forgets at most one interval of them; breaker state is written
//! synced with the campaign record (a campaign's) or on its own (a domain's), before it acts.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::{LazyLock, Mutex};

use prometheus::{
    IntCounterVec, IntGauge, IntGaugeVec, register_int_counter_vec, register_int_gauge,
    register_int_gauge_vec,
};
use serde::{Deserialize, Serialize};

use crate::config::{GuardConfig, GuardThresholds};
use crate::store::campaign::{Campaign, PausedReason};
use crate::store::spool::{Durability, STATE_GUARD, Spool, SpoolError};

pub(crate) static TRIPS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_guard_trips_total",
        "Breaker trips by breaker (campaign, domain) and measure (complaint_rate, hard_bounce_rate). Each campaign trip pauses one campaign; a domain trip pauses every campaign from the domain.",
        &["breaker", "measure"]
    )
    .expect("metric registers once")
});

static RATE: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_guard_rate_millipercent",
        "Each sending domain's complaint and hard-bounce rate over guard.domain_window, in thousandths of a percent (300 = 0.3%); the first 100 domains seen.",
        &["domain", "measure"]
    )
    .expect("metric registers once")
});

static LEVEL: LazyLock<IntGaugeVec> = LazyLock::new(|| {
    register_int_gauge_vec!(
        "sluice_guard_level",
        "Each sending domain's breaker level per measure: 0 ok, 1 warning (at guard.warning_ratio of the threshold), 2 over the threshold with the minimum sample (tripped); the first 100 domains seen.",
        &["domain", "measure"]
    )
    .expect("metric registers once")
});

static RECIPIENTS: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_sending_domain_recipients_total",
        "Per sending domain (the From address's; the first 100 seen): recipients attempted (delivered or bounced at the receiver), delivered, hard_bounced (bad-mailbox, bad-domain, also when reported later), complained and unsubscribed. Complaint rate = complained / delivered.",
        &["domain", "event"]
    )
    .expect("metric registers once")
});

static BOUNCES: LazyLock<IntCounterVec> = LazyLock::new(|| {
    register_int_counter_vec!(
        "sluice_sending_domain_bounces_total",
        "Per sending domain (the first 100 seen): bounces by category, at delivery or reported later.",
        &["domain", "category"]
    )
    .expect("metric registers once")
});

pub(crate) static PAUSED: LazyLock<IntGauge> = LazyLock::new(|| {
    register_int_gauge!(
        "sluice_guard_paused_campaigns",
        "Campaigns paused by a breaker and not resumed."
    )
    .expect("metric registers once")
});

/// Sending domains given their own metric labels; others are left out of the gauges.
const MAX_LABELLED_DOMAINS: usize = 100;

/// Width of a sending domain's buckets.
pub const BUCKET_MS: u64 = 600_000;
/// How long a sending domain's buckets are kept: the reputation view's longest span.
pub const KEEP_MS: u64 = 7 * 86_400_000;

/// Bounce categories that count as hard bounces: the address or the domain does not exist.
pub const HARD_CATEGORIES: [&str; 2] = ["bad-mailbox", "bad-domain"];

/// Counts over some span.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Sample {
    pub delivered: u64,
    /// Delivered or bounced at the receiver's SMTP server.
    pub attempted: u64,
    pub hard_bounced: u64,
    pub complained: u64,
    pub unsubscribed: u64,
    /// Bounces (at delivery or reported later) by category.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub bounced: BTreeMap<String, u64>,
}

/// One thing that happened to a recipient, as the breakers count it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation<'a> {
    Delivered,
    /// A bounce: `remote` when reported after the server took the message (a DSN), so the
    /// attempt was already counted as delivered.
    Bounced {
        category: &'a str,
        remote: bool,
    },
    Complained,
    Unsubscribed,
}

impl Sample {
    pub fn observe(&mut self, o: Observation<'_>) {
        match o {
            Observation::Delivered => {
                self.delivered += 1;
                self.attempted += 1;
            }
            Observation::Bounced { category, remote } => {
                if !remote {
                    self.attempted += 1;
                }
                if HARD_CATEGORIES.contains(&category) {
                    self.hard_bounced += 1;
                }
                match self.bounced.get_mut(category) {
                    Some(n) => *n += 1,
                    None => {
                        self.bounced.insert(category.to_owned(), 1);
                    }
                }
            }
            Observation::Complained => self.complained += 1,
            Observation::Unsubscribed => self.unsubscribed += 1,
        }
    }

    pub fn add(&mut self, o: &Sample) {
        self.delivered += o.delivered;
        self.attempted += o.attempted;
        self.hard_bounced += o.hard_bounced;
        self.complained += o.complained;
        self.unsubscribed += o.unsubscribed;
        for (k, v) in &o.bounced {
            *self.bounced.entry(k.clone()).or_default() += v;
        }
    }

    fn is_empty(&self) -> bool {
        self == &Sample::default()
    }
}

/// Thresholds with every field set.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub max_complaint_percent: f64,
    pub min_delivered: u64,
    pub max_hard_bounce_percent: f64,
    pub min_attempted: u64,
    pub warning_ratio: f64,
}

impl Limits {
    /// `own` over the config's.
    pub fn of(config: &GuardConfig, own: Option<&GuardThresholds>) -> Limits {
        let own = own.copied().unwrap_or_default();
        Limits {
            max_complaint_percent: own
                .max_complaint_percent
                .unwrap_or(config.max_complaint_percent),
            min_delivered: own.min_delivered.unwrap_or(config.min_delivered),
            max_hard_bounce_percent: own
                .max_hard_bounce_percent
                .unwrap_or(config.max_hard_bounce_percent),
            min_attempted: own.min_attempted.unwrap_or(config.min_attempted),
            warning_ratio: config.warning_ratio,
        }
    }
}

/// How a rate stands against its threshold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Level {
    Ok,
    /// At `warning_ratio` of the threshold or more (whatever the sample), or over it before the
    /// minimum sample.
    Warning,
    /// Over the threshold with at least the minimum sample: the breaker trips.
    Tripped,
}

/// One measure of a sample against its threshold.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Measure {
    /// `complaint_rate` or `hard_bounce_rate`.
    pub name: &'static str,
    /// `None` before anything was counted in the denominator.
    pub rate_percent: Option<f64>,
    pub count: u64,
    pub sample: u64,
    pub threshold_percent: f64,
    pub min_sample: u64,
    pub level: Level,
}

impl Measure {
    fn of(name: &'static str, count: u64, sample: u64, max: f64, min: u64, warn: f64) -> Measure {
        let rate = (sample > 0).then(|| count as f64 * 100.0 / sample as f64);
        let level = match rate {
            Some(r) if r > max && sample >= min => Level::Tripped,
            Some(r) if r > max || (count > 0 && r >= max * warn) => Level::Warning,
            _ => Level::Ok,
        };
        Measure {
            name,
            rate_percent: rate.map(|r| (r * 10_000.0).round() / 10_000.0),
            count,
            sample,
            threshold_percent: max,
            min_sample: min,
            level,
        }
    }

    /// The reason a pause gives for this measure.
    pub fn reason(&self, breaker: &str, window: &str, domain: &str, at_ms: u64) -> PausedReason {
        let rate = self.rate_percent.unwrap_or(0.0);
        let (what, of) = match self.name {
            "complaint_rate" => ("complaint rate", "delivered"),
            _ => ("hard-bounce rate", "attempted"),
        };
        let over = match window {
            "campaign" => "over the whole campaign".to_owned(),
            w => format!("over the last {w} for {domain}"),
        };
        PausedReason {
            breaker: breaker.to_owned(),
            measure: self.name.to_owned(),
            rate_percent: rate,
            count: self.count,
            sample: self.sample,
            threshold_percent: self.threshold_percent,
            window: window.to_owned(),
            domain: domain.to_owned(),
            at_ms,
            message: format!(
                "{breaker} breaker: {what} {rate:.3}% ({} of {} {of}) {over} is above the threshold of {}% (judged from {} {of})",
                self.count, self.sample, self.threshold_percent, self.min_sample
            ),
        }
    }
}

/// Both measures of a sample.
pub fn judge(sample: &Sample, l: &Limits) -> [Measure; 2] {
    [
        Measure::of(
            "complaint_rate",
            sample.complained,
            sample.delivered,
            l.max_complaint_percent,
            l.min_delivered,
            l.warning_ratio,
        ),
        Measure::of(
            "hard_bounce_rate",
            sample.hard_bounced,
            sample.attempted,
            l.max_hard_bounce_percent,
            l.min_attempted,
            l.warning_ratio,
        ),
    ]
}

/// The sending domain of a From address, lowercased.
pub fn domain_of(from: &str) -> String {
    from.rsplit_once('@')
        .map_or(from, |(_, d)| d)
        .to_ascii_lowercase()
}

/// A sending domain's breaker state, stored under `guard/t/<domain>`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DomainState {
    /// Why it tripped; `None` when not tripped.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tripped: Option<PausedReason>,
    /// Resumed with `force` while still over: not judged again before this time (ms).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exempt_until_ms: Option<u64>,
}

/// A sending domain's counters in `sluice_sending_domain_recipients_total`: attempted,
/// delivered, hard_bounced, complained, unsubscribed.
struct DomainMetrics {
    events: [prometheus::IntCounter; 5],
    domain: String,
}

const EVENTS: [&str; 5] = [
    "attempted",
    "delivered",
    "hard_bounced",
    "complained",
    "unsubscribed",
];

impl DomainMetrics {
    fn new(domain: &str) -> DomainMetrics {
        DomainMetrics {
            events: EVENTS.map(|e| RECIPIENTS.with_label_values(&[domain, e])),
            domain: domain.to_owned(),
        }
    }

    fn observe(&self, o: Observation<'_>) {
        let [attempted, delivered, hard, complained, unsubscribed] = &self.events;
        match o {
            Observation::Delivered => {
                attempted.inc();
                delivered.inc();
            }
            Observation::Bounced { category, remote } => {
                if !remote {
                    attempted.inc();
                }
                if HARD_CATEGORIES.contains(&category) {
                    hard.inc();
                }
                BOUNCES.with_label_values(&[&self.domain, category]).inc();
            }
            Observation::Complained => complained.inc(),
            Observation::Unsubscribed => unsubscribed.inc(),
        }
    }
}

/// A sending domain's buckets, oldest first, by bucket number (`ms / BUCKET_MS`), and its
/// metric counters when it has labels of its own.
#[derive(Default)]
struct Buckets(VecDeque<(u64, Sample)>, Option<DomainMetrics>);

impl Buckets {
    fn current(&mut self, bucket: u64) -> &mut Sample {
        if self.0.back().is_none_or(|(b, _)| *b < bucket) {
            self.0.push_back((bucket, Sample::default()));
        }
        let i = self.0.iter().rposition(|(b, _)| *b <= bucket).unwrap_or(0);
        &mut self.0[i].1
    }

    /// The sum of the buckets that overlap the last `span_ms` before `now`.
    fn sum(&self, now: u64, span_ms: u64) -> Sample {
        let first = now.saturating_sub(span_ms) / BUCKET_MS;
        let mut total = Sample::default();
        for (_, s) in self.0.iter().filter(|(b, _)| *b >= first) {
            total.add(s);
        }
        total
    }

    /// Drops buckets older than [`KEEP_MS`]; returns their numbers.
    fn expire(&mut self, now: u64) -> Vec<u64> {
        let first = now.saturating_sub(KEEP_MS) / BUCKET_MS;
        let mut gone = Vec::new();
        while self.0.front().is_some_and(|(b, _)| *b < first) {
            if let Some((b, _)) = self.0.pop_front() {
                gone.push(b);
            }
        }
        gone
    }
}

#[derive(Default)]
struct Inner {
    campaigns: HashMap<u32, Sample>,
    domains: HashMap<String, Buckets>,
    states: HashMap<String, DomainState>,
    dirty_campaigns: HashSet<u32>,
    dirty_buckets: HashSet<(String, u64)>,
    /// Domains given metric labels so far (at most [`MAX_LABELLED_DOMAINS`]).
    labelled: usize,
}

impl Inner {
    /// `domain`'s buckets, created on first sight (with metric labels of its own while fewer
    /// than [`MAX_LABELLED_DOMAINS`] domains have them).
    fn domain(&mut self, domain: &str) -> &mut Buckets {
        if !self.domains.contains_key(domain) {
            let labelled = self.labelled < MAX_LABELLED_DOMAINS;
            self.labelled += usize::from(labelled);
            let metrics = labelled.then(|| DomainMetrics::new(domain));
            self.domains
                .insert(domain.to_owned(), Buckets(VecDeque::new(), metrics));
        }
        self.domains.get_mut(domain).expect("inserted above")
    }
}

/// The counts and breaker states of one node.
#[derive(Default)]
pub struct Guard {
    inner: Mutex<Inner>,
}

/// What the reputation view shows of a sending domain.
#[derive(Debug, Clone, Serialize)]
pub struct DomainView {
    pub domain: String,
    pub last_24h: Sample,
    pub last_7d: Sample,
    /// The breaker's window, and each measure over it.
    pub window: Sample,
    pub measures: [Measure; 2],
    pub state: DomainState,
}

fn campaign_key(seq: u32) -> Vec<u8> {
    [&b"c/"[..], &seq.to_be_bytes()].concat()
}

fn bucket_key(domain: &str, bucket: u64) -> Vec<u8> {
    [b"d/", domain.as_bytes(), b"\0", &bucket.to_be_bytes()].concat()
}

fn state_key(domain: &str) -> Vec<u8> {
    [b"t/", domain.as_bytes()].concat()
}

impl Guard {
    /// Counts `o` for `campaign` and its sending domain.
    pub fn observe(&self, campaign: &Campaign, o: Observation<'_>) {
        let now = crate::now_ms();
        let bucket = now / BUCKET_MS;
        let domain = domain_of(&campaign.record.from);
        let mut g = self.inner.lock().expect("guard lock");
        g.campaigns.entry(campaign.seq).or_default().observe(o);
        g.dirty_campaigns.insert(campaign.seq);
        let b = g.domain(&domain);
        b.current(bucket).observe(o);
        if let Some(m) = &b.1 {
            m.observe(o);
        }
        g.dirty_buckets.insert((domain, bucket));
    }

    /// A campaign's counts so far.
    pub fn campaign(&self, seq: u32) -> Sample {
        let g = self.inner.lock().expect("guard lock");
        g.campaigns.get(&seq).cloned().unwrap_or_default()
    }

    /// A sending domain's breaker state.
    pub fn domain_state(&self, domain: &str) -> DomainState {
        let g = self.inner.lock().expect("guard lock");
        g.states.get(domain).cloned().unwrap_or_default()
    }

    /// The sending domains with counts or a breaker state, sorted.
    pub fn domains(&self) -> Vec<String> {
        let g = self.inner.lock().expect("guard lock");
        let mut v: Vec<String> = g.domains.keys().chain(g.states.keys()).cloned().collect();
        v.sort_unstable();
        v.dedup();
        v
    }

    /// The reputation view of `domain` at `now`.
    pub fn view(&self, config: &GuardConfig, domain: &str, now: u64) -> DomainView {
        let g = self.inner.lock().expect("guard lock");
        let (day, week, window) = match g.domains.get(domain) {
            Some(b) => (
                b.sum(now, 86_400_000),
                b.sum(now, KEEP_MS),
                b.sum(now, window_ms(config)),
            ),
            None => Default::default(),
        };
        DomainView {
            domain: domain.to_owned(),
            measures: judge(&window, &Limits::of(config, None)),
            last_24h: day,
            last_7d: week,
            window,
            state: g.states.get(domain).cloned().unwrap_or_default(),
        }
    }

    /// Loads counts and domain states from the spool. Blocking.
    pub fn load(&self, spool: &Spool) -> Result<usize, SpoolError> {
        let mut g = self.inner.lock().expect("guard lock");
        let mut n = 0;
        spool.scan_state(STATE_GUARD, |k, v| {
            n += 1;
            if let Some(seq) = k.strip_prefix(b"c/") {
                if let (Ok(seq), Ok(s)) = (<[u8; 4]>::try_from(seq), serde_json::from_slice(v)) {
                    g.campaigns.insert(u32::from_be_bytes(seq), s);
                }
            } else if let Some(rest) = k.strip_prefix(b"d/") {
                let Some(split) = rest.len().checked_sub(9) else {
                    return;
                };
                let (domain, bucket) = (&rest[..split], &rest[split + 1..]);
                if let (Ok(domain), Ok(bucket), Ok(s)) = (
                    std::str::from_utf8(domain),
                    <[u8; 8]>::try_from(bucket),
                    serde_json::from_slice::<Sample>(v),
                ) {
                    // Keys sort by bucket within a domain.
                    g.domain(domain)
                        .0
                        .push_back((u64::from_be_bytes(bucket), s));
                }
            } else if let Some(domain) = k.strip_prefix(b"t/")
                && let (Ok(domain), Ok(s)) =
                    (std::str::from_utf8(domain), serde_json::from_slice(v))
            {
                g.states.insert(domain.to_owned(), s);
            }
        })?;
        Ok(n)
    }

    /// Writes the counts changed since the last flush, drops buckets past [`KEEP_MS`] and the
    /// counts of campaigns no longer in `live` (archived).
    pub async fn flush(&self, spool: &Spool, live: &HashSet<u32>) -> Result<(), SpoolError> {
        let now = crate::now_ms();
        let mut batch = spool.batch();
        let (campaigns, buckets) = {
            let mut g = self.inner.lock().expect("guard lock");
            let g = &mut *g;
            let gone: Vec<u32> = g
                .campaigns
                .keys()
                .filter(|s| !live.contains(s))
                .copied()
                .collect();
            for seq in gone {
                g.campaigns.remove(&seq);
                g.dirty_campaigns.remove(&seq);
                batch.delete_state(STATE_GUARD, &campaign_key(seq));
            }
            for (domain, b) in g.domains.iter_mut() {
                for bucket in b.expire(now) {
                    batch.delete_state(STATE_GUARD, &bucket_key(domain, bucket));
                }
            }
            g.domains.retain(|_, b| !b.0.is_empty() || b.1.is_some());
            let campaigns: Vec<u32> = g.dirty_campaigns.drain().collect();
            let buckets: Vec<(String, u64)> = g.dirty_buckets.drain().collect();
            for seq in &campaigns {
                if let Some(s) = g.campaigns.get(seq) {
                    let v = serde_json::to_vec(s).expect("a sample serialises");
                    batch.put_state(STATE_GUARD, &campaign_key(*seq), &v);
                }
            }
            for (domain, bucket) in &buckets {
                let found = g
                    .domains
                    .get(domain)
                    .and_then(|b| b.0.iter().find(|(n, _)| n == bucket));
                if let Some((_, s)) = found.filter(|(_, s)| !s.is_empty()) {
                    let v = serde_json::to_vec(s).expect("a sample serialises");
                    batch.put_state(STATE_GUARD, &bucket_key(domain, *bucket), &v);
                }
            }
            (campaigns, buckets)
        };
        if batch.is_empty() {
            return Ok(());
        }
        let written = spool.write(batch, Durability::Buffered).await;
        if written.is_err() {
            let mut g = self.inner.lock().expect("guard lock");
            g.dirty_campaigns.extend(campaigns);
            g.dirty_buckets.extend(buckets);
        }
        written
    }

    /// Stores and sets a sending domain's breaker state. Synced: a trip is stored before the
    /// campaigns it pauses.
    pub async fn set_domain_state(
        &self,
        spool: &Spool,
        domain: &str,
        state: DomainState,
    ) -> Result<(), SpoolError> {
        let mut batch = spool.batch();
        if state == DomainState::default() {
            batch.delete_state(STATE_GUARD, &state_key(domain));
        } else {
            let v = serde_json::to_vec(&state).expect("a domain state serialises");
            batch.put_state(STATE_GUARD, &state_key(domain), &v);
        }
        spool.write(batch, Durability::Sync).await?;
        let mut g = self.inner.lock().expect("guard lock");
        if state == DomainState::default() {
            g.states.remove(domain);
        } else {
            g.states.insert(domain.to_owned(), state);
        }
        Ok(())
    }

    /// The reason a campaign created now from `from` starts paused: its sending domain's
    /// breaker is tripped.
    pub fn tripped_reason(&self, from: &str) -> Option<PausedReason> {
        let g = self.inner.lock().expect("guard lock");
        g.states.get(&domain_of(from))?.tripped.clone()
    }

    /// Sets the domain gauges from `views` (the domains with labels of their own).
    pub fn export(&self, views: &[DomainView]) {
        let g = self.inner.lock().expect("guard lock");
        for v in views {
            if g.domains.get(&v.domain).is_none_or(|b| b.1.is_none()) {
                continue;
            }
            for m in &v.measures {
                let labels = [v.domain.as_str(), m.name];
                let milli = m.rate_percent.unwrap_or(0.0) * 1000.0;
                RATE.with_label_values(&labels).set(milli.round() as i64);
                let level = if v.state.tripped.is_some() {
                    Level::Tripped
                } else {
                    m.level
                };
                LEVEL.with_label_values(&labels).set(level as i64);
            }
        }
    }
}

/// The sending-domain window in ms.
pub fn window_ms(config: &GuardConfig) -> u64 {
    config.domain_window.as_millis() as u64
}

/// The window's name in reasons (`24h`, `10m`).
pub fn window_name(config: &GuardConfig) -> String {
    humantime::format_duration(config.domain_window).to_string()
}

/// The measure of `campaign` that trips its own breaker now, if one does.
pub fn campaign_trip(config: &GuardConfig, guard: &Guard, campaign: &Campaign) -> Option<Measure> {
    let limits = Limits::of(config, campaign.record.guard.as_ref());
    let sample = guard.campaign(campaign.seq);
    judge(&sample, &limits)
        .into_iter()
        .find(|m| m.level == Level::Tripped)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_complaint_percent: 0.3,
            min_delivered: 1000,
            max_hard_bounce_percent: 5.0,
            min_attempted: 500,
            warning_ratio: 0.5,
        }
    }

    fn sample(delivered: u64, complained: u64, bounced: u64, hard: u64) -> Sample {
        Sample {
            delivered,
            attempted: delivered + bounced,
            hard_bounced: hard,
            complained,
            ..Sample::default()
        }
    }

    #[test]
    fn a_rate_trips_only_over_its_threshold_with_the_minimum_sample() {
        // 0.5% complaints: a warning before 1,000 delivered, tripped from then on.
        let [c, _] = judge(&sample(999, 5, 0, 0), &limits());
        assert_eq!(c.level, Level::Warning);
        let [c, _] = judge(&sample(1000, 5, 0, 0), &limits());
        assert_eq!((c.level, c.rate_percent), (Level::Tripped, Some(0.5)));
        // 0.1%: under the threshold, under the warning level (0.15%).
        let [c, _] = judge(&sample(3000, 3, 0, 0), &limits());
        assert_eq!(c.level, Level::Ok);
        // 0.2%: a warning.
        let [c, _] = judge(&sample(3000, 6, 0, 0), &limits());
        assert_eq!(c.level, Level::Warning);
        // Exactly at the threshold does not trip.
        let [c, _] = judge(&sample(1000, 3, 0, 0), &limits());
        assert_eq!(c.level, Level::Warning);
        // 10% hard bounces of 500 attempted.
        let [_, b] = judge(&sample(450, 0, 50, 50), &limits());
        assert_eq!((b.level, b.rate_percent), (Level::Tripped, Some(10.0)));
        // Soft bounces do not count.
        let [_, b] = judge(&sample(450, 0, 50, 0), &limits());
        assert_eq!(b.level, Level::Ok);
        // Nothing counted yet: no rate.
        let [c, b] = judge(&Sample::default(), &limits());
        assert_eq!((c.rate_percent, b.level), (None, Level::Ok));
    }

    #[test]
    fn observations_count_into_the_right_fields() {
        let mut s = Sample::default();
        s.observe(Observation::Delivered);
        s.observe(Observation::Bounced {
            category: "bad-mailbox",
            remote: false,
        });
        s.observe(Observation::Bounced {
            category: "quota-issues",
            remote: false,
        });
        // A DSN after delivery: a hard bounce, not another attempt.
        s.observe(Observation::Bounced {
            category: "bad-domain",
            remote: true,
        });
        s.observe(Observation::Complained);
        s.observe(Observation::Unsubscribed);
        assert_eq!(
            (s.delivered, s.attempted, s.hard_bounced),
            (1, 3, 2),
            "{s:?}"
        );
        assert_eq!((s.complained, s.unsubscribed), (1, 1));
        assert_eq!(s.bounced.get("quota-issues"), Some(&1));
    }

    #[test]
    fn the_window_sums_the_buckets_it_overlaps_and_old_ones_expire() {
        let mut b = Buckets::default();
        let t0 = 1_000 * BUCKET_MS;
        b.current(t0 / BUCKET_MS).observe(Observation::Delivered);
        b.current(t0 / BUCKET_MS + 3)
            .observe(Observation::Delivered);
        b.current(t0 / BUCKET_MS + 3)
            .observe(Observation::Complained);
        let now = t0 + 3 * BUCKET_MS + 1;
        assert_eq!(b.sum(now, 2 * BUCKET_MS).delivered, 1);
        assert_eq!(b.sum(now, 4 * BUCKET_MS).delivered, 2);
        assert_eq!(b.sum(now, KEEP_MS).complained, 1);
        let gone = b.expire(t0 + KEEP_MS + BUCKET_MS);
        assert_eq!(gone, vec![t0 / BUCKET_MS]);
        assert_eq!(b.0.len(), 1);
    }

    #[test]
    fn reasons_say_the_rate_the_window_and_the_threshold() {
        let [c, _] = judge(&sample(1000, 5, 0, 0), &limits());
        let r = c.reason("campaign", "campaign", "example.com", 7);
        assert_eq!(
            r.message,
            "campaign breaker: complaint rate 0.500% (5 of 1000 delivered) over the whole campaign is above the threshold of 0.3% (judged from 1000 delivered)"
        );
        let [_, b] = judge(&sample(450, 0, 50, 50), &limits());
        let r = b.reason("domain", "24h", "example.com", 7);
        assert!(
            r.message.contains("over the last 24h for example.com"),
            "{}",
            r.message
        );
        assert_eq!((r.sample, r.count, r.threshold_percent), (500, 50, 5.0));
    }
}
