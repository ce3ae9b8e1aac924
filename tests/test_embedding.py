"""The token embedding: lookup values, float32 gradient sums, and the parameter layout."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.nn import Embedding, embed_lookup


def _case(seed: int, vocab: int = 12, dim: int = 5):
    rng = np.random.default_rng(seed)
    table = jnp.asarray(rng.normal(size=(vocab, dim)), jnp.float32)
    ids = jnp.asarray(np.where(rng.random((3, 7)) < 0.6, 0, rng.integers(0, vocab, (3, 7))), jnp.int32)
    cot = jnp.asarray(rng.normal(size=(3, 7, dim)), jnp.float32)
    return table, ids, cot


def _equations(jaxpr):
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            inner = getattr(value, "jaxpr", None)
            if inner is not None and hasattr(inner, "eqns"):
                yield from _equations(inner)


def test_lookup_and_gradient_equal_take_in_float32():
    table, ids, cot = _case(0)
    np.testing.assert_array_equal(embed_lookup(table, ids), jnp.take(table, ids, axis=0))
    ours = jax.grad(lambda t: (embed_lookup(t, ids) * cot).sum())(table)
    ref = jax.grad(lambda t: (jnp.take(t, ids, axis=0) * cot).sum())(table)
    # Same additions, possibly in another order: float32 rounding of sums of <= 21 terms.
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


def test_bfloat16_table_gradient_is_summed_in_float32():
    table, ids, cot = _case(1)
    table16 = table.astype(jnp.bfloat16)
    grad_fn = jax.grad(lambda t: (embed_lookup(t, ids).astype(jnp.float32) * cot).sum())
    scatters = [eqn.outvars[0].aval.dtype for eqn in _equations(jax.make_jaxpr(grad_fn)(table16).jaxpr)
                if eqn.primitive.name.startswith("scatter")]
    assert scatters == [jnp.float32], scatters
    got = grad_fn(table16)
    assert got.dtype == jnp.bfloat16
    # The rows' cotangent arrives in bfloat16; id 0 sums many of them. Summed in float32 and rounded
    # once, the result is within half a bfloat16 ulp (at most 2^-8 relative) of the exact sum; bfloat16
    # accumulation would drift by several ulps over the ~10 terms of id 0.
    terms = np.asarray(cot.astype(jnp.bfloat16), np.float32).reshape(-1, table.shape[1])
    want = np.zeros(table.shape, np.float64)
    np.add.at(want, np.asarray(ids).reshape(-1), terms)
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=2 ** -8, atol=1e-7)


def test_compute_dtype_casts_only_the_rows():
    emb = Embedding(12, 5, dtype=jnp.bfloat16, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    ids = jnp.array([[1, 2, 11]])
    out = emb(ids)
    assert out.dtype == jnp.bfloat16 and out.shape == (1, 3, 5)
    np.testing.assert_array_equal(out, emb.embedding[...][ids].astype(jnp.bfloat16))
    assert emb.embedding[...].dtype == jnp.float32


def test_float_ids_are_rejected():
    with pytest.raises(ValueError, match="integers"):
        embed_lookup(jnp.zeros((4, 2)), jnp.zeros((3,), jnp.float32))
