//! Measures how fast this machine runs the model (`exo-router profile`): prefill at several prompt
//! lengths, decode steps at several batch sizes and context lengths, KV export and import, and each
//! codec's speed and ratio on the real cache. The result is a [`NodePerf`] for the cost model.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exo_engine::{ContextConfig, ContextHandle, EngineError, ExportedKv, GenEvent, Model};
use exo_kvcache::{
    Codec, DecodeLimits, DecodedKv, ImportTarget, KvDecoder, KvEncoder, KvError, KvLayout,
};
use exo_protocol::{CodecPerf, NodePerf, SamplingParams};

/// Why a measurement failed.
#[derive(Debug, thiserror::Error)]
pub enum MeasureError {
    /// The engine failed.
    #[error("engine: {0}")]
    Engine(#[from] EngineError),
    /// Encoding or decoding the cache failed.
    #[error("KV codec: {0}")]
    Kv(#[from] KvError),
    /// A measurement could not produce a usable number.
    #[error("{0}")]
    Unusable(String),
}

/// How much to measure.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeasurePlan {
    /// Prompt lengths whose prefill speed is measured.
    pub prefill_lengths: Vec<u32>,
    /// Batch sizes whose decode step is measured.
    pub batches: Vec<u32>,
    /// Tokens generated per sequence in each decode measurement.
    pub decode_tokens: u32,
    /// Context length of the long-context decode measurement (0: skip it).
    pub long_context: u32,
}

impl MeasurePlan {
    /// The full plan (a few minutes on a 2-core CPU with SmolLM2-135M).
    pub fn full() -> Self {
        MeasurePlan {
            prefill_lengths: vec![16, 128, 512, 2048],
            batches: vec![1, 2, 4, 8],
            decode_tokens: 48,
            long_context: 2048,
        }
    }

    /// A short plan for tests and a first look (well under a minute).
    pub fn quick() -> Self {
        MeasurePlan {
            prefill_lengths: vec![16, 256],
            batches: vec![1, 2],
            decode_tokens: 12,
            long_context: 512,
        }
    }
}

impl MeasurePlan {
    /// The plan `exo-router profile` runs for a node of `slots` slots: quick or full, decode
    /// batches up to the slot count (the full plan always includes the slot count itself).
    pub fn for_slots(quick: bool, slots: u32) -> Self {
        let mut plan = if quick {
            MeasurePlan::quick()
        } else {
            MeasurePlan::full()
        };
        plan.batches.retain(|&b| b <= slots);
        if !plan.batches.contains(&slots) && !quick {
            plan.batches.push(slots);
        }
        plan
    }
}

/// What was measured.
#[derive(Debug, Clone, PartialEq)]
pub struct Measured {
    /// The node's speed table.
    pub perf: NodePerf,
    /// KV cache bytes per token in the measured layout.
    pub kv_bytes_per_token: f64,
}

fn gb_s(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e9 / d.as_secs_f64().max(1e-9)
}

/// Sampling as chat clients use it (OpenAI's default temperature samples the whole vocabulary,
/// which costs more per token than greedy argmax), seeded for repeatable runs.
fn sampling(seed: u64, tokens: u32) -> SamplingParams {
    SamplingParams {
        temperature: 0.7,
        seed,
        max_tokens: tokens,
        ..SamplingParams::default()
    }
}

/// Runs `batch` sequences with `ctx`-token prompts and returns milliseconds per decode step.
async fn decode_step_ms(
    ctx: &ContextHandle,
    model: &Model,
    batch: u32,
    context: u32,
    tokens: u32,
) -> Result<f64, MeasureError> {
    let mut firsts = Vec::new();
    for seq in 0..batch as i32 {
        // A different prompt per sequence, all of the same length.
        let mut p = model.filler_tokens(context as usize + seq as usize, 0);
        p.drain(1..1 + seq as usize);
        let out = ctx.prefill(seq, p, SamplingParams::greedy(tokens)).await?;
        firsts.push(out.first_token);
    }
    let started = Instant::now();
    let runs = firsts.iter().enumerate().map(|(seq, &first)| async move {
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let run = ctx.generate_stream(seq as i32, first, 1, sampling(seq as u64, tokens), tx);
        let count = async {
            let mut n = 0u32;
            while let Some(ev) = rx.recv().await {
                if matches!(ev, GenEvent::Token { .. }) {
                    n += 1;
                }
            }
            n
        };
        let (res, n) = tokio::join!(run, count);
        res.map(|()| n)
    });
    let counts = futures::future::try_join_all(runs).await?;
    let elapsed = started.elapsed();
    for seq in 0..batch as i32 {
        ctx.clear(seq).await?;
    }
    // Every step decodes one token for each sequence still going; the longest one saw every step.
    let steps = counts.iter().copied().max().unwrap_or(0);
    if steps < 2 {
        return Err(MeasureError::Unusable(format!(
            "decode at batch {batch} produced only {steps} tokens"
        )));
    }
    Ok(elapsed.as_secs_f64() * 1e3 / f64::from(steps))
}

/// One measurement run: the context it runs on and where progress lines go.
struct Run<'a, P: FnMut(&str)> {
    ctx: ContextHandle,
    model: &'a Model,
    layout: KvLayout,
    /// Longest prompt that leaves room for the generated tokens.
    room: u32,
    /// Run each prompt length and batch size once untimed first: on a GPU the first use of a
    /// shape pays one-off costs (cuBLAS set-up, kernel loading, graph capture) that the first
    /// H200 run measured as a 128-token prompt taking 128 ms where 512 tokens took 21 ms. On the
    /// CPU the one warm-up prompt is enough, and repeating every length would double a slow run.
    warm_each: bool,
    progress: P,
}

/// The KV cache's round trip: export, every codec both ways, import.
struct KvSpeeds {
    bytes_per_token: f64,
    export_gb_s: f64,
    import_gb_s: f64,
    codecs: std::collections::BTreeMap<String, CodecPerf>,
}

impl<P: FnMut(&str)> Run<'_, P> {
    /// Prefill speed at each of `lengths` that fits; the cache of the longest stays in sequence 0.
    async fn prefill_speeds(
        &mut self,
        lengths: &[u32],
    ) -> Result<(Vec<(u32, f64)>, u32), MeasureError> {
        // Warm-up: the first pass pays for allocations.
        self.ctx
            .prefill(
                0,
                self.model.filler_tokens(16, 0),
                SamplingParams::greedy(1),
            )
            .await?;
        let mut speeds: Vec<(u32, f64)> = Vec::new();
        for &n in lengths {
            let n = n.min(self.room);
            if n == 0 || speeds.iter().any(|&(m, _)| m == n) {
                continue;
            }
            let tokens = self.model.filler_tokens(n as usize, 0);
            if self.warm_each {
                let greedy = SamplingParams::greedy(1);
                self.ctx.prefill(0, tokens.clone(), greedy).await?;
            }
            let started = Instant::now();
            self.ctx
                .prefill(0, tokens, SamplingParams::greedy(1))
                .await?;
            let took = started.elapsed();
            let speed = f64::from(n) / took.as_secs_f64().max(1e-9);
            (self.progress)(&format!(
                "prefill {n:>5} tokens: {:>8.1} ms, {speed:>8.1} tok/s",
                took.as_secs_f64() * 1e3
            ));
            speeds.push((n, speed));
        }
        let longest = speeds.last().map(|&(n, _)| n);
        let longest =
            longest.ok_or_else(|| MeasureError::Unusable("no prefill length fits".into()))?;
        Ok((speeds, longest))
    }

    /// Exports the `tokens`-token cache in sequence 0, runs it through every codec, imports it
    /// into sequence 1, then frees both.
    async fn kv_speeds(&mut self, tokens: u32) -> Result<KvSpeeds, MeasureError> {
        let started = Instant::now();
        let kv = self.ctx.export(0).await?;
        let export = started.elapsed();
        let bytes = kv.state.len();
        let bytes_per_token = bytes as f64 / f64::from(tokens);
        (self.progress)(&format!(
            "KV export: {:.1} MB ({bytes_per_token:.0} B/token) in {:.1} ms",
            bytes as f64 / 1e6,
            export.as_secs_f64() * 1e3
        ));
        let mut codecs = std::collections::BTreeMap::new();
        let mut decoded = None;
        for codec in Codec::ALL {
            let (perf, out) = self.codec_speed(&kv, codec)?;
            if codec != Codec::None {
                codecs.insert(codec.name().to_string(), perf);
            }
            decoded = Some(out);
        }
        let decoded = decoded.ok_or_else(|| MeasureError::Unusable("no codec ran".into()))?;
        let started = Instant::now();
        self.ctx.import(1, decoded).await?;
        let import = started.elapsed();
        (self.progress)(&format!("KV import: {:.1} ms", import.as_secs_f64() * 1e3));
        self.ctx.clear(0).await?;
        self.ctx.clear(1).await?;
        Ok(KvSpeeds {
            bytes_per_token,
            export_gb_s: gb_s(bytes, export),
            import_gb_s: gb_s(bytes, import),
            codecs,
        })
    }

    /// Encodes and decodes the exported cache with `codec`: its ratio and speeds, and the decoded
    /// cache.
    fn codec_speed(
        &mut self,
        kv: &ExportedKv,
        codec: Codec,
    ) -> Result<(CodecPerf, DecodedKv), MeasureError> {
        let fingerprint = self.model.fingerprint();
        let bytes = kv.state.len();
        let started = Instant::now();
        let spec = self.ctx.transfer_header(
            0, // the sequence `kv_speeds` exported
            kv.tokens.clone(),
            codec,
            exo_kvcache::DEFAULT_CHUNK_SIZE,
        );
        let (header, frames, end) = KvEncoder::whole(spec, &kv.state)?;
        let enc_t = started.elapsed();
        let wire = header.len() + frames.iter().map(Vec::len).sum::<usize>() + end.len();
        let started = Instant::now();
        let target = ImportTarget {
            fingerprint,
            layout: self.layout,
        };
        let mut d = KvDecoder::new(&header, &DecodeLimits::default(), &target)?;
        for f in &frames {
            d.push_chunk(f)?;
        }
        let out = d.finish(&end)?;
        let dec_t = started.elapsed();
        let perf = CodecPerf {
            ratio: bytes as f64 / wire as f64,
            encode_gb_s: gb_s(bytes, enc_t),
            decode_gb_s: gb_s(bytes, dec_t),
        };
        (self.progress)(&format!(
            "codec {:<11}: ratio {:.3}, encode {:.2} GB/s, decode {:.2} GB/s",
            codec.name(),
            perf.ratio,
            perf.encode_gb_s,
            perf.decode_gb_s
        ));
        Ok((perf, out))
    }

    /// Decode step time at each batch size of `batches` that fits the slots, at a short context.
    async fn decode_steps(
        &mut self,
        batches: &[u32],
        short_ctx: u32,
        tokens: u32,
    ) -> Result<Vec<(u32, f64)>, MeasureError> {
        let mut steps: Vec<(u32, f64)> = Vec::new();
        for &b in batches {
            if b == 0 || b > self.layout.n_seq_max || steps.iter().any(|&(x, _)| x == b) {
                continue;
            }
            if self.warm_each {
                decode_step_ms(&self.ctx, self.model, b, short_ctx, tokens).await?;
            }
            let ms = decode_step_ms(&self.ctx, self.model, b, short_ctx, tokens).await?;
            (self.progress)(&format!(
                "decode batch {b:>2} at context {short_ctx}: {ms:>7.2} ms/step, {:>7.1} tok/s",
                f64::from(b) * 1e3 / ms
            ));
            steps.push((b, ms));
        }
        if steps.is_empty() {
            return Err(MeasureError::Unusable(
                "no batch size fits the slots".into(),
            ));
        }
        Ok(steps)
    }

    /// Extra step time per 1,000 tokens of context, from one sequence at `long_ctx` against the
    /// short-context steps (0 when `long_ctx` is not longer).
    async fn context_cost(
        &mut self,
        steps: &[(u32, f64)],
        short_ctx: u32,
        long_ctx: u32,
        tokens: u32,
    ) -> Result<f64, MeasureError> {
        let Some(&(b0, ms0)) = steps.first() else {
            return Ok(0.0);
        };
        if long_ctx <= short_ctx {
            return Ok(0.0);
        }
        let long = decode_step_ms(&self.ctx, self.model, 1, long_ctx, tokens).await?;
        let base = steps
            .iter()
            .find(|&&(b, _)| b == 1)
            .map_or(ms0 / f64::from(b0), |&(_, ms)| ms);
        let per_1k = ((long - base) / (f64::from(long_ctx - short_ctx) / 1000.0)).max(0.0);
        (self.progress)(&format!(
            "decode batch  1 at context {long_ctx}: {long:>7.2} ms/step ({per_1k:.3} ms per 1k context)"
        ));
        Ok(per_1k)
    }
}

/// Measures the model on this machine with a context made as `config` says (its layout's
/// `n_seq_max` must cover the largest batch; its thread budget is the one the node will serve with).
/// `progress` receives one line per step.
pub async fn measure(
    model: Arc<Model>,
    config: ContextConfig,
    plan: &MeasurePlan,
    progress: impl FnMut(&str),
) -> Result<Measured, MeasureError> {
    let layout = config.layout;
    // Every length is run twice on one sequence: reusing the first run's cache would time nothing.
    let config = ContextConfig {
        prefix_reuse: false,
        ..config
    };
    let mut run = Run {
        ctx: ContextHandle::spawn(Arc::clone(&model), config)?,
        model: &model,
        layout,
        room: layout.n_ctx_seq.saturating_sub(plan.decode_tokens + 8),
        warm_each: model.offload().gpu_layers > 0,
        progress,
    };
    let (prefill_tok_s, longest) = run.prefill_speeds(&plan.prefill_lengths).await?;
    // The size the engine chose from the batches it just timed.
    let batch_tokens = u32::try_from(run.ctx.prefill_batch_tokens()).unwrap_or(u32::MAX);
    let kv = run.kv_speeds(longest).await?;
    let short_ctx = 64u32.min(run.room);
    let decode_step = run
        .decode_steps(&plan.batches, short_ctx, plan.decode_tokens)
        .await?;
    let long_ctx = plan.long_context.min(run.room);
    let per_1k = run
        .context_cost(&decode_step, short_ctx, long_ctx, plan.decode_tokens)
        .await?;
    let round_points =
        |v: Vec<(u32, f64)>| v.into_iter().map(|(x, y)| (x, significant(y))).collect();
    let codecs = kv
        .codecs
        .into_iter()
        .map(|(name, c)| {
            let c = CodecPerf {
                ratio: significant(c.ratio),
                encode_gb_s: significant(c.encode_gb_s),
                decode_gb_s: significant(c.decode_gb_s),
            };
            (name, c)
        })
        .collect();
    let perf = NodePerf {
        source: format!(
            "measured by exo-router profile {} on {}, model {}",
            env!("CARGO_PKG_VERSION"),
            today(),
            model.name()
        ),
        prefill_tok_s: round_points(prefill_tok_s),
        decode_step_ms: round_points(decode_step),
        decode_ms_per_1k_ctx: significant(per_1k),
        kv_export_gb_s: significant(kv.export_gb_s),
        kv_import_gb_s: significant(kv.import_gb_s),
        codecs,
        kv_bytes_per_token: Some(kv.bytes_per_token.round()),
        prefill_batch_tokens: Some(batch_tokens),
    };
    perf.validate()
        .map_err(|e| MeasureError::Unusable(format!("measured table: {e}")))?;
    Ok(Measured {
        perf,
        kv_bytes_per_token: kv.bytes_per_token,
    })
}

/// `v` rounded to four significant digits: measurements are not more precise than that, and the
/// written profile stays readable.
fn significant(v: f64) -> f64 {
    if v == 0.0 || !v.is_finite() {
        return v;
    }
    let scale = 10f64.powi(3 - v.abs().log10().floor() as i32);
    (v * scale).round() / scale
}

/// Today's date (UTC), `YYYY-MM-DD`.
pub fn today() -> String {
    let (y, m, d) = exo_engine::today_utc();
    format!("{y:04}-{m:02}-{d:02}")
}

#[cfg(test)]
mod tests {
    #[test]
    fn four_significant_digits() {
        assert!((super::significant(380.540_654) - 380.5).abs() < 1e-9);
        assert!((super::significant(0.468_844_279) - 0.4688).abs() < 1e-12);
        assert!((super::significant(23_052.4) - 23_050.0).abs() < 1e-9);
        assert!(super::significant(0.0).abs() < f64::EPSILON);
    }

    #[test]
    fn today_is_a_date() {
        let d = super::today();
        assert_eq!(d.len(), 10);
        assert!(d.starts_with("20"), "{d}");
    }
}
