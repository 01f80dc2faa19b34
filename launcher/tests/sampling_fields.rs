//! The fields that change or report the distribution, end to end on the default model:
//! `logprobs` / `top_logprobs` (chat) and `logprobs: N` (completions) come from the real logits,
//! streamed and not, identical split and colocated; `logit_bias` and the penalties change what is
//! generated, identically split and colocated; what cannot be served is a 400 naming the field.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start_profile;
use serde_json::{Value, json};

async fn call(base: &str, path: &str, body: &Value) -> (u16, Value) {
    let r = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    let status = r.status().as_u16();
    let text = r.text().await.unwrap();
    if body["stream"] == json!(true) && status == 200 {
        // The chunks, as one JSON array.
        let chunks: Vec<Value> = text
            .lines()
            .filter_map(|l| l.strip_prefix("data: "))
            .filter_map(|d| serde_json::from_str(d).ok())
            .collect();
        return (status, Value::Array(chunks));
    }
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

fn chat(model: &str, content: &str, extra: Value) -> Value {
    let mut body = json!({
        "model": model, "max_tokens": 24, "temperature": 0,
        "messages": [{ "role": "user", "content": content }],
    });
    body.as_object_mut()
        .unwrap()
        .extend(extra.as_object().unwrap().clone());
    body
}

fn content(answer: &Value) -> String {
    answer["choices"][0]["message"]["content"]
        .as_str()
        .unwrap()
        .to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logprobs_bias_and_penalties_are_served_exactly_across_the_split() {
    let split = start_profile("local.toml").await;
    let colocated = start_profile("local-colocated.toml").await;
    let model = split.cluster.model_id();
    let (s, c) = (
        format!("http://{}", split.addr),
        format!("http://{}", colocated.addr),
    );
    let question = "What is the capital of France?";

    // Chat logprobs: one entry per token, the chosen token first among the alternatives when
    // greedy, and the same numbers whichever node chose each token.
    let body = chat(
        &model,
        question,
        json!({ "logprobs": true, "top_logprobs": 3 }),
    );
    let (status, a) = call(&s, "/v1/chat/completions", &body).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = call(&c, "/v1/chat/completions", &body).await;
    let lp = &a["choices"][0]["logprobs"]["content"];
    assert_eq!(
        lp, &b["choices"][0]["logprobs"]["content"],
        "split != colocated"
    );
    let tokens = lp.as_array().unwrap();
    assert_eq!(
        tokens.len() as u64,
        a["usage"]["completion_tokens"].as_u64().unwrap()
    );
    let mut bytes = Vec::new();
    for t in tokens {
        let logprob = t["logprob"].as_f64().unwrap();
        assert!(logprob <= 0.0, "{t}");
        let top = t["top_logprobs"].as_array().unwrap();
        assert_eq!(top.len(), 3, "{t}");
        assert_eq!(
            top[0]["token"], t["token"],
            "greedy chose the likeliest: {t}"
        );
        assert!(
            top.windows(2)
                .all(|w| w[0]["logprob"].as_f64() >= w[1]["logprob"].as_f64())
        );
        bytes.extend(
            t["bytes"]
                .as_array()
                .unwrap()
                .iter()
                .map(|b| b.as_u64().unwrap() as u8),
        );
    }
    assert_eq!(String::from_utf8(bytes).unwrap(), content(&a));

    // Streamed: the same entries, spread over the chunks.
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let (_, chunks) = call(&s, "/v1/chat/completions", &streamed).await;
    let from_chunks: Vec<Value> = chunks
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|ch| ch["choices"][0]["logprobs"]["content"].as_array().cloned())
        .flatten()
        .collect();
    assert_eq!(&Value::Array(from_chunks), lp);

    // Completions: tokens, their log probabilities, maps of 2 alternatives, offsets.
    let body = json!({ "model": model, "prompt": "The capital of France is", "max_tokens": 8,
                       "temperature": 0, "logprobs": 2 });
    let (status, a) = call(&s, "/v1/completions", &body).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = call(&c, "/v1/completions", &body).await;
    let lp = &a["choices"][0]["logprobs"];
    assert_eq!(lp, &b["choices"][0]["logprobs"]);
    let texts: Vec<&str> = lp["tokens"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t.as_str().unwrap())
        .collect();
    assert_eq!(texts.concat(), a["choices"][0]["text"].as_str().unwrap());
    assert_eq!(lp["token_logprobs"].as_array().unwrap().len(), texts.len());
    assert!(
        lp["top_logprobs"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m.as_object().unwrap().len() <= 2)
    );
    let offsets: Vec<u64> = lp["text_offset"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o.as_u64().unwrap())
        .collect();
    assert_eq!(offsets[0], 0);
    assert!(offsets.windows(2).all(|w| w[0] <= w[1]));

    // logit_bias: the token greedy decoding starts with, banned, gives another answer.
    let plain = content(
        &call(
            &s,
            "/v1/chat/completions",
            &chat(&model, question, json!({})),
        )
        .await
        .1,
    );
    let first = exo_test_support::model().tokenize(&plain, false)[0];
    let banned = chat(
        &model,
        question,
        json!({ "logit_bias": { first.to_string(): -100 } }),
    );
    let (status, a) = call(&s, "/v1/chat/completions", &banned).await;
    assert_eq!(status, 200, "{a}");
    let (_, b) = call(&c, "/v1/chat/completions", &banned).await;
    eprintln!("logit_bias: {plain:?} -> {:?}", content(&a));
    assert_ne!(content(&a), plain);
    assert_eq!(content(&a), content(&b));

    // Penalties: a prompt that invites repetition repeats less, split as colocated, greedy and
    // seeded.
    let ask = "Repeat the word cat twenty times.";
    let cats = |t: &str| t.matches("cat").count();
    let free = content(
        &call(
            &s,
            "/v1/chat/completions",
            &chat(&model, ask, json!({ "max_tokens": 40 })),
        )
        .await
        .1,
    );
    for sampling in [
        json!({ "temperature": 0 }),
        json!({ "temperature": 0.8, "seed": 11 }),
    ] {
        let mut extra = json!({ "max_tokens": 40, "frequency_penalty": 1.5, "presence_penalty": 0.5,
                                "repetition_penalty": 1.3 });
        extra
            .as_object_mut()
            .unwrap()
            .extend(sampling.as_object().unwrap().clone());
        let body = chat(&model, ask, extra);
        let (status, a) = call(&s, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{a}");
        let (_, b) = call(&c, "/v1/chat/completions", &body).await;
        assert_eq!(content(&a), content(&b), "{sampling}");
        eprintln!("penalties, {sampling}: {:?} -> {:?}", free, content(&a));
        if sampling["temperature"] == json!(0) {
            assert!(
                cats(&content(&a)) < cats(&free),
                "{free:?} -> {:?}",
                content(&a)
            );
        }
    }

    // What cannot be served says which field.
    let refused = [
        (
            chat(&model, question, json!({ "logit_bias": { "99999999": 1 } })),
            "logit_bias",
        ),
        (
            chat(&model, question, json!({ "presence_penalty": 2.5 })),
            "presence_penalty",
        ),
        (
            chat(&model, question, json!({ "top_logprobs": 2 })),
            "top_logprobs",
        ),
        (
            chat(
                &model,
                question,
                json!({ "logprobs": true, "tools": [{ "type": "function",
            "function": { "name": "f", "parameters": { "type": "object" } } }] }),
            ),
            "logprobs",
        ),
    ];
    for (body, field) in refused {
        let (status, e) = call(&s, "/v1/chat/completions", &body).await;
        assert_eq!(status, 400, "{field}: {e}");
        let message = e["error"]["message"].as_str().unwrap_or_default();
        let param = e["error"]["param"].as_str().unwrap_or_default();
        assert!(
            param == field || message.contains(field) || message.contains("token id"),
            "{field}: {e}"
        );
    }
    split.shutdown().await;
    colocated.shutdown().await;
}
