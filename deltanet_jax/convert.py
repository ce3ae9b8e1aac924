"""Import and export of fla (flash-linear-attention) `DeltaNetForCausalLM` checkpoints.

An fla / Hugging Face checkpoint directory holds `config.json` (fla's `DeltaNetConfig`,
`model_type` "delta_net") and the weights in `model.safetensors`, or in shards
`model-0000i-of-0000n.safetensors` listed by `model.safetensors.index.json`. Tensors are read
and written with the `safetensors` package's NumPy API (bfloat16 through `ml_dtypes`); torch
is never imported.

Config: fla's field names are ours (see `DeltaNetConfig`), so `config.json` maps key by key.
Generic transformers keys (`architectures`, `torch_dtype`, `transformers_version`, ...) are
ignored; keys known to neither are ignored and listed in `FlaImport.ignored_config_keys`. fla
settings the model cannot express (`attnres_block_size` other than null, several `attn`
specifications, `hidden_act` other than "swish") are refused. `mixer="linear"` models have no
fla counterpart and are not exported.

Tensor names (layer i; D hidden, V vocab, Dk = D * expand_k, Dv = D * expand_v, H heads,
W conv_size, F MLP intermediate size, Dkv = attn num_kv_heads * D / attn num_heads). Our
linear kernels are [in, out], torch's `nn.Linear.weight` is [out, in]: those are transposed.

| our NNX parameter path                          | fla safetensors name                           | fla shape   | how        |
|-------------------------------------------------|------------------------------------------------|-------------|------------|
| model.embeddings.embedding                      | model.embeddings.weight                        | [V, D]      | as is      |
| model.layers.i.attn_norm.weight                 | model.layers.i.attn_norm.weight                | [D]         | as is      |
| DeltaNet layers:                                |                                                |             |            |
| model.layers.i.attn.q_proj.kernel  [D, Dk]      | model.layers.i.attn.q_proj.weight              | [Dk, D]     | transposed |
| model.layers.i.attn.k_proj.kernel  [D, Dk]      | model.layers.i.attn.k_proj.weight              | [Dk, D]     | transposed |
| model.layers.i.attn.v_proj.kernel  [D, Dv]      | model.layers.i.attn.v_proj.weight              | [Dv, D]     | transposed |
| model.layers.i.attn.b_proj.kernel  [D, H]       | model.layers.i.attn.b_proj.weight (use_beta)   | [H, D]      | transposed |
| model.layers.i.attn.{q,k}_conv1d.weight         | model.layers.i.attn.{q,k}_conv1d.weight        | [Dk, 1, W]  | as is      |
| model.layers.i.attn.v_conv1d.weight             | model.layers.i.attn.v_conv1d.weight            | [Dv, 1, W]  | as is      |
| model.layers.i.attn.g_proj.kernel  [D, Dv]      | model.layers.i.attn.g_proj.weight (use_gate)   | [Dv, D]     | transposed |
| model.layers.i.attn.o_norm.weight               | model.layers.i.attn.o_norm.weight              | [Dv / H]    | as is      |
| model.layers.i.attn.o_proj.kernel  [Dv, D]      | model.layers.i.attn.o_proj.weight              | [D, Dv]     | transposed |
| attention layers (listed in attn.layers):       |                                                |             |            |
| model.layers.i.attn.q_proj.kernel  [D, D]       | model.layers.i.attn.q_proj.weight              | [D, D]      | transposed |
| model.layers.i.attn.{k,v}_proj.kernel [D, Dkv]  | model.layers.i.attn.{k,v}_proj.weight          | [Dkv, D]    | transposed |
| model.layers.i.attn.{q,k,v}_proj.bias           | model.layers.i.attn.{q,k,v}_proj.bias (qkv_bias) | [D] / [Dkv] | as is    |
| model.layers.i.attn.o_proj.kernel  [D, D]       | model.layers.i.attn.o_proj.weight              | [D, D]      | transposed |
| model.layers.i.mlp_norm.weight                  | model.layers.i.mlp_norm.weight                 | [D]         | as is      |
| model.layers.i.mlp.{gate,up}_proj.kernel [D, F] | model.layers.i.mlp.{gate,up}_proj.weight       | [F, D]      | transposed |
| model.layers.i.mlp.down_proj.kernel [F, D]      | model.layers.i.mlp.down_proj.weight            | [D, F]      | transposed |
| model.norm.weight                               | model.norm.weight                              | [D]         | as is      |
| lm_head.kernel [D, V] (untied only)             | lm_head.weight (absent when tied)              | [V, D]      | transposed |

With `tie_word_embeddings` the head is the embedding matrix; an `lm_head.weight` in the file is
accepted only if it equals `model.embeddings.weight`. Imported parameters are float32 (bf16 and
fp16 tensors widen exactly); export writes float32 or bfloat16.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MODEL_TYPE = "delta_net"
ARCHITECTURE = "DeltaNetForCausalLM"
EXPORT_DTYPES = ("float32", "bfloat16")

# config.json keys an fla checkpoint must carry (the others take fla's defaults, which are ours).
REQUIRED_CONFIG_KEYS = ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_heads")
# fla config keys without a counterpart here: accepted only with the value that leaves the model as ours.
NEUTRAL_FLA_KEYS = {"attnres_block_size": None}
# DeltaNetConfig fields fla's config does not have (their defaults are fla's models).
NOT_FLA_FIELDS = ("mixer", "use_mlp")
# transformers' generic config keys: bookkeeping, no effect on the forward pass.
TRANSFORMERS_KEYS = frozenset({
    "architectures", "torch_dtype", "dtype", "transformers_version", "_name_or_path", "name_or_path",
    "auto_map", "output_attentions", "output_hidden_states", "return_dict", "use_return_dict",
    "chunk_size_feed_forward", "is_encoder_decoder", "is_decoder", "add_cross_attention",
    "cross_attention_hidden_size", "tie_encoder_decoder", "id2label", "label2id", "num_labels",
    "problem_type", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "pruned_heads", "torchscript", "elementwise_affine",
    "_attn_implementation_autoset", "_commit_hash", "model_type",
})
_SHARD_NAME = re.compile(r"^[A-Za-z0-9_.\-]+\.safetensors$")
_FLOAT_CODES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16}

Progress = Callable[[int, int, str], None]  # (done, total, tensor name)


# ---- config -------------------------------------------------------------------------------------

def config_from_fla(raw: Mapping[str, Any], *, source: str = CONFIG_FILE) -> tuple[DeltaNetConfig, list[str]]:
    """fla's config.json dict -> (DeltaNetConfig, config keys ignored as unknown).

    ValueError naming the key (and `source`) for an unknown model_type, a missing required key,
    a value the model cannot express, or any value DeltaNetConfig refuses.
    """
    if not isinstance(raw, Mapping):
        raise ValueError(f"{source} must hold a JSON object, got {type(raw).__name__}")
    for key in REQUIRED_CONFIG_KEYS:
        if key not in raw:
            raise ValueError(f"{source} has no {key!r}: not an fla DeltaNet config")
    if raw["model_type"] != MODEL_TYPE:
        raise ValueError(f"{source}: model_type {raw['model_type']!r} is not {MODEL_TYPE!r} "
                         f"(only fla's DeltaNetForCausalLM converts)")
    fields = {f.name for f in dataclasses.fields(DeltaNetConfig)} - set(NOT_FLA_FIELDS)
    values: dict[str, Any] = {}
    ignored = []
    for key, value in raw.items():
        if key in NEUTRAL_FLA_KEYS:
            if value != NEUTRAL_FLA_KEYS[key]:
                raise ValueError(f"{source}: {key}={value!r} is not supported (only {NEUTRAL_FLA_KEYS[key]!r})")
        elif key in fields:
            values[key] = value
        elif key not in TRANSFORMERS_KEYS:
            ignored.append(key)
    if "attn" in values:
        values["attn"] = _attn_from_fla(values["attn"], source)
    try:
        return DeltaNetConfig.from_dict(values), sorted(ignored)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{source}: {err}") from err


def _attn_from_fla(attn: Any, source: str) -> Any:
    """fla's `attn` (a dict, a list of one dict, or null) -> our dict form."""
    if isinstance(attn, list):
        if len(attn) != 1:
            raise ValueError(f"{source}: config.attn lists {len(attn)} attention specifications; "
                             f"only one (a single dict) is supported")
        attn = attn[0]
    if isinstance(attn, Mapping):
        attn = dict(attn)
        if attn.get("num_kv_heads", 0) is None:  # fla reads null as "as many as num_heads"
            attn["num_kv_heads"] = attn.get("num_heads")
    return attn


def config_to_fla(config: DeltaNetConfig, *, dtype: str = "float32") -> dict[str, Any]:
    """DeltaNetConfig -> fla's config.json dict (fla's fields plus model_type and architectures)."""
    if config.mixer != "delta":
        raise ValueError(f"config.mixer={config.mixer!r} has no fla DeltaNetForCausalLM counterpart; "
                         f"only mixer='delta' models export")
    if not config.use_mlp:
        raise ValueError("config.use_mlp=False has no fla DeltaNetForCausalLM counterpart (its blocks always "
                         "have an MLP); only models with MLPs export")
    fields = config.to_dict()
    for name in NOT_FLA_FIELDS:
        del fields[name]
    return {"model_type": MODEL_TYPE, "architectures": [ARCHITECTURE], **fields,
            "torch_dtype": dtype, "dtype": dtype}


# ---- parameter names ----------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class ParamSpec:
    """Where an fla tensor goes: our parameter `path`, its shape in fla's layout, transposed or not."""

    path: tuple[Any, ...]
    fla_shape: tuple[int, ...]
    transpose: bool


def _abstract_model(config: DeltaNetConfig) -> DeltaNetForCausalLM:
    return nnx.eval_shape(lambda: DeltaNetForCausalLM(config, rngs=nnx.Rngs(0)))


def fla_parameter_specs(config: DeltaNetConfig) -> dict[str, ParamSpec]:
    """fla tensor name -> ParamSpec for every parameter of the model of `config` (see the table)."""
    params = nnx.state(_abstract_model(config), nnx.Param)
    specs = {}
    for path, var in nnx.to_flat_state(params):
        shape = tuple(var.get_value().shape)
        leaf, owner = path[-1], ".".join(str(p) for p in path[:-1])
        if leaf == "kernel":
            name, spec = f"{owner}.weight", ParamSpec(tuple(path), shape[::-1], True)
        elif leaf == "embedding":
            name, spec = f"{owner}.weight", ParamSpec(tuple(path), shape, False)
        elif leaf in ("weight", "bias"):
            name, spec = f"{owner}.{leaf}", ParamSpec(tuple(path), shape, False)
        else:
            raise ValueError(f"parameter {'.'.join(map(str, path))} has no fla name rule")
        if name in specs:
            raise ValueError(f"two parameters map to the fla name {name}")
        specs[name] = spec
    return specs


# ---- reading safetensors ------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str  # safetensors code: F32, BF16, ...
    shape: tuple[int, ...]


def _safe_open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="np")
    except Exception as err:  # safetensors raises its own error types for corrupt headers
        raise ValueError(f"{path} is not a readable safetensors file: {err}") from err


def _file_tensors(path: Path) -> dict[str, TensorInfo]:
    out = {}
    with _safe_open(path) as f:
        for name in f.keys():
            sl = f.get_slice(name)
            out[name] = TensorInfo(path, sl.get_dtype(), tuple(int(n) for n in sl.get_shape()))
    return out


def _read_index(directory: Path) -> dict[str, str]:
    path = directory / INDEX_FILE
    try:
        index = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not a readable JSON index: {err}") from err
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{path} has no 'weight_map' object of tensor name -> shard file")
    for name, file in weight_map.items():
        if not isinstance(file, str) or not _SHARD_NAME.match(file):
            raise ValueError(f"{path}: weight_map[{name!r}] = {file!r} is not a safetensors file name "
                             f"in the same directory")
    return weight_map


def fla_tensor_infos(directory: Path) -> dict[str, TensorInfo]:
    """Name -> (file, dtype, shape) of every tensor of the checkpoint in `directory` (no data read).

    Uses model.safetensors when present, else the shards of model.safetensors.index.json.
    ValueError naming the file for a missing file or shard, a bad index, or an unreadable file.
    """
    directory = Path(directory)
    single = directory / WEIGHTS_FILE
    if single.is_file():
        return _file_tensors(single)
    if not (directory / INDEX_FILE).is_file():
        raise ValueError(f"{directory} has neither {WEIGHTS_FILE} nor {INDEX_FILE}")
    weight_map = _read_index(directory)
    missing = sorted({f for f in weight_map.values() if not (directory / f).is_file()})
    if missing:
        raise ValueError(f"shard file(s) listed in {directory / INDEX_FILE} are missing: {', '.join(missing)}")
    infos: dict[str, TensorInfo] = {}
    for file in sorted(set(weight_map.values())):
        for name, info in _file_tensors(directory / file).items():
            if name in infos:
                raise ValueError(f"tensor {name} is stored twice: in {infos[name].file.name} and {file}")
            infos[name] = info
    for name, file in weight_map.items():
        if name not in infos or infos[name].file.name != file:
            raise ValueError(f"{directory / INDEX_FILE} puts tensor {name} in {file}, which does not hold it")
    unlisted = sorted(set(infos) - set(weight_map))
    if unlisted:
        raise ValueError(f"shards hold tensor(s) not listed in {directory / INDEX_FILE}: {', '.join(unlisted[:5])}")
    return infos


def check_fla_tensors(config: DeltaNetConfig, infos: Mapping[str, TensorInfo]) -> dict[str, ParamSpec]:
    """Check names, shapes and dtypes of `infos` against the model of `config`; return the specs.

    ValueError naming the tensors that are missing, unexpected, of the wrong shape or not float.
    """
    specs = fla_parameter_specs(config)
    expected = set(specs)
    extra = set(infos) - expected
    if config.tie_word_embeddings:
        extra.discard("lm_head.weight")  # saved by some tools even when tied; checked for equality later
    missing = sorted(expected - set(infos))
    if missing:
        raise ValueError(f"checkpoint lacks {len(missing)} tensor(s) the config needs: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    if extra:
        extra = sorted(extra)
        raise ValueError(f"checkpoint holds {len(extra)} tensor(s) the config does not use: {', '.join(extra[:8])}"
                         + (" ..." if len(extra) > 8 else ""))
    for name, info in infos.items():
        if info.dtype not in _FLOAT_CODES:
            raise ValueError(f"tensor {name} in {info.file.name} has dtype {info.dtype}; expected a float type "
                             f"({', '.join(_FLOAT_CODES)})")
        want = specs[name].fla_shape if name in specs else specs["model.embeddings.weight"].fla_shape
        if info.shape != want:
            raise ValueError(f"tensor {name} in {info.file.name} has shape {list(info.shape)}, "
                             f"the config needs {list(want)}")
    return specs


class _FileReader:
    """Tensors of one safetensors file as NumPy arrays.

    Older safetensors releases cannot hand bfloat16 to NumPy; for those the file's raw bytes are
    decoded once (`safetensors.deserialize`) and viewed as `ml_dtypes.bfloat16`.
    """

    def __init__(self, f, path: Path):
        self._f, self._path, self._raw = f, path, None

    def get(self, name: str, dtype: str) -> np.ndarray:
        if self._raw is None:
            try:
                return self._f.get_tensor(name)
            except Exception:
                if dtype != "BF16":
                    raise
            from safetensors import deserialize

            self._raw = dict(deserialize(self._path.read_bytes()))
        view = self._raw[name]
        return np.frombuffer(view["data"], dtype=_FLOAT_CODES[view["dtype"]]).reshape(view["shape"])


# ---- import -------------------------------------------------------------------------------------

@dataclasses.dataclass
class FlaImport:
    model: DeltaNetForCausalLM
    config: DeltaNetConfig
    ignored_config_keys: list[str]
    source_dtypes: list[str]  # safetensors dtype codes found in the checkpoint


def read_fla_config(directory: Path) -> tuple[DeltaNetConfig, list[str]]:
    """The DeltaNetConfig of `directory/config.json` and the keys it ignored (see `config_from_fla`)."""
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise ValueError(f"{Path(directory)} has no {CONFIG_FILE}")
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    return config_from_fla(raw, source=str(path))


def read_fla_params(directory: Path, config: DeltaNetConfig, *,
                    progress: Progress | None = None) -> tuple[dict[tuple[Any, ...], np.ndarray], list[str]]:
    """Every parameter of `directory`'s checkpoint as float32 in our layout: (path -> array, dtypes).

    Checks all names, shapes and dtypes (`check_fla_tensors`) before reading any data.
    """
    directory = Path(directory)
    infos = fla_tensor_infos(directory)
    specs = check_fla_tensors(config, infos)
    by_file: dict[Path, list[str]] = {}
    for name, info in infos.items():
        by_file.setdefault(info.file, []).append(name)
    params: dict[tuple[Any, ...], np.ndarray] = {}
    tied_head = None
    done, total = 0, len(infos)
    for file, names in sorted(by_file.items()):
        with _safe_open(file) as f:
            reader = _FileReader(f, file)
            for name in sorted(names):
                arr = np.asarray(reader.get(name, infos[name].dtype), dtype=np.float32)
                if name in specs:
                    spec = specs[name]
                    params[spec.path] = np.ascontiguousarray(arr.T) if spec.transpose else arr
                else:
                    tied_head = arr
                done += 1
                if progress is not None:
                    progress(done, total, name)
    if tied_head is not None and not np.array_equal(tied_head, params[specs["model.embeddings.weight"].path]):
        raise ValueError("lm_head.weight differs from model.embeddings.weight, but config.tie_word_embeddings "
                         "is true: the checkpoint's head would be dropped")
    return params, sorted({info.dtype for info in infos.values()})


def model_from_params(config: DeltaNetConfig, params: Mapping[tuple[Any, ...], np.ndarray], *,
                      dtype: jnp.dtype = jnp.float32, implementation: str | None = None) -> DeltaNetForCausalLM:
    """A DeltaNetForCausalLM of `config` holding `params` (path -> array, our layout; float32 kept)."""
    abstract = nnx.eval_shape(lambda: DeltaNetForCausalLM(config, rngs=nnx.Rngs(0), dtype=dtype,
                                                          implementation=implementation))
    graphdef, state, other = nnx.split(abstract, nnx.Param, ...)
    if jax.tree.leaves(other):
        raise ValueError("the model holds non-parameter state; model_from_params cannot fill it")
    flat = nnx.to_flat_state(state)
    want = {tuple(path): var.get_value() for path, var in flat}
    if set(want) != set(params):
        missing = sorted(".".join(map(str, p)) for p in set(want) - set(params))
        extra = sorted(".".join(map(str, p)) for p in set(params) - set(want))
        raise ValueError(f"parameters do not fit the model: missing {missing[:5]}, unexpected {extra[:5]}")
    pure: dict[Any, Any] = {}
    for path, sds in want.items():
        arr = params[path]
        if tuple(arr.shape) != tuple(sds.shape):
            raise ValueError(f"parameter {'.'.join(map(str, path))} has shape {arr.shape}, the model needs {sds.shape}")
        node = pure
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = jnp.asarray(arr, dtype=sds.dtype)
    nnx.replace_by_pure_dict(state, pure)
    return nnx.merge(graphdef, state, other)


def load_fla_checkpoint(directory: Path, *, dtype: jnp.dtype = jnp.float32, implementation: str | None = None,
                        progress: Progress | None = None) -> FlaImport:
    """Read an fla DeltaNetForCausalLM checkpoint directory into our model (float32 parameters).

    `dtype` is the compute dtype, `implementation` the delta-rule kernel. ValueError naming the
    key, tensor or file for anything that does not fit; nothing is written anywhere.
    """
    config, ignored = read_fla_config(directory)
    params, dtypes = read_fla_params(directory, config, progress=progress)
    model = model_from_params(config, params, dtype=dtype, implementation=implementation)
    return FlaImport(model=model, config=config, ignored_config_keys=ignored, source_dtypes=dtypes)


# ---- export -------------------------------------------------------------------------------------

def fla_tensors(model: DeltaNetForCausalLM, *, dtype: str = "float32") -> dict[str, np.ndarray]:
    """The model's parameters under fla's names and layouts, as `dtype` (float32 or bfloat16) NumPy arrays."""
    if dtype not in EXPORT_DTYPES:
        raise ValueError(f"export dtype must be one of {list(EXPORT_DTYPES)}, got {dtype!r}")
    np_dtype = np.float32 if dtype == "float32" else ml_dtypes.bfloat16
    specs = fla_parameter_specs(model.config)
    values = {tuple(path): var.get_value() for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    out = {}
    for name, spec in specs.items():
        arr = np.asarray(jax.device_get(values[spec.path]), dtype=np.float32)
        arr = arr.T if spec.transpose else arr
        if tuple(arr.shape) != spec.fla_shape:
            raise ValueError(f"parameter {name} has shape {arr.shape}, expected {spec.fla_shape}")
        out[name] = np.ascontiguousarray(arr.astype(np_dtype))
    return out


def _shards(tensors: Mapping[str, np.ndarray], max_shard_bytes: int | None) -> list[list[str]]:
    names = list(tensors)
    if max_shard_bytes is None or sum(t.nbytes for t in tensors.values()) <= max_shard_bytes:
        return [names]
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = tensors[name].nbytes
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _save_file(tensors: Mapping[str, np.ndarray], path: Path) -> None:
    from safetensors.numpy import save_file

    try:
        save_file(dict(tensors), str(path), metadata={"format": "pt"})
    except Exception as err:
        if any(t.dtype == ml_dtypes.bfloat16 for t in tensors.values()):
            raise ValueError(f"this safetensors release cannot write bfloat16 NumPy arrays ({err}); "
                             f"upgrade safetensors or export float32") from err
        raise


def save_fla_checkpoint(model: DeltaNetForCausalLM, directory: Path, *, dtype: str = "float32",
                        max_shard_bytes: int | None = None, progress: Progress | None = None,
                        extra_files: Mapping[str, Path] | None = None) -> list[Path]:
    """Write `model` as an fla checkpoint directory: config.json + model.safetensors (or shards + index).

    Shards of at most `max_shard_bytes` (a tensor larger than that gets a shard of its own) when
    the weights exceed it. `extra_files` (name -> source path) are copied in too, e.g. a
    tokenizer.json. Everything is written in a temporary directory beside `directory` and renamed
    into place; `directory` must not exist or be empty. Returns the files written.
    """
    directory = Path(directory)
    if directory.exists() and (not directory.is_dir() or any(directory.iterdir())):
        raise ValueError(f"{directory} exists and is not empty; choose a new directory")
    if max_shard_bytes is not None and max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    for name, src in (extra_files or {}).items():
        if not Path(src).is_file():
            raise ValueError(f"extra file {src} (for {name}) does not exist")
    fla_config = config_to_fla(model.config, dtype=dtype)
    tensors = fla_tensors(model, dtype=dtype)
    shards = _shards(tensors, max_shard_bytes)
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.", suffix=".tmp", dir=directory.parent))
    try:
        (tmp / CONFIG_FILE).write_text(json.dumps(fla_config, indent=2) + "\n")
        files = [CONFIG_FILE]
        done, total = 0, len(tensors)
        if len(shards) == 1:
            file_names = [WEIGHTS_FILE]
        else:
            file_names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {}
        for file, names in zip(file_names, shards):
            _save_file({n: tensors[n] for n in names}, tmp / file)
            files.append(file)
            for n in names:
                weight_map[n] = file
                done += 1
                if progress is not None:
                    progress(done, total, n)
        if len(shards) > 1:
            index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))},
                     "weight_map": dict(sorted(weight_map.items()))}
            (tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
            files.append(INDEX_FILE)
        for name, src in (extra_files or {}).items():
            shutil.copyfile(src, tmp / name)
            files.append(name)
        _default_permissions(tmp)
        if directory.exists():
            directory.rmdir()  # empty (checked above)
        os.rename(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return [directory / f for f in files]


def _default_permissions(directory: Path) -> None:
    """Give `directory` (made private by mkdtemp) and its files the modes the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    directory.chmod(0o777 & ~umask)
    for path in directory.iterdir():
        path.chmod(0o666 & ~umask)


def parse_size(text: str) -> int:
    """'5GB', '500MB', '2GiB', '1024' -> bytes (decimal units for kB/MB/GB, binary for KiB/MiB/GiB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]i?B|B)?\s*", text, flags=re.IGNORECASE)
    if not m:
        raise ValueError(f"size {text!r} is not a number with an optional unit (B, KB, MB, GB, KiB, MiB, GiB)")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
             "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}[unit]
    value = int(math.floor(float(m.group(1)) * scale))
    if value <= 0:
        raise ValueError(f"size {text!r} must be positive")
    return value
