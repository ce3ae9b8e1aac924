"""The Pallas kernels on a GPU: bf16 against the float32 reference and against fla's
chunk_delta_rule (when importable), at fla's own tolerances (relative error <= 0.006 for outputs,
<= 0.008 for gradients). Run with `pytest -m gpu` on a GPU machine."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltanet_jax.ops import delta_rule

pytestmark = pytest.mark.gpu

O_TOL, G_TOL = 0.006, 0.008


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def inputs(seed, B, T, H, K, V, beta_logit_shift=0.0):
    rng = np.random.default_rng(seed)
    q = rng.standard_normal((B, T, H, K), np.float32)
    k = rng.standard_normal((B, T, H, K), np.float32)
    k /= np.linalg.norm(k, axis=-1, keepdims=True)
    v = rng.standard_normal((B, T, H, V), np.float32)
    beta = 1 / (1 + np.exp(-(rng.standard_normal((B, T, H), np.float32) + beta_logit_shift)))
    h0 = rng.standard_normal((B, H, K, V), np.float32) * 0.1
    do = rng.standard_normal((B, T, H, V), np.float32)
    bf = lambda x: np.asarray(jnp.asarray(x, jnp.bfloat16).astype(jnp.float32))  # the bf16 values, as f32
    return bf(q), bf(k), bf(v), bf(beta), h0, bf(do)


def run(impl, dtype, q, k, v, beta, h0, do, seg=None):
    """Outputs, final state and gradients of (q, k, v, beta, h0) for the cotangent do (and 0.01 on
    the state), in one jitted program (one compilation per case, not one per operation)."""
    args = [jnp.asarray(x, dtype) for x in (q, k, v, beta)] + [jnp.asarray(h0)]

    @jax.jit
    def fwd_bwd(args, do, seg):
        def f(q, k, v, beta, h0):
            return delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, segment_ids=seg,
                              implementation=impl)

        (o, s), pull = jax.vjp(f, *args)
        return (o, s, *pull((do.astype(o.dtype), jnp.ones_like(s) * 0.01)))

    out = fwd_bwd(args, jnp.asarray(do), seg)
    return [np.asarray(x.astype(jnp.float32)) for x in out]


def fla_run(q, k, v, beta, h0, do):
    torch = pytest.importorskip("torch")
    fla_ops = pytest.importorskip("fla.ops.delta_rule")
    t = lambda x, dt: torch.from_numpy(np.ascontiguousarray(x)).cuda().to(dt).requires_grad_(True)
    tq, tk, tv, tb = (t(x, torch.bfloat16) for x in (q, k, v, beta))
    th0 = t(h0, torch.float32)
    o, s = fla_ops.chunk_delta_rule(tq, tk, tv, tb, initial_state=th0, output_final_state=True)
    torch.autograd.backward([o, s], [torch.from_numpy(do).cuda().to(torch.bfloat16), torch.ones_like(s) * 0.01])
    return [x.detach().float().cpu().numpy() for x in (o, s, tq.grad, tk.grad, tv.grad, tb.grad, th0.grad)]


NAMES = ["o", "final_state", "dq", "dk", "dv", "dbeta", "dh0"]
GRID = [  # B, T, H, K, V
    (2, 1, 2, 64, 64), (2, 63, 2, 128, 128), (2, 64, 3, 64, 128), (2, 65, 2, 256, 64),
    (1, 4096, 4, 128, 128), (1, 4096, 2, 256, 256), (1, 32768, 2, 64, 64), (1, 32768, 1, 128, 128),
]


@pytest.mark.parametrize("B,T,H,K,V", GRID)
def test_bf16_against_float32_reference(B, T, H, K, V):
    data = inputs(B * T + K + V, B, T, H, K, V)
    ours = run("pallas", jnp.bfloat16, *data)
    ref = run("chunked", jnp.float32, *data)   # float32 reference on the same (bf16-valued) inputs
    print((B, T, H, K, V), {name: round(rel(a, b), 5) for name, a, b in zip(NAMES, ours, ref)}, flush=True)
    for name, a, b in zip(NAMES, ours, ref):
        assert np.isfinite(a).all(), name
        tol = O_TOL if name in ("o", "final_state") else G_TOL
        assert rel(a, b) <= tol, f"{name}: {rel(a, b):.5f} > {tol}"


def test_bf16_no_worse_than_fla():
    """One shape only: fla autotunes every kernel afresh for each new shape (minutes)."""
    data = inputs(11, 1, 4096, 4, 128, 128)
    ours = run("pallas", jnp.bfloat16, *data)
    ref = run("chunked", jnp.float32, *data)
    print("ours vs reference:", {n: round(rel(a, c), 5) for n, a, c in zip(NAMES, ours, ref)}, flush=True)
    try:
        theirs = fla_run(*data)
    except pytest.skip.Exception:
        raise
    except Exception as err:  # say what fla raised before the report (a time limit may cut it)
        print(f"fla raised {type(err).__name__}: {err}", flush=True)
        raise
    for name, a, b, c in zip(NAMES, ours, theirs, ref):
        print(f"{name}: ours {rel(a, c):.5f}, fla {rel(b, c):.5f}, ours vs fla {rel(a, b):.5f}", flush=True)
    for name, a, b, c in zip(NAMES, ours, theirs, ref):
        # Both against the reference: ours must be no worse than fla's by more than a little rounding.
        assert rel(a, c) <= max(1.5 * rel(b, c), 2e-3), f"{name}: ours {rel(a, c):.5f} vs fla {rel(b, c):.5f}"


def test_decode_step_kernel_matches_xla():
    from deltanet_jax.ops import delta_rule_step

    rng = np.random.default_rng(0)
    B, H, K, V = 4, 16, 128, 128
    q, k = (jnp.asarray(rng.standard_normal((B, H, K)), jnp.bfloat16) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((B, H, V)), jnp.bfloat16)
    beta = jax.nn.sigmoid(jnp.asarray(rng.standard_normal((B, H)), jnp.float32))
    state = jnp.asarray(rng.standard_normal((B, H, K, V)) * 0.1, jnp.float32)
    o, s = delta_rule_step(q, k, v, beta, state, qk_l2norm=True, implementation="pallas")
    o_ref, s_ref = delta_rule_step(q, k, v, beta, state, qk_l2norm=True, implementation="xla")
    assert rel(s, s_ref) < 1e-5 and rel(o.astype(jnp.float32), o_ref.astype(jnp.float32)) < 1e-2


@pytest.mark.parametrize("dtype,tol,K", [(jnp.float16, 0.006, 64), (jnp.float16, 0.006, 128), (jnp.float32, 2e-4, 64),
                                         (jnp.float32, 2e-4, 128), (jnp.float32, 2e-4, 256)])
def test_other_dtypes(dtype, tol, K):
    """fp16 and fp32 against the float32 reference; fp16 also at K = 128 (the doubling inverse of
    16-bit inputs), float32 also at K = 128 and 256, where its kernels take other launch choices
    and column-blocked WY products to fit in shared memory."""
    data = inputs(3, 2, 200, 2, K, K)
    ours = run("pallas", dtype, *data)
    ref = run("chunked", jnp.float32, *data)
    for name, a, b in zip(NAMES, ours, ref):
        assert rel(a, b) <= (tol if name in ("o", "final_state") else 4 * tol / 3), name


def test_packed_segments():
    B, T, H, K, V = 2, 700, 2, 128, 64
    data = inputs(5, B, T, H, K, V)
    seg = np.zeros((B, T), np.int32)
    seg[0, :100], seg[0, 100:420], seg[0, 430:] = 1, 2, 3
    seg[1, 5:64], seg[1, 64:65], seg[1, 65:690] = 7, 8, 9
    ours = run("pallas", jnp.bfloat16, *data, seg=jnp.asarray(seg))
    ref = run("chunked", jnp.float32, *data, seg=jnp.asarray(seg))
    for name, a, b in zip(NAMES, ours, ref):
        assert rel(a, b) <= (O_TOL if name in ("o", "final_state") else G_TOL), name


@pytest.mark.parametrize("shift", [-12.0, 12.0], ids=["beta~0", "beta~1"])
def test_long_sequence_stays_finite(shift):
    data = inputs(7, 1, 65536, 2, 64, 64, beta_logit_shift=shift)
    for name, x in zip(NAMES, run("pallas", jnp.bfloat16, *data)):
        assert np.isfinite(x).all(), name


def test_poisoned_output_is_overwritten():
    """Both forward scans (W and U read, and made from T) write every element of their output."""
    from pallas_kernels.delta_rule.chunk_fwd import chunk_forward, chunk_forward_from_t
    from pallas_kernels.delta_rule.common import Static
    from pallas_kernels.delta_rule.wy import wy_inverse, wy_prepare

    q, k, v, beta, h0, _ = (jnp.asarray(x) for x in inputs(9, 2, 256, 2, 64, 128))
    q, k, v = (x.astype(jnp.bfloat16) for x in (q, k, v))
    st = Static(scale=0.125, qk_l2norm=False, has_segments=False, interpret=False)
    w, u, p = wy_prepare(k, v, beta, None, q, static=st)
    o, _ = chunk_forward(q, k, w, u, None, h0, p, static=st, out=jnp.full(v.shape, jnp.nan, jnp.bfloat16))
    assert np.isfinite(np.asarray(o.astype(jnp.float32))).all()
    tmat, p = wy_inverse(k, beta, None, q, static=st)
    o, _ = chunk_forward_from_t(q, k, v, beta, tmat, None, h0, p, static=st,
                                out=jnp.full(v.shape, jnp.nan, jnp.bfloat16))
    assert np.isfinite(np.asarray(o.astype(jnp.float32))).all()
