"""Liger kernels (model/liger.py, `enable_liger_kernel`): the swap keeps every weight and name, a run that
cannot use them is refused before it writes anything, and, where liger's Triton kernels can run (CUDA, or
the CPU through TRITON_INTERPRET=1 with liger-kernel installed), the swapped model computes what ours does:
logits, the summed cross-entropy and every gradient (oracle: the same model without the swap)."""

import copy
import importlib.util
import json
import os

import pytest
import torch
from tiny import make_tiny_model

from bumblecore.args import TrainArgs
from bumblecore.model.liger import LIGER_KERNELS, use_liger_kernels
from bumblecore.train.losses import chunked_cross_entropy


def test_the_swap_keeps_every_weight_and_name():
    model = make_tiny_model()  # 2 layers: 2 norms each and the final one
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert use_liger_kernels(model) == ["rms_norm x5", "swiglu x2", "rope x2", "cross_entropy x1"]
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    assert model.lm_head.weight is model.model.embed_tokens.weight  # still tied
    # No kernel where liger has none here: a LayerNorm model, a gelu MLP.
    other = make_tiny_model(norm_type="layernorm", hidden_act="gelu")
    assert use_liger_kernels(other) == ["rms_norm x0", "swiglu x0", "rope x2", "cross_entropy x1"]
    with pytest.raises(ValueError, match="unknown liger kernels \\['layer_norm'\\]"):
        use_liger_kernels(model, ("layer_norm",))


def _run_keys(tmp_path, model_dir) -> dict:
    (tmp_path / "d.jsonl").write_text(json.dumps({"instruction": "hi", "output": "bee"}) + "\n")
    return {
        "model_name_or_path": str(model_dir),
        "dataset_path": str(tmp_path / "d.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "enable_liger_kernel": True,
    }


def test_enable_liger_kernel_is_refused_before_anything_is_written(tmp_path, tiny_checkpoint):
    from bumblecore.train.run import train

    keys = _run_keys(tmp_path, tiny_checkpoint(tmp_path / "qwen2"))
    cuda = torch.cuda.is_available()
    installed = importlib.util.find_spec("liger_kernel") is not None
    if installed and cuda:
        pytest.skip("liger can run here: nothing to refuse")
    reason = (
        "liger-kernel is not installed: pip install 'bumblecore\\[gpu\\]'"
        if not installed
        else "liger.s Triton kernels need a CUDA GPU"
    )
    with pytest.raises(ValueError, match=f"enable_liger_kernel: {reason}"):
        train(TrainArgs.from_flat(**keys))
    if installed:  # on a CUDA machine, the CPU asked for by name is refused too
        with pytest.raises(ValueError, match="this run's device is cpu"):
            train(TrainArgs.from_flat(**keys, accelerator="cpu"))
    assert not (tmp_path / "out").exists()


def test_a_transformers_family_is_refused(tmp_path):
    from bumblecore.train.run import train

    (tmp_path / "gpt2").mkdir()
    (tmp_path / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ValueError, match="enable_liger_kernel: model_name_or_path .* trains through transformers"):
        train(TrainArgs.from_flat(**_run_keys(tmp_path, tmp_path / "gpt2")))
    assert not (tmp_path / "out").exists()


def liger_kernels_here() -> tuple[str, tuple]:
    """The device and the kernels that run there: all on CUDA; on the CPU through Triton's interpreter,
    RoPE and the fused cross-entropy (liger's RMSNorm and SwiGLU call .to on Python scalars, which
    Triton 3.9's interpreter does not give them)."""
    pytest.importorskip("liger_kernel")
    if torch.cuda.is_available():
        return "cuda", LIGER_KERNELS
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("liger's Triton kernels need CUDA, or TRITON_INTERPRET=1 on the CPU")
    return "cpu", ("rope", "cross_entropy")


@pytest.mark.parametrize("qk_norm", [False, True])
def test_liger_kernels_compute_what_ours_do(qk_norm):
    device, kernels = liger_kernels_here()
    ours = make_tiny_model(qk_norm=qk_norm, tie_word_embeddings=False).to(device).train()
    theirs = copy.deepcopy(ours)
    use_liger_kernels(theirs, kernels)
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(0, 768, (2, 24), generator=generator).to(device)
    targets = torch.randint(0, 768, (2, 24), generator=generator).to(device)
    targets[0, :5] = -100  # an untrained prompt
    results = []
    for model in (ours, theirs):
        hidden = model(input_ids, return_hidden_states=True)
        total, count = chunked_cross_entropy(hidden, model.lm_head, targets)
        total.backward()
        results.append((model.lm_head(hidden).detach(), total.detach(), count, model))
    (logits, total, count, _), (liger_logits, liger_total, liger_count, _) = results
    torch.testing.assert_close(liger_logits, logits, rtol=1e-5, atol=1e-5)
    assert liger_count == count == 43
    torch.testing.assert_close(liger_total, total, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=name)
