"""Bumblebee against transformers' Qwen2 / Llama / Qwen3 / Mistral: logits, checkpoints, presets, KV cache;
and the decode-time path (inference/decode.py) against the model."""

import json

import pytest
import torch
from tiny import make_tiny_model
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from bumblecore import Bumblebee, BumblebeeConfig
from bumblecore.inference.decode import DecodingBumblebee, SlotCache
from bumblecore.model.bumblebee import KVCache
from bumblecore.model.config import PRESETS

VOCAB = 96
TOL = 1e-4


def tiny_hf(family="qwen2", tie=False, kv_heads=2, heads=4, **extra):
    torch.manual_seed(0)
    common = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        initializer_range=0.2,
        tie_word_embeddings=tie,
        rope_theta=10000.0,
        max_position_embeddings=256,
        **extra,
    )
    classes = {
        "qwen2": (Qwen2Config, Qwen2ForCausalLM),
        "llama": (LlamaConfig, LlamaForCausalLM),
        "qwen3": (Qwen3Config, Qwen3ForCausalLM),
        "mistral": (MistralConfig, MistralForCausalLM),
    }
    config_class, model_class = classes[family]
    model = model_class(config_class(**common))
    # Norm weights start at 1; perturb them so a norm slip (e.g. a missing weight) shows.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.3 * torch.randn_like(p))
    return model.eval()


def ids(batch=2, seq=19, seed=1):
    return torch.randint(0, VOCAB, (batch, seq), generator=torch.Generator().manual_seed(seed))


CASES = [
    ("qwen2", False, 2, 4),
    ("qwen2", True, 2, 4),
    ("qwen2", False, 1, 4),
    ("qwen2", True, 4, 4),
    ("llama", False, 2, 4),
    ("llama", True, 1, 4),
    ("llama", False, 4, 4),
]


@pytest.mark.parametrize("family,tie,kv_heads,heads", CASES)
def test_logits_equal_transformers(tmp_path, family, tie, kv_heads, heads):
    hf = tiny_hf(family, tie, kv_heads, heads)
    hf.save_pretrained(tmp_path)
    ours = Bumblebee.from_pretrained(tmp_path).eval()
    assert ours.config.attention_bias == (family == "qwen2")
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        for backend in ("sdpa", "eager"):
            for layer in ours.model.layers:
                layer.self_attn.attn_implementation = backend
            diff = (ours(x) - expected).abs().max().item()
            assert diff < TOL, f"{family} {backend}: max abs diff {diff}"


# Natively expressed families beyond Qwen2/Llama: Qwen3 (q/k norm, explicit head_dim) and Mistral
# (Llama with a sliding window), and Qwen2/Qwen3's own sliding window on the layers from max_window_layers.
# Windows of 5 with 19-token inputs, so the window cuts off keys.
WINDOWED = [
    ("qwen3", dict(head_dim=32)),
    ("qwen3", dict(tie=True, kv_heads=1)),
    ("qwen3", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    ("mistral", dict(sliding_window=5)),
    ("mistral", dict(sliding_window=None, head_dim=32)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=5, max_window_layers=1)),
]
WINDOWED_IDS = [f"{family}-{'-'.join(f'{k}={v}' for k, v in extra.items())}" for family, extra in WINDOWED]


def _native(tmp_path, family, extra):
    hf = tiny_hf(family, **extra)
    hf.save_pretrained(tmp_path / "hf")
    return hf, Bumblebee.from_pretrained(tmp_path / "hf").eval()


@pytest.mark.parametrize("family,extra", WINDOWED, ids=WINDOWED_IDS)
def test_qwen3_mistral_and_windows_equal_transformers(tmp_path, family, extra):
    """Logits (sdpa and eager), the KV-cache path, and a save that transformers loads as the same family."""
    hf, ours = _native(tmp_path, family, extra)
    window = hf.config.sliding_window
    types = getattr(hf.config, "layer_types", None) or ["sliding_attention"] * 2  # Mistral: every layer
    assert [layer.self_attn.window for layer in ours.model.layers] == [
        window if t == "sliding_attention" else None for t in types
    ]
    assert hasattr(ours.model.layers[0].self_attn, "q_norm") == (family == "qwen3")
    x = ids()
    with torch.no_grad():
        expected = hf(x).logits
        if window is not None:  # the window must matter here, or this test proves nothing about it
            for layer in ours.model.layers:
                layer.self_attn.window = None
            assert (ours(x) - expected).abs().max().item() > 1e-2
            ours = Bumblebee.from_pretrained(tmp_path / "hf").eval()
        for backend in ("sdpa", "eager"):
            for layer in ours.model.layers:
                layer.self_attn.attn_implementation = backend
            diff = (ours(x) - expected).abs().max().item()
            assert diff < TOL, f"{family} {backend}: max abs diff {diff}"
        # Prefill 4 tokens, then one at a time past the window: each step equals the full forward,
        # through the model's KV cache and through the decode-time path.
        for model, cache in (
            (ours, KVCache(ours.config, batch_size=2, max_len=32)),
            (DecodingBumblebee(ours), SlotCache(ours.config, batch_size=2, max_len=32)),
        ):
            step_logits = [model(x[:, :4], kv_cache=cache)]
            step_logits += [model(x[:, t : t + 1], kv_cache=cache) for t in range(4, x.shape[1])]
            assert (torch.cat(step_logits, dim=1) - expected).abs().max().item() < TOL, type(model).__name__

    ours.save_pretrained(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert raw["model_type"] == family
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(hf)
    assert reloaded.config.sliding_window == window
    assert getattr(reloaded.config, "layer_types", None) == getattr(hf.config, "layer_types", None)
    with torch.no_grad():
        assert (reloaded(x).logits - expected).abs().max().item() < TOL
    again = Bumblebee.from_pretrained(tmp_path / "ours")
    assert again.config.to_dict() == ours.config.to_dict()


@pytest.mark.parametrize("family,extra", [WINDOWED[2], WINDOWED[3]], ids=[WINDOWED_IDS[2], WINDOWED_IDS[3]])
def test_sliding_window_with_padding_and_packing_equals_transformers(tmp_path, family, extra):
    hf, ours = _native(tmp_path, family, extra)
    x = ids(3, 16)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding: the window counts cache positions, as in transformers
    mask[2, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    lengths = [5, 9, 4]
    docs = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    segment_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    with torch.no_grad():
        expected = hf(x, attention_mask=mask, position_ids=position_ids).logits
        got = ours(x, attention_mask=mask, position_ids=position_ids)
        assert (got[mask.bool()] - expected[mask.bool()]).abs().max().item() < TOL
        packed = ours(
            torch.cat(docs, dim=1),
            position_ids=torch.cat([torch.arange(n) for n in lengths])[None],
            segment_ids=segment_ids,
        )
        assert (packed - torch.cat([hf(d).logits for d in docs], dim=1)).abs().max().item() < TOL


def test_mistral_layer_types_are_mistrals_not_qwens():
    """transformers' Mistral slides every layer whatever layer_types says; Qwen3 with o_proj bias is refused."""
    from bumblecore.model.hf_config import config_from_hf_dict

    base = {
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
    }
    mistral = config_from_hf_dict(
        {**base, "model_type": "mistral", "sliding_window": 8, "layer_types": ["full_attention", "full_attention"]}
    )
    assert [mistral.layer_window(i) for i in range(2)] == [8, 8]
    with pytest.raises(ValueError, match="qwen3 attention_bias"):
        config_from_hf_dict({**base, "model_type": "qwen3", "attention_bias": True})


def test_padding_mask_matches_transformers(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path)
    ours = Bumblebee.from_pretrained(tmp_path).eval()
    x = ids(3, 12)
    mask = torch.ones_like(x)
    mask[1, :4] = 0  # left padding
    mask[2, :7] = 0
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        expected = hf(x, attention_mask=mask, position_ids=position_ids).logits
        got = ours(x, attention_mask=mask, position_ids=position_ids)
    real = mask.bool()
    assert (got[real] - expected[real]).abs().max().item() < TOL


def test_packed_documents_do_not_attend_across(tmp_path):
    hf = tiny_hf("qwen2")
    hf.save_pretrained(tmp_path)
    ours = Bumblebee.from_pretrained(tmp_path).eval()
    lengths = [5, 9, 4]
    docs = [ids(1, n, seed=10 + i) for i, n in enumerate(lengths)]
    packed = torch.cat(docs, dim=1)
    segment_ids = torch.cat([torch.full((1, n), i) for i, n in enumerate(lengths)], dim=1)
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    with torch.no_grad():
        got = ours(packed, position_ids=position_ids, segment_ids=segment_ids)
        expected = torch.cat([hf(d).logits for d in docs], dim=1)
    assert (got - expected).abs().max().item() < TOL


@pytest.mark.parametrize("window", [None, 4])
def test_packed_rows_train_like_separate_documents(window):
    """CPU packed attention runs per document: logits and every parameter's gradient of a two-row
    packed batch (a padding segment, documents longer than the window) equal those of the documents
    run one at a time without packing."""
    torch.manual_seed(0)
    config = BumblebeeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=window,
    )
    model = Bumblebee(config)
    rows = [[6, 3, 7], [9]]  # row 1 ends in 7 padding tokens: a segment of their own
    width = 16
    input_ids = torch.zeros(2, width, dtype=torch.long)
    segment_ids = torch.full((2, width), 1 << 20)
    position_ids = torch.zeros(2, width, dtype=torch.long)
    docs = []
    for r, lengths in enumerate(rows):
        column = 0
        for s, n in enumerate(lengths):
            doc = ids(1, n, seed=20 + 3 * r + s) % 64
            input_ids[r, column : column + n], segment_ids[r, column : column + n] = doc[0], s
            position_ids[r, column : column + n] = torch.arange(n)
            docs.append((r, column, doc))
            column += n
    weights = torch.randn(2, width, 64)
    packed = model(input_ids, position_ids=position_ids, segment_ids=segment_ids)
    real = torch.zeros(2, width, 1)
    for r, column, doc in docs:
        real[r, column : column + doc.shape[1]] = 1
    (packed * weights * real).sum().backward()
    packed_grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    for r, column, doc in docs:
        alone = model(doc)
        end = column + doc.shape[1]
        assert (alone[0] - packed[r, column:end]).abs().max().item() < TOL
        (alone[0] * weights[r, column:end]).sum().backward()
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, packed_grads[name], atol=1e-4, rtol=1e-4), name


ROPE_SCALINGS = {
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32,
    },
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "linear": {"rope_type": "linear", "factor": 2.0},
}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("rope_type", list(ROPE_SCALINGS))
def test_rope_scaling_matches_transformers(tmp_path, rope_type, family):
    """Each RoPE scaling (model/rope.py) gives transformers' logits, past max_position_embeddings (256)
    where dynamic NTK grows its base; and the model we save reads back into transformers alike."""
    hf = tiny_hf(family, rope_scaling=dict(ROPE_SCALINGS[rope_type]))
    hf.save_pretrained(tmp_path)
    ours = Bumblebee.from_pretrained(tmp_path).eval()
    assert ours.config.rope_scaling["rope_type"] == rope_type
    x = ids(1, 300 if rope_type == "dynamic" else 120)
    with torch.no_grad():
        assert (ours(x) - hf(x).logits).abs().max().item() < TOL
    ours.save_pretrained(tmp_path / "ours")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert again.config.rope_parameters == hf.config.rope_parameters
    with torch.no_grad():
        assert (again(x).logits - hf(x).logits).abs().max().item() < TOL


@pytest.mark.parametrize("family", ["qwen2", "llama"])
def test_save_loads_in_transformers_same_logits(tmp_path, family):
    hf = tiny_hf(family)
    hf.save_pretrained(tmp_path / "hf")
    ours = Bumblebee.from_pretrained(tmp_path / "hf").eval()
    ours.save_pretrained(tmp_path / "ours")
    raw = json.loads((tmp_path / "ours" / "config.json").read_text())
    assert raw["model_type"] == family
    assert raw["architectures"] == [{"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[family]]
    assert (tmp_path / "ours" / "generation_config.json").is_file()
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "ours").eval()
    assert type(reloaded) is type(hf)
    x = ids()
    with torch.no_grad():
        assert (reloaded(x).logits - ours(x)).abs().max().item() < TOL


def test_sharded_save_loads_everywhere(tmp_path):
    ours = small_model()
    ours.save_pretrained(tmp_path, max_shard_size="40KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 2 and not (tmp_path / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(ours.state_dict()) - {"lm_head.weight"}  # tied: saved once
    x = ids()
    with torch.no_grad():
        expected = ours(x)
        assert (Bumblebee.from_pretrained(tmp_path)(x) - expected).abs().max().item() == 0
        assert (AutoModelForCausalLM.from_pretrained(tmp_path)(x).logits - expected).abs().max().item() < TOL
    # Saving again unsharded removes the old shards and index.
    ours.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert (
        not list(tmp_path.glob("model-*-of-*.safetensors")) and not (tmp_path / "model.safetensors.index.json").exists()
    )


def test_truncated_safetensors_gives_clear_error(tmp_path):
    tiny_hf("qwen2").save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupt"):
        Bumblebee.from_pretrained(tmp_path)


def test_other_architecture_refused_with_model_type(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma2", "hidden_size": 8}))
    with pytest.raises(ValueError, match="'gemma2'"):
        Bumblebee.from_pretrained(tmp_path)


def test_transformers4_and_5_config_layouts_read_alike(tmp_path):
    from bumblecore.model.hf_config import config_from_hf_dict

    base = {
        "model_type": "qwen2",
        "vocab_size": 32,
        "hidden_size": 16,
        "intermediate_size": 32,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
    }
    v4 = config_from_hf_dict({**base, "rope_theta": 5e5, "rope_scaling": None, "torch_dtype": "bfloat16"})
    v5 = config_from_hf_dict(
        {**base, "rope_parameters": {"rope_type": "default", "rope_theta": 5e5}, "dtype": "bfloat16"}
    )
    assert v4.to_dict() == v5.to_dict()
    assert v4.rope_theta == 5e5 and v4.rope_scaling is None and v4.torch_dtype == "bfloat16"


@pytest.mark.parametrize("preset", list(PRESETS))
def test_preset_parameter_counts_equal_transformers(preset):
    cfg = BumblebeeConfig.from_preset(preset)
    with torch.device("meta"):
        ours = Bumblebee(cfg)
        hf = Qwen2ForCausalLM(
            Qwen2Config(
                vocab_size=cfg.vocab_size,
                hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size,
                num_hidden_layers=cfg.num_hidden_layers,
                num_attention_heads=cfg.num_attention_heads,
                num_key_value_heads=cfg.num_key_value_heads,
                tie_word_embeddings=cfg.tie_word_embeddings,
            )
        )
    ours_count = ours.num_parameters()
    assert ours_count == hf.num_parameters() == cfg.num_parameters_estimate
    if preset == "0.5B":
        assert ours_count == 494_032_768


def test_bf16_forward_on_cpu():
    model = Bumblebee(
        BumblebeeConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
    ).to(torch.bfloat16)
    fp32 = Bumblebee(model.config)
    fp32.load_state_dict({k: v.float() for k, v in model.state_dict().items()})
    x = ids()
    with torch.no_grad():
        low, ref = model(x), fp32(x)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    assert (low.float() - ref).abs().max().item() < 0.1


def _grads(model, x):
    model.zero_grad()
    model(x).float().logsumexp(-1).mean().backward()
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def test_activation_checkpointing_same_gradients():
    torch.manual_seed(0)
    model = Bumblebee(
        BumblebeeConfig(
            vocab_size=VOCAB,
            hidden_size=64,
            intermediate_size=96,
            num_hidden_layers=3,
            num_attention_heads=4,
            num_key_value_heads=2,
            initializer_range=0.2,
        )
    ).train()
    x = ids()
    plain = _grads(model, x)
    model.set_gradient_checkpointing(True)
    recomputed = _grads(model, x)
    for name in plain:
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-5, atol=1e-6)


def test_layernorm_gelu_trains_and_round_trips_as_bumblebee(tmp_path):
    torch.manual_seed(0)
    cfg = BumblebeeConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        norm_type="layernorm",
        hidden_act="gelu",
        initializer_range=0.2,
    )
    model = Bumblebee(cfg)
    assert isinstance(model.model.norm, torch.nn.LayerNorm)
    x = ids()
    loss = torch.nn.functional.cross_entropy(model(x)[:, :-1].reshape(-1, VOCAB), x[:, 1:].reshape(-1))
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["model_type"] == "bumblebee" and raw["norm_type"] == "layernorm" and raw["hidden_act"] == "gelu"
    reloaded = Bumblebee.from_pretrained(tmp_path)
    assert reloaded.config.norm_type == "layernorm" and reloaded.config.hidden_act == "gelu"
    with torch.no_grad():
        assert torch.equal(reloaded(x), model(x))


def test_llama_saved_again_is_llama(tmp_path):
    hf = tiny_hf("llama")
    hf.save_pretrained(tmp_path / "a")
    Bumblebee.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "b")
    assert isinstance(again, LlamaForCausalLM)
    with torch.no_grad():
        x = ids()
        assert (again(x).logits - hf(x).logits).abs().max().item() < TOL


def test_dtype_is_checkpoints_or_requested(tmp_path):
    tiny_hf("qwen2").to(torch.bfloat16).save_pretrained(tmp_path)
    assert next(Bumblebee.from_pretrained(tmp_path).parameters()).dtype == torch.bfloat16
    assert next(Bumblebee.from_pretrained(tmp_path, dtype="float32").parameters()).dtype == torch.float32


@pytest.mark.parametrize("path", ["model", "decode"])
def test_kv_cache_decoding_equals_full_forward(tmp_path, path):
    """Rows of different prompt lengths, right-padded, then token-by-token decoding: each step's
    logits equal a no-cache forward over the whole sequence so far (the model's own KV cache, and the
    GenerationEngine's decode-time path with its slot cache)."""
    tiny_hf("qwen2").save_pretrained(tmp_path)
    model = Bumblebee.from_pretrained(tmp_path).eval()
    step = model if path == "model" else DecodingBumblebee(model)
    prompts = [ids(1, n, seed=20 + n)[0] for n in (7, 3, 11)]
    cache = KVCache(model.config, batch_size=3, max_len=32) if path == "model" else SlotCache(model.config, 3, 32)
    padded = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for row, p in enumerate(prompts):
        padded[row, : len(p)] = p
        mask[row, : len(p)] = 1
    sequences = [p.tolist() for p in prompts]
    with torch.no_grad():
        logits = step(padded, attention_mask=mask, kv_cache=cache)
        last = torch.stack([logits[row, len(p) - 1] for row, p in enumerate(prompts)])
        for _ in range(5):
            for row, seq in enumerate(sequences):
                reference = model(torch.tensor([seq]))[0, -1]
                assert (last[row] - reference).abs().max().item() < TOL
            next_tokens = last.argmax(-1)
            for row, tok in enumerate(next_tokens.tolist()):
                sequences[row].append(tok)
            last = step(next_tokens[:, None], kv_cache=cache)[:, -1]
    assert cache.lengths.tolist() == [len(s) for s in sequences]


def small_model():
    return make_tiny_model(VOCAB, intermediate_size=96)


def prefill(decoder, x):
    return decoder(x, kv_cache=decoder.new_cache(x.shape[0], 32))


def test_fused_inference_projections_match_and_go_stale_safely():
    model = small_model()
    x = ids()
    with torch.no_grad():
        plain = model(x)
        decoder = DecodingBumblebee(model)
        assert all(p is not None for layer in decoder.prepared for p in layer)
        torch.testing.assert_close(prefill(decoder, x), plain, rtol=1e-5, atol=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model(x).float().logsumexp(-1).mean().backward()
    optimizer.step()  # weights change in place: the fused copies must not be used any more
    with torch.no_grad():
        updated = prefill(decoder, x)
        decoder.prepared = [(None, None)] * len(decoder.prepared)
        torch.testing.assert_close(updated, prefill(decoder, x))


def test_inference_lm_head_layouts_equal_the_lm_head_and_go_stale_safely():
    """The decode-time logits pick a weight layout by row count (CPU): all equal lm_head."""
    model = small_model()
    decoder = DecodingBumblebee(model)
    with torch.no_grad():
        for shape in [(1, 1), (2, 1), (3, 1), (4, 1), (16, 1), (2, 3), (17, 1), (5, 7)]:
            hidden = torch.randn(*shape, 64)
            torch.testing.assert_close(decoder.logits(hidden), model.lm_head(hidden), rtol=1e-5, atol=1e-5)
        x = ids(1, 5)
        assert prefill(decoder, x).is_contiguous()
        model.lm_head.weight.mul_(2.0)  # in place: the transposed copy must not be used any more
        hidden = torch.randn(1, 1, 64)
        torch.testing.assert_close(decoder.logits(hidden), model.lm_head(hidden))


def test_decode_logits_written_into_out_bit_identical_for_every_row_count():
    model = small_model()
    decoder = DecodingBumblebee(model)
    with torch.no_grad():
        for rows in (1, 2, 4, 16, 17):
            hidden = torch.randn(rows, 64)
            out = torch.full((rows, model.config.vocab_size), float("nan"))
            assert decoder.logits(hidden, out=out) is out
            assert torch.equal(out, decoder.logits(hidden).contiguous())
        assert set(decoder._head_layouts) == {2, 4, 16}


def test_inference_rms_norm_is_bit_identical_to_the_training_one():
    """Without gradients an fp32 RMSNorm runs as one op with its weight: the same numbers."""
    from bumblecore.model.bumblebee import RMSNorm

    torch.manual_seed(0)
    for dim in (64, 1000):
        norm = RMSNorm(dim, 1e-6)
        with torch.no_grad():
            norm.weight.copy_(torch.randn(dim))
        for rows in (1, 16):
            x = torch.randn(rows, 1, dim) * 3
            with torch.no_grad():
                fast = norm(x)
            assert torch.equal(fast, norm._scaled_norm(x))


@pytest.mark.parametrize("kind", ["fp16", "bf16"])
@pytest.mark.parametrize("vocab", [4096, 4000])  # by blocks of 128, and not
def test_greedy_screening_is_the_argmax_of_the_fp32_logits(vocab, kind):
    """DecodingBumblebee.screened_argmax (a half-precision screen, then the candidates in fp32) picks
    each row's first maximum of the full logits: random rows, near-ties, exact ties (the first wins),
    duplicated vocabulary rows, one row or sixteen; non-finite inputs and stale weights fall back (None)."""
    from bumblecore.inference.prepared import prepare_screen

    torch.manual_seed(0)
    config = BumblebeeConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    model = Bumblebee(config).eval()
    weight = model.lm_head.weight
    with torch.no_grad():
        weight[100] = weight[3000]  # identical rows: always tied, 100 must win
        weight[101] = weight[3001] * (1 + 2**-20)  # a near-tie
        # 64 rows within half precision's rounding of one another: only the fp32 recompute orders them
        weight[200:264] = weight[2000] * (1 + torch.randn(64, 64) * 2**-11)
        decoder = DecodingBumblebee(model)
        decoder.screen = prepare_screen(model.lm_head, kind)
        if decoder.screen is None:
            pytest.skip(f"no {kind} product in this torch build")
        for trial in range(20):
            hidden = torch.randn(16, 64) * (1 + trial)
            hidden[0] = weight[3000] * 5  # row 0's maximum is the tied pair
            hidden[1] = weight[3001] * 5
            rows = 1 if trial % 4 == 3 else 16
            picked = decoder.screened_argmax(hidden[:rows])
            assert picked is not None
            assert picked.tolist() == torch.nn.functional.linear(hidden[:rows], weight).argmax(-1).tolist()
        assert picked[0] == 100
        for _ in range(50):  # one row among the near-copies (a too-small bound misses ~15-100%)
            hidden = weight[2000:2001] * 5 + torch.randn(1, 64) * 2**-9
            assert decoder.screened_argmax(hidden).tolist() == (hidden @ weight.t()).argmax(-1).tolist()
        bad = torch.randn(16, 64)
        bad[3, 5] = float("nan")
        assert decoder.screened_argmax(bad) is None
        assert decoder.greedy(bad) is None
        weight.mul_(2.0)  # stale half-precision copy: not used
        assert decoder.screened_argmax(torch.randn(16, 64)) is None
        assert decoder.greedy(torch.randn(16, 64)) is None


def test_greedy_screens_only_row_counts_where_it_was_timed_faster(monkeypatch):
    """greedy decides once per row count, by timing, whether screening beats the full head; where
    not it returns None (the engine computes the logits), where so the screened argmax."""
    import bumblecore.inference.decode as decode

    torch.manual_seed(0)
    config = BumblebeeConfig(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    model = Bumblebee(config).eval()
    decoder = DecodingBumblebee(model)
    if decoder.screen is None:
        pytest.skip("no screen on this build")
    timed = []
    monkeypatch.setattr(decoder, "_screening_pays", lambda hidden: timed.append(hidden.shape[0]) or hidden.shape[0] > 4)
    with torch.no_grad():
        for rows in (2, 8, 2, 8):
            hidden = torch.randn(rows, 64)
            got = decoder.greedy(hidden)
            if rows > 4:
                assert got.tolist() == model.lm_head(hidden).argmax(-1).tolist()
            else:
                assert got is None
    assert timed == [2, 8]
    monkeypatch.undo()
    with torch.no_grad():
        assert isinstance(decode.DecodingBumblebee(model)._screening_pays(torch.randn(16, 64)), bool)


def test_kv_cache_rows_as_a_slice_equal_rows_as_a_tensor(tmp_path):
    """A range of cache rows passed as a slice (the cache read as a view) gives the tensor-rows logits,
    for equally long rows (slice writes) and for rows of different lengths (indexed writes)."""
    tiny_hf("qwen2").save_pretrained(tmp_path)
    model = DecodingBumblebee(Bumblebee.from_pretrained(tmp_path).eval())
    by_slice, by_tensor = SlotCache(model.config, 4, 32), SlotCache(model.config, 4, 32)
    prompts = ids(2, 6, seed=5)
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[1, 4:] = 0  # the second row is 4 tokens long: later steps take the indexed path
    with torch.no_grad():
        for step in range(4):
            tokens, m = (prompts, mask) if step == 0 else (torch.tensor([[3], [7]]), None)
            a = model(tokens, attention_mask=m, kv_cache=by_slice, cache_rows=slice(1, 3))
            b = model(tokens, attention_mask=m, kv_cache=by_tensor, cache_rows=torch.tensor([1, 2]))
            torch.testing.assert_close(a, b)
    assert by_slice.lengths.tolist() == by_tensor.lengths.tolist() == [0, 9, 7, 0]
    for layer in range(model.config.num_hidden_layers):
        torch.testing.assert_close(by_slice.keys[layer], by_tensor.keys[layer])
    # equally long rows: the decode steps write and read slices
    by_slice.reset(), by_tensor.reset()
    with torch.no_grad():
        for step in range(3):
            tokens = prompts if step == 0 else torch.tensor([[3], [7]])
            torch.testing.assert_close(
                model(tokens, kv_cache=by_slice, cache_rows=slice(2, 4)),
                model(tokens, kv_cache=by_tensor, cache_rows=torch.tensor([2, 3])),
            )


def test_supported_family_with_a_feature_bumblebee_lacks_is_refused_and_not_native(tmp_path):
    """A Qwen2 with LongRoPE or a Llama with mlp_bias: Bumblebee refuses it by name, and
    bumblebee_expresses sends it to the transformers fallback instead."""
    from bumblecore.model.hf_config import bumblebee_expresses

    cases = [
        (
            "qwen2",
            dict(rope_scaling={"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}),
            "longrope",
        ),
        ("llama", dict(mlp_bias=True), "mlp_bias"),
    ]
    for family, extra, reason in cases:
        tiny_hf(family, **extra).save_pretrained(tmp_path / family)
        assert not bumblebee_expresses(tmp_path / family)
        with pytest.raises(ValueError, match=reason):
            Bumblebee.from_pretrained(tmp_path / family)
    tiny_hf("qwen3").save_pretrained(tmp_path / "qwen3")
    assert bumblebee_expresses(tmp_path / "qwen3")


@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_rope_rotation_is_transformers_formula_bit_for_bit(dtypes):
    """apply_rope (one autograd node, three passes) gives exactly transformers' apply_rotary_pos_emb:
    forward, and the gradient of the input."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from bumblecore.model.bumblebee import apply_rope

    x_dtype, angle_dtype = dtypes
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 7, 3, 16, generator=generator).to(x_dtype)
    freqs = torch.randn(2, 7, 8, generator=generator)
    angles = torch.cat((freqs, freqs), dim=-1)
    cos, sin = angles.cos().to(angle_dtype), angles.sin().to(angle_dtype)
    ours_in, theirs_in = q.clone().requires_grad_(), q.clone().requires_grad_()
    ours = apply_rope(ours_in, cos, sin)
    # transformers takes (batch, heads, seq, dim) and unsqueezes cos/sin at dim 1
    theirs, _ = apply_rotary_pos_emb(theirs_in.transpose(1, 2), theirs_in.transpose(1, 2), cos, sin)
    theirs = theirs.transpose(1, 2)
    assert torch.equal(ours, theirs)
    grad = torch.randn(ours.shape, generator=generator).to(ours.dtype)
    ours.backward(grad)
    theirs.backward(grad)
    assert torch.equal(ours_in.grad, theirs_in.grad)
    with torch.no_grad():
        assert torch.equal(apply_rope(q, cos, sin), theirs)


def test_greedy_keeps_the_screen_that_decides_when_the_first_pick_cannot(monkeypatch):
    """Where the hardware's screen gives up on a model (its error bound too wide: it returns None), the
    other screen is timed and kept for that row count, and greedy equals the fp32 argmax through it."""
    import bumblecore.inference.decode as decode
    from bumblecore.inference.prepared import prepare_screen

    torch.manual_seed(0)
    config = BumblebeeConfig(
        vocab_size=4096, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4
    )
    model = Bumblebee(config).eval()
    decoder = DecodingBumblebee(model)
    screens = [prepare_screen(model.lm_head, kind) for kind in ("bf16", "fp16")]
    if None in screens:
        pytest.skip("this torch build lacks a bf16 or fp16 product")
    decoder.screens, decoder.screen = screens, screens[0]
    decides = decoder.screened_argmax
    monkeypatch.setattr(
        decoder,
        "screened_argmax",
        lambda hidden, screen=None: None if screen is screens[0] else decides(hidden, screen),
    )
    timings = iter([1.0, 0.5])  # the full head, then the one screen that decides
    monkeypatch.setattr(decode, "cpu_seconds", lambda run, repeats=3: next(timings))
    with torch.no_grad():
        hidden = torch.randn(8, 64) * 4
        assert decoder.greedy(hidden).tolist() == model.lm_head(hidden).argmax(-1).tolist()
    assert decoder._screen_for[8] is screens[1]
