"""Tokenize a dataset once into memory-mapped files, keyed by a content hash.

Layout of one cache entry `<cache_dir>/<key>/`:
    ids.bin      uint32, every sample's token ids back to back
    mask.bin     uint8, 1 where the token is a training target (aligned with ids.bin)
    offsets.bin  int64, n + 1 sample boundaries into ids.bin
    files.bin    uint32, for each sample the index of its data file (data_files order): a mixture's sources
    meta.json    counts, the summary and each file's record count; written last: an entry without it is never used
Preference data stores two entries per pair: 2i = prompt + chosen, 2i + 1 = prompt + rejected.
KTO data stores two entries per example, 2i = prompt + completion, 2i + 1 = the KL row (prompt + the
next record's completion), and desirable.bin (uint8, 1 = desirable) with one flag per example.
Reward-model pairs add margins.bin (float64): each pair's `margin` (0 where the record has none).

The key hashes the data files' bytes, the tokenizer (and the special tokens it adds to a text), the
chat template, cutoff_len and the stage, so the same inputs reuse the entry at once and any change
builds a new one. Building streams:
records are validated, rendered in Python and tokenized in batches by the Rust tokenizer (which
uses every core), then appended to the files, so memory does not grow with the corpus. The entry
is built under a temporary name and renamed when complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from bumblecore.chat.format import ChatFormatError, chat_format, encode_documents, special_tokens_added
from bumblecore.data.adapters import Sample
from bumblecore.data.formats import ReadReport, StageReading, read_samples
from bumblecore.data.sources import data_files

FORMAT_VERSION = 3  # bump when the cache layout or rendering rules change (3: the tokenizer's own BOS)
BATCH_RECORDS = 256


@dataclass
class CacheSummary:
    records: int = 0
    samples: int = 0
    tokens: int = 0
    target_tokens: int = 0
    dropped_no_targets: int = 0  # every target token lies beyond cutoff_len
    dropped_untrained: int = 0  # no target token at all, even untruncated
    dropped_examples: list = field(default_factory=list)  # "<file> line N: why" for the first few dropped
    truncated: int = 0
    skipped_bad_records: int = 0
    skipped_examples: list = field(default_factory=list)
    empty_files: list = field(default_factory=list)
    seconds: float = 0.0
    bytes_read: int = 0

    @property
    def target_share(self) -> float:
        return self.target_tokens / max(1, self.tokens)

    def counts(self) -> str:
        """What was read, kept and dropped, and why, in one line (the training banner shows it)."""
        dropped = self.dropped_no_targets + self.dropped_untrained
        why = []
        if self.dropped_no_targets:
            why.append(f"{self.dropped_no_targets} with no trained token within cutoff_len")
        if self.dropped_untrained:
            why.append(f"{self.dropped_untrained} with no trained token at all")
        line = (
            f"{self.records} records -> {self.samples} samples, {self.tokens:,} tokens ({self.target_share:.1%} trained); "
            f"{dropped} dropped{' (' + ', '.join(why) + ')' if why else ''}, {self.truncated} truncated to cutoff_len, "
            f"{self.skipped_bad_records} bad records skipped"
        )
        if self.empty_files:
            line += f", {len(self.empty_files)} file(s) without records"
        return line

    def examples(self, limit: int = 5) -> list[str]:
        """Where the dropped, skipped and empty come from: file and line and why."""
        return (
            [f"dropped: {e}" for e in self.dropped_examples[:limit]]
            + [f"skipped: {e}" for e in self.skipped_examples[:limit]]
            + [f"no records: {e}" for e in self.empty_files[:limit]]
        )

    def describe(self) -> str:
        rate = self.bytes_read / 1e6 / max(self.seconds, 1e-9)
        return f"{self.counts()}; {self.seconds:.1f}s ({rate:.2f} MB/s)"

    def why_nothing(self) -> str:
        """Why the data gave no sample, naming files and lines."""
        reasons = [*self.empty_files, *self.dropped_examples[:3], *self.skipped_examples[:3]]
        dropped = self.dropped_no_targets + self.dropped_untrained
        if dropped > len(self.dropped_examples[:3]):
            reasons.append(f"{dropped} record(s) dropped in all")
        if self.skipped_bad_records > len(self.skipped_examples[:3]):
            reasons.append(f"{self.skipped_bad_records} bad record(s) skipped in all")
        return "; ".join(reasons) or f"{self.records} records read, none usable"


def default_cache_dir() -> Path:
    return Path(os.environ.get("BUMBLECORE_CACHE", Path.home() / ".cache" / "bumblecore")) / "tokens"


def hash_file_into(digest, path: Path) -> None:
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)


def tokenizer_fingerprint(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    digest.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    digest.update(repr(sorted(tokenizer.special_tokens_map.items())).encode())
    return digest.hexdigest()


def cache_key(paths, tokenizer, reading: StageReading, cutoff_len: int, skip_bad_records: bool) -> str:
    digest = hashlib.sha256()
    digest.update(f"v{FORMAT_VERSION}|{reading.stage}|{cutoff_len}|{skip_bad_records}".encode())
    if not reading.documents:  # what renders conversations is part of the key
        digest.update(chat_format(tokenizer).fingerprint.encode())
    else:  # documents carry the special tokens the tokenizer adds to a text
        digest.update(f"|added {special_tokens_added(tokenizer)}".encode())
    digest.update(tokenizer_fingerprint(tokenizer).encode())
    for file in data_files(paths):
        digest.update(file.name.encode())
        hash_file_into(digest, file)
    return digest.hexdigest()[:24]


class TokenCache:
    """Read side of a cache entry: sample i's ids and target mask as numpy views (no copy)."""

    def __init__(self, directory):
        self.directory = Path(directory)
        self.meta = json.loads((self.directory / "meta.json").read_text(encoding="utf-8"))
        self.offsets = np.fromfile(self.directory / "offsets.bin", dtype=np.int64)
        size = int(self.offsets[-1])
        self.ids = (
            np.memmap(self.directory / "ids.bin", dtype=np.uint32, mode="r", shape=(size,))
            if size
            else np.zeros(0, np.uint32)
        )
        self.mask = (
            np.memmap(self.directory / "mask.bin", dtype=np.uint8, mode="r", shape=(size,))
            if size
            else np.zeros(0, np.uint8)
        )
        labels = self.directory / "desirable.bin"
        self.desirable = np.fromfile(labels, dtype=np.uint8).astype(bool) if labels.is_file() else None
        margins = self.directory / "margins.bin"
        self.margins = np.fromfile(margins, dtype=np.float64) if margins.is_file() else None
        self.file_of_sample = np.fromfile(self.directory / "files.bin", dtype=np.uint32).astype(np.int64)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @property
    def summary(self) -> CacheSummary:
        return CacheSummary(**self.meta["summary"])

    def sample(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return self.ids[start:end], self.mask[start:end]


def _encode_batch(
    tokenizer,
    samples: list[Sample],
    cutoff_len: int,
    summary: CacheSummary,
    labels: list | None = None,
    split_text: bool = False,
    margins: list | None = None,
) -> Iterator[tuple[list[int], list[bool], int]]:
    """Entries (ids, mask, file index) for a batch of samples of one kind (two per preference pair or KTO
    example), truncated to cutoff_len; a sample or pair left without any target is dropped, counted and
    (the first few) named with file and line. `labels` receives each kept KTO example's desirable flag,
    `margins` each kept pair's margin.
    Text is one entry per document (pretraining cuts blocks later) or, with `split_text` (text in an
    SFT run), one per cutoff_len piece, so nothing is truncated away."""
    if samples[0].kind == "text":
        texts = [s.text for s in samples]
        for sample, ids in zip(samples, encode_documents(tokenizer, texts)):
            pieces = [ids[i : i + cutoff_len] for i in range(0, len(ids), cutoff_len)] if split_text else [ids]
            for piece in pieces:
                yield piece, [True] * len(piece), sample.file_index
        return
    fmt = chat_format(tokenizer)
    prepared = []
    for s in samples:
        c = s.conversation
        if s.kind == "conversation":
            replies = [(c.messages, "all")]
        else:
            pair = (s.completion, s.kl_completion) if s.kind == "labelled" else (s.chosen, s.rejected)
            replies = [(c.messages + [r], "last") for r in pair]
        for messages, train in replies:
            try:
                prepared.append(fmt.prepare(messages, c.tools, train))
            except ChatFormatError as err:
                raise ChatFormatError(f"{s.where}: {err}") from None
    # One batched call: the Rust tokenizer spreads the batch over every core.
    encoded = fmt.encode_prepared(prepared)
    group = 1 if samples[0].kind == "conversation" else 2
    sides = ("completion", "KL row") if samples[0].kind == "labelled" else ("chosen", "rejected")
    for start in range(0, len(encoded), group):
        entries, reason = [], None
        for side, (ids, mask) in enumerate(encoded[start : start + group]):
            name = sides[side] + " " if group == 2 else ""
            if not any(mask):
                reason = reason or (f"{name}has no trained token at all", "untrained")
            elif len(ids) > cutoff_len and not any(mask[:cutoff_len]):
                first = mask.index(True)
                reason = reason or (
                    f"{name}has no trained token within cutoff_len {cutoff_len} (the prompt alone "
                    f"is {first} tokens; raise cutoff_len or shorten the record)",
                    "cutoff",
                )
            if len(ids) > cutoff_len:
                summary.truncated += 1
                ids, mask = ids[:cutoff_len], mask[:cutoff_len]
            entries.append((ids, mask, samples[start // group].file_index))
        if reason is not None:
            if reason[1] == "cutoff":
                summary.dropped_no_targets += 1
            else:
                summary.dropped_untrained += 1
            if len(summary.dropped_examples) < 10:
                summary.dropped_examples.append(f"{samples[start // group].where}: {reason[0]}")
            continue
        if labels is not None:
            labels.append(samples[start // group].desirable)
        if margins is not None:
            margins.append(float(samples[start // group].margin or 0.0))
        yield from entries


def validate_dataset(paths, reading: StageReading, skip_bad_records: bool) -> ReadReport:
    """Read every record once (the first bad one raises unless skipping), before anything is written."""
    report = ReadReport()
    for _ in read_samples(paths, reading, skip_bad_records, report):
        pass
    return report


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_dead_builds(root: Path) -> list[Path]:
    """Entries a killed build left under `.KEY.tmp-HOST-PID`: removed only when HOST is this machine
    and PID is no longer running, so a build in progress elsewhere (another rank, another node on a
    shared filesystem) is never touched."""
    host, removed = socket.gethostname(), []
    for path in root.glob(".*.tmp-*"):
        owner, _, pid = path.name.rpartition(".tmp-")[2].rpartition("-")
        if owner == host and pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def build_cache(
    paths,
    tokenizer,
    reading: StageReading,
    cutoff_len: int,
    cache_dir=None,
    skip_bad_records: bool = False,
    progress: bool = True,
) -> TokenCache:
    """The cache entry for these inputs: reused when it exists, built (atomically) when not."""
    root = Path(cache_dir) if cache_dir else default_cache_dir()
    key = cache_key(paths, tokenizer, reading, cutoff_len, skip_bad_records)
    final = root / key
    if (final / "meta.json").is_file():
        return TokenCache(final)

    report = validate_dataset(paths, reading, skip_bad_records)
    root.mkdir(parents=True, exist_ok=True)
    remove_dead_builds(root)
    tmp = root / f".{key}.tmp-{socket.gethostname()}-{os.getpid()}"  # unique even across nodes sharing a filesystem
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    summary = CacheSummary(
        records=report.records,
        skipped_bad_records=len(report.skipped),
        skipped_examples=report.skipped[:10],
        empty_files=report.empty_files[:10],
        bytes_read=sum(f.stat().st_size for f in data_files(paths)),
    )
    started = time.perf_counter()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=report.records, desc="tokenize", unit="rec", dynamic_ncols=True)
    try:
        with (
            open(tmp / "files.bin", "wb") as files_file,
            open(tmp / "ids.bin", "wb") as ids_file,
            open(tmp / "mask.bin", "wb") as mask_file,
            open(tmp / "offsets.bin", "wb") as offsets_file,
        ):
            offsets_file.write(np.zeros(1, np.int64).tobytes())
            position = 0
            batch: list[Sample] = []
            labels: list | None = [] if reading.labelled else None
            margins: list | None = [] if reading.margins else None
            split_text = not reading.documents
            file_records = [0] * len(data_files(paths))

            def flush():
                nonlocal position
                for ids, mask, file_index in _encode_batch(
                    tokenizer, batch, cutoff_len, summary, labels, split_text, margins
                ):
                    files_file.write(np.array([file_index], np.uint32).tobytes())
                    ids_file.write(np.asarray(ids, dtype=np.uint32).tobytes())
                    mask_file.write(np.asarray(mask, dtype=np.uint8).tobytes())
                    position += len(ids)
                    offsets_file.write(np.array([position], np.int64).tobytes())
                    summary.samples += 1
                    summary.tokens += len(ids)
                    summary.target_tokens += int(sum(mask))
                if bar is not None:
                    bar.update(len(batch))
                batch.clear()

            for sample in read_samples(paths, reading, skip_bad_records):
                file_records[sample.file_index] += 1
                if batch and sample.kind != batch[0].kind:  # files of different formats: one kind per batch
                    flush()
                batch.append(sample)
                if len(batch) >= BATCH_RECORDS:
                    flush()
            if batch:
                flush()
        if labels is not None:
            np.asarray(labels, dtype=np.uint8).tofile(tmp / "desirable.bin")
        if margins is not None:
            np.asarray(margins, dtype=np.float64).tofile(tmp / "margins.bin")
        summary.seconds = time.perf_counter() - started
        meta = {
            "format_version": FORMAT_VERSION,
            "stage": reading.stage,
            "cutoff_len": cutoff_len,
            "files": [str(f) for f in data_files(paths)],
            "file_records": file_records,
            "summary": asdict(summary),
        }
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        if final.exists():  # a concurrent build finished first; its entry is identical
            shutil.rmtree(tmp)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if bar is not None:
            bar.close()
    return TokenCache(final)
