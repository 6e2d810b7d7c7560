"""A real pretrained model end to end: SmolLM2-135M-Instruct (Llama architecture, 30 layers, vocab 49,152,
its own ChatML-style template, no BOS). Oracles: transformers' LlamaForCausalLM (logits, greedy generate),
peft (the unmerged adapter, merge_and_unload), the `openai` client, and the model's own loss before and
after training. One LoRA SFT adapter, trained once in this module, is shared by the tests that need one.
All on CPU in fp32, with short rows and a few dozen steps at most."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from bumblecore.cli import main

pytestmark = pytest.mark.slow

# Questions whose replies the SFT data gives in a fixed format the instruct model never uses by itself.
TRAIN_PAIRS = [(a, b) for a in range(2, 9) for b in range(1, 8)]
HELD_OUT = [(11, 5), (9, 9), (12, 3)]
FORMAT = "ANSWER: "


def question(a: int, b: int) -> str:
    return f"What is {a} plus {b}?"


def run(output_dir: Path, model, dataset, stage: str, **keys) -> list[dict]:
    """`bumblecore train` in this process on a config written here; the metrics it logged."""
    config = {
        "training_stage": stage,
        "model_name_or_path": str(model),
        "dataset_path": str(dataset),
        "output_dir": str(output_dir),
        "cutoff_len": 64,
        "train_micro_batch_size_per_gpu": 4,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "warmup_ratio": 0.0,
        "lr_scheduler_type": "constant",
        "logging_steps": 1,
        "save_steps": 1000,
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.0,
        **keys,
    }
    file = output_dir.parent / f"{output_dir.name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def greedy_replies(model_dir, questions: list[str], max_new_tokens: int = 12) -> list[str]:
    """Our engine (what `bumblecore generate` runs) on chat prompts, greedy."""
    from bumblecore.inference.commands import build_prompt_ids
    from bumblecore.inference.generate import GenerationEngine, SamplingParams, default_eos_ids
    from bumblecore.inference.loading import load_for_inference

    model, tokenizer, eos = load_for_inference(str(model_dir), device_map="cpu")
    prompts = [build_prompt_ids(tokenizer, q) for q in questions]
    engine = GenerationEngine(model, tokenizer, max_batch_size=len(prompts), eos_token_ids=eos)
    params = SamplingParams(max_new_tokens=max_new_tokens, do_sample=False)
    assert set(eos) >= set(default_eos_ids(None, tokenizer))
    return [r["text"] for r in engine.generate(prompts, params)]


@pytest.fixture(scope="module")
def sft_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("real_data")
    with open(root / "sft.jsonl", "w", encoding="utf-8") as f:
        for a, b in TRAIN_PAIRS:
            record = {"instruction": question(a, b), "input": "", "output": f"{FORMAT}{a + b}"}
            f.write(json.dumps(record) + "\n")
    return root


@pytest.fixture(scope="module")
def sft_adapter(tmp_path_factory, smollm2_dir, sft_data):
    """A LoRA SFT of SmolLM2 on the fixed-format replies (10 steps of 4 rows); its output dir and metrics."""
    out = tmp_path_factory.mktemp("real_runs") / "sft_lora"
    history = run(
        out, smollm2_dir, sft_data / "sft.jsonl", "sft", finetuning_type="lora", max_steps=10, learning_rate=2e-3
    )
    return out, history


def test_logits_and_greedy_chat_replies_equal_transformers(smollm2_dir):
    from transformers import AutoTokenizer, LlamaForCausalLM

    from bumblecore import Bumblebee

    hf = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()
    ours = Bumblebee.from_pretrained(smollm2_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    questions = ["What is the capital of France?", "Write a haiku about bees."]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": questions[0]}], add_generation_prompt=True, return_tensors="pt", return_dict=True
    )["input_ids"]
    with torch.no_grad():
        expected = hf(ids).logits
        got = ours(ids)
    assert expected.abs().max() > 10  # a real model's logits, not a random one's
    assert (got - expected).abs().max() < 1e-3 * expected.abs().max()

    replies = greedy_replies(smollm2_dir, questions, max_new_tokens=16)
    for text, reply in zip(questions, replies):
        prompt = tokenizer.apply_chat_template(
            [{"role": "user", "content": text}], add_generation_prompt=True, return_tensors="pt", return_dict=True
        )["input_ids"]
        with torch.no_grad():
            tokens = hf.generate(prompt, max_new_tokens=16, do_sample=False)[0, prompt.shape[1] :]
        assert reply == tokenizer.decode(tokens, skip_special_tokens=True), text


def test_lora_sft_teaches_the_reply_format(smollm2_dir, sft_adapter):
    out, history = sft_adapter
    losses = [r["loss"] for r in history if "loss" in r]
    assert len(losses) == 10 and sum(losses[-3:]) < 0.2 * sum(losses[:3])
    questions = [question(a, b) for a, b in HELD_OUT]
    before = greedy_replies(smollm2_dir, questions)
    after = greedy_replies(out, questions)
    assert not any(reply.startswith(FORMAT) for reply in before), before
    assert all(reply.startswith(FORMAT) for reply in after), after


def test_merge_of_the_trained_adapter_passes_and_equals_peft(tmp_path, smollm2_dir, sft_adapter, capsys):
    """fp32 and bf16 merges pass the check; the merged model equals peft's merge_and_unload (logits in
    fp32, weights bit for bit in bf16); one layer's delta dropped still fails, with nothing written."""
    from peft import PeftModel
    from safetensors.torch import load_file
    from test_inference import drop_one_layer
    from transformers import LlamaForCausalLM

    from bumblecore.model.lora import merge_lora

    adapter, _ = sft_adapter
    ids = torch.randint(0, 49152, (1, 24), generator=torch.Generator().manual_seed(3))
    merge_lora(str(smollm2_dir), str(adapter), str(tmp_path / "fp32"))
    merge_lora(str(smollm2_dir), str(adapter), str(tmp_path / "bf16"), dtype="bfloat16")
    print(capsys.readouterr().out)  # the measured differences and bounds, for the record
    with torch.no_grad():
        unmerged = PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(smollm2_dir), str(adapter)).eval()
        expected = unmerged(ids).logits
        base = LlamaForCausalLM.from_pretrained(smollm2_dir).eval()(ids).logits
        merged = LlamaForCausalLM.from_pretrained(tmp_path / "fp32").eval()(ids).logits
    assert (merged - expected).abs().max() < 1e-3 < (base - expected).abs().max()

    oracle = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16), str(adapter)
    ).merge_and_unload()
    saved = load_file(tmp_path / "bf16" / "model.safetensors")
    for name, weight in oracle.state_dict().items():
        if name in saved:
            assert torch.equal(saved[name], weight), name

    # bf16, where a layer's delta moves the logits less than the merge's own rounding (tiny models: fp32 too)
    with pytest.MonkeyPatch.context() as patch:
        drop_one_layer(patch, layer=15)
        with pytest.raises(ValueError, match=r"model\.layers\.15\..*nothing was written"):
            merge_lora(str(smollm2_dir), str(adapter), str(tmp_path / "wrong"), dtype="bfloat16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "fp32"]


def test_dpo_with_lora_prefers_the_chosen_replies(tmp_path, smollm2_dir, sft_data):
    with open(tmp_path / "dpo.jsonl", "w", encoding="utf-8") as f:
        for a, b in TRAIN_PAIRS:
            pair = {"chosen": f"{FORMAT}{a + b}", "rejected": f"The sum of {a} and {b} is {a + b}."}
            f.write(json.dumps({"instruction": question(a, b), "input": "", **pair}) + "\n")
    history = run(
        tmp_path / "dpo",
        smollm2_dir,
        tmp_path / "dpo.jsonl",
        "dpo",
        finetuning_type="lora",
        max_steps=6,
        learning_rate=5e-4,
        train_micro_batch_size_per_gpu=2,
        pref_beta=0.1,
    )
    steps = [r for r in history if "rewards/margins" in r]
    assert len(steps) == 6
    assert abs(steps[0]["rewards/margins"]) < 0.05  # the policy starts as the reference
    last = steps[-3:]
    assert all(r["rewards/chosen"] > r["rewards/rejected"] for r in last)
    assert sum(r["rewards/accuracies"] for r in last) / 3 > 0.8
    assert min(r["rewards/margins"] for r in last) > steps[0]["rewards/margins"] + 0.5
    assert (tmp_path / "dpo" / "adapter_model.safetensors").is_file()


def test_serve_answers_the_openai_client_as_generate_does(smollm2_dir, sft_adapter):
    openai = pytest.importorskip("openai")
    from serving import running_server

    adapter, _ = sft_adapter
    questions = [question(a, b) for a, b in HELD_OUT[:2]]
    expected = greedy_replies(adapter, questions)
    with running_server(str(adapter), api_key="real", max_batch_size=2) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="real", max_retries=0, timeout=120)
        for text, reply in zip(questions, expected):
            answer = client.chat.completions.create(
                model="bumblebee",
                messages=[{"role": "user", "content": text}],
                max_tokens=12,
                temperature=0,
            )
            assert answer.choices[0].message.content == reply
            assert reply.startswith(FORMAT)


def test_continued_pretraining_lowers_the_loss_on_its_text(tmp_path, smollm2_dir):
    """Oracle: transformers' own loss on the documents, before and after (full fine-tuning, 6 steps)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    documents = [
        "The bumblebee colony of Lindenhof keeps 412 workers, 3 queens and a gardener named Ottilie.",
        "Every spring Ottilie counts the Lindenhof bees twice and writes the numbers into a green book.",
    ]
    with open(tmp_path / "text.jsonl", "w", encoding="utf-8") as f:
        for doc in documents:
            f.write(json.dumps({"text": doc}) + "\n")

    def loss(model_dir) -> float:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        model = LlamaForCausalLM.from_pretrained(model_dir).eval()
        with torch.no_grad():
            return sum(
                model(ids, labels=ids).loss.item()
                for ids in (tokenizer(d, return_tensors="pt").input_ids for d in documents)
            )

    history = run(
        tmp_path / "cpt",
        smollm2_dir,
        tmp_path / "text.jsonl",
        "continue_pretrain",
        finetuning_type="full",
        max_steps=6,
        learning_rate=5e-5,
        train_micro_batch_size_per_gpu=2,
    )
    assert len([r for r in history if "loss" in r]) == 6
    assert loss(tmp_path / "cpt") < 0.7 * loss(smollm2_dir)
