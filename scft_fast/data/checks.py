"""check_batch: refuses a collated batch that the model's forward would train silently wrong, from any collator
(ours, TRL's, a user's own).

    labels / transition_labels not shaped like input_ids   ValueError naming the column and both shapes
    cls_index outside the batch's B * T rows                ValueError naming cls_index, the entry and its value
    cls_index on padding (attention_mask 0, or past the
      packed sequences' end, cu_seqlens[-1])                ValueError
    cls_index entry s pooling another sequence than s       ValueError (checked when there is one entry per
      (row s of a padded batch, sequence s of a packed row)   sequence, as every collator here gives)
    cu_seqlens not 0, non-decreasing, <= B * T              ValueError naming the key
    no target at all: every label and transition label      NoTargetWarning
      ignored after the model's shift, no labeled cls row

Targets are counted as the model counts them: after its shift (``shift_labels``), so a sequence's first token is
never a target, nor in a packed row (``position_ids`` restarting at 0, or ``cu_seqlens`` / ``cu_seq_lens_q``) the
first token of each sequence. A packed row's sequences come from cu_seqlens, else from position_ids; a padded
batch's from its rows and attention_mask, the order the model's pooling reads them in.

The whole check costs one host sync (one ``tolist`` of a few counts); errors are then located with more.
"""
from __future__ import annotations

import warnings

import torch

from ..constants import IGNORE_INDEX
from .collate import positions_from_cu_seqlens, shift_labels

TOKEN_TARGETS = ("labels", "transition_labels")
CU_SEQLENS_KEYS = ("cu_seqlens", "cu_seq_lens_q")  # ours; flash-attn's kwarg name (SCFTDataCollator, TRL)


class NoHeadLabelWarning(UserWarning):
    """A model with an SCFT head whose first training batch carries no ``cls_labels``: the head does not train."""


class NoTargetWarning(UserWarning):
    """A batch with no loss target at all: its loss and gradient are 0, nothing trains. A warning, not an error, as
    one micro-batch may lack targets by chance. Python's default filter shows it once per process (its text is
    fixed); ``warnings.simplefilter("error", NoTargetWarning)`` or
    ``-W error::scft_fast.data.checks.NoTargetWarning`` makes it an error."""


def check_batch(batch: dict, ignore_index: int = IGNORE_INDEX) -> None:
    """Raises ValueError on a batch that would train silently wrong and warns (NoTargetWarning) when it has no
    target at all; see the module docstring for the list."""
    reference = batch["input_ids"] if batch.get("input_ids") is not None else batch["inputs_embeds"]
    B, T = reference.shape[:2]
    N, device = B * T, reference.device
    for key in TOKEN_TARGETS:
        if batch.get(key) is not None and tuple(batch[key].shape) != (B, T):
            raise ValueError(f"{key!r} has shape {tuple(batch[key].shape)} and 'input_ids' {(B, T)}: expected one "
                             f"{key} entry per token (unshifted, HF convention; the model shifts)")
    cls_index, cls_labels = batch.get("cls_index"), batch.get("cls_labels")
    if cls_index is not None and cls_labels is not None and cls_index.numel() != cls_labels.numel():
        raise ValueError(f"'cls_index' has {cls_index.numel()} entries and 'cls_labels' {cls_labels.numel()}: "
                         "expected one pooled row per label")
    layout = _Layout(batch, B, T, device)

    targets = torch.zeros((), dtype=torch.long, device=device)
    for key in TOKEN_TARGETS:
        if batch.get(key) is not None:
            targets = targets + (shift_labels(batch[key], layout.position_ids, ignore_index) != ignore_index).sum()
    if cls_labels is not None:
        targets = targets + (cls_labels != ignore_index).sum()
    misplaced = torch.zeros((), dtype=torch.bool, device=device)
    if cls_index is not None:
        index = cls_index.reshape(-1).to(device).long()
        pooled = index.clamp(0, N - 1)
        own = layout.sequence[pooled] == torch.arange(index.numel(), device=device)
        misplaced = ((index < 0) | (index >= N) | ~layout.real[pooled] | ~own).any()
    flags = torch.stack([t.long() for t in (layout.valid, misplaced, layout.count, targets)])
    valid, any_misplaced, count, n_targets = flags.tolist()  # the one host sync

    if not valid:
        raise ValueError(f"{layout.cu_key!r} = {batch[layout.cu_key].tolist()} is not a list of packed sequence "
                         f"boundaries: expected 0 first, non-decreasing, at most B * T = {N}")
    if any_misplaced:
        _refuse_pooled_rows(index.tolist(), layout.real[pooled].tolist(), layout.sequence[pooled].tolist(),
                            index.numel() == count, layout, batch, T, N)
    if not n_targets:
        present = ", ".join(repr(key) for key in (*TOKEN_TARGETS, "cls_labels") if batch.get(key) is not None)
        warnings.warn(f"no loss target in the batch: every entry of {present} is ignore_index ({ignore_index}) "
                      "after the model's shift (a sequence's first token is never a target), so the loss and its "
                      "gradient are 0 and nothing trains; check the label columns, or rows cut down to their "
                      "prompt by max_length", NoTargetWarning, stacklevel=2)


def _refuse_pooled_rows(index: list[int], real: list[bool], sequence: list[int], one_per_sequence: bool,
                        layout: "_Layout", batch: dict, T: int, N: int) -> None:
    """Raises the error of cls_index's first misplaced entry; a later bad entry is reported once this one is fixed.
    An entry in another sequence than its own is one only when there is one entry per sequence."""
    for i, (row, is_real, seq) in enumerate(zip(index, real, sequence)):
        if not 0 <= row < N:
            raise ValueError(f"'cls_index'[{i}] = {row} is outside the batch's B * T = {N // T} * {T} rows: "
                             f"expected the flat row b * T + t of a pooled token, in [0, {N})")
        if is_real and one_per_sequence and seq != i:
            if layout.packed:
                raise ValueError(f"'cls_index'[{i}] = {row} pools a token of packed sequence {seq}, not of sequence "
                                 f"{i}: expected sequence {i}'s first row plus its pooled position")
            raise ValueError(f"'cls_index'[{i}] = {row} pools row {seq} of the batch, not row {i}: expected the "
                             f"flat row {i} * T + t (T = {T}) of row {i}'s pooled token t")
        if not is_real:
            where = (f"past the end of the packed sequences ({layout.cu_key}[-1] = {int(batch[layout.cu_key][-1])})"
                     if layout.cu_key else f"a padding token (row {row // T}, position {row % T}: attention_mask 0)")
            raise ValueError(f"'cls_index'[{i}] = {row} pools {where}: expected a real token of its sequence, "
                             "e.g. its EOS")


class _Layout:
    """The sequences of a batch, read as the model reads them: a packed row's from cu_seqlens (either key), else
    from position_ids restarting at 0 when there is no attention_mask; a padded batch's from its rows.
    sequence (N,): each flat row's sequence; real (N,): not padding; count: the number of sequences; valid:
    cu_seqlens, if any, are boundaries; position_ids: what the model's shift reads. All on the batch's device, made
    there (a host tensor copied over would be a host sync of its own)."""

    def __init__(self, batch: dict, B: int, T: int, device: torch.device):
        N = B * T
        flat = torch.arange(N, device=device)
        self.cu_key = next((key for key in CU_SEQLENS_KEYS if batch.get(key) is not None), None)
        self.position_ids = batch.get("position_ids")
        self.valid = torch.ones((), dtype=torch.bool, device=device)
        self.packed = self.cu_key is not None or (batch.get("attention_mask") is None and
                                                  self.position_ids is not None)
        if self.cu_key is not None:
            bounds = batch[self.cu_key].to(device).long()
            self.valid = (bounds[0] == 0) & (torch.diff(bounds) >= 0).all() & (bounds[-1] <= N)
            if self.position_ids is None:  # as the model does; clamped: bounds refused below must not crash here
                self.position_ids = positions_from_cu_seqlens(bounds.clamp(0, T), T)
            self.sequence = torch.searchsorted(bounds[1:], flat, right=True)
            self.real = flat < bounds[-1]
            self.count = torch.full((), bounds.numel() - 1, device=device)
        elif self.packed:
            starts = (self.position_ids.expand(B, T) == 0).clone()
            starts[:, 0] = True
            self.sequence = starts.reshape(-1).long().cumsum(0) - 1
            self.real = torch.ones(N, dtype=torch.bool, device=device)
            self.count = self.sequence[-1] + 1
        else:
            mask = batch.get("attention_mask")
            self.sequence = flat // T
            self.real = mask.reshape(-1) != 0 if mask is not None else torch.ones(N, dtype=torch.bool, device=device)
            self.count = torch.full((), B, device=device)
