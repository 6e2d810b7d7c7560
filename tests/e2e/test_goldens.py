"""Pinned behaviour for refactors (torchtitan's habit): tiny-model loss curves of every stage, greedy
outputs of `bumblecore generate` (one prompt, a batch, a raw-text prompt) and the API's replies
(plain, streamed, a refused request) must stay exactly what the code gave when they were recorded.

Only the command line and the HTTP API are used, never internal names, so code may move freely
underneath. To re-record on purpose (a change that is meant to change numbers):
`BUMBLECORE_RECORD_GOLDENS=1 python -m pytest tests/e2e/test_goldens.py` and commit tests/e2e/goldens.json
with a message that says why.
"""

import json
import os
import urllib.request
from pathlib import Path

import pytest
import yaml

import bumblecore
from bumblecore.cli import main

DEMO = Path(bumblecore.__file__).parent / "demo_data"
GOLDENS = Path(__file__).with_name("goldens.json")
RECORD = bool(os.environ.get("BUMBLECORE_RECORD_GOLDENS"))
recorded = json.loads(GOLDENS.read_text()) if GOLDENS.exists() else {}


def check(name, value):
    """Compare with the recorded value (losses to 1e-5: CPU kernels of another machine may round the
    last bits differently; everything else exactly); in record mode, store it instead."""
    if RECORD:
        recorded[name] = value
        GOLDENS.write_text(json.dumps(recorded, indent=1, sort_keys=True, ensure_ascii=False) + "\n")
        return
    assert name in recorded, f"no golden recorded for {name}"
    if isinstance(value, list) and value and isinstance(value[0], float):
        assert value == pytest.approx(recorded[name], abs=1e-5), name
    else:
        assert value == recorded[name], name


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("golden_data")
    for name, count in (("pretrain.jsonl", 32), ("sft_train.jsonl", 32), ("dpo_train.jsonl", 16)):
        lines = (DEMO / name).read_text(encoding="utf-8").splitlines()[:count]
        (root / name).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


@pytest.fixture(scope="module")
def base_model(tmp_path_factory):
    out = tmp_path_factory.mktemp("golden_model")
    main(
        [
            "init_model",
            "--preset",
            "0.5B",
            "--num_hidden_layers",
            "2",
            "--hidden_size",
            "32",
            "--intermediate_size",
            "64",
            "--num_attention_heads",
            "4",
            "--num_key_value_heads",
            "2",
            "--vocab_size",
            "768",
            "--torch_dtype",
            "float32",
            "--tokenizer_path",
            str(DEMO / "tokenizer"),
            "--output_dir",
            str(out),
        ]
    )
    return out


def train(tmp_path, model, dataset, stage, read=("loss",), **keys) -> list[float]:
    config = {
        "training_stage": stage,
        "model_name_or_path": str(model),
        "dataset_path": str(dataset),
        "output_dir": str(tmp_path / "run"),
        "cutoff_len": 96,
        "max_steps": 3,
        "learning_rate": 5e-3,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 2,
        "train_model_precision": "fp32",
        "save_steps": 100,
        "warmup_ratio": 0.25,
        "lora_rank": 4,
        "lora_alpha": 8,
        "lora_dropout": 0.0,
        **keys,
    }
    file = tmp_path / "run.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    history = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    return [round(r[key], 7) for r in history if "loss" in r for key in read]


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory, base_model, data):
    root = tmp_path_factory.mktemp("golden_pretrain")
    check(
        "loss/pretrain", train(root, base_model, data / "pretrain.jsonl", "pretrain", max_steps=6, learning_rate=1e-2)
    )
    return root / "run"


@pytest.fixture(scope="module")
def decoder(tmp_path_factory, tiny_checkpoint):
    """A Qwen2 checkpoint written by transformers with large random weights: its greedy choices are far
    from ties (robust goldens) and its text is varied (a trained tiny model repeats one word)."""
    return tiny_checkpoint(tmp_path_factory.mktemp("golden_decoder"))


@pytest.mark.parametrize(
    "stage, finetuning_type, keys",
    [
        ("sft", "full", {}),
        ("sft", "lora", {}),
        ("continue_pretrain", "full", {}),
        ("dpo", "full", {}),
        ("dpo", "lora", {"pref_loss": "ipo"}),
        ("dpo", "full", {"pref_loss": "orpo", "pref_beta": 0.2}),
        ("dpo", "full", {"pref_loss": "simpo", "pref_beta": 2.0}),
        ("kto", "full", {}),
        ("rm", "full", {"center_rewards_coefficient": 0.01}),
    ],
    ids=["sft-full", "sft-lora", "cpt-full", "dpo-full", "ipo-lora", "orpo", "simpo", "kto-full", "rm-full"],
)
def test_loss_curves(tmp_path, pretrained, data, stage, finetuning_type, keys):
    dataset = {
        "dpo": "dpo_train.jsonl",
        "kto": "dpo_train.jsonl",
        "rm": "dpo_train.jsonl",
        "continue_pretrain": "pretrain.jsonl",
    }.get(stage, "sft_train.jsonl")
    name = f"loss/{stage}-{finetuning_type}-{keys.get('pref_loss', '')}"
    check(name, train(tmp_path, pretrained, data / dataset, stage, finetuning_type=finetuning_type, **keys))


def test_grpo_curve(tmp_path, pretrained, data):
    """Loss, reward and KL per step: sampled rollouts (a seed per completion) rewarded by exact match
    against the Alpaca output and a user's function (vowels), two steps per round (the second weighs
    its ratio against the round's log-probs), a KL to a frozen copy."""
    rewards = tmp_path / "vowels.py"
    rewards.write_text(
        "def vowels(prompts, completions, **fields):\n    return [float(sum(ch in 'aeiou' for ch in c)) for c in completions]\n"
    )
    keys = dict(num_generations=2, max_completion_length=6, num_iterations=2, beta=0.1, max_steps=4)
    keys |= dict(reward_functions=["exact_match", f"{rewards}:vowels"], learning_rate=2e-2)
    curve = train(tmp_path, pretrained, data / "sft_train.jsonl", "grpo", read=("loss", "reward", "kl"), **keys)
    check("loss/grpo-full-", curve)


def generated(capsys, *args) -> str:
    capsys.readouterr()
    main(["generate", *args])
    return capsys.readouterr().out


def test_greedy_generation(decoder, pretrained, tmp_path, capsys):
    model = str(decoder)
    check(
        "generate/one",
        generated(
            capsys,
            "--model_path",
            model,
            "--prompt",
            "Count the words: bee, honey, hive",
            "--max_new_tokens",
            "24",
            "--dtype",
            "float32",
        ),
    )
    check(
        "generate/raw",
        generated(
            capsys,
            "--model_path",
            str(pretrained),
            "--prompt",
            "The bee",
            "--training_stage",
            "pretrain",
            "--max_new_tokens",
            "24",
            "--dtype",
            "float32",
        ),
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a b c\nList three colours\n" + json.dumps({"prompt": "How many words: red blue?"}) + "\n")
    check(
        "generate/batch",
        generated(
            capsys,
            "--model_path",
            model,
            "--prompts_file",
            str(prompts),
            "--max_new_tokens",
            "20",
            "--batch_size",
            "2",
            "--dtype",
            "float32",
        ),
    )
    check(
        "generate/seeded",
        generated(
            capsys,
            "--model_path",
            model,
            "--prompt",
            "Name a flower",
            "--do_sample",
            "true",
            "--temperature",
            "0.9",
            "--top_p",
            "0.9",
            "--top_k",
            "20",
            "--seed",
            "7",
            "--max_new_tokens",
            "16",
            "--dtype",
            "float32",
        ),
    )


def post(url, body, key="golden-key"):
    request = urllib.request.Request(
        url + "/v1/chat/completions",
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {key}"},
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, err.read().decode()


def stable(reply: dict) -> dict:
    """A reply without what differs on every call (ids, timestamps)."""
    return {k: v for k, v in reply.items() if k not in ("id", "created", "system_fingerprint")}


def merged_content(events: list[dict]) -> list[dict]:
    """Consecutive plain content deltas as one (a server may send several tokens in one delta)."""
    out: list[dict] = []
    for event in events:
        choices = event.get("choices") or [{}]
        plain = list(choices[0].get("delta", {})) == ["content"] and choices[0].get("finish_reason") is None
        last = out[-1]["choices"][0] if out and out[-1].get("choices") else None
        if plain and last is not None and list(last.get("delta", {})) == ["content"] and not last["finish_reason"]:
            last["delta"] = {"content": last["delta"]["content"] + choices[0]["delta"]["content"]}
            continue
        out.append(json.loads(json.dumps(event)))  # a copy: merging writes into it
    return out


@pytest.mark.slow
def test_api_replies(decoder):
    from serving import running_server

    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Count: red, blue"}]
    with running_server(str(decoder), api_key="golden-key", max_batch_size=2, max_model_len=256) as url:
        status, text = post(url, {"model": "bumblebee", "messages": messages, "max_tokens": 20, "temperature": 0})
        check("api/plain", [status, stable(json.loads(text))])
        status, text = post(
            url,
            {
                "model": "bumblebee",
                "messages": messages,
                "max_tokens": 12,
                "temperature": 0,
                "stream": True,
                "stream_options": {"include_usage": True},
            },
        )
        events = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]
        stream = [status, [stable(e) for e in events], text.rstrip().endswith("data: [DONE]")]
        if RECORD:
            check("api/stream", stream)
        else:  # tokens that wait for a stream go out as one delta: compare the same deltas merged
            golden = recorded["api/stream"]
            assert [stream[0], merged_content(stream[1]), stream[2]] == [
                golden[0],
                merged_content(golden[1]),
                golden[2],
            ], "api/stream"
        for name, body in (
            ("temperature", {"messages": messages, "temperature": -1}),
            ("messages", {"messages": "hello"}),
            ("max_tokens", {"messages": messages, "max_tokens": 0}),
            ("role", {"messages": [{"role": "robot", "content": "hi"}]}),
        ):
            status, text = post(url, {"model": "bumblebee", **body})
            check(f"api/refused/{name}", [status, json.loads(text)])
        status, text = post(url, {"model": "bumblebee", "messages": messages}, key="wrong")
        check("api/refused/key", [status, json.loads(text)])
