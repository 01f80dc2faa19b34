//! Prometheus metrics: one recorder per process, histogram buckets, and the `/metrics` text.
//!
//! Series (all prefixed `exo_`): router `requests_total{endpoint,status}`,
//! `time_to_first_token_seconds`, `time_per_output_token_seconds`, `requests_in_flight`,
//! `queue_depth`, `node_in_flight{node}`, `placements_total{mode,prefill,decode}`, `prompt_tokens_total`,
//! `completion_tokens_total`; prefill nodes `prefill_tokens_total{node}`, `prefill_seconds{node}`,
//! `prefill_tokens_per_second{node}`, `kv_exported_bytes_total{node}`, `kv_wire_bytes_total{node}`,
//! `kv_compression_ratio{node}`, `kv_transfer_seconds{node}`; decode nodes
//! `decode_tokens_total{node}`, `decode_active_sequences{node}`; engines `decode_batch_size`,
//! `decode_step_seconds`.

use std::sync::OnceLock;
use std::time::Duration;

use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

const SECONDS_BUCKETS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5.0, 10.0, 30.0, 120.0,
];

/// Installs the process-wide recorder (once) and returns its handle; `None` if another recorder
/// was installed first.
pub fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("seconds".into()), &SECONDS_BUCKETS)
                .ok()?;
            match builder.install_recorder() {
                Ok(h) => {
                    let upkeep = h.clone();
                    if let Ok(rt) = tokio::runtime::Handle::try_current() {
                        rt.spawn(async move {
                            let mut tick = tokio::time::interval(Duration::from_secs(5));
                            loop {
                                tick.tick().await;
                                upkeep.run_upkeep();
                            }
                        });
                    }
                    Some(h)
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics recorder not installed");
                    None
                }
            }
        })
        .as_ref()
}

/// The Prometheus text exposition of every series.
pub fn render() -> String {
    handle().map(PrometheusHandle::render).unwrap_or_default()
}
