"""LoRA reward models (model/lora.py on model/reward.py): the adapter on the body and the `score` head
trained in full beside it, as peft's SEQ_CLS task has it. Oracles: peft itself (the adapter it writes
for transformers' *ForSequenceClassification, and PeftModel.from_pretrained over transformers' model
giving our scores, and a run's eval metrics), transformers (a merged reward model's scores equal the
unmerged peft model's), an uninterrupted run (resume) and one process (ZeRO-3 on 2 CPU ranks)."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import transformers
import yaml
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny import DEMO_TOKENIZER, make_tiny_model, tiny_run_keys, write_tiny_checkpoint
from transformers import AutoModelForSequenceClassification

import bumblecore
from bumblecore.args import DataArgs
from bumblecore.cli import main
from bumblecore.data.dataset import dataset_units
from bumblecore.data.loader import eval_batches
from bumblecore.model.lora import apply_lora, linear_layer_names, merge_lora, save_adapter
from bumblecore.model.reward import load_reward_model
from bumblecore.recipes import recipe_for
from bumblecore.tokenizer import load_tokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = Path(bumblecore.__file__).parent / "demo_data"

TOLERANCE = 1e-5  # fp32 scores of the same weights through two implementations
# A merged weight W + scale * B @ A is rounded once more in fp32: measured up to 7e-6 of max|score|.
MERGED_TOLERANCE = 5e-5


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(DEMO_TOKENIZER)


def phi3_checkpoint(out, tokenizer):
    """A family Bumblebee does not implement: its reward model goes through transformers."""
    torch.manual_seed(0)
    config = transformers.Phi3Config(
        vocab_size=-(-len(tokenizer) // 64) * 64,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        pad_token_id=tokenizer.pad_token_id,
    )
    transformers.Phi3ForCausalLM(config).save_pretrained(out)
    tokenizer.save_pretrained(str(out))
    return out


@pytest.fixture(scope="module", params=["qwen2", "phi3"])
def base(request, tmp_path_factory, tokenizer):
    """A causal LM directory (the model a reward model starts from): Qwen2 runs natively, Phi-3 through transformers."""
    out = tmp_path_factory.mktemp(request.param)
    return write_tiny_checkpoint(out) if request.param == "qwen2" else phi3_checkpoint(out, tokenizer)


def padded_batch(tokenizer):
    """Rows of different lengths, right- and left-padded: each score is read at the row's last real token."""
    pad = tokenizer.pad_token_id
    ids = torch.randint(3, 400, (3, 12), generator=torch.Generator().manual_seed(1))
    ids[0, 8:] = pad
    ids[1, :4] = pad
    return ids, (ids != pad).long()


def trained_reward_adapter(base, tokenizer, out):
    """Our LoRA reward model over `base`, every trainable tensor moved off its init (as training would),
    saved as the run saves it; returns the live peft model."""
    model = apply_lora(load_reward_model(base, "float32", pad_token_id=tokenizer.pad_token_id), 4, 8, 0.0)
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.2 * torch.randn(p.shape, generator=generator))
    save_adapter(model, out, str(base))
    tokenizer.save_pretrained(str(out))
    return model.eval()


def peft_over_transformers(base, adapter, pad):
    """The oracle: peft's own loading of the adapter over transformers' reward model of the base."""
    body = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
    return PeftModel.from_pretrained(body, str(adapter)).eval()


def test_the_head_trains_in_full_beside_the_adapter(base, tokenizer, tmp_path):
    model = trained_reward_adapter(base, tokenizer, tmp_path / "adapter")
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    heads = [n for n in trainable if "score" in n]
    hidden = model.get_base_model().config.hidden_size
    assert len(heads) == 1 and heads[0].endswith("score.modules_to_save.default.weight")  # peft's trained copy
    assert trainable[heads[0]] == hidden  # the whole head, not an adapter of it
    assert all("lora_" in n for n in trainable if n not in heads)
    fresh = load_reward_model(base, "float32")
    assert "score" not in linear_layer_names(fresh)  # the head is not an adapter target


def test_our_adapter_is_what_peft_writes_and_gives_our_scores_in_peft(base, tokenizer, tmp_path):
    ours = trained_reward_adapter(base, tokenizer, tmp_path / "ours")
    ours_config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    targets, pad = ours_config["target_modules"], tokenizer.pad_token_id
    # peft's own adapter for transformers' reward model of the same base, the same targets
    body = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1, pad_token_id=pad)
    config = LoraConfig(task_type="SEQ_CLS", r=4, lora_alpha=8, lora_dropout=0.0, target_modules=targets)
    get_peft_model(body, config).save_pretrained(str(tmp_path / "peft"))
    theirs_config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    for key in ("task_type", "modules_to_save", "peft_type", "r", "lora_alpha"):
        assert ours_config[key] == theirs_config[key], key
    assert sorted(ours_config["target_modules"]) == sorted(theirs_config["target_modules"])
    theirs_tensors = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    ours_tensors = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    assert sorted(ours_tensors) == sorted(theirs_tensors) and "base_model.model.score.weight" in ours_tensors
    assert all(ours_tensors[k].shape == theirs_tensors[k].shape for k in ours_tensors)

    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        expected = peft_over_transformers(base, tmp_path / "ours", pad)(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = ours.rewards(ids, mask)
    assert (got - expected).abs().max().item() < TOLERANCE


def test_merge_lora_writes_a_reward_model_scoring_as_the_unmerged_one(base, tokenizer, tmp_path, capsys):
    ours = trained_reward_adapter(base, tokenizer, tmp_path / "adapter")
    merge_lora(str(base), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    assert "max logit difference merged vs unmerged" in capsys.readouterr().out
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["architectures"][0].endswith("ForSequenceClassification") and len(config["id2label"]) == 1
    assert config["pad_token_id"] == tokenizer.pad_token_id

    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    trained_head = load_file(tmp_path / "adapter" / "adapter_model.safetensors")["base_model.model.score.weight"]
    assert torch.equal(merged.score.weight, trained_head)  # the head as trained, not the base's new one
    ids, mask = padded_batch(tokenizer)
    with torch.no_grad():
        unmerged = peft_over_transformers(base, tmp_path / "adapter", tokenizer.pad_token_id)
        expected = unmerged(input_ids=ids, attention_mask=mask).logits[:, 0]
        got = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
        assert (ours.rewards(ids, mask) - expected).abs().max().item() < TOLERANCE
    assert (got - expected).abs().max().item() < MERGED_TOLERANCE * expected.abs().max().item()


# ---------------------------------------------------------------------------- runs


@pytest.fixture(scope="module")
def run_inputs(tmp_path_factory, tokenizer):
    """A causal LM to start from (init std 0.02, as a real one) and preference pairs from the demo."""
    root = tmp_path_factory.mktemp("rm_lora")
    make_tiny_model(768, 2, initializer_range=0.02, attention_bias=True).save_pretrained(root / "start")
    tokenizer.save_pretrained(str(root / "start"))
    for name, source, count in (("train", "dpo_train", 32), ("eval", "dpo_eval", 8)):
        lines = (DEMO / f"{source}.jsonl").read_text(encoding="utf-8").splitlines()[:count]
        (root / f"{name}.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def run(output_dir, inputs, **keys):
    lora_rm = dict(
        training_stage="rm",
        finetuning_type="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.0,
        model_name_or_path=str(inputs / "start"),
        dataset_path=str(inputs / "train.jsonl"),
        cache_dir=str(inputs / "cache"),
        output_dir=str(output_dir),
        accelerator="cpu",
        warmup_ratio=0.0,
        max_steps=4,
        gradient_accumulation_steps=2,
        save_steps=2,
    )
    config = tiny_run_keys(**{**lora_rm, **keys})
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])
    return [json.loads(line) for line in (Path(output_dir) / "metrics.jsonl").read_text().splitlines()]


def eval_pairs(inputs, tokenizer):
    """The eval file's pairs as the run renders them: 2n rows, the chosen ones first."""
    data = DataArgs(dataset_path=str(inputs / "eval.jsonl"), cutoff_len=128, cache_dir=str(inputs / "cache"))
    _, units = dataset_units(data, recipe_for("rm").reading, 42, tokenizer, data.dataset_path, progress=False)
    batch = eval_batches(units, len(units), tokenizer.pad_token_id, packing=False)[0]
    return batch["input_ids"], int(batch["num_pairs"])


def test_a_lora_run_evaluates_as_peft_scores_its_adapter_and_merges(tmp_path, run_inputs, tokenizer, capsys):
    out = tmp_path / "out"
    history = run(out, run_inputs, eval_dataset_path=str(run_inputs / "eval.jsonl"))
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["task_type"] == "SEQ_CLS" and "score" in config["modules_to_save"]
    head = "base_model.model.score.weight"
    assert not torch.equal(
        load_file(out / "checkpoint-2" / "adapter_model.safetensors")[head],
        load_file(out / "adapter_model.safetensors")[head],
    )

    # The oracle: the run's last evaluation (the final adapter) from peft's scores of the eval pairs
    ids, n = eval_pairs(run_inputs, tokenizer)
    mask = (ids != tokenizer.pad_token_id).long()
    peft_model = peft_over_transformers(run_inputs / "start", out, tokenizer.pad_token_id)
    with torch.no_grad():
        scores = peft_model(input_ids=ids, attention_mask=mask).logits[:, 0]
    chosen, rejected = scores[:n].double(), scores[n:].double()
    last = [r for r in history if "eval/loss" in r][-1]
    assert last["step"] == 4
    assert last["eval/loss"] == pytest.approx(-F.logsigmoid(chosen - rejected).mean().item(), rel=1e-5)
    assert last["eval/rewards/margins"] == pytest.approx((chosen - rejected).mean().item(), rel=1e-5, abs=1e-6)
    assert last["eval/rewards/chosen"] == pytest.approx(chosen.mean().item(), rel=1e-5, abs=1e-6)
    assert last["eval/rewards/accuracies"] == (chosen > rejected).double().mean().item()

    merge_lora(str(run_inputs / "start"), str(out), str(tmp_path / "merged"))
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        got = merged(input_ids=ids, attention_mask=mask).logits[:, 0]
    assert (got - scores).abs().max().item() < MERGED_TOLERANCE * scores.abs().max().item()
    capsys.readouterr()
    with pytest.raises(SystemExit):  # the adapter scores; it does not generate (one clear line, not a crash)
        main(["generate", "--model_path", str(out), "--prompt", "hi"])
    assert "a reward model (adapter_config.json's task_type SEQ_CLS)" in capsys.readouterr().err


def test_a_lora_run_resumes_exactly(tmp_path, run_inputs):
    keys = dict(max_steps=4, save_steps=2, save_total_limit=5)
    straight = [r for r in run(tmp_path / "a", run_inputs, **keys) if "loss" in r]
    resumed_dir = tmp_path / "c"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "a" / "checkpoint-2", resumed_dir / "checkpoint-2")
    history = run(resumed_dir, run_inputs, **keys, resume_from_checkpoint="latest")
    assert [r["step"] for r in history] == [3, 4]
    for key in ("loss", "grad_norm", "rewards/margins", "rewards/chosen_std"):
        assert [r[key] for r in history] == [r[key] for r in straight[2:]], key
    weights = "adapter_model.safetensors"
    assert (tmp_path / "a" / weights).read_bytes() == (resumed_dir / weights).read_bytes()


@pytest.mark.slow
def test_zero3_on_two_cpu_ranks_saves_the_whole_adapter_of_one_process(tmp_path, run_inputs):
    """Every LoRA tensor and the head, each whole (a rank's partition of the head is a part of it), equal
    to one process accumulating what the two ranks share."""
    one = tmp_path / "one"
    run(one, run_inputs, save_steps=100, gradient_accumulation_steps=4)
    config = tmp_path / "one.yaml"
    zero3 = str(REPO / "configs" / "deepspeed" / "ds_z3_config.json")
    command = [sys.executable, "-m", "bumblecore", "train", "--config", str(config), "--devices", "2",
               "--gradient_accumulation_steps", "2", "--deepspeed_config_path", zero3,
               "--output_dir", str(tmp_path / "zero3")]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "ZeRO-3" in result.stdout + result.stderr
    plain = load_file(one / "adapter_model.safetensors")
    sharded = load_file(tmp_path / "zero3" / "adapter_model.safetensors")
    assert sorted(sharded) == sorted(plain) and "base_model.model.score.weight" in sharded
    assert all(sharded[k].shape == plain[k].shape and sharded[k].numel() > 0 for k in plain)
    assert max((sharded[k] - plain[k]).abs().max().item() for k in plain) < 1e-4


@pytest.mark.parametrize("finetuning_type", ["full", "lora"])
def test_the_memory_plan_counts_the_reward_model_it_trains(run_inputs, finetuning_type):
    """The plan's parameters and Adam states (fp32, one process: 4 and 8 bytes each) are those of the
    model the run builds: no LM head, the score head trainable (LoRA: peft's trained copy beside it)."""
    from lightning.fabric import Fabric

    from bumblecore.args import TrainArgs
    from bumblecore.train.setup import build_model, load_model, memory_plan, tokenizer_and_vocab, trainable_share

    run = TrainArgs.from_flat(
        training_stage="rm", finetuning_type=finetuning_type, model_name_or_path=str(run_inputs / "start"),
        train_model_precision="fp32", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
    )  # fmt: skip
    fabric, recipe = Fabric(accelerator="cpu", devices=1), recipe_for("rm")
    tokenizer, _ = tokenizer_and_vocab(run, recipe.chat)
    load = lambda *a, **k: load_model(*a, **k, scalar_head=True)  # noqa: E731  (as train/run.py binds it)
    trainable, total = trainable_share(build_model(fabric, run, load, tokenizer, None))
    plan = memory_plan(fabric, run, None, recipe, 1, runtime=0)
    assert (plan.parameters, plan.optimizer) == (4 * total, 8 * trainable)


def test_score_reads_a_lora_reward_adapter_as_peft_scores_it(base, tokenizer, tmp_path):
    """`bumblecore score` (and GRPO's reward_models) on the adapter directory: the base's body, the adapter
    and its trained head, rendered with the adapter's own tokenizer; the oracle is peft's own loading."""
    from bumblecore.inference.scoring import RewardScorer

    trained_reward_adapter(base, tokenizer, tmp_path / "adapter")
    scorer = RewardScorer(str(tmp_path / "adapter"), dtype="float32", device="cpu", batch_size=2)
    conversations = [
        [{"role": "user", "content": "How many legs has a cat?"}, {"role": "assistant", "content": "Four."}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue, the sky's."}],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there, how can I help?"}],
    ]
    got = scorer(conversations)
    oracle = peft_over_transformers(base, tmp_path / "adapter", tokenizer.pad_token_id)
    with torch.no_grad():
        expected = [oracle(input_ids=torch.tensor([scorer.encode(c)])).logits[0, 0].item() for c in conversations]
    assert max(abs(a - b) for a, b in zip(got, expected)) < TOLERANCE
