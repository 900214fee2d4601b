"""`scft-fast train` on SCFTTrainer: every output file, exact resume, the held-out summary, packing, TensorBoard,
epochs; one data recipe for every entry point; the run guarantees with a plain transformers.Trainer too.

Runs: the tiny preset (a 2-layer, 64-wide random Llama over the embedded tokenizer) on a few embedded records, 4
sequences per micro-batch, float32 on CPU. Resumed losses are compared exactly (==): the resumed run repeats the
same float operations on the same batches, from weights, optimizer and RNG states read back bit for bit.
"""
import json
import os
import shutil

import pytest

pytest.importorskip("transformers")
from scft_fast import IGNORE_INDEX  # noqa: E402
from scft_fast.cli import main  # noqa: E402
from scft_fast.hf.callbacks import CHECKSUMS  # noqa: E402

COMPARED = ("loss", "lm_loss", "transition_loss", "cls_loss", "grad_norm", "learning_rate")


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def test_train_writes_everything_and_resumes_exactly(tmp_path, small_data):
    run = str(tmp_path / "run")
    args = ["train", "--data", small_data, "--eval-data", small_data, "--eval-samples", "8", "--output-dir", run,
            "--max-steps", "6", "--save-every", "3", "--micro-batch-size", "4", "--grad-accum", "2", "--no-progress"]
    assert main(args) == 0
    for name in ("metrics.jsonl", "loss_curves.png", "summary.json", "train_config.json", "eval_before.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json",
                 f"checkpoint-3/{CHECKSUMS}", f"checkpoint-6/{CHECKSUMS}"):
        assert os.path.exists(os.path.join(run, name)), name
    assert not os.path.exists(os.path.join(run, "model.tmp"))
    first = read_metrics(run)
    assert [r["step"] for r in first] == list(range(1, 7))
    for key in ("loss", "tokens_per_s", "grad_norm", "learning_rate", "lm_loss", "cls_loss", "head_accuracy"):
        assert all(r.get(key) is not None for r in first), key
    assert any(r.get("transition_loss") is not None for r in first)  # a step without RTO sample logs no RTO term
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    for key in ("head_accuracy", "head_auroc", "refusal_prob_rto", "loss", "cls_loss"):
        assert summary["eval_before"][key] is not None and summary["eval_after"][key] is not None, key
    assert summary["eval_after"]["loss"] < summary["eval_before"]["loss"]
    assert summary["tokens_per_s"] > 0 and summary["steps"] == 6

    # A crash while checkpoint-6 was written: no checksums.json, so it is not taken; model/ was never renamed.
    os.remove(os.path.join(run, "checkpoint-6", CHECKSUMS))
    shutil.rmtree(os.path.join(run, "model"))
    assert main(args + ["--resume"]) == 0
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for before, after in zip(first[3:], resumed[3:]):
        for key in COMPARED:
            assert after.get(key) == before.get(key), (after["step"], key)

    # The final directory is a model the CLI (and generate / eval) takes as --model.
    assert main(["train", "--model", os.path.join(run, "model"), "--data", small_data, "--output-dir",
                 str(tmp_path / "again"), "--max-steps", "1", "--micro-batch-size", "4", "--eval-samples", "0",
                 "--no-progress"]) == 0


def test_embedded_summary_sets_both_held_out_splits_side_by_side(tmp_path, capsys):
    run = str(tmp_path / "embedded")
    assert main(["train", "--output-dir", run, "--max-steps", "1", "--micro-batch-size", "4", "--eval-samples", "32",
                 "--save-every", "0", "--no-progress"]) == 0
    header = next(line for line in capsys.readouterr().out.splitlines() if "before -> after" in line)
    assert header.index("same generator") < header.index("separate generator")
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    assert summary["eval_sets"] == {"eval": "same generator", "separate": "separate generator"}
    for name in ("eval", "separate"):
        assert os.path.exists(os.path.join(run, f"{name}_before.json"))
        for when in ("before", "after"):
            figures = summary[f"{name}_{when}"]
            assert figures["head_samples"] > 0 and 0 <= figures["head_auroc"] <= 1, (name, when)
            assert 0 <= figures["head_fpr"] <= 1 and 0 <= figures["head_tpr"] <= 1


def test_packed_training_runs(tmp_path, small_data):
    run = str(tmp_path / "packed")
    assert main(["train", "--data", small_data, "--packing", "--micro-batch-size", "4", "--max-steps", "2",
                 "--eval-samples", "0", "--save-every", "0", "--no-progress", "--output-dir", run]) == 0
    rows = read_metrics(run)
    assert len(rows) == 2 and rows[0]["cls_loss"] > 0


def test_report_to_tensorboard_logs_every_record(tmp_path, embedded_train_head, one_thread):
    """--report-to tensorboard: transformers' TensorBoardCallback writes each metrics.jsonl record under Trainer's
    names (train/<key>), at its step. Balanced records, so that the two steps hold RTO samples."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    assert main(["train", "--data", embedded_train_head(48, balanced=True), "--micro-batch-size", "4", "--max-steps",
                 "2", "--eval-samples", "0", "--save-every", "0", "--no-progress", "--report-to", "tensorboard",
                 "--output-dir", str(tmp_path / "run")]) == 0
    (logs,) = os.listdir(tmp_path / "run" / "runs")  # transformers' OUTPUT_DIR/runs/<time>_<host>
    events = event_accumulator.EventAccumulator(str(tmp_path / "run" / "runs" / logs))
    events.Reload()
    records = read_metrics(tmp_path / "run")
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy", "learning_rate", "grad_norm"):
        logged = [r for r in records if r.get(key) is not None]
        scalars = events.Scalars(f"train/{key}")
        assert logged and [e.step for e in scalars] == [r["step"] for r in logged], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6), key


def test_epochs_without_max_steps(tmp_path, small_data):
    run = str(tmp_path / "epochs")
    assert main(["train", "--data", small_data, "--micro-batch-size", "16", "--epochs", "2", "--eval-samples", "0",
                 "--save-every", "0", "--no-progress", "--output-dir", run]) == 0
    rows = read_metrics(run)
    assert len(rows) % 2 == 0 and rows and rows[-1]["epoch"] == pytest.approx(2.0)


def test_one_data_recipe_for_every_entry_point(tmp_path, small_data, tok):
    """safety_dataset(), SCFTSFTTrainer and scft-fast train build the same samples from the same file, with the
    recipe's defaults (DataConfig's): a fifth of the RTO positions, vanilla refusals on."""
    from trl import SFTConfig

    from scft_fast import SCFTConfig, SCFTSFTTrainer, apply_scft_fast, safety_dataset
    from scft_fast.cli.train import parse_args
    from scft_fast.data import DataConfig, build_dataset
    from scft_fast.hf.presets import build_preset
    from scft_fast.hf.run import build_datasets

    library = safety_dataset(tok, [small_data])
    model_args, data_args, training, _ = parse_args(["--data", small_data, "--eval-samples", "0"])
    cli, _, _ = build_datasets(data_args, tok, data_args.data_config(model_args.pool, training.seed))
    trl = SCFTSFTTrainer(model=apply_scft_fast(build_preset("tiny", tok), SCFTConfig()),
                         args=SFTConfig(output_dir=str(tmp_path), report_to="none", use_cpu=True),
                         train_dataset=library, processing_class=tok).train_dataset
    expected, _ = build_dataset([small_data], tok, DataConfig(rto_keep=0.2, vanilla_safety=True))
    columns = ("input_ids", "labels", "transition_labels", "cls_pos", "cls_label")
    assert "refusal" in set(expected["kind"])  # vanilla refusals
    for built in (library, cli, trl):
        assert len(built) == len(expected)
        for column in columns:
            assert built[column] == expected[column], column


def test_plain_trainer_with_the_run_callbacks(tmp_path, small_data, tok):
    """The guarantees serve a plain transformers.Trainer on apply_scft_fast(model): checksums on every checkpoint,
    strict-JSON metrics, the plot, the held-out summary (its loss figures; no head without an SCFTConfig), a reused
    directory refused, and a resume from the newest intact checkpoint repeating the losses exactly."""
    from transformers import Trainer, TrainingArguments

    from scft_fast import apply_scft_fast, safety_dataset
    from scft_fast.data import SCFTDataCollator
    from scft_fast.errors import UserError
    from scft_fast.hf.callbacks import newest_intact_checkpoint, run_callbacks
    from scft_fast.hf.presets import build_preset

    rows = safety_dataset(tok, [small_data]).map(lambda r: {"transition_labels": [IGNORE_INDEX] * len(r["labels"])})
    plain = rows.remove_columns(["transition_labels", "cls_pos", "cls_label", "kind", "length"])

    def collate(batch):  # plain SFT: input_ids and labels, padded
        return {k: v for k, v in SCFTDataCollator(tok)([{**r, "transition_labels": [IGNORE_INDEX] * len(r["labels"]),
                                                           "cls_pos": 0, "cls_label": IGNORE_INDEX} for r in batch]).items()
                if k in ("input_ids", "attention_mask", "labels")}

    def trainer(out):
        args = TrainingArguments(str(out), max_steps=4, save_steps=2, logging_steps=1, per_device_train_batch_size=4,
                                 report_to="none", use_cpu=True, seed=0, learning_rate=1e-3, disable_tqdm=True)
        return Trainer(model=apply_scft_fast(build_preset("tiny", tok)), args=args, train_dataset=plain,
                       data_collator=collate, callbacks=run_callbacks({"eval": (rows.select(range(8)), "held out")},
                                                                       SCFTDataCollator(tok)))

    run = tmp_path / "plain"
    t = trainer(run)
    t.train()
    first = read_metrics(run)
    assert [r["step"] for r in first] == [1, 2, 3, 4]
    assert (run / "checkpoint-2" / CHECKSUMS).exists() and (run / "loss_curves.png").exists()
    summary = json.loads((run / "summary.json").read_text())
    assert summary["eval_after"]["loss"] is not None and summary["eval_after"]["head_auroc"] is None
    with pytest.raises(UserError, match="already holds a run"):
        trainer(run).train()
    os.remove(run / "checkpoint-4" / CHECKSUMS)  # a crash while checkpoint-4 was written
    resumed = trainer(run)
    checkpoint = newest_intact_checkpoint(str(run))
    assert checkpoint.endswith("checkpoint-2")
    resumed.train(resume_from_checkpoint=checkpoint)
    again = read_metrics(run)
    assert [r["step"] for r in again] == [1, 2, 3, 4]
    for a, b in zip(again[2:], first[2:]):
        assert (a["loss"], a["grad_norm"]) == (b["loss"], b["grad_norm"])
