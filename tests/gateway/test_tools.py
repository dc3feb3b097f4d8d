"""Tool calls on the CPU, no server: the parser's catalogue (whole and fed in every split), and the
structural tag the engine compiles, checked with xgrammar itself against the outputs it must allow and
refuse."""
from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import pytest

from pagedllm.gateway.tools import Function, Tool, ToolCallParser, constraint, plan_tools

MODEL = Path.home() / ".cache" / "pagedllm" / "SmolLM2-135M-Instruct"


def call(name: str, arguments: str) -> str:
    return f'<tool_call>\n{{"name": "{name}", "arguments": {arguments}}}\n</tool_call>'


NESTED = '{"filter": {"tags": ["a", {"b": [1, 2.5e3]}], "on": true}, "q": null}'
UNICODE = '{"city": "Zürich \\u00e9 東京 🌍", "note": "say \\"hi\\" \\\\ there"}'
CATALOGUE = [
    # (output, content, [(name, arguments)])
    ("Paris is the capital of France.", "Paris is the capital of France.", []),
    (call("get_weather", '{"city": "Oslo"}'), None, [("get_weather", '{"city": "Oslo"}')]),
    (call("a", "{}") + "\n" + call("b-2", '{"x": 1}'), None, [("a", "{}"), ("b-2", '{"x": 1}')]),
    ("Let me check.\n" + call("a", '{"k": "}"}'), "Let me check.\n", [("a", '{"k": "}"}')]),
    ("  \n" + call("a", "{}"), None, [("a", "{}")]),
    (call("search", NESTED), None, [("search", NESTED)]),
    (call("get_weather", UNICODE), None, [("get_weather", UNICODE)]),
    ("a < b and <tool and <tool_call", "a < b and <tool and <tool_call", []),
    ("see <tool_call> here", "see <tool_call> here", []),  # not a call's head: text, as written
    (call("a", '{"k": 1}') + " trailing words", None, [("a", '{"k": 1}')]),  # text after calls is dropped
    ('<tool_call>\n{"name": "a", "arguments": {"k": "Os', None, [("a", '{"k": "Os')]),  # cut by max_tokens
    ('<tool_call>\n{"name": "get_wea', "<tool_call>\n{\"name\": \"get_wea", []),  # cut inside the head
]


def parsed(pieces: list[str]) -> tuple[str | None, list[tuple[str, str]], str, dict[int, str]]:
    parser = ToolCallParser()
    events = [e for piece in pieces for e in parser.feed(piece)] + parser.finish()
    streamed_content = "".join(e.text for e in events if e.kind == "content")
    streamed_args: dict[int, str] = {}
    for e in events:
        if e.kind == "arguments":
            streamed_args[e.index] = streamed_args.get(e.index, "") + e.text
    calls = [(c.name, c.arguments) for c in parser.calls]
    return parser.content or None, calls, streamed_content, streamed_args


@pytest.mark.parametrize("output, content, calls", CATALOGUE)
def test_parser_catalogue_whole_and_in_every_split(output, content, calls):
    got_content, got_calls, _, _ = parsed([output])
    assert (got_content, got_calls) == (content, calls)
    for cut in range(len(output) + 1):  # fed in two pieces at every point, and character by character
        for pieces in ([output[:cut], output[cut:]],) + (([*output],) if cut == 0 else ()):
            c, k, streamed_content, streamed_args = parsed(pieces)
            assert (c, k) == (content, calls), pieces
            assert streamed_content == (content or "")
            assert [streamed_args.get(i, "") for i in range(len(calls))] == [a for _, a in calls]
    for _, arguments in calls:
        if arguments.endswith("}"):
            json.loads(arguments)


def test_call_ids_are_unique_and_a_call_starts_before_its_arguments():
    parser = ToolCallParser()
    events = parser.feed(call("a", '{"x": "' + "y" * 40 + '"}') + "\n" + call("a", "{}")) + parser.finish()
    assert [e.kind for e in events][:2] == ["call", "arguments"]
    assert len({c.id for c in parser.calls}) == 2 and all(c.id.startswith("call_") for c in parser.calls)


WEATHER = Function(name="get_weather", parameters={
    "type": "object", "required": ["city"], "additionalProperties": False,
    "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}}})
NOOP = Function(name="noop")


@cache
def _compiler():
    xgr = pytest.importorskip("xgrammar")
    transformers = pytest.importorskip("transformers")
    if not MODEL.exists():
        pytest.skip("the embedded model is not downloaded (make setup)")
    tokenizer = transformers.AutoTokenizer.from_pretrained(MODEL)
    return xgr, tokenizer, xgr.GrammarCompiler(xgr.TokenizerInfo.from_huggingface(tokenizer))


def accepts(plan, output: str) -> bool:
    xgr, tokenizer, compiler = _compiler()
    matcher = xgr.GrammarMatcher(compiler.compile_structural_tag(constraint(plan)["structural_tag"]))
    return matcher.accept_string(output) and matcher.accept_token(tokenizer.eos_token_id)


def tools(*functions: Function) -> list[Tool]:
    return [Tool(type="function", function=f) for f in functions]


def test_the_constraint_allows_text_or_valid_calls_and_nothing_else():
    oslo, noop = call("get_weather", '{"city": "Oslo"}'), call("noop", "{}")
    auto = plan_tools(tools(WEATHER, NOOP), None, None)
    for ok in ("Just text.", oslo, "Text first.\n" + oslo, oslo + "\n" + noop):
        assert accepts(auto, ok), ok
    for bad in (call("get_weather", '{"town": "Oslo"}'), call("nope", "{}"), oslo + " and more text",
                call("get_weather", '{"city": "Oslo"'), oslo + "\n\nText between.\n" + noop):
        assert not accepts(auto, bad), bad
    single = plan_tools(tools(WEATHER, NOOP), "auto", False)
    assert accepts(single, oslo) and not accepts(single, oslo + "\n" + noop)
    required = plan_tools(tools(WEATHER, NOOP), "required", None)
    assert accepts(required, noop) and accepts(required, oslo + "\n" + noop) and not accepts(required, "Text.")
    named = plan_tools(tools(WEATHER, NOOP), {"type": "function", "function": {"name": "noop"}}, None)
    assert accepts(named, noop) and not accepts(named, oslo) and not accepts(named, noop + "\n" + noop)
