"""Triton kernels of scft_fast, installed as ``scft_fast.kernels``."""
