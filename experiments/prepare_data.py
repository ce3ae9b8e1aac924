"""Tokenize text files into ArrayRecord shards for training (`data.path=DIR data.tokenizer=...`).

    python -m experiments.prepare_data --tokenizer tokenizer.json --input 'corpus/**/*.jsonl' --output DIR
        [--workers N] [--val-fraction F] [--text-field text] [--txt-documents file|line|paragraph]
        [--shards N] [--piece-mb M] [--eos-token TOKEN | --no-eos] [--seed S]

Reads .txt, .jsonl (one JSON object per line, text in --text-field) and .parquet (text column
--text-field) files; each document's token ids, followed by the tokenizer's end-of-sequence token,
become one record. Writes DIR/train-NNNNN.array_record, DIR/validation-NNNNN.array_record and
DIR/metadata.json (tokenizer, counts, shards, dtype). Worker processes take whole files, and
pieces of about --piece-mb of larger .jsonl / .parquet files.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Sequence


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m experiments.prepare_data", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokenizer", required=True, help="path to a Hugging Face tokenizer.json (or 'byte')")
    p.add_argument("--input", required=True, action="append",
                   help="glob of input files (.txt, .jsonl, .parquet; ** recurses); may be repeated")
    p.add_argument("--output", required=True, help="dataset directory to create (must be absent or empty)")
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1),
                   help="tokenizing processes (default: min(8, CPU count))")
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents held out for validation (default 0.01)")
    p.add_argument("--text-field", default="text", help="JSON field / parquet column holding the text")
    p.add_argument("--txt-documents", default="file", choices=["file", "line", "paragraph"],
                   help="what one document of a .txt file is (default: the whole file)")
    p.add_argument("--shards", type=int, default=None, help="shards per split (default: min(pieces, 64))")
    p.add_argument("--piece-mb", type=float, default=64.0,
                   help=".jsonl / .parquet files larger than this many MiB are cut into pieces for the workers")
    p.add_argument("--eos-token", default=None,
                   help="end-of-sequence token (default: tokenizer_config.json's, else a known name)")
    p.add_argument("--no-eos", action="store_true", help="allow a tokenizer without end-of-sequence token")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation split")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    from deltanet_jax.data.prepare import prepare_dataset

    try:
        meta = prepare_dataset(
            args.input, args.output, tokenizer=args.tokenizer, workers=args.workers, num_shards=args.shards,
            val_fraction=args.val_fraction, seed=args.seed, text_field=args.text_field,
            txt_documents=args.txt_documents, eos_token=args.eos_token, require_eos=not args.no_eos,
            progress=not args.no_progress, piece_bytes=max(1, int(args.piece_mb * 2**20)),
        )
    except (ValueError, OSError) as err:  # bad input: say what, no traceback
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    tr, va = meta["splits"]["train"], meta["splits"]["validation"]
    print(f"wrote {args.output}: train {tr['documents']} documents / {tr['tokens']} tokens in "
          f"{len(tr['shards'])} shards, validation {va['documents']} documents / {va['tokens']} tokens "
          f"in {len(va['shards'])} shards ({meta['dtype']}, vocab {meta['tokenizer']['vocab_size']}, "
          f"{meta['skipped_documents']} empty documents skipped)")
    if args.val_fraction > 0 and va["documents"] == 0:
        print("note: no document fell into the validation split; training needs one "
              "(raise --val-fraction or add documents)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
