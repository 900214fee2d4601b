"""Which row of a batch holds each sequence's last real token (SCFT pools there)."""
from __future__ import annotations

import torch


def last_token_index(
    attention_mask: torch.Tensor | None = None,  # (B, T) 1 = real token, right or left padded
    *,
    position_ids: torch.Tensor | None = None,  # (B, T) or (T,): packed rows, restarting at 0 per sequence
    cu_seqlens: torch.Tensor | None = None,  # (S + 1,) cumulative sequence lengths of a packed row
) -> torch.Tensor:  # (S,) int64 flat row indices into the B*T rows
    """Flat row index of each sequence's last real token, for padded and packed batches.

    Exactly one source is used, in this order: ``cu_seqlens`` (packed: sequence s ends at row
    cu_seqlens[s+1] - 1), ``attention_mask`` (padded, either side: the last 1 of each row),
    ``position_ids`` (packed without cu_seqlens: a sequence ends where the next position is 0, or at
    the end of its row). ``pad_token_id`` is never consulted: chat models often pad with EOS, and
    the pooled row must be the EOS itself.
    """
    if cu_seqlens is not None:
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
            raise ValueError(f"cu_seqlens must be 1-D with S + 1 >= 1 entries, got shape {tuple(cu_seqlens.shape)}")
        return cu_seqlens[1:].long() - 1
    if attention_mask is not None:
        if attention_mask.dim() != 2:
            raise ValueError(f"attention_mask must be (B, T), got shape {tuple(attention_mask.shape)}")
        batch, length = attention_mask.shape
        mask = attention_mask != 0
        # The last real position: the largest t with mask[b, t] (works for left and right padding).
        positions = torch.arange(length, device=mask.device).expand(batch, length)
        last = torch.where(mask, positions, -1).amax(dim=1)
        if length == 0 or bool((last < 0).any()):
            raise ValueError("attention_mask has a row with no real token: nothing to pool")
        return last + torch.arange(batch, device=mask.device) * length
    if position_ids is not None:
        pos = position_ids if position_ids.dim() == 2 else position_ids.unsqueeze(0)
        if pos.dim() != 2:
            raise ValueError(f"position_ids must be (B, T) or (T,), got shape {tuple(position_ids.shape)}")
        batch, length = pos.shape
        ends = torch.zeros_like(pos, dtype=torch.bool)
        ends[:, :-1] = pos[:, 1:] == 0
        ends[:, -1] = True
        return torch.nonzero(ends.reshape(-1)).squeeze(1)
    raise ValueError("last_token_index needs attention_mask, position_ids or cu_seqlens")
