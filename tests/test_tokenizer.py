"""train_tokenizer / load_tokenizer: round trips, specials, and the ChatML template of DESIGN.md §4."""

import json

import pytest
from transformers import AutoTokenizer

from bumblecore.tokenizer import CHAT_TEMPLATE, load_tokenizer, train_tokenizer

SYSTEM = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"


@pytest.fixture(scope="module")
def tok(tokenizer_dir):
    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("text", ["Hello world, it's 2026!", "你好，世界！训练一个小模型。", "🐝🚀 ok\n\n  tabs\tand  spaces", "émoji 👩‍👩‍👧 mix 混合"])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_specials_are_single_tokens(tok):
    for special in ("<|endoftext|>", "<|im_start|>", "<|im_end|>"):
        ids = tok.encode(f"a{special}b")
        assert tok.convert_tokens_to_ids(special) in ids
        assert len(tok.encode(special)) == 1
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"


def test_vocab_size_and_autotokenizer(tokenizer_dir, tok):
    assert 259 < len(tok) <= 512  # the small corpus may run out of pairs seen twice
    auto = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert auto.encode("The bee reads the data.") == tok.encode("The bee reads the data.")
    assert auto.chat_template == CHAT_TEMPLATE
    assert json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["chat_template"] == CHAT_TEMPLATE


def render(tok, messages, **kw):
    return tok.apply_chat_template(messages, tokenize=False, **kw)


def test_chatml_default_system(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    assert render(tok, messages) == SYSTEM + "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nhello<|im_end|>\n"


def test_chatml_explicit_system_multi_turn_and_prompt(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "蜜蜂？"},
    ]
    expected = (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n1+1?<|im_end|>\n"
        "<|im_start|>assistant\n2<|im_end|>\n<|im_start|>user\n蜜蜂？<|im_end|>\n<|im_start|>assistant\n"
    )
    assert render(tok, messages, add_generation_prompt=True) == expected


def test_tools_calls_and_results_in_qwen25_convention(tok):
    tools = [{"type": "function", "function": {"name": "weather", "description": "天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}]
    messages = [
        {"role": "user", "content": "Weather in 北京 and Paris?"},
        {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "weather", "arguments": {"city": "北京"}}},
            {"name": "weather", "arguments": '{"city": "Paris"}'},
        ]},
        {"role": "tool", "content": "晴"},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "北京 is sunny, Paris rainy."},
    ]
    expected = (
        "<|im_start|>system\nYou are a helpful assistant.\n\n# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "weather", "description": "天气", "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}\n'
        "</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n"
        '<tool_call>\n{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nWeather in 北京 and Paris?<|im_end|>\n"
        '<|im_start|>assistant\n<tool_call>\n{"name": "weather", "arguments": {"city": "北京"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\n<tool_response>\n晴\n</tool_response>\n<tool_response>\nrain\n</tool_response><|im_end|>\n"
        "<|im_start|>assistant\n北京 is sunny, Paris rainy.<|im_end|>\n"
    )
    assert render(tok, messages, tools=tools) == expected


def test_chat_template_tokenizes_specials_as_single_ids(tok):
    ids = tok.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=True, tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    start = tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(start) == 3 and tok.decode(ids).endswith("<|im_start|>assistant\n")


def test_bad_inputs_are_clear(tmp_path, corpus_files):
    with pytest.raises(ValueError, match="vocab_size 100 is too small"):
        train_tokenizer([str(corpus_files[0])], vocab_size=100, output_dir=str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="missing.txt"):
        train_tokenizer([str(tmp_path / "missing.txt")], vocab_size=300, output_dir=str(tmp_path / "t"))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n{"text": broken\n')
    with pytest.raises(ValueError, match="bad.jsonl line 2"):
        train_tokenizer([str(bad)], vocab_size=300, output_dir=str(tmp_path / "t"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")
