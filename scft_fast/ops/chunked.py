"""The chunk loop every backend shares: GEMM -> epilogue (logits become their gradient) -> two GEMMs.

It computes the token terms only (LM + RTO transition): the classification term is the head's, on the pooled
rows, and ``safety_loss`` adds it after this loop (safety_loss.py).

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
# The CUDA figures here are that model, not a measurement: no GPU figure exists yet. benchmarks/gpu_run.sh
# times the automatic size beside chunks of 2048 and 4096 rows (and the dW GEMM at beta 0 and 1), and those
# figures decide this policy once a GPU run has produced them.
_MIN_CHUNK_ROWS = {"cuda": 2048}
_DEFAULT_MIN_CHUNK_ROWS = 256


def default_chunk_size(num_rows: int, hidden_size: int, vocab_size: int, dtype: torch.dtype,
                       device: torch.device) -> int:
    """Rows per chunk for num_rows visited rows: the loop runs ceil(num_rows / result) chunks of about equal size.

    The target is a logits chunk about as large as the hidden states (Liger's rule, c*V ~ N*H), at least a
    GEMM-efficient number of rows (_MIN_CHUNK_ROWS) and never more than a fixed byte budget (_MAX_CHUNK_BYTES).
    Every chunk reads all of W three times, so the rows are split into the number of equal chunks nearest
    num_rows / target (518 rows at 256 go as 259 + 259, not 256 + 256 + 6), but never into so many that a chunk
    falls below the minimum (5462 rows at 2048 go as 2 x 2731, not 3 x 1821) nor so few that one exceeds the
    budget; where the budget is below the minimum (a very large V), the budget wins."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    fewest = _MIN_CHUNK_ROWS.get(device.type, _DEFAULT_MIN_CHUNK_ROWS)
    most = max(1, _MAX_CHUNK_BYTES.get(device.type, _DEFAULT_MAX_CHUNK_BYTES) // (vocab_size * itemsize))
    target = 1 << max(0, math.ceil(math.log2(max(1, math.ceil(num_rows * hidden_size / vocab_size)))))
    target = min(max(target, fewest), most)
    if num_rows <= target:
        return max(1, num_rows)
    chunks = min(round(num_rows / target), num_rows // fewest)
    chunks = max(chunks, -(-num_rows // most), 1)
    return -(-num_rows // chunks)


def _addmm_f32_in_place(acc, a, b):
    if acc is None:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_f32_then_add(acc, a, b):
    product = torch.mm(a, b, out_dtype=torch.float32)
    return product if acc is None else acc.add_(product)


def _mm_then_float_add(acc, a, b):
    product = torch.mm(a, b).float()
    return product if acc is None else acc.add_(product)


# How grad_W += dlogits.T @ h accumulates in float32 from bfloat16 / float16 operands, fastest first: cuBLAS reads
# and writes the float32 accumulator inside the GEMM (beta = 1) through the out_dtype overloads, which older torch
# releases and the CPU lack; the last path rounds each chunk's product to the input dtype before adding it.
FP32_ACCUMULATION_PATHS = {
    "addmm(out_dtype=float32, out=acc)": _addmm_f32_in_place,
    "mm(out_dtype=float32) + add_": _mm_f32_then_add,
    "mm + float() + add_": _mm_then_float_add,
}
FLOAT32_PATH = "addmm_ (float32 inputs)"
_chosen: dict[tuple[str, torch.dtype], str] = {}
_ran: dict[str, str] = {}


def accumulation_path(device: torch.device, dtype: torch.dtype) -> str:
    """The name of the FP32_ACCUMULATION_PATHS entry the op takes for inputs of this device type and dtype.

    Chosen once per (device type, dtype) by running each candidate on 2 x 2 tensors, beta = 0 and 1: an overload
    that does not exist fails there. At the real shapes nothing is caught, so an OutOfMemoryError (or any other
    error) reaches the caller instead of switching the process to a slower path for good."""
    if dtype == torch.float32:
        return FLOAT32_PATH
    key = (device.type, dtype)
    if key not in _chosen:
        a = torch.ones(2, 2, dtype=dtype, device=device)
        for name, step in FP32_ACCUMULATION_PATHS.items():
            try:
                step(step(None, a, a), a, a)
            except torch.OutOfMemoryError:
                raise
            except (TypeError, RuntimeError):  # NotImplementedError is a RuntimeError
                continue
            _chosen[key] = name
            break
        else:
            raise RuntimeError(f"no float32 accumulation path runs for {dtype} on {device.type}")
    return _chosen[key]


def accumulation_paths_run() -> dict[str, str]:
    """'<device type> <dtype>' -> the accumulation path the last weight gradient of those inputs took."""
    return dict(_ran)


def accumulate_f32(acc: torch.Tensor | None, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """acc += a @ b with a float32 accumulator, whatever the dtype of a and b (float32 / bf16 / fp16)."""
    name = accumulation_path(a.device, a.dtype)
    _ran[f"{a.device.type} {str(a.dtype).removeprefix('torch.')}"] = name
    if a.dtype == torch.float32:
        return torch.mm(a, b) if acc is None else acc.addmm_(a, b)
    return FP32_ACCUMULATION_PATHS[name](acc, a, b)


def chunked_token_loss(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    transition_labels: torch.Tensor,  # (N,) int64
    rows: torch.Tensor | None,  # (M,) int64 rows with a target, or None for all N rows
    lm_scale: torch.Tensor,  # () or (N,) float32
    tr_scale: torch.Tensor,  # () or (N,) float32
    *,
    epilogue: Epilogue,
    softcap: float | None,
    ignore_index: int,
    chunk_size: int | None,
    grad_hidden: torch.Tensor | None,  # (N, H) written at the visited rows, or None
    need_grad_weight: bool,
    need_grad_bias: bool,
    label_smoothing: float = 0.0,
    z_scale: torch.Tensor | None = None,  # () or (N,) float32
    row_stats: torch.Tensor | None = None,  # (N, ROW_STATS) float32, written at the visited rows
    token_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """The token terms over the vocabulary, chunk by chunk; no classification term (that is the head's).

    Returns (sums (2,) float32 [lm_sum, tr_sum], grad_weight (V, H) float32, grad_bias (V,) float32) and writes
    grad_hidden's and row_stats' visited rows; every gradient is of the rows' lm_scale * LM CE + tr_scale * CE_tr
    + z_scale * lse^2 (safety_epilogue.py's contract, which also defines label_smoothing, row_stats and
    token_stats). A (N,) scale weighs each row on its own. No gradient asked for: the epilogue skips its gradient
    sweep and the two gradient GEMMs are not run."""
    num_rows = rows.numel() if rows is not None else hidden.shape[0]
    vocab, hidden_size = weight.shape
    sums = torch.zeros(2, dtype=torch.float32, device=hidden.device)
    grad_weight = grad_bias = None
    if num_rows == 0:
        return sums, grad_weight, grad_bias
    compute_grad = grad_hidden is not None or need_grad_weight or need_grad_bias
    if chunk_size:  # an explicit size is a maximum, split into equal chunks
        chunk = -(-num_rows // -(-num_rows // chunk_size))
    else:
        chunk = default_chunk_size(num_rows, hidden_size, vocab, hidden.dtype, hidden.device)
    buffer = torch.empty(chunk, vocab, dtype=hidden.dtype, device=hidden.device)
    chunk_stats = None
    if row_stats is not None and rows is not None:
        chunk_stats = torch.empty(chunk, row_stats.shape[1], dtype=torch.float32, device=hidden.device)
    weight_t = weight.T
    for start in range(0, num_rows, chunk):
        stop = min(start + chunk, num_rows)
        if rows is None:
            index = None
            h, lm_t, tr_t = hidden[start:stop], labels[start:stop], transition_labels[start:stop]
        else:
            index = rows[start:stop]
            h, lm_t, tr_t = hidden.index_select(0, index), labels[index], transition_labels[index]

        def per_row(t):  # a (N,) weight restricted to the chunk's rows; a 0-dim one as it is
            if t is None or t.dim() == 0:
                return t
            return t[start:stop] if index is None else t[index]

        logits = buffer[: stop - start]
        if bias is None:
            torch.mm(h, weight_t, out=logits)
        else:
            torch.addmm(bias, h, weight_t, out=logits)
        if row_stats is None:
            sums += epilogue(logits, lm_t, tr_t, per_row(lm_scale), per_row(tr_scale), softcap, ignore_index,
                             label_smoothing, per_row(z_scale), None, False, compute_grad)
        else:
            stats = row_stats[start:stop] if index is None else chunk_stats[: stop - start]
            sums += epilogue(logits, lm_t, tr_t, per_row(lm_scale), per_row(tr_scale), softcap, ignore_index,
                             label_smoothing, per_row(z_scale), stats, token_stats, compute_grad)
            if index is not None:
                row_stats.index_copy_(0, index, stats)
        if grad_hidden is not None:
            if rows is None:
                torch.mm(logits, weight, out=grad_hidden[start:stop])
            else:
                grad_hidden.index_copy_(0, index, torch.mm(logits, weight))
        if need_grad_weight:
            grad_weight = accumulate_f32(grad_weight, logits.T, h)
        if need_grad_bias:
            part = logits.sum(0, dtype=torch.float32)
            grad_bias = part if grad_bias is None else grad_bias.add_(part)
    return sums, grad_weight, grad_bias
