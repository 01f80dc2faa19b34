"""Talks to a running exo-router with the official Anthropic Python client, unchanged, and checks the
answers: a message, its token count, the same message streamed, a forced tool use (whole and streamed), the tool's
result sent back, and an error.

Usage: python3 anthropic_client_check.py BASE_URL   (e.g. http://127.0.0.1:52415)
"""

import json
import sys
import urllib.request

from anthropic import Anthropic, BadRequestError


def main() -> int:
    base = sys.argv[1]
    client = Anthropic(base_url=base, api_key="unused")
    with urllib.request.urlopen(f"{base}/v1/models") as r:
        model = json.load(r)["data"][0]["id"]
    ask = [{"role": "user", "content": "Tell me the capital of France."}]
    # This SDK version has no typed `temperature`; the API still takes it (greedy, for equal answers).
    greedy = {"temperature": 0}

    msg = client.messages.create(model=model, max_tokens=24, extra_body=greedy, system="You are terse.", messages=ask)
    text = msg.content[0].text
    assert text and msg.stop_reason in ("end_turn", "max_tokens"), msg
    assert msg.usage.input_tokens > 0 and msg.usage.output_tokens > 0, msg.usage
    counted = client.messages.count_tokens(model=model, system="You are terse.", messages=ask)
    assert counted.input_tokens == msg.usage.input_tokens, (counted, msg.usage)

    with client.messages.stream(model=model, max_tokens=24, extra_body=greedy, system="You are terse.",
                                messages=ask) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == text, (streamed, text)
    assert final.usage.output_tokens == msg.usage.output_tokens, final.usage
    assert final.stop_reason == msg.stop_reason, final

    tools = [{
        "name": "get_weather",
        "description": "Current weather in a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string", "maxLength": 20}},
            "required": ["city"],
            "additionalProperties": False,
        },
    }]
    weather = [{"role": "user", "content": "What is the weather in Oslo?"}]
    choice = {"type": "tool", "name": "get_weather"}
    called = client.messages.create(model=model, max_tokens=48, extra_body=greedy, tools=tools, tool_choice=choice,
                                    messages=weather)
    use = next(b for b in called.content if b.type == "tool_use")
    assert called.stop_reason == "tool_use" and use.name == "get_weather", called
    assert isinstance(use.input.get("city"), str), use

    with client.messages.stream(model=model, max_tokens=48, extra_body=greedy, tools=tools, tool_choice=choice,
                                messages=weather) as stream:
        final = stream.get_final_message()
    streamed_use = next(b for b in final.content if b.type == "tool_use")
    assert streamed_use.input == use.input, (streamed_use, use)

    answer = client.messages.create(
        model=model, max_tokens=24, extra_body=greedy, tools=tools,
        messages=weather + [
            {"role": "assistant", "content": called.content},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "12 C and rain"}]},
        ],
    )
    assert answer.content, answer

    try:
        client.messages.create(model="no-such-model", max_tokens=4, messages=ask)
        raise AssertionError("an unknown model must be refused")
    except BadRequestError as e:
        assert e.status_code == 400

    print(f"official Anthropic client: {text!r}; tool call {use.name}({json.dumps(use.input)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
