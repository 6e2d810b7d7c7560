"""The LoRA variants users ask for, through peft: DoRA, rsLoRA, PiSSA / OLoRA initialisation, LoRA+'s
learning rate for the B matrices, and modules trained in full beside the adapter (`modules_to_save`).

PiSSA and OLoRA start the adapter from the base's own principal directions (an SVD, a QR) and take
them out of the base weight: the model trains on W_res = W - s * B0 @ A0. An adapter saved as trained
would only be right on W_res, which no one else has; so the initial B0, A0 ride along as buffers
(saved with the resume state) and every saved adapter is converted to the update relative to the
original base: s * (B @ A - B0 @ A0) = s * [B, -B0] @ [A; A0], a plain LoRA of rank 2r (the PiSSA
paper's conversion, which peft's save_pretrained offers through a second adapter loaded from disk).
"""

from __future__ import annotations

import re
from typing import Optional

from bumblecore.args import LORA_INITS, LoraArgs

# Buffers of each LoRA layer holding its adapter's initial values (PiSSA / OLoRA). No "lora_" in the
# names: peft's state-dict filter takes every "lora_" key into a saved adapter.
INITIAL_A, INITIAL_B = "initial_down", "initial_up"


def mutates_base(lora: LoraArgs) -> bool:
    """PiSSA and OLoRA take the adapter's start out of the base weights."""
    return lora.lora_init.startswith("pissa") or lora.lora_init == "olora"


def check_lora_options(lora: LoraArgs, stage_of_zero: Optional[int], adapter_off_reference: bool) -> None:
    """Refusals before anything is written: a value peft does not know, and what cannot be made
    correct (`adapter_off_reference`: the stage's reference is the policy with its adapter switched off)."""
    if lora.lora_init not in LORA_INITS[:3] + LORA_INITS[4:] and not re.fullmatch(r"pissa_niter_\d+", lora.lora_init):
        raise ValueError(f"lora_init {lora.lora_init!r} is not one of {', '.join(LORA_INITS)}")
    if lora.loraplus_lr_ratio is not None and not lora.loraplus_lr_ratio > 0:
        raise ValueError(f"loraplus_lr_ratio must be > 0, got {lora.loraplus_lr_ratio}")
    if mutates_base(lora) and adapter_off_reference:
        raise ValueError(
            f"lora_init {lora.lora_init} trains on the base minus the adapter's start, so this stage's reference "
            "(the policy with its adapter switched off) would not be the original model; use lora_init default "
            "or gaussian, or a reference of its own (ref_model_path)"
        )
    if stage_of_zero == 3:
        # peft reads (DoRA's norms, PiSSA's SVD, OLoRA's QR) or copies (modules_to_save) whole base weights
        # when it wraps a layer; under our ZeRO-3 each rank holds only a slice of them then.
        used = [
            key
            for key, on in (
                ("use_dora", lora.use_dora),
                (f"lora_init {lora.lora_init}", mutates_base(lora)),
                ("lora_modules_to_save", bool(lora.lora_modules_to_save)),
            )
            if on
        ]
        if used:
            raise ValueError(
                f"{', '.join(used)} with ZeRO-3: peft reads or copies whole base weights when it adds the adapter, "
                "and under ZeRO-3 each process holds only a slice of them; use ZeRO-0/1/2 or DDP"
            )


def lora_config_options(lora: LoraArgs) -> dict:
    """The LoraConfig arguments of the variants."""
    init = {"default": True}.get(lora.lora_init, lora.lora_init)
    return {
        "use_dora": lora.use_dora,
        "use_rslora": lora.use_rslora,
        "init_lora_weights": init,
        "modules_to_save": lora.lora_modules_to_save or None,
    }


def keep_initial_adapter(peft_model) -> None:
    """PiSSA / OLoRA: each LoRA layer keeps its adapter's initial A0, B0 as buffers (what a saved adapter
    is converted with; saved and restored with the model in every resume state)."""
    from peft.tuners.lora import LoraLayer

    for module in peft_model.modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            module.register_buffer(INITIAL_A, module.lora_A["default"].weight.detach().clone())
            module.register_buffer(INITIAL_B, module.lora_B["default"].weight.detach().clone())


def on_original_base(peft_model, state: Optional[dict]) -> tuple[Optional[dict], bool]:
    """(`state` (peft model names; None: the live model's) with the adapter tensors as the update relative
    to the original base: lora_A -> [A; A0], lora_B -> [B, -B0] (rank 2r), other tensors as they are;
    whether it was converted). Unchanged when no layer keeps an initial adapter (plain inits)."""
    import torch

    if not any(hasattr(module, INITIAL_A) for module in peft_model.modules()):
        return state, False
    converted = dict(state if state is not None else peft_model.state_dict())
    for name, module in peft_model.named_modules():
        initial_a = getattr(module, INITIAL_A, None)
        if initial_a is None:
            continue
        a_key, b_key = f"{name}.lora_A.default.weight", f"{name}.lora_B.default.weight"
        a, b = converted[a_key], converted[b_key]
        initial_b = getattr(module, INITIAL_B)
        converted[a_key] = torch.cat([a, initial_a.to(a.device, a.dtype)], dim=0)
        converted[b_key] = torch.cat([b, -initial_b.to(b.device, b.dtype)], dim=1)
    return converted, True


def converted_config(config: dict) -> dict:
    """adapter_config.json of a converted adapter: rank 2r with the same scale (alpha / r, or alpha /
    sqrt(r) under rsLoRA), applied to the base as it is (plain init)."""
    config = dict(config)
    config["r"] = 2 * config["r"]
    config["lora_alpha"] = config["lora_alpha"] * (2**0.5 if config.get("use_rslora") else 2)
    config["init_lora_weights"] = True
    return config


# ---------------------------------------------------------------------------- LoRA+


def is_lora_b(name: str) -> bool:
    """LoRA+'s B matrices: the up-projections of the adapters (linear and embedding layers)."""
    return ".lora_B." in name or ".lora_embedding_B." in name
