"""The chunk loop every backend shares: GEMM -> epilogue (logits become their gradient) -> two GEMMs.

Only rows that carry an LM or a transition target are visited (``rows``); the others never touch
the vocabulary. Per chunk of c rows the cost is exactly three GEMMs of c x H x V (6 c H V FLOPs):
    logits   = h @ W.T (+ b)            (c, V)  in the input dtype
    epilogue : logits -> d loss / d logits, in place, and the loss sums
    grad_h   = dlogits @ W              (c, H)
    grad_W  += dlogits.T @ h            (V, H)  accumulated in float32
"""
from __future__ import annotations

import math
from typing import Callable

import torch

Epilogue = Callable[..., torch.Tensor]

# Largest logits buffer the automatic chunk size allows, by device type.
_MAX_CHUNK_BYTES = {"cuda": 1 << 30}
_DEFAULT_MAX_CHUNK_BYTES = 256 << 20
# Fewest rows per chunk. The weight-gradient GEMM dlogits.T @ h has the chunk as its inner dimension
# and reads + writes the (V, H) float32 accumulator once per chunk: its arithmetic intensity is about
# rows / 4 FLOP per byte, and an H100 needs ~300 to stay compute-bound, hence >= 2048 rows on GPU.
_MIN_CHUNK_ROWS = {"cuda": 2048}
_DEFAULT_MIN_CHUNK_ROWS = 256


def default_chunk_size(num_rows: int, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Rows per chunk: a logits chunk about as large as the hidden states (Liger's rule, c*V ~ N*H),
    at least a GEMM-efficient number of rows, and never more than a fixed byte budget."""
    rows = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(num_rows * hidden_size / vocab_size)))))
    rows = max(rows, _MIN_CHUNK_ROWS.get(device.type, _DEFAULT_MIN_CHUNK_ROWS))
    itemsize = torch.empty((), dtype=dtype).element_size()
    budget = _MAX_CHUNK_BYTES.get(device.type, _DEFAULT_MAX_CHUNK_BYTES)
    rows = min(rows, max(1, budget // (vocab_size * itemsize)))
    return max(1, min(rows, num_rows))


def _accumulate_f32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b with a float32 accumulator, whatever the dtype of a and b (float32 / bf16 / fp16)."""
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    if a.is_cuda:
        # cuBLAS reads and writes the float32 accumulator in the GEMM itself (beta = 1); older torch
        # releases lack one or both out_dtype overloads, so take the first that works, once.
        for i, step in enumerate(_CUDA_F32_STEPS):
            if not _CUDA_F32_WORKS[i]:
                continue
            try:
                return step(acc, a, b)
            except (TypeError, RuntimeError):
                _CUDA_F32_WORKS[i] = False
    product = torch.mm(a, b).float()
    return product if acc is None else acc.add_(product)


def _addmm_f32_in_place(acc, a, b):
    if acc is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_f32_then_add(acc, a, b):
    product = torch.mm(a, b, out_dtype=torch.float32)
    return product if acc is None else acc.add_(product)


_CUDA_F32_STEPS = (_addmm_f32_in_place, _mm_f32_then_add)
_CUDA_F32_WORKS = [True, True]


def chunked_safety_loss(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    transition_labels: torch.Tensor,  # (N,) int64
    rows: torch.Tensor | None,  # (M,) int64 rows with a target, or None for all N rows
    lm_scale: torch.Tensor,  # () float32
    tr_scale: torch.Tensor,  # () float32
    *,
    epilogue: Epilogue,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int | None,
    grad_hidden: torch.Tensor | None,  # (N, H) written at the visited rows, or None
    need_grad_weight: bool,
    need_grad_bias: bool,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Returns (sums (2,) float32 [lm_sum, tr_sum], grad_weight (V, H) float32, grad_bias (V,) float32)."""
    num_rows = rows.numel() if rows is not None else hidden.shape[0]
    vocab, hidden_size = weight.shape
    sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
    grad_weight = grad_bias = None
    if num_rows == 0:
        return sums, grad_weight, grad_bias
    if chunk_size:  # an explicit size is a maximum
        num_chunks = -(-num_rows // chunk_size)
    else:
        # Every chunk reads all of W three times: the automatic size is a target, rounded to the nearest
        # number of equal chunks (518 rows at 256 go as 259 + 259, not 256 + 256 + 6).
        target = default_chunk_size(num_rows, hidden_size, vocab, hidden.dtype, hidden.device)
        num_chunks = max(1, round(num_rows / target))
    chunk = -(-num_rows // num_chunks)
    buffer = torch.empty(min(chunk, num_rows), vocab, dtype=hidden.dtype, device=hidden.device)
    weight_t = weight.T
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        if rows is None:
            h, lm_t, tr_t = hidden[start:stop], labels[start:stop], transition_labels[start:stop]
        else:
            index = rows[start:stop]
            h, lm_t, tr_t = hidden.index_select(0, index), labels[index], transition_labels[index]
        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        sums += epilogue(logits, lm_t, tr_t, lm_scale, tr_scale, softcap, ignore_index)
        if grad_hidden is not None:
            if rows is None:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            else:
                grad_hidden.index_copy_(0, index, torch.mm(logits, weight))
        if need_grad_weight:
            grad_weight = _accumulate_f32(grad_weight, logits.T, h)
        if need_grad_bias:
            part = logits.sum(0, dtype=torch.float32)
            grad_bias = part if grad_bias is None else grad_bias.add_(part)
    return sums, grad_weight, grad_bias
