"""Token cache (reuse, invalidation, atomicity), packing (oracle: each sample alone) and the step-indexed loader."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from tiny import make_tiny_model

from bumblecore.data.cache import build_cache, default_cache_dir
from bumblecore.data.loader import BatchLoader
from bumblecore.data.packing import IGNORE_INDEX, build_units, collate
from bumblecore.recipes import recipe_for
from bumblecore.train.losses import shift_targets


def sft_file(path, n=24, seed=0):
    rng = np.random.default_rng(seed)
    words = ["bee", "hive", "flower", "honey", "wing", "蜜蜂", "花"]
    with open(path, "w", encoding="utf-8") as f:
        for i in range(n):
            question = " ".join(rng.choice(words, size=int(rng.integers(1, 8))))
            answer = " ".join(rng.choice(words, size=int(rng.integers(1, 10))))
            f.write(json.dumps({"instruction": f"{i}: {question}", "output": answer}, ensure_ascii=False) + "\n")
    return path


def test_cache_reuse_and_invalidation(tmp_path, tok):
    data = sft_file(tmp_path / "d.jsonl")
    first = build_cache(data, tok, recipe_for("sft").reading, 128, cache_dir=tmp_path / "c", progress=False)
    stamp = (first.directory / "meta.json").stat().st_mtime_ns
    again = build_cache(data, tok, recipe_for("sft").reading, 128, cache_dir=tmp_path / "c", progress=False)
    assert again.directory == first.directory and (again.directory / "meta.json").stat().st_mtime_ns == stamp
    assert (
        build_cache(data, tok, recipe_for("sft").reading, 64, cache_dir=tmp_path / "c", progress=False).directory
        != first.directory
    )
    sft_file(data, seed=1)  # same name, new content
    changed = build_cache(data, tok, recipe_for("sft").reading, 128, cache_dir=tmp_path / "c", progress=False)
    assert changed.directory != first.directory
    ids, mask = changed.sample(0)
    assert ids.dtype == np.uint32 and mask.dtype == np.uint8 and len(ids) == len(mask) == changed.lengths[0]


KILLER = """
import os, signal, sys
import bumblecore.data.cache as cache
from bumblecore.tokenizer import load_tokenizer
from bumblecore.recipes import recipe_for
cache.BATCH_RECORDS = 4
original = cache._encode_batch
calls = []
def dying(*args, **kwargs):
    calls.append(1)
    if len(calls) == 3:
        os.kill(os.getpid(), signal.SIGKILL)  # killed mid-build: no cleanup code runs
    yield from original(*args, **kwargs)
cache._encode_batch = dying
cache.build_cache(sys.argv[1], load_tokenizer(sys.argv[2]), recipe_for("sft").reading, 128, cache_dir=sys.argv[3], progress=False)
"""


def test_killed_build_is_never_trusted(tmp_path, tok, tokenizer_dir):
    data = sft_file(tmp_path / "d.jsonl", n=40)
    result = subprocess.run([sys.executable, "-c", KILLER, str(data), str(tokenizer_dir), str(tmp_path / "c")])
    assert result.returncode == -9
    leftovers = list((tmp_path / "c").iterdir())
    assert leftovers and all(p.name.startswith(".") for p in leftovers)  # only a temporary dir
    cache = build_cache(data, tok, recipe_for("sft").reading, 128, cache_dir=tmp_path / "c", progress=False)
    assert len(cache) == 40 and (cache.directory / "meta.json").is_file()


def tiny_model(vocab):
    return make_tiny_model(vocab, hidden_size=32, intermediate_size=64)


def per_token_losses(model, batch):
    logits = model(batch["input_ids"], position_ids=batch["position_ids"], segment_ids=batch.get("segment_ids"))
    targets = shift_targets(batch["labels"], batch.get("segment_ids"))
    losses = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none"
    )
    return losses[targets != IGNORE_INDEX]


def test_packed_row_loss_equals_each_sample_alone(tmp_path, tok):
    data = sft_file(tmp_path / "d.jsonl", n=12)
    cache = build_cache(data, tok, recipe_for("sft").reading, 256, cache_dir=tmp_path / "c", progress=False)
    packed = build_units(cache, recipe_for("sft").reading, 256, packing=True, seed=3)
    assert len(packed) < len(cache)  # several samples share rows
    model = tiny_model(len(tok))
    single = build_units(cache, recipe_for("sft").reading, 256, packing=False, seed=3)
    with torch.no_grad():
        for row in range(len(packed)):
            batch = collate(packed, [row], tok.pad_token_id, packing=True)
            got = per_token_losses(model, batch)
            alone = []
            for piece in packed.rows[row]:
                index = int(np.searchsorted(cache.offsets, piece.start))
                alone.append(per_token_losses(model, collate(single, [index], tok.pad_token_id, packing=False)))
            torch.testing.assert_close(got, torch.cat(alone), rtol=1e-5, atol=1e-5)


def test_pretraining_blocks_keep_every_token(tmp_path, tok):
    data = tmp_path / "p.jsonl"
    data.write_text("".join(json.dumps({"text": f"document {i} " + "bee " * i}) + "\n" for i in range(30)))
    cache = build_cache(data, tok, recipe_for("pretrain").reading, 16, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, recipe_for("pretrain").reading, 16, packing=True, seed=0)
    stream = np.concatenate([cache.ids[p.start : p.end] for row in units.rows for p in row])
    assert np.array_equal(stream, cache.ids) and all(units.length(i) <= 16 for i in range(len(units)))
    eot = tok.convert_tokens_to_ids("<|endoftext|>")
    assert int((cache.ids == eot).sum()) == 30  # one end-of-text per document
    batch = collate(units, list(range(len(units))), tok.pad_token_id, packing=True)
    assert batch["num_tokens"] == len(cache.ids)
    first_positions = batch["position_ids"][batch["segment_ids"] != (1 << 20)]
    assert first_positions.min() == 0 and batch["position_ids"].max() < 16


@pytest.mark.parametrize("world,micro,accumulation", [(1, 8, 1), (1, 2, 4), (2, 2, 2), (4, 1, 2), (2, 4, 1)])
def test_global_batch_is_the_same_for_any_split(tmp_path, tok, world, micro, accumulation):
    data = sft_file(tmp_path / "d.jsonl", n=21)
    cache = build_cache(data, tok, recipe_for("sft").reading, 256, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, recipe_for("sft").reading, 256, packing=False, seed=0)
    assert len(units) == 21
    reference = BatchLoader(units, micro_batch_size=8, seed=5, pad_id=0)
    for step in (0, 1, 2, 3, 7):
        rows = []
        for rank in range(world):
            loader = BatchLoader(units, micro, accumulation, world, rank, seed=5, pad_id=0)
            assert loader.steps_per_epoch == reference.steps_per_epoch == 3
            for batch in loader.micro_batches(step):
                rows += [tuple(r[r != 0].tolist()) for r in batch["input_ids"]]
        expected = [tuple(r[r != 0].tolist()) for r in reference.micro_batches(step)[0]["input_ids"]]
        assert rows == expected
    # a new epoch is a new order; the same step is always the same batch
    assert reference.global_indices(0) != reference.global_indices(3)
    assert reference.global_indices(4) == BatchLoader(units, 8, seed=5).global_indices(4)


def test_unpacked_batches_pad_to_their_longest_row(tmp_path, tok):
    data = sft_file(tmp_path / "d.jsonl", n=10)
    cache = build_cache(data, tok, recipe_for("sft").reading, 512, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, recipe_for("sft").reading, 512, packing=False, seed=0)
    batch = collate(units, [0, 1, 2], tok.pad_token_id, packing=False)
    assert batch["input_ids"].shape[1] == max(units.length(i) for i in (0, 1, 2)) < 512
    assert "segment_ids" not in batch and batch["num_tokens"] == sum(units.length(i) for i in (0, 1, 2))


def test_preference_pairs_batch_chosen_then_rejected(tmp_path, tok):
    data = tmp_path / "p.jsonl"
    data.write_text(
        "".join(
            json.dumps({"instruction": f"q{i}", "chosen": "good " * (i + 1), "rejected": "bad"}) + "\n"
            for i in range(4)
        )
    )
    cache = build_cache(data, tok, recipe_for("dpo").reading, 128, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, recipe_for("dpo").reading, 128, packing=False, seed=0)
    batch = collate(units, [0, 2], tok.pad_token_id, packing=False)
    assert batch["num_pairs"] == 2 and batch["input_ids"].shape[0] == 4
    texts = [
        tok.decode([t for t, l in zip(r, lab) if l != IGNORE_INDEX])
        for r, lab in zip(batch["input_ids"].tolist(), batch["labels"].tolist())
    ]
    assert texts == ["good <|im_end|>", "good good good <|im_end|>", "bad<|im_end|>", "bad<|im_end|>"]


def test_default_cache_dir_honours_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("BUMBLECORE_CACHE", str(tmp_path))
    assert default_cache_dir() == tmp_path / "tokens"


def test_group_by_length_reduces_padding(tmp_path, tok):
    data = sft_file(tmp_path / "d.jsonl", n=64)
    cache = build_cache(data, tok, recipe_for("sft").reading, 256, cache_dir=tmp_path / "c", progress=False)
    units = build_units(cache, recipe_for("sft").reading, 256, packing=False, seed=0)

    def padding(loader):
        steps = range(loader.steps_per_epoch)
        return sum(int(b["input_ids"].numel()) - b["num_tokens"] for s in steps for b in loader.micro_batches(s))

    plain = BatchLoader(units, 4, seed=1)
    grouped = BatchLoader(units, 4, seed=1, group_by_length=True)
    assert sorted(i for s in range(grouped.steps_per_epoch) for i in grouped.global_indices(s)) == list(range(64))
    assert padding(grouped) < padding(plain) / 2
