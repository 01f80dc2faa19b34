//! Load generator for any OpenAI-compatible server (exo-router, llama.cpp's llama-server, ...):
//! streaming chat requests at a fixed concurrency with a mix of short and long prompts; prints time
//! to first token and time per output token percentiles, throughput and errors.
//!
//! `cargo run --release -p exo-benches --bin loadgen -- --url http://127.0.0.1:52415 --concurrency 8`
//!
//! With `--duration S` it runs for S seconds instead: `--concurrency` chats send short prompts back
//! to back, and with `--long-period P` one long prompt arrives every P seconds beside them (the mixed
//! load of docs/bench.md).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use clap::Parser;
use futures::StreamExt;
use serde_json::{Value, json};

#[derive(Parser, Clone)]
#[command(
    about = "Drive an OpenAI-compatible server and report TTFT/TPOT percentiles and throughput"
)]
struct Args {
    /// Server base URL (without /v1).
    #[arg(long, default_value = "http://127.0.0.1:52415")]
    url: String,
    /// Model id; default: the first one /v1/models lists.
    #[arg(long)]
    model: Option<String>,
    /// Requests to send in all.
    #[arg(long, default_value_t = 32)]
    requests: usize,
    /// Requests in flight at once.
    #[arg(long, default_value_t = 4)]
    concurrency: usize,
    /// Words in a short prompt (about 2 tokens a word with SmolLM2).
    #[arg(long, default_value_t = 40)]
    short_words: usize,
    /// Words in a long prompt.
    #[arg(long, default_value_t = 1000)]
    long_words: usize,
    /// Every Nth request has a long prompt (0: none).
    #[arg(long, default_value_t = 0)]
    long_every: usize,
    /// Tokens to generate per request.
    #[arg(long, default_value_t = 64)]
    max_tokens: u32,
    /// Sampling temperature.
    #[arg(long, default_value_t = 0.7)]
    temperature: f32,
    /// Seed of the prompt texts and of each request's sampling seed.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Run this many seconds, `--concurrency` short chats back to back (`--requests` and
    /// `--long-every` do not apply).
    #[arg(long)]
    duration: Option<f64>,
    /// With `--duration`: a long prompt every this many seconds, beside the chats.
    #[arg(long)]
    long_period: Option<f64>,
    /// Reuse connections (HTTP keep-alive) instead of one per request: a server that closes a
    /// kept-alive connection under a client shows up as dropped connections.
    #[arg(long)]
    keep_alive: bool,
}

/// Why requests failed, by kind.
#[derive(Default)]
struct Failures {
    /// HTTP 429 (the server's queue was full: expected under overload).
    rate_limited: usize,
    /// Any other HTTP error status.
    http: usize,
    /// The connection failed or closed: before the answer, or in the middle of its stream.
    dropped: usize,
    /// The stream ended with an error event, bad data or no content.
    other: usize,
}

impl Failures {
    fn count(&mut self, e: &anyhow::Error) {
        let text = e.to_string();
        if text.starts_with("HTTP 429") {
            self.rate_limited += 1;
        } else if text.starts_with("HTTP ") {
            self.http += 1;
        } else if e
            .chain()
            .any(|c| c.downcast_ref::<reqwest::Error>().is_some())
        {
            self.dropped += 1;
        } else {
            self.other += 1;
        }
    }

    fn total(&self) -> usize {
        self.rate_limited + self.http + self.dropped + self.other
    }
}

/// What one request measured.
struct Sample {
    long: bool,
    ttft: Duration,
    /// Mean time between output tokens after the first.
    tpot: Option<Duration>,
    tokens: u64,
}

fn prompt(words: usize, seed: u64) -> String {
    let vocab = [
        "river", "market", "engine", "garden", "signal", "harbor", "ledger", "window", "summit",
        "orchard", "canal", "beacon",
    ];
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    let mut out = String::from("Read these notes and summarise them in two sentences.");
    for i in 0..words {
        x = x
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        out.push(' ');
        out.push_str(vocab[(x >> 33) as usize % vocab.len()]);
        if i % 12 == 11 {
            out.push('.');
        }
    }
    out
}

/// Request `i` of a run with a fixed number of requests: every `long_every`th is long.
async fn nth(client: &reqwest::Client, args: &Args, model: &str, i: usize) -> Result<Sample> {
    let long = args.long_every > 0 && i % args.long_every == args.long_every - 1;
    one(client, args, model, i, long).await
}

async fn one(
    client: &reqwest::Client,
    args: &Args,
    model: &str,
    i: usize,
    long: bool,
) -> Result<Sample> {
    let words = if long {
        args.long_words
    } else {
        args.short_words
    };
    let body = json!({
        "model": model,
        "messages": [{ "role": "user", "content": prompt(words, args.seed.wrapping_add(i as u64)) }],
        "max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed.wrapping_add(i as u64),
        "stream": true, "stream_options": { "include_usage": true },
    });
    let start = Instant::now();
    let resp = client
        .post(format!("{}/v1/chat/completions", args.url))
        .json(&body)
        .send()
        .await?;
    let status = resp.status();
    if !status.is_success() {
        anyhow::bail!("HTTP {status}: {}", resp.text().await.unwrap_or_default());
    }
    let mut stream = resp.bytes_stream();
    let mut buf = String::new();
    let (mut first, mut last, mut chunks, mut usage_tokens) = (None, None, 0u64, None);
    while let Some(bytes) = stream.next().await {
        buf.push_str(&String::from_utf8_lossy(&bytes?));
        while let Some(end) = buf.find("\n\n") {
            let event: String = buf.drain(..end + 2).collect();
            for data in event.lines().filter_map(|l| l.strip_prefix("data: ")) {
                if data == "[DONE]" {
                    continue;
                }
                let v: Value = serde_json::from_str(data).context("bad event")?;
                if let Some(e) = v.get("error") {
                    anyhow::bail!("error event: {e}");
                }
                if let Some(n) = v["usage"]["completion_tokens"].as_u64() {
                    usage_tokens = Some(n);
                }
                let content = v["choices"][0]["delta"]["content"]
                    .as_str()
                    .unwrap_or_default();
                if !content.is_empty() {
                    let now = start.elapsed();
                    first.get_or_insert(now);
                    last = Some(now);
                    chunks += 1;
                }
            }
        }
    }
    let ttft = first.context("no content received")?;
    let tokens = usage_tokens.unwrap_or(chunks);
    let tpot = match (last, tokens) {
        (Some(l), n) if n > 1 && l > ttft => Some((l - ttft) / (n as u32 - 1)),
        _ => None,
    };
    Ok(Sample {
        long,
        ttft,
        tpot,
        tokens,
    })
}

fn pct(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let i = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[i].as_secs_f64() * 1e3
}

fn row(name: &str, mut v: Vec<Duration>) -> String {
    v.sort();
    format!(
        "| {name} | {} | {:.1} | {:.1} | {:.1} |",
        v.len(),
        pct(&v, 0.5),
        pct(&v, 0.9),
        pct(&v, 0.99)
    )
}

/// The model to ask for: `--model`, or the first the server lists.
async fn model_id(client: &reqwest::Client, args: &Args) -> Result<String> {
    if let Some(m) = &args.model {
        return Ok(m.clone());
    }
    let v: Value = client
        .get(format!("{}/v1/models", args.url))
        .send()
        .await?
        .json()
        .await?;
    Ok(v["data"][0]["id"]
        .as_str()
        .context("no model listed")?
        .to_string())
}

/// Prints the run's summary and the latency table.
fn report(args: &Args, model: &str, wall: f64, samples: &[Sample], failures: &Failures) {
    let errors = failures.total();
    let tokens: u64 = samples.iter().map(|s| s.tokens).sum();
    let (requests, long) = match (args.duration, args.long_period) {
        (Some(d), None) => (
            format!("{} requests in {d} s", samples.len() + errors),
            "no long prompts".to_string(),
        ),
        (Some(d), Some(p)) => (
            format!("{} requests in {d} s", samples.len() + errors),
            format!("a long prompt every {p} s ({} words)", args.long_words),
        ),
        (None, _) => (
            format!("{} requests", args.requests),
            format!(
                "a long prompt every {} requests ({} words)",
                args.long_every, args.long_words
            ),
        ),
    };
    println!(
        "{} | model {model} | {requests}, concurrency {}, max_tokens {}, {long}, short {} words",
        args.url, args.concurrency, args.max_tokens, args.short_words
    );
    println!(
        "wall {wall:.1} s | output {:.1} tok/s | {:.2} req/s | errors {errors} (429: {}, other HTTP: {}, dropped connections: {}, other: {}) | keep-alive {}",
        tokens as f64 / wall,
        samples.len() as f64 / wall,
        failures.rate_limited,
        failures.http,
        failures.dropped,
        failures.other,
        if args.keep_alive { "on" } else { "off" }
    );
    println!();
    println!("| metric (ms) | n | p50 | p90 | p99 |");
    println!("|---|---|---|---|---|");
    for (label, long) in [("short", false), ("long", true)] {
        let class: Vec<&Sample> = samples.iter().filter(|s| s.long == long).collect();
        if class.is_empty() {
            continue;
        }
        let ttft = class.iter().map(|s| s.ttft).collect();
        println!("{}", row(&format!("TTFT {label}"), ttft));
        let tpot = class.iter().filter_map(|s| s.tpot).collect();
        println!("{}", row(&format!("TPOT {label}"), tpot));
    }
}

/// A run of `secs`: `concurrency` chats send short prompts back to back until then, and a long
/// prompt arrives every `long_period` seconds beside them; waits for everything sent to finish.
async fn timed(
    client: &reqwest::Client,
    args: &Args,
    model: &str,
    secs: Duration,
) -> Vec<Result<Sample>> {
    let started = tokio::time::Instant::now();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let chat = || async {
        let mut out = Vec::new();
        while started.elapsed() < secs {
            let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            out.push(one(client, args, model, i, false).await);
        }
        out
    };
    let longs = async {
        let Some(period) = args.long_period.map(Duration::from_secs_f64) else {
            return Vec::new();
        };
        let mut sent = Vec::new();
        let mut at = started + period;
        while at.duration_since(started) < secs {
            tokio::time::sleep_until(at).await;
            let i = 1_000_000 + sent.len();
            sent.push(tokio::spawn({
                let (client, args, model) = (client.clone(), args.clone(), model.to_string());
                async move { one(&client, &args, &model, i, true).await }
            }));
            at += period;
        }
        let mut out = Vec::new();
        for task in sent {
            out.push(task.await.unwrap_or_else(|e| Err(e.into())));
        }
        out
    };
    let chats = futures::future::join_all((0..args.concurrency.max(1)).map(|_| chat()));
    let (chats, longs) = tokio::join!(chats, longs);
    chats.into_iter().flatten().chain(longs).collect()
}

#[tokio::main]
async fn main() -> Result<()> {
    let args = Args::parse();
    // A connection per request unless asked: llama-server closes idle keep-alive connections, and
    // a request sent on one it just closed fails ("connection closed before message completed").
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(if args.keep_alive { usize::MAX } else { 0 })
        .build()?;
    let model = model_id(&client, &args).await?;
    let started = Instant::now();
    let results: Vec<Result<Sample>> = match args.duration {
        Some(secs) => timed(&client, &args, &model, Duration::from_secs_f64(secs)).await,
        None => {
            futures::stream::iter(0..args.requests)
                .map(|i| nth(&client, &args, &model, i))
                .buffer_unordered(args.concurrency.max(1))
                .collect()
                .await
        }
    };
    let wall = started.elapsed().as_secs_f64();
    let mut failures = Failures::default();
    let mut samples = Vec::new();
    for r in results {
        match r {
            Ok(s) => samples.push(s),
            Err(e) => {
                failures.count(&e);
                eprintln!("error: {e:#}");
            }
        }
    }
    report(&args, &model, wall, &samples, &failures);
    Ok(())
}
