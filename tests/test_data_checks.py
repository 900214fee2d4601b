"""Trainer inputs that would train silently wrong: the collators' row checks and check_batch on any collated batch."""
from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("datasets")

from scft_fast.data import (  # noqa: E402
    IGNORE_INDEX,
    SAFE,
    UNSAFE,
    DataConfig,
    PackedCollator,
    PaddedCollator,
    SCFTDataCollator,
    build_dataset,
)
from scft_fast.data.checks import NoTargetWarning, check_batch  # noqa: E402

IGN = IGNORE_INDEX
pytestmark = pytest.mark.usefixtures("quiet_datasets")
COLLATORS = {
    "padded right": lambda tok: PaddedCollator(tok.pad_token_id),
    "padded left": lambda tok: PaddedCollator(tok.pad_token_id, pad_to_multiple_of=4, padding_side="left"),
    "packed": lambda tok: PackedCollator(max_tokens=4096),
    "trainer padded": lambda tok: SCFTDataCollator(tok),
    "trainer packed": lambda tok: SCFTDataCollator(tok, packing=True),
}
NO_TARGET = ("no loss target in the batch: every entry of {} is ignore_index (-100) after the model's shift (a "
             "sequence's first token is never a target), so the loss and its gradient are 0 and nothing trains; "
             "check the label columns, or rows cut down to their prompt by max_length")


def toy_rows():
    return [
        {"input_ids": [5, 6, 7, 1], "labels": [IGN, IGN, 7, 1], "transition_labels": [IGN] * 4, "cls_pos": 3,
         "cls_label": SAFE},
        {"input_ids": [5, 8, 1], "labels": [IGN] * 3, "transition_labels": [IGN, 9, 9], "cls_pos": 2,
         "cls_label": UNSAFE},
        {"input_ids": [5, 6, 6, 6, 7, 1], "labels": [IGN, 6, 6, 6, 7, 1], "transition_labels": [IGN] * 6,
         "cls_pos": 5, "cls_label": IGN},
    ]


@pytest.fixture(scope="module")
def dataset_rows(tok, small_data, tmp_path_factory):
    dataset, _ = build_dataset([small_data], tok, DataConfig(cache_dir=str(tmp_path_factory.mktemp("cache"))))
    return [dataset[i] for i in range(12)]


def checked(batch: dict) -> None:
    """check_batch, with any warning an error."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        check_batch(batch)


# ------------------------------------------------------------------------------------------ the collators' rows

@pytest.mark.parametrize("name", COLLATORS)
@pytest.mark.parametrize("key, row, message", [
    ("labels", {"labels": [IGN, 9]},
     "row 1 of the batch: 'labels' has 2 entries and 'input_ids' 3: expected one labels entry per token (unshifted, "
     "HF convention; the model shifts)"),
    ("transition_labels", {"transition_labels": [IGN] * 4},
     "row 1 of the batch: 'transition_labels' has 4 entries and 'input_ids' 3: expected one transition_labels "
     "entry per token (unshifted, HF convention; the model shifts)"),
    ("cls_pos past EOS", {"cls_pos": 3},
     "row 1 of the batch: 'cls_pos' 3 is outside its sequence of 3 tokens: expected 0 <= cls_pos < 3 (its EOS: 2)"),
    ("cls_pos negative", {"cls_pos": -1},
     "row 1 of the batch: 'cls_pos' -1 is outside its sequence of 3 tokens: expected 0 <= cls_pos < 3 (its EOS: 2)"),
])
def test_collators_refuse_rows_that_disagree(tok, name, key, row, message):
    rows = toy_rows()
    rows[1] = {**rows[1], **row}
    with pytest.raises(ValueError) as info:
        COLLATORS[name](tok)(rows)
    assert str(info.value) == message


def test_collators_take_any_pooled_position_inside_the_sequence(tok):
    rows = toy_rows()
    rows[2]["cls_pos"] = 0  # the data layer pools EOS or the token before; a user's rows may pool elsewhere
    for make in COLLATORS.values():
        batch = make(tok)(rows)
        checked(batch)
        assert batch["input_ids"].flatten()[batch["cls_index"][2]] == 5


# ---------------------------------------------------------------------------------- check_batch: what passes

@pytest.mark.parametrize("name", COLLATORS)
def test_real_collator_outputs_pass(tok, dataset_rows, name):
    batch = COLLATORS[name](tok)(dataset_rows)
    assert batch["cls_index"].numel() == len(dataset_rows)
    checked(batch)


def test_trl_style_packed_row_passes(tok, dataset_rows):
    """A packed row that says where sequences start only through position_ids (TRL's padding-free batches)."""
    batch = PackedCollator(max_tokens=4096)(dataset_rows)
    del batch["cu_seqlens"], batch["max_seqlen"]
    checked(batch)


# ------------------------------------------------------------------------------------------ check_batch: shapes

@pytest.mark.parametrize("key", ["labels", "transition_labels"])
def test_labels_not_shaped_like_input_ids(tok, key):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())
    batch[key] = batch[key][:, :-1]
    with pytest.raises(ValueError) as info:
        check_batch(batch)
    assert str(info.value) == (f"{key!r} has shape (3, 7) and 'input_ids' (3, 8): expected one {key} entry per "
                               "token (unshifted, HF convention; the model shifts)")


def test_cls_index_and_cls_labels_of_different_lengths(tok):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())
    batch["cls_labels"] = batch["cls_labels"][:2]
    with pytest.raises(ValueError) as info:
        check_batch(batch)
    assert str(info.value) == "'cls_index' has 3 entries and 'cls_labels' 2: expected one pooled row per label"


# -------------------------------------------------------------------------------------- check_batch: pooled rows

def refused(batch: dict) -> str:
    with pytest.raises(ValueError) as info:
        check_batch(batch)
    return str(info.value)


def test_cls_index_outside_the_batch(tok):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())  # B, T = 3, 8
    batch["cls_index"][1] = 24
    assert refused(batch) == ("'cls_index'[1] = 24 is outside the batch's B * T = 3 * 8 rows: expected the flat row "
                              "b * T + t of a pooled token, in [0, 24)")
    batch["cls_index"][1] = -1
    assert refused(batch).startswith("'cls_index'[1] = -1 is outside the batch's B * T = 3 * 8 rows")


def test_cls_index_on_padding(tok):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())
    batch["cls_index"][1] = 8 + 3  # one past row 1's EOS: the first padding token, the EOS id itself here
    assert refused(batch) == ("'cls_index'[1] = 11 pools a padding token (row 1, position 3: attention_mask 0): "
                              "expected a real token of its sequence, e.g. its EOS")
    left = PaddedCollator(tok.pad_token_id, padding_side="left")(toy_rows())
    left["cls_index"][0] = 0
    assert refused(left) == ("'cls_index'[0] = 0 pools a padding token (row 0, position 0: attention_mask 0): "
                             "expected a real token of its sequence, e.g. its EOS")


def test_cls_index_without_the_row_offset(tok):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())
    batch["cls_index"] = torch.tensor([3, 2, 5])  # cls_pos alone: every row would pool row 0
    assert refused(batch) == ("'cls_index'[1] = 2 pools row 0 of the batch, not row 1: expected the flat row 1 * T + t "
                              "(T = 8) of row 1's pooled token t")


def test_packed_cls_index_in_the_next_sequence(tok):
    batch = PackedCollator(max_tokens=64)(toy_rows())  # cu_seqlens [0, 4, 7, 13]
    batch["cls_index"][0] = 4
    expected = ("'cls_index'[0] = 4 pools a token of packed sequence 1, not of sequence 0: expected sequence 0's "
                "first row plus its pooled position")
    assert refused(batch) == expected
    trainer = SCFTDataCollator(tok, packing=True)(toy_rows())
    trainer["cls_index"][0] = 4
    assert refused(trainer) == expected
    del batch["cu_seqlens"], batch["max_seqlen"]  # sequences from position_ids alone
    assert refused(batch) == expected


def test_packed_cls_index_past_the_sequences(tok):
    batch = PackedCollator(max_tokens=64)(toy_rows())
    for key in ("input_ids", "labels", "transition_labels", "position_ids"):  # 3 padding tokens after the sequences
        batch[key] = torch.cat([batch[key], torch.zeros((1, 3), dtype=torch.long)], 1)
    checked(batch)
    batch["cls_index"][2] = 14
    assert refused(batch) == ("'cls_index'[2] = 14 pools past the end of the packed sequences (cu_seqlens[-1] = 13): "
                              "expected a real token of its sequence, e.g. its EOS")


@pytest.mark.parametrize("key", ["cu_seqlens", "cu_seq_lens_q"])
def test_cu_seqlens_that_are_no_boundaries(tok, key):
    batch = PackedCollator(max_tokens=64)(toy_rows())
    batch[key] = torch.tensor([0, 7, 4, 13], dtype=torch.int32)
    if key != "cu_seqlens":
        del batch["cu_seqlens"]
    assert refused(batch) == (f"{key!r} = [0, 7, 4, 13] is not a list of packed sequence boundaries: expected 0 "
                              "first, non-decreasing, at most B * T = 13")


def test_several_pooled_rows_per_sequence_are_only_placed_on_real_tokens(tok):
    batch = PaddedCollator(tok.pad_token_id)(toy_rows())
    batch["cls_index"], batch["cls_labels"] = torch.tensor([3, 2, 9, 10, 21]), torch.tensor([0, 0, 1, 1, 0])
    checked(batch)
    batch["cls_index"][4] = 23
    assert refused(batch).startswith("'cls_index'[4] = 23 pools a padding token (row 2, position 7")


# ------------------------------------------------------------------------------------- check_batch: no targets

def no_targets(batch: dict) -> dict:
    for key in ("labels", "transition_labels", "cls_labels"):
        batch[key] = torch.full_like(batch[key], IGN)
    return batch


@pytest.mark.parametrize("name", COLLATORS)
def test_no_target_warns_once(tok, name):
    batch = no_targets(COLLATORS[name](tok)(toy_rows()))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own filter: once per call site and text
        for _ in range(3):
            check_batch(batch)
    assert [(w.category, str(w.message)) for w in caught] == \
        [(NoTargetWarning, NO_TARGET.format("'labels', 'transition_labels', 'cls_labels'"))]
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoTargetWarning)
        with pytest.raises(NoTargetWarning):
            check_batch(batch)


def test_no_target_is_judged_after_the_shift(tok):
    """Labels on a sequence's first token only: the model's shift drops them all, in padded and packed rows."""
    padded = no_targets(PaddedCollator(tok.pad_token_id)(toy_rows()))
    padded["labels"][:, 0] = 5
    packed = no_targets(PackedCollator(max_tokens=64)(toy_rows()))
    packed["transition_labels"][0, [0, 4, 7]] = 9
    positions_only = {k: v for k, v in packed.items() if k not in ("cu_seqlens", "max_seqlen")}
    for batch in (padded, packed, positions_only):
        del batch["cls_labels"]
        with pytest.warns(NoTargetWarning) as caught:
            check_batch(batch)
        assert str(caught[0].message) == NO_TARGET.format("'labels', 'transition_labels'")
    packed["transition_labels"][0, 5] = 9  # the second token of sequence 1: a target
    checked(packed)


@pytest.mark.parametrize("key, position", [("labels", 2), ("transition_labels", 1), ("cls_labels", 0)])
def test_any_one_target_is_enough(tok, key, position):
    batch = no_targets(PaddedCollator(tok.pad_token_id)(toy_rows()))
    batch[key].view(-1)[position] = SAFE if key == "cls_labels" else 9
    checked(batch)


@pytest.mark.parametrize("name", COLLATORS)
def test_no_target_warning_agrees_with_the_models_count(tok, name):
    """On random sparse labels, check_batch warns exactly when the trainer's count of the model's targets
    (hf.accounting.loss_targets, through the model's own shift) is 0."""
    from scft_fast.hf.accounting import loss_targets

    rng = torch.Generator().manual_seed(0)
    warned = []
    for _ in range(40):
        rows = []
        for _ in range(3):
            n = int(torch.randint(2, 7, (), generator=rng))
            labels = torch.where(torch.rand(n, generator=rng) < 0.08, 7, IGN).tolist()
            transition = torch.where(torch.rand(n, generator=rng) < 0.04, 9, IGN).tolist()
            label = SAFE if torch.rand((), generator=rng) < 0.05 else IGN
            rows.append({"input_ids": [5] * (n - 1) + [1], "labels": labels, "transition_labels": transition,
                         "cls_pos": n - 1, "cls_label": label})
        batch = COLLATORS[name](tok)(rows)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            check_batch(batch)
        warned.append(bool(caught))
        assert warned[-1] == (loss_targets(batch).sum() == 0), rows
    assert 5 < sum(warned) < 35  # both outcomes are exercised


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronizations exist only on CUDA")
@pytest.mark.parametrize("name", COLLATORS)
def test_one_host_sync(tok, dataset_rows, name):
    batch = {k: v.cuda() if torch.is_tensor(v) else v for k, v in COLLATORS[name](tok)(dataset_rows).items()}
    check_batch(batch)  # warm-up
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            check_batch(batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
