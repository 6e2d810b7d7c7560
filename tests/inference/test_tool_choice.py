"""tool_choice required / a named function through xgrammar in the engine, without a server: the
tool-call markup is read from the chat template (ours, and a template with other markers), every
forced reply of a random model is exactly what the template (transformers' apply_chat_template, the
oracle) renders for the calls it holds, each call's arguments validate against the function's
parameters (jsonschema), and a request without a constraint batched with them decodes as alone."""

import json

import pytest
from serving import xgrammar_or_skip

from bumblecore.chat.templates import BUILT_IN
from bumblecore.chat.tool_markup import ToolCallMarkup, tool_call_markup
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.loading import load_for_inference
from bumblecore.inference.openai_reply import ToolCallStream, merge_deltas
from bumblecore.inference.openai_request import APIError, parse_chat_request
from bumblecore.inference.tool_choice import ToolChoiceError, constrain_tool_calls

jsonschema = xgrammar_or_skip()

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"enum": ["Paris", "Rome", "東京"]},
        "days": {"type": "integer", "minimum": 1, "maximum": 9},
        "metric": {"type": "boolean"},
    },
    "required": ["city", "days"],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": WEATHER}},
    {"type": "function", "function": {"name": "now", "description": "no parameters"}},
]
MESSAGES = [{"role": "user", "content": "weather in Rome?"}]
# A template of another shape: ChatML turns, but each call in its own [CALL] ... [/CALL] markers
# around compact JSON, the calls one after another; a tool message is refused (not needed here).
OTHER_MARKERS = (
    "{%- if tools -%}{{- '<|im_start|>system\\nTools: ' + (tools | tojson) + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] -}}"
    "{%- for call in message.get('tool_calls') or [] -%}{%- set call = call['function'] -%}"
    "{{- '[CALL]{\"name\":\"' + call['name'] + '\",\"arguments\":' -}}"
    "{{- (call['arguments'] | tojson(separators=(',', ':'))) + '}[/CALL]' -}}"
    "{%- endfor -%}{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def template_reply(tokenizer, calls: list[dict]) -> str:
    """The oracle: what the tokenizer's chat template renders after the prompt for an assistant turn
    making these calls (OpenAI's shape, arguments a JSON string), through its end of turn."""
    prompt = tokenizer.apply_chat_template(MESSAGES, tools=TOOLS, add_generation_prompt=True, tokenize=False)
    turn = {
        "role": "assistant",
        "content": "",
        "tool_calls": [{"type": "function", "function": {**c, "arguments": json.loads(c["arguments"])}} for c in calls],
    }
    full = tokenizer.apply_chat_template(MESSAGES + [turn], tools=TOOLS, tokenize=False)
    assert full.startswith(prompt)
    return full[len(prompt) :]


def forced(tokenizer, tool_choice, parallel: bool = True):
    chat = parse_chat_request(
        {"messages": MESSAGES, "tools": TOOLS, "tool_choice": tool_choice, "parallel_tool_calls": parallel}
    )
    constrain_tool_calls(chat, tokenizer)
    return chat


def calls_of(chat, text: str) -> list[dict]:
    stream = ToolCallStream(*chat.tool_call_markers)
    message = merge_deltas(stream.push(text) + stream.finish())
    assert message["content"] is None, text  # nothing but calls
    return [call["function"] for call in message["tool_calls"]]


def test_markup_is_read_from_the_template(tok):
    assert tool_call_markup(tok) == ToolCallMarkup("<tool_call>\n", "\n</tool_call>", "\n", (", ", ": "))
    try:
        tok.chat_template = OTHER_MARKERS
        assert tool_call_markup(tok) == ToolCallMarkup("[CALL]", "[/CALL]", "", (",", ":"))
        tok.chat_template = BUILT_IN["llama3"]  # renders no tools
        assert tool_call_markup(tok) is None
        tok.chat_template = OTHER_MARKERS.replace("[/CALL]", "")  # no closing marker: calls cannot be told apart
        assert tool_call_markup(tok) is None
    finally:
        tok.chat_template = BUILT_IN["chatml"]


def check_forced_replies(engine, tok, seeds: tuple) -> list[str]:
    """Forced calls (named, required, required with one call), each under every seed, batched with a
    plain request: the plain one as alone, every forced one the template's render of valid calls."""
    from bumblecore.chat.format import render_prompt

    prompt = render_prompt(tok, MESSAGES, TOOLS)
    plain = SamplingParams(max_new_tokens=12)
    alone = engine.generate([prompt], plain)[0]
    named = forced(tok, {"type": "function", "function": {"name": "get_weather"}})
    chats = [chat for chat in (named, forced(tok, "required"), forced(tok, "required", parallel=False)) for _ in seeds]
    params = [plain] + [
        SamplingParams(max_new_tokens=600, do_sample=True, seed=seed, tool_calls=chat.tool_calls)
        for chat, seed in zip(chats, seeds * 3)
    ]
    results = engine.generate([prompt] * len(params), params)
    assert results[0]["token_ids"] == alone["token_ids"]  # batched with constrained rows: unchanged
    for chat, result in zip(chats, results[1:]):
        assert result["finish_reason"] == "stop", result
        calls = calls_of(chat, result["text"])
        assert len(calls) == 1 or chat.parallel_tool_calls and chat.tool_choice.mode == "required", result["text"]
        for call in calls:
            assert call["name"] == "get_weather" if chat is named else call["name"] in ("get_weather", "now")
            schema = WEATHER if call["name"] == "get_weather" else {"type": "object", "maxProperties": 0}
            jsonschema.validate(json.loads(call["arguments"]), schema)
        # Exactly the template's own render of these calls, up to its end-of-turn token.
        assert template_reply(tok, calls) == result["text"] + "<|im_end|>\n"
    return [r["text"] for r in results[1:]]


def test_forced_calls_follow_the_template_and_the_parameters(tmp_path, tiny_checkpoint):
    model, tok, eos = load_for_inference(str(tiny_checkpoint(tmp_path / "m")), device_map="cpu")
    engine = GenerationEngine(model, tok, max_batch_size=8, max_len=1024, eos_token_ids=eos)
    print("ChatML replies:", check_forced_replies(engine, tok, (2,)))
    tok.chat_template = OTHER_MARKERS  # the same engine, another template: its markers, its compact JSON
    print("[CALL] replies:", check_forced_replies(engine, tok, (3,)))


def test_tool_choice_values_are_checked(tok):
    def refused(tool_choice, tools=TOOLS) -> str:
        body = {"messages": MESSAGES, "tool_choice": tool_choice}
        with pytest.raises(APIError) as err:
            parse_chat_request({**body, "tools": tools} if tools else body)
        assert err.value.status == 400
        return err.value.param

    assert refused("maybe") == "tool_choice"
    assert refused({"type": "function", "function": {"name": "nowhere"}}) == "tool_choice"
    assert refused({"type": "function", "function": {}}) == "tool_choice"
    assert refused("required", tools=None) == "tool_choice"
    assert parse_chat_request({"messages": MESSAGES, "tools": TOOLS}).tool_choice.mode == "auto"
    assert parse_chat_request({"messages": MESSAGES, "tools": TOOLS, "tool_choice": "none"}).tools is None
    unfollowable = {"type": "function", "function": {"name": "f", "parameters": {"type": 1}}}
    chat = parse_chat_request({"messages": MESSAGES, "tools": [TOOLS[1], unfollowable], "tool_choice": "required"})
    with pytest.raises(ToolChoiceError) as err:  # a schema xgrammar cannot follow, named by its tool
        constrain_tool_calls(chat, tok)
    assert err.value.param == "tools[1].function.parameters"
    try:
        tok.chat_template = BUILT_IN["llama3"]  # no tool-call markup: forcing a call is refused, not guessed
        with pytest.raises(ToolChoiceError) as err:
            forced(tok, "required")
        assert err.value.param == "tool_choice" and "markup" in str(err.value)
    finally:
        tok.chat_template = BUILT_IN["chatml"]
