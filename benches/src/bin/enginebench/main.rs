//! The engine's own batched throughput, measured the way llama.cpp's `llama-batched-bench` measures
//! llama.cpp: for each stream count B, B prompts of `npp` tokens are prefilled, then all B sequences
//! generate `ntg` tokens together in the engine's batch loop (one token per sequence per step, with
//! the engine's sampling, text and event delivery included). `benches/peer.sh` runs it side by side
//! with `llama-batched-bench` on the same model, threads and KV layout.
//!
//! With `--raw` the same loop runs on llama.cpp directly (`raw`), without the engine.
//!
//! `cargo run --release -p exo-benches --bin enginebench -- [--npp 128] [--ntg 128] [--npl 1,2,4,8,16] [--raw]`

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result, bail};
use clap::Parser;
use exo_engine::{ContextConfig, ContextHandle, Model, ModelOptions, PrefillBatching};
use exo_kvcache::{KvLayout, KvType};
use exo_protocol::SamplingParams;

mod raw;

#[derive(Parser, Clone)]
#[command(about = "Batched prefill and decode throughput of the exo-router engine")]
struct Args {
    /// GGUF model.
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Prompt tokens per sequence.
    #[arg(long, default_value_t = 128)]
    npp: usize,
    /// Tokens generated per sequence.
    #[arg(long, default_value_t = 128)]
    ntg: u32,
    /// Stream counts to measure, comma separated; the context gets as many slots as the largest.
    #[arg(long, value_delimiter = ',', default_value = "1,2,4,8,16")]
    npl: Vec<u32>,
    /// Context per sequence (llama-batched-bench's `-c` is this times the largest stream count).
    #[arg(long, default_value_t = 2048)]
    ctx_seq: u32,
    /// CPU threads (0: all cores).
    #[arg(long, default_value_t = 0)]
    threads: u32,
    /// Tokens per llama.cpp batch in prefill.
    #[arg(long, default_value_t = 512)]
    batch: u32,
    /// Flash attention.
    #[arg(long)]
    flash_attn: bool,
    /// One KV stream shared by all sequences (default: one per slot, as nodes run).
    #[arg(long)]
    kv_unified: bool,
    /// Sampling temperature (0: greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Print one JSON object per stream count instead of a table.
    #[arg(long)]
    jsonl: bool,
    /// Whether the engine lets prompts share prefill batches.
    #[arg(long, value_enum, default_value_t = Sharing::Auto)]
    prefill_batching: Sharing,
    /// Drive llama.cpp directly through llama-cpp-2 instead of the engine.
    #[arg(long)]
    raw: bool,
    /// Also create a second, idle context with this many threads in the same process, as
    /// `profiles/local.toml` has (its prefill node beside the decode node); 0: none.
    #[arg(long, default_value_t = 0)]
    companion_threads: u32,
}

/// `--prefill-batching`: the engine's [`PrefillBatching`].
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum Sharing {
    /// Learned from the batches timed.
    Auto,
    /// As many prompts per batch as fit.
    Always,
    /// One prompt per batch.
    Never,
}

impl From<Sharing> for PrefillBatching {
    fn from(s: Sharing) -> Self {
        match s {
            Sharing::Auto => PrefillBatching::Adaptive,
            Sharing::Always => PrefillBatching::Always,
            Sharing::Never => PrefillBatching::Never,
        }
    }
}

/// One stream count's result.
struct Row {
    /// Sequences decoded together.
    streams: u32,
    /// Seconds to prefill every prompt (the last one's first token).
    prefill_s: f64,
    /// Mean seconds from the start to a prompt's first token.
    first_token_mean_s: f64,
    /// Seconds from the first decode step to the last sequence's end.
    generate_s: f64,
    /// Tokens decoded in that time.
    generated: u64,
}

async fn run_streams(ctx: &ContextHandle, model: &Model, args: &Args, b: u32) -> Result<Row> {
    let sampling = |seed: u64| SamplingParams {
        temperature: args.temperature,
        seed,
        // Token 0 comes from the prefill; `ntg` more are decoded in the batch loop.
        max_tokens: args.ntg + 1,
        ..SamplingParams::default()
    };
    let prompts: Vec<Vec<i32>> = (0..b as usize)
        .map(|v| model.filler_tokens(args.npp, v))
        .collect();
    let started = Instant::now();
    let prefills = prompts.into_iter().enumerate().map(|(seq, p)| async move {
        let out = ctx.prefill(seq as i32, p, sampling(seq as u64)).await;
        out.map(|o| (o, started.elapsed().as_secs_f64()))
    });
    let (firsts, times): (Vec<_>, Vec<f64>) = futures::future::try_join_all(prefills)
        .await?
        .into_iter()
        .unzip();
    let prefill_s = started.elapsed().as_secs_f64();
    let first_token_mean_s = times.iter().sum::<f64>() / times.len().max(1) as f64;
    let started = Instant::now();
    let runs = firsts
        .iter()
        .enumerate()
        .map(|(seq, out)| ctx.generate(seq as i32, out.first_token, 0, sampling(seq as u64)));
    let outputs = futures::future::try_join_all(runs).await?;
    let generate_s = started.elapsed().as_secs_f64();
    for seq in 0..b as i32 {
        ctx.clear(seq).await?;
    }
    Ok(Row {
        streams: b,
        prefill_s,
        first_token_mean_s,
        generate_s,
        // Each output starts with the prefill's token; the rest were decoded in the batch loop.
        generated: outputs
            .iter()
            .map(|g| g.tokens.len().saturating_sub(1) as u64)
            .sum(),
    })
}

/// Runs every stream count of `args` on the engine and returns one row each.
async fn engine_rows(args: &Args, slots: u32) -> Result<Vec<Row>> {
    let model = Model::load(&args.model, &ModelOptions::default())?;
    let config = ContextConfig {
        layout: KvLayout {
            type_k: KvType::F16,
            type_v: KvType::F16,
            flash_attn: args.flash_attn,
            kv_unified: args.kv_unified,
            n_seq_max: slots,
            n_ctx_seq: args.ctx_seq,
        },
        n_batch: args.batch,
        n_threads: args.threads,
        prefill_batching: args.prefill_batching.into(),
        // llama-batched-bench computes every prompt; so does the engine here.
        prefix_reuse: false,
    };
    let ctx = ContextHandle::spawn(model.clone(), config)?;
    // Held to the end: an idle context whose thread team exists beside the measured one.
    let _companion = (args.companion_threads > 0)
        .then(|| {
            let layout = KvLayout {
                n_seq_max: 1,
                ..config.layout
            };
            ContextHandle::spawn(
                model.clone(),
                ContextConfig {
                    layout,
                    n_threads: args.companion_threads,
                    ..config
                },
            )
        })
        .transpose()?;
    // Warm-up, as llama-batched-bench does: one short run before anything is timed. On a GPU the
    // first step at each batch size is slow (graphs and kernels are set up per shape), and streams
    // that end early (end of text) step through every smaller batch size: warm them all there.
    let warm = Args {
        npp: 8,
        ntg: 4,
        ..args.clone()
    };
    let sizes = if model.offload().gpu_layers > 0 {
        1..=slots
    } else {
        1..=1
    };
    for b in sizes {
        run_streams(&ctx, &model, &warm, b).await?;
    }
    let mut rows = Vec::new();
    for &b in &args.npl {
        rows.push(run_streams(&ctx, &model, args, b).await?);
    }
    Ok(rows)
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    let slots = args.npl.iter().copied().max().context("--npl is empty")?;
    if args.npp + args.ntg as usize + 2 > args.ctx_seq as usize {
        bail!("--ctx-seq {} is too small for --npp + --ntg", args.ctx_seq);
    }
    if args.raw && args.companion_threads > 0 {
        bail!("--companion-threads measures the engine; it does not apply to --raw");
    }
    let rows = if args.raw {
        raw::run(&args, slots)?
    } else {
        engine_rows(&args, slots).await?
    };
    if !args.jsonl {
        println!(
            "{}: threads {}, companion context threads {}, flash_attn {}, kv_unified {}, n_seq_max {slots}, n_ctx_seq {}, greedy {}, prefill batching {:?}",
            if args.raw {
                "llama.cpp via llama-cpp-2"
            } else {
                "engine"
            },
            args.threads,
            args.companion_threads,
            args.flash_attn,
            args.kv_unified,
            args.ctx_seq,
            args.temperature <= 0.0,
            args.prefill_batching
        );
        println!(
            "|  PP |  TG |  B | T_PP s | TTFT mean s | S_PP t/s | T_TG s | S_TG t/s | tokens |"
        );
        println!(
            "|-----|-----|----|--------|-------------|----------|--------|----------|--------|"
        );
    }
    for r in rows {
        let s_pp = (args.npp as f64 * f64::from(r.streams)) / r.prefill_s;
        let s_tg = r.generated as f64 / r.generate_s;
        if args.jsonl {
            println!(
                "{}",
                serde_json::json!({"pp": args.npp, "tg": args.ntg, "pl": r.streams,
                    "t_pp": r.prefill_s, "ttft_mean": r.first_token_mean_s, "speed_pp": s_pp, "t_tg": r.generate_s,
                    "speed_tg": s_tg, "generated": r.generated})
            );
        } else {
            println!(
                "| {:>3} | {:>3} | {:>2} | {:>6.3} | {:>11.3} | {:>8.2} | {:>6.3} | {:>8.2} | {:>6} |",
                args.npp,
                args.ntg,
                r.streams,
                r.prefill_s,
                r.first_token_mean_s,
                s_pp,
                r.generate_s,
                s_tg,
                r.generated
            );
        }
    }
    Ok(())
}
