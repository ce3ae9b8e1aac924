"""Optimizer schedule and decay mask, loss and train/eval steps, config parsing, mesh and run-dir checks."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM
from deltanet_jax.train.config import ConfigError, MeshConfig, RunConfig, apply_overrides, parse_value
from deltanet_jax.train.mesh import check_batch, check_mesh_fits, resolve_mesh_shape
from deltanet_jax.train.sharding import logical_to_spec
from deltanet_jax.train.optimizer import decay_mask, make_optimizer, warmup_cosine_schedule
from deltanet_jax.train.run_dir import RunDirError, plan_run_dir
from deltanet_jax.train.step import (
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    evaluate,
    init_train_state,
    make_eval_step,
    make_train_step,
)

TINY_MODEL = dict(vocab_size=256, hidden_size=32, num_hidden_layers=1, num_heads=2)


def test_schedule_warmup_peak_and_end():
    f = warmup_cosine_schedule(lr=1e-3, min_lr=1e-4, warmup_steps=10, total_steps=110)
    np.testing.assert_allclose(float(f(0)), 1e-3 / 11, rtol=1e-6)
    np.testing.assert_allclose(float(f(9)), 1e-3 * 10 / 11, rtol=1e-6)
    np.testing.assert_allclose(float(f(10)), 1e-3, rtol=1e-6)  # peak right after warmup
    np.testing.assert_allclose(float(f(60)), 0.5 * (1e-3 + 1e-4), rtol=1e-5)  # half-way down the cosine
    np.testing.assert_allclose(float(f(110)), 1e-4, rtol=1e-5)
    np.testing.assert_allclose(float(f(500)), 1e-4, rtol=1e-5)
    values = np.array([float(f(s)) for s in range(10, 111)])
    assert np.all(np.diff(values) <= 1e-12)
    with pytest.raises(ValueError):
        warmup_cosine_schedule(lr=1e-3, min_lr=1e-2, warmup_steps=0, total_steps=10)


def test_weight_decay_only_on_matrices():
    params = {"w": jnp.ones((3, 4)), "norm": jnp.ones((4,)), "emb": jnp.ones((5, 3))}
    assert decay_mask(params) == {"w": True, "norm": False, "emb": True}
    tx, _ = make_optimizer(lr=0.1, min_lr=0.1, warmup_steps=0, total_steps=10, weight_decay=0.5)
    zero_grads = jax.tree.map(jnp.zeros_like, params)
    updates, _ = tx.update(zero_grads, tx.init(params), params)
    new = optax.apply_updates(params, updates)
    np.testing.assert_allclose(new["w"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["emb"], 1 - 0.1 * 0.5, rtol=1e-6)
    np.testing.assert_allclose(new["norm"], 1.0)


def test_gradient_clipping_by_global_norm():
    params = {"w": jnp.zeros((2, 2))}
    grads = {"w": jnp.full((2, 2), 100.0)}  # global norm 200, clipped to 1: every entry 0.5
    for clip, expected in ((1.0, 0.5), (0.0, 100.0)):  # 0 turns clipping off
        tx, _ = make_optimizer(lr=1.0, min_lr=0.0, warmup_steps=0, total_steps=1, grad_clip=clip)
        _, state = tx.update(grads, tx.init(params), params)
        adam = state[-1][0] if clip else state[0][0]
        np.testing.assert_allclose(adam.mu["w"], (1 - 0.9) * expected, rtol=1e-5)


def test_cross_entropy_matches_numpy_and_ignores_masked():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((2, 3, 5)).astype(np.float32)
    targets = rng.integers(0, 5, (2, 3)).astype(np.int32)
    mask = np.array([[True, True, False], [True, False, True]])
    total, count = cross_entropy_sum(jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask))
    log_p = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    nll = -np.take_along_axis(log_p, targets[..., None], -1)[..., 0]
    np.testing.assert_allclose(float(total), nll[mask].sum(), rtol=1e-5)
    assert float(count) == 4


def _tiny_state(lr=3e-3):
    model = DeltaNetForCausalLM(DeltaNetConfig(**TINY_MODEL), rngs=nnx.Rngs(0), implementation="recurrent")
    tx, _ = make_optimizer(lr=lr, min_lr=lr, warmup_steps=0, total_steps=100)
    graphdef, state = init_train_state(model, tx)
    return graphdef, tx, state


def test_train_step_lowers_loss_and_eval_agrees():
    graphdef, tx, state = _tiny_state()
    rng = np.random.default_rng(0)
    window = rng.integers(0, 256, (4, 17)).astype(np.int32)
    batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
    train_step, eval_step = make_train_step(graphdef, tx), make_eval_step(graphdef)
    before = evaluate(eval_step, state, [batch])
    assert abs(before - np.log(256)) < 0.1  # small init: near-uniform prediction
    losses = []
    for _ in range(8):
        state, metrics = train_step(state, batch)
        losses.append(float(metrics["loss"]))
    assert int(state.step) == 8
    np.testing.assert_allclose(losses[0], before, rtol=1e-5)  # the step reports the pre-update loss
    assert losses[-1] < losses[0] - 0.5
    assert evaluate(eval_step, state, [batch]) < losses[-1]
    assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(state.params))


def test_train_step_ignores_negative_targets():
    graphdef, tx, state = _tiny_state()
    eval_step = make_eval_step(graphdef)
    rng = np.random.default_rng(1)
    window = rng.integers(0, 256, (2, 9)).astype(np.int32)
    full = {"inputs": window[:, :-1], "targets": window[:, 1:]}
    half = {"inputs": full["inputs"], "targets": np.where(np.arange(8) < 4, full["targets"], -1).astype(np.int32)}
    total, count = eval_step(state, half)
    assert float(count) == 8
    total_full, _ = eval_step(state, {"inputs": full["inputs"][:, :4], "targets": full["targets"][:, :4]})
    np.testing.assert_allclose(float(total), float(total_full), rtol=1e-5)  # causal: the prefix alone


def _sgd_state():
    """(graphdef, tx, state) of the tiny model under plain SGD with lr 1: parameter changes are the
    gradients themselves (Adam's first step would turn near-zero gradients into +-lr steps and hide
    comparisons of updates)."""
    tx = optax.sgd(1.0)
    graphdef, state = init_train_state(
        DeltaNetForCausalLM(DeltaNetConfig(**TINY_MODEL), rngs=nnx.Rngs(0), implementation="recurrent"), tx)
    return graphdef, tx, state


def _assert_same_params(a, b):
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-7)


def test_gradient_accumulation_gives_the_same_update():
    graphdef, tx, state = _sgd_state()
    rng = np.random.default_rng(2)
    window = rng.integers(0, 256, (4, 9)).astype(np.int32)
    # Ignored positions spread unevenly over the micro-batches: the mean must still be over all tokens.
    targets = np.where(rng.random((4, 8)) < 0.3, -1, window[:, 1:]).astype(np.int32)
    batch = {"inputs": window[:, :-1], "targets": targets}
    one, m1 = make_train_step(graphdef, tx)(jax.tree.map(jnp.copy, state), batch)
    two, m2 = make_train_step(graphdef, tx, grad_accum=2)(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(m1["grad_norm"]), rtol=1e-5)
    _assert_same_params(two, one)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("t, chunk", [(12, 4), (13, 4), (5, 8)])
def test_chunked_cross_entropy_equals_the_whole_one(tied, t, chunk):
    """Loss, count and gradients (hidden states and projection) as without chunks, in float32 on fresh
    random inputs: same sums in a different order, so within 1e-6 relative; T not a multiple of the
    chunk included (masked padding)."""
    cfg = DeltaNetConfig(**dict(TINY_MODEL, tie_word_embeddings=tied))
    model = DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(t)
    h = jnp.asarray(rng.normal(size=(2, t, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 256, (2, t)), jnp.int32)
    mask = jnp.asarray(rng.random((2, t)) < 0.8)
    w = model.head_weight()

    def whole(h, w):
        return cross_entropy_sum(model.project(h, w), targets, mask)

    def chunked(h, w, row_groups=1):
        return chunked_cross_entropy_sum(h, w, model.project, targets, mask, chunk, row_groups)

    (l0, c0) = whole(h, w)
    g0 = jax.grad(lambda h, w: whole(h, w)[0], argnums=(0, 1))(h, w)
    for groups in (1, 2):  # 2: the gradient's terms summed per row apart, then added up
        (l1, c1) = chunked(h, w, groups)
        assert float(c1) == float(c0) == float(mask.sum())
        np.testing.assert_allclose(float(l1), float(l0), rtol=1e-6)
        g1 = jax.grad(lambda h, w: chunked(h, w, groups)[0], argnums=(0, 1))(h, w)
        for a, b in zip(g1, g0):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="row_groups"):
        chunked(h, w, 3)


def test_chunked_cross_entropy_gradient_matmuls_run_in_the_compute_dtype():
    """With bf16 h and w, every matmul of the loss and its gradient takes bf16 operands (a float32
    cotangent would turn the two gradient matmuls into float32 ones), and the gradients agree with
    float32 autodiff of the whole loss within bf16 rounding (2e-2 relative to the largest entry)."""
    from jax.extend.core import jaxprs_in_params

    cfg = DeltaNetConfig(**TINY_MODEL)
    model = DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(3))
    rng = np.random.default_rng(7)
    h = jnp.asarray(rng.normal(size=(2, 16, 32)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, 256, (2, 16)), jnp.int32)
    mask = jnp.ones((2, 16), bool)
    w = model.head_weight()

    def fused(h, w):
        return chunked_cross_entropy_sum(h, w, model.project, targets, mask, 8)[0]

    args = (h.astype(jnp.bfloat16), w.astype(jnp.bfloat16))
    jaxpr = jax.make_jaxpr(jax.grad(fused, argnums=(0, 1)))(*args)

    def dots(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                yield eqn
            for sub in jaxprs_in_params(eqn.params):
                yield from dots(sub)

    found = list(dots(jaxpr.jaxpr))
    assert len(found) >= 3 and all(v.aval.dtype == jnp.bfloat16 for e in found for v in e.invars), found
    got = jax.grad(fused, argnums=(0, 1))(*args)
    want = jax.grad(lambda h, w: cross_entropy_sum(model.project(h, w), targets, mask)[0], argnums=(0, 1))(h, w)
    for a, b in zip(got, want):
        np.testing.assert_allclose(np.asarray(a, np.float32), b, atol=2e-2 * float(jnp.abs(b).max()))


def test_loss_chunk_gives_the_same_training_step():
    graphdef, tx, state = _sgd_state()
    rng = np.random.default_rng(4)
    window = rng.integers(0, 256, (2, 11)).astype(np.int32)
    batch = {"inputs": window[:, :-1], "targets": np.where(rng.random((2, 10)) < 0.2, -1, window[:, 1:]).astype(np.int32)}
    one, m1 = make_train_step(graphdef, tx)(jax.tree.map(jnp.copy, state), batch)
    two, m2 = make_train_step(graphdef, tx, loss_chunk=3)(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    _assert_same_params(two, one)
    s1, c1 = make_eval_step(graphdef)(state, batch)
    s2, c2 = make_eval_step(graphdef, loss_chunk=4)(state, batch)
    assert float(c1) == float(c2)
    np.testing.assert_allclose(float(s2), float(s1), rtol=1e-6)
    with pytest.raises(ConfigError, match="loss_chunk"):
        RunConfig.from_dict({"train": {"loss_chunk": -1}})


def test_nonfinite_updates_are_skipped_on_request():
    graphdef, tx, state = _tiny_state()
    window = np.random.default_rng(3).integers(0, 256, (2, 9)).astype(np.int32)
    batch = {"inputs": window[:, :-1], "targets": window[:, 1:]}
    poisoned = jax.tree.map(jnp.copy, state)
    poisoned.params["model"]["norm"]["weight"].set_value(jnp.full_like(poisoned.params["model"]["norm"]["weight"][...],
                                                                       jnp.nan))
    before = jax.tree.map(np.asarray, poisoned)
    kept, metrics = make_train_step(graphdef, tx, skip_nonfinite=True)(poisoned, batch)
    assert not bool(metrics["finite"]) and int(kept.step) == 1
    for a, b in zip(jax.tree.leaves(kept.params) + jax.tree.leaves(kept.opt_state),
                    jax.tree.leaves(before.params) + jax.tree.leaves(before.opt_state)):
        np.testing.assert_array_equal(a, b)  # unchanged (NaN weights stay NaN, nothing else moved)
    healthy, metrics = make_train_step(graphdef, tx, skip_nonfinite=True)(state, batch)
    assert bool(metrics["finite"]) and int(healthy.step) == 1


# ---- configuration ------------------------------------------------------------------------------------


def test_overrides_are_typed_and_checked():
    raw = apply_overrides({"model": dict(TINY_MODEL)}, [
        "train.steps=7", "train.lr=0.01", "train.implementation=null", "model.num_heads=4",
        "model.hidden_ratio=2", "train.remat=true", "data.corpus=tinyshakespeare",
    ])
    cfg = RunConfig.from_dict(raw)
    assert cfg.train.steps == 7 and cfg.train.lr == 0.01 and cfg.train.implementation is None
    assert cfg.model.num_heads == 4 and cfg.train.remat is True and isinstance(cfg.train.lr, float)
    assert RunConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("override, named", [
    ("train.stepz=3", "train.stepz"),
    ("trian.steps=3", "trian"),
    ("train.steps=abc", "train.steps"),
    ("train.steps=1.5", "train.steps"),
    ("train.steps=0", "train.steps"),
    ("train.lr=-1", "train.lr"),
    ("train.dtype=float16", "train.dtype"),
    ("train.remat=maybe", "train.remat"),
    ("model.num_heads=x", "model.num_heads"),
    ("model.num_heads=3", "num_heads"),  # 32 is not a multiple of 3: the model config names it
    ("model.vocab_size=100", "model.vocab_size"),
    ("mesh.data=0", "mesh.data"),
    ("checkpoint.keep=0", "checkpoint.keep"),
    ("steps", "section.field=value"),
])
def test_bad_overrides_name_the_key(override, named):
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        RunConfig.from_dict(apply_overrides({"model": dict(TINY_MODEL)}, [override]))


def test_unknown_keys_in_a_config_file_are_rejected():
    with pytest.raises(ConfigError, match="train.foo"):
        RunConfig.from_dict({"model": TINY_MODEL, "train": {"foo": 1}})
    with pytest.raises(ConfigError, match="optim"):
        RunConfig.from_dict({"model": TINY_MODEL, "optim": {}})
    with pytest.raises(ConfigError, match="train.steps"):
        RunConfig.from_dict({"model": TINY_MODEL, "train": {"steps": "10"}})
    with pytest.raises(ConfigError, match="min_lr"):
        RunConfig.from_dict({"model": TINY_MODEL, "train": {"lr": 1e-3, "min_lr": 1e-2}})


def test_parse_value_kinds():
    assert parse_value("k", "3", int) == 3
    assert parse_value("k", "3", float) == 3.0
    assert parse_value("k", "none", int | None) is None
    assert parse_value("k", '{"layers": [1], "num_heads": 2}', dict | None) == {"layers": [1], "num_heads": 2}
    assert parse_value("k", "false", bool) is False


def test_mesh_resolution():
    assert resolve_mesh_shape(MeshConfig(data=-1, fsdp=1, tensor=1), 8) == {"data": 8, "fsdp": 1, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=-1, tensor=2), 8) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert resolve_mesh_shape(MeshConfig(data=2, fsdp=1, tensor=1), 8) == {"data": 2, "fsdp": 1, "tensor": 1}
    assert resolve_mesh_shape(MeshConfig(data=1, fsdp=1, tensor=1), 1) == {"data": 1, "fsdp": 1, "tensor": 1}
    with pytest.raises(ConfigError, match="impossible mesh"):
        resolve_mesh_shape(MeshConfig(data=3, fsdp=1, tensor=1), 8)
    with pytest.raises(ConfigError, match="impossible mesh"):
        resolve_mesh_shape(MeshConfig(data=2, fsdp=1, tensor=1), 1)
    with pytest.raises(ConfigError, match="at most one"):
        resolve_mesh_shape(MeshConfig(data=-1, fsdp=-1, tensor=1), 8)
    check_batch({"data": 2, "fsdp": 2, "tensor": 2}, batch_size=8, grad_accum=2)
    with pytest.raises(ConfigError, match=r"train.batch_size=6 must be divisible by mesh.data x mesh.fsdp = 4"):
        check_batch({"data": 2, "fsdp": 2, "tensor": 1}, batch_size=6)
    with pytest.raises(ConfigError, match=r"times train.grad_accum = 4"):
        check_batch({"data": 2, "fsdp": 1, "tensor": 1}, batch_size=4, grad_accum=4)
    check_mesh_fits({"data": 2, "fsdp": 1, "tensor": 1}, num_devices=4, process_count=1)
    with pytest.raises(ConfigError, match="must use them all"):
        check_mesh_fits({"data": 2, "fsdp": 1, "tensor": 1}, num_devices=4, process_count=2)


class _Mesh:  # logical_to_spec reads only the axis sizes
    def __init__(self, **shape):
        self.shape = shape


def test_logical_axes_map_onto_the_mesh():
    mesh = _Mesh(data=2, fsdp=4, tensor=2)
    assert logical_to_spec(("embed", "heads"), (64, 32), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert logical_to_spec(("vocab", "embed"), (256, 64), mesh) == jax.sharding.PartitionSpec("tensor", "fsdp")
    assert logical_to_spec(("heads", None, None), (32, 1, 4), mesh) == jax.sharding.PartitionSpec("tensor", None, None)
    assert logical_to_spec(("norm",), (64,), mesh) == jax.sharding.PartitionSpec(None)
    assert logical_to_spec(("batch", None), (8, 16), mesh) == jax.sharding.PartitionSpec(("data", "fsdp"), None)
    # A dimension its mesh axes do not divide is replicated; axes of size 1 are left out.
    assert logical_to_spec(("embed", "heads"), (30, 3), mesh) == jax.sharding.PartitionSpec(None, None)
    assert logical_to_spec(("embed", "mlp"), (64, 64), _Mesh(data=8, fsdp=1, tensor=1)) == \
        jax.sharding.PartitionSpec(None, None)
    with pytest.raises(ValueError, match="no sharding rule for logical axis 'nope'"):
        logical_to_spec(("nope",), (4,), mesh)
    with pytest.raises(ValueError, match="do not match"):
        logical_to_spec(("embed",), (4, 4), mesh)


def test_every_parameter_names_its_axes():
    model = DeltaNetForCausalLM(DeltaNetConfig(**TINY_MODEL, attn={"layers": [0], "num_heads": 2}),
                                rngs=nnx.Rngs(0))
    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    flat = jax.tree_util.tree_leaves_with_path(nnx.state(model, nnx.Param), is_leaf=is_var)
    assert flat
    for path, var in flat:
        axes = var.get_metadata().get("logical_axes")
        assert axes is not None and len(axes) == var.ndim, jax.tree_util.keystr(path)


def test_run_dir_plans(tmp_path):
    cfg = RunConfig.from_dict({"model": TINY_MODEL})
    assert plan_run_dir(tmp_path / "new", cfg).resume_step is None
    assert not (tmp_path / "new").exists()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(RunDirError, match="not a run directory"):
        plan_run_dir(foreign, cfg)
    other = tmp_path / "other"
    other.mkdir()
    other_cfg = RunConfig.from_dict({"model": {**TINY_MODEL, "hidden_size": 64}}).to_dict()
    (other / "config.json").write_text(json.dumps(other_cfg))
    with pytest.raises(RunDirError, match="model.hidden_size"):
        plan_run_dir(other, cfg)
    same = tmp_path / "same"
    same.mkdir()
    changed = RunConfig.from_dict({"model": TINY_MODEL, "train": {"steps": 5}}).to_dict()
    (same / "config.json").write_text(json.dumps(changed))
    plan = plan_run_dir(same, cfg)
    assert plan.resume_step is None and any("train.steps" in c for c in plan.changed)
    (same / "config.json").write_text("{not json")
    with pytest.raises(RunDirError, match="cannot be read"):
        plan_run_dir(same, cfg)


def test_label_slots_give_the_same_training_step_on_sparse_targets():
    """Logits only at the labelled positions (recall tasks): the same loss and update as the full
    loss when every row has at most `label_slots` labels; rows with fewer are padded and uncounted."""
    from deltanet_jax.train.step import labelled_rows

    graphdef, tx, state = _sgd_state()
    rng = np.random.default_rng(5)
    window = rng.integers(0, 256, (3, 13)).astype(np.int32)
    labelled = np.zeros((3, 12), bool)
    labelled[0, [1, 4, 11]] = True
    labelled[1, [0, 7]] = True  # fewer than the slots
    labelled[2, [2, 3, 9]] = True
    batch = {"inputs": window[:, :-1], "targets": np.where(labelled, window[:, 1:], -100).astype(np.int32)}
    full, m1 = make_train_step(graphdef, tx)(jax.tree.map(jnp.copy, state), batch)
    sparse, m2 = make_train_step(graphdef, tx, label_slots=3, loss_chunk=2)(jax.tree.map(jnp.copy, state), batch)
    np.testing.assert_allclose(float(m2["loss"]), float(m1["loss"]), rtol=1e-6)
    _assert_same_params(sparse, full)
    s1, c1 = make_eval_step(graphdef)(state, batch)
    s2, c2 = make_eval_step(graphdef, label_slots=3)(state, batch)
    assert float(c1) == float(c2) == 8
    np.testing.assert_allclose(float(s2), float(s1), rtol=1e-6)

    h = jnp.arange(3 * 12, dtype=jnp.float32).reshape(3, 12, 1)
    hs, ts, ms = labelled_rows(h, jnp.asarray(batch["targets"]), jnp.asarray(labelled), 3)
    np.testing.assert_array_equal(np.asarray(ms), [[1, 1, 1], [1, 1, 0], [1, 1, 1]])
    np.testing.assert_array_equal(np.asarray(hs[..., 0])[np.asarray(ms)], [1, 4, 11, 12, 19, 26, 27, 33])
    assert (np.asarray(ts)[np.asarray(ms)] >= 0).all()
