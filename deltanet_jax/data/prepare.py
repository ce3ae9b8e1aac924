"""Tokenize text files into a prepared dataset (the format of `deltanet_jax.data.token_records`).

Input files, large ones cut into pieces of about `piece_bytes` (see `documents.split_file`), are
spread over `num_shards` shard tasks (largest first onto the lightest shard); each task tokenizes
its pieces in input order and writes one training and one validation shard, in `workers`
processes. A document goes to validation when a hash of (seed, file name, its key in the file:
line offset, row or index) falls below `val_fraction`, so the split depends neither on the
number of workers nor on the shards.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import multiprocessing
import os
import queue
from pathlib import Path
from typing import Any, Callable

from deltanet_jax.data.documents import TXT_DOCUMENTS, Piece, check_input, find_inputs, iter_documents, split_file
from deltanet_jax.data.token_records import (
    FORMAT, FORMAT_VERSION, METADATA_FILE, SPLITS, encode_record, shard_name, token_dtype,
)
from deltanet_jax.data.tokenizer import ByteTokenizer, load_tokenizer

ENCODE_BATCH = 256  # documents tokenized per call
PIECE_BYTES = 64 << 20  # .jsonl / .parquet files larger than this are shared by several tasks


@dataclasses.dataclass(frozen=True)
class ShardTask:
    """Pieces of files [in order] whose documents make shard `index` of each split."""

    index: int
    pieces: tuple[Piece, ...]
    names: tuple[str, ...]  # their file names relative to the inputs' common folder (for the split hash)
    output: str
    tokenizer: str
    eos_token: str | None
    dtype: str
    val_fraction: float
    seed: int
    text_field: str
    txt_documents: str


def in_validation(seed: int, name: str, key: int, val_fraction: float) -> bool:
    """Whether the document of file `name` at `key` (see `iter_documents`) is a validation one."""
    if val_fraction <= 0:
        return False
    digest = hashlib.blake2b(f"{seed}:{name}:{key}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64 < val_fraction


def run_shard_task(task: ShardTask, progress: Callable[[int], None] = lambda n: None) -> dict[str, Any]:
    """Tokenize `task.pieces` into the task's shards; returns per-split document and token counts.

    `progress(n)` is told of every n input bytes done.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    tokenizer = load_tokenizer(task.tokenizer, eos_token=task.eos_token)
    eos = [] if tokenizer.eos_id is None else [tokenizer.eos_id]
    out = Path(task.output)
    stats = {split: {"file": shard_name(split, task.index), "documents": 0, "tokens": 0} for split in SPLITS}
    writers = {split: ArrayRecordWriter(str(out / stats[split]["file"]), "group_size:1") for split in SPLITS}
    skipped = 0
    try:
        for piece, name in zip(task.pieces, task.names):
            size, done = piece.size, 0
            pending: list[tuple[int, str]] = []

            def flush() -> None:
                nonlocal skipped, done
                encoded = tokenizer.encode_batch([text for _, text in pending])
                for (key, text), ids in zip(pending, encoded):
                    ids = list(ids) + eos
                    if len(ids) < 2:  # nothing to predict
                        skipped += 1
                        continue
                    split = "validation" if in_validation(task.seed, name, key, task.val_fraction) else "train"
                    writers[split].write(encode_record(ids, task.dtype))
                    stats[split]["documents"] += 1
                    stats[split]["tokens"] += len(ids)
                step = min(sum(len(text.encode("utf-8")) for _, text in pending), size - done)
                done += step
                progress(step)
                pending.clear()

            for key, text in iter_documents(piece, text_field=task.text_field, txt_documents=task.txt_documents):
                if not text:
                    skipped += 1
                    continue
                pending.append((key, text))
                if len(pending) == ENCODE_BATCH:
                    flush()
            if pending:
                flush()
            progress(size - done)
    finally:
        for writer in writers.values():
            writer.close()
    for split in SPLITS:
        if stats[split]["documents"] == 0:
            (out / stats[split]["file"]).unlink()
    return {"shards": stats, "skipped_documents": skipped}


_progress_queue: Any = None


def _init_worker(progress_queue: Any) -> None:
    global _progress_queue
    _progress_queue = progress_queue
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # parallelism comes from the processes


def _run_in_worker(task: ShardTask) -> dict[str, Any]:
    return run_shard_task(task, _progress_queue.put)


def assign_shards(sizes: list[int], num_shards: int) -> list[list[int]]:
    """Indices of pieces (of `sizes` bytes) per shard: largest first onto the shard with the fewest
    bytes; each shard's pieces in input order."""
    loads = [0] * num_shards
    groups: list[list[int]] = [[] for _ in range(num_shards)]
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        target = min(range(num_shards), key=lambda s: (loads[s], s))
        groups[target].append(i)
        loads[target] += sizes[i]
    return [sorted(g) for g in groups if g]


def prepare_dataset(
    inputs: str | list[str], output: str | Path, *, tokenizer: str, workers: int = 1, num_shards: int | None = None,
    val_fraction: float = 0.01, seed: int = 0, text_field: str = "text", txt_documents: str = "file",
    eos_token: str | None = None, require_eos: bool = True, progress: bool = True, piece_bytes: int = PIECE_BYTES,
) -> dict[str, Any]:
    """Tokenize the files matching glob(s) `inputs` into dataset directory `output`; returns the
    metadata it writes to `output/metadata.json`.

    Checks everything it can before writing (files exist, are readable and hold the text field,
    the tokenizer loads and has an end-of-sequence token unless `require_eos` is False, `output`
    is empty or absent); on failure removes what it wrote.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    if piece_bytes < 1:
        raise ValueError(f"piece_bytes must be >= 1, got {piece_bytes}")
    if num_shards is not None and num_shards < 1:
        raise ValueError(f"num_shards must be >= 1, got {num_shards}")
    if txt_documents not in TXT_DOCUMENTS:
        raise ValueError(f"txt_documents must be one of {TXT_DOCUMENTS}, got {txt_documents!r}")
    tok = load_tokenizer(tokenizer, eos_token=eos_token)
    if tok.eos_id is None and require_eos and not isinstance(tok, ByteTokenizer):
        raise ValueError(f"tokenizer {tokenizer!r} has no end-of-sequence token I recognise; name one with "
                         "eos_token (--eos-token), or allow documents without one (--no-eos)")
    out = Path(output).expanduser()
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"output {str(out)!r} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise FileExistsError(f"output directory {str(out)!r} is not empty")
    files = find_inputs(inputs)
    for f in files:
        check_input(f, text_field=text_field)
    root = Path(os.path.commonpath([str(f.parent) for f in files]))
    pieces = [(piece, str(f.relative_to(root))) for f in files for piece in split_file(f, piece_bytes)]
    dtype = token_dtype(tok.vocab_size)
    groups = assign_shards([p.size for p, _ in pieces], min(num_shards or 64, len(pieces)))
    tasks = [
        ShardTask(index=i, pieces=tuple(pieces[j][0] for j in g), names=tuple(pieces[j][1] for j in g),
                  output=str(out), tokenizer=tokenizer, eos_token=eos_token, dtype=dtype, val_fraction=val_fraction,
                  seed=seed, text_field=text_field, txt_documents=txt_documents)
        for i, g in enumerate(groups)
    ]
    created = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    total_bytes = sum(p.size for p, _ in pieces)
    try:
        results = _run_tasks(tasks, workers, total_bytes, progress)
    except BaseException:
        for task in tasks:
            for split in SPLITS:
                (out / shard_name(split, task.index)).unlink(missing_ok=True)
        if created:
            try:
                out.rmdir()
            except OSError:
                pass
        raise
    meta = _metadata(tok, dtype, files, sum(f.stat().st_size for f in files), results, val_fraction=val_fraction,
                     seed=seed, text_field=text_field, txt_documents=txt_documents)
    tmp = out / (METADATA_FILE + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    tmp.replace(out / METADATA_FILE)
    return meta


def _run_tasks(tasks: list[ShardTask], workers: int, total_bytes: int, progress: bool) -> list[dict[str, Any]]:
    from tqdm import tqdm

    bar = tqdm(total=total_bytes, unit="B", unit_scale=True, desc="tokenizing", disable=not progress)
    try:
        if workers == 1 or len(tasks) == 1:
            return [run_shard_task(task, bar.update) for task in tasks]
        ctx = multiprocessing.get_context("spawn")
        progress_queue = ctx.Queue()
        with concurrent.futures.ProcessPoolExecutor(
            max_workers=min(workers, len(tasks)), mp_context=ctx, initializer=_init_worker,
            initargs=(progress_queue,),
        ) as pool:
            futures = [pool.submit(_run_in_worker, task) for task in tasks]
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.2,
                                                        return_when=concurrent.futures.FIRST_EXCEPTION)
                _drain(progress_queue, bar)
                for f in done:
                    if f.exception() is not None:
                        for other in pending:
                            other.cancel()
                        raise f.exception()
            _drain(progress_queue, bar)
            return [f.result() for f in futures]
    finally:
        bar.close()


def _drain(progress_queue: Any, bar: Any) -> None:
    while True:
        try:
            bar.update(progress_queue.get_nowait())
        except queue.Empty:
            return


def _metadata(tok: Any, dtype: str, files: list[Path], total_bytes: int, results: list[dict[str, Any]],
              **options: Any) -> dict[str, Any]:
    splits = {}
    for split in SPLITS:
        shards = [r["shards"][split] for r in results if r["shards"][split]["documents"] > 0]
        splits[split] = {
            "documents": sum(s["documents"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
            "shards": shards,
        }
    return {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "tokenizer": {
            "spec": tok.spec if isinstance(tok, ByteTokenizer) else str(tok.path),
            "sha256": getattr(tok, "sha256", None),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "eos_token": getattr(tok, "eos_token", None),
        },
        "dtype": dtype,
        "inputs": {"files": len(files), "bytes": total_bytes, "first": str(files[0]), "last": str(files[-1])},
        **options,
        "skipped_documents": sum(r["skipped_documents"] for r in results),
        "splits": splits,
    }
