"""The training loop's micro-batch order (training/components.BatchPlan): ranks shard it as the data layer's
sampler does, and together they see, step by step, what one process sees with world x the accumulation steps."""
import pytest

pytest.importorskip("transformers")
from scft_fast.data import PackedBatchSampler  # noqa: E402
from scft_fast.training import DataSpec, TrainConfig  # noqa: E402
from scft_fast.training.components import BatchPlan  # noqa: E402

LENGTHS = [3 + (7 * i) % 11 for i in range(53)]
MAX_TOKENS = 24


def plan(world: int, grad_accum: int, packing: bool) -> BatchPlan:
    config = TrainConfig(data=DataSpec(micro_batch_size=2, packing=packing,
                                       max_tokens=MAX_TOKENS if packing else None), grad_accum=grad_accum, seed=3)
    batches = BatchPlan({"length": LENGTHS}, config, pad_token_id=0, world_size=world)
    batches.fetch = lambda indices: indices  # the row indices themselves, no dataset to collate
    return batches


@pytest.mark.parametrize("packing", [False, True])
def test_ranks_together_see_one_process_step(packing):
    one, two = plan(1, 4, packing), plan(2, 2, packing)
    steps = 2 * one.steps_in_epoch(0) + 1  # into the third epoch
    assert steps > 3 and one.steps_in_epoch(0) == two.steps_in_epoch(0)
    for step in range(steps):
        ranks = [two.micro_batches(step, rank) for rank in range(2)]
        assert all(len(batches) == 2 for batches in ranks)
        assert sorted(ranks[0] + ranks[1]) == sorted(one.micro_batches(step, 0)), step


def test_packed_ranks_take_the_samplers_share():
    two = plan(2, 2, packing=True)
    steps = two.steps_in_epoch(0)
    for rank in range(2):
        sampler = PackedBatchSampler(LENGTHS, MAX_TOKENS, shuffle=True, seed=3, num_replicas=2, rank=rank)
        ours = [batch for step in range(steps) for batch in two.micro_batches(step, rank)]
        assert ours == list(sampler)[:len(ours)]
