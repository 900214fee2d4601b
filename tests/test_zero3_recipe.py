"""training/zero3_trainer.py, the README's ZeRO-3 recipe, run as printed (torchrun, 2 gloo ranks, no extra flag for
CPU) on a tiny Llama checkpoint written by save_pretrained, so that from_pretrained reads it inside
deepspeed.zero.Init: every parameter is partitioned as it is read, and the run equals one process.

2 ranks x 2 rows x 2 accumulation steps see the rows one process sees with 4 rows x 2 (sequential sampling, as in
test_trainer.py); float32 throughout, the runs differ only in summation order: logged losses within 1e-5
relative, the saved weights (gathered from the partitions) within 1e-5 absolute after two AdamW steps at lr 1e-3.
"""
import json
import math
import os

import pytest
import torch

pytest.importorskip("deepspeed")
from safetensors.torch import load_file  # noqa: E402

import trainer_worker as w  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import launch_two_ranks, load_export  # noqa: E402
from scft_fast import SCFTConfig, SCFTDataCollator, SCFTTrainer, apply_scft_fast  # noqa: E402
from scft_fast.data import refusal_token_id  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TERMS = ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy")
# TrainingArguments flags both runs share (w.arguments' settings); the 2-rank run adds its batch geometry.
SHARED_FLAGS = ["--max_steps", "2", "--learning_rate", "1e-3", "--logging_steps", "1", "--train_sampling_strategy",
                "sequential", "--save_strategy", "no", "--report_to", "none", "--seed", "0"]


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, tok):
    path = tmp_path_factory.mktemp("checkpoint")
    w.causal_lm(tok).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def data_file(embedded_train_head):
    return embedded_train_head(40, balanced=True)


@pytest.fixture(scope="module")
def recipe_run(tmp_path_factory, checkpoint, data_file):
    out = tmp_path_factory.mktemp("zero3_recipe")
    launch_two_ranks("zero3_recipe_worker.py", out / "partitions", "--model_name_or_path", checkpoint, "--data_files",
                     data_file, "--output_dir", out / "run", "--per_device_train_batch_size", "2",
                     "--gradient_accumulation_steps", "2", *SHARED_FLAGS, tests_on_path=False)
    return out


@pytest.fixture(scope="module")
def one_process(tmp_path_factory, tok, checkpoint, data_file):
    from transformers import AutoModelForCausalLM, set_seed

    out = tmp_path_factory.mktemp("one_process")
    set_seed(0)  # as the recipe seeds before apply_scft_fast draws the head
    model = apply_scft_fast(AutoModelForCausalLM.from_pretrained(checkpoint),
                            SCFTConfig(refusal_token_id=refusal_token_id(tok, "Sorry")))
    trainer = SCFTTrainer(model=model, args=w.arguments(str(out), gradient_accumulation_steps=2),
                          train_dataset=w.dataset(tok, data_file), data_collator=SCFTDataCollator(tok))
    trainer.train()
    trainer.save_model()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert logs[-1]["loss"] < logs[0]["loss"]  # the runs compared below do move the weights
    return logs, load_file(str(out / "model.safetensors"))


def test_from_pretrained_builds_the_model_partitioned(recipe_run, checkpoint):
    """Right after from_pretrained, before Trainer or DeepSpeed's engine exist: every checkpoint parameter is a
    ZeRO-3 parameter holding no full tensor, each rank keeping its half of it."""
    expected = set(load_file(os.path.join(checkpoint, "model.safetensors")))
    for rank in (0, 1):
        held = json.loads((recipe_run / f"partitions_rank{rank}.json").read_text())
        assert set(held) == expected
        for name, p in held.items():
            assert p["ds_id"] is not None and p["numel"] == 0, (name, p)
            assert p["ds_tensor_numel"] == math.ceil(p["ds_numel"] / 2), (name, p)


def test_recipe_matches_one_process(recipe_run, one_process):
    """The logged losses and the saved model (ZeRO-3 partitions gathered by save_model) equal one process."""
    ref_logs, ref_model = one_process
    state = json.loads((recipe_run / "run" / "trainer_state.json").read_text())
    logs = [r for r in state["log_history"] if "loss" in r]
    assert len(logs) == len(ref_logs) == 2
    for ours, ref in zip(logs, ref_logs):
        for key in TERMS:
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
    model = load_export(recipe_run / "run")
    assert model.keys() == ref_model.keys()
    for name, tensor in model.items():
        assert tensor.shape == ref_model[name].shape, name
        torch.testing.assert_close(tensor, ref_model[name], rtol=0, atol=1e-5, msg=name)
