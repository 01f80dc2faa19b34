//! Measuring the link to a decode node (`probe_link`): the shortest of a few empty round trips for
//! the latency, then bytes sent in [`PROBE_CHUNK`] calls, a few in flight, for the bandwidth. Over
//! the same cached connection the KV cache travels on, so it measures what a hand-off gets
//! (TLS included).

use std::time::{Duration, Instant};

use exo_protocol::{LinkProbe, MAX_PROBE_BYTES, NodeError, context_with_deadline};
use futures::{StreamExt, TryStreamExt};

use crate::PrefillNode;

/// Bytes per probe call.
const PROBE_CHUNK: usize = 1 << 20;
/// Probe calls in flight.
const IN_FLIGHT: usize = 4;
/// Empty round trips; the shortest counts.
const ROUND_TRIPS: usize = 5;
/// Deadline of each probe call.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);

impl PrefillNode {
    /// Measures the link to the node at `to` with `bytes` bytes (at most [`MAX_PROBE_BYTES`]).
    pub async fn probe_link(&self, to: &str, bytes: u32) -> Result<LinkProbe, NodeError> {
        let client = self.client(to).await?;
        let failed =
            |e: tarpc::client::RpcError| NodeError::Transfer(format!("link probe to {to}: {e}"));
        let mut rtt = Duration::MAX;
        for _ in 0..ROUND_TRIPS {
            let start = Instant::now();
            let empty = exo_protocol::ByteBuf::new();
            client
                .probe_sink(context_with_deadline(CALL_TIMEOUT), empty)
                .await
                .map_err(failed)?;
            rtt = rtt.min(start.elapsed());
        }
        let total = bytes.min(MAX_PROBE_BYTES) as usize;
        let chunk = exo_protocol::ByteBuf::from(vec![0x5a; PROBE_CHUNK.min(total.max(1))]);
        let calls = total.div_ceil(chunk.len()).max(1);
        let start = Instant::now();
        let received: u64 = futures::stream::iter(0..calls)
            .map(|_| client.probe_sink(context_with_deadline(CALL_TIMEOUT), chunk.clone()))
            .buffer_unordered(IN_FLIGHT)
            .map_err(failed)
            .try_fold(0u64, |sum, n| async move { Ok(sum + n) })
            .await?;
        let secs = start.elapsed().as_secs_f64().max(1e-6);
        Ok(LinkProbe {
            bandwidth_gbit_s: received as f64 * 8.0 / secs / 1e9,
            latency_ms: rtt.as_secs_f64() * 1e3 / 2.0,
            bytes: received,
        })
    }
}
