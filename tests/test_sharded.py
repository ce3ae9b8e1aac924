"""`delta_rule_sharded` over 8 CPU devices (a subprocess, since the device count is fixed at start)."""

import os
import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from deltanet_jax.ops import delta_rule, delta_rule_sharded
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    B, T, H, K, V = 4, 80, 4, 16, 16
    ks = jax.random.split(jax.random.PRNGKey(0), 5)
    q = jax.random.normal(ks[0], (B, T, H, K)); k = jax.random.normal(ks[1], (B, T, H, K))
    v = jax.random.normal(ks[2], (B, T, H, V)); beta = jax.nn.sigmoid(jax.random.normal(ks[3], (B, T, H)))
    h0 = jax.random.normal(ks[4], (B, H, K, V))
    seg = jnp.asarray(np.repeat(np.array([[1] * 30 + [2] * 50]), B, 0))
    put = lambda x, spec: jax.device_put(x, NamedSharding(mesh, spec))
    seq = P(("data", "fsdp"), None, "tensor", None)
    args = (put(q, seq), put(k, seq), put(v, seq), put(beta, P(("data", "fsdp"), None, "tensor")))
    h0s = put(h0, P(("data", "fsdp"), "tensor", None, None))
    for impl in ("chunked", "pallas"):
        f = jax.jit(lambda q, k, v, b, h0: delta_rule_sharded(q, k, v, b, mesh=mesh, initial_state=h0,
            output_final_state=True, segment_ids=seg, qk_l2norm=True, implementation=impl))
        o, s = f(*args, h0s)
        o_ref, s_ref = delta_rule(q, k, v, beta, initial_state=h0, output_final_state=True, segment_ids=seg,
                                  qk_l2norm=True, implementation="chunked")
        np.testing.assert_allclose(o, o_ref, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s, s_ref, rtol=1e-4, atol=1e-5)
        assert o.sharding.spec == seq, o.sharding
        g = jax.grad(lambda q: jnp.sum(f(q, *args[1:], h0s)[0] ** 2))(args[0])
        g_ref = jax.grad(lambda q: jnp.sum(delta_rule(q, k, v, beta, initial_state=h0, segment_ids=seg,
                                                     qk_l2norm=True, implementation="chunked")[0] ** 2))(q)
        np.testing.assert_allclose(g, g_ref, rtol=1e-4, atol=1e-5)
    try:
        delta_rule_sharded(q[:3], k[:3], v[:3], beta[:3], mesh=mesh)
    except ValueError as err:
        assert "batch 3 must divide by 4" in str(err), err
    else:
        raise AssertionError("an indivisible batch was accepted")
    print("OK")
""")


def test_sharded_over_batch_and_heads_matches_single_device():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]
