"""Pallas GPU kernels of the chunked (WY / Householder-product) delta rule, forward and backward."""

from pallas_kernels.delta_rule.common import KernelConfig, Launch
from pallas_kernels.delta_rule.vjp import chunk_delta_rule

__all__ = ["KernelConfig", "Launch", "chunk_delta_rule"]
