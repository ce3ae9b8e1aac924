"""experiments.compare: a tiny run of two models writes curves, tables and run directories."""

import csv
import json

import pytest

from experiments import compare

TINY = ["model.num_hidden_layers=1", "model.hidden_size=32", "model.intermediate_size=64", "train.seq_len=16", "train.batch_size=2",
        "train.steps=4", "train.warmup_steps=1", "train.eval_every=2", "train.eval_batches=1", "train.log_every=2"]


def test_compare_tiny(tmp_path, capsys):
    rows = compare.main(["--quick", "--models", "deltanet,linear-attention", "--out", str(tmp_path), *TINY])
    assert [r["model"] for r in rows] == ["deltanet", "linear-attention"]
    with open(tmp_path / "compare.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [r["model"] for r in table] == ["deltanet", "linear-attention"]
    for r in table:
        assert int(r["tokens"]) == 4 * 2 * 16  # the same token budget for each model
        assert 0 < float(r["final_val_loss"]) < 10 and float(r["tokens_per_s"]) > 0 and int(r["params"]) > 0
    # matched sizes: the mixers differ, the parameter counts nearly do not
    counts = [int(r["params"]) for r in table]
    assert max(counts) / min(counts) < 1.05
    md = (tmp_path / "compare.md").read_text()
    assert "| DeltaNet |" in md and "| Linear attention |" in md and "128 tokens" in md
    png = (tmp_path / "compare.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    for name in ("deltanet", "linear-attention"):
        records = [json.loads(line) for line in (tmp_path / "runs" / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in records if "val_loss" in r] == [2, 4]
    out = capsys.readouterr().out
    assert "token budget per model: 4 updates x 2 sequences x 16 tokens = 128 tokens" in out


def test_compare_refuses_before_work(tmp_path, capsys):
    with pytest.raises(SystemExit) as err:
        compare.main(["--quick", "--models", "deltanet,mamba", "--out", str(tmp_path / "a")])
    assert err.value.code == 2 and "unknown model 'mamba'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        compare.main(["--quick", "--out", str(tmp_path / "b"), "train.stepz=3"])
    assert "train.stepz" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


def test_compare_stops_at_a_signal(tmp_path, monkeypatch, capsys):
    """A run stopped by SIGTERM ends the comparison: no later model trains, no partial tables."""
    import math
    import signal

    from deltanet_jax.train import trainer

    calls = []

    def stopped(cfg, plan, progress=False):
        calls.append(plan.run_dir.name)
        return trainer.RunResult(step=1, val_loss=math.nan, run_dir=plan.run_dir, stopped_by=signal.SIGTERM)

    monkeypatch.setattr(trainer, "train", stopped)
    with pytest.raises(SystemExit) as err:
        compare.main(["--quick", "--models", "deltanet,linear-attention", "--out", str(tmp_path), *TINY])
    assert err.value.code == 128 + signal.SIGTERM and calls == ["deltanet"]
    assert not (tmp_path / "compare.csv").exists() and not (tmp_path / "compare.md").exists()
    assert "SIGTERM during deltanet" in capsys.readouterr().out
