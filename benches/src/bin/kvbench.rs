//! KV transfer benchmark: export, encode, decode and import throughput and compression ratio per codec,
//! on a real prompt's KV cache, for several KV layouts.
//!
//! Also the node link's own throughput over loopback, plain and under mutual TLS (what encryption
//! costs a transfer).
//!
//! `cargo run --release -p exo-benches --bin kvbench -- [--model PATH] [--tokens N] [--reps R] [--link-mb MB]`

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use clap::Parser;
use exo_engine::{ChatMessage, ContextConfig, ContextHandle, ExportedKv, Model, ModelOptions};
use exo_kvcache::{
    Codec, DEFAULT_CHUNK_SIZE, DecodeLimits, ImportTarget, KvDecoder, KvEncoder, KvHeader,
    KvLayout, KvType,
};
use exo_protocol::{LinkSecurity, SamplingParams};

#[derive(Parser)]
#[command(about = "Measure KV export/encode/decode/import per codec and KV layout")]
struct Args {
    /// GGUF model.
    #[arg(
        long,
        env = "EXO_MODEL",
        default_value = "models/SmolLM2-135M-Instruct.Q4_1.gguf"
    )]
    model: PathBuf,
    /// Approximate prompt length in tokens.
    #[arg(long, default_value_t = 2000)]
    tokens: usize,
    /// Repetitions of each timed step (the best run is reported).
    #[arg(long, default_value_t = 5)]
    reps: usize,
    /// MB sent over loopback per link measurement (plain TCP and mutual TLS); 0 skips it.
    #[arg(long, default_value_t = 512)]
    link_mb: usize,
}

fn best<T>(reps: usize, mut f: impl FnMut() -> Result<T>) -> Result<(Duration, T)> {
    let mut out = None;
    let mut best = Duration::MAX;
    for _ in 0..reps.max(1) {
        let t = Instant::now();
        let v = f()?;
        best = best.min(t.elapsed());
        out = Some(v);
    }
    out.map(|v| (best, v)).context("no repetitions")
}

fn mbps(bytes: usize, d: Duration) -> f64 {
    bytes as f64 / 1e6 / d.as_secs_f64()
}

fn prompt_tokens(model: &Model, target: usize) -> Result<Vec<i32>> {
    let mut text = String::new();
    let mut i = 0usize;
    loop {
        text += &format!(
            "Entry {i}: station {} logged {} mm of rain and a wind of {} km/h. ",
            i % 17,
            (i * 37) % 101,
            (i * 13) % 59
        );
        i += 1;
        if i.is_multiple_of(20) {
            let msgs = [ChatMessage::new("user", &text)];
            let toks = model.tokenize(&model.chat_prompt(&msgs, None)?, true);
            if toks.len() >= target {
                return Ok(toks);
            }
        }
    }
}

/// One KV layout's exported cache and what the codecs must reproduce.
struct Exported {
    name: &'static str,
    /// What a transfer of the cache says (the codec is set per row).
    spec: KvHeader,
    kv: ExportedKv,
    first_token: i32,
    /// The tokens the original context generates next.
    reference: Vec<i32>,
    prefill: Duration,
    export: Duration,
}

/// Prefills `tokens` in a fresh context of `layout` and exports the cache (best of `reps`).
async fn export(
    model: &Arc<Model>,
    name: &'static str,
    layout: KvLayout,
    tokens: &[i32],
    reps: usize,
) -> Result<Exported> {
    let cfg = ContextConfig {
        layout,
        ..ContextConfig::default()
    };
    let src = ContextHandle::spawn(model.clone(), cfg)?;
    let t = Instant::now();
    let pre = src
        .prefill(0, tokens.to_vec(), SamplingParams::greedy(1))
        .await?;
    let prefill = t.elapsed();
    let mut export = Duration::MAX;
    let mut kv = None;
    for _ in 0..reps {
        let t = Instant::now();
        kv = Some(src.export(0).await?);
        export = export.min(t.elapsed());
    }
    let kv = kv.context("no export")?;
    let reference = src
        .generate(0, pre.first_token, 0, SamplingParams::greedy(16))
        .await?;
    let spec = src.transfer_header(0, kv.tokens.clone(), Codec::None, DEFAULT_CHUNK_SIZE);
    Ok(Exported {
        name,
        spec,
        kv,
        first_token: pre.first_token,
        reference: reference.tokens,
        prefill,
        export,
    })
}

/// Encodes, decodes and imports `e` with `codec` into `dst` (best of `reps`), checks the imported
/// cache continues like the original, and prints the table row.
async fn codec_row(
    model: &Model,
    e: &Exported,
    dst: &ContextHandle,
    codec: Codec,
    reps: usize,
) -> Result<()> {
    let target = ImportTarget {
        fingerprint: model.fingerprint(),
        layout: dst.config().layout,
    };
    let (enc_t, (header, frames, end)) = best(reps, || {
        let spec = KvHeader {
            codec,
            ..e.spec.clone()
        };
        Ok(KvEncoder::whole(spec, &e.kv.state)?)
    })?;
    let wire: usize = header.len() + frames.iter().map(Vec::len).sum::<usize>() + end.len();
    let (dec_t, decoded) = best(reps, || {
        let mut d = KvDecoder::new(&header, &DecodeLimits::default(), &target)?;
        for f in &frames {
            d.push_chunk(f)?;
        }
        Ok(d.finish(&end)?)
    })?;
    let mut import = Duration::MAX;
    for _ in 0..reps {
        let copy = decoded.clone();
        let t = Instant::now();
        dst.import(1, copy).await?;
        import = import.min(t.elapsed());
    }
    // The imported cache must continue like the original.
    let b = dst
        .generate(1, e.first_token, 0, SamplingParams::greedy(16))
        .await?;
    if b.tokens != e.reference {
        bail!("{} {codec}: imported cache diverged", e.name);
    }
    let raw = e.kv.state.len();
    println!(
        "| {} | {:.1} | {:.2} | {:.1} | {codec} | {:.3} | {:.0} | {:.0} | {:.1} |",
        e.name,
        raw as f64 / 1e6,
        e.prefill.as_secs_f64(),
        e.export.as_secs_f64() * 1e3,
        raw as f64 / wire as f64,
        mbps(raw, enc_t),
        mbps(raw, dec_t),
        import.as_secs_f64() * 1e3,
    );
    Ok(())
}

/// Sends `mb` MB in 1 MiB writes over one loopback link secured by `security` and returns the
/// receiver's MB/s (handshake excluded): what encryption costs a KV transfer's bytes.
async fn link_mbps(security: &LinkSecurity, mb: usize) -> Result<f64> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let addr = listener.local_addr()?.to_string();
    let server = security.clone();
    let receiver = tokio::spawn(async move {
        let (tcp, _) = listener.accept().await?;
        tcp.set_nodelay(true)?;
        let mut io = server.server(tcp).await?;
        let mut buf = vec![0u8; 1 << 20];
        let mut first = [0u8; 1];
        io.read_exact(&mut first).await?;
        let started = Instant::now();
        let mut got = 1usize;
        loop {
            let n = io.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            got += n;
        }
        Ok::<_, std::io::Error>((got, started.elapsed()))
    });
    let mut io = exo_protocol::open_link(&addr, security).await?;
    let block = vec![0x5au8; 1 << 20];
    for _ in 0..mb {
        io.write_all(&block).await?;
    }
    io.shutdown().await?;
    let (got, took) = receiver.await??;
    Ok(mbps(got, took))
}

async fn link_table(mb: usize) -> Result<()> {
    let tls = LinkSecurity::from_pem(exo_protocol::new_cluster_pem("kvbench")?.as_bytes())
        .map_err(anyhow::Error::msg)?;
    println!();
    println!("node link over loopback, {mb} MB in 1 MiB writes (one connection):");
    println!();
    println!("| link | MB/s | Gbit/s |");
    println!("|---|---|---|");
    for (name, security) in [("plain TCP", LinkSecurity::Plain), ("mutual TLS 1.3", tls)] {
        let rate = link_mbps(&security, mb).await?;
        println!("| {name} | {rate:.0} | {:.1} |", rate * 8.0 / 1e3);
    }
    Ok(())
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<()> {
    let args = Args::parse();
    if args.link_mb > 0 {
        link_table(args.link_mb).await?;
        println!();
    }
    let model = Model::load(&args.model, &ModelOptions::default())?;
    let tokens = prompt_tokens(&model, args.tokens)?;
    println!(
        "model {} ({}), prompt {} tokens, best of {} runs",
        model.name(),
        model.fingerprint(),
        tokens.len(),
        args.reps
    );
    println!();
    println!(
        "| KV layout | state MB | prefill s | export ms | codec | ratio | encode MB/s | decode MB/s | import ms |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let layouts = [
        ("f16, FA off", KvType::F16, false),
        ("f16, FA on", KvType::F16, true),
        ("q8_0, FA on", KvType::Q8_0, true),
    ];
    for (name, kv, fa) in layouts {
        let layout = KvLayout {
            type_k: kv,
            type_v: kv,
            flash_attn: fa,
            kv_unified: false,
            n_seq_max: 1,
            n_ctx_seq: u32::try_from(tokens.len() + 256)?,
        };
        let exported = export(&model, name, layout, &tokens, args.reps).await?;
        let dst_layout = KvLayout {
            n_seq_max: 4,
            ..layout
        };
        let dst = ContextHandle::spawn(
            model.clone(),
            ContextConfig {
                layout: dst_layout,
                ..ContextConfig::default()
            },
        )?;
        for codec in Codec::ALL {
            codec_row(&model, &exported, &dst, codec, args.reps).await?;
        }
    }
    Ok(())
}
