"""Synthetic recall tasks: multi-query associative recall (MQAR), as defined by Zoology.

An MQAR example of length T with N key-value pairs over a vocabulary of V tokens:

    inputs   k1 v1 k2 v2 ... kN vN | 0 0 kb 0 0 0 ka 0 ...      (T tokens)
    targets  -100 ...          -100 | -100 -100 vb -100 ... va ...

- keys are drawn without replacement from [1, V/2), values without replacement from [V/2, V),
  independently per example; the key-value block fills the first 2N positions;
- the remaining T - 2N positions form (T - 2N) / 2 two-token slots; every key is queried once, in a
  slot drawn without replacement with probability proportional to a * i^(a-1) for slot i = 1, 2, ...
  (a power law: with a = 0.01 queries crowd near the key-value block); the key goes to the slot's
  first position;
- every other position holds token 0 and target `IGNORE_INDEX`; the target at a query position is
  the queried key's value (the next token to predict), so the answer never appears in the input.

Accuracy is the fraction of query positions whose argmax prediction equals the target.
"""

from __future__ import annotations

import dataclasses

import numpy as np

IGNORE_INDEX = -100


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Shape of an MQAR task (defaults: the DeltaNet paper's setting, from Zoology)."""

    vocab_size: int = 8192
    seq_len: int = 512
    num_kv_pairs: int = 64
    power_a: float = 0.01
    random_non_queries: bool = False  # True: fill the 0 positions with uniform random tokens (Zoology's option)

    def __post_init__(self) -> None:
        for name in ("vocab_size", "seq_len", "num_kv_pairs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"MQAR {name} must be a positive integer, got {value!r}")
        if self.seq_len % 2:
            raise ValueError(f"MQAR seq_len must be even, got {self.seq_len}")
        if 4 * self.num_kv_pairs > self.seq_len:
            raise ValueError(f"MQAR needs seq_len >= 4 * num_kv_pairs (a key-value block and a query slot per "
                             f"pair), got seq_len={self.seq_len}, num_kv_pairs={self.num_kv_pairs}")
        if self.num_kv_pairs > self.vocab_size // 2 - 1:
            raise ValueError(f"MQAR vocab_size={self.vocab_size} has only {self.vocab_size // 2 - 1} key tokens, "
                             f"fewer than num_kv_pairs={self.num_kv_pairs}")
        if not (isinstance(self.power_a, (int, float)) and self.power_a > 0):
            raise ValueError(f"MQAR power_a must be a positive number, got {self.power_a!r}")

    @property
    def num_slots(self) -> int:
        """Two-token query slots after the key-value block."""
        return (self.seq_len - 2 * self.num_kv_pairs) // 2


def slot_probabilities(num_slots: int, power_a: float) -> np.ndarray:
    """p_i proportional to a * i^(a-1) over slots i = 1..num_slots (float64 [num_slots], sums to 1)."""
    i = np.arange(1, num_slots + 1, dtype=np.float64)
    p = power_a * i ** (power_a - 1.0)
    return p / p.sum()


def _uniform_sample(rng: np.random.Generator, n: int, population: int, k: int) -> np.ndarray:
    """k draws without replacement from range(population) per row, in random order: int64 [n, k]."""
    return np.stack([rng.choice(population, size=k, replace=False, shuffle=True) for _ in range(n)])


def _weighted_sample(rng: np.random.Generator, n: int, p: np.ndarray, k: int) -> np.ndarray:
    """k draws without replacement from range(len(p)) per row, each draw proportional to `p` among
    the items left (successive sampling), in draw order: int64 [n, k].

    The k smallest of E_j / p_j with E_j ~ Exp(1), in increasing order, have exactly this law.
    """
    score = -np.log1p(-rng.random((n, p.shape[0]))) / p[None, :]
    idx = np.argpartition(score, k - 1, axis=1)[:, :k]
    order = np.argsort(np.take_along_axis(score, idx, axis=1), axis=1, kind="stable")
    return np.take_along_axis(idx, order, axis=1)


def multiquery_ar(num_examples: int, config: MQARConfig = MQARConfig(), *, seed: int,
                  chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """`num_examples` MQAR examples: (inputs, targets), both int32 [num_examples, seq_len].

    Deterministic in (`seed`, `chunk`); `chunk` is the number of rows generated at a time. Targets are `IGNORE_INDEX` except at the
    N query positions of each row.
    """
    if isinstance(num_examples, bool) or not isinstance(num_examples, (int, np.integer)) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive integer, got {num_examples!r}")
    if not isinstance(config, MQARConfig):
        raise ValueError(f"config must be an MQARConfig, got {type(config).__name__}")
    rng = np.random.default_rng(seed)
    c = config
    n_pairs, half = c.num_kv_pairs, c.vocab_size // 2
    context = 2 * n_pairs
    p = slot_probabilities(c.num_slots, c.power_a)
    inputs = np.zeros((num_examples, c.seq_len), np.int32)
    targets = np.full((num_examples, c.seq_len), IGNORE_INDEX, np.int32)
    for start in range(0, num_examples, chunk):
        n = min(chunk, num_examples - start)
        rows = slice(start, start + n)
        keys = 1 + _uniform_sample(rng, n, half - 1, n_pairs)  # [n, N] in [1, V/2)
        values = half + _uniform_sample(rng, n, c.vocab_size - half, n_pairs)  # [n, N] in [V/2, V)
        slots = _weighted_sample(rng, n, p, n_pairs)  # [n, N]: key j is queried in slot slots[:, j]
        inputs[rows, 0:context:2] = keys
        inputs[rows, 1:context:2] = values
        pos = context + 2 * slots
        np.put_along_axis(inputs[rows], pos, keys, axis=1)
        np.put_along_axis(targets[rows], pos, values, axis=1)
        if c.random_non_queries:
            block = inputs[rows]
            zero = block == 0
            block[zero] = rng.integers(0, c.vocab_size, size=int(zero.sum()))
    return inputs, targets


def recall_accuracy(predictions: np.ndarray, targets: np.ndarray) -> float:
    """Fraction of labelled positions (targets >= 0) where predictions [B, T] equal targets [B, T]."""
    predictions, targets = np.asarray(predictions), np.asarray(targets)
    if predictions.shape != targets.shape:
        raise ValueError(f"predictions shape {predictions.shape} must equal targets shape {targets.shape}")
    mask = targets >= 0
    if not mask.any():
        raise ValueError("targets have no labelled positions")
    return float((predictions[mask] == targets[mask]).mean())
