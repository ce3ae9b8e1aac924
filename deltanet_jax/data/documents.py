"""Documents of text files: `.txt`, `.jsonl` (a text field per line) and `.parquet` (a text column).

A `.txt` file is one document (`txt_documents="file"`), one per non-empty line ("line"), or one
per block separated by blank lines ("paragraph"). Empty texts are skipped by the caller.
"""

from __future__ import annotations

import glob
import json
import re
from pathlib import Path
from typing import Iterator

SUPPORTED_SUFFIXES = (".txt", ".jsonl", ".parquet")
TXT_DOCUMENTS = ("file", "line", "paragraph")


class InputError(ValueError):
    """An input file or pattern is unusable; the message names it."""


def find_inputs(patterns: str | list[str]) -> list[Path]:
    """Sorted, de-duplicated files matching glob `patterns` (`**` recurses). Raises InputError when
    nothing matches or a match has an unsupported suffix."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    found: set[Path] = set()
    for pattern in patterns:
        matches = [Path(p) for p in glob.glob(str(Path(pattern).expanduser()), recursive=True)]
        files = [p for p in matches if p.is_file()]
        if not files:
            raise InputError(f"no files matched {pattern!r}")
        found.update(p.resolve() for p in files)
    paths = sorted(found)
    for path in paths:
        if path.suffix.lower() not in SUPPORTED_SUFFIXES:
            raise InputError(f"{str(path)!r}: unsupported file type {path.suffix or '(none)'!r} "
                             f"(supported: {', '.join(SUPPORTED_SUFFIXES)})")
    return paths


def check_input(path: Path, *, text_field: str = "text") -> None:
    """Cheap look at one input before any work: readable, and for .jsonl / .parquet the text field
    present (first record / schema). Raises InputError naming the file."""
    suffix = path.suffix.lower()
    try:
        with open(path, "rb") as f:
            head = f.read(1 << 16)
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    if suffix == ".txt":
        _decode_utf8(head, path, partial=True)
    elif suffix == ".jsonl":
        first = next((line for line in head.split(b"\n") if line.strip()), None)
        if first is not None and len(first) < len(head):  # a whole first line was read
            record = _parse_json_line(first, path, 1)
            _text_of(record, text_field, path, 1)
    elif suffix == ".parquet":
        schema = _parquet_file(path).schema_arrow
        if text_field not in schema.names:
            raise InputError(f"{str(path)!r} has no column {text_field!r} (columns: {', '.join(schema.names)})")


def iter_documents(path: Path, *, text_field: str = "text", txt_documents: str = "file") -> Iterator[str]:
    """Texts of the documents of one file, in order. Raises InputError naming the file (and line)."""
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if txt_documents not in TXT_DOCUMENTS:
            raise ValueError(f"txt_documents must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
        text = _decode_utf8(_read_bytes(path), path)
        if txt_documents == "file":
            yield text
        elif txt_documents == "line":
            yield from (line for line in text.splitlines() if line.strip())
        else:
            yield from (block.strip("\n") for block in re.split(r"\n(?:[ \t\r]*\n)+", text) if block.strip())
    elif suffix == ".jsonl":
        try:
            with open(path, "rb") as f:
                for number, line in enumerate(f, 1):
                    if line.strip():
                        text = _text_of(_parse_json_line(line, path, number), text_field, path, number)
                        if text is not None:
                            yield text
        except OSError as err:
            raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err
    elif suffix == ".parquet":
        pf = _parquet_file(path)
        if text_field not in pf.schema_arrow.names:
            raise InputError(f"{str(path)!r} has no column {text_field!r} (columns: {', '.join(pf.schema_arrow.names)})")
        try:
            for batch in pf.iter_batches(batch_size=1024, columns=[text_field]):
                for value in batch.column(0).to_pylist():
                    if value is None:
                        continue
                    if not isinstance(value, str):
                        raise InputError(f"{str(path)!r}: column {text_field!r} holds {type(value).__name__}, not text")
                    yield value
        except OSError as err:
            raise InputError(f"cannot read {str(path)!r}: {err}") from err
    else:
        raise InputError(f"{str(path)!r}: unsupported file type {suffix!r}")


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err


def _decode_utf8(data: bytes, path: Path, partial: bool = False) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        if partial and err.start >= len(data) - 3:  # a character cut by the read limit
            return data[: err.start].decode("utf-8")
        raise InputError(f"{str(path)!r} is not UTF-8 text (byte {err.start}: {err.reason})") from None


def _parse_json_line(line: bytes, path: Path, number: int) -> object:
    try:
        return json.loads(line)
    except ValueError as err:
        raise InputError(f"{str(path)!r} line {number} is not JSON: {err}") from None


def _text_of(record: object, field: str, path: Path, number: int) -> str | None:
    if not isinstance(record, dict) or field not in record:
        raise InputError(f"{str(path)!r} line {number} has no field {field!r}")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise InputError(f"{str(path)!r} line {number}: field {field!r} is {type(text).__name__}, not text")
    return text


def _parquet_file(path: Path):
    try:
        import pyarrow.parquet as pq
    except ImportError as err:  # pragma: no cover - install dependency
        raise ImportError("reading .parquet files needs pyarrow: pip install pyarrow") from err
    try:
        return pq.ParquetFile(path)
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r} as parquet: {err}") from err
    except Exception as err:  # pyarrow raises ArrowInvalid (a ValueError) for corrupt files
        raise InputError(f"cannot read {str(path)!r} as parquet: {err}") from err
