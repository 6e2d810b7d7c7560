"""`compile: true` (model/regional_compile.py): each decoder layer compiled once by inductor and reused,
the loss chunks compiled; the oracle is the same run eager. Compiling is slow on CPU, so these are few:
one in-process pair per path (packed rows with gradient checkpointing; LoRA with dropout on padded rows
of changing length), a resume, and one 2-process launch for DDP and ZeRO-2."""

import json
import shutil
from pathlib import Path

import pytest
import yaml
from tiny import init_tiny_model_dir, max_weight_difference, tiny_run_keys, train_on_two_processes

import bumblecore
from bumblecore.args import TrainArgs
from bumblecore.cli import main

DEMO = Path(bumblecore.__file__).parent / "demo_data"
REPO = Path(__file__).resolve().parents[2]
ZERO = {stage: str(REPO / "configs" / "deepspeed" / f"ds_z{stage}_config.json") for stage in (2, 3)}


def run_keys(model, **keys) -> dict:
    pretraining = dict(
        training_stage="pretrain",
        model_name_or_path=str(model),
        dataset_path=str(DEMO / "pretrain.jsonl"),
        max_steps=4,
        gradient_accumulation_steps=2,
        accelerator="cpu",
        save_steps=2,
        save_total_limit=5,
        report_to="none",
    )
    return tiny_run_keys(**{**pretraining, **keys})


def write_config(path: Path, model, **keys) -> Path:
    path.write_text(yaml.safe_dump(run_keys(model, **keys)))
    return path


def train(root: Path, name: str, model, **keys) -> list[dict]:
    main(["train", "--config", str(write_config(root / f"{name}.yaml", model, output_dir=str(root / name), **keys))])
    return [json.loads(line) for line in (root / name / "metrics.jsonl").read_text().splitlines()]


def assert_same_curve(compiled: list[dict], eager: list[dict]) -> None:
    assert [r["step"] for r in compiled] == [r["step"] for r in eager]
    for ours, oracle in zip(compiled, eager):
        assert ours["loss"] == pytest.approx(oracle["loss"], abs=1e-5), ours["step"]
        assert ours["grad_norm"] == pytest.approx(oracle["grad_norm"], abs=1e-5), ours["step"]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A pretrained tiny model (4 eager pretraining steps from the init)."""
    root = tmp_path_factory.mktemp("compile_base")
    train(root, "base", init_tiny_model_dir(root / "init"), max_steps=2)
    return root / "base"


@pytest.mark.slow
def test_packed_rows_compile_once_equal_eager_and_resume_exactly(tmp_path, base):
    """Packed pretraining with gradient checkpointing: each of the 8 micro-batches has other document
    boundaries, yet no code object is compiled more than twice (Dynamo is told to fail instead): the two
    layers share one graph, the per-document attention runs eagerly between its two halves, and the
    document count's one recompile makes it dynamic (automatic dynamic shapes), never one per step.
    The losses and gradient norms equal eager's, and a run resumed at step 2 ends with the uninterrupted
    run's losses and weights, bit for bit."""
    import torch._dynamo

    keys = dict(enable_gradient_checkpointing=True, packing=True)
    eager = train(tmp_path, "eager", base, **keys)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(recompile_limit=2, fail_on_recompile_limit_hit=True):
        compiled = train(tmp_path, "compiled", base, compile=True, **keys)
    assert_same_curve(compiled, eager)

    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(tmp_path / "compiled" / "checkpoint-2", resumed / "checkpoint-2")
    history = train(tmp_path, "resumed", base, compile=True, resume_from_checkpoint="latest", **keys)
    assert [r["loss"] for r in history] == [r["loss"] for r in compiled[2:]]
    assert (tmp_path / "compiled" / "model.safetensors").read_bytes() == (resumed / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_lora_with_dropout_on_padded_rows_equals_eager(tmp_path, base):
    """SFT LoRA (peft-wrapped layers, adapter dropout 0.1) on unpacked rows whose length changes per
    batch: dropout draws eager's numbers (fallback_random), the loss curve is eager's."""
    keys = dict(
        training_stage="sft",
        dataset_path=str(DEMO / "sft_train.jsonl"),
        finetuning_type="lora",
        lora_rank=4,
        lora_alpha=8,
        lora_dropout=0.1,
        packing=False,
    )
    eager = train(tmp_path, "eager", base, **keys)
    compiled = train(tmp_path, "compiled", base, compile=True, **keys)
    assert_same_curve(compiled, eager)
    assert max_weight_difference(tmp_path / "eager", tmp_path / "compiled", "adapter_model.safetensors") < 1e-5


@pytest.mark.slow
def test_ddp_and_zero_compiled_equal_one_eager_process(tmp_path, base):
    """2 gloo ranks with compile: true, under DDP, DeepSpeed ZeRO-2 and ZeRO-3 (its hooks gather each
    layer's partitioned weights around the compiled forward), end with the weights of one eager process
    accumulating the same 2 micro-batches."""
    config = write_config(tmp_path / "ddp.yaml", base, gradient_accumulation_steps=1, max_steps=3, save_steps=100)
    main(
        ["train", "--config", str(config), "--output_dir", str(tmp_path / "one"), "--gradient_accumulation_steps", "2"]
    )
    for name, extra in {"ddp": [], **{f"zero{s}": ["--deepspeed_config_path", ZERO[s]] for s in (2, 3)}}.items():
        train_on_two_processes(config, tmp_path / name, "--compile", "true", *extra, cwd=tmp_path, timeout=600)
        assert yaml.safe_load((tmp_path / name / "training_args.yaml").read_text())["compile"] is True
        worst = max_weight_difference(tmp_path / "one", tmp_path / name)
        assert worst < 1e-5, f"{name}: max weight difference {worst}"


@pytest.mark.slow
def test_transformers_family_layers_compile_and_equal_eager(tmp_path):
    """Phi-3 through transformers (TransformersCausalLM): the blocks the family names in
    _no_split_modules compile, its plain head's loss chunks too, and the SFT loss and every gradient
    equal eager's."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    from bumblecore.model.regional_compile import compile_for_training
    from bumblecore.train.setup import load_transformers_model
    from bumblecore.train.sft import LanguageModelingStage

    torch.manual_seed(0)
    shape = dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2)
    Phi3ForCausalLM(Phi3Config(vocab_size=128, num_hidden_layers=2, pad_token_id=0, **shape)).save_pretrained(tmp_path)
    ids = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    batch, stage = {"input_ids": ids, "labels": ids}, LanguageModelingStage()
    results = []
    for compiled in (False, True):
        model = load_transformers_model(str(tmp_path)).train()
        if compiled:
            notes = compile_for_training(model, model.lm_head)
            assert notes == ["compile: 2 decoder layers compiled (one graph, reused), the loss chunks too"]
        loss, _ = stage.loss(model, batch)
        (loss / stage.count(batch)).backward()
        results.append((loss.item() / stage.count(batch), [p.grad for p in model.parameters()]))
    (eager, eager_grads), (ours, grads) = results
    assert ours == pytest.approx(eager, abs=1e-5)
    assert max((a - b).abs().max().item() for a, b in zip(grads, eager_grads)) < 1e-5


def test_compile_refusals_come_before_anything_is_written(tmp_path):
    """A stage not checked compiled (DPO), LoRA under ZeRO-3 and tiling are refused by name before the output dir exists."""
    from bumblecore.train.run import train as train_run

    model = init_tiny_model_dir(tmp_path / "model")
    out = tmp_path / "out"
    dpo = run_keys(
        model, output_dir=str(out), compile=True, training_stage="dpo", dataset_path=str(DEMO / "dpo_train.jsonl")
    )
    with pytest.raises(ValueError, match="compile: true is not supported for training_stage dpo"):
        train_run(TrainArgs.from_flat(**dpo))
    zero3 = run_keys(model, output_dir=str(out), compile=True, deepspeed_config_path=ZERO[3], finetuning_type="lora")
    with pytest.raises(ValueError, match="compile: true with LoRA under DeepSpeed ZeRO-3 is not supported"):
        train_run(TrainArgs.from_flat(**zero3))
    tiled = run_keys(model, output_dir=str(out), compile=True, tiled_mlp=2)
    with pytest.raises(ValueError, match="compile: true together with tiled_mlp is not checked"):
        train_run(TrainArgs.from_flat(**tiled))
    assert not out.exists()
