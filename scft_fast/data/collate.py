"""Collators: lists of dataset rows -> plain dicts of tensors whose keys are the model's forward arguments.

PaddedCollator, B rows padded to T (a multiple of pad_to_multiple_of):
    input_ids, attention_mask, labels, transition_labels: (B, T) int64
    position_ids: (B, T) int64, left padding only (positions count real tokens, 0 on padding)
    cls_labels, cls_index: (B,) int64; cls_index is the flat row b * T + t of each pooled token.

PackedCollator, S rows packed into one row of L = sum of lengths <= max_tokens tokens (no padding, no mask):
    input_ids, position_ids, labels, transition_labels: (1, L) int64; position_ids restart at 0 per sequence
    cu_seqlens: (S + 1,) int32, cumulative sequence starts for flash-attn's varlen kernels; max_seqlen: int
    cls_labels, cls_index: (S,) int64; cls_index is the flat row start_s + cls_pos_s.
    The first token of every sequence has no label: after the model's shift the last token of a sequence
    would otherwise be trained to predict the next sequence's first token.

PackedBatchSampler(lengths, max_tokens) yields lists of dataset indices whose lengths sum to <= max_tokens,
to pass as a DataLoader's batch_sampler alongside PackedCollator:

    loader = DataLoader(dataset, batch_sampler=PackedBatchSampler(dataset["length"], 4096, seed=0),
                        collate_fn=PackedCollator(4096))

pad_sequences (right or left padding with its attention mask) and positions_from_mask (the position ids of a padded
row) are the padding rules of every padded batch here: the collators, generation's left-padded prompts, the model.
positions_from_cu_seqlens (a packed row's position ids) and shift_labels (HF-convention labels -> each row's target,
never across a packed boundary) are the model's rules for what a batch trains, which check_batch counts by.

check_rows refuses dataset rows that would train silently wrong (labels not one per token, a cls_pos outside its
sequence); every collator here calls it. checks.check_batch does the same for a collated batch from any collator.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ..constants import IGNORE_INDEX
from .constants import PAD_TO_MULTIPLE_OF

# The dataset columns the collators read: Trainer must keep them (see SCFTTrainerMixin) though they are no
# forward arguments.
INPUT_COLUMNS = ("input_ids", "labels", "transition_labels", "cls_pos", "cls_label")


def _tensor(row: dict, key: str) -> torch.Tensor:
    return torch.as_tensor(row[key], dtype=torch.long)


def pad_sequences(sequences: list, value: int, padding_side: str = "right",
                  multiple: int = 1) -> tuple[torch.Tensor, torch.Tensor]:  # -> (B, T) int64, (B, T) int64
    """Token lists padded with value on the right or the left to T (the longest, rounded up to a multiple), and the
    attention mask: 1 on the real tokens, 0 on the padding."""
    if padding_side not in ("right", "left"):
        raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
    lengths = [len(s) for s in sequences]
    B, T = len(sequences), -(-max(lengths, default=0) // multiple) * multiple
    padded = torch.full((B, T), value, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, (sequence, n) in enumerate(zip(sequences, lengths)):
        span = slice(0, n) if padding_side == "right" else slice(T - n, T)
        padded[b, span] = torch.as_tensor(sequence, dtype=torch.long)
        mask[b, span] = 1
    return padded, mask


def positions_from_mask(attention_mask: torch.Tensor) -> torch.Tensor:  # (B, T) -> (B, T) int64
    """Position ids that count real tokens only, 0 on padding: what a left-padded row needs (HF's default
    arange would start its tokens at the padding's length); equal to the arange on a right-padded row's tokens."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor,  # (S + 1,)
                              length: int) -> torch.Tensor:  # (1, length)
    cu = cu_seqlens.long()
    rows = torch.arange(length, device=cu.device)
    # Each row's sequence: the last boundary at or before it (an empty sequence, a repeated boundary, holds no row).
    sequence = torch.searchsorted(cu[1:], rows, right=True).clamp(max=cu.numel() - 2)
    return (rows - cu[sequence]).unsqueeze(0)


def shift_labels(labels: torch.Tensor,  # (B, T) HF convention: labels[t] is token t
                 position_ids: torch.Tensor | None,  # (B, T) or (T,) packed rows, restarting at 0
                 ignore_index: int) -> torch.Tensor:  # (B, T): row t's target, token t + 1
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if position_ids is not None:
        # The last row of each packed sequence must not predict the next sequence's first token.
        pos = position_ids.expand_as(labels)
        shifted = shifted.masked_fill(F.pad(pos[:, 1:] == 0, (0, 1), value=False), ignore_index)
    return shifted


def check_rows(rows: list[dict]) -> None:
    """Refuses dataset rows that would train silently wrong: a ``labels`` or ``transition_labels`` list that is not
    one entry per token (padding would fill a short one with ignore_index and drop its last targets, EOS included;
    packing would shift every later sequence's targets), or a ``cls_pos`` outside its sequence (the head would pool
    padding or another sequence). Any position inside is accepted: the data layer pools the EOS or the token before
    it, a user's own rows may pool elsewhere. Python ints only, cheap on every batch."""
    missing = [key for key in INPUT_COLUMNS if rows and key not in rows[0]]
    if missing:
        raise ValueError(
            f"the batch's rows have no {missing} column(s) (they hold {sorted(rows[0])}): expected rows of "
            f"scft_fast.data.build_dataset / safety_dataset. transformers.Trainer drops the columns its model's forward "
            f"does not take (remove_unused_columns=True): train with scft_fast.SCFTTrainer, which keeps the "
            f"collator's input_columns (or put SCFTTrainerMixin in front of your Trainer subclass)")
    for i, row in enumerate(rows):
        n = len(row["input_ids"])
        for key in ("labels", "transition_labels"):
            if len(row[key]) != n:
                raise ValueError(f"row {i} of the batch: {key!r} has {len(row[key])} entries and 'input_ids' {n}: "
                                 f"expected one {key} entry per token (unshifted, HF convention; the model shifts)")
        cls_pos = int(row["cls_pos"])
        if not 0 <= cls_pos < n:
            raise ValueError(f"row {i} of the batch: 'cls_pos' {cls_pos} is outside its sequence of {n} tokens: "
                             f"expected 0 <= cls_pos < {n} (its EOS: {n - 1})")


class PaddedCollator:
    input_columns = INPUT_COLUMNS

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, padding_side: str = "right",
                 ignore_index: int = IGNORE_INDEX):
        if padding_side not in ("right", "left"):
            raise ValueError(f"padding_side must be 'right' or 'left', got {padding_side!r}")
        self.pad_token_id, self.multiple = pad_token_id, max(1, pad_to_multiple_of)
        self.padding_side, self.ignore_index = padding_side, ignore_index

    def __call__(self, rows: list[dict]) -> dict:
        check_rows(rows)

        def pad(key: str, value: int) -> tuple[torch.Tensor, torch.Tensor]:
            return pad_sequences([row[key] for row in rows], value, self.padding_side, self.multiple)

        input_ids, attention_mask = pad("input_ids", self.pad_token_id)
        T = input_ids.shape[1]
        starts = [0 if self.padding_side == "right" else T - len(row["input_ids"]) for row in rows]
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": pad("labels", self.ignore_index)[0],
                 "transition_labels": pad("transition_labels", self.ignore_index)[0],
                 "cls_labels": torch.tensor([int(row["cls_label"]) for row in rows], dtype=torch.long),
                 "cls_index": torch.tensor([b * T + start + int(row["cls_pos"])
                                            for b, (row, start) in enumerate(zip(rows, starts))], dtype=torch.long)}
        if self.padding_side == "left":
            batch["position_ids"] = positions_from_mask(attention_mask)
        return batch


class PackedCollator:
    input_columns = INPUT_COLUMNS

    def __init__(self, max_tokens: int, ignore_index: int = IGNORE_INDEX):
        self.max_tokens, self.ignore_index = max_tokens, ignore_index

    def __call__(self, rows: list[dict]) -> dict:
        check_rows(rows)
        lengths = torch.tensor([len(row["input_ids"]) for row in rows], dtype=torch.long)
        if int(lengths.sum()) > self.max_tokens:
            raise ValueError(f"{len(rows)} sequences of {int(lengths.sum())} tokens exceed max_tokens="
                             f"{self.max_tokens}; batch them with PackedBatchSampler")
        starts = lengths.cumsum(0) - lengths  # (S,)
        labels = torch.cat([_tensor(row, "labels") for row in rows])
        transition_labels = torch.cat([_tensor(row, "transition_labels") for row in rows])
        labels[starts] = self.ignore_index
        transition_labels[starts] = self.ignore_index
        position_ids = torch.cat([torch.arange(int(n)) for n in lengths])
        cu_seqlens = torch.zeros(len(rows) + 1, dtype=torch.int32)
        cu_seqlens[1:] = lengths.cumsum(0)
        return {"input_ids": torch.cat([_tensor(row, "input_ids") for row in rows])[None],
                "position_ids": position_ids[None], "labels": labels[None],
                "transition_labels": transition_labels[None], "cu_seqlens": cu_seqlens,
                "max_seqlen": int(lengths.max()),
                "cls_labels": torch.tensor([int(row["cls_label"]) for row in rows], dtype=torch.long),
                "cls_index": starts + torch.tensor([int(row["cls_pos"]) for row in rows], dtype=torch.long)}


def rank_share(batches: list, rank: int, num_replicas: int) -> list:
    """Rank ``rank``'s batches: ``rank``, ``rank + num_replicas``, ... of the longest prefix that splits evenly,
    so every rank runs the same number of steps."""
    usable = len(batches) - len(batches) % num_replicas
    return batches[rank:usable:num_replicas]


class PackedBatchSampler:
    """Greedy packing in (seeded, per-epoch shuffled) order: a batch closes when the next sequence would overflow
    max_tokens. With num_replicas > 1, each rank takes its ``rank_share`` of the batches."""

    def __init__(self, lengths, max_tokens: int, shuffle: bool = True, seed: int = 0, num_replicas: int = 1,
                 rank: int = 0):
        self.lengths = np.asarray(lengths, dtype=np.int64)
        too_long = np.flatnonzero(self.lengths > max_tokens)
        if too_long.size:
            raise ValueError(f"{too_long.size} sequences are longer than max_tokens={max_tokens} (the first: index "
                             f"{too_long[0]}, {self.lengths[too_long[0]]} tokens); raise max_tokens or lower "
                             "max_length")
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank must be in [0, {num_replicas}), got {rank}")
        self.max_tokens, self.shuffle, self.seed = max_tokens, shuffle, seed
        self.num_replicas, self.rank, self.epoch = num_replicas, rank, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _batches(self) -> list[list[int]]:
        order = (np.random.default_rng([self.seed, self.epoch]).permutation(len(self.lengths)) if self.shuffle
                 else np.arange(len(self.lengths)))
        batches, batch, used = [], [], 0
        for i, n in zip(order.tolist(), self.lengths[order].tolist()):
            if used + n > self.max_tokens:
                batches.append(batch)
                batch, used = [], 0
            batch.append(i)
            used += n
        if batch:
            batches.append(batch)
        return rank_share(batches, self.rank, self.num_replicas)

    def __iter__(self):
        return iter(self._batches())

    def __len__(self) -> int:
        return len(self._batches())


class SCFTDataCollator:
    """The collator for ``SCFTTrainer`` (and any Trainer): rows of ``build_dataset`` -> the model's forward
    arguments. Padded: PaddedCollator's batch, padded with the tokenizer's pad token (EOS when it has none:
    pooling never reads pad ids). ``packing=True``: PackedCollator's single row, its boundaries under the names
    flash-attn's varlen path reads from the kwargs (``cu_seq_lens_q/k`` (S + 1,) int32, ``max_length_q/k``) and
    ``position_ids`` restarting per sequence, from which SDPA and eager attention build the block-diagonal mask.
    ``max_tokens`` bounds a packed row (default: no bound, the batch's rows whatever their lengths)."""

    input_columns = INPUT_COLUMNS

    def __init__(self, tokenizer, *, packing: bool = False, max_tokens: int | None = None,
                 pad_to_multiple_of: int = PAD_TO_MULTIPLE_OF, padding_side: str = "right",
                 ignore_index: int = IGNORE_INDEX):
        self.tokenizer, self.packing = tokenizer, packing
        if packing:
            self.collate = PackedCollator(max_tokens if max_tokens is not None else math.inf, ignore_index)
            return
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        if pad is None:
            raise ValueError("tokenizer has neither pad_token_id nor eos_token_id: SCFTDataCollator needs a pad id")
        self.collate = PaddedCollator(pad, pad_to_multiple_of, padding_side, ignore_index)

    def __call__(self, rows: list[dict]) -> dict:
        batch = self.collate(rows)
        if self.packing:
            cu_seqlens, longest = batch.pop("cu_seqlens"), batch.pop("max_seqlen")
            batch.update(cu_seq_lens_q=cu_seqlens, cu_seq_lens_k=cu_seqlens, max_length_q=longest,
                         max_length_k=longest)
        return batch
