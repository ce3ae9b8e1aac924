"""lm-evaluation-harness adapter: scores our models on `lm_eval` tasks (optional extra `eval`).

`DeltaNetLM(model, tokenizer)` implements `lm_eval.api.model.LM`:

- `loglikelihood`: (context, continuation) pairs, tokenized whole and split where the context's
  tokens end (as lm_eval's Hugging Face model does); batched by padded length on the right (a
  causal model never sees the padding of its earlier positions); contexts truncated on the left
  to `max_length`.
- `loglikelihood_rolling`: a whole text in disjoint windows of `max_length` tokens, each token
  scored once (lm_eval's rolling windows).
- `generate_until`: batched `deltanet_jax.generation.generate`, cut at the first stop string.

An empty context is conditioned on the prefix token: the tokenizer's end-of-sequence token, or a
newline for byte-level tokenizers (which have none). This module imports without lm_eval; using
the adapter needs it (`pip install deltanet-jax[eval]`).
"""

from __future__ import annotations

import math
import weakref
from collections import defaultdict
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from deltanet_jax.generation import generate, max_total_length
from deltanet_jax.model import DeltaNetForCausalLM

try:
    from lm_eval.api.model import LM as _LMBase

    HAVE_LM_EVAL = True
except ImportError:  # the optional `eval` extra is not installed
    _LMBase = object
    HAVE_LM_EVAL = False

INSTALL_HINT = "lm-evaluation-harness is not installed: pip install 'deltanet-jax[eval]' (or pip install lm_eval)"


def check_tasks_available() -> None:
    """Raise ImportError (with the install command) unless lm_eval can be imported."""
    if not HAVE_LM_EVAL:
        raise ImportError(INSTALL_HINT)


_JITTED: "weakref.WeakKeyDictionary[DeltaNetForCausalLM, Any]" = weakref.WeakKeyDictionary()


def _score_fn(model: DeltaNetForCausalLM):
    """Jitted (params, inputs [B, T], targets [B, T]) -> (target log-prob [B, T], target is argmax [B, T])."""
    fn = _JITTED.get(model)
    if fn is None:
        graphdef = nnx.graphdef(model)

        def score(params, inputs, targets):
            logits = nnx.merge(graphdef, params)(inputs)
            logp = jax.nn.log_softmax(logits, axis=-1)
            picked = jnp.take_along_axis(logp, jnp.maximum(targets, 0)[..., None], axis=-1)[..., 0]
            return picked, jnp.argmax(logits, axis=-1) == targets

        fn = _JITTED[model] = jax.jit(score)
    return fn


def _bucket(n: int) -> int:
    return max(64, 1 << (n - 1).bit_length())


class DeltaNetLM(_LMBase):
    """An `lm_eval` model over a `DeltaNetForCausalLM` and its tokenizer (encode/decode/eos_id)."""

    def __init__(self, model: DeltaNetForCausalLM, tokenizer: Any, *, batch_size: int = 16,
                 max_length: int | None = None, max_gen_toks: int = 256):
        check_tasks_available()
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        limit = max_total_length(model)
        self.max_length = max_length or limit or model.config.max_position_embeddings
        self.max_gen_toks = max_gen_toks
        eos = getattr(tokenizer, "eos_id", None)
        self.prefix_token_id = int(eos) if eos is not None else int(tokenizer.encode("\n")[0])
        if self.prefix_token_id >= model.config.vocab_size or getattr(tokenizer, "vocab_size", 0) > \
                model.config.vocab_size:
            raise ValueError(f"tokenizer ids (vocabulary {tokenizer.vocab_size}) do not fit the model's "
                             f"vocabulary of {model.config.vocab_size}")

    # ---- helpers ---------------------------------------------------------------------------------

    def _encode(self, text: str) -> list[int]:
        return [int(t) for t in self.tokenizer.encode(text)]

    def _encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        spaces = len(context) - len(context.rstrip())
        if spaces:
            continuation, context = context[-spaces:] + continuation, context[:-spaces]
        whole = self._encode(context + continuation)
        ctx = self._encode(context)
        if whole[:len(ctx)] != ctx:  # the tokenizer merged across the boundary: encode separately
            return ctx, self._encode(continuation)
        return ctx, whole[len(ctx):]

    def _score_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum log-prob of the continuation, all greedy)."""
        rows = []
        for ctx, cont in pairs:
            if not cont:
                raise ValueError("loglikelihood needs a non-empty continuation")
            ctx = ctx if ctx else [self.prefix_token_id]
            seq = (ctx + cont)[-(self.max_length + 1):]
            rows.append((seq, len(cont)))
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
        score = _score_fn(self.model)
        params = nnx.state(self.model)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            t = _bucket(max(len(rows[i][0]) - 1 for i in idx))
            inputs = np.zeros((self.batch_size, t), np.int32)
            targets = np.full((self.batch_size, t), -1, np.int32)
            for r, i in enumerate(idx):
                seq = rows[i][0]
                inputs[r, :len(seq) - 1] = seq[:-1]
                targets[r, :len(seq) - 1] = seq[1:]
            logp, greedy = (np.asarray(x) for x in score(params, jnp.asarray(inputs), jnp.asarray(targets)))
            for r, i in enumerate(idx):
                seq, n = rows[i]
                span = slice(len(seq) - 1 - n, len(seq) - 1)
                results[i] = (float(logp[r, span].astype(np.float64).sum()), bool(greedy[r, span].all()))
        return results

    # ---- the LM interface ------------------------------------------------------------------------------

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = [self._encode_pair(*req.args) for req in requests]
        return self._score_tokens(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        windows, owner = [], []
        for k, req in enumerate(requests):
            tokens = self._encode(req.args[0])
            for w in get_rolling_token_windows(token_list=tokens, prefix_token=self.prefix_token_id,
                                               max_seq_len=self.max_length, context_len=1):
                windows.append(make_disjoint_window(w))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._score_tokens(windows)):
            totals[k] += logp
        return totals

    def generate_until(self, requests) -> list[str]:
        groups: dict[tuple, list[int]] = defaultdict(list)
        settings = []
        for i, req in enumerate(requests):
            context, kwargs = req.args
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None)
            until = [until] if isinstance(until, str) else list(until or [])
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            temperature = float(kwargs.pop("temperature", 0.0)) if kwargs.pop("do_sample", False) else 0.0
            settings.append(until)
            groups[(max_new, temperature)].append(i)
        out = [""] * len(requests)
        stops = () if getattr(self.tokenizer, "eos_id", None) is None else (int(self.tokenizer.eos_id),)
        for (max_new, temperature), idx in groups.items():
            keep = self.max_length - max_new if max_total_length(self.model) is not None else self.max_length
            if keep < 1:
                raise ValueError(f"max_gen_toks {max_new} leaves no room for a prompt within {self.max_length}")
            for start in range(0, len(idx), self.batch_size):
                chunk = idx[start:start + self.batch_size]
                prompts = [(self._encode(requests[i].args[0]) or [self.prefix_token_id])[-keep:] for i in chunk]
                prompts += [prompts[0]] * (self.batch_size - len(prompts))  # one compiled shape per group
                new = generate(self.model, prompts, max_new_tokens=max_new, temperature=temperature,
                               stop_tokens=stops)
                for r, i in enumerate(chunk):
                    text = self.tokenizer.decode([t for t in new[r] if t not in stops])
                    for s in settings[i]:
                        if s and s in text:
                            text = text[:text.index(s)]
                    out[i] = text
        return out


def task_manager(tasks: Sequence[str], include_path: str | None = None, include_defaults: bool = True):
    """An lm_eval TaskManager knowing `tasks`. Tasks all found under `include_path` skip indexing
    lm_eval's thousands of built-in task files (tens of seconds); ValueError names unknown tasks."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ValueError("no tasks given")
    manager = None
    if include_path:
        manager = TaskManager(include_path=include_path, include_defaults=False)
        if include_defaults and not all(t in manager.all_tasks for t in tasks):
            manager = None
    if manager is None:
        if not include_defaults:
            raise ValueError("include_defaults=False needs an include_path")
        manager = TaskManager(include_path=include_path) if include_path else TaskManager()
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        raise ValueError(f"unknown lm_eval task(s): {', '.join(unknown)}")
    return manager


def evaluate_tasks(model: DeltaNetForCausalLM, tokenizer: Any, tasks: Sequence[str], *, limit: int | None = None,
                   include_path: str | None = None, include_defaults: bool = True, batch_size: int = 16,
                   num_fewshot: int | None = None, manager: Any = None) -> dict[str, dict[str, float]]:
    """Run lm_eval `tasks` (zero-shot unless `num_fewshot`) -> {task: {metric: value}} (numbers only).

    `manager`: a `task_manager(...)` made beforehand (else one is made here)."""
    check_tasks_available()
    import lm_eval

    if manager is None:
        manager = task_manager(tasks, include_path, include_defaults)
    lm = DeltaNetLM(model, tokenizer, batch_size=batch_size)
    out = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), limit=limit, task_manager=manager,
                                  num_fewshot=num_fewshot, log_samples=False, bootstrap_iters=0)
    scores: dict[str, dict[str, float]] = {}
    for task, metrics in out["results"].items():
        scores[task] = {k.replace(",none", ""): float(v) for k, v in metrics.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and "stderr" not in k
                        and not (isinstance(v, float) and math.isnan(v))}
    return scores


__all__ = ["DeltaNetLM", "HAVE_LM_EVAL", "check_tasks_available", "evaluate_tasks", "task_manager"]
