"""Text generation: a batched prefill, then decoding inside one compiled loop.

Prompts of different lengths are left-padded to a shared bucket length P with segment id 0, so the
last prompt token of every row sits at position P - 1 and the model's caches hold each row's own
prompt (recurrent and short-convolution states restart at the segment start; attention caches
count positions within the segment). Decoding then runs one token per step in a `lax.while_loop`
inside `jax.jit`: no host round trip and no recompilation per token. Each model compiles once per
(batch, P, max_new_tokens, greedy / sampled / filtered); temperature, top-k, top-p, stop tokens and
seeds are traced values, so changing them reuses the compiled loop.

Tokens after a row's stop token are not produced for that row (the stop token itself is kept).
`use_cache=False` recomputes the whole forward pass over the [B, P + max_new_tokens] buffer at
each step: slow, a check of the caches.
"""

from __future__ import annotations

import dataclasses
import functools
import weakref
from collections.abc import Iterator, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltanet_jax.model import DeltaNetForCausalLM

EMPTY = -1  # marks "no token" in the per-step output buffers (row already finished)


class SamplingParams(NamedTuple):
    """Traced sampling settings (changing them does not recompile).

    temperature f32 scalar (> 0 when sampling); top_k int32 scalar (0 = off); top_p f32 scalar
    (1 = off); stop_tokens [S] int32 (EMPTY-padded).
    """

    temperature: jax.Array
    top_k: jax.Array
    top_p: jax.Array
    stop_tokens: jax.Array


@dataclasses.dataclass(frozen=True)
class SamplingMode:
    """The static part of sampling: greedy or drawn, and whether top-k / top-p filtering runs
    (it sorts the vocabulary each step)."""

    greedy: bool = True
    filtered: bool = False


def sampling_settings(vocab_size: int, temperature: float = 0.0, top_k: int | None = None,
                      top_p: float | None = None, stop_tokens: Sequence[int] = ()) -> tuple[SamplingMode, SamplingParams]:
    """Check the user's settings -> (static mode, traced params).

    temperature 0 is greedy (argmax; top_k / top_p then play no part); otherwise logits are divided
    by the temperature, restricted to the `top_k` most likely tokens and to the smallest set whose
    probability reaches `top_p` (nucleus), and a token is drawn.
    """
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float, np.floating)) \
            or not np.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, (int, np.integer)) or top_k < 1):
        raise ValueError(f"top_k must be a positive integer or None, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float, np.floating))
                              or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p!r}")
    if isinstance(stop_tokens, (str, bytes)) or not isinstance(stop_tokens, (Sequence, np.ndarray)):
        raise ValueError(f"stop_tokens must be a list of token ids, got {type(stop_tokens).__name__}")
    for t in stop_tokens:
        if isinstance(t, bool) or not isinstance(t, (int, np.integer)) or not 0 <= t < vocab_size:
            raise ValueError(f"stop token {t!r} is not a token id in [0, {vocab_size})")
    greedy = temperature == 0
    k = 0 if top_k is None or top_k >= vocab_size else int(top_k)
    p = 1.0 if top_p is None else float(top_p)
    mode = SamplingMode(greedy=greedy, filtered=not greedy and (k > 0 or p < 1.0))
    slots = max(8, 1 << max(len(stop_tokens) - 1, 0).bit_length())  # few distinct shapes
    stops = np.full((slots,), EMPTY, np.int32)
    stops[:len(stop_tokens)] = list(stop_tokens)
    params = SamplingParams(jnp.float32(temperature if not greedy else 1.0), jnp.int32(k), jnp.float32(p),
                            jnp.asarray(stops))
    return mode, params


def sample_tokens(logits: jax.Array, key: jax.Array, mode: SamplingMode, params: SamplingParams) -> jax.Array:
    """logits [B, V] float32 -> token ids [B] int32 (see `sampling_settings`).

    Filtering keeps every token whose logit reaches the threshold of the kept set, so tokens tied
    with the last kept one stay too.
    """
    if mode.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits.astype(jnp.float32) / params.temperature
    if mode.filtered:
        vocab = logits.shape[-1]
        desc = -jnp.sort(-logits, axis=-1)  # [B, V], most likely first
        rank = jnp.arange(vocab, dtype=jnp.int32)
        k = jnp.where(params.top_k > 0, params.top_k, vocab)
        in_k = rank[None, :] < k
        probs = jax.nn.softmax(jnp.where(in_k, desc, -jnp.inf), axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # probability of the more likely tokens
        keep = in_k & (before < params.top_p)  # the most likely token always stays
        n_keep = jnp.maximum(jnp.sum(keep, axis=-1), 1)
        threshold = jnp.take_along_axis(desc, (n_keep - 1)[:, None], axis=-1)  # [B, 1]
        logits = jnp.where(logits >= threshold, logits, -jnp.inf)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def _is_stop(token: jax.Array, params: SamplingParams) -> jax.Array:
    return jnp.any(token[:, None] == params.stop_tokens[None, :], axis=-1)


# ---- prompts -------------------------------------------------------------------------------------------


def prompt_bucket(length: int) -> int:
    """Padded prompt length: the next power of two (at least 8) up to 256, then a multiple of 256."""
    if length <= 256:
        return max(8, 1 << (length - 1).bit_length())
    return -(-length // 256) * 256


def left_pad(prompts: Sequence[Sequence[int]], length: int) -> tuple[np.ndarray, np.ndarray]:
    """Prompts -> (ids [B, length] int32, segment_ids [B, length] int32), right-aligned, padding id 0."""
    ids = np.zeros((len(prompts), length), np.int32)
    seg = np.zeros((len(prompts), length), np.int32)
    for i, p in enumerate(prompts):
        ids[i, length - len(p):] = p
        seg[i, length - len(p):] = 1
    return ids, seg


def max_total_length(model: DeltaNetForCausalLM) -> int | None:
    """Prompt plus generated tokens a model can attend to: `max_position_embeddings` when any layer is
    global attention (its KV cache grows with the sequence), None (unbounded) otherwise."""
    config = model.config
    attn = config.attn
    if attn is not None and attn["window_size"] is None and attn["layers"]:
        return config.max_position_embeddings
    return None


def check_prompts(model: DeltaNetForCausalLM, prompts: Any, max_new_tokens: int) -> list[list[int]]:
    """Validate prompts (non-empty lists of token ids in the vocabulary) and the length limit."""
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    vocab = model.config.vocab_size
    out = []
    for i, p in enumerate(prompts):
        p = np.asarray(p).tolist() if isinstance(p, np.ndarray) else p
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise ValueError(f"prompt {i} must be a list of token ids, got {type(p).__name__}")
        if len(p) == 0:
            raise ValueError(f"prompt {i} is empty: generation needs at least one prompt token")
        if not all(isinstance(t, (int, np.integer)) and not isinstance(t, bool) and 0 <= t < vocab for t in p):
            raise ValueError(f"prompt {i} holds a token id outside [0, {vocab})")
        out.append([int(t) for t in p])
    limit = max_total_length(model)
    longest = max(len(p) for p in out)
    if limit is not None and longest + max_new_tokens > limit:
        raise ValueError(f"prompt of {longest} tokens plus max_new_tokens={max_new_tokens} exceeds the "
                         f"{limit}-token limit of this model's global attention layers "
                         f"(max_position_embeddings)")
    return out


# ---- the compiled pieces --------------------------------------------------------------------------------


class DecodeState(NamedTuple):
    """The loop carry (a pytree).

    cache: the model's per-layer caches, or without caching (ids, segment_ids) [B, P + max_new_tokens];
    token [B] int32: the last emitted token (fed to the model next); finished [B] bool: the row has
    emitted a stop token; emitted: int32 scalar, tokens emitted so far; key: the sampling key.
    """

    cache: Any
    token: jax.Array
    finished: jax.Array
    emitted: jax.Array
    key: jax.Array


def _start(graphdef: nnx.GraphDef, params: nnx.State, ids: jax.Array, segment_ids: jax.Array, key: jax.Array,
           sampling: SamplingParams, *, mode: SamplingMode, use_cache: bool, max_new_tokens: int) -> DecodeState:
    """ids, segment_ids [B, P] left-padded -> the loop's initial state.

    With the cache: prefill and draw the first token (emitted = 1). Without: only the token buffer
    (emitted = 0; the loop computes every token the same way).
    """
    b, p = ids.shape
    total = p + max_new_tokens
    if not use_cache:
        buf = jnp.zeros((b, total), jnp.int32).at[:, :p].set(ids)
        seg = jnp.ones((b, total), jnp.int32).at[:, :p].set(segment_ids)
        zero = jnp.zeros((b,), jnp.int32)
        return DecodeState((buf, seg), zero, zero.astype(bool), jnp.zeros((), jnp.int32), key)
    model = nnx.merge(graphdef, params)
    logits, cache = model.prefill(ids, segment_ids, total, last_only=True)
    token = sample_tokens(logits, jax.random.fold_in(key, 0), mode, sampling)
    return DecodeState(cache, token, _is_stop(token, sampling), jnp.ones((), jnp.int32), key)


def _advance(model: DeltaNetForCausalLM, state: DecodeState, use_cache: bool,
             max_new_tokens: int) -> tuple[jax.Array, Any]:
    """Feed `state.token` (the token of index emitted - 1) -> (logits [B, V] of the next token, new cache)."""
    if use_cache:
        return model.decode_step(state.token, state.cache)
    buf, seg = state.cache
    pos = buf.shape[1] - max_new_tokens + state.emitted - 1  # the fed token's place; P - 1 before any
    old = jax.lax.dynamic_index_in_dim(buf, pos, axis=1, keepdims=False)
    fed = jnp.where(state.emitted > 0, state.token, old)
    buf = jax.lax.dynamic_update_index_in_dim(buf, fed, pos, axis=1)
    h = model.model(buf, seg)
    return model.logits(jax.lax.dynamic_index_in_dim(h, pos, axis=1, keepdims=False)), (buf, seg)


def _decode(graphdef: nnx.GraphDef, params: nnx.State, state: DecodeState, sampling: SamplingParams, *,
            mode: SamplingMode, use_cache: bool, max_new_tokens: int, num_steps: int) -> tuple[DecodeState, jax.Array]:
    """Up to `num_steps` tokens (fewer when max_new_tokens is reached or every row has stopped).

    -> (state, tokens [B, num_steps] int32 with EMPTY where a row emitted nothing).
    """
    model = nnx.merge(graphdef, params)
    out = jnp.full((state.token.shape[0], num_steps), EMPTY, jnp.int32)

    def cond(carry):
        i, st, _ = carry
        return (i < num_steps) & (st.emitted < max_new_tokens) & ~jnp.all(st.finished)

    def body(carry):
        i, st, out = carry
        logits, cache = _advance(model, st, use_cache, max_new_tokens)
        token = sample_tokens(logits, jax.random.fold_in(st.key, st.emitted), mode, sampling)
        out = jax.lax.dynamic_update_index_in_dim(out, jnp.where(st.finished, EMPTY, token), i, axis=1)
        finished = st.finished | _is_stop(token, sampling)
        return i + 1, DecodeState(cache, token, finished, st.emitted + 1, st.key), out

    _, state, out = jax.lax.while_loop(cond, body, (jnp.zeros((), jnp.int32), state, out))
    return state, out


_STATIC = ("mode", "use_cache", "max_new_tokens")
_JITTED: "weakref.WeakKeyDictionary[DeltaNetForCausalLM, tuple]" = weakref.WeakKeyDictionary()


def _functions(model: DeltaNetForCausalLM) -> tuple[nnx.GraphDef, Any, Any]:
    """(graph definition, jitted start, jitted decode loop) of `model`, made once per model.

    The graph definition is closed over (it holds the unhashable config, so it cannot be a static
    argument); the decode loop donates its state off CPU.
    """
    entry = _JITTED.get(model)
    if entry is None:
        graphdef = nnx.graphdef(model)
        donate = ("state",) if jax.default_backend() != "cpu" else ()
        start = jax.jit(functools.partial(_start, graphdef), static_argnames=_STATIC)
        decode = jax.jit(functools.partial(_decode, graphdef), static_argnames=_STATIC + ("num_steps",),
                         donate_argnames=donate)
        entry = _JITTED[model] = (graphdef, start, decode)
    return entry


# ---- public API -----------------------------------------------------------------------------------------


@dataclasses.dataclass
class _Prepared:
    params: nnx.State
    ids: jax.Array
    segment_ids: jax.Array
    key: jax.Array
    mode: SamplingMode
    sampling: SamplingParams
    use_cache: bool
    max_new_tokens: int

    def static(self) -> dict[str, Any]:
        return dict(mode=self.mode, use_cache=self.use_cache, max_new_tokens=self.max_new_tokens)


def _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache) -> _Prepared:
    if not isinstance(model, DeltaNetForCausalLM):
        raise ValueError(f"model must be a DeltaNetForCausalLM, got {type(model).__name__}")
    prompts = check_prompts(model, prompts, max_new_tokens)
    mode, sampling = sampling_settings(model.config.vocab_size, temperature, top_k, top_p, stop_tokens)
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    ids, seg = left_pad(prompts, prompt_bucket(max(len(p) for p in prompts)))
    return _Prepared(nnx.state(model), jnp.asarray(ids), jnp.asarray(seg), jax.random.key(int(seed)), mode,
                     sampling, bool(use_cache), int(max_new_tokens))


def generate(model: DeltaNetForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             stop_tokens: Sequence[int] = (), seed: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    Returns one list of new token ids per prompt, ending early at (and including) a stop token.
    Two compiled calls (prefill, decode loop) and one transfer back at the end.
    """
    p = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache)
    _, start, decode = _functions(model)
    state = start(p.params, p.ids, p.segment_ids, p.key, p.sampling, **p.static())
    parts = [state.token[:, None]] if p.use_cache else []
    steps = p.max_new_tokens - 1 if p.use_cache else p.max_new_tokens
    if steps:
        state, rest = decode(p.params, state, p.sampling, num_steps=steps, **p.static())
        parts.append(rest)
    tokens = np.concatenate([np.asarray(x) for x in parts], axis=1)
    return [[int(t) for t in row if t != EMPTY] for row in tokens]


def generate_stream(model: DeltaNetForCausalLM, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                    temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                    stop_tokens: Sequence[int] = (), seed: int = 0, use_cache: bool = True,
                    chunk_size: int = 16) -> Iterator[list[list[int]]]:
    """Like `generate`, but yields the new tokens as they come: with the cache first the token
    drawn after the prefill, then up to `chunk_size` tokens per row per compiled call (one
    transfer per chunk, none per token).

    Each item holds one list per prompt (empty for rows that have stopped); the concatenation of
    the items equals `generate`'s result for the same arguments.
    """
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive integer, got {chunk_size!r}")
    p = _prepare(model, prompts, max_new_tokens, temperature, top_k, top_p, stop_tokens, seed, use_cache)
    _, start, decode = _functions(model)
    state = start(p.params, p.ids, p.segment_ids, p.key, p.sampling, **p.static())
    if p.use_cache:
        yield [[int(t)] for t in np.asarray(state.token)]
    emitted, finished = int(state.emitted), bool(np.all(np.asarray(state.finished)))
    while emitted < p.max_new_tokens and not finished:
        state, out = decode(p.params, state, p.sampling, num_steps=chunk_size, **p.static())
        out = np.asarray(out)
        yield [[int(t) for t in row if t != EMPTY] for row in out]
        emitted, finished = int(state.emitted), bool(np.all(np.asarray(state.finished)))


def cache_shapes(model: DeltaNetForCausalLM, batch_size: int, prompt_length: int,
                 max_new_tokens: int) -> Any:
    """Shapes and dtypes (a pytree of ShapeDtypeStruct) of the model caches that `generate` carries
    through its decode loop for `batch_size` prompts of `prompt_length` tokens; nothing is computed."""
    p = _prepare(model, [[1] * prompt_length] * batch_size, max_new_tokens, 0.0, None, None, (), 0, True)
    fn = functools.partial(_start, nnx.graphdef(model), **p.static())
    return jax.eval_shape(fn, p.params, p.ids, p.segment_ids, p.key, p.sampling).cache
