//! `response_format` through the HTTP API: every answer parses and matches the schema, split and
//! colocated give the same text (the constraint survives the hand-off), bad schemas get 400.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod common;

use common::{post, start_profile};
use serde_json::{Value, json};

fn schema() -> Value {
    json!({
        "type": "object",
        "properties": {
            "city": { "type": "string", "maxLength": 24 },
            "population": { "type": "integer", "minimum": 0 },
            "tags": { "type": "array", "items": { "type": "string", "maxLength": 12 }, "maxItems": 3 }
        },
        "required": ["city", "population", "tags"],
        "additionalProperties": false
    })
}

/// The schema above, checked by hand: exactly these keys, these types, these bounds.
fn check(v: &Value) -> Result<(), String> {
    let o = v.as_object().ok_or("not an object")?;
    let mut keys: Vec<&str> = o.keys().map(String::as_str).collect();
    keys.sort_unstable();
    if keys != ["city", "population", "tags"] {
        return Err(format!("keys {keys:?}"));
    }
    let city = o["city"].as_str().ok_or("city is not a string")?;
    if city.chars().count() > 24 {
        return Err(format!("city too long: {city:?}"));
    }
    if o["population"].as_u64().is_none() {
        return Err("population is not a non-negative integer".into());
    }
    let tags = o["tags"].as_array().ok_or("tags is not an array")?;
    if tags.len() > 3 {
        return Err("more than 3 tags".into());
    }
    for t in tags {
        let t = t.as_str().ok_or("a tag is not a string")?;
        if t.chars().count() > 12 {
            return Err(format!("tag too long: {t:?}"));
        }
    }
    Ok(())
}

fn request(model: &str, seed: u64, format: &Value, stream: bool) -> Value {
    json!({
        "model": model,
        "messages": [{ "role": "user", "content": "Describe a city you like as JSON." }],
        "max_tokens": 160,
        "temperature": 0.8,
        "seed": seed,
        "stream": stream,
        "response_format": format,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_schema_output_validates_and_survives_the_hand_off() {
    let split = start_profile("local.toml").await;
    let colocated = start_profile("local-colocated.toml").await;
    let model = split.cluster.model_id();
    let format =
        json!({ "type": "json_schema", "json_schema": { "name": "city", "schema": schema() } });
    for seed in 1..=20u64 {
        let stream = seed % 2 == 0;
        let body = request(&model, seed, &format, stream);
        let a = post(split.addr, "/v1/chat/completions", &body).await;
        let b = post(colocated.addr, "/v1/chat/completions", &body).await;
        assert_eq!((a.status, b.status), (200, 200), "{} {}", a.body, b.body);
        assert_eq!(a.finish, "stop", "seed {seed}: {:?}", a.text);
        let v: Value = serde_json::from_str(&a.text)
            .unwrap_or_else(|e| panic!("seed {seed}: not JSON ({e}): {:?}", a.text));
        check(&v).unwrap_or_else(|e| panic!("seed {seed}: {e}: {}", a.text));
        assert_eq!(a.text, b.text, "seed {seed}: split and colocated differ");
        assert_eq!(
            (a.prefill_node.as_str(), a.decode_node.as_str()),
            ("prefill-0", "decode-0")
        );
    }

    // json_object: any object, also across the split. An open object can run past max_tokens
    // (finish "length", cut-off JSON, as OpenAI does too); every answer that stops is an object.
    let mut stopped = 0;
    for seed in 1..=4u64 {
        let mut body = request(&model, seed, &json!({ "type": "json_object" }), false);
        body["messages"][0]["content"] =
            json!("Reply with a JSON object with one key, ok, set to true.");
        let a = post(split.addr, "/v1/chat/completions", &body).await;
        assert_eq!(a.status, 200, "{}", a.body);
        if a.finish == "stop" {
            stopped += 1;
            let v: Value =
                serde_json::from_str(&a.text).unwrap_or_else(|e| panic!("{e}: {:?}", a.text));
            assert!(v.is_object(), "{}", a.text);
        } else {
            assert_eq!(a.finish, "length");
            assert!(a.text.trim_start().starts_with('{'), "{:?}", a.text);
        }
    }
    assert!(stopped > 0, "no json_object answer finished");

    // Bad formats: refused with OpenAI's error body, before or at the node.
    for bad in [
        json!({ "type": "json_schema" }),
        json!({ "type": "json_schema", "json_schema": { "schema": 5 } }),
        json!({ "type": "xml" }),
        json!({ "type": "json_schema", "json_schema": { "schema": { "type": "object", "properties": { "a": { "$ref": "#/nowhere" } }, "required": ["a"] } } }),
    ] {
        let r = post(
            split.addr,
            "/v1/chat/completions",
            &request(&model, 1, &bad, false),
        )
        .await;
        assert_eq!(r.status, 400, "{bad}: {}", r.body);
        assert_eq!(
            r.body["error"]["type"], "invalid_request_error",
            "{}",
            r.body
        );
    }
    split.shutdown().await;
    colocated.shutdown().await;
}
