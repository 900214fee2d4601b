"""``safety_loss``: LM + RTO transition + SCFT classification losses in one pass over the vocabulary.

Autograd: the op is a ``torch.library.custom_op`` (``torch.ops.scft_fast.safety_loss``). Its
forward computes the loss *and* every gradient (the logits of each chunk become their gradient in
place, see chunked.py), returns the gradients as extra outputs, and the registered backward only
scales them by the upstream gradient. Being a custom op with a fake (meta) implementation makes it
opaque to torch.compile: the data-dependent parts (the one host sync that counts the rows to visit,
the label range checks) run inside the op and never break a surrounding graph.

reduction="none" is the exception: one loss per row means one upstream gradient per row, g_i, and
grad_W = sum_i g_i dlogits_i^T h_i cannot be formed before g is known. Keeping dlogits (N x V) would be the
logits the op exists to avoid, so that forward computes only the losses (the logits GEMM and the epilogue's
log-sum-exp sweep, no gradient sweep, no gradient GEMM) and its backward (``torch.ops.scft_fast.
safety_loss_rows_backward``) recomputes the chunk loop with g folded into the per-row scales: 8 N H V FLOPs in all
instead of 6, one more host sync (in backward), and nothing kept between the two but the inputs themselves -
less than "mean" keeps (its precomputed grad_hidden and float32 grad_W). This is what CCE does for every
reduction and Liger for "none".

Which kernel computes which term, for each backend, and where each torch twin lives: ``safety_loss``'s docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from ..constants import IGNORE_INDEX
from .backends import BACKENDS, resolve_backend
from .chunked import chunked_token_loss
from .cls_head import MAX_CLASSES, MIN_CLASSES
from .safety_epilogue import ROW_CORRECT, ROW_ENTROPY, ROW_LM_CE, ROW_LSE, ROW_STATS, ROW_TR_CE

_FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_INT_DTYPES = (torch.int64, torch.int32)
_NORMALIZER_RULE = "must be >= 0 and finite"
# A normalizer's reciprocal scales the float32 loss: a nonzero one must be a normal float32 number, else
# 1 / value overflows (below) or value itself does (above).
_NORMAL_FLOAT32 = (torch.finfo(torch.float32).tiny, torch.finfo(torch.float32).max)
# Every value ``reduction=`` accepts.
REDUCTIONS = ("mean", "sum", "none")


@dataclass
class SafetyLossOutput:
    loss: torch.Tensor  # () float32, differentiable; (N,) for reduction="none"
    lm_loss: torch.Tensor  # () float32, lm_sum / n_lm (0 when n_lm = 0)
    transition_loss: torch.Tensor  # () float32, tr_sum / n_tr (0 when n_tr = 0)
    cls_loss: torch.Tensor  # () float32, mean over labeled pooled rows (0 when none)
    cls_logits: torch.Tensor | None  # (S, C) float32, None without a head
    n_lm: torch.Tensor  # () int64
    n_tr: torch.Tensor  # () int64
    n_cls: torch.Tensor  # () int64
    # The options' outputs, detached; None unless asked for.
    z_loss: torch.Tensor | None = None  # () float32, mean of lse_i^2 over rows with a target (z_loss > 0)
    lse: torch.Tensor | None = None  # (N,) float32, lse_i on rows with a target, NaN elsewhere (return_lse)
    token_accuracy: torch.Tensor | None = None  # () float32, share of LM rows with argmax = label (return_token_stats)
    entropy: torch.Tensor | None = None  # () float32, mean softmax entropy over LM rows (return_token_stats)


def _check_int(name: str, t: torch.Tensor | None) -> torch.Tensor | None:
    if t is None:
        return None
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in _INT_DTYPES:
        raise TypeError(f"{name} must be an int64 tensor, got dtype {t.dtype}")
    return t.long()


def _normalizer_error(name: str, value: float, held: str) -> ValueError | None:
    """The error for a normalizer's value (``held`` says how it was given), or None when it is fine."""
    if not (math.isfinite(value) and value >= 0):
        return ValueError(f"{name} {_NORMALIZER_RULE}, got {held}")
    tiny, largest = _NORMAL_FLOAT32
    if value != 0 and not tiny <= value <= largest:
        return ValueError(f"{name} must be 0 or a normal float32 number in [{tiny:.4g}, {largest:.4g}] (the loss is "
                          f"float32 and is divided by it), got {held}")
    return None


def _normalizer(name: str, value, device: torch.device) -> torch.Tensor | None:
    """An int or a 0-dim tensor -> a 0-dim device tensor (an int becomes a float32 fill: no host-to-device copy).

    A Python number is checked here (``_normalizer_error``); a tensor keeps its dtype and its value is checked inside
    the op, on the op's one host sync, so that a device-side count costs no extra synchronization and the error
    names the value given (a float64 1e39 is not the float32 inf it would become)."""
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be an int or a 0-dim tensor, got shape {tuple(value.shape)}")
        if value.dtype == torch.bool or value.is_complex():
            raise TypeError(f"{name} must be an int or a 0-dim tensor of real numbers, got dtype {value.dtype}")
        return value.reshape(()).to(device=device)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        error = _normalizer_error(name, float(value), repr(value))
        if error is not None:
            raise error
        return torch.full((), float(value), dtype=torch.float32, device=device)
    raise TypeError(f"{name} must be an int or a 0-dim tensor, got {type(value).__name__}")


def _normalizer_is_bad(t: torch.Tensor) -> torch.Tensor:  # () bool, on t's device: no sync
    tiny, largest = _NORMAL_FLOAT32
    return ~((t == 0) | ((t >= tiny) & (t <= largest)))  # NaN fails every comparison


def _check_options(reduction, label_smoothing, z_loss, return_lse, return_token_stats, has_head, num_items):
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if reduction == "none" and has_head:
        raise ValueError("reduction='none' gives one loss per row and the classification head's term belongs to no "
                         "row: use reduction='mean' or 'sum' with the head, or call safety_loss without cls_weight")
    if reduction != "mean" and num_items is not None:
        raise ValueError(f"num_items normalizes the token terms and reduction={reduction!r} does not normalize them: "
                         "drop num_items or use reduction='mean'")
    for name, value, rule, ok in (
            ("label_smoothing", label_smoothing, "a number in [0, 1)", lambda v: 0 <= v < 1),
            ("z_loss", z_loss, "a finite number >= 0", lambda v: math.isfinite(v) and v >= 0)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not ok(value):
            raise ValueError(f"{name} must be {rule}, got {value!r}")
    for name, value in (("return_lse", return_lse), ("return_token_stats", return_token_stats)):
        if not isinstance(value, bool):
            raise TypeError(f"{name} must be True or False, got {value!r}")


def _validate_and_flatten(hidden, lm_weight, labels, lm_bias, transition_labels, cls_weight, cls_bias,
                          cls_index, cls_labels, num_items, num_cls, softcap, backend, chunk_size):
    for name, t in (("hidden", hidden), ("lm_weight", lm_weight)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if hidden.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"hidden must be float32, bfloat16 or float16, got {hidden.dtype}")
    if hidden.dim() not in (2, 3):
        raise ValueError(f"hidden must be (N, H) or (B, T, H), got shape {tuple(hidden.shape)}")
    if lm_weight.dim() != 2 or lm_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_weight must be (V, H) with H = {hidden.shape[-1]} (hidden's last dim), "
                         f"got shape {tuple(lm_weight.shape)}")
    if lm_weight.shape[0] == 0:
        raise ValueError("lm_weight has V = 0 rows: the vocabulary is empty")
    if hidden.shape[-1] == 0:
        raise ValueError(f"hidden has H = 0 features (shape {tuple(hidden.shape)}): there is nothing to project")
    device, dtype = hidden.device, hidden.dtype
    vocab, hidden_size = lm_weight.shape

    def same_kind(name, t, shape):
        if t is None:
            return
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.device != device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {device}")
        if shape is not None and tuple(t.shape) != tuple(shape):
            raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")

    for name, t in (("lm_weight", lm_weight), ("lm_bias", lm_bias), ("cls_weight", cls_weight),
                    ("cls_bias", cls_bias)):
        if t is not None and isinstance(t, torch.Tensor) and t.dtype != dtype:
            raise TypeError(f"{name} must have hidden's dtype {dtype}, got {t.dtype}")
    same_kind("lm_weight", lm_weight, None)
    same_kind("lm_bias", lm_bias, (vocab,))
    labels = _check_int("labels", labels)
    same_kind("labels", labels, hidden.shape[:-1])
    transition_labels = _check_int("transition_labels", transition_labels)
    same_kind("transition_labels", transition_labels, hidden.shape[:-1])

    head = {"cls_weight": cls_weight, "cls_index": cls_index, "cls_labels": cls_labels}
    given = [k for k, v in head.items() if v is not None]
    if given and len(given) != 3:
        missing = [k for k in head if head[k] is None]
        raise ValueError(f"the classification head needs cls_weight, cls_index and cls_labels together; "
                         f"got {', '.join(given)} without {', '.join(missing)}")
    if cls_bias is not None and cls_weight is None:
        raise ValueError("cls_bias was given without cls_weight")
    if cls_weight is not None:
        if cls_weight.dim() != 2 or cls_weight.shape[1] != hidden_size:
            raise ValueError(f"cls_weight must be (C, H) with H = {hidden_size}, got shape {tuple(cls_weight.shape)}")
        classes = cls_weight.shape[0]
        if not MIN_CLASSES <= classes <= MAX_CLASSES:
            raise ValueError(f"cls_weight must have {MIN_CLASSES} <= C <= {MAX_CLASSES} classes, got C = {classes}")
        same_kind("cls_weight", cls_weight, None)
        same_kind("cls_bias", cls_bias, (classes,))
        cls_index = _check_int("cls_index", cls_index)
        cls_labels = _check_int("cls_labels", cls_labels)
        if cls_index.dim() != 1:
            raise ValueError(f"cls_index must be 1-D (S,), got shape {tuple(cls_index.shape)}")
        same_kind("cls_index", cls_index, None)
        same_kind("cls_labels", cls_labels, cls_index.shape)
    num_items = _normalizer("num_items", num_items, device)
    num_cls = _normalizer("num_cls", num_cls, device)
    if softcap is not None and not (isinstance(softcap, (int, float)) and not isinstance(softcap, bool)
                                    and math.isfinite(softcap) and softcap > 0):
        raise ValueError(f"softcap must be None or a number > 0 (finite, not a bool), got {softcap!r}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or an int >= 1, got {chunk_size!r}")

    hidden = hidden.reshape(-1, hidden_size).contiguous()
    labels = labels.reshape(-1).contiguous()
    if transition_labels is not None:
        transition_labels = transition_labels.reshape(-1).contiguous()
    return (hidden, lm_weight.contiguous(), labels, lm_bias, transition_labels,
            None if cls_weight is None else cls_weight.contiguous(), cls_bias, cls_index, cls_labels, num_items,
            num_cls)


def _range_errors(counts: Sequence[int], labels, transition_labels, cls_index, cls_labels, vocab, rows,
                  classes, ignore_index):
    """Names the first offending value; only reached when a check failed, so its syncs cost nothing."""
    def first_bad(t, bad):
        i = int(torch.nonzero(bad.reshape(-1))[0, 0])
        return i, int(t.reshape(-1)[i])

    if counts[0]:
        i, v = first_bad(labels, (labels != ignore_index) & ((labels < 0) | (labels >= vocab)))
        raise ValueError(f"labels[{i}] = {v} is outside [0, V = {vocab}) and is not ignore_index ({ignore_index})")
    if counts[1]:
        i, v = first_bad(transition_labels, (transition_labels != ignore_index)
                         & ((transition_labels < 0) | (transition_labels >= vocab)))
        raise ValueError(f"transition_labels[{i}] = {v} is outside [0, V = {vocab}) and is not ignore_index "
                         f"({ignore_index})")
    if counts[2]:
        i, v = first_bad(cls_index, (cls_index < 0) | (cls_index >= rows))
        raise ValueError(f"cls_index[{i}] = {v} is outside [0, N = {rows}) rows")
    if counts[3]:
        i, v = first_bad(cls_labels, (cls_labels != ignore_index) & ((cls_labels < 0) | (cls_labels >= classes)))
        raise ValueError(f"cls_labels[{i}] = {v} is outside [0, C = {classes}) and is not ignore_index "
                         f"({ignore_index})")


_EMPTY = (0,)
# Where the op's inputs sit in its schema (setup_context reads them by position; it gets all 25, defaults included).
_GRAD_MASK, _REDUCTION = 19, 20
_NUM_INPUTS = 25


@torch.library.custom_op("scft_fast::safety_loss", mutates_args=())
def _safety_loss_op(
    hidden: torch.Tensor,  # (N, H)
    lm_weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    lm_bias: Optional[torch.Tensor],  # (V,)
    transition_labels: Optional[torch.Tensor],  # (N,)
    cls_weight: Optional[torch.Tensor],  # (C, H)
    cls_bias: Optional[torch.Tensor],  # (C,)
    cls_index: Optional[torch.Tensor],  # (S,)
    cls_labels: Optional[torch.Tensor],  # (S,)
    num_items: Optional[torch.Tensor],  # () any real dtype
    num_cls: Optional[torch.Tensor],  # () any real dtype
    lm_coef: float,
    transition_coef: float,
    cls_coef: float,
    ignore_index: int,
    softcap: Optional[float],
    backend: str,
    chunk_size: int,
    validate: bool,
    grad_mask: Sequence[bool],  # needs grad: hidden, lm_weight, lm_bias, cls_weight, cls_bias
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    return_token_stats: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
           torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss () or (N,) for "none", stats (5,) float32 [lm_sum, tr_sum, cls_sum, lse_sq_sum, entropy_sum],
    counts (5,) int64 [n_lm, n_tr, n_cls, n_target, n_correct], cls_logits (S, C), lse (N,), grad_hidden (N, H),
    grad_lm_weight (V, H), grad_lm_bias (V,), grad_cls_weight (C, H), grad_cls_bias (C,)); lse when not asked for, and
    a gradient not asked for by grad_mask (every gradient with reduction="none": its backward computes them) are
    empty (0,) tensors."""
    # The inputs already carry the dtype to compute in (see _autocast_inputs): no inner op may recast.
    with torch.autocast(hidden.device.type, enabled=False):
        return _safety_loss_impl(hidden, lm_weight, labels, lm_bias, transition_labels, cls_weight, cls_bias,
                                 cls_index, cls_labels, num_items, num_cls, lm_coef, transition_coef, cls_coef,
                                 ignore_index, softcap, backend, chunk_size, validate, grad_mask, reduction,
                                 label_smoothing, z_loss, return_lse, return_token_stats)


def _safety_loss_impl(hidden, lm_weight, labels, lm_bias, transition_labels, cls_weight, cls_bias, cls_index,
                      cls_labels, num_items, num_cls, lm_coef, transition_coef, cls_coef, ignore_index, softcap,
                      backend, chunk_size, validate, grad_mask, reduction, label_smoothing, z_loss, return_lse,
                      return_token_stats):
    device = hidden.device
    rows_total, vocab = hidden.shape[0], lm_weight.shape[0]
    impl = resolve_backend(backend, device)
    if transition_labels is None:
        transition_labels = torch.full_like(labels, ignore_index)
    lm_valid = labels != ignore_index
    tr_valid = transition_labels != ignore_index
    has_target = lm_valid | tr_valid
    # Counts stay int64 from here to the caller: a float32 count is off by one past 2^24 rows.
    n_lm, n_tr, n_target = lm_valid.sum(), tr_valid.sum(), has_target.sum()
    classes = cls_weight.shape[0] if cls_weight is not None else 0
    n_cls = torch.zeros((), dtype=torch.int64, device=device)

    # The one host sync of the call: how many rows to visit, how many pooled rows carry a label, whether the
    # normalizers hold valid values, and the range checks when asked.
    probes = [n_target]
    if cls_weight is not None:
        n_cls = (cls_labels != ignore_index).sum()
        probes.append(n_cls)
    normalizers = [(name, t) for name, t in (("num_items", num_items), ("num_cls", num_cls)) if t is not None]
    probes += [_normalizer_is_bad(t).long() for _, t in normalizers]
    if validate:
        probes += [
            (lm_valid & ((labels < 0) | (labels >= vocab))).sum(),
            (tr_valid & ((transition_labels < 0) | (transition_labels >= vocab))).sum(),
        ]
        if cls_weight is not None:
            probes += [((cls_index < 0) | (cls_index >= rows_total)).sum(),
                       ((cls_labels != ignore_index) & ((cls_labels < 0) | (cls_labels >= classes))).sum()]
    counts = torch.stack(probes).tolist()
    num_rows = counts.pop(0)
    labeled_pooled = counts.pop(0) if cls_weight is not None else 0
    bad_normalizers, ranges = counts[:len(normalizers)], counts[len(normalizers):]
    for (name, t), bad in zip(normalizers, bad_normalizers):
        if bad:
            raise _normalizer_error(name, float(t), f"a tensor holding {float(t)}")
    if validate and any(ranges):
        _range_errors(ranges + [0, 0], labels, transition_labels, cls_index, cls_labels, vocab,
                      rows_total, classes, ignore_index)
    rows = None if num_rows == rows_total else torch.nonzero_static(has_target, size=num_rows).squeeze(1)
    num_items = None if num_items is None else num_items.float()
    num_cls = None if num_cls is None else num_cls.float()

    if reduction == "mean":
        denom = (n_lm + n_tr).float() if num_items is None else num_items
        inv = torch.where(denom > 0, 1.0 / denom.clamp_min(_NORMAL_FLOAT32[0]), torch.zeros_like(denom))
    else:  # "sum" and "none" leave the token terms unnormalized
        inv = torch.ones((), dtype=torch.float32, device=device)
    lm_scale = (lm_coef * inv).float()
    tr_scale = (transition_coef * inv).float()
    z_scale = (z_loss * inv).float() if z_loss else None

    per_row = reduction == "none"
    need_h, need_w, need_b, need_cw, need_cb = grad_mask  # False for an input that is None
    if per_row:  # its backward computes the token gradients (and it has no head)
        need_h = need_w = need_b = False
    grad_hidden = None
    if need_h:
        # Visited rows are written by the chunk loop; skipped rows keep a zero gradient.
        grad_hidden = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
    row_stats = None
    if per_row or z_loss or return_lse or return_token_stats:
        row_stats = torch.zeros(rows_total, ROW_STATS, dtype=torch.float32, device=device)
        row_stats[:, ROW_LSE] = torch.nan
    sums, grad_w, grad_b = chunked_token_loss(
        hidden, lm_weight, lm_bias, labels, transition_labels, rows, lm_scale, tr_scale,
        epilogue=impl.epilogue, softcap=softcap, ignore_index=ignore_index,
        chunk_size=chunk_size if chunk_size > 0 else None,
        grad_hidden=grad_hidden, need_grad_weight=need_w, need_grad_bias=need_b,
        label_smoothing=label_smoothing, z_scale=z_scale, row_stats=row_stats, token_stats=return_token_stats)
    token_loss = lm_scale * sums[0] + tr_scale * sums[1]

    zero = torch.zeros((), dtype=torch.float32, device=device)
    lse_sq_sum, entropy_sum, n_correct = zero, zero, torch.zeros((), dtype=torch.int64, device=device)
    lse = torch.empty(_EMPTY, dtype=torch.float32, device=device)
    if row_stats is not None:
        lse_sq = torch.where(has_target, row_stats[:, ROW_LSE], 0.0).square()
        lse_sq_sum = lse_sq.sum()
        entropy_sum = row_stats[:, ROW_ENTROPY].sum()
        n_correct = row_stats[:, ROW_CORRECT].to(torch.int64).sum()
        if return_lse:
            lse = row_stats[:, ROW_LSE].contiguous()
        if per_row:
            token_loss = lm_coef * row_stats[:, ROW_LM_CE] + transition_coef * row_stats[:, ROW_TR_CE]
            if z_loss:
                token_loss = token_loss + z_loss * lse_sq
        elif z_loss:
            token_loss = token_loss + z_scale * lse_sq_sum

    cls_sum = torch.zeros((), dtype=torch.float32, device=device)
    cls_logits = torch.empty(_EMPTY, dtype=torch.float32, device=device)
    grad_cw = grad_cb = None
    loss = token_loss
    if cls_weight is not None:
        if num_cls is None:
            cls_scale = (cls_coef / n_cls.clamp_min(1).float()).float()
        else:  # like num_items: a normalizer of 0 gives a term of 0
            cls_scale = torch.where(num_cls > 0, cls_coef / num_cls.clamp_min(_NORMAL_FLOAT32[0]),
                                    torch.zeros_like(num_cls)).float()
        need_cls_grad = need_h or need_cw or need_cb
        pooled_index = cls_index
        if labeled_pooled == cls_index.numel():
            ce, cls_logits, grad_pooled, grad_cw, grad_cb = impl.cls_head(
                hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale, ignore_index, need_cls_grad)
        else:
            # An unlabeled pooled row (a harmful-prefix sample, say) takes no part in the loss: the head's loss and
            # gradients run over the labeled rows alone, so a non-finite unlabeled row cannot turn them into NaN
            # (NaN x 0); the logits of every pooled row are still reported.
            cls_logits = impl.cls_head(hidden, cls_index, cls_labels, cls_weight, cls_bias, cls_scale,
                                       ignore_index, False)[1]
            labeled = torch.nonzero_static(cls_labels != ignore_index, size=labeled_pooled).squeeze(1)
            pooled_index = cls_index[labeled]
            ce, _, grad_pooled, grad_cw, grad_cb = impl.cls_head(
                hidden, pooled_index, cls_labels[labeled], cls_weight, cls_bias, cls_scale, ignore_index,
                need_cls_grad)
        cls_sum = ce.sum()
        loss = loss + cls_scale * cls_sum
        if need_h and pooled_index.numel():
            grad_hidden.index_add_(0, pooled_index, grad_pooled.to(hidden.dtype))
    stats = torch.stack([sums[0], sums[1], cls_sum, lse_sq_sum, entropy_sum])
    counts = torch.stack([n_lm, n_tr, n_cls, n_target, n_correct])

    def out(grad, needed, like, dtype):
        if not needed:
            return torch.empty(_EMPTY, dtype=dtype, device=device)
        return torch.zeros(like.shape, dtype=dtype, device=device) if grad is None else grad.to(dtype)

    # The parameters' gradients stay in their float32 accumulators until backward, where the scaling by the upstream
    # gradient and the cast to the parameter's dtype are one pass (a separate cast here would be one more).
    # ``loss`` is a fresh tensor, not a view: a caller may scale it in place (Trainer's ``loss *= ...``).
    f32 = torch.float32
    return (loss.float(), stats, counts, cls_logits.contiguous(), lse,
            out(grad_hidden, need_h, hidden, hidden.dtype), out(grad_w, need_w, lm_weight, f32),
            out(grad_b, need_b, lm_bias, f32), out(grad_cw, need_cw, cls_weight, f32),
            out(grad_cb, need_cb, cls_bias, f32))


@_safety_loss_op.register_fake
def _(hidden, lm_weight, labels, lm_bias, transition_labels, cls_weight, cls_bias, cls_index, cls_labels,
      num_items, num_cls, lm_coef, transition_coef, cls_coef, ignore_index, softcap, backend, chunk_size,
      validate, grad_mask, reduction="mean", label_smoothing=0.0, z_loss=0.0, return_lse=False,
      return_token_stats=False):
    f32 = dict(dtype=torch.float32, device=hidden.device)
    per_row = reduction == "none"

    def grad(needed, like, dtype=torch.float32):
        return hidden.new_empty(like.shape if needed and not per_row else _EMPTY, dtype=dtype)

    cls_logits = (hidden.new_empty((cls_index.shape[0], cls_weight.shape[0]), dtype=torch.float32)
                  if cls_weight is not None else hidden.new_empty(_EMPTY, dtype=torch.float32))
    need_h, need_w, need_b, need_cw, need_cb = grad_mask
    rows = (hidden.shape[0],)
    return (torch.empty(rows if per_row else (), **f32), torch.empty((5,), **f32),
            torch.empty((5,), dtype=torch.int64, device=hidden.device), cls_logits,
            torch.empty(rows if return_lse else _EMPTY, **f32), grad(need_h, hidden, hidden.dtype),
            grad(need_w, lm_weight), grad(need_b, lm_bias), grad(need_cw, cls_weight), grad(need_cb, cls_bias))


@torch.library.custom_op("scft_fast::safety_loss_rows_backward", mutates_args=())
def _rows_backward_op(
    grad_rows: torch.Tensor,  # (N,) float32, the upstream gradient of reduction="none"'s per-row losses
    hidden: torch.Tensor,  # (N, H)
    lm_weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # (N,)
    lm_bias: Optional[torch.Tensor],  # (V,)
    transition_labels: Optional[torch.Tensor],  # (N,)
    lm_coef: float,
    transition_coef: float,
    z_loss: float,
    label_smoothing: float,
    ignore_index: int,
    softcap: Optional[float],
    backend: str,
    chunk_size: int,
    grad_mask: Sequence[bool],  # needs grad: hidden, lm_weight, lm_bias
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(grad_hidden (N, H), grad_lm_weight (V, H), grad_lm_bias (V,)) of sum_i grad_rows[i] * loss_i, in the inputs'
    dtype; one not asked for is an empty (0,) tensor. The chunk loop runs again over the rows with a target and a
    nonzero upstream gradient, each row's scales multiplied by its grad_rows entry."""
    with torch.autocast(hidden.device.type, enabled=False):
        device = hidden.device
        impl = resolve_backend(backend, device)
        if transition_labels is None:
            transition_labels = torch.full_like(labels, ignore_index)
        g = grad_rows.float()
        visit = ((labels != ignore_index) | (transition_labels != ignore_index)) & (g != 0)
        num_rows = int(visit.sum())  # this backward's one host sync
        rows = None if num_rows == hidden.shape[0] else torch.nonzero_static(visit, size=num_rows).squeeze(1)
        need_h, need_w, need_b = grad_mask
        grad_hidden = None
        if need_h:
            grad_hidden = torch.empty_like(hidden) if rows is None else torch.zeros_like(hidden)
        _, grad_w, grad_b = chunked_token_loss(
            hidden, lm_weight, lm_bias, labels, transition_labels, rows, lm_coef * g, transition_coef * g,
            epilogue=impl.epilogue, softcap=softcap, ignore_index=ignore_index,
            chunk_size=chunk_size if chunk_size > 0 else None, grad_hidden=grad_hidden, need_grad_weight=need_w,
            need_grad_bias=need_b, label_smoothing=label_smoothing, z_scale=z_loss * g if z_loss else None)

        def out(grad, needed, like):
            if not needed:
                return torch.empty(_EMPTY, dtype=hidden.dtype, device=device)
            return torch.zeros(like.shape, dtype=hidden.dtype, device=device) if grad is None else grad.to(hidden.dtype)

        return out(grad_hidden, need_h, hidden), out(grad_w, need_w, lm_weight), out(grad_b, need_b, lm_bias)


@_rows_backward_op.register_fake
def _(grad_rows, hidden, lm_weight, labels, lm_bias, transition_labels, lm_coef, transition_coef, z_loss,
      label_smoothing, ignore_index, softcap, backend, chunk_size, grad_mask):
    return tuple(hidden.new_empty(like.shape if needed else _EMPTY)
                 for needed, like in zip(grad_mask, (hidden, lm_weight, lm_bias)))


def _setup_context(ctx, inputs, output):
    ctx.grad_mask = inputs[_GRAD_MASK]
    ctx.reduction = inputs[_REDUCTION]
    ctx.dtype = inputs[0].dtype  # every floating input has hidden's dtype (validated)
    # The outputs other than the loss never receive a gradient: no zero tensors of their shapes (grad_W's (V, H)
    # above all) are materialized for them; they arrive as None.
    ctx.set_materialize_grads(False)
    if ctx.reduction == "none":
        lm_coef, transition_coef, _, ignore_index, softcap, backend, chunk_size = inputs[11:18]
        label_smoothing, z_loss = inputs[21:23]
        ctx.save_for_backward(*inputs[:5])  # hidden, lm_weight, labels, lm_bias, transition_labels
        ctx.rows_options = (lm_coef, transition_coef, z_loss, label_smoothing, ignore_index, softcap, backend,
                            chunk_size)
    else:
        ctx.backward_done = False
        ctx.save_for_backward(*output[5:])


def _backward(ctx, grad_loss, *unused):
    if grad_loss is None:
        return (None,) * _NUM_INPUTS
    if ctx.reduction == "none":
        return _backward_rows(ctx, grad_loss)
    # The gradients were computed in forward; scaling them in place by the upstream gradient (or, for a
    # low-precision parameter, into its dtype straight from the float32 accumulator) keeps the peak at one
    # accumulator plus one grad_W (as Liger does), at the price of a single backward per forward.
    if ctx.backward_done:
        raise RuntimeError("safety_loss: backward ran twice through the same forward (retain_graph=True); "
                           "its gradients are precomputed in forward and scaled in place, so call the op again")
    ctx.backward_done = True
    grad_h, grad_w, grad_b, grad_cw, grad_cb = ctx.saved_tensors
    need_h, need_w, need_b, need_cw, need_cb = ctx.grad_mask

    # Traced backward graphs (torch.compile, AOT autograd: tensor subclasses) may not mutate saved outputs.
    in_place = type(grad_loss) is torch.Tensor and not torch.compiler.is_compiling()

    def scaled(grad, needed):
        """grad * grad_loss in the input dtype, one pass: in place, or fused with the float32 -> dtype cast."""
        if not needed:
            return None
        if not in_place:
            return (grad * grad_loss).to(ctx.dtype)
        if grad.dtype == ctx.dtype:
            return grad.mul_(grad_loss.to(grad.dtype))
        return torch.mul(grad, grad_loss, out=torch.empty(grad.shape, dtype=ctx.dtype, device=grad.device))

    return (scaled(grad_h, need_h), scaled(grad_w, need_w), None, scaled(grad_b, need_b), None,
            scaled(grad_cw, need_cw), scaled(grad_cb, need_cb)) + (None,) * (_NUM_INPUTS - 7)


def _backward_rows(ctx, grad_rows):
    """reduction="none": the token gradients, recomputed with each row's upstream gradient (the module docstring)."""
    hidden, lm_weight, labels, lm_bias, transition_labels = ctx.saved_tensors
    need_h, need_w, need_b = ctx.grad_mask[:3]
    grad_h, grad_w, grad_b = torch.ops.scft_fast.safety_loss_rows_backward(
        grad_rows, hidden, lm_weight, labels, lm_bias, transition_labels, *ctx.rows_options, [need_h, need_w, need_b])
    return ((grad_h if need_h else None), (grad_w if need_w else None), None, (grad_b if need_b else None)) + (
        None,) * (_NUM_INPUTS - 4)


_safety_loss_op.register_autograd(_backward, setup_context=_setup_context)


def _autocast_inputs(*tensors):
    """Under autocast the op runs in the autocast dtype, as the LM head's matmul would (Liger does the
    same); the casts are differentiable, so float32 master weights still receive float32 gradients."""
    first = tensors[0]
    if not isinstance(first, torch.Tensor) or not torch.is_autocast_enabled(first.device.type):
        return tensors
    dtype = torch.get_autocast_dtype(first.device.type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def safety_loss(
    hidden: torch.Tensor,  # (N, H) or (B, T, H)
    lm_weight: torch.Tensor,  # (V, H)
    labels: torch.Tensor,  # hidden.shape[:-1], already shifted
    *,
    lm_bias: torch.Tensor | None = None,  # (V,)
    transition_labels: torch.Tensor | None = None,  # like labels
    cls_weight: torch.Tensor | None = None,  # (C, H)
    cls_bias: torch.Tensor | None = None,  # (C,)
    cls_index: torch.Tensor | None = None,  # (S,) flat row indices
    cls_labels: torch.Tensor | None = None,  # (S,)
    lm_coef: float = 1.0,
    transition_coef: float = 1.0,
    cls_coef: float = 1.0,
    num_items: int | torch.Tensor | None = None,
    ignore_index: int = IGNORE_INDEX,
    softcap: float | None = None,
    backend: str = "auto",
    chunk_size: int | None = None,
    validate: bool = True,
    num_cls: int | torch.Tensor | None = None,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
    z_loss: float = 0.0,
    return_lse: bool = False,
    return_token_stats: bool = False,
) -> SafetyLossOutput:
    """LM + RTO transition + SCFT classification loss, never materializing the N x V logits.

    token_loss = (lm_coef * lm_sum + transition_coef * tr_sum) / D, D = num_items or n_lm + n_tr (0 if D = 0)
    cls_loss   = mean cross-entropy of hidden[cls_index] @ cls_weight.T (+ cls_bias) over labeled rows
    loss       = token_loss + cls_coef * cls_loss
    Rows with neither an LM nor a transition target skip the vocabulary entirely. ``validate=False``
    skips the label range checks (their reductions ride on the op's single host sync anyway).
    ``num_cls`` overrides the classification term's normalizer (the labeled pooled rows) the way
    ``num_items`` overrides the token term's, so that accumulated micro-batches equal one large batch.

    Options (each default leaves the result bit for bit what it is without it, and runs no extra work):
    - ``reduction``: "mean" (above); "sum": the token terms are not divided by D (the head term as above);
      "none": ``loss`` is (N,) float32, row i = lm_coef * CE_lm_i + transition_coef * CE_tr_i (+ z_loss * lse_i^2),
      0 on rows with neither target, differentiable for any upstream gradient; its backward recomputes the chunk
      loop (module docstring: 8 N H V FLOPs instead of 6, nothing kept from forward to backward but the inputs).
      No classification head and no ``num_items`` with it ("sum" takes no ``num_items`` either).
    - ``label_smoothing`` eps in [0, 1): the LM and transition targets use torch's smoothed cross-entropy,
      (1 - eps) * CE + eps * (lse - mean_j z_j), over the soft-capped logits when ``softcap`` is set; ``lm_loss`` and
      ``transition_loss`` report the smoothed terms. The head term is unaffected.
    - ``z_loss`` >= 0: each row with a target adds z_loss * lse_i^2 to its token term, normalized like the rest;
      ``out.z_loss`` is the mean of lse_i^2 over those rows.
    - ``return_lse``: ``out.lse`` (N,), lse_i on rows with a target, NaN on the others.
    - ``return_token_stats``: ``out.token_accuracy`` (share of LM-target rows whose argmax of z, first index on
      ties as torch.argmax, is the label) and ``out.entropy`` (mean entropy of softmax(z) over LM-target rows).
    They ride in the epilogue's sweeps over each logits row (safety_epilogue.py): one more sum per element for
    label smoothing, a running sum and an argmax for the token stats, a store per row for the lse.

    Where each term is computed. ``backend`` picks an epilogue and a head (backends.py; "auto" is triton on CUDA,
    cpu on CPU when the C++ extension builds, torch otherwise). The token terms run in the chunk loop shared by every
    backend, ``chunked_token_loss`` (chunked.py: per chunk of rows, the logits GEMM, the epilogue, two gradient
    GEMMs); the classification term runs after it, in the head, on the pooled rows hidden[cls_index]:

      term                   backend  kernel                  file (ops/ is scft_fast/ops/)
      LM + RTO transition    torch    safety_epilogue_torch   ops/safety_epilogue.py: the torch twin and the spec
      (the epilogue of each  triton   safety_epilogue_triton  kernels/safety_epilogue.py
      logits chunk)          cpu      safety_epilogue_cpu     ops/cpu_extension.py, loading csrc/safety_epilogue.cpp
      classification head    torch    cls_head_torch          ops/cls_head.py: the torch twin and the spec
                             triton   cls_head_triton         kernels/cls_head.py
                             cpu      cls_head_torch          ops/cls_head.py: the cpu backend uses the torch head
      float64 definitions    (tests)  safety_loss_ref, safety_epilogue_ref, cls_head_ref in ops/reference.py
    """
    _check_options(reduction, label_smoothing, z_loss, return_lse, return_token_stats, cls_weight is not None,
                   num_items)
    hidden, lm_weight, lm_bias, cls_weight, cls_bias = _autocast_inputs(hidden, lm_weight, lm_bias, cls_weight,
                                                                         cls_bias)
    (hidden2d, weight, labels1d, lm_bias, tr1d, cls_weight, cls_bias, cls_index, cls_labels,
     num_items, num_cls) = _validate_and_flatten(hidden, lm_weight, labels, lm_bias, transition_labels,
                                                 cls_weight, cls_bias, cls_index, cls_labels, num_items, num_cls,
                                                 softcap, backend, chunk_size)
    grad_on = torch.is_grad_enabled()
    grad_mask = [bool(grad_on and t is not None and t.requires_grad)
                 for t in (hidden, lm_weight, lm_bias, cls_weight, cls_bias)]
    loss, stats, counts, cls_logits, lse, *_ = _safety_loss_op(
        hidden2d, weight, labels1d, lm_bias, tr1d, cls_weight, cls_bias, cls_index, cls_labels, num_items, num_cls,
        float(lm_coef), float(transition_coef), float(cls_coef), int(ignore_index),
        None if softcap is None else float(softcap), backend, int(chunk_size or 0), bool(validate), grad_mask,
        reduction, float(label_smoothing), float(z_loss), return_lse, return_token_stats)
    stats, counts = stats.detach(), counts.detach()
    n_lm, n_tr, n_cls, n_target, n_correct = counts.unbind()
    return SafetyLossOutput(
        loss=loss,
        lm_loss=stats[0] / n_lm.clamp_min(1),
        transition_loss=stats[1] / n_tr.clamp_min(1),
        cls_loss=stats[2] / n_cls.clamp_min(1),
        cls_logits=cls_logits.detach() if cls_weight is not None else None,
        n_lm=n_lm,
        n_tr=n_tr,
        n_cls=n_cls,
        z_loss=stats[3] / n_target.clamp_min(1) if z_loss else None,
        lse=lse.detach() if return_lse else None,
        token_accuracy=n_correct / n_lm.clamp_min(1) if return_token_stats else None,
        entropy=stats[4] / n_lm.clamp_min(1) if return_token_stats else None,
    )
