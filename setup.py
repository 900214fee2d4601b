"""scft_fast: fused SCFT + DeRTa safety losses for Hugging Face causal LMs.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as
``scft_fast.kernels``: a top-level ``kernels`` module would shadow the library of that
name which transformers imports.
"""
from setuptools import find_packages, setup

setup(
    name="scft_fast",
    version="0.1.0",
    description="Safety fine-tuning (SCFT + DeRTa) at the cost of plain instruction tuning: "
    "fused Triton/C++ losses that never materialize the logits.",
    python_requires=">=3.10",
    packages=find_packages(include=["scft_fast", "scft_fast.*"]) + ["scft_fast.kernels"],
    package_dir={"scft_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={"scft_fast": ["py.typed"]},
    install_requires=[
        # torch is deliberately unpinned here: the Makefile installs torch==2.13.0 first so
        # that nothing pulls a multi-GB CUDA build onto a CPU machine.
        "torch>=2.5",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "train": ["transformers>=4.46", "datasets", "tokenizers", "safetensors", "deepspeed",
                  "accelerate", "peft", "matplotlib"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist"],
    },
    entry_points={"console_scripts": ["scft-fast=scft_fast.cli:main"]},
)
