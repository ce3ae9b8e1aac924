"""The Pallas kernels in interpret mode (CPU) against the float64 loop and the chunked reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltanet_jax.ops import delta_rule
from delta_rule_numpy import delta_rule_numpy
from test_ops import grads, make_inputs, rel_err

CASES = [
    # B, T, H, K, V, segments, initial state, qk_l2norm
    pytest.param(1, 130, 2, 16, 32, False, True, True, id="T130-K16-V32-h0-l2"),
    pytest.param(2, 100, 1, 24, 16, True, True, True, id="T100-K24-V16-segments-h0-l2"),
    # float32 K and V past 64: the WY products go by 64-wide column blocks, the L2 norm across them
    pytest.param(1, 70, 1, 96, 80, False, True, True, id="T70-K96-V80-h0-l2-column-blocks"),
    pytest.param(1, 64, 1, 80, 96, True, False, False, id="T64-K80-V96-segments-column-blocks"),
]


def _segments(B, T):
    rng = np.random.default_rng(T)
    seg = np.zeros((B, T), np.int32)
    for b in range(B):
        cut = rng.integers(T // 4, 3 * T // 4)
        seg[b, :cut] = 1
        seg[b, cut + 3:] = 2       # three padding tokens between the segments
    return jnp.asarray(seg)


@pytest.mark.parametrize("B,T,H,K,V,segments,with_h0,l2", CASES)
def test_pallas_interpret_matches_reference(B, T, H, K, V, segments, with_h0, l2):
    q, k, v, beta, s0 = make_inputs(T + K, B, T, H, K, V)
    s0 = s0 if with_h0 else None
    seg = _segments(B, T) if segments else None
    o, s = delta_rule(q, k, v, beta, initial_state=s0, output_final_state=True, segment_ids=seg,
                      qk_l2norm=l2, implementation="pallas")
    o_ref, s_ref = delta_rule_numpy(q, k, v, beta, initial_state=s0, segment_ids=seg, qk_l2norm=l2)
    assert o.shape == (B, T, H, V) and o.dtype == jnp.float32
    # Interpret mode runs the float32 dots exactly: errors are rounding only.
    assert rel_err(o, o_ref) < 1e-5 and rel_err(s, s_ref) < 1e-5

    g = grads("pallas", q, k, v, beta, s0, segment_ids=seg, qk_l2norm=l2)
    g_ref = grads("chunked", q, k, v, beta, s0, segment_ids=seg, qk_l2norm=l2)
    for name, a, b in zip("q k v beta h0".split(), g, g_ref):
        assert rel_err(a, b) < 1e-5, name


def test_pallas_rejects_float64():
    with jax.enable_x64(True):
        q, k, v, beta, _ = make_inputs(0, 1, 16, 1, 16, 16, dtype=jnp.float64)
        with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
            delta_rule(q, k, v, beta, implementation="pallas")


@pytest.mark.parametrize("K,V,l2", [(16, 32, False), (20, 24, True)])
def test_pallas_decode_step_matches_xla_step(K, V, l2):
    from deltanet_jax.ops import delta_rule_step

    rng = np.random.default_rng(K + V)
    B, H = 2, 3
    q, k = (jnp.asarray(rng.standard_normal((B, H, K)), jnp.float32) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, H, V)), jnp.bfloat16)
    beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((B, H)), jnp.float32))
    state = jnp.asarray(rng.standard_normal((B, H, K, V)) * 0.1, jnp.float32)
    before = np.asarray(state).copy()
    o, s = delta_rule_step(q, k, v, beta, state, qk_l2norm=l2, implementation="pallas")
    np.testing.assert_array_equal(np.asarray(state), before)  # the caller's state is not consumed
    o_ref, s_ref = delta_rule_step(q, k, v, beta, state, qk_l2norm=l2, implementation="xla")
    assert o.dtype == jnp.bfloat16 and o.shape == (B, H, V) and s.shape == (B, H, K, V)
    assert rel_err(s, s_ref) < 1e-6
    assert rel_err(o.astype(jnp.float32), o_ref.astype(jnp.float32)) < 1e-2  # bf16 output rounding
    with pytest.raises(ValueError, match="implementation"):
        delta_rule_step(q, k, v, beta, state, implementation="cuda")


def _chunk_a(case: str, seed: int = 4) -> np.ndarray:
    """A strictly lower A = tril(diag(beta) K K^T, -1) of one 64-token chunk, float64."""
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((64, 64))
    beta = rng.uniform(0, 1, 64)
    if case.startswith("identical"):
        k = np.ones((64, 64))
        beta = np.full(64, 1.0 if case.endswith("beta1") else 2.0)
    if case == "correlated-beta2":   # keys near one direction, beta in [1, 2]: the hardest inverse here
        k = rng.standard_normal(64) + 0.3 * rng.standard_normal((64, 64))
        beta = rng.uniform(1, 2, 64)
    k /= np.linalg.norm(k, axis=1, keepdims=True)
    a = np.tril((beta[:, None] * k) @ k.T, -1)
    if case == "segments":
        seg = np.repeat([0, 1, 2, 3], [5, 20, 30, 9])
        a = np.where(seg[:, None] == seg[None, :], a, 0.0)
    return a


@pytest.mark.parametrize("case", ["random", "identical-keys-beta1", "identical-keys-beta2", "segments",
                                  "correlated-beta2"])
def test_inverse_unit_lower64_matches_numpy(case):
    """The chunk inverse (16x16 diagonal blocks by gathered substitution, looped or with the
    gathers prefetched, or by doubling; then the block Neumann product) against float64, exact as
    interpreted and with the GPU's three-bf16-product products of float32 inputs, on repeated keys
    with beta 1 and 2 (a reflection) and correlated keys; doubling also against substitution. The
    scratch it gathers from holds NaN outside the diagonal blocks: those entries must never be read."""
    from pallas_kernels.delta_rule.common import Static, inverse_unit_lower64

    a = _chunk_a(case)
    ref = np.linalg.inv(np.eye(64) + a)
    a32 = jnp.asarray(a, jnp.float32)
    blocks = np.arange(64) // 16
    scratch = jnp.asarray(np.where(blocks[:, None] == blocks[None, :], a, np.nan), jnp.float32)
    scale = max(1.0, np.abs(ref).max())
    for interpret, tol in ((True, 1e-5), (False, 2e-4)):
        static = Static(scale=1.0, qk_l2norm=False, has_segments=False, interpret=interpret)
        ts = {}
        for prefetch, doubling in ((False, False), (True, False), (False, True)):
            t = np.asarray(inverse_unit_lower64(a32, scratch, static, jnp.float32, prefetch, doubling), np.float64)
            # float32 rounding through 15 substitution steps (or 6 products) and 4 products: a few
            # ulps of max |T| exact (doubling: 6e-7 measured); the bf16 x3 products carry ~16
            # significant bits (measured worst 5e-5 by substitution, 9e-5 by doubling).
            assert np.abs(t - ref).max() <= tol * scale, (interpret, prefetch, doubling, np.abs(t - ref).max())
            ts[prefetch, doubling] = t
        assert np.abs(ts[False, True] - ts[False, False]).max() <= tol * scale


@pytest.mark.parametrize("segments", [False, True], ids=["no-segments", "segments"])
def test_wy_kernels_invert_by_doubling(segments):
    """`wy_inverse` and `wy_prepare` with `doubling` (no scratch, diagonal blocks by products) give
    the T, P, W and U of substitution, and T within 1e-5 of the float64 inverse of each chunk's A
    (interpreted: exact float32 products; float32 inputs; measured 1e-6)."""
    from pallas_kernels.delta_rule.common import Static
    from pallas_kernels.delta_rule.wy import wy_inverse, wy_prepare

    B, T, H, K = 2, 128, 2, 32
    q, k, v, beta, _ = make_inputs(3, B, T, H, K, K)
    k = k.at[:, 64:].set(k[:, 64:65] + 0.3 * k[:, 64:])   # correlated keys in the second chunk
    beta = beta.at[:, 64:].multiply(2.0)                  # with beta in [1, 2]-ish
    seg = jnp.asarray(np.repeat(np.repeat([[0, 1, 2, 3]], [5, 40, 50, 33], axis=1), B, 0)) if segments else None
    st = Static(scale=K ** -0.5, qk_l2norm=True, has_segments=segments, interpret=True)
    t_sub, p_sub = wy_inverse(k, beta, seg, q, static=st)
    t_dbl, p_dbl = wy_inverse(k, beta, seg, q, static=st, doubling=True)
    assert rel_err(t_dbl, t_sub) < 1e-6 and rel_err(p_dbl, p_sub) == 0.0
    kn = np.asarray(k, np.float64) / np.linalg.norm(np.asarray(k, np.float64), axis=-1, keepdims=True)
    for b in range(B):
        for h in range(H):
            for c in range(T // 64):
                rows = slice(64 * c, 64 * c + 64)
                kc, bc = kn[b, rows, h], np.asarray(beta, np.float64)[b, rows, h]
                a = np.tril(bc[:, None] * kc @ kc.T, -1)
                if segments:
                    sc = np.asarray(seg)[b, rows]
                    a = np.where(sc[:, None] == sc[None, :], a, 0.0)
                ref = np.linalg.inv(np.eye(64) + a)
                assert np.abs(np.asarray(t_dbl)[b, rows, h] - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    sub = wy_prepare(k, v, beta, seg, q, static=st, with_t=True)
    dbl = wy_prepare(k, v, beta, seg, q, static=st, with_t=True, doubling=True)
    for name, x, y in zip("w u t p".split(), dbl, sub):
        assert rel_err(x, y) < 1e-6, name


@pytest.mark.parametrize("K,V", [(16, 32), (96, 80)], ids=["K16-V32", "K96-V80-column-blocks"])
def test_forward_without_folding_matches_default(K, V):
    """The two forward paths of `KernelConfig.fold_wu` (W and U made inside the scan from T, the
    default up to K = 128; or made by `wy_prepare` and read by the scan) compute the same outputs,
    final state and gradients, with segments, qk_l2norm and an initial state; at K 96 and V 80
    (padded to 128) `wy_prepare` multiplies float32 operands by 64-wide column blocks."""
    import dataclasses

    from pallas_kernels.delta_rule import chunk_delta_rule
    from pallas_kernels.delta_rule.common import KernelConfig
    from deltanet_jax.ops.segments import segment_index

    B, T, H = 2, 100, 2
    q, k, v, beta, s0 = make_inputs(5, B, T, H, K, V)
    seg_index, valid = segment_index(_segments(B, T))
    fused = KernelConfig.for_shape(K, V, B * H)
    assert fused.fold_wu
    split = dataclasses.replace(fused, fold_wu=False)

    def loss(config, q, k, v, beta, s0):
        o, s = chunk_delta_rule(q, k, v, beta, scale=K ** -0.5, initial_state=s0, seg_index=seg_index,
                                valid=valid, qk_l2norm=True, interpret=True, config=config)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)

    (_, out_a), g_a = jax.value_and_grad(lambda *a: loss(fused, *a), argnums=range(5), has_aux=True)(q, k, v, beta, s0)
    (_, out_b), g_b = jax.value_and_grad(lambda *a: loss(split, *a), argnums=range(5), has_aux=True)(q, k, v, beta, s0)
    for name, a, b in zip(["o", "state"] + "dq dk dv dbeta dh0".split(), (*out_a, *g_a), (*out_b, *g_b)):
        assert rel_err(b, a) < 1e-6, name


@pytest.mark.parametrize("fold_wu,segments", [(True, True), (False, False)], ids=["folded-segments", "unfolded"])
def test_op_with_doubling_inverse_matches_default(fold_wu, segments):
    """`KernelConfig.doubling_inverse` (the inverse's diagonal blocks by products) changes neither
    outputs, final state nor gradients beyond float32 rounding (interpreted), through `wy_inverse`
    (folded forward) and `wy_prepare`, with qk_l2norm and an initial state."""
    import dataclasses

    from deltanet_jax.ops.segments import segment_index
    from pallas_kernels.delta_rule import chunk_delta_rule
    from pallas_kernels.delta_rule.common import KernelConfig

    B, T, H, K, V = 2, 100, 2, 16, 32
    q, k, v, beta, s0 = make_inputs(6, B, T, H, K, V)
    seg_index, valid = segment_index(_segments(B, T)) if segments else (None, None)
    base = dataclasses.replace(KernelConfig.for_shape(K, V, B * H), fold_wu=fold_wu)
    assert not base.doubling_inverse

    def run(config):
        def loss(q, k, v, beta, s0):
            o, s = chunk_delta_rule(q, k, v, beta, scale=K ** -0.5, initial_state=s0, seg_index=seg_index,
                                    valid=valid, qk_l2norm=True, interpret=True, config=config)
            return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2), (o, s)
        (_, out), g = jax.value_and_grad(loss, argnums=range(5), has_aux=True)(q, k, v, beta, s0)
        return (*out, *g)

    got, want = run(dataclasses.replace(base, doubling_inverse=True)), run(base)
    for name, a, b in zip(["o", "state"] + "dq dk dv dbeta dh0".split(), got, want):
        assert rel_err(a, b) < 1e-6, name


@pytest.mark.parametrize("K,wide_launch,narrow_launch", [
    (128, (128, 64, (4, 1)), (64, 64, (4, 1))),
    (256, (128, 64, (8, 1)), (32, 32, (4, 1))),
], ids=["K128", "K256"])
def test_wide_backward_tiles_match_narrow_ones(K, wide_launch, narrow_launch):
    """For 16-bit inputs at K = 128 the default launches one 128-wide V tile in `chunk_dqkw`; at
    K = 256 128-wide ones there and 64-wide ones with 8 warps in `wy_backward` (faster on an H200:
    NOTES.md). `wide_launch` / `narrow_launch`: (dqkw V tile, wy_bwd V tile, wy_bwd warps and
    stages), the narrow one the earlier default (at K = 256 the float32 inputs' launch). Interpreted
    on bf16 inputs with segments, an initial state and qk_l2norm, the two give the same gradients
    within 1e-4 (the same float32 products summed over other tiles; measured 1e-5 at most), and both
    are within bf16 tolerance (0.008; dk the largest, 0.0066 at K = 256) of the float32 reference on
    the same bf16-rounded inputs."""
    import dataclasses

    from deltanet_jax.ops.segments import segment_index
    from pallas_kernels.delta_rule import chunk_delta_rule
    from pallas_kernels.delta_rule.common import KernelConfig, Launch

    B, T, H, V = 1, 128, 1, 256
    q, k, v, beta, s0 = make_inputs(11, B, T, H, K, V)
    seg_index, valid = segment_index(_segments(B, T))
    wide = KernelConfig.for_shape(K, V, B * H, itemsize=2)
    assert (wide.dqkw_block_v, wide.wy_bwd_block_v, dataclasses.astuple(wide.wy_bwd)) == wide_launch
    # 16-bit inputs at K = 128 invert by doubling at 4 warps; float32 and K = 256 (`wy_prepare`) do not
    assert wide.doubling_inverse == (K == 128)
    if K == 128:  # (K = 256 runs `wy_prepare`, not `wy_inverse`)
        assert dataclasses.astuple(wide.wy_inverse) == (4, 1)
    assert not KernelConfig.for_shape(K, V, B * H, itemsize=4).doubling_inverse
    if K == 256:
        fp32 = KernelConfig.for_shape(K, V, B * H, itemsize=4)
        assert (fp32.dqkw_block_v, fp32.wy_bwd_block_v) == narrow_launch[:2]
    narrow = dataclasses.replace(wide, dqkw_block_v=narrow_launch[0], wy_bwd_block_v=narrow_launch[1],
                                 wy_bwd=Launch(*narrow_launch[2]))

    def loss(config, *args, dtype=jnp.bfloat16):
        q, k, v, beta, s0 = args
        o, s = chunk_delta_rule(q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, scale=K ** -0.5,
                                initial_state=s0, seg_index=seg_index, valid=valid, qk_l2norm=True,
                                interpret=True, config=config)
        o = o.astype(jnp.float32)
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2)

    args = (q, k, v, beta, s0)
    g_wide = jax.grad(lambda *a: loss(wide, *a), argnums=range(5))(*args)
    g_narrow = jax.grad(lambda *a: loss(narrow, *a), argnums=range(5))(*args)

    def ref_loss(q, k, v, beta, s0):  # the same function through the float32 chunked reference
        o, s = delta_rule(q, k, v, beta, scale=K ** -0.5, initial_state=s0, output_final_state=True,
                          segment_ids=_segments(B, T), qk_l2norm=True, implementation="chunked")
        return jnp.sum(o * jnp.cos(o)) + jnp.sum(s ** 2)

    bf16_args = [x.astype(jnp.bfloat16).astype(jnp.float32) for x in (q, k, v)] + [beta, s0]
    g_ref = jax.grad(ref_loss, argnums=range(5))(*bf16_args)
    for name, a, b, r in zip("q k v beta h0".split(), g_wide, g_narrow, g_ref):
        assert rel_err(a, b) < 1e-4, name
        assert rel_err(a, r) < 8e-3 and rel_err(b, r) < 8e-3, name
