"""Tokenizers: load any Hugging Face tokenizer dir; train a byte-level BPE with the ChatML template.

A tokenizer without a chat template gets ours (ChatML as Qwen2.5 renders it, chat/format.py);
one with its own keeps it (docs/DATA_FORMAT.md, "The chat template and the mask rule").
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Union

# The chat format (ChatML and its tokens) lives with its renderer, in one module.
from bumblecore.chat.chatml import CHAT_TEMPLATE, CHATML_TOKENS, ENDOFTEXT, IM_END  # noqa: E402  (re-exported: the public names of the tokenizer module)

SPECIAL_TOKENS = CHATML_TOKENS

# Pre-tokenization split in the style of GPT-4 / Qwen2: English contractions, runs of letters (with
# one leading non-letter), numbers of 1-3 digits, punctuation runs, newlines, other whitespace.
SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)


def load_tokenizer(path: Union[str, Path], trust_remote_code: bool = False):
    """Load a Hugging Face tokenizer directory (fast tokenizer); fill in our chat template and pad token if missing.
    `trust_remote_code`: run a tokenizer class shipped as code in the directory (custom-code models)."""
    from transformers import AutoTokenizer

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"tokenizer directory {path} does not exist")
    if not any((path / name).is_file() for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json")):
        raise ValueError(f"{path} is not a tokenizer directory (no tokenizer.json / tokenizer_config.json)")
    tokenizer = AutoTokenizer.from_pretrained(str(path), trust_remote_code=trust_remote_code)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = CHAT_TEMPLATE
    if tokenizer.pad_token is None:
        tokenizer.pad_token = ENDOFTEXT if ENDOFTEXT in tokenizer.get_vocab() else tokenizer.eos_token
    return tokenizer


def check_fits_model(tokenizer, model_dir: Union[str, Path], tokenizer_dir: Union[str, Path, None] = None) -> None:
    """Refuse a tokenizer that can emit ids the model has no embedding row for (each such id fails
    inside the model, on every request that contains it). A model vocabulary larger than the
    tokenizer is fine: embedding rows are often padded to a multiple of 64 or 128."""
    config_file = Path(model_dir) / "config.json"
    raw = json.loads(config_file.read_text(encoding="utf-8"))
    vocab_size = raw.get("vocab_size") or raw.get("text_config", {}).get("vocab_size")
    if not isinstance(vocab_size, int):
        return  # a config without a vocab size: nothing to check against
    largest = max(tokenizer.get_vocab().values(), default=-1)
    if len(tokenizer) > vocab_size or largest >= vocab_size:
        source = tokenizer_dir or getattr(tokenizer, "name_or_path", "") or "the tokenizer"
        raise ValueError(
            f"tokenizer {source} has {max(len(tokenizer), largest + 1)} tokens but the model "
            f"({config_file}) has vocab_size {vocab_size}: ids >= {vocab_size} have no embedding. "
            "Use the tokenizer the model was trained with, or resize the model's embeddings first (training: "
            "resize_vocab: true)."
        )


def _strings_in(value) -> Iterator[str]:
    if isinstance(value, str):
        if value:
            yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings_in(item)
    elif isinstance(value, list):
        for item in value:
            yield from _strings_in(item)


CORPUS_SUFFIXES = (".txt", ".jsonl", ".json")


def _corpus_files(corpus: list[str]) -> list[Path]:
    if isinstance(corpus, (str, Path)):
        corpus = [corpus]
    if not corpus:
        raise ValueError("corpus is empty: give at least one .txt, .jsonl or .json file or a directory of them")
    files: list[Path] = []
    for entry in corpus:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.suffix in CORPUS_SUFFIXES and p.is_file())
            if not found:
                raise FileNotFoundError(f"corpus directory {path} holds no .txt, .jsonl or .json files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise FileNotFoundError(f"corpus file {path} does not exist")
    return files


def iter_corpus_texts(files: list[Path]) -> Iterator[str]:
    """Texts of the corpus, read lazily: one line (.txt, other suffixes) or one record (.jsonl) at a
    time; a .json file is one JSON document and is read whole."""
    for file in files:
        try:
            if file.suffix == ".json":
                try:
                    records = json.loads(file.read_text(encoding="utf-8"))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{file}: not valid JSON ({err})") from err
                yield from _strings_in(records)
                continue
            with open(file, encoding="utf-8") as handle:
                for line_number, line in enumerate(handle, 1):
                    if file.suffix != ".jsonl":
                        yield line
                        continue
                    if not line.strip():
                        continue
                    try:
                        record = json.loads(line)
                    except json.JSONDecodeError as err:
                        raise ValueError(f"{file} line {line_number}: not valid JSON ({err.msg})") from err
                    yield from _strings_in(record)
        except UnicodeDecodeError as err:
            raise ValueError(f"{file}: not UTF-8 text ({err.reason} at byte {err.start})") from err


class _CountingTexts:
    """Wraps the text stream so that an empty corpus is reported instead of yielding a bytes-only vocabulary."""

    def __init__(self, texts: Iterator[str]):
        self.texts, self.count = texts, 0

    def __iter__(self) -> Iterator[str]:
        for text in self.texts:
            self.count += 1
            yield text


def _make_portable(output_dir: Path) -> None:
    """Name the generic fast-tokenizer class and keep the chat template in tokenizer_config.json too,
    so transformers 4 (which reads it there) loads the directory as transformers 5 does."""
    config_file = output_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text(encoding="utf-8"))
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config["chat_template"] = CHAT_TEMPLATE
    config_file.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def train_tokenizer(
    corpus: list[str],
    vocab_size: int = 8192,
    output_dir: str = "checkpoints/tokenizer",
    min_frequency: int = 2,
) -> str:
    """Train a byte-level BPE tokenizer with the ChatML special tokens and chat template.

    The corpus is streamed, never held in memory whole: .txt files (and any other suffix) line by
    line; .jsonl files one record at a time, every string value of a record (searched recursively)
    being text, so pretraining {"text": ...}, Alpaca and ShareGPT files all work. A .json file is a
    JSON document (usually an array of records) and is read whole, so keep large corpora in .jsonl.
    A directory stands for every .txt, .jsonl and .json file under it.

    The result is a Hugging Face tokenizer directory (transformers.AutoTokenizer loads it) with
    special tokens <|endoftext|> (id 0, padding and end of a pretraining document), <|im_start|>
    (1) and <|im_end|> (2, end of turn: the eos token), no bos or unk token (every byte has a
    token), and the ChatML chat template of Qwen2.5 that training and serving both use.

    Args:
        corpus: text files or directories of them (.txt, .jsonl, .json); several may be given.
        vocab_size: size of the vocabulary, the 3 special tokens and 256 byte symbols included
            (at least 259); a small corpus may stop short of it when no pair occurs min_frequency times.
        output_dir: where the tokenizer directory is written (created if missing).
        min_frequency: a pair of symbols must occur at least this often to be merged.

    Returns:
        output_dir.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(
            f"vocab_size {vocab_size} is too small: the 256 byte symbols and {len(SPECIAL_TOKENS)} special tokens need {minimum}"
        )
    files = _corpus_files(corpus)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    texts = _CountingTexts(iter_corpus_texts(files))
    tokenizer.train_from_iterator(texts, trainer=trainer)
    if texts.count == 0:
        named = ", ".join(map(str, files[:3])) + (f" and {len(files) - 3} more files" if len(files) > 3 else "")
        raise ValueError(f"corpus {named} holds no text")

    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=ENDOFTEXT,
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    wrapped.save_pretrained(output_dir)
    _make_portable(Path(output_dir))
    print(
        f"trained a byte-level BPE tokenizer: {len(wrapped)} tokens (asked for {vocab_size}) from {len(files)} file(s), saved to {output_dir}"
    )
    return output_dir
