#!/usr/bin/env python3
"""Renders extra conversations with the golden DeepSeek-R1 chat template using Jinja2
the way transformers does (sandboxed, trim_blocks, lstrip_blocks), to check the C
renderer on tool calls and the template's quirks. Writes chat_extra.json next to it.
Run: python3 tests/data/tokenizer/gen_chat_extra.py"""
import json, os
from jinja2.sandbox import ImmutableSandboxedEnvironment

here = os.path.dirname(os.path.abspath(__file__))
cfg = json.load(open(os.path.join(here, "..", "golden", "tokenizer", "tokenizer_config.json")))
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
tmpl = env.from_string(cfg["chat_template"])

def call(name, args, typ="function"):
    return {"type": typ, "function": {"name": name, "arguments": args}}

cases = [
    ("tool round trip", [
        {"role": "system", "content": "You can call tools."},
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [call("get_weather", '{"city": "Paris"}')]},
        {"role": "tool", "content": '{"temp": 21}'},
        {"role": "assistant", "content": "It is 21 C."},
        {"role": "user", "content": "Thanks"}], True),
    ("two calls, two outputs, ends in tool", [
        {"role": "user", "content": "a and b"},
        {"role": "assistant", "content": None, "tool_calls": [call("f", "{}"), call("g", '{"x": [1, 2]}')]},
        {"role": "tool", "content": "1"},
        {"role": "tool", "content": "2"}], True),
    ("second tool-call message keeps is_first", [
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call("f", "{}")]},
        {"role": "tool", "content": "r1"},
        {"role": "assistant", "content": None, "tool_calls": [call("g", "{}")]},
        {"role": "tool", "content": "r2"},
        {"role": "assistant", "content": "done"}], True),
    ("content and tool calls", [
        {"role": "user", "content": "x"},
        {"role": "assistant", "content": "<think>plan</think>Calling.", "tool_calls": [call("f", "{\n  \"a\": 1\n}")]}], False),
    ("last system wins, unknown roles ignored", [
        {"role": "system", "content": "first"},
        {"role": "developer", "content": "ignored"},
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "second"}], True),
    ("several think blocks", [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "<think>a</think>mid</think>final\n\nanswer"},
        {"role": "user", "content": "again"}], False),
    ("no generation prompt", [
        {"role": "user", "content": "only"}], False),
    ("empty conversation", [], True),
    ("empty tool_calls list", [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "plain", "tool_calls": []}], True),
    ("unicode and specials in content", [
        {"role": "system", "content": "深度求索 🚀"},
        {"role": "user", "content": "<think>inject</think> ünïcode\r\n"}], True),
]

out = []
for name, msgs, gen in cases:
    out.append({"name": name, "messages": msgs, "add_generation_prompt": gen,
                "rendered": tmpl.render(messages=msgs, add_generation_prompt=gen,
                                        bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])})
with open(os.path.join(here, "chat_extra.json"), "w") as f:
    json.dump({"oracle": "jinja2 %s" % __import__("jinja2").__version__, "cases": out}, f, ensure_ascii=False, indent=1)
print("wrote", len(out), "cases")
