"""load_model / write_model_run: a run directory's model outside the trainer."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from deltanet_jax.model import DeltaNetForCausalLM
from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.saved_model import load_model, write_model_run

CONFIG = {"model": {"hidden_size": 32, "num_hidden_layers": 2, "num_heads": 2, "vocab_size": 260},
          "train": {"dtype": "float32"}}


def test_written_model_loads_with_identical_logits(tmp_path):
    cfg = RunConfig.from_dict(CONFIG)
    model = DeltaNetForCausalLM(cfg.model, rngs=nnx.Rngs(3))
    write_model_run(tmp_path / "run", cfg, model)
    loaded = load_model(tmp_path / "run")
    ids = (jnp.arange(12)[None] * 7) % 260
    assert loaded.step == 0 and loaded.config == cfg
    np.testing.assert_array_equal(np.asarray(loaded.model(ids)), np.asarray(model(ids)))


def test_refusals_name_the_problem(tmp_path):
    cfg = RunConfig.from_dict(CONFIG)
    model = DeltaNetForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        write_model_run(tmp_path / "busy", cfg, model)
    assert (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    with pytest.raises(ValueError, match="no config.json"):
        load_model(tmp_path / "busy")
    write_model_run(tmp_path / "run", cfg, model)
    with pytest.raises(ValueError, match="no checkpoint of step 5"):
        load_model(tmp_path / "run", step=5)
