//! One request's life across the cluster: placement, prefill, then the token stream from the decode node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exo_protocol::{
    FinishReason, Handoff, NodeInfo, NodeServiceClient, PrefillReply, PrefillRequest, Prompt,
    RequestId, SamplingParams, TokenLogprob, context_with_deadline,
};
use tarpc::client::RpcError;

use crate::api::error::ApiError;
use crate::cluster::{
    Admission, Cluster, ClusterNode, Outcome, Placement, RequestRecord, ServedModel, SlotPermit,
};
use crate::placement::RequestShape;

/// Deadline of a prefill call: long prompts on slow machines legitimately take minutes.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one poll waits on the decode node for output.
const POLL_WAIT_MS: u32 = 1000;
/// Deadline of one poll call: the node answers within [`POLL_WAIT_MS`], so a poll that takes
/// seconds more went down a stalled connection or to a hung node, and the request moves.
const POLL_TIMEOUT: Duration = Duration::from_secs(6);
/// Deadline of the liveness check on the decode node.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the decode node is checked while a split request's prompt runs.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a request waits for a sequence slot on its decode node before its prompt runs.
const SLOT_WAIT: Duration = Duration::from_secs(60);

/// Text that became final, and whether the request ended with it.
#[derive(Debug, Clone, PartialEq)]
pub struct Delta {
    /// New text (may be empty when only the finish is reported).
    pub text: String,
    /// The log probabilities of the tokens since the last delta, when the request asked.
    pub logprobs: Vec<TokenLogprob>,
    /// Set on the last delta.
    pub finish: Option<FinishReason>,
}

/// A whole answer ([`Generation::collect`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Collected {
    /// The text.
    pub text: String,
    /// Why it ended.
    pub finish: FinishReason,
    /// Each output token's log probability, when the request asked for them.
    pub logprobs: Vec<TokenLogprob>,
}

/// A running request. Dropping it before the end cancels the request on its decode node. When a
/// node serving it dies, it moves: the prompt and the output so far run again on healthy nodes
/// (`resume`), and the stream goes on from the next token, which is the token the lost node would
/// have produced (greedy, seeded and constrained alike).
pub struct Generation {
    id: RequestId,
    /// The model it runs on (a move goes to other nodes of the same model).
    model: ServedModel,
    /// The id of the current leg's RPCs ([`Leg::rpc_id`]).
    rpc_id: RequestId,
    placement: Placement,
    _admission: Admission,
    started: Instant,
    first_at: Instant,
    decode_client: NodeServiceClient,
    first: Option<Delta>,
    done: bool,
    /// The decode slot this request holds until it is dropped; `None` only while the request
    /// moves (the lost leg's slot goes back first, or requests moving to the same node would each
    /// hold a slot while they wait for another).
    slot: Option<SlotPermit>,
    /// When the decode node last produced output (or the request started on it).
    last_progress: Instant,
    /// Longest the decode node may go without output before the request fails (504).
    progress_timeout: Duration,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
    cluster: Arc<Cluster>,
    /// What to run again when the request moves.
    prompt: Prompt,
    sampling: SamplingParams,
    /// The output token ids the client has been sent text for (or held back text of).
    output: Vec<i32>,
    /// Moves so far (at most the cluster's `migration_limit`).
    migrations: u32,
    /// Log probabilities of tokens whose text has not been returned yet.
    logprobs: Vec<TokenLogprob>,
}

fn is_connection_error(e: &RpcError) -> bool {
    matches!(
        e,
        RpcError::Shutdown | RpcError::Send(_) | RpcError::Channel(_)
    )
}

/// Marks `node` down because it `why` (e.g. "is unreachable: ...") and fails the request: 503.
fn node_down(node: &ClusterNode, why: String) -> ApiError {
    node.mark_down(&why);
    ApiError::Unavailable(format!("node {} {why}", node.name()))
}

/// `node` did not answer: marked down (the health loop reconnects it), and a 503 for the client.
fn unreachable_node(node: &ClusterNode, e: &RpcError) -> ApiError {
    node_down(node, format!("is unreachable: {e}"))
}

fn rpc_failure(node: &ClusterNode, e: RpcError) -> ApiError {
    if is_connection_error(&e) {
        unreachable_node(node, &e)
    } else {
        ApiError::Internal(format!("node {}: {e}", node.name()))
    }
}

/// Characters of a prompt's text (what the router knows before a node tokenizes it).
fn prompt_chars(prompt: &Prompt) -> usize {
    match prompt {
        Prompt::Text(t) => t.len(),
        // Each message also costs a few template tokens (role markers).
        Prompt::Chat(chat) => {
            let tools = chat.tools.as_ref().map_or(0, String::len);
            tools
                + chat
                    .turns
                    .iter()
                    .map(|t| t.content.len() + t.tool_calls.as_ref().map_or(0, String::len) + 16)
                    .sum::<usize>()
        }
    }
}

/// A node a request was using stopped answering: the request may move to other nodes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Lost {
    /// The prefill node, before output token 0.
    Prefill,
    /// The decode node: while the prompt ran, or mid-stream.
    Decode,
}

impl Lost {
    /// The `reason` label of `exo_migrations_total`.
    fn reason(self) -> &'static str {
        match self {
            Lost::Prefill => "prefill_node_lost",
            Lost::Decode => "decode_node_lost",
        }
    }
}

/// Why a leg failed: the client's error, and which node was lost if that was the cause.
struct LegFailure {
    error: ApiError,
    lost: Option<Lost>,
}

impl From<ApiError> for LegFailure {
    fn from(error: ApiError) -> Self {
        LegFailure { error, lost: None }
    }
}

/// One placement of a request up to the token its prefill sampled: a request has one, and one
/// more each time it moves after losing a node.
struct Leg {
    /// The id of this leg's RPCs: the request's own for its first leg, a fresh one for each
    /// move (a node that saw the request before may still remember it as ended).
    rpc_id: RequestId,
    placement: Placement,
    decode_client: NodeServiceClient,
    /// The decode slot this leg holds.
    slot: SlotPermit,
    reply: PrefillReply,
}

/// Runs the prompt on the prefill node. A split request also watches the decode node while the
/// prompt runs (`hello` every [`PING_INTERVAL`]): the two legs fail together, so a decode node that
/// dies or stops answering fails the leg at once (dropping the prefill call cancels it on the
/// prefill node) instead of after the prompt.
async fn run_prefill(
    placement: &Placement,
    prefill_client: &NodeServiceClient,
    decode_client: &NodeServiceClient,
    request: PrefillRequest,
) -> Result<PrefillReply, LegFailure> {
    let prefill = async {
        let reply = prefill_client
            .prefill(context_with_deadline(PREFILL_TIMEOUT), request)
            .await;
        match reply {
            Ok(r) => Ok(r.map_err(ApiError::from)?),
            Err(e) => Err(LegFailure {
                lost: is_connection_error(&e).then_some(Lost::Prefill),
                error: rpc_failure(&placement.prefill, e),
            }),
        }
    };
    if !placement.is_split() {
        return prefill.await;
    }
    let decode_gone = async {
        loop {
            let ping = decode_client
                .hello(context_with_deadline(PING_TIMEOUT))
                .await;
            // Any failure counts here, a missed deadline too: a hung node is as gone as a dead one.
            // So does a node that says it cannot serve.
            let error = match ping {
                Err(e) => unreachable_node(&placement.decode, &e),
                Ok(NodeInfo {
                    fault: Some(fault), ..
                }) => node_down(&placement.decode, format!("cannot serve: {fault}")),
                Ok(_) => {
                    tokio::time::sleep(PING_INTERVAL).await;
                    continue;
                }
            };
            return LegFailure {
                error,
                lost: Some(Lost::Decode),
            };
        }
    };
    tokio::select! {
        reply = prefill => reply,
        gone = decode_gone => Err(gone),
    }
}

/// Places one leg of request `id` and runs its prompt (followed by `resume`, the output it
/// already produced elsewhere) up to the token the prefill samples.
async fn start_leg(
    cluster: &Arc<Cluster>,
    model: &ServedModel,
    rpc_id: RequestId,
    (prompt, sampling, resume): (&Prompt, &SamplingParams, &[i32]),
    shape: RequestShape,
) -> Result<Leg, LegFailure> {
    let mut placement = cluster.place(model, shape)?;
    let unreachable =
        |n: &ClusterNode| ApiError::Unavailable(format!("node {} is not connected", n.name()));
    let prefill_client = placement
        .prefill
        .client()
        .ok_or_else(|| unreachable(&placement.prefill))?;
    let decode_client = placement
        .decode
        .client()
        .ok_or_else(|| unreachable(&placement.decode))?;
    // The decode slot first, then the prompt: a cache is never shipped to wait for a slot.
    let slot = placement
        .decode
        .reserve_slot(SLOT_WAIT)
        .await
        .ok_or_else(|| {
            ApiError::Unavailable(format!(
                "every sequence slot of decode node {} stayed busy for {} s",
                placement.decode.name(),
                SLOT_WAIT.as_secs()
            ))
        })?;
    let handoff = placement.is_split().then(|| Handoff {
        decode_addr: placement.decode.addr(),
        codec: placement.codec,
        pieces: placement.pieces.map_or(0, |p| p as u32),
        chunk_size: cluster.kv.chunk_size,
        context_limit: placement
            .decode
            .info()
            .map_or(u32::MAX, |i| i.layout.n_ctx_seq),
    });
    let request = PrefillRequest {
        id: rpc_id,
        prompt: prompt.clone(),
        sampling: sampling.clone(),
        handoff,
        resume: resume.to_vec(),
    };
    let reply = run_prefill(&placement, &prefill_client, &decode_client, request).await;
    placement.prefill_load = None;
    if let Err(LegFailure {
        lost: Some(Lost::Prefill),
        ..
    }) = &reply
    {
        // The decode node may hold the start of a transfer that will never end: free it now.
        let _ = decode_client
            .cancel(context_with_deadline(PING_TIMEOUT), rpc_id)
            .await;
    }
    Ok(Leg {
        rpc_id,
        placement,
        decode_client,
        slot,
        reply: reply?,
    })
}

/// [`start_leg`], placed again on other nodes each time a node it used is lost, while
/// `migrations` stays under the cluster's limit (each move counts one, and in
/// `exo_migrations_total`). `first_id` is the first leg's RPC id; later legs take fresh ones.
async fn place_and_prefill(
    cluster: &Arc<Cluster>,
    model: &ServedModel,
    (request, first_id): (RequestId, RequestId),
    input: (&Prompt, &SamplingParams, &[i32]),
    shape: RequestShape,
    migrations: &mut u32,
) -> Result<Leg, ApiError> {
    let mut rpc_id = first_id;
    let mut lost_before: Option<ApiError> = None;
    loop {
        let failure = match start_leg(cluster, model, rpc_id, input, shape).await {
            Ok(leg) => return Ok(leg),
            Err(f) => f,
        };
        let error = match (failure.lost, lost_before.take()) {
            // Placing again after a loss found no node: say both.
            (None, Some(lost)) => ApiError::Unavailable(format!(
                "{lost}; no other node could take the request: {}",
                failure.error
            )),
            (_, _) => failure.error,
        };
        let Some(lost) = failure
            .lost
            .filter(|_| *migrations < cluster.migration_limit)
        else {
            return Err(error);
        };
        *migrations += 1;
        metrics::counter!("exo_migrations_total", "reason" => lost.reason()).increment(1);
        rpc_id = cluster.next_id();
        tracing::warn!(%request, %rpc_id, %error, "a node was lost before the first token; placing the request again");
        lost_before = Some(error);
    }
}

impl Generation {
    /// Places request `id`, runs its prompt, and returns once output token 0 is known. A node lost
    /// before then costs a move to other nodes, not the request.
    pub async fn start(
        cluster: &Arc<Cluster>,
        id: RequestId,
        model: &ServedModel,
        prompt: Prompt,
        sampling: SamplingParams,
    ) -> Result<Generation, ApiError> {
        let admission = cluster.admit(model)?;
        let started = Instant::now();
        let chars = prompt_chars(&prompt);
        let shape = RequestShape {
            prompt_tokens: cluster.estimate_tokens(chars),
            output_tokens: cluster.expected_output(sampling.max_tokens),
        };
        let mut migrations = 0;
        let input = (&prompt, &sampling, &[][..]);
        let leg =
            place_and_prefill(cluster, model, (id, id), input, shape, &mut migrations).await?;
        cluster.observe_prompt(chars, leg.reply.n_prompt);
        let first_at = Instant::now();
        metrics::histogram!("exo_time_to_first_token_seconds")
            .record((first_at - started).as_secs_f64());
        let mut generation = Generation {
            id,
            model: model.clone(),
            rpc_id: leg.rpc_id,
            _admission: admission,
            started,
            first_at,
            decode_client: leg.decode_client,
            first: None,
            done: false,
            slot: Some(leg.slot),
            last_progress: Instant::now(),
            progress_timeout: cluster.progress_timeout,
            prompt_tokens: leg.reply.n_prompt,
            completion_tokens: 0,
            placement: leg.placement,
            cluster: Arc::clone(cluster),
            prompt,
            sampling,
            output: Vec::new(),
            migrations,
            logprobs: Vec::new(),
        };
        generation.first = Some(generation.take_first(leg.reply));
        Ok(generation)
    }

    /// Counts the token a leg's prefill sampled and returns its text.
    fn take_first(&mut self, reply: PrefillReply) -> Delta {
        let (prefill, decode) = (&self.placement.prefill, &self.placement.decode);
        prefill.prefill_rate.add(u64::from(reply.n_prompt));
        if self.placement.is_split() && reply.finish.is_none() {
            let tokens = u64::from(reply.n_prompt);
            self.cluster.activity.handoff(prefill.id, decode.id, tokens);
        }
        // An end token as the first token carries no text and is not output.
        let ended = matches!(
            reply.finish,
            Some(FinishReason::Stop | FinishReason::StopSequence(_))
        );
        let produced = !(ended && reply.first_text.is_empty());
        let mut logprobs = Vec::new();
        if produced {
            self.output.push(reply.first_token);
            self.completion_tokens = self.completion_tokens.saturating_add(1);
            logprobs.extend(reply.first_logprob);
        }
        Delta {
            logprobs,
            text: reply.first_text,
            finish: reply.finish,
        }
    }

    /// Name of the node that ran the prompt.
    pub fn prefill_node(&self) -> &str {
        self.placement.prefill.name()
    }

    /// Name of the node that generates.
    pub fn decode_node(&self) -> &str {
        self.placement.decode.name()
    }

    /// The pieces the prompt's cache is shipped in while it runs, when the request is split and
    /// the router chose them (`None`: colocated, or the prefill node's default).
    pub fn kv_pieces(&self) -> Option<u64> {
        self.placement.pieces.filter(|_| self.placement.is_split())
    }

    /// Records the request's token counts and time per output token once it is over.
    fn record_end(&self) {
        metrics::counter!("exo_prompt_tokens_total").increment(u64::from(self.prompt_tokens));
        metrics::counter!("exo_completion_tokens_total")
            .increment(u64::from(self.completion_tokens));
        if self.completion_tokens > 1 {
            let per = (Instant::now() - self.first_at).as_secs_f64()
                / f64::from(self.completion_tokens - 1);
            metrics::histogram!("exo_time_per_output_token_seconds").record(per);
        }
        tracing::debug!(
            id = %self.id,
            seconds = (Instant::now() - self.started).as_secs_f64(),
            tokens = self.completion_tokens,
            "request done"
        );
    }

    /// Adds the request to the cluster's recent activity once it is over.
    fn remember(&self, outcome: Outcome) {
        let after_first = (Instant::now() - self.first_at).as_secs_f64();
        let decode_tok_s = match self.completion_tokens {
            0 | 1 => 0.0,
            n if after_first > 0.0 => f64::from(n - 1) / after_first,
            _ => 0.0,
        };
        let ended_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as u64);
        self.cluster.activity.finished(RequestRecord {
            id: self.id.to_string(),
            ended_unix_ms,
            prefill: self.prefill_node().to_string(),
            decode: self.decode_node().to_string(),
            prompt_tokens: self.prompt_tokens,
            completion_tokens: self.completion_tokens,
            ttft_ms: (self.first_at - self.started).as_secs_f64() * 1e3,
            decode_tok_s,
            migrations: self.migrations,
            outcome,
        });
    }

    /// The next piece of output; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Delta, ApiError>> {
        let item = self.advance().await;
        match &item {
            Some(Ok(Delta {
                finish: Some(_), ..
            })) if self.done => {
                self.record_end();
                self.remember(Outcome::Done);
            }
            Some(Err(_)) if self.done => self.remember(Outcome::Failed),
            _ => {}
        }
        item
    }

    async fn advance(&mut self) -> Option<Result<Delta, ApiError>> {
        if let Some(first) = self.first.take() {
            self.done = first.finish.is_some();
            return Some(Ok(first));
        }
        while !self.done {
            let polled = self
                .decode_client
                .poll(
                    context_with_deadline(POLL_TIMEOUT),
                    self.rpc_id,
                    POLL_WAIT_MS,
                )
                .await;
            let reply = match polled {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
                Err(e) => {
                    // A poll past its deadline went down a stalled connection or to a hung
                    // node: as lost as a closed connection.
                    let moved =
                        if is_connection_error(&e) || matches!(e, RpcError::DeadlineExceeded) {
                            let error = unreachable_node(&self.placement.decode, &e);
                            self.migrate(error).await
                        } else {
                            Err(rpc_failure(&self.placement.decode, e))
                        };
                    self.done = moved.as_ref().map_or(true, |d| d.finish.is_some());
                    if let Ok(d) = &moved
                        && d.text.is_empty()
                        && !self.done
                    {
                        continue;
                    }
                    return Some(moved);
                }
            };
            // A node's reply is input: counts saturate instead of wrapping.
            let got = u32::try_from(reply.tokens.len()).unwrap_or(u32::MAX);
            self.completion_tokens = self.completion_tokens.saturating_add(got);
            self.placement.decode.decode_rate.add(u64::from(got));
            if let Some(bytes) = reply.kv_wire_bytes.filter(|_| self.placement.is_split()) {
                let (p, d) = (self.placement.prefill.id, self.placement.decode.id);
                self.cluster.activity.shipped_bytes(p, d, bytes);
            }
            self.output.extend_from_slice(&reply.tokens);
            self.done = reply.finish.is_some();
            if !reply.tokens.is_empty() || self.done {
                self.last_progress = Instant::now();
            } else if self.last_progress.elapsed() > self.progress_timeout {
                // A wedged engine answers every poll with nothing: give up, cancel it there.
                self.cancel_on_node();
                self.done = true;
                return Some(Err(ApiError::Timeout(format!(
                    "decode node {} produced no output for {} s",
                    self.placement.decode.name(),
                    self.progress_timeout.as_secs_f64()
                ))));
            }
            // Tokens whose text is held back (a possible stop string, part of a character)
            // keep their log probabilities until the text comes.
            self.logprobs.extend(reply.logprobs);
            if !reply.text.is_empty() || reply.finish.is_some() {
                return Some(Ok(Delta {
                    text: reply.text,
                    logprobs: std::mem::take(&mut self.logprobs),
                    finish: reply.finish,
                }));
            }
        }
        None
    }

    /// The decode node stopped answering mid-stream (`error`): runs the prompt and the output so
    /// far again on healthy nodes and returns the text of the next token, or `error` (with what
    /// else failed) when the request may not move again or no node can take it.
    async fn migrate(&mut self, error: ApiError) -> Result<Delta, ApiError> {
        if self.migrations >= self.cluster.migration_limit {
            return Err(ApiError::Unavailable(format!(
                "{error} (the request moved {} times already, router.migration_limit)",
                self.migrations
            )));
        }
        self.migrations += 1;
        metrics::counter!("exo_migrations_total", "reason" => Lost::Decode.reason()).increment(1);
        tracing::warn!(request = %self.id, node = self.placement.decode.name(), tokens = self.output.len(), %error, "decode node lost mid-stream; resuming the request on other nodes");
        self.slot = None;
        let left = self
            .sampling
            .max_tokens
            .saturating_sub(self.output.len() as u32);
        let shape = RequestShape {
            prompt_tokens: u64::from(self.prompt_tokens) + self.output.len() as u64,
            output_tokens: self.cluster.expected_output(left),
        };
        let input = (&self.prompt, &self.sampling, &self.output[..]);
        let ids = (self.id, self.cluster.next_id());
        let model = self.model.clone();
        let leg = place_and_prefill(
            &self.cluster,
            &model,
            ids,
            input,
            shape,
            &mut self.migrations,
        )
        .await
        .map_err(|e| ApiError::Unavailable(format!("{error}; resuming elsewhere failed: {e}")))?;
        self.rpc_id = leg.rpc_id;
        self.decode_client = leg.decode_client;
        self.slot = Some(leg.slot);
        self.placement = leg.placement;
        self.last_progress = Instant::now();
        Ok(self.take_first(leg.reply))
    }

    /// Runs to the end and returns the whole text and why it ended.
    pub async fn collect(&mut self) -> Result<Collected, ApiError> {
        let mut out = Collected {
            text: String::new(),
            finish: FinishReason::Stop,
            logprobs: Vec::new(),
        };
        while let Some(delta) = self.next().await {
            let delta = delta?;
            out.text += &delta.text;
            out.logprobs.extend(delta.logprobs);
            if let Some(f) = delta.finish {
                out.finish = f;
            }
        }
        Ok(out)
    }
}

impl Generation {
    /// Frees the request's sequence on its decode node, on a task (best effort).
    fn cancel_on_node(&self) {
        let client = self.decode_client.clone();
        let id = self.rpc_id;
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async move {
                let _ = client.cancel(context_with_deadline(PING_TIMEOUT), id).await;
            });
        }
    }
}

impl Drop for Generation {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        // The client went away mid-request: free the sequence on the decode node.
        tracing::debug!(id = %self.id, "request dropped before the end; cancelling");
        self.cancel_on_node();
        self.remember(Outcome::Cancelled);
    }
}
