"""Sharded training on GPUs (skipped without one): the Pallas delta rule inside shard_map trains a small
model over every visible GPU (data parallel, and data x tensor with 4+) to the losses of one GPU; the
fast-compiling init gives the default numbers."""

import jax
import numpy as np
import pytest

from deltanet_jax.train.config import RunConfig
from deltanet_jax.train.distributed import global_batch
from deltanet_jax.train.mesh import build_mesh
from deltanet_jax.train.sharding import gathered
from deltanet_jax.train.step import init_train_state, make_train_step
from deltanet_jax.train.trainer import ShardedSetup

pytestmark = pytest.mark.gpu


def _losses(config, shape, batches):
    n = int(np.prod(shape))
    setup = ShardedSetup(config, build_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n]))
    state = setup.init()
    step = make_train_step(setup.graphdef, setup.tx, state_sharding=setup.shardings,
                           batch_sharding=setup.batch_sharding, compute_sharding=gathered(setup.shardings.params))
    out = []
    for b in batches:
        state, m = step(state, global_batch(b, setup.batch_sharding, b["inputs"].shape[0]))
        out.append(float(m["loss"]))
    return np.array(out)


def test_sharded_pallas_training_matches_one_gpu():
    gpus = len(jax.devices("gpu"))
    if gpus < 2:
        pytest.skip("needs 2 or more GPUs")
    config = RunConfig.from_dict({
        "model": dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=4),
        "train": dict(batch_size=8, seq_len=256, lr=1e-3, warmup_steps=2, steps=10, implementation="pallas",
                      dtype="float32")})
    rng = np.random.default_rng(0)
    batches = [{"inputs": rng.integers(0, 512, (8, 256), dtype=np.int32),
                "targets": rng.integers(0, 512, (8, 256), dtype=np.int32)} for _ in range(4)]
    with jax.default_matmul_precision("highest"):
        ref = _losses(config, (1, 1, 1), batches)
        layouts = [(2, 1, 1), (1, 2, 1)] + ([(2, 1, 2), (1, 2, 2)] if gpus >= 4 else [])
        for shape in layouts:
            np.testing.assert_allclose(_losses(config, shape, batches), ref, rtol=1e-4, err_msg=str(shape))


def test_init_kernel_lowering_gives_the_default_numbers():
    """`ShardedSetup.init` lowers threefry to the GPU kernel (fast compilation); the parameters
    must equal, bit for bit, a jitted init with the default unrolled lowering, on one GPU and
    FSDP-sharded over two when there are two."""
    config = RunConfig.from_dict({"model": dict(vocab_size=512, hidden_size=256, num_hidden_layers=2, num_heads=4),
                                  "train": dict(batch_size=8, seq_len=64, steps=10, warmup_steps=2)})
    shapes = [(1, 1, 1)] + ([(1, 2, 1)] if len(jax.devices("gpu")) >= 2 else [])
    for shape in shapes:
        n = int(np.prod(shape))
        setup = ShardedSetup(config, build_mesh(dict(zip(("data", "fsdp", "tensor"), shape)), jax.devices()[:n]))
        assert not jax.config.jax_threefry_gpu_kernel_lowering
        fast = setup.init()
        assert not jax.config.jax_threefry_gpu_kernel_lowering  # restored after the init
        ref = jax.jit(lambda key: init_train_state(setup._make(key), setup.tx)[1],
                      out_shardings=setup.shardings)(jax.random.key(config.train.seed))
        for a, b in zip(jax.tree.leaves(fast), jax.tree.leaves(ref)):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=str(shape))
