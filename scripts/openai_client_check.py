"""Talks to a running exo-router with the official OpenAI Python client, unchanged, and checks the answers.

Usage: python3 openai_client_check.py BASE_URL   (e.g. http://127.0.0.1:52415/v1)
"""

import json
import sys

from openai import BadRequestError, OpenAI


def main() -> int:
    client = OpenAI(base_url=sys.argv[1], api_key="unused")
    model = client.models.list().data[0].id
    msgs = [{"role": "user", "content": "Tell me the capital of France."}]

    raw = client.chat.completions.with_raw_response.create(model=model, messages=msgs, max_tokens=24, temperature=0)
    assert raw.headers.get("x-exo-prefill-node") and raw.headers.get("x-exo-decode-node"), raw.headers
    whole = raw.parse()
    text = whole.choices[0].message.content
    assert text and whole.choices[0].finish_reason in ("stop", "length"), whole
    assert whole.usage.prompt_tokens > 0 and whole.usage.completion_tokens > 0, whole.usage

    stream = client.chat.completions.create(
        model=model, messages=msgs, max_tokens=24, temperature=0, stream=True, stream_options={"include_usage": True}
    )
    streamed, usage = "", None
    for chunk in stream:
        usage = chunk.usage or usage
        if chunk.choices:
            streamed += chunk.choices[0].delta.content or ""
    assert streamed == text, (streamed, text)
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens, usage

    completion = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0)
    pieces = client.completions.create(model=model, prompt="Once upon a time", max_tokens=12, temperature=0, stream=True)
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text

    try:
        client.chat.completions.create(model="no-such-model", messages=msgs)
        raise AssertionError("an unknown model must be refused")
    except BadRequestError as e:
        assert e.status_code == 400

    # Tools, as agent frameworks send them: a named call, whole and streamed.
    tools = [{
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string", "maxLength": 20}},
                "required": ["city"],
            },
        },
    }]
    ask = [{"role": "user", "content": "What is the weather in Oslo?"}]
    choice = {"type": "function", "function": {"name": "get_weather"}}
    called = client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=choice,
                                            max_tokens=48, temperature=0)
    call = called.choices[0].message.tool_calls[0]
    assert called.choices[0].finish_reason == "tool_calls", called
    assert call.function.name == "get_weather" and "city" in json.loads(call.function.arguments), call
    args = ""
    for chunk in client.chat.completions.create(model=model, messages=ask, tools=tools, tool_choice=choice,
                                                max_tokens=48, temperature=0, stream=True):
        for d in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
            args += d.function.arguments or ""
    assert args == call.function.arguments, (args, call.function.arguments)

    # Structured output.
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}}}
    shaped = client.chat.completions.create(model=model, messages=msgs, response_format=fmt, max_tokens=48, temperature=0)
    assert "city" in json.loads(shaped.choices[0].message.content), shaped

    print(f"openai client check passed: {text!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
