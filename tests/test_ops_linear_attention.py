"""Linear attention op against an independent float64 NumPy loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from deltanet_jax.ops.linear_attention import linear_attention, linear_attention_step


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def linear_attention_numpy(q, k, v, scale, initial_state=None, segment_ids=None):
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    B, T, H, K = q.shape
    V = v.shape[-1]
    seg = np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros((B, T, H, V))
    final = np.zeros((B, H, K, V))
    for b in range(B):
        S = np.zeros((H, K, V)) if initial_state is None else np.array(initial_state[b], np.float64)
        prev = None
        for t in range(T):
            if seg[b, t] == 0:
                continue
            if prev is not None and seg[b, t] != prev:
                S = np.zeros((H, K, V))
            prev = seg[b, t]
            for h in range(H):
                S[h] += np.outer(k[b, t, h], v[b, t, h])
                o[b, t, h] = S[h].T @ (scale * q[b, t, h])
        final[b] = S
    return o, final


def _inputs(B=2, T=21, H=2, K=4, V=3, seed=0):
    r = np.random.default_rng(seed)
    return (r.standard_normal((B, T, H, K)).astype(np.float32), r.standard_normal((B, T, H, K)).astype(np.float32),
            r.standard_normal((B, T, H, V)).astype(np.float32), r.standard_normal((B, H, K, V)).astype(np.float32))


@pytest.mark.parametrize("chunk,with_segments,with_state", [
    (4, True, True), (5, False, True), (64, True, True), (None, True, True), (None, True, False),
    (None, False, False)])
def test_linear_attention_matches_numpy(chunk, with_segments, with_state):
    """chunk None: the default, one chunk at this length (no scan); 64 > T is one chunk as well."""
    q, k, v, s0 = _inputs()
    s0 = s0 if with_state else None
    seg = None
    if with_segments:
        seg = np.array([[0, 0, 1, 1, 1, 1, 1, 2, 2, 0, 2, 3, 3, 3, 3, 3, 3, 3, 3, 0, 0],
                        [5, 5, 5, 5, 5, 5, 5, 5, 5, 5, 7, 7, 7, 0, 0, 0, 0, 0, 7, 1, 1]], np.int32)
    o, fin = linear_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                              initial_state=None if s0 is None else jnp.asarray(s0),
                              output_final_state=True, segment_ids=None if seg is None else jnp.asarray(seg),
                              chunk_size=chunk)
    ref_o, ref_fin = linear_attention_numpy(q, k, v, 0.5, s0, seg)
    np.testing.assert_allclose(o, ref_o, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(fin, ref_fin, rtol=1e-4, atol=1e-4)


def test_default_chunking_by_length_and_gradients(monkeypatch):
    """Past ONE_BLOCK_MAX_LEN the default is CHUNK_SIZE chunks; both forms give the same gradients."""
    import deltanet_jax.ops.linear_attention as la

    q, k, v, s0 = (jnp.asarray(x) for x in _inputs())
    seg = jnp.asarray([[0, 0] + [1] * 6 + [2] * 5 + [0] * 2 + [2] * 4 + [0] * 2,
                       [3] * 9 + [0] * 3 + [4] * 9], jnp.int32)  # leading, inner and trailing padding
    w = jnp.asarray(np.random.default_rng(1).standard_normal((2, 21, 2, 3)), jnp.float32)

    def loss(q, k, v, s0, chunk_size):
        o, fin = linear_attention(q, k, v, initial_state=s0, output_final_state=True, segment_ids=seg,
                                  chunk_size=chunk_size)
        return jnp.sum(o * w) + jnp.sum(fin ** 2)

    one_block = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0, None)
    monkeypatch.setattr(la, "ONE_BLOCK_MAX_LEN", 8)
    monkeypatch.setattr(la, "CHUNK_SIZE", 4)
    lowered = jax.jit(lambda *a: loss(*a, None)).lower(q, k, v, s0).as_text()
    assert "while" in lowered  # 21 > 8 tokens: the scan over chunks of 4
    chunked = jax.grad(loss, argnums=(0, 1, 2, 3))(q, k, v, s0, None)
    for a, b in zip(one_block, chunked):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    monkeypatch.setattr(la, "ONE_BLOCK_MAX_LEN", 21)
    assert "while" not in jax.jit(lambda *a: loss(*a, None)).lower(q, k, v, s0).as_text()


def test_linear_attention_steps_continue_the_sequence():
    q, k, v, _ = _inputs(T=9)
    o, state = linear_attention(jnp.asarray(q[:, :5]), jnp.asarray(k[:, :5]), jnp.asarray(v[:, :5]),
                                output_final_state=True, chunk_size=4)
    outs = [o]
    for t in range(5, 9):
        o_t, state = linear_attention_step(jnp.asarray(q[:, t]), jnp.asarray(k[:, t]), jnp.asarray(v[:, t]), state)
        outs.append(o_t[:, None])
    ref, _ = linear_attention_numpy(q, k, v, 0.5)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), ref, rtol=1e-4, atol=1e-4)


def test_linear_attention_rejects_bad_shapes():
    q, k, v, s0 = _inputs()
    with pytest.raises(ValueError, match="linear attention expects"):
        linear_attention(q, k[:, :3], v)
    with pytest.raises(ValueError, match="initial_state"):
        linear_attention(q, k, v, initial_state=s0[:1])
    with pytest.raises(ValueError, match="segment_ids"):
        linear_attention(q, k, v, segment_ids=np.ones((2, 3), np.int32))
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        linear_attention(q, k, v, chunk_size=2.5)
    with pytest.raises(ValueError, match="at least one token"):
        linear_attention(q[:, :0], k[:, :0], v[:, :0])
    with pytest.raises(ValueError, match="state must be"):
        linear_attention_step(q[:, 0], k[:, 0], v[:, 0], s0[..., :2])
