"""Backend registry: a backend is an epilogue (per logits chunk) plus a classification head."""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import torch

from .cls_head import cls_head_torch
from .torch_epilogue import torch_epilogue

BACKENDS = ("auto", "triton", "torch", "cpu")


class Backend(NamedTuple):
    name: str
    epilogue: Callable[..., torch.Tensor]
    cls_head: Callable[..., tuple]


@functools.lru_cache(maxsize=None)
def _triton_backend() -> Backend:
    from scft_fast.kernels import cls_head, safety_epilogue

    return Backend("triton", safety_epilogue, cls_head)


@functools.lru_cache(maxsize=None)
def _cpu_backend() -> Backend | None:
    try:
        from .cpu_extension import cpu_epilogue, load_cpu_extension
    except ImportError:
        return None
    if load_cpu_extension() is None:
        return None
    return Backend("cpu", cpu_epilogue, cls_head_torch)


TORCH_BACKEND = Backend("torch", torch_epilogue, cls_head_torch)


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

