"""Drives the official OpenAI and Anthropic Python SDKs against the Trimtab LLM gateway.

Usage: llm_sdks.py openai|anthropic PORT EXPECTED_PROVIDER_NAME
Plain, streaming, tool calls (plain and streaming) and a tool result round trip; exits
non-zero with a message on the first mismatch. Called by tests/llm_sdks.rs.
"""
import json
import sys

TOOL_ARGS = {"city": "Paris", "unit": "celsius"}


def check(cond, what):
    if not cond:
        print(f"FAIL: {what}", file=sys.stderr)
        sys.exit(1)


def openai_app(port, provider):
    import openai

    client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="app-key", max_retries=0)
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Weather in Paris?"}]
    tools = [{"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
              "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]

    raw = client.chat.completions.with_raw_response.create(model="app-model", messages=messages, max_tokens=50)
    check(raw.headers.get("x-trimtab-provider") == provider, f"provider header {raw.headers.get('x-trimtab-provider')}")
    r = raw.parse()
    check(r.choices[0].message.content.startswith("Hello from"), f"plain content {r.choices[0].message.content!r}")
    check(r.choices[0].finish_reason == "stop", f"finish_reason {r.choices[0].finish_reason}")
    check(r.usage.completion_tokens > 0, "usage")

    text, finish, usage = "", None, None
    for chunk in client.chat.completions.create(model="app-model", messages=messages, stream=True,
                                                stream_options={"include_usage": True}):
        if chunk.usage:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check(text.startswith("Hello from"), f"stream text {text!r}")
    check(finish == "stop", f"stream finish {finish}")
    check(usage is not None and usage.completion_tokens > 0, "stream usage")

    r = client.chat.completions.create(model="app-model", messages=messages, tools=tools)
    call = r.choices[0].message.tool_calls[0]
    check(r.choices[0].finish_reason == "tool_calls", f"tool finish {r.choices[0].finish_reason}")
    check(call.function.name == "get_weather" and json.loads(call.function.arguments) == TOOL_ARGS,
          f"tool call {call}")

    args, name, call_id = "", None, None
    for chunk in client.chat.completions.create(model="app-model", messages=messages, tools=tools, stream=True):
        for c in chunk.choices:
            for tc in c.delta.tool_calls or []:
                name = tc.function.name or name
                call_id = tc.id or call_id
                args += tc.function.arguments or ""
    check(name == "get_weather" and json.loads(args) == TOOL_ARGS and call_id, f"stream tool call {name} {args}")

    follow = messages + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": call.id, "type": "function", "function": {"name": "get_weather", "arguments": call.function.arguments}}]},
        {"role": "tool", "tool_call_id": call.id, "content": "18 degrees"},
    ]
    r = client.chat.completions.create(model="app-model", messages=follow, tools=tools)
    check("read the tool result" in (r.choices[0].message.content or ""), f"tool result turn {r.choices[0].message}")

    try:
        client.chat.completions.create(model="app-model", messages=[{"role": "user", "content": 42}])
        check(False, "a bad request was accepted")
    except openai.BadRequestError as e:
        check("messages[0]" in str(e), f"400 names the field: {e}")


def anthropic_app(port, provider):
    import anthropic

    client = anthropic.Anthropic(base_url=f"http://127.0.0.1:{port}", api_key="app-key", max_retries=0)
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    tools = [{"name": "get_weather", "description": "Weather of a city",
              "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}]

    raw = client.messages.with_raw_response.create(model="app-model", max_tokens=50, system="Be terse.",
                                                   messages=messages)
    check(raw.headers.get("x-trimtab-provider") == provider, f"provider header {raw.headers.get('x-trimtab-provider')}")
    r = raw.parse()
    check(r.content[0].type == "text" and r.content[0].text.startswith("Hello from"), f"plain {r.content}")
    check(r.stop_reason == "end_turn", f"stop_reason {r.stop_reason}")
    check(r.usage.output_tokens > 0, "usage")

    with client.messages.stream(model="app-model", max_tokens=50, messages=messages) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    check(text.startswith("Hello from"), f"stream text {text!r}")
    check(final.stop_reason == "end_turn" and final.usage.output_tokens > 0, f"stream final {final}")

    r = client.messages.create(model="app-model", max_tokens=50, messages=messages, tools=tools)
    use = [b for b in r.content if b.type == "tool_use"][0]
    check(r.stop_reason == "tool_use" and use.name == "get_weather" and use.input == TOOL_ARGS, f"tool use {r}")

    with client.messages.stream(model="app-model", max_tokens=50, messages=messages, tools=tools) as s:
        final = s.get_final_message()
    use_s = [b for b in final.content if b.type == "tool_use"][0]
    check(final.stop_reason == "tool_use" and use_s.input == TOOL_ARGS, f"stream tool use {final}")

    follow = messages + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": use.id, "name": use.name, "input": use.input}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18 degrees"}]},
    ]
    r = client.messages.create(model="app-model", max_tokens=50, messages=follow, tools=tools)
    check("read the tool result" in r.content[0].text, f"tool result turn {r.content}")

    try:
        client.messages.create(model="app-model", max_tokens=50, messages="not a list")
        check(False, "a bad request was accepted")
    except anthropic.BadRequestError as e:
        check("messages" in str(e), f"400 names the field: {e}")


if __name__ == "__main__":
    dialect, port, provider = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    {"openai": openai_app, "anthropic": anthropic_app}[dialect](port, provider)
    print(f"ok: {dialect} SDK via provider {provider}")
