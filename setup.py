"""deltanet-jax: DeltaNet (linear transformer with the delta rule) in JAX."""

from setuptools import find_packages, setup

setup(
    name="deltanet-jax",
    version="0.1.0",
    description="DeltaNet in JAX: reference scans, Pallas GPU kernels, Flax NNX models, sharded training.",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=find_packages(include=["deltanet_jax", "deltanet_jax.*", "pallas_kernels", "pallas_kernels.*",
                                    "experiments", "experiments.*"]),
    package_data={"deltanet_jax.data": ["corpus/*.txt"], "experiments": ["configs/*.json"]},
    include_package_data=True,
    install_requires=[
        "jax>=0.10.2,<0.13",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.8,<0.3",
        "orbax-checkpoint>=0.12.4,<0.13",
        "grain>=0.2.18,<0.3",
        "numpy>=1.26",
        "tqdm>=4.66",
        "matplotlib>=3.8",
        "tensorboardX>=2.6",
        "tokenizers>=0.20",
        "pyarrow>=14",
        "array-record>=0.8",
        "safetensors>=0.4.3",
    ],
    extras_require={
        "test": ["pytest>=8", "nbformat>=5", "nbclient>=0.10", "ipykernel>=6"],
        "gpu": ["jax[cuda13]>=0.10.2,<0.13"],
        "eval": ["lm_eval>=0.4.13,<0.5"],  # lm-evaluation-harness adapter; 0.4.13 installs without torch
    },
)
