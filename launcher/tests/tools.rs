//! Tool calls through the HTTP API: a named `tool_choice` gives a valid call whose arguments match
//! the function's schema, streaming and not, split and colocated alike; a two-turn conversation
//! with a tool result renders and answers; malformed tools get 400.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use std::net::SocketAddr;

use common::{post, start_profile};
use serde_json::{Value, json};

fn weather_tool() -> Value {
    json!({
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": { "type": "string", "maxLength": 20 },
                    "unit": { "type": "string", "enum": ["celsius", "fahrenheit"] }
                },
                "required": ["city", "unit"],
                "additionalProperties": false
            }
        }
    })
}

fn check_arguments(args: &str) -> Result<(), String> {
    let v: Value = serde_json::from_str(args).map_err(|e| format!("arguments not JSON: {e}"))?;
    let o = v.as_object().ok_or("arguments not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["city", "unit"] {
        return Err(format!("keys {keys:?}"));
    }
    let city = o["city"].as_str().ok_or("city not a string")?;
    if city.chars().count() > 20 {
        return Err(format!("city too long: {city:?}"));
    }
    if !["celsius", "fahrenheit"].contains(&o["unit"].as_str().unwrap_or_default()) {
        return Err(format!("unit {}", o["unit"]));
    }
    Ok(())
}

/// Posts a streaming chat request and rebuilds (finish_reason, tool call name, arguments) from
/// the `delta.tool_calls` chunks, checking there is no content alongside.
async fn stream_call(addr: SocketAddr, body: &Value) -> (String, String, String, String) {
    let raw = reqwest::Client::new()
        .post(format!("http://{addr}/v1/chat/completions"))
        .json(body)
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let (mut finish, mut name, mut args, mut id) =
        (String::new(), String::new(), String::new(), String::new());
    let mut pieces = 0usize;
    for line in raw.lines().filter_map(|l| l.strip_prefix("data: ")) {
        if line == "[DONE]" {
            break;
        }
        let v: Value = serde_json::from_str(line).unwrap();
        let choice = &v["choices"][0];
        let delta = &choice["delta"];
        assert!(
            delta["content"].as_str().unwrap_or_default().is_empty(),
            "content streamed alongside a tool call: {line}"
        );
        if let Some(calls) = delta["tool_calls"].as_array() {
            let call = &calls[0];
            assert_eq!(call["index"], 0);
            if let Some(n) = call["function"]["name"].as_str() {
                name = n.to_string();
                id = call["id"].as_str().unwrap().to_string();
                assert_eq!(call["type"], "function");
            }
            let piece = call["function"]["arguments"].as_str().unwrap_or_default();
            pieces += usize::from(!piece.is_empty());
            args += piece;
        }
        if let Some(f) = choice["finish_reason"].as_str() {
            finish = f.to_string();
        }
    }
    // The arguments arrive as they are generated, not in one piece at the end.
    assert!(pieces > 3, "arguments came in {pieces} pieces: {args}");
    (finish, name, args, id)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn named_tool_calls_validate_split_and_colocated_and_conversations_continue() {
    let split = start_profile("local.toml").await;
    let colocated = start_profile("local-colocated.toml").await;
    let model = split.cluster.model_id();
    for (seed, temperature) in [(1u64, 0.0), (2, 0.8), (3, 0.8)] {
        let body = json!({
            "model": model,
            "messages": [{ "role": "user", "content": "What is the weather like in Lisbon?" }],
            "tools": [weather_tool()],
            "tool_choice": { "type": "function", "function": { "name": "get_weather" } },
            "max_tokens": 80,
            "temperature": temperature,
            "seed": seed,
        });
        let a = post(split.addr, "/v1/chat/completions", &body).await;
        let b = post(colocated.addr, "/v1/chat/completions", &body).await;
        assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
        let choice = &a.body["choices"][0];
        assert_eq!(choice["finish_reason"], "tool_calls", "{}", a.body);
        assert!(choice["message"]["content"].is_null(), "{}", a.body);
        let call = &choice["message"]["tool_calls"][0];
        assert_eq!(call["type"], "function");
        assert_eq!(call["function"]["name"], "get_weather");
        assert!(call["id"].as_str().unwrap().starts_with("call_"));
        let args = call["function"]["arguments"].as_str().unwrap();
        check_arguments(args).unwrap_or_else(|e| panic!("seed {seed}: {e}: {args}"));
        assert_eq!(
            args, b.body["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"],
            "seed {seed}: split and colocated differ"
        );

        // Streaming: the same call, as delta.tool_calls chunks.
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (finish, name, s_args, id) = stream_call(split.addr, &streamed).await;
        assert_eq!(
            (finish.as_str(), name.as_str()),
            ("tool_calls", "get_weather")
        );
        assert!(id.starts_with("call_"));
        assert_eq!(s_args, args, "seed {seed}: streamed arguments differ");
        let (_, _, c_args, _) = stream_call(colocated.addr, &streamed).await;
        assert_eq!(c_args, args);
    }

    // Second turn: the assistant's call and the tool's result render through the template, and
    // the model answers (with text, or another call: its judgement, not the mechanics, decides).
    let body = json!({
        "model": model,
        "messages": [
            { "role": "user", "content": "What is the weather like in Lisbon?" },
            { "role": "assistant", "content": null, "tool_calls": [{
                "id": "call_1", "type": "function",
                "function": { "name": "get_weather", "arguments": "{\"city\":\"Lisbon\",\"unit\":\"celsius\"}" } }] },
            { "role": "tool", "tool_call_id": "call_1", "content": "{\"temperature\": 21, \"sky\": \"clear\"}" }
        ],
        "tools": [weather_tool()],
        "max_tokens": 40,
        "temperature": 0,
    });
    for server in [&split, &colocated] {
        let r = post(server.addr, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, 200, "{}", r.body);
        let message = &r.body["choices"][0]["message"];
        assert!(
            !r.text.is_empty() || message["tool_calls"].is_array(),
            "{}",
            r.body
        );
        // The conversation was rendered with the tool list and both turns.
        assert!(
            r.body["usage"]["prompt_tokens"].as_u64().unwrap() > 100,
            "{}",
            r.body
        );
    }

    // As a new user writes a tool: no `additionalProperties`, no length bounds. The schema is read
    // strictly, so the call ends after the declared property; and a call cut by max_tokens comes
    // back as a call with finish_reason "length", never as the wrapper's text.
    let loose = json!({
        "type": "function",
        "function": {
            "name": "lookup",
            "parameters": { "type": "object", "properties": { "city": { "type": "string" } } },
        },
    });
    let ask = |max_tokens: u32| {
        json!({
            "model": model,
            "messages": [{ "role": "user", "content": "Look up Oslo." }],
            "tools": [loose],
            "tool_choice": { "type": "function", "function": { "name": "lookup" } },
            "max_tokens": max_tokens, "temperature": 0,
        })
    };
    let r = post(split.addr, "/v1/chat/completions", &ask(96)).await;
    let choice = &r.body["choices"][0];
    assert_eq!(choice["finish_reason"], "tool_calls", "{}", r.body);
    let args = choice["message"]["tool_calls"][0]["function"]["arguments"]
        .as_str()
        .unwrap();
    let args: Value = serde_json::from_str(args).unwrap();
    assert!(
        args.as_object().unwrap().keys().all(|k| k == "city"),
        "{args}"
    );
    let r = post(split.addr, "/v1/chat/completions", &ask(20)).await;
    let choice = &r.body["choices"][0];
    assert_eq!(choice["finish_reason"], "length", "{}", r.body);
    assert!(choice["message"]["content"].is_null(), "{}", r.body);
    assert_eq!(
        choice["message"]["tool_calls"][0]["function"]["name"], "lookup",
        "{}",
        r.body
    );

    // Malformed tools and choices: OpenAI's error body.
    let bad_bodies = [
        json!({ "tools": [{ "type": "function" }] }),
        json!({ "tools": [{ "type": "retrieval", "function": { "name": "x" } }] }),
        json!({ "tools": [{ "type": "function", "function": { "name": "has space" } }] }),
        json!({ "tools": [{ "type": "function", "function": { "name": "f", "parameters": [1] } }] }),
        json!({ "tools": [weather_tool()], "tool_choice": { "type": "function", "function": { "name": "nope" } } }),
        json!({ "tools": [weather_tool()], "tool_choice": "sometimes" }),
        json!({ "tool_choice": "required" }),
        json!({ "tools": [weather_tool()], "tool_choice": "required", "response_format": { "type": "json_object" } }),
        json!({ "messages": [{ "role": "assistant", "content": "x", "tool_calls": "call it" }] }),
    ];
    for extra in bad_bodies {
        let mut body = json!({
            "model": model,
            "messages": [{ "role": "user", "content": "hi" }],
            "max_tokens": 4,
        });
        body.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        let r = post(split.addr, "/v1/chat/completions", &body).await;
        assert_eq!(r.status, 400, "{extra}: {}", r.body);
        assert_eq!(
            r.body["error"]["type"], "invalid_request_error",
            "{}",
            r.body
        );
    }
    let r = post(
        split.addr,
        "/v1/completions",
        &json!({ "model": model, "prompt": "hi", "tools": [weather_tool()] }),
    )
    .await;
    assert_eq!(r.status, 400, "{}", r.body);

    // `parallel_tool_calls: true` lets a forced reply hold several calls (the model chooses how
    // many, each valid and split == colocated); `false` or unset keeps it to one.
    for parallel in [json!(true), json!(false)] {
        let body = json!({
            "model": model,
            "messages": [{ "role": "user", "content": "What is the weather in Lisbon and in Oslo?" }],
            "tools": [weather_tool()],
            "tool_choice": "required",
            "parallel_tool_calls": parallel,
            "max_tokens": 120,
            "temperature": 0,
        });
        let a = post(split.addr, "/v1/chat/completions", &body).await;
        let b = post(colocated.addr, "/v1/chat/completions", &body).await;
        assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
        let functions = |r: &common::Answer| -> Vec<Value> {
            let calls = r.body["choices"][0]["message"]["tool_calls"].as_array();
            calls
                .unwrap()
                .iter()
                .map(|c| c["function"].clone())
                .collect()
        };
        assert_eq!(functions(&a), functions(&b), "split and colocated differ");
        let calls = a.body["choices"][0]["message"]["tool_calls"]
            .as_array()
            .unwrap();
        let most = if parallel == json!(true) { 8 } else { 1 };
        assert!((1..=most).contains(&calls.len()), "{parallel}: {}", a.body);
        for call in calls {
            let args = call["function"]["arguments"].as_str().unwrap();
            check_arguments(args).unwrap_or_else(|e| panic!("{e}: {args}"));
        }
        eprintln!("parallel_tool_calls {parallel}: {} call(s)", calls.len());
    }
    split.shutdown().await;
    colocated.shutdown().await;
}
