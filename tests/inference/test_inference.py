"""Generation against transformers: greedy ids, logits processors, continuous batching, seeded sampling,
streaming text, the generate and chat commands, and merge_lora against the unmerged model."""

import io
import json
import subprocess
import sys

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from bumblecore import Bumblebee
from bumblecore.inference.generate import GenerationEngine, SamplingParams
from bumblecore.inference.sampling import SamplingArgs, apply_repetition_penalty, apply_top_k, apply_top_p
from bumblecore.inference.text_stream import TextStream


def tiny(family, vocab, tmp_path, tokenizer):
    torch.manual_seed(0)
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        initializer_range=0.2,
        max_position_embeddings=256,
        rope_theta=10000.0,
    )
    model = (
        Qwen2ForCausalLM(Qwen2Config(**common)) if family == "qwen2" else LlamaForCausalLM(LlamaConfig(**common))
    ).eval()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(str(tmp_path))
    return model


PROMPTS = ["The bee reads the data.", "蜜蜂", "A small model trains on 42 tokens? The answer: 7 and more", "hi"]


@pytest.mark.parametrize("family", ["qwen2", "llama"])
@pytest.mark.parametrize("penalty", [1.0, 1.3])
def test_greedy_ids_equal_transformers_generate(tmp_path, tok, family, penalty):
    hf = tiny(family, len(tok), tmp_path, tok)
    ours = Bumblebee.from_pretrained(tmp_path)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    engine = GenerationEngine(ours, tok, max_batch_size=2, max_len=128, eos_token_ids=[])  # 4 prompts through 2 slots
    results = engine.generate(prompts, SamplingParams(max_new_tokens=12, repetition_penalty=penalty))
    for prompt, result in zip(prompts, results):
        expected = hf.generate(
            torch.tensor([prompt]),
            max_new_tokens=12,
            do_sample=False,
            repetition_penalty=penalty,
            eos_token_id=None,
            pad_token_id=0,
        )[0, len(prompt) :].tolist()
        assert result["token_ids"] == expected and result["finish_reason"] == "length"


def test_requests_joining_a_running_batch_get_what_they_get_alone(tmp_path, tok):
    tiny("qwen2", len(tok), tmp_path, tok)
    model = Bumblebee.from_pretrained(tmp_path)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS]
    alone = [
        GenerationEngine(model, tok, 1, 128, eos_token_ids=[]).generate([p], SamplingParams(max_new_tokens=8))[0][
            "token_ids"
        ]
        for p in prompts
    ]
    engine = GenerationEngine(model, tok, max_batch_size=4, max_len=128, eos_token_ids=[])
    got = {}
    first = engine.add(prompts[0], SamplingParams(max_new_tokens=8))
    ids = {first: 0}
    for step in range(40):
        if step in (2, 3, 5):  # join between decode steps
            ids[engine.add(prompts[len(ids)], SamplingParams(max_new_tokens=8))] = len(ids)
        for event in engine.step():
            got.setdefault(ids[event.request_id], []).append(event.token_id)
        if len(got) == 4 and not engine.active:
            break
    assert [got[i] for i in range(4)] == alone


def test_processors_equal_transformers_per_row():
    torch.manual_seed(0)
    logits = torch.randn(4, 50) * 3
    history = torch.randint(0, 50, (4, 7))
    seen = torch.zeros(4, 50, dtype=torch.bool).scatter(1, history, True)
    penalties, temps, ks, ps = [1.0, 1.2, 1.5, 2.0], [0.5, 1.0, 1.3, 0.7], [0, 1, 5, 50], [1.0, 0.9, 0.5, 0.1]
    ours_penalty = apply_repetition_penalty(logits, seen, torch.tensor(penalties)[:, None])
    ours_top_k = apply_top_k(logits, torch.tensor(ks))
    ours_top_p = apply_top_p(logits, torch.tensor(ps))
    for row in range(4):
        x = logits[row : row + 1]
        torch.testing.assert_close(
            ours_penalty[row : row + 1],
            RepetitionPenaltyLogitsProcessor(penalties[row])(history[row : row + 1], x.clone()),
        )
        torch.testing.assert_close(x / temps[row], TemperatureLogitsWarper(temps[row])(None, x.clone()))
        if ks[row]:
            assert torch.equal(ours_top_k[row : row + 1], TopKLogitsWarper(ks[row])(None, x.clone()))
        else:
            assert torch.equal(ours_top_k[row], logits[row])
        if ps[row] < 1.0:
            assert torch.equal(ours_top_p[row : row + 1], TopPLogitsWarper(ps[row])(None, x.clone()))


def test_seeded_sampling_is_reproducible_whatever_the_neighbours(tmp_path, tok):
    tiny("qwen2", len(tok), tmp_path, tok)
    model = Bumblebee.from_pretrained(tmp_path)
    prompt = tok("The bee", add_special_tokens=False)["input_ids"]
    seeded = SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=7)
    alone = GenerationEngine(model, tok, 1, 64, eos_token_ids=[]).generate([prompt], seeded)[0]["token_ids"]
    engine = GenerationEngine(model, tok, 3, 64, eos_token_ids=[])
    mixed = engine.generate(
        [prompt, prompt, prompt],
        SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, top_k=40, top_p=0.95, seed=7),
    )
    assert all(r["token_ids"] == alone for r in mixed)
    other = GenerationEngine(model, tok, 1, 64, eos_token_ids=[]).generate(
        [prompt], SamplingParams(max_new_tokens=10, do_sample=True, temperature=1.5, seed=8)
    )[0]["token_ids"]
    assert other != alone


def test_streaming_never_splits_characters(tok):
    text = "蜜蜂喜欢花园里的花。🐝🚀 ok 👩‍👩‍👧"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) > len(text) // 2  # the tiny vocabulary splits characters into bytes
    stream = TextStream(tok, stop=[])
    deltas = [stream.push(i)[0] for i in ids] + [stream.finish()]
    assert "".join(deltas) == tok.decode(ids) == text
    assert not any("\ufffd" in d for d in deltas)


def test_stop_strings_end_and_are_excluded(tok):
    stream = TextStream(tok, stop=["answer"])
    out, stopped = "", False
    for token in tok("The answer: 7", add_special_tokens=False)["input_ids"]:
        delta, stopped = stream.push(token)
        out += delta
        if stopped:
            break
    assert stopped and out == "The "


def test_eos_from_generation_config_stops(tmp_path, tok):
    tiny("qwen2", len(tok), tmp_path, tok)
    model = Bumblebee.from_pretrained(tmp_path)
    prompt = tok("The bee", add_special_tokens=False)["input_ids"]
    free = GenerationEngine(model, tok, 1, 64, eos_token_ids=[]).generate([prompt], SamplingParams(max_new_tokens=6))[0]
    stop_token = free["token_ids"][2]
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [stop_token]}))
    from bumblecore.inference.generate import default_eos_ids

    eos = default_eos_ids(tmp_path, tok)
    result = GenerationEngine(model, tok, 1, 64, eos_token_ids=eos).generate(
        [prompt], SamplingParams(max_new_tokens=6)
    )[0]
    assert (
        result["token_ids"] == free["token_ids"][: free["token_ids"].index(stop_token) + 1]
        and result["finish_reason"] == "stop"
    )
    ignored = GenerationEngine(model, tok, 1, 64, eos_token_ids=eos).generate(
        [prompt], SamplingParams(max_new_tokens=6, ignore_eos=True)
    )[0]
    assert ignored["token_ids"] == free["token_ids"]


@pytest.mark.slow
def test_generate_command_prints_transformers_greedy_text(tmp_path, tok):
    hf = tiny("llama", len(tok), tmp_path, tok)
    from bumblecore.chat.format import render_prompt

    prompt_ids = render_prompt(tok, [{"role": "user", "content": "hello bee"}])
    expected_ids = hf.generate(
        torch.tensor([prompt_ids]), max_new_tokens=10, do_sample=False, eos_token_id=None, pad_token_id=0
    )[0, len(prompt_ids) :]
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            "generate",
            "--model_path",
            str(tmp_path),
            "--prompt",
            "hello bee",
            "--max_new_tokens",
            "10",
            "--ignore_eos",
            "true",
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == tok.decode(expected_ids) + "\n"
    assert "generated 10 tokens in" in result.stderr and "tokens/s" in result.stderr
    prompts = tmp_path / "prompts.txt"
    prompts.write_text('hello bee\n{"prompt": "蜜蜂"}\n')
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "bumblecore",
            "generate",
            "--model_path",
            str(tmp_path),
            "--prompts_file",
            str(prompts),
            "--max_new_tokens",
            "4",
            "--ignore_eos",
            "true",
            "--output_file",
            str(tmp_path / "out.jsonl"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(l) for l in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == ["hello bee", "蜜蜂"] and rows[0]["output"] == tok.decode(expected_ids[:4])


def test_chat_keeps_and_clears_history(tmp_path, tok, monkeypatch, capsys):
    tiny("qwen2", len(tok), tmp_path, tok)
    from bumblecore.inference import commands

    prompts = []
    original = commands.GenerationEngine.stream

    def recording(self, prompt, params):
        prompts.append(tok.decode(prompt))
        yield from original(self, prompt, params)

    monkeypatch.setattr(commands.GenerationEngine, "stream", recording)
    monkeypatch.setattr(sys, "stdin", io.StringIO("first question\nsecond question\n/clear\nthird question\n"))
    commands.chat(str(tmp_path), enable_history=True, sampling=SamplingArgs(max_new_tokens=3))
    assert "first question" not in prompts[0].split("<|im_start|>user")[0]
    assert "first question" in prompts[1] and "second question" in prompts[1]
    assert "first question" not in prompts[2] and "third question" in prompts[2]
    assert len(capsys.readouterr().out.strip().splitlines()) >= 3


def test_merge_lora_equals_unmerged_and_loads_in_transformers(tmp_path, tok):
    from peft import PeftModel

    from bumblecore.model.lora import apply_lora, merge_lora, save_adapter

    tiny("qwen2", len(tok), tmp_path / "base", tok)
    peft_model = apply_lora(Bumblebee.from_pretrained(tmp_path / "base"), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)  # a trained-looking adapter (peft starts B at zero)
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
    merge_lora(str(tmp_path / "base"), str(tmp_path / "adapter"), str(tmp_path / "merged"))
    unmerged = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    ).eval()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, len(tok), (2, 11))
    with torch.no_grad():
        base_logits = AutoModelForCausalLM.from_pretrained(tmp_path / "base")(ids).logits
        expected = unmerged(ids).logits
        assert (merged(ids).logits - expected).abs().max() < 1e-4
        assert (base_logits - expected).abs().max() > 1e-2  # the adapter matters
    assert (tmp_path / "merged" / "tokenizer_config.json").exists() and (
        tmp_path / "merged" / "generation_config.json"
    ).exists()
    # generation loads an adapter dir directly too (base from adapter_config, merged in memory)
    from bumblecore.inference.loading import load_for_inference

    model, _, _ = load_for_inference(str(tmp_path / "adapter"))
    with torch.no_grad():
        assert (model(ids) - expected).abs().max() < 1e-4


def tiny_adapter(tmp_path, tok, std=0.2):
    """A tiny Qwen2 base (tmp_path/base) and a LoRA adapter on it with trained-looking B (tmp_path/adapter)."""
    from bumblecore.model.lora import apply_lora, save_adapter

    tiny("qwen2", len(tok), tmp_path / "base", tok)
    peft_model = apply_lora(Bumblebee.from_pretrained(tmp_path / "base"), rank=4, alpha=8, dropout=0.0)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, std, generator=torch.Generator().manual_seed(len(name)))
    save_adapter(peft_model, tmp_path / "adapter", str(tmp_path / "base"))
    return tmp_path / "base", tmp_path / "adapter"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_lora_passes_and_equals_peft_merge_in_its_dtype(tmp_path, tok, dtype, capsys):
    """Oracle: peft's own merge_and_unload over transformers' model in the same dtype, weight for weight."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from bumblecore.model.lora import merge_lora

    base, adapter = tiny_adapter(tmp_path, tok)
    merge_lora(str(base), str(adapter), str(tmp_path / "merged"), dtype=dtype)
    assert "bound" in capsys.readouterr().out
    oracle = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(base, dtype=getattr(torch, dtype)), adapter
    ).merge_and_unload()
    saved = load_file(tmp_path / "merged" / "model.safetensors")
    for name, weight in oracle.state_dict().items():
        if name in saved:
            assert saved[name].dtype == getattr(torch, dtype)
            assert torch.equal(saved[name], weight), name
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no staging left


def drop_one_layer(monkeypatch, layer: int, per_layer: int = 7):
    """A broken merge: peft's merge of one decoder layer adds no delta (its 7 LoRA layers, q/k/v/o and
    gate/up/down, are merged in module order, layer after layer)."""
    import itertools

    from peft.tuners.lora import Linear

    calls, original = itertools.count(), Linear.get_delta_weight

    def dropping(self, adapter):
        delta = original(self, adapter)
        return delta * 0 if next(calls) // per_layer == layer else delta

    monkeypatch.setattr(Linear, "get_delta_weight", dropping)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_merge_lora_with_a_layer_dropped_fails_and_writes_nothing(tmp_path, tok, dtype, monkeypatch):
    from bumblecore.model.lora import merge_lora

    base, adapter = tiny_adapter(tmp_path, tok, std=0.01)
    drop_one_layer(monkeypatch, layer=1)
    with pytest.raises(
        ValueError, match=r"merge check failed: .*model\.layers\.1\..* times further .*nothing was written"
    ):
        merge_lora(str(base), str(adapter), str(tmp_path / "merged"), dtype=dtype)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base"]


def test_merge_lora_logit_check_fails_a_wrong_model_and_keeps_the_old_one(tmp_path, tok, monkeypatch):
    """The end-to-end check on its own: weights that pass the weight check, then lose one layer's delta
    before saving, fail on logits; an earlier merged model at save_path stays whole."""
    import bumblecore.model.lora as lora

    base, adapter = tiny_adapter(tmp_path, tok, std=0.01)
    lora.merge_lora(str(base), str(adapter), str(tmp_path / "merged"))
    before = {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()}
    checked = lora.merge_and_check_weights

    def then_dropped(peft_model):
        merged, ratio, worst = checked(peft_model)
        reference = AutoModelForCausalLM.from_pretrained(base).state_dict()
        with torch.no_grad():
            for name, weight in merged.named_parameters():
                if "layers.1." in name and name in reference:
                    weight.copy_(reference[name])
        return merged, ratio, worst

    monkeypatch.setattr(lora, "merge_and_check_weights", then_dropped)
    with pytest.raises(
        ValueError, match=r"max logit difference merged vs unmerged \S+ exceeds the bound \S+ for float32"
    ):
        lora.merge_lora(str(base), str(adapter), str(tmp_path / "merged"))
    assert {p.name: p.read_bytes() for p in (tmp_path / "merged").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter", "base", "merged"]


def test_merge_lora_refuses_a_save_path_that_holds_something_else(tmp_path, tok):
    from bumblecore.model.lora import merge_lora

    base, adapter = tiny_adapter(tmp_path, tok)
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="save_path .*notes exists and is not a model directory"):
        merge_lora(str(base), str(adapter), str(tmp_path / "notes"))
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"


def test_other_architectures_generate_through_transformers(tmp_path, tok):
    from transformers import Phi3Config

    from bumblecore.inference.loading import load_for_inference

    torch.manual_seed(0)
    phi = AutoModelForCausalLM.from_config(
        Phi3Config(
            vocab_size=len(tok),
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            pad_token_id=0,
            max_position_embeddings=128,
        )
    ).eval()
    phi.save_pretrained(tmp_path)
    tok.save_pretrained(str(tmp_path))
    model, tokenizer, _ = load_for_inference(str(tmp_path))
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in PROMPTS[:3]]
    results = GenerationEngine(model, tokenizer, max_batch_size=2, max_len=96, eos_token_ids=[]).generate(
        prompts, SamplingParams(max_new_tokens=6)
    )
    for prompt, result in zip(prompts, results):
        expected = phi.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0
        )
        assert result["token_ids"] == expected[0, len(prompt) :].tolist()


def test_greedy_tokens_is_argmax_ties_nan_and_odd_vocab_included():
    from bumblecore.inference.sampling import greedy_tokens

    g = torch.Generator().manual_seed(0)
    for rows, vocab in [(1, 32000), (16, 32000), (3, 256), (4, 300)]:
        logits = torch.randn(rows, vocab, generator=g)
        logits[0, 7] = logits[0, 300 % vocab] = logits[0].max() + 1  # a tie: the first one wins
        if rows > 1:
            logits[1] = float("-inf")
            logits[1, vocab - 1] = 0.0
        if rows > 2:
            logits[2, 200] = float("nan")  # NaN counts as the maximum in argmax
        assert greedy_tokens(logits).tolist() == logits.argmax(-1).tolist()
    assert greedy_tokens(torch.zeros(2, 256)).tolist() == [0, 0]
