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

    responses_api(client, model, text, tools, ask)
    print(f"openai client check passed: {text!r}")
    return 0


def responses_api(client: OpenAI, model: str, text: str, chat_tools: list, ask: list) -> None:
    """The Responses API through `responses.create`: the chat answer's text, whole and streamed, a
    forced function call and its output sent back, a JSON schema, and `previous_response_id` refused."""
    question = "Tell me the capital of France."
    whole = client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0)
    assert whole.output_text == text, (whole.output_text, text)
    assert whole.usage.input_tokens > 0 and whole.usage.output_tokens > 0, whole.usage
    deltas, final = "", None
    for event in client.responses.create(model=model, input=question, max_output_tokens=24, temperature=0,
                                         stream=True):
        if event.type == "response.output_text.delta":
            deltas += event.delta
        elif event.type in ("response.completed", "response.incomplete"):
            final = event.response
    assert deltas == text and final is not None and final.output_text == text, (deltas, final)

    tools = [{"type": "function", **t["function"]} for t in chat_tools]
    choice = {"type": "function", "name": "get_weather"}
    called = client.responses.create(model=model, input=ask, tools=tools, tool_choice=choice, max_output_tokens=48,
                                     temperature=0)
    call = next(o for o in called.output if o.type == "function_call")
    assert call.name == "get_weather" and "city" in json.loads(call.arguments), called
    args = ""
    for event in client.responses.create(model=model, input=ask, tools=tools, tool_choice=choice,
                                         max_output_tokens=48, temperature=0, stream=True):
        if event.type == "response.function_call_arguments.delta":
            args += event.delta
    assert args == call.arguments, (args, call.arguments)
    answer = client.responses.create(
        model=model, tools=tools, max_output_tokens=24, temperature=0,
        input=ask + [
            {"type": "function_call", "call_id": call.call_id, "name": call.name, "arguments": call.arguments},
            {"type": "function_call_output", "call_id": call.call_id, "output": "12 C and rain"},
        ],
    )
    assert answer.output, answer

    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
    shaped = client.responses.create(model=model, input=question, max_output_tokens=48, temperature=0,
                                     text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    assert "city" in json.loads(shaped.output_text), shaped

    try:
        client.responses.create(model=model, input="hi", previous_response_id="resp_0")
        raise AssertionError("previous_response_id must be refused")
    except BadRequestError as e:
        assert e.status_code == 400


if __name__ == "__main__":
    sys.exit(main())
