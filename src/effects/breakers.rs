//! The breakers' task: every `guard.interval` it judges the counts [`crate::effects::guard`]
//! keeps, pauses the campaigns over a threshold (their own, or their sending domain's) with
//! their reason, stores tripped domains, sets the gauges, and writes the counts.

use std::collections::HashSet;
use std::sync::Arc;

use crate::effects::guard::{DomainView, Level, PAUSED, TRIPS, domain_of, window_name};
use crate::node::Node;
use crate::store::campaign::{Campaign, CampaignKind, CampaignState, PausedReason};

/// Whether `campaign` is one the breakers judge and pause: an active or paused campaign (not a
/// transactional bucket) that no operator exempted with `force`.
fn judged(campaign: &Campaign) -> bool {
    campaign.record.kind == CampaignKind::Bulk
        && campaign.state() != CampaignState::Cancelled
        && campaign.breaker().breaker_override_at_ms.is_none()
}

/// One evaluation: trips campaign and domain breakers, pauses the campaigns they name, sets the
/// gauges.
pub async fn evaluate(node: &Arc<Node>) {
    let config = &node.config.guard;
    let now = crate::now_ms();
    let campaigns = node.campaigns.all();
    let mut paused = 0;
    for c in &campaigns {
        if c.breaker().paused_reason.is_some() && c.state() == CampaignState::Paused {
            paused += 1;
        }
        if !judged(c) || c.state() != CampaignState::Active {
            continue;
        }
        if let Some(m) = crate::effects::guard::campaign_trip(config, &node.guard, c) {
            let domain = domain_of(&c.record.from);
            let reason = m.reason("campaign", "campaign", &domain, now);
            TRIPS.with_label_values(&["campaign", m.name]).inc();
            if pause(node, c, reason).await {
                paused += 1;
            }
        }
    }
    let mut views = Vec::new();
    for domain in node.guard.domains() {
        let view = node.guard.view(config, &domain, now);
        let mut state = view.state.clone();
        if state.exempt_until_ms.is_some_and(|t| t <= now) {
            state.exempt_until_ms = None;
        }
        let exempt = state.exempt_until_ms.is_some();
        if config.domain_breaker
            && state.tripped.is_none()
            && !exempt
            && let Some(m) = view.measures.iter().find(|m| m.level == Level::Tripped)
        {
            let reason = m.reason("domain", &window_name(config), &domain, now);
            tracing::warn!(%domain, reason = %reason.message, "sending domain breaker tripped");
            TRIPS.with_label_values(&["domain", m.name]).inc();
            state.tripped = Some(reason);
        }
        if state != view.state
            && let Err(e) = node
                .guard
                .set_domain_state(&node.spool, &domain, state.clone())
                .await
        {
            tracing::warn!(%domain, error = %e, "storing a sending domain's breaker state failed; retried at the next evaluation");
            continue;
        }
        if let Some(reason) = &state.tripped {
            for c in &campaigns {
                if judged(c)
                    && c.state() == CampaignState::Active
                    && domain_of(&c.record.from) == domain
                    && pause(node, c, reason.clone()).await
                {
                    paused += 1;
                }
            }
        }
        views.push(DomainView { state, ..view });
    }
    node.guard.export(&views);
    PAUSED.set(paused);
}

/// Pauses `campaign` for `reason` (stored with it, synced, with a `campaign_paused` event);
/// whether it did.
async fn pause(node: &Node, campaign: &Campaign, reason: PausedReason) -> bool {
    let id = campaign.record.id;
    let mut mark = campaign.breaker();
    mark.paused_reason = Some(reason.clone());
    match node
        .set_campaign_state_marked(campaign, CampaignState::Paused, Some(mark))
        .await
    {
        Ok(true) => {
            tracing::warn!(campaign = %id, reason = %reason.message, "campaign paused by a breaker");
            true
        }
        Ok(false) => false,
        Err(e) => {
            tracing::warn!(campaign = %id, error = %e, "pausing a campaign for its breaker failed; retried at the next evaluation");
            false
        }
    }
}

/// Evaluates every `guard.interval` and writes the counts, until `stop`.
pub async fn run(node: Arc<Node>, stop: tokio_util::sync::CancellationToken) {
    // Every trip series exists from the start, at 0.
    for breaker in ["campaign", "domain"] {
        for measure in ["complaint_rate", "hard_bounce_rate"] {
            TRIPS.with_label_values(&[breaker, measure]);
        }
    }
    PAUSED.set(0);
    let mut tick = tokio::time::interval(node.config.guard.interval);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let stopping = tokio::select! {
            _ = stop.cancelled() => true,
            _ = tick.tick() => false,
        };
        // Before recovery has run there is nothing to judge or write; while stopping, the
        // counts are written once more.
        if node.is_recovered() {
            if node.config.guard.enabled && node.is_ready() && !stopping {
                evaluate(&node).await;
            }
            let live: HashSet<u32> = node.campaigns.all().iter().map(|c| c.seq).collect();
            if let Err(e) = node.guard.flush(&node.spool, &live).await {
                tracing::warn!(error = %e, "writing breaker counts failed; retried at the next evaluation");
            }
        }
        if stopping {
            break;
        }
    }
}
