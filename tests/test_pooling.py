"""last_token_index: the pooled row is each sequence's last real token, however the batch is laid out."""
import pytest
import torch

from scft_fast import last_token_index

EOS = 2  # also the pad token below: pooling must not depend on it


def test_right_padding_pools_on_eos_even_when_pad_is_eos():
    input_ids = torch.tensor([[5, 6, 7, EOS, EOS, EOS], [5, 6, 7, 8, 9, EOS]])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    index = last_token_index(mask)
    assert index.tolist() == [3, 11]
    assert input_ids.reshape(-1)[index].tolist() == [EOS, EOS]


def test_left_padding():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1], [0, 0, 0, 0, 1]])
    assert last_token_index(mask).tolist() == [4, 9, 14]


def test_packed_by_cu_seqlens_and_by_position_ids_agree():
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    cu_seqlens = torch.tensor([0, 3, 5, 9], dtype=torch.int32)
    assert last_token_index(cu_seqlens=cu_seqlens).tolist() == [2, 4, 8]
    assert last_token_index(position_ids=position_ids).tolist() == [2, 4, 8]
    assert last_token_index(position_ids=position_ids[0]).tolist() == [2, 4, 8]


def test_position_ids_over_several_rows_give_flat_indices():
    position_ids = torch.tensor([[0, 1, 0, 1, 2], [0, 1, 2, 3, 4]])
    assert last_token_index(position_ids=position_ids).tolist() == [1, 4, 9]


def test_errors():
    with pytest.raises(ValueError, match="needs attention_mask, position_ids or cu_seqlens"):
        last_token_index()
    with pytest.raises(ValueError, match="no real token"):
        last_token_index(torch.tensor([[1, 1], [0, 0]]))
    with pytest.raises(ValueError, match=r"attention_mask must be \(B, T\)"):
        last_token_index(torch.tensor([1, 1, 0]))
