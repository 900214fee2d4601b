"""Triton kernels of scft_fast, installed as ``scft_fast.kernels``.

Importing this subpackage imports triton; ``import scft_fast`` alone does not. Each kernel is in a file named
after what it computes, beside a float64 ``_ref`` twin that the tests compare against.
"""
from .cls_head import cls_head
from .safety_epilogue import safety_epilogue

__all__ = ["cls_head", "safety_epilogue"]
