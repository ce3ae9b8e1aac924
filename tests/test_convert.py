"""fla checkpoint import/export: exact round trips, fla's names and shapes, shards, the config
mapping, the CLI, and refusals of bad input (nothing written)."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from deltanet_jax import convert
from deltanet_jax.convert import config_from_fla, config_to_fla, load_fla_checkpoint, save_fla_checkpoint
from deltanet_jax.model import DeltaNetConfig, DeltaNetForCausalLM

TINY = dict(vocab_size=256, hidden_size=32, num_hidden_layers=4, num_heads=4, intermediate_size=48)
ATTN = dict(num_heads=4, num_kv_heads=2)
VARIANTS = {
    "deltanet": {},
    "swa-hybrid": dict(attn={"layers": [1, 3], "window_size": 8, **ATTN}),  # sliding every other layer
    "global-hybrid": dict(attn={"layers": [1, 2], "rope_theta": 500.0, "qkv_bias": True, **ATTN}),  # 2nd, N/2+1-th
    "gate": dict(use_gate=True),
    "neg-eigval": dict(allow_neg_eigval=True, expand_v=2.0),
    "tied": dict(tie_word_embeddings=True, use_gate=True, attn={"layers": [0], **ATTN}),
}


@pytest.fixture(autouse=True)
def _full_precision_matmuls():
    with jax.default_matmul_precision("highest"):
        yield


def _model(name, seed=0, **extra):
    """A model of variant `name` with distinct random parameters (norm weights are ones at init).

    Built from the abstract shapes (no initialiser runs, which keeps the tests fast on a CPU).
    """
    cfg = DeltaNetConfig(**{**TINY, **VARIANTS[name], **extra})
    abstract = nnx.eval_shape(lambda: DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(seed)
    params = {tuple(path): rng.standard_normal(var.get_value().shape, dtype=np.float32) * 0.5
              for path, var in nnx.to_flat_state(nnx.state(abstract, nnx.Param))}
    return convert.model_from_params(cfg, params)


def _params(model):
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def fla_names(cfg: DeltaNetConfig) -> dict[str, tuple[int, ...]]:
    """The tensor names and shapes fla's DeltaNetForCausalLM saves, written out from fla's modules."""
    d, v, h, w = cfg.hidden_size, cfg.vocab_size, cfg.num_heads, cfg.conv_size
    dk, dv, f = int(d * cfg.expand_k), int(d * cfg.expand_v), cfg.mlp_intermediate_size
    out = {"model.embeddings.weight": (v, d), "model.norm.weight": (d,)}
    if not cfg.tie_word_embeddings:
        out["lm_head.weight"] = (v, d)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        out.update({p + "attn_norm.weight": (d,), p + "mlp_norm.weight": (d,), p + "mlp.gate_proj.weight": (f, d),
                    p + "mlp.up_proj.weight": (f, d), p + "mlp.down_proj.weight": (d, f)})
        if cfg.attn is not None and i in cfg.attn["layers"]:
            dkv = cfg.attn["num_kv_heads"] * (d // cfg.attn["num_heads"])
            out.update({p + "attn.q_proj.weight": (d, d), p + "attn.k_proj.weight": (dkv, d),
                        p + "attn.v_proj.weight": (dkv, d), p + "attn.o_proj.weight": (d, d)})
            if cfg.attn["qkv_bias"]:
                out.update({p + "attn.q_proj.bias": (d,), p + "attn.k_proj.bias": (dkv,),
                            p + "attn.v_proj.bias": (dkv,)})
            continue
        out.update({p + "attn.q_proj.weight": (dk, d), p + "attn.k_proj.weight": (dk, d),
                    p + "attn.v_proj.weight": (dv, d), p + "attn.b_proj.weight": (h, d),
                    p + "attn.q_conv1d.weight": (dk, 1, w), p + "attn.k_conv1d.weight": (dk, 1, w),
                    p + "attn.v_conv1d.weight": (dv, 1, w), p + "attn.o_norm.weight": (dv // h,),
                    p + "attn.o_proj.weight": (d, dv)})
        if cfg.use_gate:
            out[p + "attn.g_proj.weight"] = (dv, d)
    return out


def _file_tensors(directory: Path) -> dict[str, np.ndarray]:
    out = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), framework="np") as f:
            for k in f.keys():
                out[k] = f.get_tensor(k)
    return out


def _nothing_left(parent: Path, *names: str):
    """No target and no temporary directory beside it."""
    for name in names:
        assert not (parent / name).exists(), f"{name} was written"
    assert not [p.name for p in parent.iterdir() if p.name.endswith(".tmp")], "a temporary directory was left"


# ---- round trips ----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VARIANTS))
def test_export_import_round_trip_is_exact(name, tmp_path):
    model = _model(name)
    files = save_fla_checkpoint(model, tmp_path / "fla")
    assert sorted(f.name for f in files) == ["config.json", "model.safetensors"]
    stored = _file_tensors(tmp_path / "fla")
    assert {k: tuple(a.shape) for k, a in stored.items()} == fla_names(model.config)
    assert all(a.dtype == np.float32 for a in stored.values())
    # Linear weights are stored [out, in]: the transpose of our kernel.
    np.testing.assert_array_equal(stored["model.layers.0.mlp.down_proj.weight"],
                                  np.asarray(model.model.layers[0].mlp.down_proj.kernel.get_value()).T)

    back = load_fla_checkpoint(tmp_path / "fla")
    assert back.config == model.config
    assert back.ignored_config_keys == [] and back.source_dtypes == ["F32"]
    want, got = _params(model), _params(back.model)
    assert want.keys() == got.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_bfloat16_export_rounds_once(tmp_path):
    model = _model("gate")
    save_fla_checkpoint(model, tmp_path / "fla", dtype="bfloat16")
    cfg = json.loads((tmp_path / "fla" / "config.json").read_text())
    assert cfg["torch_dtype"] == "bfloat16"
    with safe_open(str(tmp_path / "fla" / "model.safetensors"), framework="np") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    back = load_fla_checkpoint(tmp_path / "fla")
    assert back.source_dtypes == ["BF16"]
    want, got = _params(model), _params(back.model)
    for key in want:
        assert got[key].dtype == np.float32
        np.testing.assert_array_equal(got[key], want[key].astype(ml_dtypes.bfloat16).astype(np.float32), err_msg=key)


def test_sharded_export_and_import(tmp_path):
    model = _model("swa-hybrid")
    files = save_fla_checkpoint(model, tmp_path / "fla", max_shard_bytes=40_000)
    names = sorted(f.name for f in files)
    shards = [n for n in names if n.startswith("model-")]
    assert len(shards) > 2 and "model.safetensors.index.json" in names and "model.safetensors" not in names
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((tmp_path / "fla" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(fla_names(model.config))
    assert set(index["weight_map"].values()) == set(shards)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in _file_tensors(tmp_path / "fla").values())
    back = load_fla_checkpoint(tmp_path / "fla")
    want, got = _params(model), _params(back.model)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---- the config mapping ----------------------------------------------------------------------------

FLA_CONFIG = {  # as fla 0.6.0's DeltaNetConfig.save_pretrained writes it (a global hybrid)
    "allow_neg_eigval": True, "architectures": ["DeltaNetForCausalLM"],
    "attn": {"layers": [1, 2], "num_heads": 4, "num_kv_heads": 2, "qkv_bias": False, "rope_theta": 10000.0,
             "window_size": None},
    "attn_mode": "chunk", "attnres_block_size": None, "bos_token_id": 1, "conv_size": 4, "dtype": "float32",
    "eos_token_id": 2, "expand_k": 1.0, "expand_v": 1.0, "fuse_cross_entropy": True,
    "fuse_linear_cross_entropy": False, "fuse_norm": True, "fuse_swiglu": True, "hidden_act": "swish",
    "hidden_ratio": 4, "hidden_size": 32, "initializer_range": 0.02, "intermediate_size": None,
    "max_position_embeddings": 2048, "model_type": "delta_net", "norm_eps": 1e-06, "num_heads": 4,
    "num_hidden_layers": 4, "pad_token_id": None, "qk_activation": "silu", "qk_norm": "l2",
    "tie_word_embeddings": False, "transformers_version": "5.0.0", "use_beta": True, "use_cache": True,
    "use_gate": True, "use_l2warp": False, "use_output_norm": True, "use_short_conv": True, "vocab_size": 300,
}


def test_config_from_fla_maps_every_field():
    cfg, ignored = config_from_fla({**FLA_CONFIG, "some_future_key": 3})
    assert ignored == ["some_future_key"]
    for key, value in FLA_CONFIG.items():
        if hasattr(cfg, key):
            assert getattr(cfg, key) == value, key
    assert cfg.mixer == "delta" and cfg.is_attention_layer(1) and not cfg.is_attention_layer(0)
    assert cfg.mlp_intermediate_size == 256  # fla's rule: round_up_256(2/3 * 4 * 32)


def test_config_from_fla_fla_forms_of_attn():
    one_spec = {**FLA_CONFIG, "attn": [{"layers": [3], "num_heads": 4, "num_kv_heads": None}]}
    cfg, _ = config_from_fla(one_spec)
    assert cfg.attn["layers"] == [3] and cfg.attn["num_kv_heads"] == 4 and cfg.attn["rope_theta"] == 10000.0
    with pytest.raises(ValueError, match="2 attention specifications"):
        config_from_fla({**FLA_CONFIG, "attn": [{"layers": [0], "num_heads": 4}, {"layers": [1], "num_heads": 2}]})


def test_config_to_fla_round_trips_and_names_the_model():
    cfg, _ = config_from_fla(FLA_CONFIG)
    out = config_to_fla(cfg, dtype="bfloat16")
    assert out["model_type"] == "delta_net" and out["architectures"] == ["DeltaNetForCausalLM"]
    assert out["torch_dtype"] == "bfloat16" and "mixer" not in out
    for key, value in FLA_CONFIG.items():
        if key not in ("transformers_version", "dtype", "attnres_block_size"):
            assert out[key] == value, key
    assert config_from_fla(json.loads(json.dumps(out)))[0] == cfg
    with pytest.raises(ValueError, match="mixer='linear'"):
        config_to_fla(DeltaNetConfig(**TINY, mixer="linear"))
    assert "use_mlp" not in out
    with pytest.raises(ValueError, match="use_mlp=False"):
        config_to_fla(DeltaNetConfig(**TINY, use_mlp=False))
    cfg, ignored = config_from_fla({**FLA_CONFIG, "use_mlp": False})  # not an fla key: reported, not read
    assert ignored == ["use_mlp"] and cfg.use_mlp


@pytest.mark.parametrize("change, message", [
    ({"model_type": "llama"}, "model_type 'llama' is not 'delta_net'"),
    ({"model_type": None}, "model_type None"),
    ({"hidden_size": "DROP"}, "no 'hidden_size'"),
    ({"model_type": "DROP"}, "no 'model_type'"),
    ({"attnres_block_size": 2}, "attnres_block_size=2 is not supported"),
    ({"hidden_act": "powlu"}, "hidden_act"),
    ({"num_heads": 5}, "num_heads"),
    ({"attn": {"layers": [1], "num_heads": 4, "sliding": True}}, "attn key.*sliding"),
])
def test_config_from_fla_refuses(change, message):
    raw = dict(FLA_CONFIG)
    for k, v in change.items():
        if v == "DROP":
            del raw[k]
        else:
            raw[k] = v
    with pytest.raises(ValueError, match=message):
        config_from_fla(raw)


# ---- a checkpoint written the way fla writes it ------------------------------------------------------

def _hand_written_fla(cfg: DeltaNetConfig, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {k: (rng.standard_normal(s) * 0.3).astype(np.float32) for k, s in fla_names(cfg).items()}


def _model_by_hand(cfg: DeltaNetConfig, w: dict[str, np.ndarray]) -> DeltaNetForCausalLM:
    """Our model filled from fla's tensors module by module (torch Linear [out, in] -> kernel [in, out])."""
    m = nnx.eval_shape(lambda: DeltaNetForCausalLM(cfg, rngs=nnx.Rngs(1), implementation="recurrent"))

    def put(var, arr):
        assert var.get_value().shape == arr.shape
        var.set_value(jnp.asarray(arr))

    put(m.model.embeddings.embedding, w["model.embeddings.weight"])
    put(m.model.norm.weight, w["model.norm.weight"])
    put(m.lm_head.kernel, w["lm_head.weight"].T)
    for i, layer in enumerate(m.model.layers):
        p = f"model.layers.{i}."
        put(layer.attn_norm.weight, w[p + "attn_norm.weight"])
        put(layer.mlp_norm.weight, w[p + "mlp_norm.weight"])
        for proj in ("gate_proj", "up_proj", "down_proj"):
            put(getattr(layer.mlp, proj).kernel, w[p + f"mlp.{proj}.weight"].T)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj", "b_proj", "g_proj"):
            if p + f"attn.{proj}.weight" in w:
                put(getattr(layer.attn, proj).kernel, w[p + f"attn.{proj}.weight"].T)
        for conv in ("q_conv1d", "k_conv1d", "v_conv1d"):
            if p + f"attn.{conv}.weight" in w:
                put(getattr(layer.attn, conv).weight, w[p + f"attn.{conv}.weight"])
        if p + "attn.o_norm.weight" in w:
            put(layer.attn.o_norm.weight, w[p + "attn.o_norm.weight"])
    assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(nnx.state(m))), "a parameter was not set"
    return m


@nnx.jit
def _logits(model, ids):
    return model(ids)


def _fla_dir(path: Path, cfg: DeltaNetConfig, tensors: dict[str, np.ndarray], raw_config=None) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(raw_config or config_to_fla(cfg)))
    save_file(tensors, str(path / "model.safetensors"), metadata={"format": "pt"})
    return path


HAND = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_heads=4, intermediate_size=48,
            use_gate=True, allow_neg_eigval=True, attn={"layers": [1], "num_heads": 4, "num_kv_heads": 2})


def test_hand_written_fla_checkpoint_gives_the_same_logits(tmp_path):
    cfg = DeltaNetConfig(**HAND)
    tensors = _hand_written_fla(cfg)
    raw = {**FLA_CONFIG, **{k: v for k, v in cfg.to_dict().items() if k != "mixer"}}
    fla_dir = _fla_dir(tmp_path / "fla", cfg, tensors, raw)
    imported = load_fla_checkpoint(fla_dir, implementation="recurrent")
    assert imported.config == cfg
    ids = jnp.asarray(np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 9)), jnp.int32)
    want = _logits(_model_by_hand(cfg, tensors), ids)
    got = _logits(imported.model, ids)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
    assert float(jnp.std(want)) > 0.1  # the weights reach the logits

    # bfloat16 tensors (as fla saves a bf16 model) widen exactly.
    bf = {k: a.astype(ml_dtypes.bfloat16) for k, a in tensors.items()}
    bf_dir = _fla_dir(tmp_path / "fla-bf16", cfg, bf, raw)
    got_bf = load_fla_checkpoint(bf_dir)
    assert got_bf.source_dtypes == ["BF16"]
    np.testing.assert_array_equal(np.asarray(got_bf.model.model.layers[0].attn.q_proj.kernel.get_value()),
                                  bf["model.layers.0.attn.q_proj.weight"].astype(np.float32).T)


def test_bfloat16_read_without_numpy_support(tmp_path, monkeypatch):
    """Where safetensors cannot give bfloat16 to NumPy, the raw bytes are decoded instead."""
    cfg = DeltaNetConfig(**HAND)
    tensors = {k: a.astype(ml_dtypes.bfloat16) if "norm" not in k else a for k, a in _hand_written_fla(cfg).items()}
    fla_dir = _fla_dir(tmp_path / "fla", cfg, tensors)
    want = _params(load_fla_checkpoint(fla_dir).model)
    real_open = convert._safe_open

    class NoBF16:
        def __init__(self, path):
            self._h = real_open(path)

        def __enter__(self):
            self._f = self._h.__enter__()
            return self

        def __exit__(self, *exc):
            return self._h.__exit__(*exc)

        def keys(self):
            return self._f.keys()

        def get_slice(self, name):
            return self._f.get_slice(name)

        def get_tensor(self, name):
            if self._f.get_slice(name).get_dtype() == "BF16":
                raise TypeError("data type 'bfloat16' not understood")
            return self._f.get_tensor(name)

    monkeypatch.setattr(convert, "_safe_open", NoBF16)
    got = _params(load_fla_checkpoint(fla_dir).model)
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def _write_shards(directory: Path, cfg, tensors, index_override=None, skip_file=None):
    directory.mkdir(parents=True)
    (directory / "config.json").write_text(json.dumps(config_to_fla(cfg)))
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file, part in files.items():
        if file != skip_file:
            save_file({n: tensors[n] for n in part}, str(directory / file))
        weight_map.update({n: file for n in part})
    index = {"metadata": {"total_size": sum(a.nbytes for a in tensors.values())}, "weight_map": weight_map}
    if index_override is not None:
        index = index_override(index)
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def test_hand_written_sharded_checkpoint_with_index(tmp_path):
    cfg = DeltaNetConfig(**HAND)
    tensors = _hand_written_fla(cfg, seed=3)
    got = _params(load_fla_checkpoint(_write_shards(tmp_path / "sharded", cfg, tensors)).model)
    want = _params(load_fla_checkpoint(_fla_dir(tmp_path / "single", cfg, tensors)).model)
    assert got.keys() == want.keys()
    for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)


# ---- refusals ---------------------------------------------------------------------------------------

def _drop(tensors, name):
    tensors = dict(tensors)
    del tensors[name]
    return tensors


BAD_TENSORS = {
    "missing": (lambda t: _drop(t, "model.layers.0.attn.b_proj.weight"), "lacks 1 tensor.*model.layers.0.attn.b_proj"),
    "unknown": (lambda t: {**t, "model.layers.0.attn.f_proj.weight": np.zeros((4, 32), np.float32)},
                "does not use: model.layers.0.attn.f_proj.weight"),
    "shape": (lambda t: {**t, "model.layers.1.attn.k_proj.weight": np.zeros((32, 32), np.float32)},
              r"model.layers.1.attn.k_proj.weight in model.safetensors has shape \[32, 32\], the config needs \[16, 32\]"),
    "transposed": (lambda t: {**t, "lm_head.weight": np.ascontiguousarray(t["lm_head.weight"].T)},
                   r"lm_head.weight .*shape \[32, 300\]"),
    "dtype": (lambda t: {**t, "model.norm.weight": np.ones(32, np.int32)}, "model.norm.weight .*dtype I32"),
}


@pytest.mark.parametrize("case", list(BAD_TENSORS))
def test_bad_tensors_are_refused_before_writing(case, tmp_path):
    from experiments.convert import import_checkpoint

    cfg = DeltaNetConfig(**HAND)
    change, message = BAD_TENSORS[case]
    fla_dir = _fla_dir(tmp_path / "fla", cfg, change(_hand_written_fla(cfg)))
    with pytest.raises(ValueError, match=message):
        load_fla_checkpoint(fla_dir)
    with pytest.raises(ValueError, match=message):
        import_checkpoint(fla_dir, tmp_path / "run", progress=False)
    _nothing_left(tmp_path, "run")


BAD_SHARDS = {
    "missing shard": (dict(skip_file="model-00002-of-00002.safetensors"),
                      "missing: model-00002-of-00002.safetensors"),
    "no weight_map": (dict(index_override=lambda i: {"metadata": {}}), "no 'weight_map'"),
    "wrong file": (dict(index_override=lambda i: {"weight_map": {**i["weight_map"], "model.norm.weight":
                                                                  "model-00001-of-00002.safetensors"
                                                                  if i["weight_map"]["model.norm.weight"].startswith(
                                                                      "model-00002") else
                                                                  "model-00002-of-00002.safetensors"}}),
                   "puts tensor model.norm.weight in"),
    "path outside": (dict(index_override=lambda i: {"weight_map": {**i["weight_map"],
                                                                    "model.norm.weight": "../x.safetensors"}}),
                     "not a safetensors file name"),
    "unlisted": (dict(index_override=lambda i: {"weight_map": _drop(i["weight_map"], "model.norm.weight")}),
                 "not listed in .*model.norm.weight"),
}


@pytest.mark.parametrize("case", list(BAD_SHARDS))
def test_bad_shards_and_index_are_refused(case, tmp_path):
    from experiments.convert import import_checkpoint

    cfg = DeltaNetConfig(**HAND)
    kwargs, message = BAD_SHARDS[case]
    fla_dir = _write_shards(tmp_path / "fla", cfg, _hand_written_fla(cfg), **kwargs)
    with pytest.raises(ValueError, match=message):
        import_checkpoint(fla_dir, tmp_path / "run", progress=False)
    _nothing_left(tmp_path, "run")


def test_bad_files_are_refused(tmp_path):
    from experiments.convert import import_checkpoint

    cfg = DeltaNetConfig(**HAND)
    d = tmp_path / "fla"
    d.mkdir()
    with pytest.raises(ValueError, match="has no config.json"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="config.json is not valid JSON"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    (d / "config.json").write_text(json.dumps({**config_to_fla(cfg), "model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    (d / "config.json").write_text(json.dumps(config_to_fla(cfg)))
    with pytest.raises(ValueError, match="neither model.safetensors nor model.safetensors.index.json"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    (d / "model.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{garbage")
    with pytest.raises(ValueError, match="model.safetensors is not a readable safetensors file"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    (d / "model.safetensors").unlink()
    (d / "model.safetensors.index.json").write_text("[1, 2")
    with pytest.raises(ValueError, match="index.json is not a readable JSON index"):
        import_checkpoint(d, tmp_path / "run", progress=False)
    _nothing_left(tmp_path, "run")


def test_tied_head_must_equal_the_embeddings(tmp_path):
    cfg = DeltaNetConfig(**{**HAND, "tie_word_embeddings": True})
    tensors = _hand_written_fla(DeltaNetConfig(**HAND))  # has an lm_head.weight of its own
    with pytest.raises(ValueError, match="lm_head.weight differs from model.embeddings.weight"):
        load_fla_checkpoint(_fla_dir(tmp_path / "a", cfg, tensors))
    tensors["lm_head.weight"] = tensors["model.embeddings.weight"]  # some tools save the tied copy
    model = load_fla_checkpoint(_fla_dir(tmp_path / "b", cfg, tensors)).model
    assert not hasattr(model, "lm_head")


def test_export_refusals_write_nothing(tmp_path, monkeypatch):
    model = _model("deltanet")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "x").write_text("keep")
    with pytest.raises(ValueError, match="exists and is not empty"):
        save_fla_checkpoint(model, tmp_path / "busy")
    assert (tmp_path / "busy" / "x").read_text() == "keep"
    with pytest.raises(ValueError, match="export dtype"):
        save_fla_checkpoint(model, tmp_path / "out", dtype="float16")
    linear = nnx.eval_shape(lambda: DeltaNetForCausalLM(DeltaNetConfig(**{**TINY, "mixer": "linear"}),
                                                         rngs=nnx.Rngs(0)))
    with pytest.raises(ValueError, match="mixer='linear'"):
        save_fla_checkpoint(linear, tmp_path / "out")

    calls = []

    def failing_save(tensors, path):  # the second shard cannot be written
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        save_file(dict(tensors), str(path))

    monkeypatch.setattr(convert, "_save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        save_fla_checkpoint(model, tmp_path / "out", max_shard_bytes=40_000)
    assert len(calls) == 2
    _nothing_left(tmp_path, "out")


# ---- the command line -----------------------------------------------------------------------------

def test_cli_import_then_export(tmp_path, capsys):
    from deltanet_jax.train.saved_model import load_model
    from experiments.convert import main

    cfg = DeltaNetConfig(**HAND)
    tensors = _hand_written_fla(cfg, seed=5)
    fla_dir = _fla_dir(tmp_path / "fla", cfg, tensors)
    (fla_dir / "tokenizer.json").write_text('{"model": {}}')
    assert main([str(fla_dir), str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "imported" in out and "2 layers (1 attention)" in out
    assert (tmp_path / "run" / "tokenizer.json").read_text() == '{"model": {}}'
    run_cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert run_cfg["data"]["tokenizer"] == str((tmp_path / "run" / "tokenizer.json").resolve())
    loaded = load_model(tmp_path / "run", dtype=jnp.float32)
    assert loaded.step == 0 and loaded.model.config == cfg
    np.testing.assert_array_equal(np.asarray(loaded.model.model.layers[0].attn.b_proj.kernel.get_value()),
                                  tensors["model.layers.0.attn.b_proj.weight"].T)

    # A second import into the same run directory is refused and leaves it as it was.
    before = sorted(p.name for p in (tmp_path / "run").iterdir())
    assert main([str(fla_dir), str(tmp_path / "run"), "--no-progress"]) == 2
    assert "exists and is not empty" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == before

    assert main(["--export", str(tmp_path / "run"), str(tmp_path / "back"), "--no-progress",
                 "--max-shard-size", "30KB"]) == 0
    assert "exported" in capsys.readouterr().out
    assert (tmp_path / "back" / "model.safetensors.index.json").is_file()
    assert (tmp_path / "back" / "tokenizer.json").read_text() == '{"model": {}}'
    back = _file_tensors(tmp_path / "back")
    assert back.keys() == tensors.keys()
    for name in tensors:
        np.testing.assert_array_equal(back[name], tensors[name], err_msg=name)
    assert config_from_fla(json.loads((tmp_path / "back" / "config.json").read_text()))[0] == cfg

    assert main(["--export", str(tmp_path / "run"), str(tmp_path / "b16"), "--step", "7", "--no-progress"]) == 2
    assert "no checkpoint of step 7" in capsys.readouterr().err
    _nothing_left(tmp_path, "b16")
    assert main(["--export", str(tmp_path / "run"), str(tmp_path / "b16"), "--max-shard-size", "lots"]) == 2
    assert "size 'lots'" in capsys.readouterr().err
