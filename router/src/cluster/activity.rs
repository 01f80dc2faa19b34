//! What the cluster has done lately, for the web page and `exo-router status`: tokens per second
//! per node over the last few seconds ([`Rate`]), hand-offs per prefill -> decode pair
//! ([`LinkTally`]), and the last requests ([`RequestRecord`]). Counted by the router from what it
//! sees of each request; nodes are not asked.

use std::collections::{BTreeMap, VecDeque};
use std::sync::Mutex;
use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::placement::NodeId;

/// Seconds a [`Rate`] averages over.
pub const RATE_WINDOW_S: u64 = 5;
/// Requests [`Activity::recent`] keeps.
pub const RECENT_REQUESTS: usize = 30;

/// Events per second over the last [`RATE_WINDOW_S`] whole seconds (the current second is still
/// counting and left out).
pub struct Rate {
    base: Instant,
    /// `(second since base, events in it)`, one bucket per second modulo the window (+1 for the
    /// current second).
    buckets: Mutex<[(u64, u64); RATE_WINDOW_S as usize + 1]>,
}

impl Default for Rate {
    fn default() -> Self {
        Rate {
            base: Instant::now(),
            buckets: Mutex::new([(u64::MAX, 0); RATE_WINDOW_S as usize + 1]),
        }
    }
}

impl Rate {
    fn second(&self) -> u64 {
        self.base.elapsed().as_secs()
    }

    /// Counts `n` events now.
    pub fn add(&self, n: u64) {
        let now = self.second();
        if let Ok(mut b) = self.buckets.lock() {
            let len = b.len() as u64;
            let slot = &mut b[(now % len) as usize];
            if slot.0 != now {
                *slot = (now, 0);
            }
            slot.1 = slot.1.saturating_add(n);
        }
    }

    /// Events per second over the last whole seconds.
    pub fn per_second(&self) -> f64 {
        let now = self.second();
        let Ok(b) = self.buckets.lock() else {
            return 0.0;
        };
        let sum: u64 = b
            .iter()
            .filter(|(s, _)| *s < now && now - *s <= RATE_WINDOW_S)
            .map(|(_, n)| n)
            .sum();
        sum as f64 / RATE_WINDOW_S as f64
    }
}

/// Hand-offs from one prefill node to one decode node.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LinkTally {
    /// Requests whose cache went this way.
    pub handoffs: u64,
    /// Tokens of cache shipped (prompt tokens of those requests).
    pub kv_tokens: u64,
    /// Bytes those caches took on the wire, as the decode node received them.
    pub kv_bytes: u64,
}

/// How a request ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    /// It ran to its end (a stop, a length limit or a tool call).
    Done,
    /// It failed with an error the client was given.
    Failed,
    /// The client left before the end.
    Cancelled,
}

/// One request, once over.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RequestRecord {
    /// Its request id (as in the logs and the response's `id`).
    pub id: String,
    /// When it ended, milliseconds since the Unix epoch.
    pub ended_unix_ms: u64,
    /// The node that ran its prompt last (after a move, the new one).
    pub prefill: String,
    /// The node that generated last.
    pub decode: String,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens generated.
    pub completion_tokens: u32,
    /// Time to the first token, milliseconds.
    pub ttft_ms: f64,
    /// Tokens per second after the first.
    pub decode_tok_s: f64,
    /// Times it moved to other nodes after one failed.
    pub migrations: u32,
    /// How it ended.
    pub outcome: Outcome,
}

/// The cluster's recent activity.
#[derive(Default)]
pub struct Activity {
    recent: Mutex<VecDeque<RequestRecord>>,
    links: Mutex<BTreeMap<(NodeId, NodeId), LinkTally>>,
}

impl Activity {
    /// Counts a hand-off of `kv_tokens` tokens of cache from `prefill` to `decode`.
    pub fn handoff(&self, prefill: NodeId, decode: NodeId, kv_tokens: u64) {
        if let Ok(mut links) = self.links.lock() {
            let t = links.entry((prefill, decode)).or_default();
            t.handoffs += 1;
            t.kv_tokens = t.kv_tokens.saturating_add(kv_tokens);
        }
    }

    /// Counts `bytes` on the wire for a hand-off from `prefill` to `decode` (reported by the decode
    /// node once the cache was imported).
    pub fn shipped_bytes(&self, prefill: NodeId, decode: NodeId, bytes: u64) {
        if let Ok(mut links) = self.links.lock() {
            let t = links.entry((prefill, decode)).or_default();
            t.kv_bytes = t.kv_bytes.saturating_add(bytes);
        }
    }

    /// Every pair that has seen a hand-off.
    pub fn links(&self) -> Vec<((NodeId, NodeId), LinkTally)> {
        self.links
            .lock()
            .map(|l| l.iter().map(|(k, v)| (*k, *v)).collect())
            .unwrap_or_default()
    }

    /// Keeps `record`, dropping the oldest past [`RECENT_REQUESTS`].
    pub fn finished(&self, record: RequestRecord) {
        if let Ok(mut r) = self.recent.lock() {
            if r.len() == RECENT_REQUESTS {
                r.pop_front();
            }
            r.push_back(record);
        }
    }

    /// The last requests, newest first.
    pub fn recent(&self) -> Vec<RequestRecord> {
        self.recent
            .lock()
            .map(|r| r.iter().rev().cloned().collect())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rate_counts_whole_seconds_only() {
        let r = Rate::default();
        r.add(50);
        // Still the current second: not counted yet.
        assert_eq!(r.per_second(), 0.0);
        let r = Rate {
            base: Instant::now() - std::time::Duration::from_secs(3),
            ..Rate::default()
        };
        if let Ok(mut b) = r.buckets.lock() {
            b[1] = (1, 10);
            b[2] = (2, 15);
        }
        assert_eq!(r.per_second(), 25.0 / RATE_WINDOW_S as f64);
    }

    #[test]
    fn recent_keeps_the_newest_first_and_a_bounded_number() {
        let a = Activity::default();
        for i in 0..RECENT_REQUESTS + 5 {
            a.finished(RequestRecord {
                id: i.to_string(),
                ended_unix_ms: 0,
                prefill: "p".into(),
                decode: "d".into(),
                prompt_tokens: 1,
                completion_tokens: 1,
                ttft_ms: 1.0,
                decode_tok_s: 0.0,
                migrations: 0,
                outcome: Outcome::Done,
            });
        }
        let r = a.recent();
        assert_eq!(r.len(), RECENT_REQUESTS);
        assert_eq!(r[0].id, (RECENT_REQUESTS + 4).to_string());
        a.handoff(0, 1, 100);
        a.handoff(0, 1, 20);
        a.shipped_bytes(0, 1, 4096);
        assert_eq!(
            a.links(),
            vec![(
                (0, 1),
                LinkTally {
                    handoffs: 2,
                    kv_tokens: 120,
                    kv_bytes: 4096,
                }
            )]
        );
    }
}
