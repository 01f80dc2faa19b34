//! The request fields that change the distribution or report it: `logit_bias`,
//! `presence_penalty`, `frequency_penalty`, `repetition_penalty` (applied by the node that
//! chooses each token, over the output so far), and `logprobs` / `top_logprobs` (each output
//! token's log probability and alternatives, reported from the same logits). Read here, checked,
//! and put into the request's [`SamplingParams`].

use exo_protocol::{MAX_LOGIT_BIAS, MAX_TOP_LOGPROBS, SamplingParams};
use serde::Deserialize;
use serde_json::Value;

use super::error::ApiError;

/// Most alternatives `/v1/completions` reports per token (OpenAI's limit there).
const MAX_COMPLETION_LOGPROBS: u64 = 5;

/// The fields, as a client sent them.
#[derive(Debug, Deserialize, Default)]
pub struct Adjustments {
    /// Chat: `true` to report log probabilities. Completions: how many alternatives (0 to 5).
    #[serde(default)]
    pub logprobs: Option<Value>,
    /// Chat: alternatives per token (0 to 20), with `logprobs: true`.
    #[serde(default)]
    pub top_logprobs: Option<Value>,
    /// Penalty on tokens the output already holds (-2 to 2).
    #[serde(default)]
    pub presence_penalty: Option<f64>,
    /// Penalty per occurrence in the output so far (-2 to 2).
    #[serde(default)]
    pub frequency_penalty: Option<f64>,
    /// llama.cpp's repetition penalty over the output so far (1: none; up to 10).
    #[serde(default)]
    pub repetition_penalty: Option<f64>,
    /// Token id (as a string) -> bias added to its logit (-100 to 100).
    #[serde(default)]
    pub logit_bias: Option<Value>,
}

/// Which API's meaning `logprobs` has.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogprobsField {
    /// `/v1/chat/completions`: a boolean, with `top_logprobs` for alternatives.
    Chat,
    /// `/v1/completions`: the number of alternatives.
    Completions,
}

fn number(
    field: &'static str,
    v: Option<f64>,
    default: f32,
    ok: impl Fn(f64) -> bool,
) -> Result<f32, ApiError> {
    match v {
        None => Ok(default),
        Some(x) if x.is_finite() && ok(x) => Ok(x as f32),
        Some(x) => Err(ApiError::bad(
            field,
            format!("{field} = {x} is out of range"),
        )),
    }
}

impl Adjustments {
    /// Checks the fields and writes them into `p`.
    pub fn apply(&self, api: LogprobsField, p: &mut SamplingParams) -> Result<(), ApiError> {
        let penalty = |x: f64| (-2.0..=2.0).contains(&x);
        p.presence_penalty = number("presence_penalty", self.presence_penalty, 0.0, penalty)?;
        p.frequency_penalty = number("frequency_penalty", self.frequency_penalty, 0.0, penalty)?;
        let repetition = |x: f64| x > 0.0 && x <= 10.0;
        p.repetition_penalty = number(
            "repetition_penalty",
            self.repetition_penalty,
            1.0,
            repetition,
        )?;
        p.logit_bias = self.logit_bias()?;
        p.logprobs = self.logprobs(api)?;
        Ok(())
    }

    fn logit_bias(&self) -> Result<Vec<(i32, f32)>, ApiError> {
        let bad = |m: String| ApiError::bad("logit_bias", m);
        let map = match &self.logit_bias {
            None | Some(Value::Null) => return Ok(Vec::new()),
            Some(Value::Object(m)) => m,
            Some(_) => return Err(bad("logit_bias must map token ids to numbers".into())),
        };
        if map.len() > MAX_LOGIT_BIAS {
            return Err(bad(format!("at most {MAX_LOGIT_BIAS} entries")));
        }
        let mut out = Vec::with_capacity(map.len());
        for (k, v) in map {
            let token = k
                .parse::<i32>()
                .ok()
                .filter(|t| *t >= 0)
                .ok_or_else(|| bad(format!("{k:?} is not a token id")))?;
            let bias = v
                .as_f64()
                .filter(|b| (-100.0..=100.0).contains(b))
                .ok_or_else(|| {
                    bad(format!(
                        "the bias of token {k} must be a number from -100 to 100"
                    ))
                })?;
            out.push((token, bias as f32));
        }
        // A fixed order, so every node applies the biases alike.
        out.sort_unstable_by_key(|&(t, _)| t);
        Ok(out)
    }

    fn logprobs(&self, api: LogprobsField) -> Result<Option<u8>, ApiError> {
        let count = |field: &'static str, v: &Value, max: u64| {
            v.as_u64()
                .filter(|n| *n <= max)
                .and_then(|n| u8::try_from(n).ok())
                .ok_or_else(|| {
                    ApiError::bad(field, format!("{field} must be an integer from 0 to {max}"))
                })
        };
        match api {
            LogprobsField::Chat => {
                let on = match &self.logprobs {
                    None | Some(Value::Null) | Some(Value::Bool(false)) => false,
                    Some(Value::Bool(true)) => true,
                    Some(_) => {
                        return Err(ApiError::bad("logprobs", "logprobs must be true or false"));
                    }
                };
                let top = match &self.top_logprobs {
                    None | Some(Value::Null) => 0,
                    Some(v) => count("top_logprobs", v, u64::from(MAX_TOP_LOGPROBS))?,
                };
                if top > 0 && !on {
                    return Err(ApiError::bad(
                        "top_logprobs",
                        "top_logprobs needs logprobs: true",
                    ));
                }
                Ok(on.then_some(top))
            }
            LogprobsField::Completions => {
                if self.top_logprobs.as_ref().is_some_and(|v| !v.is_null()) {
                    return Err(ApiError::bad(
                        "top_logprobs",
                        "top_logprobs is for /v1/chat/completions; use logprobs: N",
                    ));
                }
                match &self.logprobs {
                    None | Some(Value::Null) => Ok(None),
                    Some(v) => count("logprobs", v, MAX_COMPLETION_LOGPROBS).map(Some),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> Adjustments {
        serde_json::from_value(v).unwrap_or_default()
    }

    fn applied(v: Value, api: LogprobsField) -> Result<SamplingParams, ApiError> {
        let mut p = SamplingParams::default();
        parse(v).apply(api, &mut p).map(|()| p)
    }

    #[test]
    fn fields_are_read_into_the_sampling_parameters() {
        let p = applied(
            json!({ "presence_penalty": 0.5, "frequency_penalty": -1, "repetition_penalty": 1.3,
                    "logit_bias": { "42": 5, "7": -100 }, "logprobs": true, "top_logprobs": 3 }),
            LogprobsField::Chat,
        )
        .unwrap_or_default();
        assert_eq!(p.presence_penalty, 0.5);
        assert_eq!(p.frequency_penalty, -1.0);
        assert_eq!(p.repetition_penalty, 1.3);
        assert_eq!(p.logit_bias, vec![(7, -100.0), (42, 5.0)]);
        assert_eq!(p.logprobs, Some(3));
        let c = applied(json!({ "logprobs": 2 }), LogprobsField::Completions).unwrap_or_default();
        assert_eq!(c.logprobs, Some(2));
        let none = applied(json!({ "logprobs": false }), LogprobsField::Chat).unwrap_or_default();
        assert_eq!(none.logprobs, None);
        assert!(!none.adjusts_logits());
    }

    #[test]
    fn out_of_range_values_name_their_field() {
        let cases = [
            (
                json!({ "presence_penalty": 3 }),
                LogprobsField::Chat,
                "presence_penalty",
            ),
            (
                json!({ "frequency_penalty": -2.5 }),
                LogprobsField::Chat,
                "frequency_penalty",
            ),
            (
                json!({ "repetition_penalty": 0 }),
                LogprobsField::Chat,
                "repetition_penalty",
            ),
            (
                json!({ "logit_bias": { "x": 1 } }),
                LogprobsField::Chat,
                "logit_bias",
            ),
            (
                json!({ "logit_bias": { "5": 101 } }),
                LogprobsField::Chat,
                "logit_bias",
            ),
            (
                json!({ "logit_bias": [1, 2] }),
                LogprobsField::Chat,
                "logit_bias",
            ),
            (json!({ "logprobs": 3 }), LogprobsField::Chat, "logprobs"),
            (
                json!({ "top_logprobs": 2 }),
                LogprobsField::Chat,
                "top_logprobs",
            ),
            (
                json!({ "logprobs": true, "top_logprobs": 21 }),
                LogprobsField::Chat,
                "top_logprobs",
            ),
            (
                json!({ "logprobs": 6 }),
                LogprobsField::Completions,
                "logprobs",
            ),
            (
                json!({ "top_logprobs": 1 }),
                LogprobsField::Completions,
                "top_logprobs",
            ),
        ];
        for (body, api, field) in cases {
            match applied(body.clone(), api) {
                Err(ApiError::BadRequest { param, .. }) => assert_eq!(param, Some(field), "{body}"),
                other => panic!("{body}: {other:?}"),
            }
        }
    }
}
