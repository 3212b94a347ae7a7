"""Tool calls read out of text (Hermes format), whole and streamed in arbitrary pieces, and the constraints and
deltas that tool_choice makes."""

from __future__ import annotations

import json

import pytest

from effinfer.serving.tool_calls import ChatDeltas, HermesParser, ToolCallStream, forced_calls, forced_constraint

TEXT = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_time", "arguments": {"zone": "CET"}}\n</tool_call>')
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}},
         {"type": "function", "function": {"name": "get_time"}}]


NAMES = ["get_weather", "get_time"]


def hermes(names=NAMES):
    return HermesParser(names)


def test_hermes_calls_and_the_text_around_them():
    message = ChatDeltas("auto", hermes()).message(TEXT)
    assert message["content"] == "Let me check."
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in message["tool_calls"]] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {"zone": "CET"})]
    assert ChatDeltas("auto", hermes()).message("no calls here") == {"role": "assistant", "content": "no calls here"}
    for not_a_call in ("<tool_call>not json</tool_call>", '<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>'):
        assert ChatDeltas("auto", hermes()).message(not_a_call) == {"role": "assistant", "content": not_a_call}


@pytest.mark.parametrize("piece", [1, 2, 3, 7, 1000])
def test_streamed_in_any_pieces_gives_the_same_calls(piece):
    stream, content, calls = ToolCallStream(hermes()), "", []
    for i in range(0, len(TEXT), piece):
        text, new = stream.feed(TEXT[i:i + piece])
        content, calls = content + text, calls + new
    rest, _ = stream.finish()
    assert (content + rest).strip() == "Let me check."
    assert [c.name for c in calls] == ["get_weather", "get_time"]


def test_a_partial_tag_is_held_back_then_released():
    stream = ToolCallStream(hermes())
    assert stream.feed("a <tool") == ("a ", [])
    assert stream.feed("box> b") == ("<toolbox> b", [])


def test_a_whole_answer_that_is_a_bare_call_to_a_given_tool():
    bare = '{"name": "get_weather", "arguments": {"city": "Oslo"}}'
    assert ChatDeltas("auto", hermes(["get_weather"])).message(bare)["tool_calls"][0]["function"]["name"] == \
        "get_weather"
    assert ChatDeltas("auto", hermes(["other"])).message(bare)["content"] == bare      # not a tool: text
    for piece in (1, 5, 100):
        stream, content = ToolCallStream(HermesParser(["get_weather"])), ""
        for i in range(0, len(bare), piece):
            text, calls = stream.feed(bare[i:i + piece])
            assert not calls and not text                                        # held: it may be a call
        assert stream.finish() == ("", stream.calls) and stream.calls[0].name == "get_weather"
    not_a_call = ToolCallStream(HermesParser(["get_weather"]))
    assert not_a_call.feed('{"a": 1} and more') == ("", [])
    assert not_a_call.finish() == ('{"a": 1} and more', [])


def test_deltas_of_auto_calls_and_single_call_mode():
    single = ChatDeltas("auto", hermes(), parallel=False)
    assert len(single.message(TEXT)["tool_calls"]) == 1 and single.finish_reason("stop") == "tool_calls"
    plain = ChatDeltas()
    assert plain.message(TEXT) == {"role": "assistant", "content": TEXT} and plain.finish_reason("stop") == "stop"


def test_named_and_required_choices():
    named = {"type": "function", "function": {"name": "get_weather"}}
    schema = json.loads(forced_constraint(TOOLS, named, True).json)
    assert schema["required"] == ["city"]
    deltas = ChatDeltas(named)
    streamed = deltas.feed('{"city": ') + deltas.feed('"Oslo"}') + deltas.finish()
    assert streamed[0]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": ""}
    assert "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in streamed) == '{"city": "Oslo"}'
    required = json.loads(forced_constraint(TOOLS, "required", False).json)
    assert required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    calls = forced_calls('[{"name": "get_time", "parameters": {}}]', "required")
    assert [(c.name, c.arguments) for c in calls] == [("get_time", "{}")]
    cut = ChatDeltas("required")
    assert cut.message('[{"name": "get_ti') == {"role": "assistant", "content": '[{"name": "get_ti'}
    assert forced_constraint(TOOLS, "auto", True) is None
