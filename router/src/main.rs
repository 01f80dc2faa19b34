//! The `exo-router` command line.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use clap::{Parser, Subcommand};
use exo_decode_node::DecodeNode;
use exo_engine::{ChatMessage, ContextConfig, ContextHandle, Model, ModelOptions};
use exo_kvcache::{Codec, DEFAULT_CHUNK_SIZE, DecodeLimits, KvLayout};
use exo_prefill_node::PrefillNode;
use exo_protocol::SamplingParams;

#[derive(Parser)]
#[command(
    name = "exo-router",
    version,
    about = "Disaggregated LLM serving across mixed machines"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run one chat prompt through a prefill context, ship its KV cache to a decode context, and print
    /// the answer generated there, with timings.
    Demo(DemoArgs),
}

#[derive(clap::Args)]
struct DemoArgs {
    /// GGUF model.
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// The user's message.
    #[arg(
        long,
        default_value = "What is the capital of France? Answer in one sentence."
    )]
    prompt: String,
    /// KV codec: none, lz4 or shuffle-lz4.
    #[arg(long, default_value = "none")]
    codec: Codec,
    /// Tokens to generate at most.
    #[arg(long, default_value_t = 128)]
    max_tokens: u32,
    /// Sampling temperature (0 = greedy).
    #[arg(long, default_value_t = 0.0)]
    temperature: f32,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let rt = tokio::runtime::Runtime::new().context("starting the async runtime")?;
    match cli.command {
        Command::Demo(args) => rt.block_on(demo(args)),
    }
}

async fn demo(args: DemoArgs) -> Result<()> {
    let model = Model::load(&args.model, &ModelOptions::default()).with_context(|| {
        format!(
            "loading {} (scripts/fetch-model puts the default model in place)",
            args.model.display()
        )
    })?;
    let layout = KvLayout::default();
    let prefill_ctx = ContextHandle::spawn(
        model.clone(),
        ContextConfig {
            layout,
            ..ContextConfig::default()
        },
    )?;
    let decode_ctx = ContextHandle::spawn(
        model.clone(),
        ContextConfig {
            layout: KvLayout {
                n_seq_max: 4,
                ..layout
            },
            ..ContextConfig::default()
        },
    )?;
    let prefill = PrefillNode::new(prefill_ctx, args.codec, DEFAULT_CHUNK_SIZE);
    let decode = DecodeNode::new(decode_ctx, DecodeLimits::default());
    let sampling = SamplingParams {
        temperature: args.temperature,
        seed: args.seed,
        max_tokens: args.max_tokens,
        ..SamplingParams::default()
    };
    let prompt = model.chat_prompt(&[ChatMessage {
        role: "user".into(),
        content: args.prompt,
    }])?;
    let tokens = model.tokenize(&prompt, true);

    let t0 = Instant::now();
    let mut pre = prefill.prefill(tokens, &sampling).await?;
    let t_prefill = t0.elapsed();
    let header = pre.frames.header_frame();
    let (raw, wire) = (pre.frames.header().raw_len, pre.frames.header().encoded_len);
    let t1 = Instant::now();
    let mut transfer = decode.begin_transfer(&header)?;
    for chunk in pre.frames.by_ref() {
        transfer.push_chunk(&chunk)?;
    }
    let t_transfer = t1.elapsed();
    let t2 = Instant::now();
    let out = decode.decode(transfer, pre.first_token, sampling).await?;
    let t_decode = t2.elapsed();

    println!("{}", out.text.trim());
    eprintln!(
        "prefill: {} tokens in {:.0} ms | KV: {raw} bytes, {wire} on the wire ({}), framed and checked in {:.1} ms | decode: {} tokens in {:.0} ms ({:?})",
        pre.n_prompt,
        t_prefill.as_secs_f64() * 1e3,
        args.codec,
        t_transfer.as_secs_f64() * 1e3,
        out.tokens.len(),
        t_decode.as_secs_f64() * 1e3,
        out.finish,
    );
    Ok(())
}
