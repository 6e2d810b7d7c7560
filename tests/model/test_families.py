"""Every model family, end to end: BumbleCore's first-step loss equals the family's own
`model(input_ids, labels=...).loss`, and greedy generation through our inference path equals
transformers' `generate`. Tiny random models built with transformers' own config classes."""

import pytest
import torch
import transformers
from transformers import GenerationConfig

from bumblecore import Bumblebee
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.model.transformers_family import TransformersCausalLM
from bumblecore.train.losses import check_loss_parity, chunked_cross_entropy, shift_targets
from bumblecore.train.setup import _is_bumblebee, load_transformers_model
from bumblecore.train.sft import LanguageModelingStage

VOCAB = 96
LOSS_RTOL = 1e-4
SHAPE = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    initializer_range=0.2,
    pad_token_id=0,
    bos_token_id=1,
    eos_token_id=2,
)
MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)

# family -> (config class, model class, extra config, native in Bumblebee)
FAMILIES = {
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(sliding_window=6), True),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(head_dim=32), True),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(), False),
    # A small cap, so that softcapping changes the loss a lot (30 barely touches a tiny model's logits).
    "gemma2": (
        "Gemma2Config",
        "Gemma2ForCausalLM",
        dict(head_dim=16, final_logit_softcapping=3.0, sliding_window=6),
        False,
    ),
    "gemma3_text": (
        "Gemma3TextConfig",
        "Gemma3ForCausalLM",
        dict(head_dim=16, final_logit_softcapping=3.0, sliding_window=6),
        False,
    ),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM", dict(MOE, shared_expert_intermediate_size=48), False),
    # The family's loss includes the router aux loss when output_router_logits is set: so must ours.
    "qwen3_moe+aux": (
        "Qwen3MoeConfig",
        "Qwen3MoeForCausalLM",
        dict(MOE, output_router_logits=True, router_aux_loss_coef=0.5),
        False,
    ),
    "mixtral+aux": (
        "MixtralConfig",
        "MixtralForCausalLM",
        dict(num_local_experts=4, num_experts_per_tok=2, output_router_logits=True, router_aux_loss_coef=0.5),
        False,
    ),
    "glm4": ("Glm4Config", "Glm4ForCausalLM", dict(head_dim=16), False),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(), False),
    "cohere": ("CohereConfig", "CohereForCausalLM", dict(logit_scale=0.25), False),
    "granite": ("GraniteConfig", "GraniteForCausalLM", dict(logits_scaling=4.0), False),
}
# Families whose forward does something after the hidden states: the naive loss must differ from theirs.
POST_HEAD = {"gemma2", "gemma3_text", "qwen3_moe+aux", "mixtral+aux", "cohere", "granite"}


def build(family, tmp_path):
    config_name, model_name, extra, native = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SHAPE, **extra})
    model = getattr(transformers, model_name)(config)
    with torch.no_grad():  # norm weights start at 1 (or 0 for Gemma's 1 + w): perturb them so a norm slip shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model.eval(), native


def ours_for(path, native):
    if native:
        return Bumblebee.from_pretrained(path)
    return load_transformers_model(str(path))


def sft_batch():
    input_ids = torch.randint(3, VOCAB, (2, 17), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    labels[0, :6] = -100  # a prompt: not trained
    labels[1, 13:] = -100  # right padding
    return {"input_ids": input_ids, "labels": labels}


class IdsTokenizer:
    """Just enough tokenizer for GenerationEngine: token ids as text."""

    eos_token_id = None

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def greedy_ours(model, prompts, new_tokens):
    if getattr(model, "is_transformers_fallback", False):
        model = TransformersCausalLM(
            model.hf, for_training=False
        )  # what bumblecore.inference.loading gives a transformers family
    engine = GenerationEngine(model, IdsTokenizer(), max_batch_size=len(prompts), eos_token_ids=[])
    results = engine.generate(prompts, SamplingParams(max_new_tokens=new_tokens, ignore_eos=True))
    return [r["token_ids"] for r in results]


def greedy_transformers(hf, prompt, new_tokens):
    # No EOS at all (min_new_tokens would instead forbid it, changing the argmax): ours runs with ignore_eos.
    hf.generation_config.eos_token_id = None
    settings = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = hf.generate(torch.tensor([prompt]), generation_config=settings)[0, len(prompt) :].tolist()
    assert len(out) == new_tokens
    return out


@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_loss_and_greedy_generation_equal_transformers(tmp_path, family):
    hf, native = build(family, tmp_path)
    assert _is_bumblebee(tmp_path) == native  # where train/run.py sends it
    ours = ours_for(tmp_path, native)
    assert getattr(ours, "is_transformers_fallback", False) != native
    batch = sft_batch()

    # The loss of the first step, as the engine computes it: the stage's summed loss over its count.
    hf.train()
    ours.train()
    reference = hf(batch["input_ids"], labels=batch["labels"]).loss.item()
    stage = LanguageModelingStage()
    total, _ = stage.loss(ours, batch)
    loss = total.item() / stage.count(batch)
    assert abs(loss - reference) <= LOSS_RTOL * abs(reference), f"{family}: ours {loss} vs the family's {reference}"
    if family in POST_HEAD:  # the plain head on the hidden states would have trained another objective
        hidden = ours(batch["input_ids"], return_hidden_states=True)
        plain, count = chunked_cross_entropy(hidden, ours.hf.get_output_embeddings(), shift_targets(batch["labels"]))
        assert abs(plain.item() / count - reference) > 1e-2 * reference
    total.backward()  # and it trains: gradients reach the weights
    assert all(p.grad is not None for p in ours.parameters() if p.requires_grad and p.dim() == 2)

    hf.eval()
    ours.eval()
    prompts = [torch.randint(3, VOCAB, (n,), generator=torch.Generator().manual_seed(n)).tolist() for n in (9, 4)]
    with torch.no_grad():
        got = greedy_ours(ours, prompts, new_tokens=6)
    assert got == [greedy_transformers(hf, p, 6) for p in prompts], family


def test_gemma2_fallback_trains_the_softcapped_objective(tmp_path):
    """The family's default cap (30): the fallback once skipped it and trained on raw logits."""
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**SHAPE, "initializer_range": 2.0}, head_dim=16)
    assert config.final_logit_softcapping == 30.0
    hf = transformers.Gemma2ForCausalLM(config).eval()
    ours = TransformersCausalLM(hf)
    ids = sft_batch()["input_ids"]
    with torch.no_grad():
        expected = hf(ids).logits
        assert (ours(ids) - expected).abs().max().item() < 1e-4 * expected.abs().max().item()
        assert (
            expected.abs().max().item() < 30.0 < (hf.lm_head(ours(ids, return_hidden_states=True))).abs().max().item()
        )
    ours_loss, reference = check_loss_parity(ours)
    assert abs(ours_loss - reference) <= LOSS_RTOL * reference


class ScaledLlama(transformers.LlamaForCausalLM):
    """Custom code that scales its logits after lm_head, named by no config attribute."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = out.logits * 3.0
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_unknown_post_head_logic_is_refused():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(**SHAPE)
    with pytest.raises(ValueError, match="differs from the family's own.*refusing"):
        check_loss_parity(TransformersCausalLM(ScaledLlama(config)))
    check_loss_parity(TransformersCausalLM(transformers.LlamaForCausalLM(config)))  # the plain family passes
    config.output_multiplier = 2.0  # a post-head attribute of a family we do not reproduce
    with pytest.raises(ValueError, match="output_multiplier"):
        TransformersCausalLM(transformers.LlamaForCausalLM(config))


def test_gemma2_first_logged_loss_of_a_train_run_is_the_familys(tmp_path, capsys):
    """The whole path (bumblecore train: data, engine, fallback, chunked loss): step 1's logged loss
    equals Gemma-2's own loss on that step's batch (one document, so the batch is known)."""
    import json
    from pathlib import Path

    import yaml

    import bumblecore
    from bumblecore.cli import main
    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(Path(bumblecore.__file__).parent / "demo_data" / "tokenizer")
    torch.manual_seed(0)
    config = transformers.Gemma2Config(**{**SHAPE, "vocab_size": 768}, head_dim=16, final_logit_softcapping=3.0)
    hf = transformers.Gemma2ForCausalLM(config)
    hf.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(str(tmp_path / "model"))
    (tmp_path / "doc.jsonl").write_text(json.dumps({"text": "the quick brown fox jumps over the lazy dog " * 3}) + "\n")
    run = {
        "training_stage": "continue_pretrain",
        "model_name_or_path": str(tmp_path / "model"),
        "dataset_path": str(tmp_path / "doc.jsonl"),
        "output_dir": str(tmp_path / "out"),
        "cutoff_len": 64,
        "max_steps": 1,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "packing": False,
        "train_model_precision": "fp32",
        "learning_rate": 1e-3,
        "warmup_ratio": 0.0,
    }
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(run))
    main(["inspect_data", "--config", str(tmp_path / "run.yaml"), "--num_samples", "1", "--format", "json"])
    sample = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    main(["train", "--config", str(tmp_path / "run.yaml")])
    logged = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    with torch.no_grad():
        reference = hf.eval()(torch.tensor([sample["input_ids"]]), labels=torch.tensor([sample["labels"]])).loss.item()
    first = next(r["loss"] for r in logged if "loss" in r)
    assert abs(first - reference) <= LOSS_RTOL * reference, (first, reference)


# ---------------------------------------------------------------------------- LoRA on every family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_lora_targets_every_linear_layer_and_the_adapter_generates_and_merges(family, tmp_path):
    """Default targets equal peft's own "all-linear"; an adapter over transformers' class loads through
    our inference path (generate, chat, serve) and merges, both equal to the unmerged peft model."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    import bumblecore
    from bumblecore.inference.loading import load_for_inference
    from bumblecore.model.lora import linear_layer_names, merge_lora
    from bumblecore.tokenizer import load_tokenizer

    config_name, model_name, extra, _ = FAMILIES[family]
    tok = load_tokenizer(bumblecore.__path__[0] + "/demo_data/tokenizer")
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(**{**SHAPE, **extra, "vocab_size": 768})
    base = getattr(transformers, model_name)(config)
    base.save_pretrained(tmp_path / "base")
    tok.save_pretrained(str(tmp_path / "base"))
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base")  # so the adapter records its base directory

    ours = linear_layer_names(base)
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    assert set(ours) == {name.rsplit(".", 1)[-1] for name in peft_model.peft_config["default"].target_modules}
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(tmp_path / "adapter")

    ids = torch.randint(3, 768, (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = (
            PeftModel.from_pretrained(
                AutoModelForCausalLM.from_pretrained(tmp_path / "base"), str(tmp_path / "adapter")
            )
            .eval()(ids)
            .logits
        )
        model, _, _ = load_for_inference(str(tmp_path / "adapter"), device_map="cpu")
        got = model.hf(ids).logits if isinstance(model, TransformersCausalLM) else model(ids)
        assert (got - expected).abs().max() < 1e-4
    merge_lora(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    with torch.no_grad():
        merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()(ids).logits
    assert (merged - expected).abs().max() < 1e-4
