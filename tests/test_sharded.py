"""`delta_rule_sharded` and the sharded Pallas short convolution over 8 CPU devices (subprocesses,
since the device count is fixed at start)."""

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


CONV_SCRIPT = textwrap.dedent("""
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from deltanet_jax.nn import ShortConvolution
    assert len(jax.devices()) == 8
    mesh = Mesh(np.array(jax.devices()).reshape(2, 2, 2), ("data", "fsdp", "tensor"))
    B, T = 4, 40
    seg = jnp.asarray(np.array([[1] * 15 + [2] * 20 + [0] * 5] * 2 + [[3] * 40] * 2))

    def pallas_calls(jaxpr, inside=False, found=None):
        # (inside a shard_map?, first operand's shape) of every pallas_call, nested jaxprs included
        found = [] if found is None else found
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "pallas_call":
                found.append((inside, eqn.invars[0].aval.shape))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        pallas_calls(sub, inside or eqn.primitive.name == "shard_map", found)
        return found

    for d, local_d in ((64, 32), (48, 48)):  # 48 channels cannot split into 16-wide halves: replicated
        x = jax.random.normal(jax.random.PRNGKey(d), (B, T, d))
        sharded = ShortConvolution(d, implementation="pallas", mesh=mesh, rngs=nnx.Rngs(1))
        plain = ShortConvolution(d, implementation="xla", rngs=nnx.Rngs(1))
        xs = jax.device_put(x, NamedSharding(mesh, P(("data", "fsdp"), None, "tensor")))
        for segment_ids in (None, seg):
            def loss(m, x):
                y, state = m(x, segment_ids=segment_ids)
                return jnp.sum(y * jnp.cos(y)) + jnp.sum(state ** 2), (y, state)
            (_, (y, s)), (gm, gx) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1), has_aux=True))(sharded, xs)
            (_, (y_ref, s_ref)), (gm_ref, gx_ref) = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(plain, x)
            for got, want in ((y, y_ref), (s, s_ref), (gx, gx_ref), (gm.weight[...], gm_ref.weight[...])):
                np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
            calls = pallas_calls(jax.make_jaxpr(lambda x: loss(sharded, x))(xs).jaxpr)
            assert calls and all(inside and shape[0] == B // 4 and shape[-1] == local_d for inside, shape in calls), calls
    print("OK")
""")


def _run_on_8_devices(script: str) -> None:
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0 and "OK" in out.stdout, out.stdout[-2000:] + out.stderr[-4000:]


def test_sharded_over_batch_and_heads_matches_single_device():
    _run_on_8_devices(SCRIPT)


def test_pallas_short_conv_runs_on_each_devices_shard():
    """With a mesh the Pallas convolution runs inside `jax.shard_map` on [B / 4, T, D / 2] shards and
    gives the single-device XLA results: outputs, final state, gradients of x and of the weight."""
    _run_on_8_devices(CONV_SCRIPT)
