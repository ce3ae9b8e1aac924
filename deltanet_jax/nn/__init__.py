"""Flax NNX layers: the token embedding, RMS norms, causal short convolution, the DeltaNet and
linear-attention mixers, softmax attention (global / sliding) and the SwiGLU MLP."""

from deltanet_jax.nn.attention import Attention, AttentionCache
from deltanet_jax.nn.deltanet import DeltaNet, DeltaNetCache
from deltanet_jax.nn.embedding import Embedding, embed_lookup
from deltanet_jax.nn.linear_attention import LinearAttention
from deltanet_jax.nn.mlp import GatedMLP, mlp_intermediate_size
from deltanet_jax.nn.norm import GatedRMSNorm, RMSNorm, rms_norm
from deltanet_jax.nn.short_conv import ShortConvolution, causal_conv1d, causal_conv1d_step
from deltanet_jax.ops.segments import segment_index

__all__ = [
    "Attention", "AttentionCache", "DeltaNet", "DeltaNetCache", "Embedding", "GatedMLP", "GatedRMSNorm",
    "LinearAttention", "RMSNorm", "ShortConvolution",
    "causal_conv1d", "causal_conv1d_step", "embed_lookup", "mlp_intermediate_size", "rms_norm",
    "segment_index",
]
