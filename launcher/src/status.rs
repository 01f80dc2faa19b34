//! `exo-router status`: a running cluster in the terminal, read from the router's
//! `GET /v1/cluster` (the data the web page shows): one line for the cluster, a table of nodes,
//! the links that shipped caches, the last requests. `--watch` redraws it.

use std::fmt::Write as _;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use exo_router::api::status::{ClusterStatus, NodeStatus};
use exo_router::cluster::Origin;

use crate::cli::StatusArgs;

/// Connect timeout of each request to the router.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// Deadline of each request to the router.
const DEADLINE: Duration = Duration::from_secs(5);
/// Requests shown.
const RECENT_SHOWN: usize = 8;

/// Runs `exo-router status`.
pub async fn status(args: &StatusArgs) -> Result<()> {
    let client = reqwest::Client::builder()
        .connect_timeout(CONNECT_TIMEOUT)
        .timeout(DEADLINE)
        .build()
        .context("making the HTTP client")?;
    let url = format!("{}/v1/cluster", args.url.trim_end_matches('/'));
    loop {
        let fetched = fetch(&client, &url, args.api_key.as_deref()).await;
        if !args.watch {
            let (status, body) = fetched?;
            println!("{}", if args.json { body } else { render(&status) });
            return Ok(());
        }
        // Clear the screen and draw again; a failure is shown and retried.
        print!("\x1b[2J\x1b[H");
        match fetched {
            Ok((status, _)) => println!("{}", render(&status)),
            Err(e) => println!("{url}: {e:#} (retrying)"),
        }
        tokio::time::sleep(Duration::from_secs_f64(args.interval)).await;
    }
}

async fn fetch(
    client: &reqwest::Client,
    url: &str,
    key: Option<&str>,
) -> Result<(ClusterStatus, String)> {
    let mut request = client.get(url);
    if let Some(key) = key {
        request = request.bearer_auth(key);
    }
    let response = request.send().await.with_context(|| {
        format!("cannot reach the router at {url} (is `exo-router serve` running?)")
    })?;
    let code = response.status();
    let body = response.text().await.context("reading the answer")?;
    if code == reqwest::StatusCode::UNAUTHORIZED {
        bail!("{url}: 401, the router asks for an API key (--api-key or EXO_API_KEY)");
    }
    if !code.is_success() {
        bail!(
            "{url}: {code}: {}",
            body.chars().take(300).collect::<String>()
        );
    }
    let status = serde_json::from_str(&body)
        .with_context(|| format!("{url} did not answer with a cluster status"))?;
    Ok((status, body))
}

fn gib(bytes: u64) -> String {
    if bytes == 0 {
        return "?".into();
    }
    format!("{:.0} GiB", bytes as f64 / f64::from(1u32 << 30))
}

/// Where a node's model runs and on what machine.
fn hardware(n: &NodeStatus) -> String {
    let Some(hw) = &n.hardware else {
        return "-".into();
    };
    let place = match &hw.gpu {
        Some(gpu) => format!("{gpu} ({}/{} layers)", hw.gpu_layers, hw.n_layer),
        None => format!("CPU ({} threads)", hw.cpu_threads),
    };
    format!("{place}, {}", gib(hw.memory_bytes))
}

/// Rows of cells as a table with aligned columns, two spaces apart.
fn table(rows: &[Vec<String>]) -> String {
    let cols = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..cols)
        .map(|c| {
            let cell = |r: &Vec<String>| r.get(c).map_or(0, |s| s.chars().count());
            rows.iter().map(cell).max().unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (cell, width) in row.iter().zip(&widths) {
            let _ = write!(line, "{cell:<width$}  ");
        }
        out += line.trim_end();
        out.push('\n');
    }
    out
}

/// The cluster as text: a summary line, the nodes, the links, the last requests.
pub fn render(s: &ClusterStatus) -> String {
    let up = s.nodes.iter().filter(|n| n.healthy).count();
    let mut out = format!(
        "model {} · {} · {} placement · nodes {up}/{} up · {} requests ({} queued) · {} decode slots\n\n",
        s.model,
        if s.ready { "ready" } else { "UNAVAILABLE" },
        s.placement,
        s.nodes.len(),
        s.requests_in_flight,
        s.queued,
        s.decode_slots,
    );
    let mut rows = vec![
        [
            "NODE",
            "ROLE",
            "STATE",
            "FROM",
            "HARDWARE",
            "SLOTS",
            "REQS",
            "PREFILL/s",
            "DECODE/s",
            "ADDRESS",
        ]
        .map(String::from)
        .to_vec(),
    ];
    for n in &s.nodes {
        rows.push(vec![
            n.name.clone(),
            n.role.to_string(),
            if n.healthy { "up" } else { "DOWN" }.into(),
            match n.origin {
                Origin::Profile => "profile",
                Origin::Discovered => "LAN",
            }
            .into(),
            hardware(n),
            format!("{}/{}", n.slots_in_use, n.slots),
            n.in_flight.to_string(),
            format!("{:.0}", n.prefill_tok_s),
            format!("{:.1}", n.decode_tok_s),
            n.address.clone(),
        ]);
    }
    out += &table(&rows);
    for n in s.nodes.iter().filter_map(|n| Some((n, n.error.as_ref()?))) {
        let _ = writeln!(out, "  {} is down: {}", n.0.name, n.1);
    }
    if !s.links.is_empty() {
        out += "\nLINKS\n";
        for l in &s.links {
            let profile = match (l.bandwidth_gbit_s, l.latency_ms, &l.source) {
                (Some(b), Some(ms), Some(source)) => {
                    format!(", {b:.2} Gbit/s, {ms:.2} ms ({source})")
                }
                _ => l
                    .probe_error
                    .as_ref()
                    .map(|e| format!(", probe failed: {e}"))
                    .unwrap_or_default(),
            };
            let _ = writeln!(
                out,
                "  {} -> {}: {} hand-offs, {} KV tokens, {:.1} MB{profile}",
                l.prefill,
                l.decode,
                l.handoffs,
                l.kv_tokens,
                l.kv_bytes as f64 / 1e6
            );
        }
    }
    if !s.recent.is_empty() {
        out += "\nRECENT REQUESTS (newest first)\n";
        let mut rows = vec![
            ["NODES", "TOKENS", "TTFT", "TOK/S", "OUTCOME"]
                .map(String::from)
                .to_vec(),
        ];
        for r in s.recent.iter().take(RECENT_SHOWN) {
            rows.push(vec![
                if r.prefill == r.decode {
                    r.prefill.clone()
                } else {
                    format!("{} -> {}", r.prefill, r.decode)
                },
                format!("{} + {}", r.prompt_tokens, r.completion_tokens),
                format!("{:.0} ms", r.ttft_ms),
                format!("{:.1}", r.decode_tok_s),
                format!("{:?}", r.outcome).to_lowercase(),
            ]);
        }
        out += &table(&rows);
    }
    out.trim_end().to_string()
}
