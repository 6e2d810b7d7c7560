"""LoRA through peft, for any family: wrap a model's linear layers (training), save the adapter in the
standard peft files, attach one to its base (inference) and merge it into a full model (`bumblecore merge_lora`)."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path
from typing import Optional

from torch import nn

from bumblecore.model.adapter_base import FINGERPRINT_FILE, adapter_base_dir, base_fingerprint

# A reward model's (model/reward.py) LoRA is peft's SEQ_CLS task: the adapter on the body and these heads
# trained in full beside it (modules_to_save), saved as peft saves them (`base_model.model.score.weight`).
try:  # the heads peft itself trains in full beside a SEQ_CLS adapter: ours must write the same list
    from peft.peft_model import CLASSIFIER_MODULE_NAMES as SEQ_CLS_HEADS  # peft >= 0.22 adds "pre_classifier"
except ImportError:
    SEQ_CLS_HEADS = ("classifier", "score")


def linear_layer_names(model) -> list[str]:
    """peft's "all-linear" for any family: the last name of every linear layer except the output head
    (Qwen2/Llama: q/k/v/o_proj, gate/up/down_proj; Phi-3: qkv_proj, o_proj, gate_up_proj, down_proj)
    or a reward model's score head."""
    from transformers.pytorch_utils import Conv1D  # GPT-2-style layers are linear too

    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else getattr(model, "lm_head", None)
    names: dict[str, None] = {}
    for name, module in model.named_modules():
        last = name.rsplit(".", 1)[-1]
        if isinstance(module, (nn.Linear, Conv1D)) and module is not head and last not in ("lm_head", *SEQ_CLS_HEADS):
            names[last] = None
    if not names:
        raise ValueError(f"{type(model).__name__} has no linear layers for LoRA; set lora_target_modules")
    return list(names)


def apply_lora(
    model,
    rank: int,
    alpha: int,
    dropout: float,
    target_modules: Optional[list[str]] = None,
    trainable_token_indices: Optional[dict[str, list[int]]] = None,
    zero3: bool = False,
    variants: Optional[dict] = None,
):
    """The model with LoRA adapters on `target_modules` (default: every linear layer but the output
    head, whatever the family); only the adapters train, and the embedding rows of
    `trainable_token_indices` (tokens added to the vocabulary: model/vocab.py), also under ZeRO-3 (`zero3`).
    `variants`: LoraConfig arguments of DoRA, rsLoRA, PiSSA / OLoRA, modules_to_save (model/lora_options.py).
    A reward model's score head trains in full beside the adapter, as peft's SEQ_CLS task has it (under
    ZeRO-3 peft gathers the partitioned head to copy it; DeepSpeed partitions the copy at setup)."""
    from peft import LoraConfig, PeftModel

    from bumblecore.model.lora_options import keep_initial_adapter
    from bumblecore.model.vocab import trainable_tokens_under_zero3, whole_token_weights

    targets, reward = target_modules or linear_layer_names(model), getattr(model, "is_reward_model", False)
    variants = dict(variants or {})
    saved = list(variants.pop("modules_to_save", None) or []) + (list(SEQ_CLS_HEADS) if reward else [])
    config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=targets,
        bias="none",
        trainable_token_indices=trainable_token_indices,
        task_type="SEQ_CLS" if reward else None,
        modules_to_save=saved or None,
        **variants,
    )
    # The plain PeftModel (get_peft_model's choice without a task): its forward is the model's own.
    with whole_token_weights(model) if trainable_token_indices else contextlib.nullcontext():
        peft_model = PeftModel(model, config)
    if trainable_token_indices and zero3:
        trainable_tokens_under_zero3(peft_model)
    if isinstance(config.init_lora_weights, str) and config.init_lora_weights != "gaussian":  # PiSSA, OLoRA
        keep_initial_adapter(peft_model)
    return peft_model


def attach_adapter(base, adapter_dir):
    """A peft adapter on `base`, whatever `task_type` it was saved with (peft's docs, TRL and
    LLaMA-Factory write CAUSAL_LM, whose wrapper needs transformers' generation hooks; the plain
    PeftModel holds the same weights and runs the same forward)."""
    from peft import PeftConfig, PeftModel

    adapter_config = PeftConfig.from_pretrained(str(adapter_dir))
    adapter_config.task_type = None
    return PeftModel.from_pretrained(base, str(adapter_dir), config=adapter_config)


# ---------------------------------------------------------------------------- saving and merging


def save_adapter(
    peft_model, directory, base_model_path: str, state_dict: Optional[dict] = None, fingerprint: Optional[dict] = None
) -> None:
    """adapter_config.json + adapter_model.safetensors, with base_model_name_or_path pointing at the base,
    and base_fingerprint.json describing that base (`fingerprint`: taken when training started; default:
    the base as it is now). `state_dict`: the adapter's tensors gathered from their ZeRO-3 shards
    (default: the live ones). A PiSSA / OLoRA adapter is saved relative to the original base."""
    from bumblecore.model.lora_options import converted_config, on_original_base

    state_dict, converted = on_original_base(peft_model, state_dict)
    peft_model.save_pretrained(str(directory), safe_serialization=True, state_dict=state_dict)
    if getattr(peft_model.get_base_model(), "is_transformers_fallback", False):
        # Trained through our wrapper (its model under `.hf`): store the names a peft model over the
        # plain transformers model has, so every peft user (and our own loaders) can apply it.
        from safetensors.torch import load_file, save_file

        weights = Path(directory) / "adapter_model.safetensors"
        renamed = {name.replace(".hf.", ".", 1): tensor for name, tensor in load_file(weights).items()}
        save_file(renamed, weights, metadata={"format": "pt"})
    config_file = Path(directory) / "adapter_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["base_model_name_or_path"] = str(Path(base_model_path).resolve())
    config.pop("auto_mapping", None)  # the base is a plain HF-format dir; any peft user can load it
    if converted:
        config = converted_config(config)
    config_file.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    fingerprint = fingerprint or base_fingerprint(base_model_path)
    (Path(directory) / FINGERPRINT_FILE).write_text(json.dumps(fingerprint, indent=2) + "\n", encoding="utf-8")


def _logits(model, ids):
    out = model(ids)
    return (out.logits if hasattr(out, "logits") else out).float()  # transformers returns an output object


def merge_and_check_weights(peft_model):
    """Merge every LoRA layer into its base weight and check each merged weight against W + scale * B @ A
    computed here in float32. A merged element may differ from it only by the rounding of the merge
    itself: one ulp of the result plus the rounding of the rank-r product, i.e.
    eps * (|W + dW| + (r + 1) * scale * |B| @ |A|) with eps the weight dtype's machine epsilon.
    Returns (the plain merged model, the worst error / bound ratio, the module it occurs in)."""
    import warnings

    import torch
    from peft.tuners.lora import Linear as LoraLinear

    worst, worst_module = 0.0, ""
    for name, module in peft_model.named_modules():
        if not isinstance(module, LoraLinear):
            continue
        adapters = [a for a in module.active_adapters if a in module.lora_A]
        # DoRA and other variants rescale the merged weight; the logits check covers them.
        plain = not any(a in module.lora_variant for a in adapters)
        weight = module.get_base_layer().weight
        if plain:
            expected = weight.detach().float().clone()
            spread = torch.zeros_like(expected)
            for adapter in adapters:
                a, b = module.lora_A[adapter].weight.detach().float(), module.lora_B[adapter].weight.detach().float()
                scale = module.scaling[adapter]
                delta, size = (b @ a) * scale, (b.abs() @ a.abs()) * (abs(scale) * (a.shape[0] + 1))
                expected += delta.T if module.fan_in_fan_out else delta
                spread += size.T if module.fan_in_fan_out else size
        module.merge(adapter_names=adapters)
        if plain:
            eps = torch.finfo(weight.dtype).eps
            bound = eps * (expected.abs() + spread) + torch.finfo(torch.float32).tiny
            ratio = ((weight.detach().float() - expected).abs() / bound).max().item()
            if ratio > worst:
                worst, worst_module = ratio, name
    with warnings.catch_warnings():  # every layer is merged already; peft says so once per layer
        warnings.filterwarnings("ignore", message="All adapters are already merged")
        return peft_model.merge_and_unload(), worst, worst_module


def logit_bound(expected, num_layers: int, hidden_size: int, dtype) -> float:
    """How far a correct merge's logits may be from the unmerged model's, both computed in float32 (the
    merged weights read from the saved files, the base's as loaded in `dtype`). Two sources, each scaled by
    the logits' size M = max|logit|: float32 sums every product in a different order (x @ (W + dW) vs
    x @ W + (x @ A) @ B), an error that grows like a random walk over the hidden sums and the layers,
    16 * eps32 * M * sqrt(layers * hidden); and in a half dtype each merged weight is rounded to it, at most
    half an ulp at random in every layer, 4 * eps(dtype) * M * sqrt(layers). Calibration (measured on correct
    merges, in docs/INFERENCE.md) keeps a margin of at least 3 on tiny models of every family and SmolLM2."""
    import torch

    scale = expected.abs().max().item()
    layers = max(num_layers, 1)
    arithmetic = 16 * torch.finfo(torch.float32).eps * scale * math.sqrt(layers * max(hidden_size, 1))
    rounding = 4 * torch.finfo(dtype).eps * scale * math.sqrt(layers) if dtype != torch.float32 else 0.0
    return arithmetic + rounding


def merge_lora(
    base_model_path: str,
    lora_model_path: str,
    save_path: str,
    max_shard_size: str = "5GB",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    ignore_base_mismatch: bool = False,
) -> None:
    """Merge a LoRA adapter into its base and save a full Hugging Face model, then check it.

    Works for any family and any peft task_type; a reward model's adapter (SEQ_CLS) gives a full reward
    model (model/reward.py), its trained score head included. Two checks, and `save_path` appears (or an
    existing model there is replaced) only when both pass: every merged weight equals W + scale * B @ A up
    to the rounding of the dtype; the saved model's logits (a reward model's per-token scores) on a few
    probe tokens equal the unmerged (base + adapter) model's within a bound that scales with them, the
    dtype's epsilon and the depth.

    Args:
        base_model_path: the base model directory the adapter was trained on.
        lora_model_path: the adapter directory (adapter_config.json + adapter_model.safetensors).
        save_path: where the merged model is written (config, sharded safetensors, tokenizer, generation config).
        max_shard_size: largest safetensors shard.
        dtype: auto (the base's), float32, float16 or bfloat16.
        trust_remote_code: allow a base model (and tokenizer) that ships its own modelling code.
        ignore_base_mismatch: merge into a base other than the one the adapter was trained on (its base_fingerprint.json says which) instead of refusing.
    """
    import tempfile

    import torch

    from bumblecore.model.hf_config import dtype_name
    from bumblecore.model.hf_io import replace_directory
    from bumblecore.model.reward import is_reward_adapter, load_reward_model
    from bumblecore.model.transformers_family import load_model
    from bumblecore.model.vocab import adapter_vocab_size, grow_vocab
    from bumblecore.tokenizer import load_tokenizer

    adapter_base_dir(lora_model_path, base_model_path, ignore_base_mismatch)  # an adapter dir on its own base
    out = Path(save_path)
    if out.exists() and not (out.is_dir() and (not any(out.iterdir()) or (out / "config.json").is_file())):
        raise FileExistsError(f"save_path {out} exists and is not a model directory; choose a new or empty directory")
    tokenizer_dir = lora_model_path if (Path(lora_model_path) / "tokenizer_config.json").is_file() else base_model_path
    tokenizer = load_tokenizer(tokenizer_dir, trust_remote_code=trust_remote_code)
    rows = adapter_vocab_size(lora_model_path, tokenizer, base_model_path)
    reward = is_reward_adapter(lora_model_path)

    def load(path, model_dtype):  # a reward model's adapter: its body under a score head the adapter holds
        if reward:
            model = load_reward_model(path, model_dtype, None, trust_remote_code, tokenizer.pad_token_id)
            return getattr(model, "hf", model)  # transformers' own class: the adapter's names are its names
        return load_model(path, model_dtype, trust_remote_code=trust_remote_code)

    def base_with_rows(model_dtype):
        base = load(base_model_path, model_dtype)
        grow_vocab(base, rows)  # rows for tokens added in training (the adapter holds their values)
        return base

    unmerged = attach_adapter(base_with_rows(dtype), lora_model_path).eval()
    torch_dtype = next(unmerged.parameters()).dtype
    name = dtype_name(torch_dtype)
    config = unmerged.get_base_model().config
    with torch.no_grad():
        merged, weight_ratio, worst_module = merge_and_check_weights(unmerged)
    if weight_ratio > 1:
        raise ValueError(
            f"merge check failed: {lora_model_path} into {base_model_path}: the merged weight of {worst_module} is "
            f"{weight_ratio:.3g} times further from W + scale * B @ A than {name} rounding allows; nothing was written"
        )

    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.merging-", dir=out.parent))
    try:
        merged.save_pretrained(staging, max_shard_size=max_shard_size)
        del merged, unmerged
        tokenizer.save_pretrained(str(staging))
        for source in (Path(lora_model_path), Path(base_model_path)):  # the adapter's own stop tokens first
            if (source / "generation_config.json").is_file():
                shutil.copy(source / "generation_config.json", staging / "generation_config.json")
                break
        # The end-to-end check, in float32 so that only the merge's own rounding shows: the oracle is peft's
        # unmerged model over the base as loaded in the merge's dtype; the merged model is read back from disk.
        probe = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            base = base_with_rows(name).float()
            expected = _logits(attach_adapter(base, lora_model_path).float().eval(), probe)
            del base
            got = _logits(load(staging, "float32").eval(), probe)
        difference = (got - expected).abs().max().item()
        bound = logit_bound(
            expected, getattr(config, "num_hidden_layers", 1), getattr(config, "hidden_size", 1), torch_dtype
        )
        top1 = (got.argmax(-1) == expected.argmax(-1)).sum().item()
        agrees = "" if reward else f", top-1 token agrees on {top1} of {probe.numel()} probe positions"
        print(
            f"merged {lora_model_path} into {base_model_path} -> {save_path} ({name}): weights within "
            f"{weight_ratio:.2g} of their rounding bound; max logit difference merged vs unmerged {difference:.3g} "
            f"(bound {bound:.3g}){agrees}"
        )
        # A top-1 flip needs a logit difference of at least half the unmerged model's lead, so within the bound
        # only near ties can flip: the bound alone is the check.
        if not difference <= bound:
            raise ValueError(
                f"merge check failed: {lora_model_path} into {base_model_path}: max logit difference merged vs "
                f"unmerged {difference:.3g} exceeds the bound {bound:.3g} for {name} (max|logit| "
                f"{expected.abs().max().item():.3g}, {getattr(config, 'num_hidden_layers', 1)} layers); "
                f"nothing was written to {save_path}"
            )
        replace_directory(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
