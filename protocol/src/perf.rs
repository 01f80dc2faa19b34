//! How fast a node runs the model: the `[nodes.perf]` table of a cluster profile.
//!
//! A node measures it (`exo-router profile`), the router's cost model reads it. Both sides need the
//! type, so it lives here beside the other node facts; the arithmetic on it (prefill time for a
//! prompt, the step time of a batch) is here too, so every user interpolates the points alike.

use exo_kvcache::Codec;
use serde::{Deserialize, Serialize};

/// Measured speed of one codec on a node.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CodecPerf {
    /// Raw bytes / wire bytes.
    pub ratio: f64,
    /// Compression speed, GB of raw KV per second.
    pub encode_gb_s: f64,
    /// Decompression speed, GB of raw KV per second.
    pub decode_gb_s: f64,
}

/// How fast a node runs the model: the `[nodes.perf]` table of a profile.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodePerf {
    /// Where the numbers come from (a measurement, or the published figures they derive from).
    pub source: String,
    /// Prefill speed, `[prompt tokens, tokens/s]` points; interpolated linearly in between.
    pub prefill_tok_s: Vec<(u32, f64)>,
    /// Time of one decode step, `[sequences in the batch, milliseconds]` points, at short context.
    pub decode_step_ms: Vec<(u32, f64)>,
    /// Extra step time per sequence for each 1,000 tokens of its context, in milliseconds.
    #[serde(default)]
    pub decode_ms_per_1k_ctx: f64,
    /// KV export (state copy out of llama.cpp), GB/s.
    pub kv_export_gb_s: f64,
    /// KV import, GB/s.
    pub kv_import_gb_s: f64,
    /// Compression codecs measured on this node; `none` is always available.
    #[serde(default)]
    pub codecs: std::collections::BTreeMap<String, CodecPerf>,
    /// KV cache bytes per token of the model in the node's layout, when measured with the table
    /// (the cost model uses it where the profile's `policy.kv_bytes_per_token` is not given).
    #[serde(default)]
    pub kv_bytes_per_token: Option<f64>,
    /// Tokens per prefill batch the node's engine settled on while it was measured (it sizes its
    /// batches from their timings: 64 on a small CPU, `n_batch` on a GPU). A streamed hand-off's
    /// pieces leave at the end of the first batch past each piece boundary, so the cost model cuts
    /// them there; absent (older tables, derived ones), it cuts at exact boundaries.
    // No `skip_serializing_if`: the table also travels in bincode (a node's `hello`), which
    // reads fields by position and cannot tell a skipped one.
    #[serde(default)]
    pub prefill_batch_tokens: Option<u32>,
}

/// Why a node's perf table cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct PerfError(
    /// What is wrong, naming the field.
    pub String,
);

/// Checks that `v` is a finite number above zero; `name` names the field in the error.
pub fn positive(name: &str, v: f64) -> Result<(), PerfError> {
    if v.is_finite() && v > 0.0 {
        Ok(())
    } else {
        Err(PerfError(format!("{name} must be a positive number")))
    }
}

/// Linear interpolation over `(x, y)` points sorted by x; flat beyond the ends.
fn interpolate(points: &[(u32, f64)], x: f64) -> f64 {
    let (Some(first), Some(last)) = (points.first(), points.last()) else {
        return 0.0;
    };
    if x <= f64::from(first.0) {
        return first.1;
    }
    if x >= f64::from(last.0) {
        return last.1;
    }
    for w in points.windows(2) {
        let (x0, y0) = (f64::from(w[0].0), w[0].1);
        let (x1, y1) = (f64::from(w[1].0), w[1].1);
        if x <= x1 {
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0);
        }
    }
    last.1
}

impl NodePerf {
    /// Checks that every number can be used (positive, finite, points sorted and distinct).
    pub fn validate(&self) -> Result<(), PerfError> {
        for (name, points) in [
            ("prefill_tok_s", &self.prefill_tok_s),
            ("decode_step_ms", &self.decode_step_ms),
        ] {
            if points.is_empty() {
                return Err(PerfError(format!("{name} needs at least one point")));
            }
            for w in points.windows(2) {
                if w[0].0 >= w[1].0 {
                    return Err(PerfError(format!(
                        "{name} points must be sorted by their first number, without repeats"
                    )));
                }
            }
            for &(x, y) in points.iter() {
                if x == 0 {
                    return Err(PerfError(format!("{name}: the first number must be >= 1")));
                }
                positive(name, y)?;
            }
        }
        if !(self.decode_ms_per_1k_ctx.is_finite() && self.decode_ms_per_1k_ctx >= 0.0) {
            return Err(PerfError(
                "decode_ms_per_1k_ctx must be zero or positive".into(),
            ));
        }
        if self.prefill_batch_tokens == Some(0) {
            return Err(PerfError("prefill_batch_tokens must be >= 1".into()));
        }
        positive("kv_export_gb_s", self.kv_export_gb_s)?;
        positive("kv_import_gb_s", self.kv_import_gb_s)?;
        for (name, c) in &self.codecs {
            let codec: Codec = name
                .parse()
                .map_err(|e| PerfError(format!("codecs: {e}")))?;
            if codec == Codec::None {
                return Err(PerfError("codecs: `none` needs no entry".into()));
            }
            positive(&format!("codecs.{name}.ratio"), c.ratio)?;
            positive(&format!("codecs.{name}.encode_gb_s"), c.encode_gb_s)?;
            positive(&format!("codecs.{name}.decode_gb_s"), c.decode_gb_s)?;
        }
        Ok(())
    }

    /// Tokens per prefill batch where measured ([`NodePerf::prefill_batch_tokens`]), else 1 (a
    /// streamed hand-off's pieces then cut at exact boundaries).
    pub fn batch_tokens(&self) -> u64 {
        self.prefill_batch_tokens.map_or(1, u64::from)
    }

    /// Seconds to prefill a prompt of `tokens` tokens on an idle node: never less than one
    /// decode step, since any forward pass reads all the weights once.
    pub fn prefill_s(&self, tokens: u64) -> f64 {
        if tokens == 0 {
            return 0.0;
        }
        let t = tokens as f64;
        (t / interpolate(&self.prefill_tok_s, t)).max(self.step_s(1, 0.0))
    }

    /// Seconds of one decode step for `batch` sequences whose context averages `mean_ctx` tokens.
    /// Beyond the last measured batch size the time grows along the last two points' slope.
    pub fn step_s(&self, batch: u32, mean_ctx: f64) -> f64 {
        if batch == 0 {
            return 0.0;
        }
        let b = f64::from(batch);
        let base = match self.decode_step_ms.as_slice() {
            [.., (x0, y0), (x1, y1)] if b > f64::from(*x1) => {
                let slope = ((y1 - y0) / f64::from(x1 - x0)).max(0.0);
                y1 + slope * (b - f64::from(*x1))
            }
            [(x1, y1)] if b > f64::from(*x1) => y1 * b / f64::from(*x1),
            points => interpolate(points, b),
        };
        (base + b * self.decode_ms_per_1k_ctx * mean_ctx / 1000.0) / 1000.0
    }

    /// The speed of `codec` here, `None` when not measured (`none` always has infinite speed).
    pub fn codec(&self, codec: Codec) -> Option<CodecPerf> {
        if codec == Codec::None {
            return Some(CodecPerf {
                ratio: 1.0,
                encode_gb_s: f64::INFINITY,
                decode_gb_s: f64::INFINITY,
            });
        }
        self.codecs.get(codec.name()).copied()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use std::pin::Pin;

    use tokio_serde::formats::Bincode;
    use tokio_serde::{Deserializer, Serializer};

    use super::NodePerf;

    fn table(batch: Option<u32>) -> NodePerf {
        NodePerf {
            source: "test".into(),
            prefill_tok_s: vec![(16, 200.0)],
            decode_step_ms: vec![(1, 8.0)],
            decode_ms_per_1k_ctx: 1.0,
            kv_export_gb_s: 2.0,
            kv_import_gb_s: 8.0,
            codecs: Default::default(),
            kv_bytes_per_token: None,
            prefill_batch_tokens: batch,
        }
    }

    #[test]
    fn a_table_crosses_the_wire_with_and_without_optional_fields() {
        let mut codec: Bincode<NodePerf, NodePerf> = Bincode::default();
        for perf in [table(None), table(Some(64))] {
            let bytes = Pin::new(&mut codec).serialize(&perf).unwrap();
            let back = Pin::new(&mut codec)
                .deserialize(&bytes::BytesMut::from(&bytes[..]))
                .unwrap();
            assert_eq!(back, perf);
        }
    }
}
