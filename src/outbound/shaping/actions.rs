//! Shaping actions in force: suspensions and throttles of one (source, site) until they expire,
//! each with the rule and the reply that triggered it. Kept in the spool (`meta`, under
//! `shaping/`), so they survive restarts; listed and lifted through `/v1/shaping`.
//!
//! Delivery asks [`Actions::effect`] before each transaction; a generation number lets it keep
//! the answer until an action is added or lifted.

use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};

use super::rules::Action;
use crate::config::Rate;
use crate::store::spool::{Durability, STATE_SHAPING, Spool, SpoolError};

/// One action, as stored and as `GET /v1/shaping` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ActionRecord {
    pub id: String,
    /// The rule that set it.
    pub rule: String,
    /// `suspend` or `throttle`.
    pub kind: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_rate: Option<Rate>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    /// The egress source (by name).
    pub source: String,
    /// The site (its key: the MX set, or the relay).
    pub site: String,
    /// The site's label in metrics and reports.
    pub site_label: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub provider: Option<String>,
    /// The reply that triggered it.
    pub reply: String,
    pub created_at_ms: u64,
    pub expires_at_ms: u64,
}

/// What the actions in force do to one (source, site) now.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Effect {
    /// Nothing may be sent before this (0: not suspended).
    pub suspended_until_ms: u64,
    /// The lowest rate of the throttles in force.
    pub message_rate: Option<Rate>,
    /// The lowest connection cap of the throttles in force.
    pub max_connections: Option<u32>,
    /// When the first of these actions expires (u64::MAX: none in force): the effect must be
    /// asked again then.
    pub changes_at_ms: u64,
}

/// An action added or lifted, as the cluster's change stream carries it (cluster mode): a
/// provider that pushes back on a source pushes back on it for every node.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Change {
    #[serde(rename = "shaping.add")]
    Add { action: Box<ActionRecord> },
    #[serde(rename = "shaping.lift")]
    Lift { id: String },
}

impl Change {
    pub fn to_json(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }
}

/// The actions in force, by id.
#[derive(Default)]
pub struct Actions {
    by_id: Mutex<HashMap<String, ActionRecord>>,
    /// Ids of expired actions still in the spool, deleted with the next write.
    stale: Mutex<Vec<String>>,
    generation: AtomicU64,
    /// Cluster mode: actions added and lifted here are staged for the other nodes.
    replicate: std::sync::atomic::AtomicBool,
}

impl Actions {
    /// Loads the stored actions; expired ones are deleted. Blocking.
    pub fn load(&self, spool: &Spool) -> Result<usize, SpoolError> {
        let now = crate::now_ms();
        let mut expired = Vec::new();
        let mut map = self.by_id.lock().expect("shaping actions lock");
        spool.scan_state(STATE_SHAPING, |k, v| match serde_json::from_slice::<ActionRecord>(v) {
            Ok(a) if a.expires_at_ms > now => {
                map.insert(a.id.clone(), a);
            }
            Ok(_) => expired.push(k.to_vec()),
            Err(e) => {
                tracing::warn!(key = %String::from_utf8_lossy(k), error = %e, "unreadable shaping action dropped");
                expired.push(k.to_vec());
            }
        })?;
        let loaded = map.len();
        drop(map);
        // Deleted with the next write of an action.
        self.stale.lock().expect("shaping actions lock").extend(
            expired
                .into_iter()
                .map(|k| String::from_utf8_lossy(&k).into_owned()),
        );
        self.generation.fetch_add(1, Ordering::Release);
        Ok(loaded)
    }

    /// Bumped whenever an action is added or lifted.
    pub fn generation(&self) -> u64 {
        self.generation.load(Ordering::Acquire)
    }

    /// What the actions in force at `now` do to (`source`, `site`).
    pub fn effect(&self, source: &str, site: &str, now: u64) -> Effect {
        let map = self.by_id.lock().expect("shaping actions lock");
        let mut e = Effect {
            changes_at_ms: u64::MAX,
            ..Effect::default()
        };
        for a in map.values() {
            if a.source != source || a.site != site || a.expires_at_ms <= now {
                continue;
            }
            e.changes_at_ms = e.changes_at_ms.min(a.expires_at_ms);
            match a.kind.as_str() {
                "suspend" => e.suspended_until_ms = e.suspended_until_ms.max(a.expires_at_ms),
                _ => {
                    if let Some(r) = a.message_rate
                        && e.message_rate
                            .is_none_or(|m| r.per_second() < m.per_second())
                    {
                        e.message_rate = Some(r);
                    }
                    if let Some(c) = a.max_connections {
                        e.max_connections = Some(e.max_connections.map_or(c, |m| m.min(c)));
                    }
                }
            }
        }
        e
    }

    /// Records an action of `rule` on (`source`, `site`), unless one of that rule is already in
    /// force there (the replies of one burst trigger it once). It is in force at once and
    /// synced to the spool before this returns (if the write fails, it stays in force in
    /// memory only, and the error is returned). Returns the new action.
    #[allow(clippy::too_many_arguments)]
    pub async fn add(
        &self,
        spool: &Spool,
        rule: &super::rules::Rule,
        source: &str,
        site: &str,
        site_label: &str,
        provider: Option<&str>,
        reply: &str,
    ) -> Result<Option<ActionRecord>, SpoolError> {
        let now = crate::now_ms();
        let (message_rate, max_connections) = match rule.action {
            Action::Throttle {
                message_rate,
                max_connections,
            } => (message_rate, max_connections),
            Action::Suspend | Action::Ignore => (None, None),
        };
        let record = ActionRecord {
            id: uuid::Uuid::now_v7().simple().to_string(),
            rule: rule.name.clone(),
            kind: rule.action.kind().to_owned(),
            message_rate,
            max_connections,
            source: source.to_owned(),
            site: site.to_owned(),
            site_label: site_label.to_owned(),
            provider: provider.map(str::to_owned),
            reply: reply.chars().take(512).collect(),
            created_at_ms: now,
            expires_at_ms: now.saturating_add(rule.duration.as_millis() as u64),
        };
        let expired = {
            let mut map = self.by_id.lock().expect("shaping actions lock");
            if map.values().any(|a| {
                a.rule == record.rule
                    && a.source == source
                    && a.site == site
                    && a.expires_at_ms > now
            }) {
                return Ok(None);
            }
            let mut expired: Vec<String> =
                std::mem::take(&mut *self.stale.lock().expect("shaping actions lock"));
            map.retain(|id, a| {
                let keep = a.expires_at_ms > now;
                if !keep {
                    expired.push(id.clone());
                }
                keep
            });
            // In force at once, so the replies of the same burst find it.
            map.insert(record.id.clone(), record.clone());
            expired
        };
        self.generation.fetch_add(1, Ordering::Release);
        let mut batch = spool.batch();
        batch.put_state(
            STATE_SHAPING,
            record.id.as_bytes(),
            &serde_json::to_vec(&record).expect("an action serialises"),
        );
        if self.replicate.load(Ordering::Acquire) {
            let change = Change::Add {
                action: Box::new(record.clone()),
            };
            crate::cluster::sync::stage(&mut batch, &change.to_json());
        }
        for id in &expired {
            batch.delete_state(STATE_SHAPING, id.as_bytes());
        }
        if let Err(e) = spool.write(batch, Durability::Sync).await {
            // Still in force until it expires or the process stops; the expired ones are
            // deleted with the next write.
            self.stale
                .lock()
                .expect("shaping actions lock")
                .extend(expired);
            return Err(e);
        }
        Ok(Some(record))
    }

    /// Lifts action `id` before it expires. `None` if there is no such action in force.
    pub async fn lift(&self, spool: &Spool, id: &str) -> Result<Option<ActionRecord>, SpoolError> {
        let now = crate::now_ms();
        let found = {
            let map = self.by_id.lock().expect("shaping actions lock");
            map.get(id).filter(|a| a.expires_at_ms > now).cloned()
        };
        let Some(found) = found else {
            return Ok(None);
        };
        let mut batch = spool.batch();
        batch.delete_state(STATE_SHAPING, id.as_bytes());
        if self.replicate.load(Ordering::Acquire) {
            let change = Change::Lift { id: id.to_owned() };
            crate::cluster::sync::stage(&mut batch, &change.to_json());
        }
        spool.write(batch, Durability::Sync).await?;
        self.by_id.lock().expect("shaping actions lock").remove(id);
        self.generation.fetch_add(1, Ordering::Release);
        Ok(Some(found))
    }

    /// Cluster mode: stage every action added or lifted here for the other nodes from now on.
    pub fn set_replicating(&self) {
        self.replicate.store(true, Ordering::Release);
    }

    /// Stages another node's change in `batch` (nothing is staged for the stream again).
    pub fn stage_received(batch: &mut crate::store::spool::SpoolBatch, change: &Change) {
        match change {
            Change::Add { action } => batch.put_state(
                STATE_SHAPING,
                action.id.as_bytes(),
                &serde_json::to_vec(action).expect("an action serialises"),
            ),
            Change::Lift { id } => batch.delete_state(STATE_SHAPING, id.as_bytes()),
        }
    }

    /// Puts another node's change in force, once [`Actions::stage_received`]'s batch is written.
    pub fn apply_received(&self, change: Change) {
        let now = crate::now_ms();
        {
            let mut map = self.by_id.lock().expect("shaping actions lock");
            match change {
                Change::Add { action } if action.expires_at_ms > now => {
                    tracing::info!(
                        rule = %action.rule,
                        source = %action.source,
                        site = %action.site_label,
                        "shaping action from another node"
                    );
                    map.insert(action.id.clone(), *action);
                }
                Change::Add { .. } => return,
                Change::Lift { id } => {
                    if map.remove(&id).is_none() {
                        return;
                    }
                }
            }
        }
        self.generation.fetch_add(1, Ordering::Release);
    }

    /// The actions in force at `now`, oldest first.
    pub fn list(&self, now: u64) -> Vec<ActionRecord> {
        let map = self.by_id.lock().expect("shaping actions lock");
        let mut v: Vec<ActionRecord> = map
            .values()
            .filter(|a| a.expires_at_ms > now)
            .cloned()
            .collect();
        v.sort_by(|a, b| a.created_at_ms.cmp(&b.created_at_ms).then(a.id.cmp(&b.id)));
        v
    }
}
