"""Token ids and target masks against an oracle: the tokenizer's own chat template + character offsets."""

import json
import os
from pathlib import Path

import pytest

from bumblecore.chat.format import encode_conversation, encode_preference, render_prompt
from bumblecore.data.cache import build_cache
from bumblecore.data.formats import read_samples
from bumblecore.recipes import recipe_for

# The original system's demo datasets are not part of this repo; tests read them only from a folder
# named explicitly: BUMBLECORE_ORIGINAL_DATA=../shared/original-demo-data python -m pytest -k original
SHARED = Path(os.environ.get("BUMBLECORE_ORIGINAL_DATA") or "/nonexistent")


def oracle(tok, messages, tools=None, trained_replies=None):
    """apply_chat_template's text; targets = each assistant reply's rendered body + <|im_end|>, found by search."""
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    spans, cursor = [], 0
    assistants = [m for m in messages if m["role"] == "assistant"]
    for index, _ in enumerate(assistants):
        start = text.index("<|im_start|>assistant\n", cursor) + len("<|im_start|>assistant\n")
        end = text.index("<|im_end|>", start) + len("<|im_end|>")
        if trained_replies is None or index in trained_replies:
            spans.append((start, end))
        cursor = end
    encoded = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [any(s < e_ and e > s_ for s_, e_ in spans) for s, e in encoded["offset_mapping"]]
    return encoded["input_ids"], mask


def check(tok, messages, tools=None):
    ids, mask = encode_conversation(tok, messages, tools)
    assert (ids, mask) == oracle(tok, messages, tools)
    return ids, mask


def test_alpaca_input_joined_after_newline(tmp_path, tok):
    path = tmp_path / "a.jsonl"
    path.write_text(json.dumps({"instruction": "Add the numbers", "input": "2 and 3", "output": "5"}) + "\n")
    sample = next(read_samples(path, recipe_for("sft").reading))
    ids, mask = check(tok, sample.conversation.messages)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "5<|im_end|>"
    assert "Add the numbers\n2 and 3" in tok.decode(ids)


def test_sharegpt_multi_turn_with_system_trains_every_assistant_turn(tok):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "1+1?"},
        {"role": "assistant", "content": "2"},
        {"role": "user", "content": "蜜蜂？"},
        {"role": "assistant", "content": "🐝 bee"},
    ]
    ids, mask = check(tok, messages)
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "2<|im_end|>🐝 bee<|im_end|>"


def test_tool_calls_render_per_qwen25_and_train_calls(tok):
    tools = [{"type": "function", "function": {"name": "weather", "parameters": {"type": "object"}}}]
    messages = [
        {"role": "user", "content": "Oslo?"},
        {"role": "assistant", "content": "", "tool_calls": [{"name": "weather", "arguments": {"city": "Oslo"}}]},
        {"role": "tool", "content": "rain"},
        {"role": "assistant", "content": "It rains."},
    ]
    ids, mask = check(tok, messages, tools)
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert (
        trained
        == '<tool_call>\n{"name": "weather", "arguments": {"city": "Oslo"}}\n</tool_call><|im_end|>It rains.<|im_end|>'
    )
    assert "<tool_response>\nrain\n</tool_response>" in tok.decode(ids)


def test_preference_trains_only_the_reply(tok):
    history = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "b"},
        {"role": "user", "content": "c"},
    ]
    for reply in ("good answer", "bad answer"):
        messages = history + [{"role": "assistant", "content": reply}]
        ids, mask = encode_preference(tok, history, {"role": "assistant", "content": reply})
        assert (ids, mask) == oracle(tok, messages, trained_replies={1})


def test_render_prompt_matches_generation_prompt(tok):
    messages = [{"role": "user", "content": "hi"}]
    expected = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert tok.decode(render_prompt(tok, messages)) == expected


def test_truncation_that_leaves_no_target_is_dropped_and_counted(tmp_path, tok):
    path = tmp_path / "long.jsonl"
    records = [{"instruction": "word " * 200, "output": "answer"}, {"instruction": "short", "output": "ok"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    cache = build_cache(
        path, tok, recipe_for("sft").reading, cutoff_len=64, cache_dir=tmp_path / "cache", progress=False
    )
    assert len(cache) == 1 and cache.summary.dropped_no_targets == 1 and cache.summary.truncated == 1


@pytest.mark.skipif(not SHARED.is_dir(), reason="set BUMBLECORE_ORIGINAL_DATA to the original demo datasets folder")
@pytest.mark.parametrize(
    "name,stage",
    [
        ("alpaca_zh_demo.json", "sft"),
        ("duolun_train.json", "sft"),
        ("glaive_toolcall_zh_demo.json", "sft"),
        ("dpo_zh_demo.json", "dpo"),
        ("pretrain_zh_demo.json", "pretrain"),
    ],
)
def test_original_demo_datasets_read_and_render(tok, name, stage):
    samples = list(read_samples(SHARED / name, recipe_for(stage).reading))  # validates every record
    assert len(samples) >= 300
    for sample in samples[:40]:
        if sample.kind == "text":
            continue
        c = sample.conversation
        if sample.kind == "conversation":
            check(tok, c.messages, c.tools)
        else:
            ids, mask = encode_preference(tok, c.messages, sample.chosen, c.tools)
            assert (ids, mask) == oracle(
                tok,
                c.messages + [sample.chosen],
                c.tools,
                trained_replies={len([m for m in c.messages if m["role"] == "assistant"])},
            )


@pytest.mark.skipif(not SHARED.is_dir(), reason="set BUMBLECORE_ORIGINAL_DATA to the original demo datasets folder")
def test_inspect_data_on_original_tool_calls_trains_only_assistant_turns(tokenizer_dir):
    import subprocess
    import sys

    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            "inspect_data",
            "--model_name_or_path",
            str(tokenizer_dir),
            "--dataset_path",
            str(SHARED / "glaive_toolcall_zh_demo.json"),
            "--num_samples",
            "1",
            "--cutoff_len",
            "4096",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert '[[<tool_call>\n{"name": "generate_invoice"' in out  # the function call is trained
    assert "<|im_start|>user\n<tool_response>\n{" in out and "[[<tool_response>" not in out  # the observation is not
    assert (
        "<|im_start|>assistant\n[[" in out and "[[<|im_start|>" not in out and "validated 300 records" in result.stderr
    )
