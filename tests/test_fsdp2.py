"""FSDP2 (``torch.distributed.fsdp.fully_shard``) over an ``apply_scft_fast`` model on 2 gloo ranks (torchrun): each
decoder layer one FSDP2 unit, the root holding the embeddings, the LM head and the SCFT head; the fused loss (LM +
RTO + head) trained by a plain loop (tests/fsdp2_worker.py) equals one process on the same rows, with untied and
tied embeddings.

Each rank runs half of a step's 8 rows with the step's normalizers (targets counted over both ranks) and scales
its loss by the world size, undoing FSDP2's gradient average. float32 throughout; the runs differ only in
summation order: per-step loss, terms and head accuracy within 1e-5 relative, every weight after three AdamW
steps at lr 1e-3 within 1e-5 absolute.

Not run: FSDP through ``transformers.Trainer`` (``TrainingArguments(fsdp=True)``, FSDP2 by default in transformers
5.23), because it does not exist on CPU: accelerate 1.15's ``AcceleratorState`` attaches the FSDP plugin only for
GPU-like distributed types (MULTI_GPU, MULTI_XPU, MULTI_NPU, ...); on CPU ranks (MULTI_CPU) it drops it,
``Trainer.is_fsdp_enabled`` is False and Trainer wraps the model in DistributedDataParallel. The same launch
checks that (one Trainer step) and the warning ``scft_fast.hf.distributed_checks`` gives for it, and that
TrainingArguments without ``use_cpu`` on these ranks are one process per rank, which it refuses. NCCL and GPUs
were not run here.
"""
import json

import pytest
import torch

import fsdp2_worker as f  # tests/ is on sys.path under pytest
import trainer_worker as w
from helpers import launch_two_ranks  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TERMS = ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy")


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def data_file(embedded_train_head):
    return embedded_train_head(f.ROWS * f.STEPS, balanced=True)  # RTO, harmful-prefix and head targets each step


@pytest.fixture(scope="module")
def fsdp2_runs(tmp_path_factory, data_file):
    out = tmp_path_factory.mktemp("fsdp2")
    launch_two_ranks("fsdp2_worker.py", out, data_file)
    return out


@pytest.mark.parametrize("variant", list(f.VARIANTS))
def test_fully_shard_matches_one_process(fsdp2_runs, tok, data_file, variant):
    result = json.loads((fsdp2_runs / f"{variant}.json").read_text())
    for name, held in result["held"].items():  # every parameter sharded on dim 0, half on rank 0
        assert held["local"] == [-(-held["global"][0] // 2), *held["global"][1:]], name
    model = w.model(tok, **f.VARIANTS[variant])
    before = f.full_state(model)
    ref_logs = f.train(model, tok, w.dataset(tok, data_file))
    ref_state = f.full_state(model)
    assert ref_logs[-1]["loss"] < ref_logs[0]["loss"]
    assert not torch.equal(ref_state["score.weight"], before["score.weight"])  # the head term reaches its weights
    assert len(result["logs"]) == len(ref_logs) == f.STEPS
    for ours, ref in zip(result["logs"], ref_logs):
        for key in TERMS:
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
    state = torch.load(fsdp2_runs / f"{variant}.pt")
    assert state.keys() == ref_state.keys()
    assert result["tied"] == (variant == "tied") and ("lm_head.weight" in state) == (variant == "untied")
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, ref_state[name], rtol=0, atol=1e-5, msg=name)


def test_trainer_fsdp_on_cpu_ranks_trains_ddp_and_is_warned(fsdp2_runs):
    """TrainingArguments(fsdp=True) (FSDP2 by default) on CPU ranks: no FSDP plugin, DistributedDataParallel, and
    check_distributed's warning naming the setting and what to use instead."""
    fsdp = json.loads((fsdp2_runs / "trainer_setups.json").read_text())["fsdp"]
    assert fsdp["fsdp"] is True and fsdp["version"] == 2
    assert fsdp["distributed_type"] == "DistributedType.MULTI_CPU" and fsdp["is_fsdp_enabled"] is False
    assert fsdp["wrapped"] == "DistributedDataParallel"
    assert len(fsdp["warnings"]) == 1
    assert "TrainingArguments(fsdp=...) is not applied" in fsdp["warnings"][0]
    assert "MULTI_CPU ranks Trainer trains DistributedDataParallel" in fsdp["warnings"][0]
    assert "fully_shard" in fsdp["warnings"][0]


def test_ranks_without_use_cpu_are_refused(fsdp2_runs):
    """TrainingArguments without use_cpu under torchrun on CPU: accelerate sets up one process per rank;
    check_distributed refuses it, naming use_cpu."""
    setup = json.loads((fsdp2_runs / "trainer_setups.json").read_text())["without_use_cpu"]
    assert setup["world_size"] == 1
    assert setup["error"].startswith("launched as 2 ranks (WORLD_SIZE=2) but TrainingArguments set up 1 process")
    assert "Pass TrainingArguments(use_cpu=True)" in setup["error"]
