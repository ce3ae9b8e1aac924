"""Documents of text files: `.txt`, `.jsonl` (a text field per line) and `.parquet` (a text column).

A `.txt` file is one document (`txt_documents="file"`), one per non-empty line ("line"), or one
per block separated by blank lines ("paragraph"). Empty texts are skipped by the caller. Large
.jsonl and .parquet files are cut into pieces (byte ranges of whole lines, row groups) that
worker processes tokenize apart.
"""

from __future__ import annotations

import dataclasses
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
            record = _parse_json_line(first, path, "line 1")
            _text_of(record, text_field, path, "line 1")
    elif suffix == ".parquet":
        schema = _parquet_file(path).schema_arrow
        if text_field not in schema.names:
            raise InputError(f"{str(path)!r} has no column {text_field!r} (columns: {', '.join(schema.names)})")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Part of one input file tokenized as a unit: bytes [start, stop) of a .jsonl file (whole
    lines: those starting in the range), row groups of a .parquet file, or a whole .txt file."""

    path: str
    size: int  # bytes, for balancing shards and the progress bar
    start: int = 0
    stop: int | None = None
    row_groups: tuple[int, ...] | None = None


def split_file(path: Path, piece_bytes: int) -> list[Piece]:
    """`path` cut into pieces of about `piece_bytes` (so workers share a large file); .txt whole."""
    size = path.stat().st_size
    suffix = path.suffix.lower()
    if suffix == ".jsonl" and size > piece_bytes:
        edges = list(range(0, size, piece_bytes)) + [size]
        return [Piece(str(path), b - a, a, b) for a, b in zip(edges[:-1], edges[1:])]
    if suffix == ".parquet":
        meta = _parquet_file(path).metadata
        groups: list[list[int]] = [[]]
        group_bytes = [0]
        for g in range(meta.num_row_groups):
            if groups[-1] and group_bytes[-1] >= piece_bytes:
                groups.append([])
                group_bytes.append(0)
            groups[-1].append(g)
            group_bytes[-1] += meta.row_group(g).total_byte_size
        if len(groups) > 1:
            scale = size / max(1, sum(group_bytes))  # compressed file bytes per uncompressed byte
            return [Piece(str(path), int(b * scale), row_groups=tuple(g)) for g, b in zip(groups, group_bytes)]
    return [Piece(str(path), size)]


def iter_documents(piece: Piece | Path, *, text_field: str = "text",
                   txt_documents: str = "file") -> Iterator[tuple[int, str]]:
    """(key, text) of the documents of a piece (or whole file), in order; `key` tells a document
    apart within its file: the byte offset of its line (.jsonl), its row (.parquet), its index (.txt).
    Raises InputError naming the file (and line)."""
    if not isinstance(piece, Piece):
        piece = Piece(str(piece), 0)
    path = Path(piece.path)
    suffix = path.suffix.lower()
    if suffix == ".txt":
        if txt_documents not in TXT_DOCUMENTS:
            raise ValueError(f"txt_documents must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
        text = _decode_utf8(_read_bytes(path), path)
        if txt_documents == "file":
            docs = [text]
        elif txt_documents == "line":
            docs = [line for line in text.splitlines() if line.strip()]
        else:
            docs = [block.strip("\n") for block in re.split(r"\n(?:[ \t\r]*\n)+", text) if block.strip()]
        yield from enumerate(docs)
    elif suffix == ".jsonl":
        yield from _jsonl_documents(path, piece.start, piece.stop, text_field)
    elif suffix == ".parquet":
        pf = _parquet_file(path)
        if text_field not in pf.schema_arrow.names:
            columns = ", ".join(pf.schema_arrow.names)
            raise InputError(f"{str(path)!r} has no column {text_field!r} (columns: {columns})")
        groups = range(pf.metadata.num_row_groups) if piece.row_groups is None else piece.row_groups
        try:
            for g in groups:
                row = sum(pf.metadata.row_group(i).num_rows for i in range(g))
                for value in pf.read_row_group(g, columns=[text_field]).column(0).to_pylist():
                    if value is not None and not isinstance(value, str):
                        raise InputError(f"{str(path)!r}: column {text_field!r} holds {type(value).__name__}, not text")
                    if value is not None:
                        yield row, value
                    row += 1
        except OSError as err:
            raise InputError(f"cannot read {str(path)!r}: {err}") from err
    else:
        raise InputError(f"{str(path)!r}: unsupported file type {suffix!r}")


def _jsonl_documents(path: Path, start: int, stop: int | None, field: str) -> Iterator[tuple[int, str]]:
    """(byte offset, text) of the lines of `path` that start in [start, stop)."""
    try:
        with open(path, "rb") as f:
            offset = start
            number = None  # line numbers are known only when reading from the top
            if start > 0:  # the line holding byte start - 1 belongs to the previous piece
                f.seek(start - 1)
                offset = start - 1 + len(f.readline())
            else:
                number = 0
            f.seek(offset)
            while stop is None or offset < stop:
                line = f.readline()
                if not line:
                    break
                number = None if number is None else number + 1
                if line.strip():
                    where = f"line {number}" if number is not None else f"the line at byte {offset}"
                    record = _parse_json_line(line, path, where)
                    text = _text_of(record, field, path, where)
                    if text is not None:
                        yield offset, text
                offset += len(line)
    except OSError as err:
        raise InputError(f"cannot read {str(path)!r}: {err.strerror or err}") from err


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


def _parse_json_line(line: bytes, path: Path, where: str) -> object:
    try:
        return json.loads(line)
    except ValueError as err:
        raise InputError(f"{str(path)!r} {where} is not JSON: {err}") from None


def _text_of(record: object, field: str, path: Path, where: str) -> str | None:
    if not isinstance(record, dict) or field not in record:
        raise InputError(f"{str(path)!r} {where} has no field {field!r}")
    text = record[field]
    if text is not None and not isinstance(text, str):
        raise InputError(f"{str(path)!r} {where}: field {field!r} is {type(text).__name__}, not text")
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
