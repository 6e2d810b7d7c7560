"""Models Bumblebee does not implement (Phi-3, Gemma, GLM, OLMo, MoE families, custom code ...) through
transformers' AutoModelForCausalLM, behind the interface the stages and the GenerationEngine use:
`TransformersCausalLM`.

Training. The stages apply the LM head to hidden states in chunks (losses.chunked_cross_entropy), so
whatever the family's forward does after its decoder has to be done here too:
- logit transforms named by the config (`LOGIT_TRANSFORMS`): Gemma-2/3's final_logit_softcapping,
  Cohere's logit_scale, Granite's logits_scaling; `lm_head` returns the head with the transform applied;
- MoE router load-balancing: when the config sets `output_router_logits`, the family's loss is
  CE + router_aux_loss_coef * aux, so the forward computes aux and the loss adds it (per target token).
Parity means `model(input_ids, labels=...).loss` with the config as given; `train/losses.check_loss_parity` compares
the two on a few tokens when the model is loaded and refuses a family whose loss we do not reproduce
(a config attribute or an `lm_head` wrapper we do not know) instead of training it on another objective.

Generation. The "cache" is each slot's token history (`TokenHistory`) and every step runs the family's
whole forward over the whole sequence: exact and simple, slower than Bumblebee's KV cache.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Optional

import torch
from torch import nn

from bumblecore.model.bumblebee import Bumblebee
from bumblecore.model.hf_config import DTYPES, bumblebee_expresses, read_config, resolve_dtype

# Config attributes (as transformers names them) that rescale the logits after lm_head, applied in
# this order with the head's dtype, as the families do: logits * logit_scale / logits_scaling, then
# cap * tanh(logits / cap).
LOGIT_TRANSFORMS = ("logit_scale", "logits_scaling", "final_logit_softcapping")
# Post-head attributes of families whose logic this wrapper does not reproduce: refused by name.
UNSUPPORTED_POST_HEAD = ("output_multiplier", "lm_head_multiplier", "logits_soft_cap", "unpadded_vocab_size")


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def logit_transform(config) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The family's logits-after-lm_head function read from its config, or None for plain logits."""
    text = _text_config(config)
    for name in UNSUPPORTED_POST_HEAD:
        if getattr(text, name, None) not in (None, 1, 1.0):
            raise ValueError(
                f"{type(config).__name__}.{name}={getattr(text, name)!r} changes the logits after lm_head "
                "in a way BumbleCore's chunked loss does not reproduce; this family is not supported"
            )
    scale = getattr(text, "logit_scale", None)
    divisor = getattr(text, "logits_scaling", None)
    cap = getattr(text, "final_logit_softcapping", None)
    scale = None if scale in (None, 1, 1.0) else float(scale)
    divisor = None if divisor in (None, 1, 1.0) else float(divisor)
    if scale is None and divisor is None and cap is None:
        return None

    def transform(logits: torch.Tensor) -> torch.Tensor:
        if scale is not None:
            logits = logits * scale
        if divisor is not None:
            logits = logits / divisor
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    return transform


class FamilyHead(nn.Module):
    """The output embedding followed by the family's logit transform; `weight` is the head's, so the
    chunked losses size their chunks and match dtypes as for a plain head. Built on each access of
    `TransformersCausalLM.lm_head` (not a registered submodule: no second name for the weights)."""

    def __init__(self, head: nn.Module, transform: Optional[Callable], take_extra_loss: Callable):
        super().__init__()
        self.head = head
        self.transform = transform
        self.take_extra_loss = take_extra_loss

    @property
    def weight(self):
        return self.head.weight

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.head(hidden)
        return logits if self.transform is None else self.transform(logits)


class TokenHistory:
    """What TransformersCausalLM generates from instead of a KV cache: the tokens of each slot."""

    def __init__(self, batch_size: int, max_len: int):
        self.rows: list[list[int]] = [[] for _ in range(batch_size)]
        self.max_len = max_len

    def reset(self, rows: torch.Tensor) -> None:
        for row in rows.tolist():
            self.rows[row] = []


class TransformersWrapper(nn.Module):
    """A transformers model under `hf.`, as our wrappers hold one (the causal LM below, a reward model in
    model/reward.py): its config, its embeddings for peft, checkpointing and saving in its own layout."""

    is_transformers_fallback = True

    def __init__(self, model):
        super().__init__()
        self.hf = model
        self.config = model.config

    # What peft reads to adapt embeddings (trainable tokens): the family's modules, named under `hf.`.
    def get_input_embeddings(self) -> nn.Module:
        return self.hf.get_input_embeddings()

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, directory, state_dict=None, **kwargs) -> None:
        if state_dict is not None:
            state_dict = {k.removeprefix("hf."): v for k, v in state_dict.items()}
        self.hf.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")


class TransformersCausalLM(TransformersWrapper):
    """A transformers model with Bumblebee's interface. For training: forward(input_ids, position_ids,
    segment_ids, return_hidden_states) and `lm_head`; packed rows are not supported (the stages train
    these models unpacked). For generation: `new_cache` and forward(..., kv_cache, cache_rows).

    for_training=False (generation only) skips reproducing the family's post-head logic for the chunked
    loss, and so refuses no family for it: generation runs the family's own whole forward."""

    def __init__(self, model, for_training: bool = True):
        super().__init__(model)
        self.transform = logit_transform(model.config) if for_training else None
        self.router_aux = for_training and bool(getattr(_text_config(model.config), "output_router_logits", False))
        if self.router_aux:
            self._load_balancing = getattr(sys.modules[type(model).__module__], "load_balancing_loss_func", None)
            missing = [
                a for a in ("num_experts", "num_experts_per_tok", "router_aux_loss_coef") if not hasattr(model, a)
            ]
            if self._load_balancing is None or missing:
                raise ValueError(
                    f"{type(model).__name__}: output_router_logits is set but its router loss is not the "
                    "load_balancing_loss_func BumbleCore knows; set output_router_logits false to train without it"
                )
        self._extra_loss: Optional[torch.Tensor] = None

    @property
    def lm_head(self):
        head = self.hf.get_output_embeddings()
        if self.transform is None and not self.router_aux:
            return head
        return FamilyHead(head, self.transform, self.take_extra_loss)

    def get_output_embeddings(self) -> Optional[nn.Module]:
        return self.hf.get_output_embeddings()

    @property
    def _tied_weights_keys(self) -> dict[str, str]:
        if not getattr(_text_config(self.config), "tie_word_embeddings", False):
            return {}
        names = {id(m): n for n, m in self.named_modules()}
        head, embed = names.get(id(self.get_output_embeddings())), names.get(id(self.get_input_embeddings()))
        return {f"{head}.weight": f"{embed}.weight"} if head and embed else {}

    def take_extra_loss(self) -> Optional[torch.Tensor]:
        """The last forward's loss term beyond the cross-entropy (the router aux loss, already weighted
        by router_aux_loss_coef), once: chunked_cross_entropy adds it per target token."""
        extra, self._extra_loss = self._extra_loss, None
        return extra

    def forward(
        self,
        input_ids,
        position_ids=None,
        attention_mask=None,
        segment_ids=None,
        return_hidden_states=False,
        kv_cache: Optional[TokenHistory] = None,
        cache_rows: Optional[torch.Tensor] = None,
    ):
        if kv_cache is not None:
            return self._continue(input_ids, attention_mask, kv_cache, cache_rows)
        if segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are not supported for transformers models; set packing: false")
        extra = {"output_router_logits": True} if self.router_aux else {}
        out = self.hf.get_decoder()(
            input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask, use_cache=False, **extra
        )
        if self.router_aux:
            aux = self._load_balancing(
                out.router_logits, self.hf.num_experts, self.hf.num_experts_per_tok, attention_mask
            )
            self._extra_loss = self.hf.router_aux_loss_coef * aux
        hidden = out.last_hidden_state
        return hidden if return_hidden_states else self.lm_head(hidden)

    # -- generation

    def new_cache(self, batch_size: int, max_len: int) -> TokenHistory:
        return TokenHistory(batch_size, max_len)

    def _continue(self, input_ids, attention_mask, history: TokenHistory, rows: torch.Tensor) -> torch.Tensor:
        """Logits of the new tokens (right-padded per attention_mask), appended to the slots `rows`:
        the family's whole forward over each slot's whole sequence."""
        rows = rows.tolist()
        counts = attention_mask.sum(-1).tolist() if attention_mask is not None else [input_ids.shape[1]] * len(rows)
        for i, (row, n) in enumerate(zip(rows, counts)):
            history.rows[row] += input_ids[i, :n].tolist()
        sequences = [history.rows[r] for r in rows]
        width = max(len(s) for s in sequences)
        ids = torch.zeros(len(rows), width, dtype=torch.long, device=input_ids.device)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, device=ids.device)
            mask[i, : len(s)] = 1
        logits = self.hf(input_ids=ids, attention_mask=mask).logits
        out = torch.zeros(len(rows), input_ids.shape[1], logits.shape[-1], dtype=logits.dtype, device=logits.device)
        for i, (s, n) in enumerate(zip(sequences, counts)):
            out[i, :n] = logits[i, len(s) - n : len(s)]
        return out


def load_model(model_dir, dtype: str = "auto", device=None, trust_remote_code: bool = False):
    """A full model directory of any causal-LM family as a plain torch module: Bumblebee for the families
    it implements (`bumblebee_expresses`), else transformers' own class."""
    if bumblebee_expresses(model_dir):
        return Bumblebee.from_pretrained(model_dir, dtype=resolve_dtype(dtype, read_config(model_dir)), device=device)
    from transformers import AutoModelForCausalLM

    torch_dtype = "auto" if dtype in (None, "auto") else DTYPES[dtype]
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch_dtype, trust_remote_code=trust_remote_code)
    return model.to(device) if device is not None else model
