"""An independent float64 NumPy loop of the delta rule, used as the tests' ground truth."""

from __future__ import annotations

import numpy as np


def delta_rule_numpy(q, k, v, beta, scale=None, initial_state=None, segment_ids=None, qk_l2norm=False):
    """q, k [B,T,H,K], v [B,T,H,V], beta [B,T,H] -> (o [B,T,H,V], final state [B,H,K,V]), float64.

    Padding (segment id 0) is skipped; a segment starts where a valid token's id differs from the
    previous valid token's id, and starts from zero (the row's first segment from initial_state).
    """
    q, k, v, beta = (np.asarray(x, np.float64) for x in (q, k, v, beta))
    B, T, H, K = q.shape
    V = v.shape[-1]
    scale = K ** -0.5 if scale is None else scale
    if qk_l2norm:
        q = q / np.sqrt((q * q).sum(-1, keepdims=True) + 1e-6)
        k = k / np.sqrt((k * k).sum(-1, keepdims=True) + 1e-6)
    seg = np.ones((B, T), np.int64) if segment_ids is None else np.asarray(segment_ids)
    o = np.zeros((B, T, H, V))
    final = np.zeros((B, H, K, V))
    for b in range(B):
        S = np.zeros((H, K, V)) if initial_state is None else np.array(initial_state[b], np.float64)
        prev_id = None
        for t in range(T):
            if seg[b, t] == 0:
                continue
            if prev_id is not None and seg[b, t] != prev_id:
                S = np.zeros((H, K, V))
            prev_id = seg[b, t]
            for h in range(H):
                kt = k[b, t, h]
                delta = beta[b, t, h] * (v[b, t, h] - S[h].T @ kt)
                S[h] = S[h] + np.outer(kt, delta)
                o[b, t, h] = S[h].T @ (scale * q[b, t, h])
        final[b] = S
    return o, final
