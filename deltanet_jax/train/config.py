"""Run configuration: sections `model`, `train`, `checkpoint`, `mesh`, `data`, their checks,
and `section.field=value` overrides.

`model` is a `DeltaNetConfig`; the other sections are the dataclasses below. Every check runs
before any work starts and raises `ConfigError` naming the offending key.
"""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Union

from deltanet_jax.data.tokenizer import ByteTokenizer
from deltanet_jax.model import DeltaNetConfig


class ConfigError(ValueError):
    """A configuration key or value is not acceptable; the message names it."""


def _doc(text: str, default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"help": text})


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    steps: int = _doc("number of optimizer updates in the whole run", 1000)
    batch_size: int = _doc("sequences per update", 32)
    seq_len: int = _doc("tokens per sequence", 128)
    seed: int = _doc("seed of parameter init and data order", 0)
    lr: float = _doc("peak learning rate", 1e-3)
    min_lr: float = _doc("learning rate at the end of the cosine decay", 1e-4)
    warmup_steps: int = _doc("linear warmup updates", 100)
    weight_decay: float = _doc("AdamW decoupled weight decay (matrices and embeddings only)", 0.01)
    b1: float = _doc("Adam beta1", 0.9)
    b2: float = _doc("Adam beta2", 0.95)
    grad_clip: float = _doc("clip gradients to this global norm (0 = off)", 1.0)
    eval_every: int = _doc("validate every this many updates (and at the end)", 250)
    eval_batches: int = _doc("validation batches (fixed windows of the validation split)", 16)
    log_every: int = _doc("write metrics every this many updates", 25)
    dtype: str = _doc("compute dtype: auto (bfloat16 on GPU/TPU, float32 on CPU), float32, bfloat16", "auto")
    implementation: str | None = _doc("delta-rule kernel: chunked, recurrent, pallas, or null (pallas on GPU, "
                                      "chunked elsewhere)", None)
    remat: bool = _doc("recompute each block's activations in the backward pass (saves memory)", False)
    grad_accum: int = _doc("split each batch into this many micro-batches and sum their gradients (same update, "
                           "less activation memory)", 1)
    loss_chunk: int = _doc("positions per sequence whose logits (and their gradients, formed in the forward "
                           "pass) the loss computes at once (0 = all: a [batch, seq_len, vocab] float32 array)", 0)
    nan_policy: str = _doc("on a NaN/inf loss or gradient: stop (end the run with a message) or skip (leave the "
                           "parameters and optimizer state unchanged for that step and go on)", "stop")

    def check(self) -> None:
        _at_least(self, "train", ("steps", "batch_size", "seq_len", "eval_every", "eval_batches", "log_every",
                                  "grad_accum"), 1)
        if self.batch_size % self.grad_accum:
            raise ConfigError(f"train.batch_size={self.batch_size} must be divisible by "
                              f"train.grad_accum={self.grad_accum}")
        if self.nan_policy not in ("stop", "skip"):
            raise ConfigError(f"train.nan_policy must be stop or skip, got {self.nan_policy!r}")
        _at_least(self, "train", ("seed", "warmup_steps", "loss_chunk"), 0)
        _at_least(self, "train", ("weight_decay", "grad_clip", "min_lr"), 0.0)
        if not self.lr > 0:
            raise ConfigError(f"train.lr must be > 0, got {self.lr}")
        if self.min_lr > self.lr:
            raise ConfigError(f"train.min_lr ({self.min_lr}) must not exceed train.lr ({self.lr})")
        for name in ("b1", "b2"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)}")
        if self.seed >= 2**32:
            raise ConfigError(f"train.seed must be < 2**32, got {self.seed}")
        if self.dtype not in ("auto", "float32", "bfloat16"):
            raise ConfigError(f"train.dtype must be auto, float32 or bfloat16, got {self.dtype!r}")
        if self.implementation not in (None, "chunked", "recurrent", "pallas"):
            raise ConfigError(
                f"train.implementation must be chunked, recurrent, pallas or null, got {self.implementation!r}"
            )


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every_steps: int = _doc("save a checkpoint every this many updates (0 = only at the end)", 500)
    keep: int = _doc("checkpoints kept on disk (oldest removed first)", 2)
    async_save: bool = _doc("write checkpoints in a background thread while training goes on", True)

    def check(self) -> None:
        _at_least(self, "checkpoint", ("every_steps",), 0)
        _at_least(self, "checkpoint", ("keep",), 1)


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    data: int = _doc("data-parallel axis size (-1 = the devices left over)", 1)
    fsdp: int = _doc("parameter-sharding axis size (-1 = the devices left over)", 1)
    tensor: int = _doc("tensor-parallel axis size (-1 = the devices left over)", 1)

    def check(self) -> None:
        axes = {name: getattr(self, name) for name in ("data", "fsdp", "tensor")}
        for name, size in axes.items():
            if size != -1 and size < 1:
                raise ConfigError(f"mesh.{name} must be -1 or >= 1, got {size}")
        if sum(size == -1 for size in axes.values()) > 1:
            raise ConfigError("at most one of mesh.data, mesh.fsdp, mesh.tensor may be -1")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    corpus: str = _doc("embedded corpus name (tinyshakespeare) or path to a UTF-8 text file; used when "
                       "data.path is empty", "tinyshakespeare")
    tokenizer: str = _doc("byte, or path to a Hugging Face tokenizer.json (for data.path: the one the "
                          "dataset was prepared with)", "byte")
    path: str = _doc("directory written by experiments.prepare_data (ArrayRecord shards of documents, packed "
                     "into rows with segment ids); empty = train on data.corpus", "")
    shuffle: bool = _doc("shuffle the documents of data.path, a new order every pass", True)
    prefetch_threads: int = _doc("threads preparing training batches ahead (0 = in the training loop)", 0)
    workers: int = _doc("processes preparing training batches ahead (0 = none); with data.path the batches "
                        "depend on this number; a run resumes only with the number it saved with", 0)

    def check(self) -> None:
        if not self.corpus:
            raise ConfigError("data.corpus must not be empty")
        if not self.tokenizer:
            raise ConfigError("data.tokenizer must be 'byte' or a path to a tokenizer.json, got ''")
        _at_least(self, "data", ("prefetch_threads", "workers"), 0)


def _at_least(obj: Any, section: str, names: tuple[str, ...], low: float) -> None:
    for name in names:
        if getattr(obj, name) < low:
            raise ConfigError(f"{section}.{name} must be >= {low}, got {getattr(obj, name)}")


SECTIONS: dict[str, type] = {
    "model": DeltaNetConfig,
    "train": TrainConfig,
    "checkpoint": CheckpointConfig,
    "mesh": MeshConfig,
    "data": DataConfig,
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """A whole run: the model and how to train it."""

    model: DeltaNetConfig
    train: TrainConfig
    checkpoint: CheckpointConfig
    mesh: MeshConfig
    data: DataConfig

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "RunConfig":
        """Build and check a config from nested dicts; missing sections/fields take defaults."""
        if not isinstance(raw, dict):
            raise ConfigError(f"a config must be a JSON object of sections, got {type(raw).__name__}")
        unknown = sorted(set(raw) - set(SECTIONS))
        if unknown:
            raise ConfigError(f"unknown config section {unknown[0]!r} (sections: {', '.join(SECTIONS)})")
        built = {}
        for section, section_cls in SECTIONS.items():
            values = raw.get(section, {})
            if not isinstance(values, dict):
                raise ConfigError(f"config section {section!r} must be an object, got {type(values).__name__}")
            built[section] = _build_section(section, section_cls, values)
        if built["model"].vocab_size < ByteTokenizer.vocab_size:
            raise ConfigError(
                f"model.vocab_size must be >= {ByteTokenizer.vocab_size} for the byte-level corpus, "
                f"got {built['model'].vocab_size}"
            )
        return cls(**built)

    def to_dict(self) -> dict[str, Any]:
        out = {"model": self.model.to_dict()}
        for section in ("train", "checkpoint", "mesh", "data"):
            out[section] = dataclasses.asdict(getattr(self, section))
        return out


def _build_section(section: str, section_cls: type, values: dict[str, Any]) -> Any:
    hints = field_types(section_cls)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"unknown config key {section}.{key}")
        _check_type(f"{section}.{key}", value, hints[key])
    if section == "model":
        try:
            return DeltaNetConfig.from_dict(dict(values))
        except (ValueError, TypeError) as err:
            raise ConfigError(f"model config: {err}") from err
    coerced = {k: float(v) if hints[k] is float else v for k, v in values.items()}
    obj = section_cls(**coerced)
    obj.check()
    return obj


def field_types(section_cls: type) -> dict[str, Any]:
    """Field name -> resolved type annotation of a config dataclass."""
    hints = typing.get_type_hints(section_cls)
    return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(section_cls) if f.init}


def _optional_inner(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)):
            return True, args[0] if len(args) == 1 else Union[tuple(args)]
    return False, tp


def _check_type(key: str, value: Any, tp: Any) -> None:
    """Raise ConfigError unless `value` (as read from JSON) fits annotation `tp`."""
    optional, inner = _optional_inner(tp)
    if value is None:
        if optional or tp is Any:
            return
        raise ConfigError(f"{key} must not be null")
    base = typing.get_origin(inner) or inner
    ok = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
        dict: lambda v: isinstance(v, dict),
        list: lambda v: isinstance(v, (list, tuple)),
        tuple: lambda v: isinstance(v, (list, tuple)),
    }.get(base)
    if ok is not None and not ok(value):
        raise ConfigError(f"{key} must be of type {_type_name(tp)}, got {value!r}")


def _type_name(tp: Any) -> str:
    optional, inner = _optional_inner(tp)
    name = getattr(inner, "__name__", None) or str(inner).replace("typing.", "")
    return f"{name} or null" if optional else name


def parse_value(key: str, text: str, tp: Any) -> Any:
    """Parse the text of an override `key=text` into a value of annotation `tp`."""
    optional, inner = _optional_inner(tp)
    if optional and text.lower() in ("none", "null"):
        return None
    base = typing.get_origin(inner) or inner
    try:
        if base is bool:
            lowered = text.lower()
            if lowered not in ("true", "false", "1", "0"):
                raise ValueError(text)
            return lowered in ("true", "1")
        if base is int:
            return int(text)
        if base is float:
            return float(text)
        if base is str:
            return text
        return json.loads(text)
    except ValueError:
        raise ConfigError(f"{key} must be of type {_type_name(tp)}, got {text!r}") from None


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Copy of nested config dict `raw` with `section.field=value` overrides applied (values typed)."""
    out = {section: dict(values) for section, values in raw.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not name:
            raise ConfigError(f"override {item!r} is not of the form section.field=value")
        if section not in SECTIONS:
            raise ConfigError(f"unknown config section {section!r} in override {item!r}")
        hints = field_types(SECTIONS[section])
        if name not in hints:
            raise ConfigError(f"unknown config key {section}.{name}")
        out.setdefault(section, {})[name] = parse_value(f"{section}.{name}", text.strip(), hints[name])
    return out


def override_help() -> list[tuple[str, str, str]]:
    """(key, type, description) for every overridable key, in section order."""
    rows = []
    for section, section_cls in SECTIONS.items():
        by_name = {f.name: f for f in dataclasses.fields(section_cls)}
        for name, tp in field_types(section_cls).items():
            text = by_name[name].metadata.get("help", "")
            rows.append((f"{section}.{name}", _type_name(tp), text))
    return rows
