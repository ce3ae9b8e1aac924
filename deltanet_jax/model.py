"""DeltaNet language model: the config (fla's `DeltaNetConfig` field names) and the causal LM.

Module tree and attribute names mirror fla's `DeltaNetForCausalLM` so checkpoints map 1:1:
`model.embeddings`, `model.layers[i].{attn_norm, attn, mlp_norm, mlp}`, `model.norm`, `lm_head`
(absent when `tie_word_embeddings`). Linear kernels are stored [in, out] (PyTorch's transpose).

The model family: layers listed in `attn["layers"]` are softmax attention (fla's hybrids; all
layers gives the Transformer++ baseline), the others are DeltaNet, or vanilla linear attention
with `mixer="linear"`.
"""

from __future__ import annotations

import copy
import dataclasses
import numbers
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from deltanet_jax.nn import (Attention, AttentionCache, DeltaNet, DeltaNetCache, Embedding, GatedMLP, LinearAttention,
                             RMSNorm, mlp_intermediate_size)
from deltanet_jax.nn.axes import BATCH_MESH_AXES, linear_axes
from deltanet_jax.nn.deltanet import QK_ACTIVATIONS, QK_NORMS

# Keys an fla / Hugging Face config.json may carry that do not affect the model's math.
IGNORED_CONFIG_KEYS = frozenset({
    "model_type", "architectures", "torch_dtype", "dtype", "transformers_version", "elementwise_affine",
    "_name_or_path", "auto_map", "output_attentions", "output_hidden_states", "return_dict",
})
ATTN_KEYS = frozenset({"layers", "num_heads", "num_kv_heads", "qkv_bias", "window_size", "rope_theta"})
ATTN_MODES = ("chunk", "fused_recurrent")
MIXERS = ("delta", "linear")


@dataclasses.dataclass
class DeltaNetConfig:
    """Model hyper-parameters, named and defaulted as in fla's `DeltaNetConfig`.

    Math-bearing fields: hidden_size, num_hidden_layers, num_heads, expand_k, expand_v, use_gate,
    use_short_conv, conv_size, use_beta, allow_neg_eigval, qk_norm, qk_activation, hidden_ratio,
    intermediate_size, hidden_act, norm_eps, vocab_size, tie_word_embeddings, initializer_range,
    attn, mixer ("delta" or "linear": the token mixer of the non-attention layers; not an fla
    field), use_mlp (False: blocks without their MLP and its norm, token mixers only, as in
    Zoology's recall models; not an fla field). The others (attn_mode, fuse_*, use_cache, token
    ids, ...) are kept for round trips.
    """

    vocab_size: int = 32000
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    num_heads: int = 16
    expand_k: float = 1.0
    expand_v: float = 1.0
    use_gate: bool = False
    use_short_conv: bool = True
    conv_size: int = 4
    use_beta: bool = True
    use_output_norm: bool = True
    allow_neg_eigval: bool = False
    qk_norm: str = "l2"
    qk_activation: str = "silu"
    hidden_ratio: float | None = 4
    intermediate_size: int | None = None
    hidden_act: str = "swish"
    norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    initializer_range: float = 0.02
    max_position_embeddings: int = 2048
    attn: dict[str, Any] | None = None
    mixer: str = "delta"
    use_mlp: bool = True
    attn_mode: str = "chunk"
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    fuse_norm: bool = True
    fuse_swiglu: bool = True
    fuse_cross_entropy: bool = True
    fuse_linear_cross_entropy: bool = False
    use_l2warp: bool = False

    def __post_init__(self) -> None:
        self._validate()

    # ---- validation -----------------------------------------------------------------------------

    def _validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_heads", "conv_size",
                     "max_position_embeddings"):
            _positive_int(name, getattr(self, name))
        for name in ("expand_k", "expand_v", "norm_eps", "initializer_range"):
            _positive_number(name, getattr(self, name))
        if self.hidden_ratio is not None:
            _positive_number("hidden_ratio", self.hidden_ratio)
        if self.intermediate_size is not None:
            _positive_int("intermediate_size", self.intermediate_size)
        for name in ("use_gate", "use_short_conv", "use_beta", "use_output_norm", "allow_neg_eigval",
                     "tie_word_embeddings", "use_cache", "use_mlp", "fuse_norm", "fuse_swiglu", "fuse_cross_entropy",
                     "fuse_linear_cross_entropy", "use_l2warp"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"config.{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                raise ValueError(f"config.{name} must be a non-negative integer or null, got {value!r}")
        _choice("qk_norm", self.qk_norm, QK_NORMS)
        _choice("qk_activation", self.qk_activation, QK_ACTIVATIONS)
        _choice("hidden_act", self.hidden_act, ("swish",))
        _choice("attn_mode", self.attn_mode, ATTN_MODES)
        _choice("mixer", self.mixer, MIXERS)
        if self.mixer == "linear" and self.allow_neg_eigval:
            raise ValueError("config.allow_neg_eigval scales beta, which mixer='linear' does not have")
        if not self.use_output_norm:
            raise ValueError("config.use_output_norm=False is not supported: the DeltaNet layer always "
                             "normalises its output per head, as fla's layer does")
        if self.key_dim < 1 or self.key_dim % self.num_heads:
            raise ValueError(f"config.expand_k: key dim int(hidden_size * expand_k) = {self.key_dim} must be a "
                             f"positive multiple of num_heads = {self.num_heads}")
        if self.value_dim < 1 or self.value_dim % self.num_heads:
            raise ValueError(f"config.expand_v: value dim int(hidden_size * expand_v) = {self.value_dim} must be "
                             f"a positive multiple of num_heads = {self.num_heads}")
        if self.attn is not None:
            self.attn = _validated_attn(self.attn, self.num_hidden_layers)
            if self.hidden_size % self.attn["num_heads"]:
                raise ValueError(f"config.attn.num_heads {self.attn['num_heads']} must divide hidden_size "
                                 f"{self.hidden_size}")

    def is_attention_layer(self, layer_idx: int) -> bool:
        """Whether layer `layer_idx` (0-based) is softmax attention (listed in attn["layers"])."""
        return self.attn is not None and layer_idx in self.attn["layers"]

    # ---- derived sizes ----------------------------------------------------------------------------

    @property
    def key_dim(self) -> int:
        return int(self.hidden_size * self.expand_k)

    @property
    def value_dim(self) -> int:
        return int(self.hidden_size * self.expand_v)

    @property
    def head_k_dim(self) -> int:
        return self.key_dim // self.num_heads

    @property
    def head_v_dim(self) -> int:
        return self.value_dim // self.num_heads

    @property
    def mlp_intermediate_size(self) -> int:
        return mlp_intermediate_size(self.hidden_size, self.hidden_ratio, self.intermediate_size)

    # ---- (de)serialisation ------------------------------------------------------------------------

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DeltaNetConfig":
        """Build from a dict (e.g. fla's config.json). Unknown keys or bad values raise ValueError."""
        if not isinstance(d, Mapping):
            raise ValueError(f"model config must be a mapping, got {type(d).__name__}")
        fields = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - fields - IGNORED_CONFIG_KEYS)
        if unknown:
            raise ValueError(f"unknown model config key(s): {', '.join(unknown)}")
        if d.get("model_type", "delta_net") != "delta_net":
            raise ValueError(f"config.model_type must be 'delta_net', got {d['model_type']!r}")
        return cls(**{k: copy.deepcopy(v) for k, v in d.items() if k in fields})

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict of every field (from_dict(to_dict()) == self)."""
        return dataclasses.asdict(self)


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(f"config.{name} must be a positive integer, got {value!r}")


def _positive_number(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"config.{name} must be a positive number, got {value!r}")


def _choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"config.{name} must be one of {list(allowed)}, got {value!r}")


def _validated_attn(attn: Any, num_layers: int) -> dict[str, Any]:
    """Check fla's hybrid-attention dict and fill its defaults (as fla's config does)."""
    if not isinstance(attn, Mapping):
        raise ValueError(f"config.attn must be a dict or null, got {type(attn).__name__}")
    unknown = sorted(set(attn) - ATTN_KEYS)
    if unknown:
        raise ValueError(f"unknown config.attn key(s): {', '.join(unknown)}")
    for key in ("layers", "num_heads"):
        if key not in attn:
            raise ValueError(f"config.attn.{key} is required for hybrid attention layers")
    layers = attn["layers"]
    if (not isinstance(layers, (list, tuple))
            or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < num_layers for i in layers)):
        raise ValueError(f"config.attn.layers must be a list of layer indices in [0, {num_layers}), got {layers!r}")
    out = dict(attn)
    out["layers"] = list(layers)
    out.setdefault("num_kv_heads", attn["num_heads"])
    out.setdefault("qkv_bias", False)
    out.setdefault("window_size", None)
    out.setdefault("rope_theta", 10000.0)
    _positive_int("attn.num_heads", out["num_heads"])
    _positive_int("attn.num_kv_heads", out["num_kv_heads"])
    if out["num_heads"] % out["num_kv_heads"]:
        raise ValueError(f"config.attn.num_heads {out['num_heads']} must be a multiple of "
                         f"attn.num_kv_heads {out['num_kv_heads']}")
    if out["window_size"] is not None:
        _positive_int("attn.window_size", out["window_size"])
    _positive_number("attn.rope_theta", out["rope_theta"])
    if not isinstance(out["qkv_bias"], bool):
        raise ValueError(f"config.attn.qkv_bias must be true or false, got {out['qkv_bias']!r}")
    return out


# ---- modules -----------------------------------------------------------------------------------------

LayerCache = DeltaNetCache | AttentionCache
ModelCache = tuple[LayerCache, ...]


def _mixer(config: DeltaNetConfig, layer_idx: int, *, implementation: str | None, dtype: jnp.dtype,
           param_dtype: jnp.dtype, rngs: nnx.Rngs, mesh: Mesh | None = None) -> nnx.Module:
    """The token mixer of layer `layer_idx`, chosen as fla's DeltaNetBlock does (plus `mixer`)."""
    init = nnx.initializers.normal(config.initializer_range)
    if config.is_attention_layer(layer_idx):
        a = config.attn
        return Attention(config.hidden_size, a["num_heads"], num_kv_heads=a["num_kv_heads"], qkv_bias=a["qkv_bias"],
                         window_size=a["window_size"], rope_theta=a["rope_theta"],
                         max_position_embeddings=config.max_position_embeddings, dtype=dtype,
                         param_dtype=param_dtype, kernel_init=init, rngs=rngs)
    kw = dict(expand_k=config.expand_k, expand_v=config.expand_v, use_gate=config.use_gate,
              use_short_conv=config.use_short_conv, conv_size=config.conv_size, qk_activation=config.qk_activation,
              qk_norm=config.qk_norm, norm_eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype,
              kernel_init=init, rngs=rngs)
    if config.mixer == "linear":
        return LinearAttention(config.hidden_size, config.num_heads, **kw)
    return DeltaNet(config.hidden_size, config.num_heads, use_beta=config.use_beta,
                    allow_neg_eigval=config.allow_neg_eigval, implementation=implementation, mesh=mesh, **kw)


def _norm_mlp(norm: RMSNorm, mlp: GatedMLP, h: jax.Array) -> jax.Array:
    """`mlp(norm(h))` keeping only its matmul outputs for the backward: the normalised h and the
    SwiGLU product `silu(gate) * up` (the down projection's input, [B, T, intermediate]) are
    recomputed, elementwise, where the backward needs them. Pure in the modules' arrays, so it
    also runs where the modules were built outside the current trace."""
    graphdef, state = nnx.split((norm, mlp))

    def apply(state, h):
        n, m = nnx.merge(graphdef, state)
        return m(n(h))

    return jax.checkpoint(apply, policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)(state, h)


class DeltaNetBlock(nnx.Module):
    """Pre-norm block: `h = x + attn(attn_norm(x)); y = h + mlp(mlp_norm(h))`. x [B, T, D].

    `attn` is an `Attention` for layers listed in `config.attn["layers"]`, else the DeltaNet (or
    linear-attention) mixer. Without `config.use_mlp` the block has no `mlp_norm` / `mlp`: y = h.
    """

    def __init__(self, config: DeltaNetConfig, layer_idx: int = 0, *, implementation: str | None,
                 dtype: jnp.dtype, param_dtype: jnp.dtype, rngs: nnx.Rngs, mesh: Mesh | None = None):
        init = nnx.initializers.normal(config.initializer_range)
        norm = dict(eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)
        self.attn_norm = RMSNorm(config.hidden_size, **norm)
        self.attn = _mixer(config, layer_idx, implementation=implementation, dtype=dtype, param_dtype=param_dtype,
                           rngs=rngs, mesh=mesh)
        self.use_mlp = config.use_mlp
        if config.use_mlp:
            self.mlp_norm = RMSNorm(config.hidden_size, **norm)
            self.mlp = GatedMLP(config.hidden_size, hidden_ratio=config.hidden_ratio,
                                intermediate_size=config.intermediate_size, dtype=dtype, param_dtype=param_dtype,
                                kernel_init=init, rngs=rngs)

    def _with_mlp(self, h: jax.Array, recompute: bool = False) -> jax.Array:
        """h + mlp(mlp_norm(h)), or h without an MLP; `recompute`: `_norm_mlp` (training forward)."""
        if not self.use_mlp:
            return h
        return h + (_norm_mlp(self.mlp_norm, self.mlp, h) if recompute else self.mlp(self.mlp_norm(h)))

    def __call__(self, x: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        h = x + self.attn(self.attn_norm(x), segment_ids=segment_ids)
        return self._with_mlp(h, recompute=True)

    def init_cache(self, batch_size: int, max_length: int | None = None) -> LayerCache:
        if isinstance(self.attn, Attention):
            return self.attn.init_cache(batch_size, max_length)
        return self.attn.init_cache(batch_size)

    def prefill(self, x: jax.Array, segment_ids: jax.Array | None = None,
                max_length: int | None = None) -> tuple[jax.Array, LayerCache]:
        if isinstance(self.attn, Attention):
            a, cache = self.attn.prefill(self.attn_norm(x), segment_ids=segment_ids, max_length=max_length)
        else:
            a, cache = self.attn.prefill(self.attn_norm(x), segment_ids=segment_ids)
        return self._with_mlp(x + a), cache

    def step(self, x_t: jax.Array, cache: LayerCache) -> tuple[jax.Array, LayerCache]:
        a, cache = self.attn.step(self.attn_norm(x_t), cache)
        return self._with_mlp(x_t + a), cache


class DeltaNetModel(nnx.Module):
    """Embeddings, blocks and the final norm: input_ids [B, T] -> hidden [B, T, D]."""

    def __init__(self, config: DeltaNetConfig, *, implementation: str | None, remat: bool, dtype: jnp.dtype,
                 param_dtype: jnp.dtype, rngs: nnx.Rngs, mesh: Mesh | None = None):
        self.remat = remat
        self.mesh = mesh
        self.embeddings = Embedding(config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
                                   embedding_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
                                   embedding_metadata={"logical_axes": ("vocab", "embed")})
        self.layers = nnx.List([
            DeltaNetBlock(config, i, implementation=implementation, dtype=dtype, param_dtype=param_dtype, rngs=rngs,
                          mesh=mesh)
            for i in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, eps=config.norm_eps, dtype=dtype, param_dtype=param_dtype)

    def _batch_sharded(self, h: jax.Array) -> jax.Array:
        """With a mesh: h [B, T, D] constrained to rows split over data x fsdp (D whole)."""
        if self.mesh is None:
            return h
        spec = PartitionSpec(tuple(a for a in BATCH_MESH_AXES if a in self.mesh.axis_names), None, None)
        return jax.lax.with_sharding_constraint(h, NamedSharding(self.mesh, spec))

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        h = self._batch_sharded(self.embeddings(input_ids))
        for layer in self.layers:
            if self.remat:
                h = nnx.remat(lambda blk, x, s: blk(x, s))(layer, h, segment_ids)
            else:
                h = layer(h, segment_ids)
            h = self._batch_sharded(h)
        return self.norm(h)


class DeltaNetForCausalLM(nnx.Module):
    """DeltaNet causal LM (and its hybrids / baselines): input_ids [B, T] int -> logits [B, T, vocab] float32.

    `dtype` is the compute dtype, parameters are kept in `param_dtype`. `implementation` picks the
    delta-rule kernel (see `deltanet_jax.ops.delta_rule`); `remat` recomputes each block's
    activations in the backward pass. `mesh` (axes "data", "fsdp", "tensor"; for sharded
    training) runs the delta rule inside `jax.shard_map` and keeps activations split over the batch;
    parameters carry `logical_axes` metadata (see `deltanet_jax.nn.axes`) for the sharding rules.
    """

    def __init__(self, config: DeltaNetConfig, *, rngs: nnx.Rngs, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, implementation: str | None = None, remat: bool = False,
                 mesh: Mesh | None = None):
        if not isinstance(config, DeltaNetConfig):
            raise ValueError(f"config must be a DeltaNetConfig, got {type(config).__name__}")
        self.config = config
        self.dtype = dtype
        self.model = DeltaNetModel(config, implementation=implementation, remat=remat, dtype=dtype,
                                   param_dtype=param_dtype, rngs=rngs, mesh=mesh)
        if not config.tie_word_embeddings:
            self.lm_head = nnx.Linear(config.hidden_size, config.vocab_size, use_bias=False, dtype=dtype,
                                      param_dtype=param_dtype,
                                      kernel_init=nnx.initializers.normal(config.initializer_range), rngs=rngs,
                                      **linear_axes("embed", "vocab"))

    def _check_ids(self, x: jax.Array, name: str, ndim: int) -> None:
        if x.ndim != ndim or not jnp.issubdtype(x.dtype, jnp.integer):
            shape = "[B, T]" if ndim == 2 else "[B]"
            raise ValueError(f"{name} must be an integer array {shape}, got {x.dtype} {x.shape}")

    def _check_inputs(self, input_ids: jax.Array, segment_ids: jax.Array | None) -> None:
        self._check_ids(input_ids, "input_ids", 2)
        if segment_ids is not None:
            self._check_ids(segment_ids, "segment_ids", 2)
            if segment_ids.shape != input_ids.shape:
                raise ValueError(f"segment_ids shape {segment_ids.shape} must equal input_ids shape {input_ids.shape}")

    def head_weight(self) -> jax.Array:
        """The output projection in the compute dtype: [vocab, D] when tied to the embeddings, else [D, vocab]."""
        if self.config.tie_word_embeddings:
            return self.model.embeddings.embedding[...].astype(self.dtype)
        return self.lm_head.kernel[...].astype(self.dtype)

    def project(self, h: jax.Array, w: jax.Array, dtype: jnp.dtype = jnp.float32) -> jax.Array:
        """Hidden states h [..., D] and `head_weight()` w -> logits [..., vocab] in `dtype` (float32 by
        default; the matmul accumulates in float32). Pure in (h, w), so loss code can apply it chunk
        by chunk inside scans, and differentiate it in the compute dtype."""
        spec = "...d,vd->...v" if self.config.tie_word_embeddings else "...d,dv->...v"
        return jnp.einsum(spec, h, w, preferred_element_type=dtype)

    def logits(self, h: jax.Array) -> jax.Array:
        """Final hidden states [..., D] -> float32 logits [..., vocab] (matmul accumulated in float32)."""
        return self.project(h, self.head_weight())

    def hidden(self, input_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int, segment_ids [B, T] -> final normalised hidden states [B, T, D] (what
        `logits` projects)."""
        self._check_inputs(input_ids, segment_ids)
        return self.model(input_ids, segment_ids)

    def __call__(self, input_ids: jax.Array, segment_ids: jax.Array | None = None) -> jax.Array:
        """input_ids [B, T] int, segment_ids [B, T] int (0 = padding) -> logits [B, T, vocab] float32."""
        return self.logits(self.hidden(input_ids, segment_ids))

    # ---- decoding -------------------------------------------------------------------------------

    def init_cache(self, batch_size: int, max_length: int | None = None) -> ModelCache:
        """Empty per-layer decoding caches (`max_length`: KV slots of global attention layers,
        default `max_position_embeddings`; sliding layers keep `window_size` slots)."""
        return tuple(layer.init_cache(batch_size, max_length) for layer in self.model.layers)

    def prefill(self, input_ids: jax.Array, segment_ids: jax.Array | None = None,
                max_length: int | None = None, last_only: bool = False) -> tuple[jax.Array, ModelCache]:
        """Run prompts: input_ids [B, T] -> (logits [B, T, vocab] float32, cache after the last token).

        Prompts of different lengths are left-padded with segment id 0 (the cache is the state of
        each row's last segment). `max_length` (prompt plus generated tokens) sizes the KV caches
        of global attention layers (default `max_position_embeddings`). `last_only` projects only
        the last position: logits [B, vocab] (what decoding needs, without a [B, T, vocab] array).
        """
        self._check_inputs(input_ids, segment_ids)
        h = self.model.embeddings(input_ids)
        caches = []
        for layer in self.model.layers:
            h, cache = layer.prefill(h, segment_ids, max_length)
            caches.append(cache)
        return self.logits(self.model.norm(h[:, -1] if last_only else h)), tuple(caches)

    def decode_step(self, token_ids: jax.Array, cache: ModelCache) -> tuple[jax.Array, ModelCache]:
        """One token per row: token_ids [B] int -> (logits [B, vocab] float32, new cache)."""
        self._check_ids(token_ids, "token_ids", 1)
        if len(cache) != len(self.model.layers):
            raise ValueError(f"cache has {len(cache)} layers, the model has {len(self.model.layers)}")
        h = self.model.embeddings(token_ids)
        new = []
        for layer, c in zip(self.model.layers, cache):
            h, c = layer.step(h, c)
            new.append(c)
        return self.logits(self.model.norm(h)), tuple(new)


def num_params(model: nnx.Module) -> int:
    """Number of trainable parameters (tied embeddings counted once)."""
    return sum(int(x.size) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
