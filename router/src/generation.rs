//! One request's life across the cluster: placement, prefill, then the token stream from the decode node.

use std::sync::Arc;
use std::time::{Duration, Instant};

use exo_protocol::{
    FinishReason, Handoff, NodeInfo, NodeServiceClient, PrefillReply, PrefillRequest, Prompt,
    RequestId, SamplingParams, context_with_deadline,
};
use tarpc::client::RpcError;

use crate::api::error::ApiError;
use crate::cluster::{Admission, Cluster, ClusterNode, Placement, SlotPermit};
use crate::placement::RequestShape;

/// Deadline of a prefill call: long prompts on slow machines legitimately take minutes.
const PREFILL_TIMEOUT: Duration = Duration::from_secs(600);
/// How long one poll waits on the decode node for output.
const POLL_WAIT_MS: u32 = 1000;
/// Deadline of one poll call.
const POLL_TIMEOUT: Duration = Duration::from_secs(30);
/// Deadline of the liveness check on the decode node.
const PING_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the decode node is checked while a split request's prompt runs.
const PING_INTERVAL: Duration = Duration::from_secs(1);
/// Longest a request waits for a sequence slot on its decode node before its prompt runs.
const SLOT_WAIT: Duration = Duration::from_secs(60);

/// Text that became final, and whether the request ended with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delta {
    /// New text (may be empty when only the finish is reported).
    pub text: String,
    /// Set on the last delta.
    pub finish: Option<FinishReason>,
}

/// A running request. Dropping it before the end cancels the request on its decode node.
pub struct Generation {
    id: RequestId,
    placement: Placement,
    _admission: Admission,
    started: Instant,
    first_at: Instant,
    decode_client: NodeServiceClient,
    first: Option<Delta>,
    done: bool,
    /// The decode slot this request holds until it is dropped.
    _slot: SlotPermit,
    /// When the decode node last produced output (or the request started on it).
    last_progress: Instant,
    /// Longest the decode node may go without output before the request fails (504).
    progress_timeout: Duration,
    /// Prompt tokens.
    pub prompt_tokens: u32,
    /// Tokens generated so far.
    pub completion_tokens: u32,
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

/// Runs the prompt on the prefill node. A split request also watches the decode node while the
/// prompt runs (`hello` every [`PING_INTERVAL`]): the two legs fail together, so a decode node that
/// dies or stops answering fails the request at once with 503 (dropping the prefill call cancels it
/// on the prefill node) instead of after the prompt.
async fn run_prefill(
    placement: &Placement,
    prefill_client: &NodeServiceClient,
    decode_client: &NodeServiceClient,
    request: PrefillRequest,
) -> Result<PrefillReply, ApiError> {
    let prefill = async {
        let reply = prefill_client
            .prefill(context_with_deadline(PREFILL_TIMEOUT), request)
            .await;
        Ok(reply.map_err(|e| rpc_failure(&placement.prefill, e))??)
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
            match ping {
                Err(e) => return unreachable_node(&placement.decode, &e),
                Ok(NodeInfo {
                    fault: Some(fault), ..
                }) => return node_down(&placement.decode, format!("cannot serve: {fault}")),
                Ok(_) => {}
            }
            tokio::time::sleep(PING_INTERVAL).await;
        }
    };
    tokio::select! {
        reply = prefill => reply,
        gone = decode_gone => Err(gone),
    }
}

impl Generation {
    /// Places request `id`, runs its prompt, and returns once output token 0 is known.
    pub async fn start(
        cluster: &Arc<Cluster>,
        id: RequestId,
        prompt: Prompt,
        sampling: SamplingParams,
    ) -> Result<Generation, ApiError> {
        let admission = cluster.admit()?;
        let started = Instant::now();
        let chars = prompt_chars(&prompt);
        let shape = RequestShape {
            prompt_tokens: cluster.estimate_tokens(chars),
            output_tokens: cluster.expected_output(sampling.max_tokens),
        };
        let mut placement = cluster.place(shape)?;
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
            decode_addr: placement.decode.addr.clone(),
            codec: placement.codec,
            chunk_size: cluster.kv.chunk_size,
            context_limit: placement
                .decode
                .info()
                .map_or(u32::MAX, |i| i.layout.n_ctx_seq),
        });
        let request = PrefillRequest {
            id,
            prompt,
            sampling,
            handoff,
        };
        let reply = run_prefill(&placement, &prefill_client, &decode_client, request).await;
        placement.prefill_load = None;
        let reply = reply?;
        cluster.observe_prompt(chars, reply.n_prompt);
        let first_at = Instant::now();
        metrics::histogram!("exo_time_to_first_token_seconds")
            .record((first_at - started).as_secs_f64());
        let produced = !(reply.finish == Some(FinishReason::Stop) && reply.first_text.is_empty());
        Ok(Generation {
            id,
            _admission: admission,
            started,
            first_at,
            decode_client,
            first: Some(Delta {
                text: reply.first_text,
                finish: reply.finish,
            }),
            done: false,
            _slot: slot,
            last_progress: Instant::now(),
            progress_timeout: cluster.progress_timeout,
            prompt_tokens: reply.n_prompt,
            completion_tokens: u32::from(produced),
            placement,
        })
    }

    /// Name of the node that ran the prompt.
    pub fn prefill_node(&self) -> &str {
        self.placement.prefill.name()
    }

    /// Name of the node that generates.
    pub fn decode_node(&self) -> &str {
        self.placement.decode.name()
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

    /// The next piece of output; `None` after the last.
    pub async fn next(&mut self) -> Option<Result<Delta, ApiError>> {
        let item = self.advance().await;
        if self.done
            && matches!(
                item,
                Some(Ok(Delta {
                    finish: Some(_),
                    ..
                }))
            )
        {
            self.record_end();
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
                .poll(context_with_deadline(POLL_TIMEOUT), self.id, POLL_WAIT_MS)
                .await;
            let reply = match polled {
                Ok(Ok(r)) => r,
                Ok(Err(e)) => {
                    self.done = true;
                    return Some(Err(e.into()));
                }
                Err(e) => {
                    self.done = true;
                    return Some(Err(rpc_failure(&self.placement.decode, e)));
                }
            };
            self.completion_tokens += reply.n_tokens;
            self.done = reply.finish.is_some();
            if reply.n_tokens > 0 || self.done {
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
            if !reply.text.is_empty() || reply.finish.is_some() {
                return Some(Ok(Delta {
                    text: reply.text,
                    finish: reply.finish,
                }));
            }
        }
        None
    }

    /// Runs to the end and returns the whole text and why it ended.
    pub async fn collect(&mut self) -> Result<(String, FinishReason), ApiError> {
        let mut text = String::new();
        let mut finish = FinishReason::Stop;
        while let Some(delta) = self.next().await {
            let delta = delta?;
            text += &delta.text;
            if let Some(f) = delta.finish {
                finish = f;
            }
        }
        Ok((text, finish))
    }
}

impl Generation {
    /// Frees the request's sequence on its decode node, on a task (best effort).
    fn cancel_on_node(&self) {
        let client = self.decode_client.clone();
        let id = self.id;
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
    }
}
