"""scft_fast.hf.private_patches: each patch of another library's private API was written for the installed version,
and does what it says; the patches of DeepSpeed are scoped to their context."""
import importlib.metadata
import os
import pickle

import pytest
import torch

from scft_fast.hf.private_patches import (
    WRITTEN_FOR,
    deepspeed_loads_weights_only,
    fused_lm_head_allowed,
    is_trl_fused_lm_head,
    master_weights_shared,
)


@pytest.mark.parametrize("library", sorted(WRITTEN_FOR))
def test_each_patch_was_written_for_the_installed_version(library):
    """A new release of a patched library fails here until each of its patches is read again against its code
    (and constraints.txt and WRITTEN_FOR move together)."""
    assert importlib.metadata.version(library) == WRITTEN_FOR[library], (
        f"{library} {importlib.metadata.version(library)} is installed; scft_fast/hf/private_patches.py was written "
        f"for {WRITTEN_FOR[library]}: re-read its patches of {library} against the new code")


def test_deepspeed_checkpoints_load_weights_only(tmp_path):
    """Inside the context DeepSpeed's checkpoint engine loads what its checkpoints hold (tensors, its enum and loss
    scaler) and refuses a pickle that would run code; outside, the engine's own loader is back."""
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    engine = TorchCheckpointEngine()
    state = {"optimizer_state_dict": {"zero_stage": ZeroStageEnum.weights, "loss_scaler": LossScaler(1.0),
                                      "fp32": torch.randn(3)}}
    good = tmp_path / "good.pt"
    torch.save(state, good)
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"optimizer_state_dict": Payload()}, f)
    original = TorchCheckpointEngine.load
    with deepspeed_loads_weights_only():
        loaded = engine.load(str(good))
        torch.testing.assert_close(loaded["optimizer_state_dict"]["fp32"], state["optimizer_state_dict"]["fp32"])
        assert loaded["optimizer_state_dict"]["zero_stage"] is ZeroStageEnum.weights
        with pytest.raises(pickle.UnpicklingError):
            engine.load(str(bad))
    assert not marker.exists()
    assert TorchCheckpointEngine.load is original


def test_master_weights_shared_is_scoped():
    pytest.importorskip("deepspeed")
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    original = Stage3._create_fp32_partitions
    with master_weights_shared():
        assert Stage3._create_fp32_partitions is not original
    assert Stage3._create_fp32_partitions is original


def test_trl_fused_lm_head_is_recognized():
    """The forward trl's add_fused_lm_head installs is recognized (the SCFT model refuses it), a model's own is not;
    fused_lm_head_allowed lets it through, inside the block only."""
    pytest.importorskip("trl")
    from trl.trainer.utils import add_fused_lm_head

    from scft_fast import apply_scft_fast
    from scft_fast.data import load_default_tokenizer
    from scft_fast.hf.presets import random_causal_lm

    model = apply_scft_fast(random_causal_lm("llama", load_default_tokenizer(), seed=0, hidden_size=32,
                                             intermediate_size=48, num_hidden_layers=1, num_attention_heads=4,
                                             num_key_value_heads=2))
    assert not is_trl_fused_lm_head(model.forward)
    with fused_lm_head_allowed(model):
        add_fused_lm_head(model)
    assert is_trl_fused_lm_head(model.forward)
    assert "_fused_lm_head_allowed" not in model.__dict__


def test_the_sft_trainer_under_construction_is_found():
    """sft_trainer_datasets reads the locals of a trl.SFTTrainer constructor on the stack (trl 1.16's names), and
    nothing elsewhere."""
    pytest.importorskip("trl")
    from trl import SFTTrainer

    from scft_fast.hf.private_patches import sft_trainer_datasets

    assert sft_trainer_datasets() == {}

    class Probe(SFTTrainer):
        def __init__(self, train_dataset, eval_dataset):  # the names SFTTrainer.__init__ has them under
            self.seen = sft_trainer_datasets()

    assert Probe("train", "eval").seen == {"train_dataset": "train", "eval_dataset": "eval"}
