"""Runtime: precision names, DeepSpeed "auto" filling (the original's rules), clear CPU errors."""

import json
from pathlib import Path

import pytest

from bumblecore.train.runtime import build_fabric, fabric_precision, fill_deepspeed_config, load_deepspeed_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "deepspeed"


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_shipped_configs_fill_completely(stage):
    raw = load_deepspeed_config(CONFIGS / f"ds_z{stage}_config.json")
    filled = fill_deepspeed_config(raw, micro_batch_size=4, gradient_accumulation_steps=8, world_size=2,
                                   precision="bf16", max_grad_norm=1.0, hidden_size=896)
    assert "auto" not in json.dumps(filled)
    assert filled["train_batch_size"] == 64 and filled["train_micro_batch_size_per_gpu"] == 4
    assert filled["gradient_accumulation_steps"] == 8 and filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    zero = filled["zero_optimization"]
    assert zero["stage"] == stage
    if stage >= 1:
        assert zero["reduce_bucket_size"] == 896 * 896
    if stage == 3:
        assert zero["stage3_prefetch_bucket_size"] == int(0.9 * 896 * 896)
        assert zero["stage3_param_persistence_threshold"] == 8960
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True


def test_explicit_values_are_kept_and_unknown_auto_is_an_error():
    raw = {"train_micro_batch_size_per_gpu": 2, "gradient_clipping": 0.5, "optimizer": {"params": {"lr": "auto"}}}
    with pytest.raises(ValueError, match="optimizer.params.lr"):
        fill_deepspeed_config(raw, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1, precision="fp32",
                              max_grad_norm=1.0, hidden_size=64)
    del raw["optimizer"]
    filled = fill_deepspeed_config(raw, micro_batch_size=4, gradient_accumulation_steps=1, world_size=1, precision="fp32",
                                   max_grad_norm=1.0, hidden_size=64)
    assert filled["train_micro_batch_size_per_gpu"] == 2 and filled["gradient_clipping"] == 0.5


def test_precision_and_cpu_errors():
    assert fabric_precision("bf16") == "bf16-mixed" and fabric_precision("fp32") == "32-true"
    with pytest.raises(ValueError, match="fp64"):
        fabric_precision("fp64")
    with pytest.raises(ValueError, match="DeepSpeed needs CUDA"):
        build_fabric(accelerator="cpu", deepspeed_config={"train_micro_batch_size_per_gpu": 1})
    fabric = build_fabric(accelerator="cpu", devices=1, train_model_precision="fp32")
    assert fabric.world_size == 1
