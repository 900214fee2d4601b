"""The op benchmark's problem and rows: seeded inputs, and one forward + backward per row (bench_op.py).

Inputs (seeded, never zeros): hidden ~ N(0, 1), lm_weight ~ N(0, (2 / sqrt(H))^2) so that logits have
std ~2 like a trained LM head; a random ``prompt_frac`` of the rows are "prompt" rows (ignore_index);
for the full run a random ``transition_frac`` of the remaining rows carry an RTO target (one refusal
token id) instead of an LM target, so LM-only and full visit the same N_loss rows; S = N / seq_len
pooled rows (each sequence's last row) with random labels in [0, C).

Rows: gemm (the three GEMMs, the ceiling), naive (materialized logits + F.cross_entropy), lce_* (torch's
F.linear_cross_entropy), scft_lm / scft_full per backend and chunk, liger / cce (CUDA, when installed); every
missing piece is a "skipped" line instead.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops.backends import resolve_backend
from scft_fast.ops.chunked import default_chunk_size

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Problem:
    rows: int  # N
    hidden: int  # H
    vocab: int  # V
    dtype: torch.dtype
    device: torch.device
    prompt_frac: float
    transition_frac: float
    seq_len: int  # S = N // seq_len pooled rows
    classes: int  # C
    seed: int


@dataclass
class Inputs:
    hidden: torch.Tensor  # (N, H), requires grad
    lm_weight: torch.Tensor  # (V, H), requires grad
    labels: torch.Tensor  # (N,) LM-only targets: ignore_index on prompt rows
    full_labels: torch.Tensor  # (N,) the LM targets left after moving some rows to RTO
    transition_labels: torch.Tensor  # (N,) the refusal token on RTO rows, ignore_index elsewhere
    cls_weight: torch.Tensor  # (C, H), requires grad
    cls_bias: torch.Tensor  # (C,), requires grad
    cls_index: torch.Tensor  # (S,) each sequence's last row
    cls_labels: torch.Tensor  # (S,) in [0, C)
    loss_rows: torch.Tensor  # (N_loss,) rows with a loss target, the same for LM-only and full
    n_transition: int

    @property
    def n_loss(self) -> int:
        return self.loss_rows.numel()

    def params(self) -> tuple[torch.Tensor, ...]:
        return self.hidden, self.lm_weight, self.cls_weight, self.cls_bias


def make_inputs(p: Problem) -> Inputs:
    gen = torch.Generator(device=p.device).manual_seed(p.seed)
    kw = dict(device=p.device, generator=gen)
    hidden = torch.randn(p.rows, p.hidden, **kw).to(p.dtype)
    lm_weight = (torch.randn(p.vocab, p.hidden, **kw) * (2.0 / math.sqrt(p.hidden))).to(p.dtype)
    labels = torch.randint(0, p.vocab, (p.rows,), **kw)
    prompt = torch.randperm(p.rows, **kw)[: round(p.rows * p.prompt_frac)]
    labels[prompt] = IGNORE_INDEX
    loss_rows = torch.nonzero(labels != IGNORE_INDEX).squeeze(1)
    moved = loss_rows[torch.randperm(loss_rows.numel(), **kw)[: round(loss_rows.numel() * p.transition_frac)]]
    refusal_token = int(torch.randint(0, p.vocab, (1,), **kw))
    full_labels = labels.clone()
    full_labels[moved] = IGNORE_INDEX
    transition_labels = torch.full_like(labels, IGNORE_INDEX)
    transition_labels[moved] = refusal_token
    sequences = max(1, p.rows // p.seq_len)
    cls_index = torch.arange(sequences, device=p.device) * p.seq_len + min(p.seq_len, p.rows) - 1
    cls_labels = torch.randint(0, p.classes, (sequences,), **kw)
    cls_weight = (torch.randn(p.classes, p.hidden, **kw) / math.sqrt(p.hidden)).to(p.dtype)
    cls_bias = (0.1 * torch.randn(p.classes, **kw)).to(p.dtype)
    for t in (hidden, lm_weight, cls_weight, cls_bias):
        t.requires_grad_()
    return Inputs(hidden, lm_weight, labels, full_labels, transition_labels, cls_weight, cls_bias, cls_index,
                  cls_labels, loss_rows, moved.numel())


@dataclass
class Row:
    key: str  # stable id, also across shapes (the memory subprocess finds its row by it)
    label: str  # what the table prints
    family: str  # gemm | naive | lce | scft_lm | scft_full | liger | cce
    step: Callable[[], torch.Tensor]  # forward + backward, returns the detached loss
    backend: str = ""
    chunk: str = ""
    times: list[float] = field(default_factory=list)
    loss: float | None = None
    peak_bytes: int | None = None
    error: str | None = None


def _backward(loss: torch.Tensor) -> torch.Tensor:
    loss.backward()
    return loss.detach()


def available_backends(device: torch.device) -> list[str]:
    """Backends that run here for real: triton only on CUDA (its CPU interpreter is for tests), cpu when its
    C++ extension loads (a first use may compile it)."""
    found = []
    for name in (("triton", "torch") if device.type == "cuda" else ("torch", "cpu")):
        try:
            resolve_backend(name, device)
        except (RuntimeError, ValueError, ImportError):
            continue
        found.append(name)
    return found


def build_rows(p: Problem, x: Inputs, backends: list[str], chunk_sizes: list[int]) -> tuple[list[Row], list[str]]:
    """Returns (rows, skipped): skipped says which anchors are not there, and why."""
    h, w, labels = x.hidden, x.lm_weight, x.labels
    skipped = []
    rows: list[Row] = []

    gemm_buffers: list[torch.Tensor] = []  # allocated on the first call: only when the gemm row runs

    def gemm3() -> torch.Tensor:
        if not gemm_buffers:
            kw = dict(dtype=p.dtype, device=p.device)
            gemm_buffers.extend([h.detach()[x.loss_rows].contiguous(), torch.empty(x.n_loss, p.vocab, **kw),
                                 torch.empty(x.n_loss, p.hidden, **kw), torch.empty(p.vocab, p.hidden, **kw)])
        loss_h, logits, grad_h, grad_w = gemm_buffers  # (N_loss, H), (N_loss, V), (N_loss, H), (V, H)
        torch.mm(loss_h, w.detach().T, out=logits)
        torch.mm(logits, w.detach(), out=grad_h)
        torch.mm(logits.T, loss_h, out=grad_w)
        return grad_h[0, 0]

    rows.append(Row("gemm", "gemm x3 (ceiling: torch.mm only)", "gemm", gemm3))
    rows.append(Row("naive", "naive: h @ W.T, F.cross_entropy", "naive",
                    lambda: _backward(F.cross_entropy((h @ w.T).float(), labels, ignore_index=IGNORE_INDEX))))
    # F.linear_cross_entropy and its options are newer than torch 2.11 (the GPU image's torch).
    if not hasattr(F, "linear_cross_entropy"):
        skipped.append(f"F.linear_cross_entropy: not in torch {torch.__version__}")
    else:
        lce_variants = [("lce_ref", "F.lce reference (options=None)", None)]
        options_class = getattr(torch.nn, "LinearCrossEntropyOptions", None)
        if options_class is None:
            skipped.append(f"F.lce chunked rows: torch {torch.__version__} has no torch.nn.LinearCrossEntropyOptions")
        else:
            lce_variants += [("lce_auto", "F.lce chunked (Options())", options_class()),
                             ("lce_aspect", "F.lce chunked (aspect_ratio)",
                              options_class(chunking_method="aspect_ratio"))]
        for key, label, options in lce_variants:
            kwargs = {} if options is None else {"options": options}
            rows.append(Row(key, label, "lce", lambda kw=kwargs: _backward(
                F.linear_cross_entropy(h, w, labels, ignore_index=IGNORE_INDEX, **kw))))

    auto_chunk = default_chunk_size(x.n_loss, p.hidden, p.vocab, p.dtype, p.device)
    for backend in backends:
        for chunk in [None, *chunk_sizes]:
            chunk_label = f"auto={auto_chunk}" if chunk is None else str(chunk)
            suffix = f"{backend}:{'auto' if chunk is None else chunk}"
            rows.append(Row(f"scft_lm:{suffix}", "scft LM-only", "scft_lm", lambda b=backend, c=chunk: _backward(
                safety_loss(h, w, labels, backend=b, chunk_size=c).loss), backend, chunk_label))
            rows.append(Row(f"scft_full:{suffix}", "scft full (LM+RTO+cls)", "scft_full",
                            lambda b=backend, c=chunk: _backward(safety_loss(
                                h, w, x.full_labels, transition_labels=x.transition_labels,
                                cls_weight=x.cls_weight, cls_bias=x.cls_bias, cls_index=x.cls_index,
                                cls_labels=x.cls_labels, backend=b, chunk_size=c).loss), backend, chunk_label))

    if p.device.type != "cuda":
        skipped.append("Liger-Kernel, Cut Cross-Entropy: CUDA only")
        return rows, skipped
    try:
        from liger_kernel.transformers.fused_linear_cross_entropy import LigerFusedLinearCrossEntropyLoss
    except Exception as e:  # an optional peer that fails to import (ImportError, or a triton mismatch) is skipped
        skipped.append(f"Liger-Kernel: not importable ({type(e).__name__}: {e})")
    else:
        for key, label, accum in (("liger", "Liger FLCE (LM-only, default)", None),
                                  ("liger:fp32", "Liger FLCE (LM-only, accum_dtype=float32)", torch.float32)):
            liger = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE_INDEX, accum_dtype=accum)
            rows.append(Row(key, label, "liger", lambda fn=liger: _backward(fn(w, h, labels))))
    try:
        from cut_cross_entropy import linear_cross_entropy as cce
    except Exception as e:  # an optional peer that fails to import (ImportError, or a triton mismatch) is skipped
        skipped.append(f"Cut Cross-Entropy: not importable ({type(e).__name__}: {e})")
    else:
        # impl="cce" skips gradient blocks below its filter_eps ("high" by default); filter_eps=None is exact.
        for key, label, kwargs in (("cce:cce", "CCE cce (LM-only)", dict(impl="cce")),
                                   ("cce:exact", "CCE cce, filter_eps=None (LM-only)",
                                    dict(impl="cce", filter_eps=None)),
                                   ("cce:torch_compile", "CCE torch_compile (LM-only)", dict(impl="torch_compile"))):
            rows.append(Row(key, label, "cce", lambda kw=kwargs: _backward(
                cce(h, w, labels, ignore_index=IGNORE_INDEX, **kw))))
    return rows, skipped


def clear_grads(x: Inputs) -> None:
    for t in x.params():
        t.grad = None


def returned_grad_bytes(x: Inputs, family: str) -> int:
    """Bytes of the gradients a row leaves behind (hidden and lm_weight; a full row also the head's): the part of
    its peak memory that is output, not workspace."""
    params = x.params() if family == "scft_full" else (x.hidden, x.lm_weight)
    return sum(t.numel() * t.element_size() for t in params)


def problem_from_args(args, **override) -> Problem:
    shape = dict(rows=args.rows, hidden=args.hidden, vocab=args.vocab)
    shape.update(override)
    return Problem(dtype=DTYPES[args.dtype], device=torch.device(args.device), prompt_frac=args.prompt_frac,
                   transition_frac=args.transition_frac, seq_len=args.seq_len, classes=args.classes,
                   seed=args.seed, **shape)
