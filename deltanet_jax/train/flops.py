"""Model FLOPs per trained token and the peak FLOP rates used for model-FLOPs utilisation (MFU)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from deltanet_jax.model import DeltaNetConfig
from deltanet_jax.ops.linear_attention import default_chunk_size

CHUNK = 64  # chunk length of the chunked / Pallas delta rule

# Dense peak FLOP/s per device by (device-kind substring, compute dtype): bf16 tensor cores, and
# TF32 for float32 matmuls (XLA's default precision on these GPUs).
PEAK_FLOPS = {
    ("H100", "bfloat16"): 989e12, ("H100", "float32"): 494.5e12,
    ("H200", "bfloat16"): 989e12, ("H200", "float32"): 494.5e12,
    ("A100", "bfloat16"): 312e12, ("A100", "float32"): 156e12,
}


def matmul_params(config: DeltaNetConfig) -> int:
    """Parameters used as matmul weights once per token (embedding lookup excluded, lm_head included)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    inter = config.mlp_intermediate_size
    total = d * config.vocab_size  # lm_head (or the tied embedding used as it)
    for i in range(layers):
        if config.is_attention_layer(i):
            a = config.attn
            kv = a["num_kv_heads"] * (d // a["num_heads"])
            total += 2 * d * d + 2 * d * kv
        else:
            mixer = 2 * d * config.key_dim + 2 * d * config.value_dim  # q, k, v, o
            if config.use_gate:
                mixer += d * config.value_dim
            if config.mixer == "delta" and config.use_beta:
                mixer += d * config.num_heads
            total += mixer
        if config.use_mlp:
            total += 3 * d * inter
    return total


def mixer_flops_forward(config: DeltaNetConfig, seq_len: int) -> float:
    """Forward FLOPs per token of the sequence mixers (beyond their projections), all layers.

    DeltaNet (chunked form, chunk C, per head K, V): intra-chunk Q K^T, K K^T, the WY products and
    masked (Q K^T) V' (~2 C (3K + 2V)) plus the state reads and update (~6 K V). Linear attention
    counts the same chunked work, with C the whole sequence up to its one-chunk length.
    Softmax attention: causal Q K^T and P V over the visible keys (window or half the sequence).
    """
    total = 0.0
    for i in range(config.num_hidden_layers):
        if config.is_attention_layer(i):
            window = config.attn["window_size"]
            visible = min(window, seq_len) if window else seq_len / 2
            total += 4.0 * visible * config.hidden_size
        else:
            h, k, v = config.num_heads, config.head_k_dim, config.head_v_dim
            c = min(default_chunk_size(seq_len) if config.mixer == "linear" else CHUNK, seq_len)
            total += h * (2.0 * c * (3 * k + 2 * v) + 6.0 * k * v)
    return total


def train_flops_per_token(config: DeltaNetConfig, seq_len: int) -> float:
    """FLOPs of one training token: 3 x forward (backward ~ 2 x forward), recomputation not counted."""
    return 3.0 * (2.0 * matmul_params(config) + mixer_flops_forward(config, seq_len))


def peak_flops(device: jax.Device, dtype: jnp.dtype) -> float | None:
    """Peak dense FLOP/s of one `device` at compute `dtype`, or None when unknown (e.g. CPUs)."""
    kind, name = getattr(device, "device_kind", ""), jnp.dtype(dtype).name
    for (substring, dt), value in PEAK_FLOPS.items():
        if substring in kind and dt == name:
            return value
    return None


def device_memory_gib() -> dict[str, float]:
    """Peak and current bytes in use (GiB, maximum over this process's devices) when the backend reports
    them (GPUs, TPUs); empty on CPU."""
    peak, now = [], []
    for device in jax.local_devices():
        try:
            stats = device.memory_stats()
        except Exception:  # noqa: BLE001 - backends without memory statistics
            stats = None
        if stats:
            peak.append(stats.get("peak_bytes_in_use", 0))
            now.append(stats.get("bytes_in_use", 0))
    if not peak:
        return {}
    return {"mem_peak_gib": max(peak) / 2**30, "mem_gib": max(now) / 2**30}
