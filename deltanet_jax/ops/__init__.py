"""Delta-rule ops: `delta_rule` over a sequence and `delta_rule_step` for one token."""

from deltanet_jax.ops.api import default_implementation, delta_rule, delta_rule_step
from deltanet_jax.ops.sharded import delta_rule_sharded

__all__ = ["default_implementation", "delta_rule", "delta_rule_sharded", "delta_rule_step"]
