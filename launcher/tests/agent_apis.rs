//! The agent APIs over one split cluster: Anthropic Messages and OpenAI Responses give the same
//! text as chat completions for the same request and seed, stream with their own event sequences,
//! round-trip tool calls, and answer errors in their own shapes.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::start_profile;
use serde_json::{Value, json};

async fn post(base: &str, path: &str, body: &Value) -> (u16, String) {
    let resp = reqwest::Client::new()
        .post(format!("{base}{path}"))
        .json(body)
        .send()
        .await
        .unwrap();
    (resp.status().as_u16(), resp.text().await.unwrap())
}

/// The (event name, data) pairs of an SSE body.
fn sse_events(body: &str) -> Vec<(String, Value)> {
    body.split("\n\n")
        .filter_map(|frame| {
            let mut name = None;
            let mut data = None;
            for line in frame.lines() {
                if let Some(n) = line.strip_prefix("event: ") {
                    name = Some(n.to_string());
                } else if let Some(d) = line.strip_prefix("data: ") {
                    data = serde_json::from_str(d).ok();
                }
            }
            Some((name?, data?))
        })
        .collect()
}

/// The Responses API: the same text as the other two APIs for the same seed, streamed events,
/// a forced function call and its output, and a stored-response id refused.
async fn responses_api(base: &str, model: &str, text: &str) {
    let request = json!({
        "model": model, "max_output_tokens": 24, "temperature": 0.8, "seed": 7,
        "instructions": "You are terse.", "input": "Name three colours.",
    });
    let (status, body) = post(base, "/v1/responses", &request).await;
    assert_eq!(status, 200, "{body}");
    let r: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(r["object"], "response");
    assert!(r["id"].as_str().unwrap().starts_with("resp_"));
    // The request's parallel_tool_calls comes back: true by default, as OpenAI's does.
    assert_eq!(r["parallel_tool_calls"], true, "{r}");
    assert_eq!(r["output"][0]["content"][0]["text"], text, "{r}");
    let mut streamed = request.clone();
    streamed["stream"] = json!(true);
    let (_, body) = post(base, "/v1/responses", &streamed).await;
    let events = sse_events(&body);
    assert_eq!(events[0].0, "response.created");
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "response.output_text.delta")
        .map(|(_, d)| d["delta"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deltas, text);
    let (last, done) = events.last().unwrap();
    assert!(
        last == "response.completed" || last == "response.incomplete",
        "{last}"
    );
    assert_eq!(done["response"]["output"][0]["content"][0]["text"], text);
    let numbers: Vec<u64> = events
        .iter()
        .map(|(_, d)| d["sequence_number"].as_u64().unwrap())
        .collect();
    assert!(numbers.windows(2).all(|w| w[1] == w[0] + 1), "{numbers:?}");

    let tools = json!([{ "type": "function", "name": "get_weather", "parameters": weather_tool()[0]["input_schema"] }]);
    let ask = json!([{ "role": "user", "content": "What is the weather in Oslo?" }]);
    let call_request = json!({
        "model": model, "max_output_tokens": 48, "temperature": 0, "input": ask, "tools": tools,
        "tool_choice": { "type": "function", "name": "get_weather" },
    });
    let mut one_call = call_request.clone();
    one_call["parallel_tool_calls"] = json!(false);
    let (status, body) = post(base, "/v1/responses", &one_call).await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["parallel_tool_calls"], false, "{c}");
    let call = &c["output"][0];
    assert_eq!(call["type"], "function_call", "{c}");
    let args: Value = serde_json::from_str(call["arguments"].as_str().unwrap()).unwrap();
    assert!(args["city"].is_string(), "{c}");
    let follow_up = json!({
        "model": model, "max_output_tokens": 16, "temperature": 0, "tools": tools,
        "input": [
            ask[0],
            { "type": "function_call", "call_id": call["call_id"], "name": "get_weather", "arguments": call["arguments"] },
            { "type": "function_call_output", "call_id": call["call_id"], "output": "12 C and rain" },
        ],
    });
    let (status, body) = post(base, "/v1/responses", &follow_up).await;
    assert_eq!(status, 200, "{body}");

    let stored = json!({ "model": model, "input": "hi", "previous_response_id": "resp_1" });
    let (status, body) = post(base, "/v1/responses", &stored).await;
    assert_eq!(status, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["param"], "previous_response_id", "{e}");
}

/// `tool_choice: auto` on the default model: whatever it decides, the answer is consistent. A
/// reply in the model's tool syntax (ours, for its template) is a call with `content: null`,
/// never the wrapper's text; streamed and whole agree.
async fn auto_tools(base: &str, model: &str) {
    let tools = json!([{ "type": "function", "function": { "name": "get_weather", "parameters": weather_tool()[0]["input_schema"] } }]);
    for prompt in ["What is the weather in Oslo? Use the tool.", "Say hello."] {
        let body = json!({
            "model": model, "max_tokens": 64, "temperature": 0, "tools": tools,
            "messages": [{ "role": "user", "content": prompt }],
        });
        let (status, whole) = post(base, "/v1/chat/completions", &body).await;
        assert_eq!(status, 200, "{whole}");
        let whole: Value = serde_json::from_str(&whole).unwrap();
        let choice = &whole["choices"][0];
        let content = choice["message"]["content"].as_str().unwrap_or_default();
        assert!(!content.contains("\"tool_calls\""), "{whole}");
        if choice["finish_reason"] == "tool_calls" {
            assert!(choice["message"]["content"].is_null(), "{whole}");
            assert_eq!(
                choice["message"]["tool_calls"][0]["function"]["name"],
                "get_weather"
            );
        }
        let mut streamed = body.clone();
        streamed["stream"] = json!(true);
        let (_, sse) = post(base, "/v1/chat/completions", &streamed).await;
        let (mut text, mut args, mut finish) = (String::new(), String::new(), String::new());
        for line in sse.lines().filter_map(|l| l.strip_prefix("data: ")) {
            let Ok(chunk) = serde_json::from_str::<Value>(line) else {
                continue;
            };
            let delta = &chunk["choices"][0]["delta"];
            text += delta["content"].as_str().unwrap_or_default();
            if let Some(calls) = delta["tool_calls"].as_array() {
                args += calls[0]["function"]["arguments"]
                    .as_str()
                    .unwrap_or_default();
            }
            if let Some(f) = chunk["choices"][0]["finish_reason"].as_str() {
                finish = f.to_string();
            }
        }
        assert_eq!(
            finish,
            choice["finish_reason"].as_str().unwrap(),
            "{prompt}"
        );
        assert_eq!(text, content, "{prompt}");
        let whole_args = choice["message"]["tool_calls"][0]["function"]["arguments"]
            .as_str()
            .unwrap_or_default();
        assert_eq!(args, whole_args, "{prompt}");
    }
}

fn weather_tool() -> Value {
    json!([{
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": {
            "type": "object",
            "properties": { "city": { "type": "string", "maxLength": 20 } },
            "required": ["city"],
            "additionalProperties": false,
        },
    }])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_apis_match_chat_stream_their_events_and_round_trip_tools() {
    let server = start_profile("local.toml").await;
    let model = server.cluster.model_id();
    let base = format!("http://{}", server.addr);

    // The same request through both APIs gives the same text (seeded sampling, split placement).
    let question = "Name three colours.";
    let messages = json!({
        "model": model, "max_tokens": 24, "temperature": 0.8, "seed": 7,
        "system": "You are terse.",
        "messages": [{ "role": "user", "content": question }],
    });
    let (status, body) = post(&base, "/v1/messages", &messages).await;
    assert_eq!(status, 200, "{body}");
    let m: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(m["type"], "message");
    assert_eq!(m["role"], "assistant");
    assert!(m["id"].as_str().unwrap().starts_with("msg_"));
    assert!(["end_turn", "max_tokens"].contains(&m["stop_reason"].as_str().unwrap()));
    assert!(m["usage"]["input_tokens"].as_u64().unwrap() > 5);
    let text = m["content"][0]["text"].as_str().unwrap().to_string();
    let chat = json!({
        "model": model, "max_tokens": 24, "temperature": 0.8, "seed": 7,
        "messages": [{ "role": "system", "content": "You are terse." }, { "role": "user", "content": question }],
    });
    let (status, body) = post(&base, "/v1/chat/completions", &chat).await;
    assert_eq!(status, 200, "{body}");
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["choices"][0]["message"]["content"], text.as_str());
    assert_eq!(m["usage"]["output_tokens"], c["usage"]["completion_tokens"]);

    // Streamed: Anthropic's event sequence, and the same text.
    let mut streamed = messages.clone();
    streamed["stream"] = json!(true);
    let (status, body) = post(&base, "/v1/messages", &streamed).await;
    assert_eq!(status, 200, "{body}");
    let events = sse_events(&body);
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(
        names[..3],
        ["message_start", "ping", "content_block_start"],
        "{names:?}"
    );
    assert_eq!(
        names[names.len() - 3..],
        ["content_block_stop", "message_delta", "message_stop"],
        "{names:?}"
    );
    let deltas: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["text"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(deltas, text);
    let end = &events[events.len() - 2].1;
    assert_eq!(end["delta"]["stop_reason"], m["stop_reason"]);
    assert_eq!(end["usage"]["output_tokens"], m["usage"]["output_tokens"]);

    // A forced tool use, streamed: a tool_use block whose input_json_delta pieces join into the
    // input the whole reply gives.
    let tool_request = json!({
        "model": model, "max_tokens": 48, "temperature": 0,
        "tools": weather_tool(), "tool_choice": { "type": "tool", "name": "get_weather" },
        "messages": [{ "role": "user", "content": "What is the weather in Oslo?" }],
    });
    let (status, body) = post(&base, "/v1/messages", &tool_request).await;
    assert_eq!(status, 200, "{body}");
    let t: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(t["stop_reason"], "tool_use", "{t}");
    let call = &t["content"][0];
    assert_eq!(call["type"], "tool_use");
    assert_eq!(call["name"], "get_weather");
    assert!(call["input"]["city"].is_string(), "{t}");
    let mut streamed = tool_request.clone();
    streamed["stream"] = json!(true);
    let (_, body) = post(&base, "/v1/messages", &streamed).await;
    let events = sse_events(&body);
    let start = events
        .iter()
        .find(|(n, _)| n == "content_block_start")
        .unwrap();
    assert_eq!(start.1["content_block"]["type"], "tool_use");
    let json_text: String = events
        .iter()
        .filter(|(n, _)| n == "content_block_delta")
        .map(|(_, d)| d["delta"]["partial_json"].as_str().unwrap().to_string())
        .collect();
    assert_eq!(
        serde_json::from_str::<Value>(&json_text).unwrap(),
        call["input"]
    );

    // The round trip: the tool's result goes back, the model answers in text.
    let follow_up = json!({
        "model": model, "max_tokens": 24, "temperature": 0, "tools": weather_tool(),
        "messages": [
            { "role": "user", "content": "What is the weather in Oslo?" },
            { "role": "assistant", "content": [call.clone()] },
            { "role": "user", "content": [{ "type": "tool_result", "tool_use_id": call["id"], "content": "12 C and rain" }] },
        ],
    });
    let (status, body) = post(&base, "/v1/messages", &follow_up).await;
    assert_eq!(status, 200, "{body}");
    let f: Value = serde_json::from_str(&body).unwrap();
    assert!(
        f["content"].as_array().is_some_and(|c| !c.is_empty()),
        "{f}"
    );

    responses_api(&base, &model, &text).await;
    auto_tools(&base, &model).await;

    // Errors in Anthropic's shape.
    let missing = json!({ "model": model, "messages": [{ "role": "user", "content": "hi" }] });
    let (status, body) = post(&base, "/v1/messages", &missing).await;
    assert_eq!(status, 400);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["type"], "error");
    assert_eq!(e["error"]["type"], "invalid_request_error");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("max_tokens")
    );
    let image = json!({ "model": model, "max_tokens": 4, "messages": [{ "role": "user", "content": [{ "type": "image", "source": {} }] }] });
    let (status, body) = post(&base, "/v1/messages", &image).await;
    assert_eq!(status, 400, "{body}");
    // A stop sequence ends the reply: Anthropic names it, whole and streamed; OpenAI says `stop`.
    let capital = json!({ "model": model, "max_tokens": 24, "temperature": 0,
        "stop_sequences": ["nothing like this", "Paris"],
        "messages": [{ "role": "user", "content": "Tell me the capital of France." }] });
    let (status, body) = post(&base, "/v1/messages", &capital).await;
    assert_eq!(status, 200, "{body}");
    let s: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&s["stop_reason"], &s["stop_sequence"]),
        (&json!("stop_sequence"), &json!("Paris")),
        "{s}"
    );
    assert!(
        !s["content"][0]["text"].as_str().unwrap().contains("Paris"),
        "{s}"
    );
    let mut streamed_stop = capital.clone();
    streamed_stop["stream"] = json!(true);
    let (_, body) = post(&base, "/v1/messages", &streamed_stop).await;
    let delta = sse_events(&body)
        .into_iter()
        .find(|(n, _)| n == "message_delta")
        .unwrap()
        .1;
    assert_eq!(delta["delta"]["stop_sequence"], "Paris", "{delta}");
    let no_stop = json!({ "model": model, "max_tokens": 24, "temperature": 0,
        "messages": [{ "role": "user", "content": "Tell me the capital of France." }] });
    let (_, body) = post(&base, "/v1/messages", &no_stop).await;
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        (&e["stop_reason"], &e["stop_sequence"]),
        (&json!("end_turn"), &Value::Null),
        "{e}"
    );
    let chat_stop = json!({ "model": model, "max_tokens": 24, "temperature": 0, "stop": ["Paris"],
        "messages": [{ "role": "user", "content": "Tell me the capital of France." }] });
    let (_, body) = post(&base, "/v1/chat/completions", &chat_stop).await;
    let c: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(c["choices"][0]["finish_reason"], "stop", "{c}");

    // count_tokens: the input tokens the same Messages request used (no max_tokens needed).
    let mut count = messages.clone();
    count.as_object_mut().unwrap().remove("max_tokens");
    let (status, body) = post(&base, "/v1/messages/count_tokens", &count).await;
    assert_eq!(status, 200, "{body}");
    let n: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(n["input_tokens"], m["usage"]["input_tokens"], "{n}");
    let mut wrong = count.clone();
    wrong["model"] = json!("no-such-model");
    let (status, body) = post(&base, "/v1/messages/count_tokens", &wrong).await;
    assert_eq!(status, 400, "{body}");
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "invalid_request_error", "{e}");
    let (status, body) = post(&base, "/v1/messages/batches", &missing).await;
    assert_eq!(status, 404);
    let e: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(e["error"]["type"], "not_found_error", "{e}");
    server.shutdown().await;
}
