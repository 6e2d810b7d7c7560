"""The shipped demo data and tokenizer: every file reads in its format, held-out questions are new."""

import json
from pathlib import Path

import bumblecore
from bumblecore.data.formats import read_samples
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer

DEMO = Path(bumblecore.__file__).parent / "demo_data"


def test_demo_files_read_in_their_formats():
    expected = {
        "pretrain.jsonl": ("pretrain", 2200),
        "pretrain_eval.jsonl": ("pretrain", 200),
        "sft_train.jsonl": ("sft", 3000),
        "sft_eval.jsonl": ("sft", 200),
        "sft_multiturn.jsonl": ("sft", 60),
        "sft_toolcall.jsonl": ("sft", 40),
        "dpo_train.jsonl": ("dpo", 1200),
        "dpo_eval.jsonl": ("dpo", 100),
    }
    for name, (stage, count) in expected.items():
        assert len(list(read_samples(DEMO / name, recipe_for(stage).reading))) == count, name
    tools = next(read_samples(DEMO / "sft_toolcall.jsonl", recipe_for("sft").reading))
    assert tools.conversation.tools and tools.conversation.messages[1]["tool_calls"][0]["name"] == "count_words"


def test_held_out_questions_are_not_in_training():
    def instructions(name):
        return {json.loads(line)["instruction"] for line in open(DEMO / name, encoding="utf-8")}

    assert not instructions("sft_eval.jsonl") & instructions("sft_train.jsonl")
    assert not instructions("dpo_eval.jsonl") & instructions("dpo_train.jsonl")


def test_demo_tokenizer_is_small_and_round_trips():
    tok = load_tokenizer(DEMO / "tokenizer")
    assert len(tok) <= 4096
    text = "The brave fox found 7 apples near the river."
    assert tok.decode(tok.encode(text)) == text
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False).startswith(
        "<|im_start|>system\nYou are a helpful assistant."
    )
