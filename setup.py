"""scft_fast: fused SCFT + DeRTa safety losses for Hugging Face causal LMs.

The Triton kernels live in the top-level ``kernels/`` folder but are installed as
``scft_fast.kernels``: a top-level ``kernels`` module would shadow the library of that
name which transformers imports.
"""
import os
import runpy

from setuptools import find_packages, setup


def cpu_extension_build() -> dict:
    """SCFT_BUILD_OPS=1 prebuilds the C++ CPU epilogue as scft_fast._C and a failed build fails the install
    (DeepSpeed's DS_BUILD_OPS convention); unset or 0 leaves it to the just-in-time build at first use."""
    if os.environ.get("SCFT_BUILD_OPS", "0") != "1":
        return {}
    from torch.utils.cpp_extension import BuildExtension, CppExtension

    # Flags and build key come from the loader, so the prebuilt module is the one it would build itself.
    loader = runpy.run_path(os.path.join(os.path.dirname(os.path.abspath(__file__)), "scft_fast", "ops",
                                         "cpu_extension.py"))
    extension = CppExtension("scft_fast._C", ["csrc/safety_epilogue.cpp"],
                             extra_compile_args=loader["compile_flags"](),
                             extra_link_args=list(loader["LINK_FLAGS"]))
    return {"ext_modules": [extension], "cmdclass": {"build_ext": BuildExtension}}


setup(
    name="scft_fast",
    version="0.1.0",
    description="Safety fine-tuning (SCFT + DeRTa) at the cost of plain instruction tuning: "
    "fused Triton/C++ losses that never materialize the logits.",
    python_requires=">=3.10",
    packages=find_packages(include=["scft_fast", "scft_fast.*"]) + ["scft_fast.kernels"],
    package_dir={"scft_fast.kernels": "kernels"},
    include_package_data=True,
    package_data={"scft_fast": ["data/README.md", "data/embedded/*.jsonl", "data/embedded/tokenizer/*.json",
                                "data/embedded/tokenizer/*.jinja"]},
    install_requires=[
        # torch is deliberately unpinned here: the Makefile installs torch==2.13.0 first so
        # that nothing pulls a multi-GB CUDA build onto a CPU machine.
        "torch>=2.5",
        "numpy",
        "tqdm",
    ],
    extras_require={
        "triton": ["triton>=3.1"],
        "train": ["transformers>=4.46", "datasets", "tokenizers", "jinja2", "safetensors", "deepspeed",
                  "accelerate", "peft", "matplotlib", "tensorboard"],
        # SCFTSFTTrainer builds on SFTTrainer internals (_prepare_dataset, the fused LM head it patches in).
        "trl": ["trl>=1.16,<1.17"],
        "dev": ["pytest", "pytest-benchmark", "pytest-timeout", "pytest-xdist", "ruff"],
    },
    entry_points={"console_scripts": ["scft-fast=scft_fast.cli:main"]},
    **cpu_extension_build(),
)
