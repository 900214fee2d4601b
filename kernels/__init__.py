"""Triton kernels of scft_fast, installed as ``scft_fast.kernels``.

Importing this subpackage imports triton; ``import scft_fast`` alone does not. Each kernel is in a file named
after what it computes, with the same name as its torch twin's file in ``scft_fast/ops/`` (``safety_epilogue.py``,
``cls_head.py``), and the same name plus ``_triton`` (``_torch`` for the twin). The float64 definitions the tests
compare both against are in ``scft_fast/ops/reference.py``, importable without triton.
"""
from .cls_head import cls_head_triton
from .safety_epilogue import safety_epilogue_triton

__all__ = ["cls_head_triton", "safety_epilogue_triton"]
