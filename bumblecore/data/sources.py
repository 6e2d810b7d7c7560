"""A dataset's files and their records: files, globs and folders expanded to files; JSON arrays and
JSONL told apart by their first character and streamed record by record, each record with its place
(`line N` for JSONL, `record N` for a JSON array, 1-based) for the errors that name it.
"""

from __future__ import annotations

import glob
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Union


class DataError(ValueError):
    """A record that cannot be used; the message says where and why."""


def data_files(paths: Union[str, list[str]]) -> list[Path]:
    """Expand files, globs and directories (their .json/.jsonl files, sorted) into a list of files."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for entry in paths:
        path = Path(entry)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in (".json", ".jsonl"))
            if not found:
                raise DataError(f"{path}: directory holds no .json or .jsonl files")
            files += found
        elif path.is_file():
            files.append(path)
        elif any(c in str(entry) for c in "*?["):  # a glob: its files, sorted (** reaches into folders)
            found = sorted(Path(p) for p in glob.glob(str(entry), recursive=True) if Path(p).is_file())
            if not found:
                raise FileNotFoundError(f"dataset glob {entry} matches no file")
            files += found
        else:
            raise FileNotFoundError(f"dataset file {path} does not exist")
    if not files:
        raise DataError("no dataset files given (dataset_path is empty)")
    return files


UTF8_BOM = b"\xef\xbb\xbf"


def iter_json_records(file: Path) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON array or JSONL file, without loading the file whole.
    A JSONL line that is not JSON (or not UTF-8) comes as a DataError in place of the record."""
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).lstrip(UTF8_BOM).lstrip()
        while not head and handle.read(1):  # a long run of leading whitespace
            handle.seek(handle.tell() - 1)
            head = handle.read(1 << 16).lstrip()
        handle.seek(0)
        if head[:1] == b"[":
            yield from _iter_json_array(file, _Utf8Reader(file, handle))
            return
        for number, raw in enumerate(handle, 1):
            if number == 1:
                raw = raw[len(UTF8_BOM) :] if raw.startswith(UTF8_BOM) else raw
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                # Handed on, not raised: like a broken line, one bad record that skip_bad_records may skip.
                yield (
                    f"{file} line {number}",
                    DataError(
                        f"{file} line {number}: not UTF-8 text (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                        "save the file as UTF-8"
                    ),
                )
                continue
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                # Handed on, not raised: a broken line is one bad record, which skip_bad_records may skip.
                record = DataError(f"{file} line {number}: not valid JSON ({err.msg} at column {err.colno})")
            yield f"{file} line {number}", record


class _Utf8Reader:
    """read(n) -> str over a binary file, decoding UTF-8 as it goes; bytes that are not UTF-8 raise a
    DataError naming the file, the line and the byte (a JSON array cannot skip past them)."""

    def __init__(self, file: Path, handle):
        import codecs

        self.file, self.handle = file, handle
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.lines_before = 0  # newlines in the bytes decoded so far
        self.offset = 0  # bytes read so far
        self.first = True

    def read(self, size: int) -> str:
        data = self.handle.read(size)
        if self.first:
            data, self.first = (data[len(UTF8_BOM) :] if data.startswith(UTF8_BOM) else data), False
        try:
            text = self.decoder.decode(data, final=not data)
        except UnicodeDecodeError as err:
            pending = len(err.object) - len(data)  # bytes the decoder held back from the previous read
            position = err.start - pending
            line = self.lines_before + data[: max(0, position)].count(b"\n") + 1
            bad = err.object[err.start] if err.start < len(err.object) else 0
            raise DataError(
                f"{self.file} line {line}: not UTF-8 text (byte 0x{bad:02x} at byte "
                f"{self.offset + position} of the file); save the file as UTF-8"
            ) from None
        self.lines_before += data.count(b"\n")
        self.offset += len(data)
        return text


def _iter_json_array(file: Path, handle, chunk_size: int = 1 << 20) -> Iterator[tuple[str, object]]:
    """Stream the elements of a top-level JSON array with raw_decode over a sliding buffer."""
    decoder = json.JSONDecoder()
    buffer, position, number, finished = handle.read(chunk_size), 0, 0, False
    position = buffer.index("[") + 1
    while True:
        while True:  # skip whitespace and commas between elements
            while position < len(buffer) and (buffer[position].isspace() or buffer[position] == ","):
                position += 1
            if position < len(buffer) or finished:
                break
            more = handle.read(chunk_size)
            finished = not more
            buffer, position = buffer[position:] + more, 0
        if position >= len(buffer):
            raise DataError(f"{file}: JSON array is not closed (file truncated?) after record {number}")
        if buffer[position] == "]":
            return
        try:
            record, end = decoder.raw_decode(buffer, position)
        except json.JSONDecodeError as err:
            if not finished:  # maybe the element continues in the next chunk
                more = handle.read(chunk_size)
                finished = not more
                buffer, position = buffer[position:] + more, 0
                continue
            raise DataError(f"{file} record {number + 1}: not valid JSON ({err.msg})") from None
        number += 1
        yield f"{file} record {number}", record
        buffer, position = buffer[end:], 0
        if len(buffer) < chunk_size // 2 and not finished:
            more = handle.read(chunk_size)
            finished = not more
            buffer += more


def why_empty(file: Path) -> str:
    """Why a file gave no record, for the report of empty files."""
    with open(file, "rb") as handle:
        head = handle.read(1 << 16).lstrip(UTF8_BOM).lstrip()
    if file.stat().st_size == 0:
        return "the file is empty"
    if head[:1] == b"[":
        return "the JSON array holds no records"
    return "the file holds only blank lines"
