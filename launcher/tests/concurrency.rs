//! Many users at once: concurrent streaming requests through the split cluster each get exactly the
//! text they get alone (batched decoding does not mix sequences).

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{post, start_profile};
use serde_json::json;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_concurrent_streams_match_their_solo_answers() {
    let server = start_profile("local.toml").await;
    let model = server.cluster.model_id();
    let topics = [
        "rivers",
        "volcanoes",
        "bread",
        "chess",
        "comets",
        "violins",
        "glaciers",
        "bees",
    ];
    let body = |t: &str| {
        json!({
            "model": model, "messages": [{ "role": "user", "content": format!("Tell me about {t}.") }],
            "max_tokens": 32, "temperature": 0, "stream": true,
        })
    };
    let mut solo = Vec::new();
    for t in topics {
        let a = post(server.addr, "/v1/chat/completions", &body(t)).await;
        assert_eq!(a.status, 200);
        solo.push(a.text);
    }
    let together = futures::future::join_all(topics.iter().map(|t| {
        let b = body(t);
        async move { post(server.addr, "/v1/chat/completions", &b).await }
    }))
    .await;
    for (i, a) in together.iter().enumerate() {
        assert_eq!(a.status, 200, "{}", a.body);
        assert_eq!(a.text, solo[i], "request {i} ({})", topics[i]);
    }
    server.shutdown().await;
}
