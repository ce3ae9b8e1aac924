"""Training: config and overrides, optimizer, jitted steps, checkpoints, metrics and the run loop.

Entry point for users: `python -m experiments.pretrain` (see experiments/pretrain.py).
"""
