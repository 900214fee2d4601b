"""scft_fast.hf.distributed_checks in one process, with real TrainingArguments and Trainer. The same checks on two
real gloo ranks (torchrun) are in test_fsdp2.py, which launches them once for FSDP2 and these."""
import logging

import pytest

import trainer_worker as w  # tests/ is on sys.path under pytest
from scft_fast.errors import ConfigError
from scft_fast.hf.distributed_checks import check_distributed


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def rows(tok, embedded_train_head):
    return w.dataset(tok, embedded_train_head(8))


def test_one_process_passes_without_a_word(tok, rows, tmp_path, caplog, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    trainer, _ = w.trainer(tok, rows, w.arguments(str(tmp_path)))
    with caplog.at_level(logging.WARNING, logger="scft_fast.hf.distributed_checks"):
        check_distributed(trainer.args, trainer.accelerator)
    assert not caplog.records


def test_launched_ranks_seen_as_one_process_are_refused(tok, rows, tmp_path, monkeypatch):
    """A launcher's WORLD_SIZE with TrainingArguments that accelerate turned into one process (no use_cpu on a
    machine without an accelerator: no backend for it)."""
    monkeypatch.setenv("WORLD_SIZE", "4")
    args = w.arguments(str(tmp_path), use_cpu=False)
    assert args.world_size == 1
    refused = r"launched as 4 ranks \(WORLD_SIZE=4\) but TrainingArguments set up 1 process on device cpu: .* Pass " \
              r"TrainingArguments\(use_cpu=True\)"
    with pytest.raises(ConfigError, match=refused):  # SCFTTrainer runs the check when it is built
        w.trainer(tok, rows, args)
    from transformers import Trainer

    plain = Trainer(model=w.model(tok), args=args, train_dataset=rows)
    with pytest.raises(ConfigError, match=refused):
        check_distributed(plain.args, plain.accelerator)
