"""Run-directory records: config.json, metrics.jsonl, TensorBoard events, loss and throughput plots."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
LOSS_PLOT = "loss.png"
THROUGHPUT_PLOT = "throughput.png"


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write `obj` as indented JSON through a temporary file, so `path` is never half written."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    os.replace(tmp, path)


def write_config(run_dir: Path, config: dict[str, Any]) -> None:
    write_json_atomic(Path(run_dir) / CONFIG_FILE, config)


def read_config(run_dir: Path) -> dict[str, Any]:
    path = Path(run_dir) / CONFIG_FILE
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err


def read_metrics(run_dir: Path) -> list[dict[str, Any]]:
    """All records of metrics.jsonl (empty list if the file does not exist)."""
    path = Path(run_dir) / METRICS_FILE
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def truncate_metrics(run_dir: Path, last_step: int) -> list[dict[str, Any]]:
    """Drop records after `last_step` (written past the checkpoint a run resumes from); return the rest."""
    kept = [r for r in read_metrics(run_dir) if r.get("step", 0) <= last_step]
    path = Path(run_dir) / METRICS_FILE
    if path.exists():
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in kept))
        os.replace(tmp, path)
    return kept


class MetricsWriter:
    """Appends one JSON object per record to metrics.jsonl and mirrors scalars to TensorBoard.

    Without tensorboardX installed the mirror is off and `tensorboard_off` says why (the records
    still go to metrics.jsonl); the trainer prints it as a warning.
    """

    def __init__(self, run_dir: Path, *, tensorboard: bool = True):
        self.run_dir = Path(run_dir)
        self._tb = None
        self.tensorboard_off: str | None = None
        if tensorboard:
            try:
                from tensorboardX import SummaryWriter
            except ImportError as e:
                self.tensorboard_off = (f"TensorBoard events are not written ({e}); metrics go to {METRICS_FILE} "
                                        "only. `pip install tensorboardX` brings back tensorboard/.")
            else:
                self._tb = SummaryWriter(logdir=str(self.run_dir / TENSORBOARD_DIR), flush_secs=30)
        self._file = open(self.run_dir / METRICS_FILE, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        """`record` holds `step` and scalar values; written as one line and flushed."""
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        if self._tb is not None:
            step = int(record["step"])
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(_tb_tag(key), value, step)

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


def _tb_tag(key: str) -> str:
    if key.startswith("val_"):
        return "val/" + key[len("val_") :]
    return "train/" + key


def plot_losses(run_dir: Path, records: list[dict[str, Any]] | None = None) -> Path | None:
    """Save loss.png (training and validation loss against step); None when nothing is logged yet."""
    records = read_metrics(run_dir) if records is None else records
    train = [(r["step"], r["loss"]) for r in records if "loss" in r]
    val = [(r["step"], r["val_loss"]) for r in records if "val_loss" in r]
    if not train and not val:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss", linewidth=1)
    if val:
        ax.plot(*zip(*val), "o-", label="validation loss", markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save_figure(fig, Path(run_dir) / LOSS_PLOT)


def plot_throughput(run_dir: Path, records: list[dict[str, Any]] | None = None) -> Path | None:
    """Save throughput.png (training tokens/s, and MFU when known, against step); None without records."""
    records = read_metrics(run_dir) if records is None else records
    rate = [(r["step"], r["tokens_per_s"]) for r in records if "tokens_per_s" in r]
    if not rate:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    ax.plot(*zip(*rate), label="tokens/s", linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training tokens / s")
    ax.grid(alpha=0.3)
    mfu = [(r["step"], 100 * r["mfu"]) for r in records if "mfu" in r]
    if mfu:
        ax2 = ax.twinx()
        ax2.plot(*zip(*mfu), color="tab:orange", linewidth=1, label="MFU")
        ax2.set_ylabel("model FLOPs utilisation (%)")
    return _save_figure(fig, Path(run_dir) / THROUGHPUT_PLOT)


def _save_figure(fig, path: Path) -> Path:
    """Write `fig` to `path` through a temporary file (never a half-written PNG) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path
