"""The reference implementations ("recurrent", "chunked") against an independent float64 loop."""

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest

from deltanet_jax.ops import delta_rule, delta_rule_step
from delta_rule_numpy import delta_rule_numpy

IMPLS = ["recurrent", "chunked"]


def make_inputs(seed, B, T, H, K, V, dtype=jnp.float32):
    ks = jax.random.split(jax.random.PRNGKey(seed), 5)
    q = jax.random.normal(ks[0], (B, T, H, K))
    k = jax.random.normal(ks[1], (B, T, H, K))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jax.random.normal(ks[2], (B, T, H, V))
    beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    s0 = jax.random.normal(ks[4], (B, H, K, V))
    return tuple(x.astype(dtype) for x in (q, k, v, beta)) + (s0,)


def rel_err(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return np.linalg.norm(x - ref) / np.linalg.norm(ref)


def random_segments(rng, B, T):
    """Rows of 1-4 segments with random lengths and padding runs (0) between and after them."""
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cuts = np.sort(rng.choice(np.arange(1, T), size=rng.integers(1, 4), replace=False))
        bounds = [0, *cuts, T]
        for i in range(len(bounds) - 1):
            lo, hi = bounds[i], bounds[i + 1]
            seg[b, lo:hi] = 10 + i
            pad = rng.integers(0, max(1, (hi - lo) // 4))
            seg[b, hi - pad:hi] = 0
    return seg


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("B,T,H,K,V", [(2, 64, 2, 16, 16), (1, 100, 3, 8, 24), (2, 130, 1, 32, 8),
                                       (1, 7, 2, 4, 4)])
def test_matches_float64_loop(impl, B, T, H, K, V):
    q, k, v, beta, s0 = make_inputs(B * T + K, B, T, H, K, V)
    o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, implementation=impl)
    o_ref, s_ref = delta_rule_numpy(q, k, v, beta, initial_state=s0)
    assert o.dtype == jnp.float32 and s.dtype == jnp.float32
    assert rel_err(o, o_ref) < 1e-5
    assert rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_scale_and_l2norm(impl):
    q, k, v, beta, _ = make_inputs(1, 2, 70, 2, 16, 8)
    k = k * 3.0  # not unit norm: qk_l2norm must normalise it
    o, s = delta_rule(q, k, v, beta, scale=0.3, qk_l2norm=True, output_final_state=True, implementation=impl)
    o_ref, s_ref = delta_rule_numpy(q, k, v, beta, scale=0.3, qk_l2norm=True)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_packed_segments_equal_separate_runs(impl):
    rng = np.random.default_rng(0)
    B, T, H, K, V = 3, 150, 2, 16, 8
    q, k, v, beta, s0 = make_inputs(2, B, T, H, K, V)
    seg = random_segments(rng, B, T)
    o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, segment_ids=jnp.asarray(seg),
                      implementation=impl)
    o_ref, s_ref = delta_rule_numpy(q, k, v, beta, initial_state=s0, segment_ids=seg)
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5
    # Each segment alone, without segment_ids, gives the same outputs.
    for b in range(B):
        ids = [i for i in np.unique(seg[b]) if i != 0]
        for n, sid in enumerate(ids):
            pos = np.nonzero(seg[b] == sid)[0]
            init = s0[b:b + 1] if n == 0 else None
            o_alone, s_alone = delta_rule_numpy(q[b:b + 1, pos], k[b:b + 1, pos], v[b:b + 1, pos],
                                                beta[b:b + 1, pos], initial_state=init)
            np.testing.assert_allclose(o[b:b + 1, pos], o_alone, rtol=1e-4, atol=1e-5)
            if n == len(ids) - 1:
                np.testing.assert_allclose(s[b:b + 1], s_alone, rtol=1e-4, atol=1e-5)
        assert np.all(np.asarray(o[b, seg[b] == 0]) == 0.0)


def grads(impl, q, k, v, beta, s0, *, segment_ids=None, qk_l2norm=False):
    """Gradients of a fixed random linear function of (o, final state) with respect to
    (q, k, v, beta) and, when s0 is given, the initial state; one jitted program (the chunked
    reference's backward run op by op took 35 s of CI time per call)."""
    B, T, H, V = v.shape
    ct = jax.random.normal(jax.random.PRNGKey(9), (B, T, H, V))
    ct_s = jax.random.normal(jax.random.PRNGKey(10), (B, H, q.shape[-1], V))

    def f(q, k, v, beta, s0):
        o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, segment_ids=segment_ids,
                          qk_l2norm=qk_l2norm, implementation=impl)
        return jnp.sum(o * ct) + jnp.sum(s * ct_s)

    return jax.jit(jax.grad(f, argnums=(0, 1, 2, 3) if s0 is None else (0, 1, 2, 3, 4)))(q, k, v, beta, s0)


def test_gradients_agree():
    q, k, v, beta, s0 = make_inputs(3, 2, 80, 2, 8, 8)
    seg = jnp.asarray(random_segments(np.random.default_rng(1), 2, 80))
    g_rec = grads("recurrent", q, k, v, beta, s0, segment_ids=seg, qk_l2norm=True)
    g_chk = grads("chunked", q, k, v, beta, s0, segment_ids=seg, qk_l2norm=True)
    for a, b in zip(g_chk, g_rec):
        assert rel_err(a, b) < 1e-5


@pytest.mark.parametrize("impl", IMPLS)
def test_check_grads(impl):
    from jax.test_util import check_grads
    with jax.enable_x64(True):
        q, k, v, beta, s0 = make_inputs(4, 1, 9, 2, 4, 3, dtype=jnp.float64)
        s0 = s0.astype(jnp.float64)
        seg = jnp.asarray([[1, 1, 1, 1, 0, 2, 2, 2, 2]])

        def f(q, k, v, beta, s0):
            o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                              implementation=impl)
            return o, s
        check_grads(jax.jit(f), (q, k, v, beta, s0), order=1, modes=("rev",), atol=1e-6, rtol=1e-6)


def test_step_matches_sequence():
    B, T, H, K, V = 2, 20, 2, 8, 16
    q, k, v, beta, s0 = make_inputs(5, B, T, H, K, V)
    o_seq, s_seq = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, qk_l2norm=True,
                              implementation="recurrent")
    step = jax.jit(lambda q, k, v, b, s: delta_rule_step(q, k, v, b, s, qk_l2norm=True))
    state, outs = s0, []
    for t in range(T):
        o_t, state = step(q[:, t], k[:, t], v[:, t], beta[:, t], state)
        outs.append(o_t)
    assert rel_err(jnp.stack(outs, 1), o_seq) < 1e-5
    assert rel_err(state, s_seq) < 1e-5


def test_low_precision_inputs_keep_dtype():
    q, k, v, beta, s0 = make_inputs(6, 1, 65, 2, 16, 16, dtype=jnp.bfloat16)
    o, s = delta_rule(q, k, v, beta, output_final_state=True, implementation="chunked")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    o_ref, _ = delta_rule_numpy(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                                beta.astype(jnp.float32))
    assert rel_err(o.astype(jnp.float32), o_ref) < 1e-2


@pytest.mark.parametrize("change,match", [
    (dict(q=jnp.zeros((2, 8, 2))), r"q must have rank 4"),
    (dict(k=jnp.zeros((2, 8, 2, 5))), r"k has shape \(2, 8, 2, 5\) but q has shape \(2, 8, 2, 4\)"),
    (dict(v=jnp.zeros((2, 9, 2, 3))), r"v has shape \(2, 9, 2, 3\)"),
    (dict(beta=jnp.zeros((2, 8, 3))), r"beta has shape \(2, 8, 3\); expected \[B, T, H\] = \(2, 8, 2\)"),
    (dict(q=jnp.zeros((2, 8, 2, 4), jnp.int32)), r"q has dtype int32"),
    (dict(initial_state=jnp.zeros((2, 2, 4, 4))), r"initial_state has shape \(2, 2, 4, 4\)"),
    (dict(segment_ids=jnp.zeros((2, 7), jnp.int32)), r"segment_ids has shape \(2, 7\)"),
    (dict(segment_ids=jnp.zeros((2, 8))), r"segment_ids has dtype float32"),
    (dict(implementation="cuda"), r"implementation='cuda'"),
])
def test_bad_arguments(change, match):
    args = dict(q=jnp.zeros((2, 8, 2, 4)), k=jnp.zeros((2, 8, 2, 4)), v=jnp.zeros((2, 8, 2, 3)),
                beta=jnp.zeros((2, 8, 2)))
    kwargs = {}
    for key, val in change.items():
        (args if key in args else kwargs)[key] = val
    with pytest.raises(ValueError, match=match):
        delta_rule(args["q"], args["k"], args["v"], args["beta"], **kwargs)


def test_step_bad_state_shape():
    with pytest.raises(ValueError, match=r"state has shape \(1, 2, 4, 4\)"):
        delta_rule_step(jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 4)), jnp.zeros((1, 2, 3)), jnp.zeros((1, 2)),
                        jnp.zeros((1, 2, 4, 4)))


@pytest.mark.parametrize("impl", IMPLS)
def test_jitted_reduction_matches_eager(impl):
    """A jitted reduction of the output equals the eager one (jaxlib 0.10's CPU fusions once broke it)."""
    q, k, v, beta, _ = make_inputs(11, 16, 64, 4, 32, 32)
    f = lambda q, k, v, b: delta_rule(q, k, v, b, implementation=impl)[0].sum()
    eager = float(f(q, k, v, beta))
    np.testing.assert_allclose(float(jax.jit(f)(q, k, v, beta)), eager, rtol=1e-4)
    assert abs(eager - float(np.sum(delta_rule_numpy(q, k, v, beta)[0]))) < 1e-3 * abs(eager) + 1e-2


def _float32_dots(jaxpr):
    """(primitive params, operand dtypes) of every dot_general in a jaxpr, sub-jaxprs included."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "dot_general":
            yield eqn.params, [v.aval.dtype for v in eqn.invars]
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            yield from _float32_dots(sub)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("grad", [False, True], ids=["forward", "backward"])
def test_reference_products_are_full_float32(impl, grad):
    """The references are ground truth on every backend: no float32 product may run at the default
    precision, which is TF32 (~1e-3 relative error) on recent GPUs. Checked on the traced program,
    forward and backward, with segments, so it holds without a GPU."""
    q, k, v, beta, s0 = make_inputs(0, 1, 70, 2, 16, 8)
    seg = jnp.asarray(np.repeat([1, 2], [30, 40])[None], jnp.int32)

    def f(q, k, v, beta, s0):
        o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                          implementation=impl)
        return jnp.sum(o) + jnp.sum(s)

    closed = jax.make_jaxpr(jax.grad(f, argnums=(0, 1, 2, 3, 4)) if grad else f)(q, k, v, beta, s0)
    dots = [(params, dtypes) for params, dtypes in _float32_dots(closed.jaxpr) if jnp.float32 in dtypes]
    assert dots, "no float32 products traced"
    highest = jax.lax.Precision.HIGHEST
    for params, dtypes in dots:
        precision = params["precision"]
        assert precision is not None and all(p == highest for p in precision), (precision, dtypes)
