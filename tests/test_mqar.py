"""MQAR generator (Zoology's multi-query associative recall) and a tiny end-to-end experiment run."""

import csv
import json
import re

import time

import numpy as np
import pytest

from deltanet_jax.data.synthetic import IGNORE_INDEX, MQARConfig, multiquery_ar, recall_accuracy, slot_probabilities

SMALL = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=6)


def _rows(config, n=200, seed=0):
    return multiquery_ar(n, config, seed=seed)


def test_key_value_block_ranges_and_no_repeats():
    x, y = _rows(SMALL)
    n_pairs, half = SMALL.num_kv_pairs, SMALL.vocab_size // 2
    assert x.shape == y.shape == (200, SMALL.seq_len) and x.dtype == y.dtype == np.int32
    keys, values = x[:, 0:2 * n_pairs:2], x[:, 1:2 * n_pairs:2]
    assert keys.min() >= 1 and keys.max() < half
    assert values.min() >= half and values.max() < SMALL.vocab_size
    for row_keys, row_values in zip(keys, values):
        assert len(set(row_keys.tolist())) == n_pairs
        assert len(set(row_values.tolist())) == n_pairs
    # the key-value block carries no labels
    assert (y[:, :2 * n_pairs] == IGNORE_INDEX).all()


def test_queries_labels_and_zeros():
    x, y = _rows(SMALL)
    context = 2 * SMALL.num_kv_pairs
    for row_x, row_y in zip(x, y):
        pairs = dict(zip(row_x[0:context:2].tolist(), row_x[1:context:2].tolist()))
        tail_x, tail_y = row_x[context:], row_y[context:]
        labelled = np.flatnonzero(tail_y != IGNORE_INDEX)
        # one query per key, each at the first position of a two-token slot
        assert len(labelled) == SMALL.num_kv_pairs
        assert (labelled % 2 == 0).all()
        assert sorted(tail_x[labelled].tolist()) == sorted(pairs)
        # the label at a query is the value paired with the queried key
        assert [pairs[k] for k in tail_x[labelled].tolist()] == tail_y[labelled].tolist()
        # everything else in the tail is token 0 with an ignored label
        others = np.ones(len(tail_x), bool)
        others[labelled] = False
        assert (tail_x[others] == 0).all() and (tail_y[others] == IGNORE_INDEX).all()
        # the answer never appears as an input after the block
        assert not np.isin(tail_x, list(pairs.values())).any()


def test_deterministic_in_seed():
    a, b, c = _rows(SMALL, seed=3), _rows(SMALL, seed=3), _rows(SMALL, seed=4)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])


def test_query_slots_follow_power_law():
    # one query per example: its slot is a single draw from p_i ~ a * i^(a-1)
    config = MQARConfig(vocab_size=64, seq_len=2 + 2 * 10, num_kv_pairs=1, power_a=0.3)
    x, y = multiquery_ar(20000, config, seed=1)
    slot = (np.argmax(y >= 0, axis=1) - 2) // 2
    freq = np.bincount(slot, minlength=config.num_slots) / len(slot)
    p = slot_probabilities(config.num_slots, config.power_a)
    np.testing.assert_allclose(freq, p, atol=0.015)
    assert freq[0] > 3 * freq[-1]
    # a = 0.01 (the default) crowds queries towards the key-value block; a = 1 is uniform
    near = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=16)
    flat = MQARConfig(vocab_size=512, seq_len=256, num_kv_pairs=16, power_a=1.0)
    mean_pos = [float(np.nonzero(multiquery_ar(300, c, seed=2)[1] >= 0)[1].mean()) for c in (near, flat)]
    assert mean_pos[0] < mean_pos[1] - 20


def test_random_non_queries_option():
    x, y = multiquery_ar(50, dataclass_replace(SMALL, random_non_queries=True), seed=0)
    tail = x[:, 2 * SMALL.num_kv_pairs:]
    assert (tail != 0).mean() > 0.9 and (y >= 0).sum() == 50 * SMALL.num_kv_pairs


def dataclass_replace(config, **kw):
    import dataclasses
    return dataclasses.replace(config, **kw)


@pytest.mark.parametrize("kw, match", [
    (dict(seq_len=47), "even"),
    (dict(seq_len=20, num_kv_pairs=6), "4 \\* num_kv_pairs"),
    (dict(vocab_size=8, num_kv_pairs=4), "key tokens"),
    (dict(power_a=0.0), "power_a"),
    (dict(num_kv_pairs=0), "num_kv_pairs"),
])
def test_bad_config(kw, match):
    with pytest.raises(ValueError, match=match):
        MQARConfig(**{**dict(vocab_size=64, seq_len=48, num_kv_pairs=6), **kw})


def test_recall_accuracy():
    y = np.array([[IGNORE_INDEX, 5, IGNORE_INDEX, 7]])
    assert recall_accuracy(np.array([[0, 5, 0, 1]]), y) == 0.5
    with pytest.raises(ValueError, match="shape"):
        recall_accuracy(np.zeros((1, 3)), y)


# ---- the experiment ---------------------------------------------------------------------------------

TINY = ["--vocab-size", "32", "--seq-len", "16", "--num-kv-pairs", "2", "--dims", "16", "--batch-size", "4",
        "--train-examples", "16", "--test-examples", "8", "--max-steps", "4", "--eval-every", "2",
        "--warmup-steps", "1", "--train-mix", "none"]


def _read(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_mqar_end_to_end_tiny(tmp_path, capsys):
    from experiments import mqar

    runs = mqar.main(TINY + ["--models", "deltanet", "--lrs", "1e-2", "--out", str(tmp_path)])
    assert len(runs) == 1
    evals = [line for line in capsys.readouterr().out.splitlines() if "test loss" in line]
    assert evals and all(re.search(r"\(\d+\.\d s, \d+\.\d ms per update\)$", line) for line in evals), evals
    rows = _read(tmp_path / "mqar_runs.csv")
    best = _read(tmp_path / "mqar.csv")
    assert [(r["model"], r["dim"]) for r in best] == [("deltanet", "16")]
    for r in rows:
        assert r["status"] in ("budget spent", "reached target")
        assert 0.0 <= float(r["accuracy"]) <= 1.0 and int(r["steps"]) in (2, 4) and int(r["params"]) > 0
    png = (tmp_path / "mqar.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    setting = (tmp_path / "mqar_setting.json").read_text()
    assert "at most 4 updates of 4 sequences" in setting and "no short conv" in setting


def test_mqar_model_configs():
    from experiments import mqar

    s = mqar.Setting()
    delta, attn, linear = (mqar.model_config(m, 128, s) for m in ("deltanet", "attention", "linear"))
    for c in (delta, attn, linear):
        assert (c.vocab_size, c.hidden_size, c.num_hidden_layers, c.num_heads) == (8192, 128, 2, 2)
        assert not c.use_short_conv
    assert delta.attn is None and delta.mixer == "delta"
    assert attn.attn["layers"] == [0, 1] and attn.attn["num_heads"] == 2
    assert linear.attn is None and linear.mixer == "linear"


def test_scaled_optimizer_equals_make_optimizer_at_that_lr():
    import jax
    import jax.numpy as jnp
    import optax

    from deltanet_jax.train.optimizer import make_optimizer
    from experiments.mqar import scaled_optimizer

    kw = dict(warmup_steps=2, total_steps=6, weight_decay=0.1)
    params = {"w": jnp.arange(6.0).reshape(2, 3) / 7, "b": jnp.ones(3)}
    ref, _ = make_optimizer(lr=3e-3, min_lr=3e-4, **kw)
    ours = scaled_optimizer(make_optimizer(lr=1.0, min_lr=0.1, **kw)[0], 3e-3)
    p_ref, p_ours, s_ref, s_ours = params, params, ref.init(params), ours.init(params)
    for i in range(6):
        g = jax.tree.map(lambda x: jnp.sin(x * (i + 1)), p_ref)
        u_ref, s_ref = ref.update(g, s_ref, p_ref)
        u_ours, s_ours = ours.update(g, s_ours, p_ours)
        p_ref, p_ours = optax.apply_updates(p_ref, u_ref), optax.apply_updates(p_ours, u_ours)
    for a, b in zip(jax.tree.leaves(p_ref), jax.tree.leaves(p_ours)):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)


def test_mqar_grid_skips_solved_cells_and_respects_time_limit(tmp_path, monkeypatch):
    from experiments import mqar

    class FakeCell:
        def __init__(self, model, dim, s):
            self.model, self.dim, self.params = model, dim, 1000 + dim

    def fake_run(cell, lr, train, test_batches, log, deadline):
        solved = cell.model == "deltanet" and lr == 1e-2
        return mqar.RunResult(cell.model, cell.dim, lr, params=cell.params, steps=3,
                              accuracy=1.0 if solved else 0.25 + lr, status="reached target" if solved else
                              "budget spent")

    monkeypatch.setattr(mqar, "Cell", FakeCell)
    monkeypatch.setattr(mqar, "train_run", fake_run)
    s = mqar.Setting(vocab_size=32, seq_len=16, num_kv_pairs=2, train_mix=(), models=("deltanet", "linear"), dims=(16, 32),
                     lrs=(1e-2, 1e-3), batch_size=4, train_examples=8, test_examples=8)
    runs = {(r.model, r.dim, r.lr): r for r in mqar.run_grid(s, tmp_path, log=lambda m: None)}
    assert runs[("deltanet", 16, 1e-3)].status == "skipped (target reached)"
    assert runs[("linear", 16, 1e-3)].status == "budget spent"
    best = {(r["model"], r["dim"]): r for r in _read(tmp_path / "mqar.csv")}
    assert float(best[("deltanet", "16")]["accuracy"]) == 1.0
    assert float(best[("linear", "32")]["lr"]) == 1e-2  # 0.26 beats 0.251

    # each run's deadline is an equal share of the time left among the runs still to come: the time
    # an early run leaves unused passes on, and a solved cell's later runs take no share
    clock, deadlines = [0.0], []

    def timed_run(cell, lr, train, test_batches, log, deadline):
        deadlines.append(deadline)
        clock[0] += 10.0  # every run takes 10 s
        return fake_run(cell, lr, train, test_batches, log, deadline)

    real_clock = time.perf_counter
    monkeypatch.setattr(mqar, "train_run", timed_run)
    monkeypatch.setattr(mqar.time, "perf_counter", lambda: clock[0])
    mqar.run_grid(dataclass_replace(s, time_limit=1000.0), tmp_path / "share", log=lambda m: None)
    # order: 1e-2 then 1e-3, each over (deltanet, linear) x (16, 32); deltanet solves at 1e-2
    expected = [0 + 1000 / 8, 10 + 990 / 6, 20 + 980 / 4, 30 + 970 / 3, 40 + 960 / 2, 50 + 950 / 1]
    assert deadlines == pytest.approx(expected)
    monkeypatch.setattr(mqar, "train_run", fake_run)
    monkeypatch.setattr(mqar.time, "perf_counter", real_clock)

    s = dataclass_replace(s, time_limit=0.0)
    runs = mqar.run_grid(s, tmp_path / "cut", log=lambda m: None)
    assert all(r.status == "not run (time limit)" for r in runs)
    assert (tmp_path / "cut" / "mqar.png").is_file()


def test_training_pool_mixes_tasks_padded_to_the_sequence_length():
    from experiments import mqar

    s = mqar.Setting(vocab_size=64, seq_len=48, num_kv_pairs=6, train_examples=100,
                     train_mix=((16, 2, 1.0), (48, 6, 3.0)), pack_mix=False)
    task = MQARConfig(vocab_size=64, seq_len=48, num_kv_pairs=6)
    x, y, seg = mqar.training_pool(s)
    assert x.shape == y.shape == seg.shape == (100, 48) and x.dtype == y.dtype == np.int32
    labels = (y != IGNORE_INDEX).sum(axis=1)
    assert (labels[:25] == 2).all() and (labels[25:] == 6).all()
    # short tasks: their own 16-token example, then token 0 with ignored targets (segment 0)
    assert (x[:25, 16:] == 0).all() and (y[:25, 16:] == IGNORE_INDEX).all()
    assert (seg[:25, :16] == 1).all() and (seg[:25, 16:] == 0).all() and (seg[25:] == 1).all()
    assert x[:25, :4].min() >= 1 and (x[:25, 1:4:2] >= 32).all()
    # without a mix the pool is the test task itself
    plain = mqar.training_pool(mqar.Setting(vocab_size=64, seq_len=48, num_kv_pairs=6, train_examples=10,
                                            train_mix=()))
    np.testing.assert_array_equal(plain[0], multiquery_ar(10, task, seed=0)[0])
    assert plain[2] is None
    assert "25% 2 pairs in 16 tokens, 75% 6 pairs in 48 tokens (each padded to 48)" in s.mix_text()


def test_training_pool_packs_shorter_tasks():
    """Packed: the same examples as padded, seq_len // length to a row with segment ids 1..k (the
    last row of a task partly padding, segment 0), so fewer rows; label_slots counts a row's labels."""
    from experiments import mqar

    mix = ((8, 1, 1.0), (16, 2, 1.0), (32, 4, 1.0))
    padded = mqar.Setting(vocab_size=64, seq_len=32, num_kv_pairs=4, train_examples=30, train_mix=mix,
                          pack_mix=False)
    packed = dataclass_replace(padded, pack_mix=True)
    assert padded.train_rows == 30 and packed.train_rows == 3 + 5 + 10
    assert (padded.label_slots, packed.label_slots) == (4, 4)
    px, py, _ = mqar.training_pool(padded)
    x, y, seg = mqar.training_pool(packed)
    assert x.shape == (18, 32)
    # the 10 examples of 8 tokens: rows 0-2, 4 to a row, example e in row e // 4, slot e % 4
    for e in range(10):
        r, j = divmod(e, 4)
        cols = slice(8 * j, 8 * j + 8)
        np.testing.assert_array_equal(x[r, cols], px[e, :8])
        np.testing.assert_array_equal(y[r, cols], py[e, :8])
        assert (seg[r, cols] == j + 1).all()
    assert (seg[2, 16:] == 0).all() and (y[2, 16:] == IGNORE_INDEX).all() and (x[2, 16:] == 0).all()
    for e in range(10):  # 16-token examples: rows 3-7, 2 to a row
        r, j = divmod(e, 2)
        np.testing.assert_array_equal(x[3 + r, 16 * j:16 * j + 16], px[10 + e, :16])
    np.testing.assert_array_equal(x[8:], px[20:])
    assert (seg[8:] == 1).all()
    assert "packed 32 // length" in packed.mix_text() and "~53 examples" in dataclass_replace(
        packed, batch_size=32).budget_text()


@pytest.mark.parametrize("model", ["deltanet", "linear", "attention"])
def test_packed_rows_give_the_padded_loss(model):
    """The train step's loss over packed rows equals that over the same examples padded one to a
    row (float32, 1e-5: the same terms summed in another order): segment ids restart the
    recurrent state and mask attention at every packed example."""
    import jax.numpy as jnp

    from experiments import mqar

    mix = ((8, 1, 1.0), (16, 2, 1.0), (32, 4, 1.0))
    padded = mqar.Setting(vocab_size=32, seq_len=32, num_kv_pairs=4, train_examples=12, train_mix=mix,
                          pack_mix=False, dims=(16,), implementation="chunked")
    packed = dataclass_replace(padded, pack_mix=True)
    losses = []
    for s in (padded, packed):
        cell = mqar.Cell(model, 16, s)
        state = cell.fresh_state(1e-3)
        x, y, seg = mqar.training_pool(s)
        total, count = cell.eval_step(state, {"inputs": jnp.asarray(x), "targets": jnp.asarray(y),
                                              "segment_ids": jnp.asarray(seg)})
        losses.append((float(total), float(count)))
    assert losses[0][1] == losses[1][1] == 4 * 1 + 4 * 2 + 4 * 4
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)


@pytest.mark.parametrize("argv, match", [
    (["--train-mix", "8:2"], "seq_len:pairs:share"),
    (["--train-mix", "8:2:0"], "share must be positive"),
    (["--train-mix", "32:2:1"], "longer than seq-len"),
    (["--train-mix", "8:4:1"], "seq_len >= 4"),
    (["--models", "deltanet,mamba"], "models must be among"),
    (["--dims", "0"], "positive integers"),
    (["--seq-len", "15"], "even"),
    (["--dims", "31"], "multiple of num_heads"),
])
def test_mqar_refuses_bad_arguments(argv, match, capsys, tmp_path):
    from experiments import mqar

    with pytest.raises(SystemExit) as err:
        mqar.main(TINY + argv + ["--out", str(tmp_path / "x")])
    assert err.value.code == 2
    assert re.search(match, capsys.readouterr().err)
    assert not (tmp_path / "x").exists()


def test_mqar_workers_train_cells_side_by_side_and_merge(tmp_path, monkeypatch):
    """--workers: cells dealt round-robin to processes that each train theirs with the whole time
    limit; their runs merge into one set of outputs in grid order. A process that fails marks its
    cells failed and raises, after the others' results are written."""
    from experiments import mqar

    args = ["--train-mix", "none", "--models", "deltanet,linear", "--dims", "16,24", "--vocab-size", "32", "--seq-len", "16",
            "--num-kv-pairs", "2", "--batch-size", "4", "--train-examples", "16", "--test-examples", "8",
            "--max-steps", "2", "--eval-every", "1", "--warmup-steps", "1", "--time-limit", "300", "--workers", "2"]
    runs = mqar.main(args + ["--out", str(tmp_path / "ok")])
    assert [(r.model, r.dim) for r in runs] == [("deltanet", 16), ("deltanet", 24), ("linear", 16), ("linear", 24)]
    assert all(r.steps == 2 and np.isfinite(r.accuracy) and r.status == "budget spent" for r in runs)
    assert [r.lr for r in runs] == [2e-3, 2e-3, 3e-3, 3e-3]
    best = _read(tmp_path / "ok" / "mqar.csv")
    assert [(b["model"], b["dim"]) for b in best] == [("deltanet", "16"), ("deltanet", "24"), ("linear", "16"),
                                                      ("linear", "24")]
    # round-robin: process 0 holds deltanet d=16 and linear d=16, process 1 the two d=24 cells
    worker0 = _read(tmp_path / "ok" / "workers" / "0" / "mqar_runs.csv")
    assert [(w["model"], w["dim"]) for w in worker0] == [("deltanet", "16"), ("linear", "16")]
    assert (tmp_path / "ok" / "mqar.png").is_file()

    monkeypatch.setattr(mqar.sys, "executable", "false")  # every worker exits with status 1
    with pytest.raises(RuntimeError, match="worker processes failed"):
        mqar.main(args + ["--out", str(tmp_path / "bad")])
    assert {b["status"] for b in _read(tmp_path / "bad" / "mqar.csv")} == {"failed"}


def test_mqar_learning_rates_by_model():
    from experiments import mqar

    s = mqar.Setting(dims=(64,))
    assert s.lrs_for("deltanet") == (2e-3,) and s.lrs_for("attention") == (1e-3,)
    assert mqar.schedule(s) == [("deltanet", 64, 2e-3), ("linear", 64, 3e-3), ("attention", 64, 1e-3)]
    s = mqar.Setting(dims=(64,), models=("attention", "deltanet"), lrs=(1e-2, 1e-3))
    assert mqar.schedule(s) == [("attention", 64, 1e-2), ("deltanet", 64, 1e-2), ("attention", 64, 1e-3),
                                ("deltanet", 64, 1e-3)]
    mixed = mqar.Setting(num_kv_pairs=8, train_mix=((16, 2, 1.0), (64, 12, 1.0)), pack_mix=False)
    assert mixed.label_slots == 12
    assert dataclass_replace(mixed, pack_mix=True).label_slots == max(2 * 512 // 16, 12 * 512 // 64)


def test_profile_times_each_cell_without_training(tmp_path, capsys):
    from experiments import mqar

    rows = mqar.main(["--quick", "--models", "deltanet", "--dims", "16", "--profile", "1", "--out", str(tmp_path)])
    assert [(r["model"], r["dim"]) for r in rows] == [("deltanet", 16)]
    assert rows[0]["barrier_ms"] > 0 and rows[0]["back_to_back_ms"] > 0 and rows[0]["params"] > 0
    saved = json.loads((tmp_path / "mqar_profile.json").read_text())
    assert saved[0]["dim"] == 16 and not (tmp_path / "mqar.csv").exists()  # nothing trained
    out = capsys.readouterr().out
    assert "ms per update with a barrier each" in out and "[deltanet d=16]" in out
    with pytest.raises(SystemExit):
        mqar.main(["--quick", "--profile", "-1", "--out", str(tmp_path)])


@pytest.mark.parametrize("implementation,steps", [("chunked", 4), ("pallas", 2)])
def test_lrs_together_equal_separate_runs(tmp_path, implementation, steps):
    """--lrs-together: the learning rates of a cell, stacked and updated by one vmapped step (the
    Pallas kernels interpreted on CPU), give each rate's separate run: same steps, accuracy, and
    test loss within 1e-5 (float32; vmap only batches the same products)."""
    from experiments import mqar

    s = mqar.Setting(vocab_size=32, seq_len=16, num_kv_pairs=2, train_mix=(), models=("deltanet",), dims=(16,), lrs=(1e-2, 3e-3),
                     batch_size=4, train_examples=16, test_examples=8, max_steps=steps, eval_every=2, warmup_steps=1,
                     implementation=implementation)
    quiet = lambda m: None  # noqa: E731
    apart = mqar.run_grid(s, tmp_path / "apart", log=quiet)
    together = mqar.run_grid(dataclass_replace(s, lrs_together=True), tmp_path / "together", log=quiet)
    assert [(r.lr, r.steps, r.status) for r in together] == [(r.lr, r.steps, r.status) for r in apart]
    assert [r.steps for r in together] == [steps, steps]
    for a, b in zip(apart, together):
        assert b.accuracy == a.accuracy
        assert b.test_loss == pytest.approx(a.test_loss, rel=1e-5)
    assert "side by side" in (tmp_path / "together" / "mqar_setting.json").read_text()


def test_lrs_together_stop_once_one_reaches_the_target(tmp_path):
    """All rates stop at the first evaluation where one reaches the target; that one is marked
    reached, the others stopped; with no time left the cell is not run."""
    from experiments import mqar

    s = mqar.Setting(vocab_size=32, seq_len=16, num_kv_pairs=2, train_mix=(), models=("deltanet",), dims=(16,), lrs=(1e-2, 3e-3),
                     batch_size=4, train_examples=16, test_examples=8, max_steps=6, eval_every=2, warmup_steps=1,
                     target=0.1, mlp=True, fresh_examples=False)
    quiet = lambda m: None  # noqa: E731
    apart = {r.lr: r for r in mqar.run_grid(s, tmp_path / "apart", log=quiet)}
    # precondition (deterministic on CPU, for this model and pool): separately, 3e-3 reaches 0.1 at
    # update 4 and 1e-2 never does
    assert (apart[3e-3].status, apart[3e-3].steps) == ("reached target", 4)
    assert apart[1e-2].status == "budget spent" and apart[1e-2].steps == 6
    together = {r.lr: r for r in mqar.run_grid(dataclass_replace(s, lrs_together=True), tmp_path / "t", log=quiet)}
    assert (together[3e-3].status, together[3e-3].steps) == ("reached target", 4)
    assert together[3e-3].accuracy == apart[3e-3].accuracy
    assert (together[1e-2].status, together[1e-2].steps) == ("stopped (another lr reached the target)", 4)
    rows = _read(tmp_path / "t" / "mqar.csv")
    assert float(rows[0]["lr"]) == 3e-3 and rows[0]["status"] == "reached target"

    cut = mqar.run_grid(dataclass_replace(s, lrs_together=True, time_limit=0.0), tmp_path / "cut", log=quiet)
    assert [r.status for r in cut] == ["not run (time limit)"] * 2 and all(r.params > 0 for r in cut)


@pytest.mark.parametrize("mix", [(), ((8, 2, 0.5), (16, 4, 0.5))])
def test_fresh_examples_draw_a_new_pool_every_pass(mix):
    from experiments import mqar

    s = mqar.Setting(vocab_size=64, seq_len=16, num_kv_pairs=4, train_mix=mix, train_examples=24, batch_size=4,
                     fresh_examples=True)
    first = mqar.training_pool(s)
    rows = len(first[0])
    per_pass = rows // s.batch_size

    def passes(setting, n):
        data = mqar.training_batches(setting, first)
        out = []
        for _ in range(n):
            batches = [next(data) for _ in range(per_pass)]
            out.append({tuple(r) for b in batches for r in b["inputs"].tolist()})
        return out

    fresh = passes(s, 3)
    fixed = passes(dataclass_replace(s, fresh_examples=False), 3)
    pools = [{tuple(r) for r in mqar.training_pool(s, draw)[0].tolist()} for draw in range(3)]
    # with fresh examples pass e visits draw e; without, every pass visits the first pool (a pass
    # leaves out the rows short of a whole batch)
    assert all(len(seen) == per_pass * s.batch_size for seen in fresh + fixed)
    assert all(seen <= pool for seen, pool in zip(fresh, pools, strict=True))
    assert all(seen <= pools[0] for seen in fixed)
    assert not pools[1] & pools[0] and not pools[2] & pools[1]
    # the test set is never drawn for training
    test_x, _ = multiquery_ar(64, s.task(), seed=s.seed + 10_000)
    assert not {tuple(r) for r in test_x.tolist()} & set().union(*pools)
    # the same sequence of batches for every run of the setting (learning rates compare on one stream)
    again = mqar.training_batches(s, first)
    first_run = mqar.training_batches(s, first)
    for _ in range(2 * per_pass + 1):
        a, b = next(again), next(first_run)
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_a_failing_draw_stops_the_run_with_its_error():
    from experiments import mqar

    pool = mqar.training_pool(mqar.Setting(vocab_size=64, seq_len=16, num_kv_pairs=4, train_mix=(),
                                           train_examples=8, batch_size=4))

    def broken(draw):
        raise MemoryError(f"draw {draw}")

    data = mqar._batches(pool, 4, seed=0, refill=broken)
    next(data), next(data)
    with pytest.raises(MemoryError, match="draw 1"):
        next(data)


def test_fresh_examples_flag():
    from experiments import mqar

    parse = lambda *argv: mqar.setting_from_args(mqar.build_parser().parse_args(list(argv)))  # noqa: E731
    assert parse().fresh_examples and parse("--fresh-examples").fresh_examples
    assert not parse("--no-fresh-examples").fresh_examples
    assert not parse().mlp and parse("--mlp").mlp and not parse("--no-mlp").mlp
    assert "new ones drawn every pass" in parse().budget_text()
    assert "epochs of one pool" in parse("--no-fresh-examples").budget_text()
    assert "no MLPs" in parse().task_text() and "SwiGLU MLP" in parse("--mlp").task_text()
    assert mqar.model_config("deltanet", 64, parse()).use_mlp is False
