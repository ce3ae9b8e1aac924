"""DeltaNet in JAX: delta-rule ops, Flax NNX layers and models, data and training."""

import os as _os

import jax as _jax

# jaxlib 0.10's CPU backend miscompiles some reductions of the chunked delta rule inside its
# YNNPACK fusions (`jit(lambda: delta_rule(...)[0].sum())` returned wrong values while the
# unreduced output was right). Turning those fusions off fixes it; it must happen before the
# backend starts, hence at import. Users who set the flag themselves keep their value.
_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
if _jax.__version__.startswith("0.10.") and _FLAG not in _os.environ.get("XLA_FLAGS", ""):
    _os.environ["XLA_FLAGS"] = (_os.environ.get("XLA_FLAGS", "") + f" {_FLAG}=").strip()
