//! What `plan` and `simulate` print: tables for people, typed JSON for scripts.

use exo_router::placement::{Objective, Plan, Prediction, RequestShape};
use exo_router::profile::Profile;
use exo_router::simulate::{Percentiles, SimReport};
use serde::Serialize;

/// A candidate with its nodes named.
#[derive(Serialize)]
struct Candidate<'a> {
    prefill: &'a str,
    decode: &'a str,
    #[serde(flatten)]
    prediction: &'a Prediction,
}

/// The chosen placement.
#[derive(Serialize)]
struct Chosen<'a> {
    mode: exo_router::placement::PlacementMode,
    prefill: &'a str,
    decode: &'a str,
    codec: Option<exo_kvcache::Codec>,
    pieces: Option<u64>,
}

/// `plan --json`.
#[derive(Serialize)]
struct PlanJson<'a> {
    profile: String,
    request: RequestJson,
    objective: Objective,
    tpot_target_ms: f64,
    candidates: Vec<Candidate<'a>>,
    chosen: Option<Chosen<'a>>,
}

#[derive(Serialize)]
struct RequestJson {
    prompt_tokens: u64,
    output_tokens: u64,
}

fn name(profile: &Profile, id: usize) -> &str {
    profile.nodes.get(id).map_or("?", |n| n.name.as_str())
}

/// `plan --json`.
pub fn plan_json(
    profile: &Profile,
    shape: RequestShape,
    plan: &Plan,
) -> serde_json::Result<String> {
    let named = |p: &'_ Prediction| (name(profile, p.prefill), name(profile, p.decode));
    let out = PlanJson {
        profile: profile.path.display().to_string(),
        request: RequestJson {
            prompt_tokens: shape.prompt_tokens,
            output_tokens: shape.output_tokens,
        },
        objective: profile.policy.objective,
        tpot_target_ms: profile.policy.tpot_target_s * 1e3,
        candidates: plan
            .candidates
            .iter()
            .map(|p| {
                let (prefill, decode) = named(p);
                Candidate {
                    prefill,
                    decode,
                    prediction: p,
                }
            })
            .collect(),
        chosen: plan.chosen().map(|p| {
            let (prefill, decode) = named(p);
            Chosen {
                mode: p.mode,
                prefill,
                decode,
                codec: p.codec,
                pieces: p.pieces,
            }
        }),
    };
    serde_json::to_string_pretty(&out)
}

/// `plan` as a table.
pub fn plan_table(profile: &Profile, shape: RequestShape, plan: &Plan) {
    println!(
        "{}: {} prompt tokens, {} output tokens, objective {:?}, TPOT target {:.0} ms, idle cluster",
        profile.path.display(),
        shape.prompt_tokens,
        shape.output_tokens,
        profile.policy.objective,
        profile.policy.tpot_target_s * 1e3
    );
    println!();
    println!(
        "  {:<32} {:<14} {:<12} {:>6} {:>10} {:>11} {:>9} {:>9} {:>10}  target",
        "placement",
        "mode",
        "codec",
        "pieces",
        "TTFT ms",
        "hand-off ms",
        "step ms",
        "TPOT ms",
        "E2E ms"
    );
    for (i, c) in plan.candidates.iter().enumerate() {
        let (p, d) = (name(profile, c.prefill), name(profile, c.decode));
        let placement = if c.prefill == c.decode {
            p.to_string()
        } else {
            format!("{p} -> {d}")
        };
        println!(
            "{} {:<32} {:<14} {:<12} {:>6} {:>10.1} {:>11.1} {:>9.2} {:>9.2} {:>10.1}  {}",
            if plan.chosen == Some(i) { "*" } else { " " },
            placement,
            c.mode.name(),
            c.codec.map_or("-", |c| c.name()),
            c.pieces.map_or("-".to_string(), |p| p.to_string()),
            c.ttft_s * 1e3,
            c.handoff_s * 1e3,
            c.steady_tpot_s * 1e3,
            c.tpot_s * 1e3,
            c.e2e_s * 1e3,
            if c.meets_target { "met" } else { "missed" }
        );
    }
    println!();
    match plan.chosen() {
        Some(c) => println!(
            "chosen: {} (prefill {}, decode {})",
            c.mode,
            name(profile, c.prefill),
            name(profile, c.decode)
        ),
        None => println!("chosen: none (no node can serve this placement mode)"),
    }
}

/// `simulate` as a Markdown table, one row per placement mode.
pub fn simulate_table(profile: &Profile, workload: &str, reports: &[SimReport]) {
    println!("{}: workload {workload}", profile.path.display());
    println!();
    println!(
        "| policy | done | req/s | out tok/s | TTFT p50 / p90 / p99 ms | TPOT p50 / p90 / p99 ms | short TPOT p99 ms | placements |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    let ms = |p: Percentiles, digits: usize| {
        format!(
            "{:.d$} / {:.d$} / {:.d$}",
            p.p50 * 1e3,
            p.p90 * 1e3,
            p.p99 * 1e3,
            d = digits
        )
    };
    for r in reports {
        let placements: Vec<String> = r
            .placements
            .iter()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        let unplaced = if r.unplaced > 0 {
            format!(" ({} unplaced)", r.unplaced)
        } else {
            String::new()
        };
        println!(
            "| {} | {}{unplaced} | {:.2} | {:.1} | {} | {} | {:.1} | {} |",
            r.policy.name(),
            r.completed,
            r.requests_per_s,
            r.output_tok_s,
            ms(r.ttft, 0),
            ms(r.tpot, 1),
            r.tpot_short.p99 * 1e3,
            placements.join(", ")
        );
    }
}
