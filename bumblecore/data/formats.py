"""Read a dataset's files (docs/DATA_FORMAT.md) as validated samples, the way the training stage reads them.

Files are streamed record by record (data/sources.py); each file's format is detected from its first
record (data/detect.py) and every record goes through its format's adapter (data/adapters.py). Every
error names the file, the record's place (`line N` for JSONL, `record N` for a JSON array, 1-based) and
the field.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Optional

from bumblecore.data.adapters import Sample, record_to_sample
from bumblecore.data.detect import detect_format
from bumblecore.data.sources import DataError, data_files, iter_json_records, why_empty


@dataclass
class ReadReport:
    records: int = 0
    skipped: list[str] = field(default_factory=list)
    empty_files: list[str] = field(default_factory=list)  # "<file>: why it holds no record"


@dataclass(frozen=True)
class StageReading:
    """What a training stage reads and how its records become training units (its recipe,
    bumblecore/recipes/, holds it): the formats it accepts, the format it reads a detected one as, its
    examples made from the samples, and the units' layout."""

    stage: str  # the stage's name: in errors, and part of the token cache's key
    formats: tuple[str, ...]
    read_as: dict[str, str] = field(default_factory=dict)
    examples: Callable[[Iterator[Sample]], Iterator[Sample]] = iter  # iter: the samples as they are
    documents: bool = False  # text as one document stream, cut into blocks (no chat template)
    pairs: bool = False  # a unit is two rows (chosen and rejected, or a completion and its KL row)
    labelled: bool = False  # each unit carries a desirable flag
    margins: bool = False  # each pair carries its record's margin (a number; 0 when absent)


def kto_examples(samples: Iterator[Sample]) -> Iterator[Sample]:
    """KTO's examples in the data's order: a preference pair becomes a desirable (chosen) and an
    undesirable (rejected) example. Each carries its KL completion, the first completion of the next
    record (the last record's: the first record's), so a KL row pairs a prompt with a completion written
    for another prompt, fixed by the data alone (deterministic, cacheable). Streams, one record ahead."""
    first, pending = None, []
    for sample in samples:
        if sample.kind == "preference":
            examples = [
                Sample(
                    "labelled",
                    conversation=sample.conversation,
                    completion=reply,
                    desirable=good,
                    where=sample.where,
                    file_index=sample.file_index,
                )
                for reply, good in ((sample.chosen, True), (sample.rejected, False))
            ]
        else:
            examples = [sample]
        first = first or examples[0].completion
        for example in pending:
            example.kl_completion = examples[0].completion
            yield example
        pending = examples
    for example in pending:
        example.kl_completion = first
        yield example


def read_samples(
    paths,
    reading: Optional[StageReading] = None,
    skip_bad_records: bool = False,
    report: Optional[ReadReport] = None,
) -> Iterator[Sample]:
    """Validated samples of every file, streamed. The format of each file is detected from its first
    record and must suit the stage's `reading` (None: every format, as detected); later records must be
    in the same format. By default the first bad record raises; with skip_bad_records it is reported in
    `report.skipped` and skipped. The samples come out as the reading's examples (kto_examples for KTO)."""
    samples = _read_records(paths, reading, skip_bad_records, report if report is not None else ReadReport())
    return reading.examples(samples) if reading else samples


def _read_records(
    paths, reading: Optional[StageReading], skip_bad_records: bool, report: ReadReport
) -> Iterator[Sample]:
    for file_index, file in enumerate(data_files(paths)):
        fmt = None
        seen = 0
        for where, record in iter_json_records(file):
            seen += 1
            try:
                if isinstance(record, DataError):
                    raise record
                if fmt is None:
                    fmt = detect_format(record, where)
                    if reading:
                        fmt = reading.read_as.get(fmt, fmt)
                        if fmt not in reading.formats:
                            raise DataError(
                                f"{where}: {fmt} records do not suit training_stage {reading.stage} "
                                f"(expects {' or '.join(reading.formats)})"
                            )
                sample = record_to_sample(record, fmt, where)
                sample.file_index = file_index
            except DataError as err:
                if not skip_bad_records or (fmt is None and not isinstance(record, DataError)):
                    raise  # (a first record whose format cannot be told stops the run even when skipping)
                report.skipped.append(str(err))
                continue
            report.records += 1
            yield sample
        if not seen:
            report.empty_files.append(f"{file}: {why_empty(file)}")
