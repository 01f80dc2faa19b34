//! The same measurement with llama.cpp driven directly through `llama-cpp-2`, the way
//! `llama-batched-bench` drives it: random prompt tokens, one batch of every stream's next token per
//! step, logits requested and never read. Against the engine's numbers it separates the engine's own
//! cost (sampling, text, events, its loop) from llama.cpp's; against `llama-batched-bench` it shows
//! what the two llama.cpp versions and builds differ by.

use std::num::NonZeroU32;
use std::time::Instant;

use anyhow::{Context, Result};
use llama_cpp_2::context::params::LlamaContextParams;
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_2::llama_batch::LlamaBatch;
use llama_cpp_2::model::LlamaModel;
use llama_cpp_2::model::params::LlamaModelParams;
use llama_cpp_2::token::LlamaToken;

use super::{Args, Row};

/// xorshift64: llama-batched-bench also feeds random tokens.
struct Tokens(u64, i32);

impl Tokens {
    fn next(&mut self) -> LlamaToken {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        LlamaToken((self.0 % self.1 as u64) as i32)
    }
}

/// Runs every stream count of `args` and returns one row each.
pub(super) fn run(args: &Args, slots: u32) -> Result<Vec<Row>> {
    // As the engine does: llama.cpp's log goes to `tracing` (silent here) instead of stderr.
    llama_cpp_2::send_logs_to_tracing(llama_cpp_2::LogOptions::default());
    let backend = LlamaBackend::init()?;
    // Every layer on the GPU when the build has one, as the engine's default (`auto`) does.
    let offload = LlamaModelParams::default().with_n_gpu_layers(u32::MAX);
    let model = LlamaModel::load_from_file(&backend, &args.model, &offload)?;
    let threads = if args.threads == 0 {
        std::thread::available_parallelism().map_or(1, |n| n.get() as i32)
    } else {
        args.threads as i32
    };
    let fa = if args.flash_attn {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_ENABLED
    } else {
        llama_cpp_sys_2::LLAMA_FLASH_ATTN_TYPE_DISABLED
    };
    let params = LlamaContextParams::default()
        .with_n_ctx(NonZeroU32::new(args.ctx_seq * slots))
        .with_n_batch(args.batch)
        .with_n_ubatch(args.batch)
        .with_n_seq_max(slots)
        .with_kv_unified(args.kv_unified)
        .with_flash_attention_policy(fa)
        .with_n_threads(threads)
        .with_n_threads_batch(threads);
    let mut ctx = model.new_context(&backend, params)?;
    let mut tokens = Tokens(0x9e37_79b9_7f4a_7c15, model.n_vocab());
    let n_batch = args.batch as usize;
    let mut batch = LlamaBatch::new(n_batch.max(slots as usize), 1);
    let mut rows = Vec::new();
    // Warm-up: 16 tokens, as llama-batched-bench does.
    for i in 0..16 {
        batch.add(tokens.next(), i, &[0], false)?;
    }
    ctx.decode(&mut batch)?;
    for &b in &args.npl {
        ctx.clear_kv_cache();
        let started = Instant::now();
        // Prompts go in batches of `n_batch` tokens, several sequences per batch.
        let all: Vec<(i32, i32)> = (0..b as i32)
            .flat_map(|s| (0..args.npp as i32).map(move |p| (s, p)))
            .collect();
        // Seconds to each prompt's last token, summed.
        let mut first_token_sum_s = 0.0;
        for chunk in all.chunks(n_batch) {
            batch.clear();
            let mut finishing = 0u32;
            for &(s, p) in chunk {
                let last = p + 1 == args.npp as i32;
                finishing += u32::from(last);
                batch.add(tokens.next(), p, &[s], last)?;
            }
            ctx.decode(&mut batch).context("prompt batch")?;
            first_token_sum_s += f64::from(finishing) * started.elapsed().as_secs_f64();
        }
        let prefill_s = started.elapsed().as_secs_f64();
        let started = Instant::now();
        for i in 0..args.ntg as i32 {
            batch.clear();
            for s in 0..b as i32 {
                batch.add(tokens.next(), args.npp as i32 + i, &[s], true)?;
            }
            ctx.decode(&mut batch).context("decode step")?;
        }
        rows.push(Row {
            streams: b,
            prefill_s,
            first_token_mean_s: first_token_sum_s / f64::from(b.max(1)),
            generate_s: started.elapsed().as_secs_f64(),
            generated: u64::from(b) * u64::from(args.ntg),
        });
    }
    Ok(rows)
}
