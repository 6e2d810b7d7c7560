"""Models Bumblebee does not implement (Mistral, Phi-3, Gemma, custom code ...) through transformers'
AutoModelForCausalLM, behind the same interface the stages use."""

from __future__ import annotations

import torch
from torch import nn


class TransformersCausalLM(nn.Module):
    """forward(input_ids, position_ids, segment_ids, return_hidden_states) and `lm_head`, like Bumblebee.
    Packed rows are not supported here (the stages train these models unpacked)."""

    is_transformers_fallback = True

    def __init__(self, model):
        super().__init__()
        self.hf = model
        self.config = model.config

    @property
    def lm_head(self):
        return self.hf.get_output_embeddings()

    def forward(self, input_ids, position_ids=None, attention_mask=None, segment_ids=None, return_hidden_states=False):
        if segment_ids is not None:
            raise ValueError("packed rows (segment_ids) are not supported for transformers models; set packing: false")
        hidden = self.hf.get_decoder()(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask).last_hidden_state
        return hidden if return_hidden_states else self.lm_head(hidden)

    def set_gradient_checkpointing(self, enabled: bool = True) -> None:
        if enabled:
            self.hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    def save_pretrained(self, directory, state_dict=None, **kwargs) -> None:
        if state_dict is not None:
            state_dict = {k.removeprefix("hf."): v for k, v in state_dict.items()}
        self.hf.save_pretrained(str(directory), state_dict=state_dict, safe_serialization=True, max_shard_size="5GB")


def load_transformers_model(config) -> TransformersCausalLM:
    from transformers import AutoConfig, AutoModelForCausalLM

    if config.training_stage == "pretrain":
        hf_config = AutoConfig.from_pretrained(config.model_name_or_path, trust_remote_code=config.trust_remote_code)
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(hf_config, trust_remote_code=config.trust_remote_code)
    else:
        model = AutoModelForCausalLM.from_pretrained(config.model_name_or_path, torch_dtype=torch.float32,
                                                     trust_remote_code=config.trust_remote_code)
    wrapped = TransformersCausalLM(model)
    if config.enable_gradient_checkpointing:
        wrapped.set_gradient_checkpointing(True)
    return wrapped
