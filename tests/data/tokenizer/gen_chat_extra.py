#!/usr/bin/env python3
"""Renders conversations with the golden DeepSeek-R1 chat template and with the other
DeepSeek-V3/R1 templates in templates/, using Jinja2 the way transformers does
(sandboxed, trim_blocks, lstrip_blocks), to check the C renderers on tool calls and each
template's quirks. A conversation a template rejects is recorded as null. Writes
chat_extra.json next to this file.
Run: python3 tests/data/tokenizer/gen_chat_extra.py"""
import json, os
from jinja2.sandbox import ImmutableSandboxedEnvironment

here = os.path.dirname(os.path.abspath(__file__))
cfg = json.load(open(os.path.join(here, "..", "golden", "tokenizer", "tokenizer_config.json")))
env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
templates = {"deepseek-r1-distill": cfg["chat_template"]}
for name in sorted(os.listdir(os.path.join(here, "templates"))):
    if name.endswith(".jinja"):
        templates[name[:-6]] = open(os.path.join(here, "templates", name), encoding="utf-8").read()

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
    ("several systems, assistant last", [
        {"role": "system", "content": "one"},
        {"role": "system", "content": "two"},
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": "<think>r</think>a"}], True),
    ("three calls in two messages with content", [
        {"role": "user", "content": "go"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [call("a", "{}"), call("b", "{}")]},
        {"role": "tool", "content": "A"},
        {"role": "tool", "content": "B"},
        {"role": "user", "content": "more"},
        {"role": "assistant", "content": None, "tool_calls": [call("c", '{"k": "v"}')]},
        {"role": "tool", "content": "C"},
        {"role": "assistant", "content": "final"}], True),
    ("assistant null content, no calls", [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None}], True),
    ("tool output then user", [
        {"role": "user", "content": "u"},
        {"role": "assistant", "content": None, "tool_calls": [call("f", "{}")]},
        {"role": "tool", "content": "out"},
        {"role": "user", "content": "next"}], True),
]

def render(text, msgs, gen):
    try:
        return env.from_string(text).render(messages=msgs, add_generation_prompt=gen,
                                            bos_token=cfg["bos_token"], eos_token=cfg["eos_token"])
    except Exception:
        return None

out = []
for name, msgs, gen in cases:
    for g in (gen, not gen):
        out.append({"name": name, "messages": msgs, "add_generation_prompt": g,
                    "rendered": {t: render(text, msgs, g) for t, text in templates.items()}})
with open(os.path.join(here, "chat_extra.json"), "w") as f:
    json.dump({"oracle": "jinja2 %s" % __import__("jinja2").__version__,
               "templates": {t: ("golden" if t == "deepseek-r1-distill" else "templates/%s.jinja" % t) for t in templates},
               "cases": out}, f, ensure_ascii=False, indent=1)
print("wrote", len(out), "cases x", len(templates), "templates")
