"""Pallas GPU kernels of the causal depthwise short convolution plus activation, forward and backward."""

from pallas_kernels.short_conv.kernel import conv_backward, conv_forward, short_conv

__all__ = ["conv_backward", "conv_forward", "short_conv"]
