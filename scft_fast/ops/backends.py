"""Backend registry: a backend is an epilogue (per logits chunk) plus a classification head.

    backend  epilogue                                         head
    torch    safety_epilogue_torch   (safety_epilogue.py)     cls_head_torch   (cls_head.py)
    triton   safety_epilogue_triton  (kernels/, triton)       cls_head_triton  (kernels/, triton)
    cpu      safety_epilogue_cpu     (cpu_extension.py, C++)  cls_head_torch   (no C++ head: the torch one)
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from .cls_head import cls_head_torch
from .safety_epilogue import safety_epilogue_torch

# Every value ``backend=`` accepts (safety_loss, the training config); a CLI takes it as its ``choices``.
BACKENDS = ("auto", "triton", "torch", "cpu")


class Backend(NamedTuple):
    epilogue: Callable[..., torch.Tensor]
    cls_head: Callable[..., tuple]


@functools.lru_cache(maxsize=None)
def _triton_backend() -> Backend:
    from scft_fast.kernels import cls_head_triton, safety_epilogue_triton

    return Backend(safety_epilogue_triton, cls_head_triton)


@functools.lru_cache(maxsize=None)
def _cpu_backend() -> Backend | None:
    try:
        from .cpu_extension import load_cpu_extension, safety_epilogue_cpu
    except ImportError:
        return None
    if load_cpu_extension() is None:
        return None
    return Backend(safety_epilogue_cpu, cls_head_torch)


TORCH_BACKEND = Backend(safety_epilogue_torch, cls_head_torch)


@functools.lru_cache(maxsize=None)
def _triton_importable() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_backend(name: str, device: torch.device) -> Backend:
    """"auto": triton on CUDA; on CPU the C++ extension when it builds, else torch."""
    if name not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")
    if name == "torch":
        return TORCH_BACKEND
    if name == "triton":
        if not _triton_importable():
            raise RuntimeError("backend='triton' needs the triton package (pip install triton)")
        return _triton_backend()
    if name == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' runs on CPU tensors, got tensors on {device}")
        backend = _cpu_backend()
        if backend is None:
            raise RuntimeError("backend='cpu' needs the C++ extension, which could not be built here; "
                               "use backend='torch' or install a C++ compiler and ninja")
        return backend
    if device.type == "cuda" and _triton_importable():
        return _triton_backend()
    if device.type == "cpu":
        backend = _cpu_backend()
        if backend is not None:
            return backend
    return TORCH_BACKEND

