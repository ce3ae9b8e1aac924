"""`python -m experiments.pretrain`: tiny runs in-process, resuming, and refusals before any work."""

import json
import math

import pytest

from experiments.pretrain import DEFAULT_PRESET, load_preset, main, preset_names
from deltanet_jax.train.config import RunConfig

TINY = [
    "model.hidden_size=32", "model.num_hidden_layers=1", "model.num_heads=2",
    "train.batch_size=4", "train.seq_len=16", "train.eval_every=4", "train.eval_batches=2",
    "train.log_every=1", "train.warmup_steps=0", "train.lr=0.01", "train.min_lr=0.001",
    "train.implementation=recurrent", "checkpoint.every_steps=4", "mesh.data=1",
]


def _run(run_dir, *extra):
    return main(["--run-dir", str(run_dir), "--no-progress", *TINY, *extra])


def _records(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def first_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("runs") / "tiny"
    result = _run(run_dir, "train.steps=8")
    return run_dir, result


def test_tiny_run_writes_the_run_dir(first_run):
    run_dir, result = first_run
    cfg = json.loads((run_dir / "config.json").read_text())
    assert set(cfg) == {"model", "train", "checkpoint", "mesh", "data"}
    assert cfg["train"]["steps"] == 8 and cfg["model"]["hidden_size"] == 32
    assert RunConfig.from_dict(cfg).model.num_heads == 2
    records = _records(run_dir)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "elapsed"} <= set(r)
    evals = [r for r in records if "val_loss" in r]
    assert [r["step"] for r in evals] == [4, 8]
    assert records[-1]["loss"] < records[0]["loss"] - 0.5
    assert evals[-1]["val_loss"] < evals[0]["val_loss"]
    assert result.step == 8 and math.isclose(result.val_loss, evals[-1]["val_loss"])
    assert (run_dir / "loss.png").stat().st_size > 0
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit()) == ["4", "8"]


def test_rerun_resumes_and_continues(first_run, tmp_path, capsys):
    source, _ = first_run
    run_dir = tmp_path / "resumed"
    import shutil

    shutil.copytree(source, run_dir)
    capsys.readouterr()
    result = _run(run_dir, "train.steps=12")
    out = capsys.readouterr().out
    assert "resuming at step 8" in out and "train.steps: 8 -> 12" in out
    assert "final val_loss" in out
    steps = [r["step"] for r in _records(run_dir)]
    assert steps == list(range(1, 13))  # continued, not restarted
    assert result.step == 12
    assert json.loads((run_dir / "config.json").read_text())["train"]["steps"] == 12
    kept = sorted(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [8, 12]  # checkpoint.keep = 2


def test_rerun_of_a_finished_run_only_reports(first_run, tmp_path, capsys):
    source, result = first_run
    import shutil

    run_dir = tmp_path / "done"
    shutil.copytree(source, run_dir)
    before = (run_dir / "metrics.jsonl").read_text()
    again = _run(run_dir, "train.steps=8")
    assert again.step == 8 and math.isclose(again.val_loss, result.val_loss, rel_tol=1e-5)
    assert (run_dir / "metrics.jsonl").read_text() == before


@pytest.mark.parametrize("override, named", [
    ("train.stepz=5", "train.stepz"),
    ("train.steps=five", "train.steps"),
    ("train.batch_size=-2", "train.batch_size"),
    ("mesh.data=3", "impossible mesh"),
    ("mesh.tensor=2", "impossible mesh"),
    ("data.corpus=/no/such/file.txt", "/no/such/file.txt"),
])
def test_bad_arguments_exit_2_before_writing(tmp_path, capsys, override, named):
    run_dir = tmp_path / "run"
    with pytest.raises(SystemExit) as exit_info:
        _run(run_dir, override)
    assert exit_info.value.code == 2
    assert named in capsys.readouterr().err
    assert not run_dir.exists()


def test_nonfinite_loss_stops_with_a_message(tmp_path, capsys):
    """nan_policy=stop (the default): a diverging run ends with status 1 and the message, no traceback,
    and keeps the steps it logged."""
    run_dir = tmp_path / "diverged"
    with pytest.raises(SystemExit) as stop:
        _run(run_dir, "train.steps=8", "train.lr=1e30")
    assert stop.value.code == 1
    err = capsys.readouterr().err
    assert "error: non-finite loss or gradient at step 2" in err and "no checkpoint saved" in err, err
    assert "train.nan_policy=skip" in err and "Traceback" not in err
    assert [r["step"] for r in _records(run_dir)] == [1]
    skipped = _run(tmp_path / "skipping", "train.steps=3", "train.lr=1e30", "train.nan_policy=skip")
    assert skipped.step == 3


def test_run_dir_of_another_model_is_refused_untouched(first_run, tmp_path, capsys):
    source, _ = first_run
    import shutil

    run_dir = tmp_path / "other"
    shutil.copytree(source, run_dir)
    before = {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()}
    config_text = (run_dir / "config.json").read_text()
    with pytest.raises(SystemExit) as exit_info:
        _run(run_dir, "model.hidden_size=64")
    assert exit_info.value.code == 2
    assert "model.hidden_size: 32 -> 64" in capsys.readouterr().err
    assert (run_dir / "config.json").read_text() == config_text
    assert {p.name: p.stat().st_mtime_ns for p in run_dir.iterdir()} == before


def test_help_lists_presets_and_override_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert DEFAULT_PRESET in text
    for key in ("train.steps", "train.batch_size", "train.seq_len", "train.seed", "train.lr",
                "checkpoint.every_steps", "mesh.data", "mesh.fsdp", "mesh.tensor",
                "model.num_hidden_layers", "model.hidden_size", "model.num_heads"):
        assert key in text


def test_presets_are_valid_configs():
    assert DEFAULT_PRESET in preset_names()
    for name in preset_names():
        _, raw = load_preset(name)
        RunConfig.from_dict(raw)


def test_config_file_and_missing_config(tmp_path, capsys):
    path = tmp_path / "mine.json"
    path.write_text(json.dumps({"model": {"hidden_size": 32, "num_hidden_layers": 1, "num_heads": 2}}))
    name, raw = load_preset(str(path))
    assert name == "mine" and raw["model"]["hidden_size"] == 32
    with pytest.raises(SystemExit) as exit_info:
        main(["--config", str(tmp_path / "absent.json"), "--run-dir", str(tmp_path / "r")])
    assert exit_info.value.code == 2 and "absent.json" in capsys.readouterr().err


def test_dry_run_counts_parameters_and_writes_nothing(tmp_path, capsys):
    run_dir = tmp_path / "never"
    count = main(["--config", "deltanet-340m", "--run-dir", str(run_dir), "--dry-run"])
    out = capsys.readouterr().out
    assert round(count / 1e6, 1) == 374.4           # fla's count for the untied 340M model
    assert "parameters: 374,362,112 (374.4M)" in out
    assert json.loads(out[:out.rindex("}") + 1])["model"]["hidden_size"] == 1024
    assert not run_dir.exists()


def test_a_mesh_that_leaves_devices_idle_says_so(tmp_path, capsys, monkeypatch):
    import jax

    from deltanet_jax.train.mesh import unused_devices_text

    assert unused_devices_text({"data": 2, "fsdp": 2, "tensor": 2}, 8) is None
    assert unused_devices_text({"data": 1, "fsdp": 2, "tensor": 1}, 8) == (
        "the mesh mesh.data=1 x mesh.fsdp=2 x mesh.tensor=1 uses 2 of the 8 devices; the other 6 stay idle "
        "(set one axis to -1 to use them all)")
    # this machine has one device: pretend to the trainer that it has two, for a one-device mesh
    monkeypatch.setattr(jax, "device_count", lambda: 2)
    _run(tmp_path / "idle", "train.steps=1", "mesh.fsdp=1", "mesh.tensor=1")
    assert "  the mesh mesh.data=1 x mesh.fsdp=1 x mesh.tensor=1 uses 1 of the 2 devices" in capsys.readouterr().out
    monkeypatch.undo()
    _run(tmp_path / "all", "train.steps=1")
    assert "devices; the other" not in capsys.readouterr().out


def test_without_tensorboardx_the_run_warns_and_keeps_its_metrics(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "tensorboardX", None)   # makes `import tensorboardX` raise ImportError
    run_dir = tmp_path / "no-tb"
    result = _run(run_dir, "train.steps=2", "train.eval_every=2")
    out = capsys.readouterr().out
    assert "warning: TensorBoard events are not written" in out and "pip install tensorboardX" in out
    assert result.step == 2 and [r["step"] for r in _records(run_dir)] == [1, 2]
    assert not (run_dir / "tensorboard").exists()
    monkeypatch.undo()
    _run(tmp_path / "with-tb", "train.steps=1")
    assert "TensorBoard events are not written" not in capsys.readouterr().out
    assert (tmp_path / "with-tb" / "tensorboard").is_dir()
