//! The decode node with the real model: chunks arriving out of order are reordered, bad chunks, a
//! refused header, an early end and the prefill node's abort fail the request at once, and a
//! transfer for a cancelled request is refused.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::sync::Arc;
use std::time::Duration;

use exo_decode_node::{DecodeNode, DecodeTimeouts, LinkId};

/// The connection the test's transfers arrive on.
const LINK: LinkId = LinkId(1);
use exo_kvcache::{Codec, DecodeLimits, KvEncoder, KvLayout};
use exo_protocol::{FinishReason, KvBegin, KvEnd, KvFrame, NodeError, RequestId, SamplingParams};

use exo_test_support::{context, model};

async fn collect(node: &DecodeNode, id: u64) -> Result<(String, FinishReason), NodeError> {
    let mut text = String::new();
    loop {
        let r = node
            .poll(RequestId(u128::from(id)), Duration::from_millis(500), LINK)
            .await?;
        text += &r.text;
        if let Some(f) = r.finish {
            return Ok((text, f));
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reordered_chunks_decode_like_the_original_and_faults_fail_the_request() {
    let model = model();
    let layout = KvLayout {
        n_seq_max: 2,
        ..KvLayout::default()
    };
    let src = context(KvLayout {
        n_seq_max: 1,
        ..layout
    });
    let dst = context(layout);
    let node = DecodeNode::new(
        "test",
        dst,
        DecodeLimits::default(),
        DecodeTimeouts::default(),
    );
    let tokens = model.tokenize(
        &"The history of the lighthouse at the harbour entrance. ".repeat(20),
        true,
    );
    let sampling = SamplingParams {
        temperature: 0.7,
        seed: 11,
        max_tokens: 24,
        ..SamplingParams::default()
    };
    let pre = src
        .prefill(0, tokens.clone(), sampling.clone())
        .await
        .unwrap();
    let kv = src.export(0).await.unwrap();
    let reference = src
        .generate(0, pre.first_token, 0, sampling.clone())
        .await
        .unwrap();
    let first_text = String::from_utf8_lossy(&model.token_bytes(pre.first_token)).into_owned();

    let spec = src.transfer_header(0, kv.tokens.clone(), Codec::Lz4, 512 << 10);
    let (header, chunks, end_frame) = KvEncoder::whole(spec, &kv.state).unwrap();
    let begin = |id: u64, header: Vec<u8>| KvBegin {
        id: RequestId(u128::from(id)),
        header,
        sampling: sampling.clone(),
    };
    let end = |id: u64| KvEnd {
        id: RequestId(u128::from(id)),
        frame: end_frame.clone(),
        first_token: pre.first_token,
        index: 0,
    };

    // Chunks in reverse order within the reorder window: same text as never moving.
    assert!(
        chunks.len() > 3 && chunks.len() <= 16,
        "{} chunks",
        chunks.len()
    );
    node.kv_begin(begin(1, header.clone()), LINK).unwrap();
    // Another connection cannot write into (or end) this transfer, even knowing its id.
    let other = LinkId(2);
    let frame = KvFrame {
        id: RequestId(1),
        bytes: chunks[0].clone(),
    };
    assert_eq!(
        node.kv_chunk(frame, other).await,
        Err(NodeError::UnknownRequest(RequestId(1)))
    );
    assert_eq!(
        node.kv_end(end(1), other),
        Err(NodeError::UnknownRequest(RequestId(1)))
    );
    for bytes in chunks.iter().rev() {
        node.kv_chunk(
            KvFrame {
                id: RequestId(1),
                bytes: bytes.clone(),
            },
            LINK,
        )
        .await
        .unwrap();
    }
    node.kv_end(end(1), LINK).unwrap();
    let (text, finish) = collect(&node, 1).await.unwrap();
    assert_eq!(first_text + &text, reference.text);
    assert_eq!(finish, reference.finish);

    // A corrupted chunk fails the request with a transfer error; the node keeps serving.
    node.kv_begin(begin(2, header.clone()), LINK).unwrap();
    let mut bad = chunks[0].clone();
    let n = bad.len();
    bad[n - 1] ^= 1;
    assert!(matches!(
        node.kv_chunk(
            KvFrame {
                id: RequestId(2),
                bytes: bad
            },
            LINK
        )
        .await,
        Err(NodeError::Transfer(_))
    ));
    assert!(matches!(
        collect(&node, 2).await,
        Err(NodeError::Transfer(_))
    ));

    // A transfer for a request cancelled before it began is refused.
    node.cancel(RequestId(3), LINK);
    assert!(matches!(
        node.kv_begin(begin(3, header.clone()), LINK),
        Err(NodeError::UnknownRequest(RequestId(3)))
    ));

    // A header the node refuses fails the request at once: the first poll says why, rather than
    // "transfer timed out" a minute later.
    let mut bad_header = header.clone();
    let n = bad_header.len();
    bad_header[n - 1] ^= 1;
    assert!(matches!(
        node.kv_begin(begin(5, bad_header), LINK),
        Err(NodeError::Transfer(_))
    ));
    let refused = node.poll(RequestId(5), Duration::from_secs(30), LINK).await;
    assert!(
        matches!(refused, Err(NodeError::Transfer(_))),
        "{refused:?}"
    );

    // The prefill node gives up mid-transfer, or before sending anything: the request fails with
    // the prefill node's reason.
    node.kv_begin(begin(6, header.clone()), LINK).unwrap();
    node.kv_chunk(
        KvFrame {
            id: RequestId(6),
            bytes: chunks[0].clone(),
        },
        LINK,
    )
    .await
    .unwrap();
    for id in [6u64, 7] {
        node.kv_abort(RequestId(u128::from(id)), "the link broke".into());
        let aborted = node
            .poll(RequestId(u128::from(id)), Duration::from_secs(30), LINK)
            .await;
        assert_eq!(aborted, Err(NodeError::Transfer("the link broke".into())));
    }

    // Polling first, then the transfer, works too; an abort that arrives after the last chunk
    // changes nothing.
    let poller = {
        let node = Arc::clone(&node);
        tokio::spawn(async move { collect(&node, 4).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    node.kv_begin(begin(4, header.clone()), LINK).unwrap();
    for bytes in chunks.clone() {
        node.kv_chunk(
            KvFrame {
                id: RequestId(4),
                bytes,
            },
            LINK,
        )
        .await
        .unwrap();
    }
    node.kv_end(end(4), LINK).unwrap();
    node.kv_abort(RequestId(4), "too late".into());
    let (again, _) = poller.await.unwrap().unwrap();
    assert_eq!(again, text);

    // An end frame before the last chunk fails the request: the transfer is incomplete.
    node.kv_begin(begin(8, header.clone()), LINK).unwrap();
    node.kv_chunk(
        KvFrame {
            id: RequestId(8),
            bytes: chunks[0].clone(),
        },
        LINK,
    )
    .await
    .unwrap();
    node.kv_end(end(8), LINK).unwrap();
    let early = node.poll(RequestId(8), Duration::from_secs(30), LINK).await;
    assert!(matches!(early, Err(NodeError::Transfer(_))), "{early:?}");
    assert_eq!(node.active_requests(), 0);
}

/// Made-up ids and oversized promises cannot grow a node without bound: polls for unknown ids
/// stop making entries at the node's request limit, and transfers stop being admitted once
/// their declared caches fill the node's budget, until failed transfers give their share back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_ids_and_large_transfers_are_bounded() {
    let layout = KvLayout {
        n_seq_max: 2,
        ..KvLayout::default()
    };
    let dst = context(layout);
    let limits = DecodeLimits::for_context(dst.shape(), layout.n_ctx_seq, None);
    assert!(limits.max_state_bytes < DecodeLimits::default().max_state_bytes);
    let header = dst
        .transfer_header(
            0,
            vec![1; layout.n_ctx_seq as usize - 1],
            Codec::None,
            1 << 20,
        )
        .encode();
    let node = DecodeNode::new("bounds", dst, limits, DecodeTimeouts::default());

    let limit = 2 * exo_decode_node::REQUESTS_PER_SLOT + exo_decode_node::EXTRA_REQUESTS;
    let id = |n: usize| RequestId(0xdead_0000 + n as u128);
    for n in 0..limit {
        node.poll(id(n), Duration::ZERO, LINK).await.unwrap();
    }
    assert_eq!(
        node.poll(id(limit), Duration::ZERO, LINK).await,
        Err(NodeError::Busy)
    );
    // Only the connection that polls a request may poll or cancel it.
    let other = LinkId(9);
    assert_eq!(
        node.poll(id(0), Duration::ZERO, other).await,
        Err(NodeError::UnknownRequest(id(0)))
    );
    node.cancel(id(0), other);
    assert_eq!(node.active_requests(), limit);
    for n in 0..limit {
        node.cancel(id(n), LINK);
    }
    assert_eq!(node.active_requests(), 0);

    // Each transfer promises a whole sequence's cache: two per slot fit, the next is refused.
    let begin = |n: usize| KvBegin {
        id: RequestId(0xbeef_0000 + n as u128),
        header: header.clone(),
        sampling: SamplingParams::default(),
    };
    for n in 0..4 {
        node.kv_begin(begin(n), LINK).unwrap();
    }
    assert_eq!(node.kv_begin(begin(4), LINK), Err(NodeError::Busy));
    // A failed transfer gives its share back.
    node.kv_abort(begin(0).id, "gone".into());
    node.kv_begin(begin(5), LINK).unwrap();
}

/// A prompt that runs longer than the idle timeout keeps its transfer: the router polls only once
/// the first token is out, so an unpolled transfer in progress is not idle.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transfer_outlasting_the_idle_timeout_is_kept_until_polled() {
    let model = model();
    let layout = KvLayout::default();
    let src = context(layout);
    let timeouts = DecodeTimeouts {
        idle: Duration::from_secs(1),
        ..DecodeTimeouts::default()
    };
    let node = DecodeNode::new("idle", context(layout), DecodeLimits::default(), timeouts);
    tokio::spawn(Arc::clone(&node).run_reaper());
    let tokens = model.tokenize("The lighthouse keeper wrote in his log that night.", true);
    let sampling = SamplingParams::greedy(8);
    let pre = src.prefill(0, tokens, sampling.clone()).await.unwrap();
    let kv = src.export(0).await.unwrap();
    let spec = src.transfer_header(0, kv.tokens.clone(), Codec::None, 1 << 20);
    let (header, chunks, end_frame) = KvEncoder::whole(spec, &kv.state).unwrap();
    let id = RequestId(77);
    node.kv_begin(
        KvBegin {
            id,
            header,
            sampling,
        },
        LINK,
    )
    .unwrap();
    // The prompt "runs" for longer than the idle timeout, the reaper ticking meanwhile.
    tokio::time::sleep(Duration::from_millis(2500)).await;
    for bytes in chunks {
        node.kv_chunk(KvFrame { id, bytes }, LINK).await.unwrap();
    }
    let end = KvEnd {
        id,
        frame: end_frame,
        first_token: pre.first_token,
        index: 0,
    };
    node.kv_end(end, LINK).unwrap();
    let (_, finish) = collect(&node, 77).await.unwrap();
    assert!(matches!(finish, FinishReason::Stop | FinishReason::Length));
}
