"""The optimizer a run trains with (`optim`), its parameter groups (weight decay, LoRA+'s learning rate
for the B matrices) and what each optimizer cannot do, refused before anything is written.

adamw        torch's AdamW (the default, as before).
muon         torch's Muon for the hidden weight matrices (every linear layer's weight but the output
             head's), AdamW for the embeddings, the head, norms and biases, as the Muon recipe says;
             one optimizer to the engine (MuonWithAdamW), both stepped together. Its learning rate is
             adjusted per matrix to match AdamW's update size (torch's "match_rms_adamw", Moonshot's
             recipe), so one learning_rate serves both.
adafactor    torch's Adafactor.
sgd          torch's SGD (optim_kwargs: momentum, nesterov, dampening).
adamw_8bit   bitsandbytes' AdamW8bit (CUDA only).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from bumblecore.args import LoraArgs, OptimizationArgs

ADAMW = {"betas": (0.9, 0.999), "eps": 1e-8}  # AdamW's settings, as they always were here


def parameter_groups(model, weight_decay: float, lr: float, loraplus_lr_ratio: Optional[float] = None) -> list[dict]:
    """The trainable parameters in groups: weight decay for matrices only (biases and norm weights, 1-D,
    get none; ZeRO-3 keeps a partitioned weight's real shape in ds_shape), and with LoRA+ the B
    matrices at loraplus_lr_ratio x lr. Always [decay, no decay] first, at lr (the logged lr is group 0's);
    then [decay, no decay] of the B matrices under LoRA+."""
    from bumblecore.model.lora_options import is_lora_b

    groups = {(decays, fast): [] for fast in (False, True) for decays in (True, False)}
    for name, p in model.named_parameters():
        if p.requires_grad:
            decays = len(getattr(p, "ds_shape", p.shape)) >= 2
            groups[(decays, bool(loraplus_lr_ratio) and is_lora_b(name))].append(p)
    return [
        {
            "params": params,
            "weight_decay": weight_decay if decays else 0.0,
            "lr": lr * loraplus_lr_ratio if fast else lr,
        }
        for (decays, fast), params in groups.items()
        if not fast or loraplus_lr_ratio
    ]


def hidden_matrices(model) -> set[int]:
    """ids of the weights Muon trains: every linear layer's weight except the output head's (the head and
    the embeddings are AdamW's in the Muon recipe; a tied head is the embedding)."""
    head = None
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
    embedding_ids = {id(p) for m in model.modules() if isinstance(m, nn.Embedding) for p in m.parameters()}
    chosen = set()
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module is not head and "lm_head" not in name:
            if module.weight.requires_grad and module.weight.dim() == 2 and id(module.weight) not in embedding_ids:
                chosen.add(id(module.weight))
    return chosen


class MuonWithAdamW(torch.optim.Optimizer):
    """Muon for the hidden matrices and AdamW for the rest, as one optimizer: its param_groups are Muon's
    then AdamW's (the same dicts, so the schedule sets both), step and zero_grad run both, and its state
    holds both (a resumed run continues both exactly)."""

    def __init__(self, groups: list[dict], matrices: set[int], muon_kwargs: dict, adamw_kwargs: dict):
        split = [
            ([{**g, "params": [p for p in g["params"] if (id(p) in matrices) == muon]} for g in groups])
            for muon in (True, False)
        ]
        self.muon = torch.optim.Muon(split[0], **muon_kwargs)
        self.adamw = torch.optim.AdamW(split[1], **adamw_kwargs)
        super().__init__(self.muon.param_groups + self.adamw.param_groups, defaults={})

    @torch.no_grad()
    def step(self, closure=None):
        loss = self.muon.step(closure)
        self.adamw.step()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self) -> dict:
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.muon.load_state_dict(state_dict["muon"])
        self.adamw.load_state_dict(state_dict["adamw"])
        # Loading makes new group dicts: share them again, in place (wrappers hold this very list).
        self.param_groups[:] = self.muon.param_groups + self.adamw.param_groups


def build_optimizer_for(model, optimization: OptimizationArgs, lora: Optional[LoraArgs] = None):
    """The run's optimizer over the model's trainable parameters (`lora`: LoRA+'s ratio, under LoRA)."""
    lr, kwargs = optimization.learning_rate, dict(optimization.optim_kwargs)
    ratio = lora.loraplus_lr_ratio if lora is not None else None
    groups = parameter_groups(model, optimization.weight_decay, lr, ratio)
    name = optimization.optim
    try:
        if name == "adamw":
            return torch.optim.AdamW(groups, lr=lr, **{**ADAMW, "fused": True, **kwargs})
        if name == "muon":
            muon = {"lr": lr, "adjust_lr_fn": "match_rms_adamw", **kwargs}
            return MuonWithAdamW(groups, hidden_matrices(model), muon, {"lr": lr, **ADAMW})
        if name == "adafactor":
            return torch.optim.Adafactor(groups, lr=lr, **kwargs)
        if name == "sgd":
            return torch.optim.SGD(groups, lr=lr, **kwargs)
        import bitsandbytes  # adamw_8bit; checked to be installed before the run started

        return bitsandbytes.optim.AdamW8bit(groups, lr=lr, **{**ADAMW, **kwargs})
    except TypeError as err:  # an optim_kwargs key this optimizer does not take
        raise ValueError(f"optim_kwargs {kwargs} for optim {name}: {err}") from None


def check_optimizer(optimization: OptimizationArgs, deepspeed_config_path: Optional[str], accelerator: str) -> None:
    """What an optimizer cannot do here, refused before anything is written (naming the key and why)."""
    name = optimization.optim
    if name in ("muon", "adafactor") and deepspeed_config_path:
        shape = "orthogonalises whole 2-D matrices" if name == "muon" else "factors each matrix's second moment"
        raise ValueError(
            f"optim {name} with DeepSpeed (deepspeed_config_path {deepspeed_config_path}): {name} {shape}, but "
            "DeepSpeed hands a client optimizer flat 1-D slices of the flattened weights; use DDP (devices N "
            "without deepspeed_config_path), or optim adamw or sgd under DeepSpeed"
        )
    if name == "adamw_8bit":
        on_cuda = accelerator in ("cuda", "gpu") or (accelerator == "auto" and torch.cuda.is_available())
        if not on_cuda:
            raise ValueError(
                f"optim adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizer states); accelerator is "
                f"{accelerator}{' and no GPU is visible' if accelerator == 'auto' else ''}. Use optim adamw on CPU"
            )
        try:
            import bitsandbytes  # noqa: F401
        except ImportError:
            raise ValueError(
                "optim adamw_8bit needs bitsandbytes: pip install 'bumblecore[bnb]' (or pip install bitsandbytes)"
            ) from None
    try:  # a key the optimizer does not take, said now rather than after the model is loaded
        probe = [nn.Parameter(torch.zeros(2, 2))]
        if name in ("adafactor", "sgd", "adamw"):
            build = {"adafactor": torch.optim.Adafactor, "sgd": torch.optim.SGD, "adamw": torch.optim.AdamW}[name]
            build(probe, lr=optimization.learning_rate, **optimization.optim_kwargs)
        elif name == "muon":
            torch.optim.Muon(probe, lr=optimization.learning_rate, **optimization.optim_kwargs)
    except (TypeError, ValueError) as err:
        raise ValueError(f"optim_kwargs {optimization.optim_kwargs} for optim {name}: {err}") from None


def deepspeed_client_optimizer(config: dict, optim: str) -> dict:
    """DeepSpeed runs ZeRO only with the optimizers it has tested unless told otherwise. SGD updates each
    element on its own, so ZeRO's flat partitions change nothing for it (checked: tests/train/test_optimizers.py);
    the 8-bit AdamW quantises its states in blocks of the flat tensor it is given (not checked here: no GPU)."""
    if optim in ("sgd", "adamw_8bit"):
        config = {**config, "zero_allow_untested_optimizer": True}
    return config
