"""The static-cache decode step (inference/static_decode.py) against transformers' `generate` and the
engine's own eager decode: greedy ids, rows of different lengths joining and leaving the batch, a
context crossing a length bucket, seeded sampling, weights changed after compiling."""

import pytest
import torch
from test_inference import PROMPTS, tiny
from transformers import AutoModelForCausalLM

from bumblecore import Bumblebee
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.static_decode import SMALLEST_BUCKET, StaticDecodeStep, bucket

LONG = " ".join(["the bee reads the data and trains"] * 8)  # past the first bucket once decoded


def expected_greedy(hf, prompt: list[int], new_tokens: int, penalty: float = 1.0) -> list[int]:
    out = hf.generate(
        torch.tensor([prompt]),
        max_new_tokens=new_tokens,
        do_sample=False,
        repetition_penalty=penalty,
        eos_token_id=None,
        pad_token_id=0,
    )
    return out[0, len(prompt) :].tolist()


def static_engine(model, tokenizer, slots, max_len, compile_step=True) -> GenerationEngine:
    engine = GenerationEngine(model, tokenizer, slots, max_len, eos_token_ids=[], static_cache=True)
    if not compile_step:  # the same step run eagerly (torch.compile wraps it lazily: nothing compiled yet)
        engine.model.static = StaticDecodeStep(model, engine.cache, compile=False, prepared=engine.model.prepared)
    return engine


def test_buckets_double_from_64_up_to_the_cache():
    assert [bucket(n, 1000) for n in (1, 64, 65, 128, 129, 999)] == [64, 64, 128, 128, 256, 1000]
    assert bucket(10, 32) == 32 and SMALLEST_BUCKET == 64


@pytest.mark.parametrize("compile_step", [False, True])
def test_static_greedy_ids_equal_transformers_generate(tmp_path, tok, compile_step):
    hf = tiny("qwen2", len(tok), tmp_path, tok)
    ours = Bumblebee.from_pretrained(tmp_path)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS + [LONG]]
    assert len(prompts[-1]) + 12 > SMALLEST_BUCKET > len(prompts[-1])  # crosses into the next bucket
    # 5 prompts through 2 slots: rows of different lengths, slots freed and taken between steps.
    engine = static_engine(ours, tok, 2, 160, compile_step)
    for penalty in (1.0, 1.3):  # 1.3: the full logits of every row, not only its greedy id
        results = engine.generate(prompts, SamplingParams(max_new_tokens=12, repetition_penalty=penalty))
        for prompt, result in zip(prompts, results):
            assert result["token_ids"] == expected_greedy(hf, prompt, 12, penalty)
            assert result["finish_reason"] == "length"


def test_static_seeded_sampling_equals_the_eager_engine(tmp_path, tok):
    tiny("llama", len(tok), tmp_path, tok)
    ours = Bumblebee.from_pretrained(tmp_path)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    params = [SamplingParams(max_new_tokens=10, do_sample=True, top_k=20, temperature=0.8, seed=i) for i in range(4)]
    eager = GenerationEngine(ours, tok, 3, 96, eos_token_ids=[]).generate(prompts, params)
    static = static_engine(ours, tok, 3, 96, compile_step=False)
    assert [r["token_ids"] for r in static.generate(prompts, params)] == [r["token_ids"] for r in eager]


def test_compiled_step_is_left_when_the_weights_change(tmp_path, tok):
    """Compiled, the weights are frozen into the graph: after an in-place update the engine decodes
    with the eager step, which reads the new weights (the oracle: transformers on the same update)."""
    hf = tiny("qwen2", len(tok), tmp_path, tok)
    ours = Bumblebee.from_pretrained(tmp_path)
    prompt = tok(PROMPTS[0], add_special_tokens=False)["input_ids"]
    engine = GenerationEngine(ours, tok, 1, 64, eos_token_ids=[], static_cache=True)
    params = SamplingParams(max_new_tokens=8)
    assert engine.generate([prompt], params)[0]["token_ids"] == expected_greedy(hf, prompt, 8)
    with torch.no_grad():
        for model in (ours, hf):
            model.get_submodule("model.layers.0.mlp.down_proj").weight.mul_(-3.0)
    assert not engine.model.static.usable()
    assert engine.generate([prompt], params)[0]["token_ids"] == expected_greedy(hf, prompt, 8)


def test_static_cache_refuses_an_unmerged_lora_adapter():
    from peft import LoraConfig, get_peft_model
    from tiny import make_tiny_model

    model = get_peft_model(make_tiny_model(), LoraConfig(r=4, target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="static_cache: true needs the model's own weights: merge the LoRA"):
        GenerationEngine(model, None, 1, 32, eos_token_ids=[], static_cache=True)


@pytest.mark.slow
def test_static_greedy_ids_equal_transformers_on_smollm2(smollm2_dir):
    from bumblecore.chat.format import render_prompt
    from bumblecore.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(str(smollm2_dir))
    hf = AutoModelForCausalLM.from_pretrained(smollm2_dir, torch_dtype=torch.float32).eval()
    ours = Bumblebee.from_pretrained(smollm2_dir).eval()
    questions = ["What is the capital of France?", "Write a haiku about bees.", "2 + 2 =", "Name three colours."]
    prompts = [render_prompt(tokenizer, [{"role": "user", "content": q}]) for q in questions]
    engine = GenerationEngine(ours, tokenizer, 4, 128, eos_token_ids=[], static_cache=True)
    results = engine.generate(prompts, SamplingParams(max_new_tokens=24))
    for prompt, result in zip(prompts, results):
        assert result["token_ids"] == expected_greedy(hf, prompt, 24)
