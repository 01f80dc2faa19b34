//! Admission: how many requests the cluster holds (429 beyond each model's decode slots and
//! queue), and the load gauges it publishes.

use std::sync::Arc;

use super::{Admission, Cluster, ServedModel};
use crate::api::error::ApiError;

impl Cluster {
    /// True when a one-token request for some served model could be placed right now.
    pub fn ready(&self) -> bool {
        let probe = crate::placement::RequestShape {
            prompt_tokens: 1,
            output_tokens: 1,
        };
        self.models().iter().any(|m| self.choose(m, probe).is_ok())
    }

    /// Requests admitted and not yet finished.
    pub fn in_flight(&self) -> usize {
        self.admitted
            .lock()
            .map_or(0, |by_model| by_model.values().sum())
    }

    /// Sequence slots of the healthy nodes that generate.
    pub fn decode_capacity(&self) -> usize {
        self.decode_capacity_of(None)
    }

    /// Sequence slots of the healthy nodes that generate `model` (every model: `None`).
    pub fn decode_capacity_of(&self, model: Option<&ServedModel>) -> usize {
        self.nodes()
            .iter()
            .filter(|n| n.healthy() && n.spec.role.decodes())
            .filter_map(|n| n.info())
            .filter(|i| model.is_none_or(|m| m.fingerprint == i.fingerprint))
            .map(|i| i.layout.n_seq_max as usize)
            .sum()
    }

    pub(super) fn publish_load(&self, admitted: usize) {
        metrics::gauge!("exo_requests_in_flight").set(admitted as f64);
        metrics::gauge!("exo_queue_depth")
            .set(admitted.saturating_sub(self.decode_capacity()) as f64);
    }

    /// Admits a request for `model` when one of its decode slots or a queue place for it is free
    /// (each model's queue holds up to the profile's `max_queued` beyond its slots); otherwise
    /// 429. Bounds what the cluster holds instead of letting queues and memory grow with the load.
    pub fn admit(self: &Arc<Self>, model: &ServedModel) -> Result<Admission, ApiError> {
        let capacity = self.decode_capacity_of(Some(model));
        let limit = (capacity + self.max_queued).max(1);
        let total = {
            let mut by_model = self
                .admitted
                .lock()
                .map_err(|_| ApiError::Internal("admission lock poisoned".into()))?;
            let held = by_model.entry(model.fingerprint).or_insert(0);
            if *held >= limit {
                return Err(ApiError::Overloaded {
                    message: format!(
                        "all {capacity} decode slots of {} are busy and {} requests are queued; retry shortly",
                        model.id,
                        held.saturating_sub(capacity)
                    ),
                    retry_after: 1,
                });
            }
            *held += 1;
            by_model.values().sum()
        };
        self.publish_load(total);
        Ok(Admission {
            cluster: Arc::clone(self),
            model: model.fingerprint,
        })
    }
}
