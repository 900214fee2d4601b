"""`scft-fast train`: the CLI, every output file, exact resume, the loss modes the benchmark switches between."""
import json
import os
import re
import shutil

import pytest

pytest.importorskip("transformers")
from scft_fast.cli import SUBCOMMANDS, main  # noqa: E402
from scft_fast.training import DataSpec, OptimSpec, TrainConfig, train  # noqa: E402
from scft_fast.training.checkpoint import latest_checkpoint  # noqa: E402

REQUIRED_FLAGS = ["--model", "--data", "--output-dir", "--max-steps", "--epochs", "--deepspeed", "--bf16", "--lr",
                  "--micro-batch-size", "--grad-accum", "--max-length", "--packing", "--lm-coef",
                  "--transition-coef", "--cls-coef", "--rto-keep", "--vanilla-safety", "--pool", "--seed", "--resume",
                  "--resume-override", "--debug", "--lora-rank", "--lora-alpha", "--lora-dropout",
                  "--lora-target-modules", "--warmup-ratio", "--weight-decay"]


def read_metrics(run):
    with open(os.path.join(run, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in REQUIRED_FLAGS:
        assert flag in text, flag
    assert main(["no-such-command"]) == 2
    assert "train" in SUBCOMMANDS


def test_train_writes_everything_and_resumes_exactly(tmp_path, small_data):
    run = str(tmp_path / "run")
    args = ["train", "--data", small_data, "--eval-data", small_data, "--eval-samples", "8", "--output-dir", run,
            "--max-steps", "6", "--save-every", "3", "--micro-batch-size", "4", "--grad-accum", "2", "--no-progress"]
    assert main(args) == 0
    for name in ("metrics.jsonl", "loss_curves.png", "summary.json", "train_config.json", "eval_before.json",
                 "model/config.json", "model/model.safetensors", "model/tokenizer.json"):
        assert os.path.exists(os.path.join(run, name)), name
    first = read_metrics(run)
    assert [r["step"] for r in first] == list(range(1, 7))
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "tokens_per_s", "step_time_s", "head_accuracy"):
        assert all(key in r for r in first) and any(r[key] is not None for r in first), key
    with open(os.path.join(run, "summary.json")) as f:
        summary = json.load(f)
    for key in ("head_accuracy", "head_auroc", "refusal_prob_rto"):
        assert summary["eval_before"][key] is not None and summary["eval_after"][key] is not None
    assert summary["tokens_per_s"] > 0
    assert latest_checkpoint(run).endswith("checkpoint-6")

    # A crash after step 3: checkpoint-6 never finished (a .tmp directory is never loaded).
    checkpoints = os.path.join(run, "checkpoints")
    os.rename(os.path.join(checkpoints, "checkpoint-6"), os.path.join(checkpoints, "checkpoint-6.tmp"))
    os.remove(os.path.join(checkpoints, "latest"))
    assert latest_checkpoint(run).endswith("checkpoint-3")
    shutil.rmtree(os.path.join(run, "model"))
    assert main(args + ["--resume"]) == 0
    resumed = read_metrics(run)
    assert [r["step"] for r in resumed] == list(range(1, 7))
    for before, after in zip(first[3:], resumed[3:]):
        for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "grad_norm", "lr"):
            assert after[key] == before[key], (after["step"], key)

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


def test_loss_modes_agree_on_the_lm_loss(tmp_path, embedded_train_head, monkeypatch):
    """The benchmark's three modes (benchmarks/bench_train.py's loss hooks): the fused LM loss equals the model's
    own HF loss on the same first batch (of helpful and harmful records alternating, so that it holds RTO targets
    whatever the embedded data's order)."""
    monkeypatch.syspath_prepend(os.path.join(os.path.dirname(os.path.dirname(__file__)), "benchmarks"))
    from bench_train import LOSS_HOOKS

    data = embedded_train_head(48, balanced=True)
    first = {}
    for mode in ("hf", "fused-lm", "full"):
        config = TrainConfig(data=DataSpec(files=[data], micro_batch_size=4, eval_samples=0),
                             output_dir=str(tmp_path / mode), max_steps=2, save_every=0, progress=False,
                             summary=False)
        train(config, loss_hook=LOSS_HOOKS[mode])
        first[mode] = read_metrics(tmp_path / mode)[0]
    assert first["fused-lm"]["loss"] == pytest.approx(first["hf"]["loss"], rel=1e-5)
    assert first["full"]["lm_loss"] == pytest.approx(first["hf"]["lm_loss"], rel=1e-5)
    assert first["fused-lm"]["transition_loss"] is None and first["full"]["transition_loss"] > 0


def test_packed_training_runs(tmp_path, small_data):
    config = TrainConfig(data=DataSpec(files=[small_data], packing=True, max_tokens=512, eval_samples=0),
                         output_dir=str(tmp_path / "packed"), max_steps=2, save_every=0, progress=False,
                         summary=False)
    train(config)
    rows = read_metrics(tmp_path / "packed")
    assert len(rows) == 2 and rows[0]["tokens"] <= 512 and rows[0]["cls_loss"] > 0


def test_report_to_tensorboard_logs_every_record(tmp_path, embedded_train_head, one_thread):
    """--report-to tensorboard: transformers' TensorBoardCallback writes each metrics.jsonl record as Trainer's
    runs name them (train/<key>), at its step. Balanced records, so that the two steps hold RTO samples."""
    event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    main(["train", "--data", embedded_train_head(48, balanced=True), "--micro-batch-size", "4", "--max-steps", "2", "--eval-samples", "0",
          "--save-every", "0", "--no-progress", "--report-to", "tensorboard", "--output-dir", str(tmp_path)])
    (run,) = os.listdir(tmp_path / "runs")
    events = event_accumulator.EventAccumulator(str(tmp_path / "runs" / run))
    events.Reload()
    records = read_metrics(tmp_path)
    assert [r["step"] for r in records] == [1, 2]
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy", "lr", "grad_norm"):
        logged = [r for r in records if r[key] is not None]  # a step without RTO targets has no RTO loss
        scalars = events.Scalars(f"train/{key}")
        assert logged and [e.step for e in scalars] == [r["step"] for r in logged], key
        assert [e.value for e in scalars] == pytest.approx([r[key] for r in logged], rel=1e-6), key


def test_epochs_without_max_steps(tmp_path, small_data):
    config = TrainConfig(data=DataSpec(files=[small_data], micro_batch_size=16, eval_samples=0), max_steps=None,
                         epochs=2, output_dir=str(tmp_path / "epochs"), save_every=0, progress=False, summary=False)
    train(config)
    rows = read_metrics(tmp_path / "epochs")
    per_epoch = len(rows) // 2  # full micro-batches of 16 in one epoch of the small file's samples
    assert per_epoch > 0 and [r["epoch"] for r in rows] == [0] * per_epoch + [1] * per_epoch
    assert all(r["peak_memory_mb"] > 0 for r in rows)


def _resolve(tmp_path, ds: dict | str, config: TrainConfig, world_size: int = 2):
    from scft_fast.data import load_default_tokenizer
    from scft_fast.hf.presets import preset_config
    from scft_fast.training.deepspeed_config import resolve_deepspeed_config

    path = ds if isinstance(ds, str) else str(tmp_path / "ds.json")
    if not isinstance(ds, str):
        (tmp_path / "ds.json").write_text(json.dumps(ds))
    return resolve_deepspeed_config(path, config, world_size, 100, preset_config("tiny", load_default_tokenizer()))


def test_deepspeed_config_resolves_auto_as_transformers(tmp_path):
    config = TrainConfig(grad_accum=3, data=DataSpec(micro_batch_size=5))
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    filled = _resolve(tmp_path, os.path.join(repo, "training", "zero3_offload.json"), config).config
    assert (filled["train_micro_batch_size_per_gpu"], filled["gradient_accumulation_steps"],
            filled["train_batch_size"], filled["gradient_clipping"]) == (5, 3, 30, 1.0)
    assert filled["bf16"]["enabled"] is False and filled["zero_force_ds_cpu_optimizer"] is False
    zero = filled["zero_optimization"]  # transformers' rules from the tiny preset's hidden size (64)
    assert (zero["reduce_bucket_size"], zero["stage3_prefetch_bucket_size"],
            zero["stage3_param_persistence_threshold"]) == (64 * 64, int(0.9 * 64 * 64), 640)
    sections = {"optimizer": {"type": "AdamW", "params": {"lr": "auto", "betas": "auto", "eps": "auto",
                                                          "weight_decay": "auto", "torch_adam": True}},
                "scheduler": {"type": "WarmupLR", "params": {"warmup_min_lr": "auto", "warmup_max_lr": "auto",
                                                             "warmup_num_steps": "auto"}},
                "zero_optimization": {"stage": 2}}
    filled = _resolve(tmp_path, sections, TrainConfig(optim=OptimSpec(lr=2e-5, warmup_ratio=0.03))).config
    assert filled["optimizer"]["params"] == {"lr": 2e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0,
                                             "torch_adam": True}
    assert filled["scheduler"]["params"] == {"warmup_min_lr": 0, "warmup_max_lr": 2e-5, "warmup_num_steps": 3}


@pytest.mark.parametrize("ds, named", [
    ({"gradient_accumulation_steps": 8, "zero_optimization": {"stage": 1}}, "gradient_accumulation_steps=8"),
    ({"optimizer": {"type": "AdamW", "params": {"lr": 1e-5}}}, "optimizer.params.lr=1e-05"),
    ({"scheduler": {"type": "WarmupLR", "params": {"warmup_max_lr": 0.1}}}, "scheduler.params.warmup_max_lr=0.1"),
    ({"bf16": {"enabled": True}}, "bf16.enabled=True"),
    ({"optimizer": {"type": "AdamW", "params": {"amsgrad": "auto"}}}, "optimizer.params.amsgrad"),
])
def test_deepspeed_config_conflict_names_the_field(tmp_path, ds, named):
    with pytest.raises(ValueError, match=re.escape(named)):
        _resolve(tmp_path, ds, TrainConfig())


def test_recipe_defaults_follow_the_model(tmp_path):
    from scft_fast.cli.train import build_parser, config_from_args

    def optim(*argv):
        return config_from_args(build_parser().parse_args(list(argv))).optim

    preset, full, lora = optim(), optim("--model", str(tmp_path)), optim("--model", str(tmp_path), "--lora-rank", "8")
    assert (preset.lr, preset.warmup_steps_for(100), preset.recipe) == (3e-3, 10, "tiny preset defaults")
    assert (full.lr, full.weight_decay, full.schedule, full.warmup_steps_for(100)) == (2e-5, 0.0, "cosine", 3)
    assert full.recipe == "DeRTa full-parameter defaults" and lora.lr == 1e-4
    given = optim("--model", str(tmp_path), "--lr", "1e-5", "--warmup-steps", "7")
    assert (given.lr, given.warmup_steps_for(100)) == (1e-5, 7) and "lr, warmup_steps from the command line" in \
        given.recipe
    spec = config_from_args(build_parser().parse_args(
        ["--lora-rank", "96", "--lora-alpha", "16", "--lora-dropout", "0.05", "--lora-target-modules",
         "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])).model
    assert (spec.lora_rank, spec.lora_alpha, spec.lora_dropout, len(spec.lora_target_modules)) == (96, 16, 0.05, 7)


@pytest.mark.parametrize("argv, max_steps, epochs", [([], 200, 1), (["--epochs", "3"], None, 3),
                                                    (["--max-steps", "50"], 50, 1),
                                                    (["--max-steps", "0", "--epochs", "2"], None, 2)])
def test_steps_or_epochs(argv, max_steps, epochs):
    from scft_fast.cli.train import build_parser, config_from_args

    config = config_from_args(build_parser().parse_args(argv))
    assert (config.max_steps, config.epochs) == (max_steps, epochs)


@pytest.mark.parametrize("flag, value, expected", [
    ("--grad-accum", "-1", "a positive integer"), ("--grad-accum", "0", "a positive integer"),
    ("--micro-batch-size", "0", "a positive integer"), ("--max-steps", "-3", "a non-negative integer"),
    ("--epochs", "0", "a positive integer"), ("--epochs", "-2", "a positive integer"),
    ("--warmup-steps", "-5", "a non-negative integer"), ("--grad-clip", "-1", "a finite number >= 0"),
    ("--grad-clip", "nan", "a finite number >= 0"), ("--lora-rank", "-4", "a non-negative integer"),
    ("--eval-samples", "-5", "a non-negative integer"), ("--max-tokens", "0", "a positive integer"),
    ("--cls-coef", "-1", "a finite number >= 0"), ("--lm-coef", "nan", "a finite number >= 0"),
    ("--lr", "inf", "a finite number > 0"), ("--lr", "0", "a finite number > 0"), ("--rto-keep", "0", "(0, 1]"),
    ("--max-length", "3", "an integer >= 4"), ("--save-every", "x", "a non-negative integer, got 'x'"),
    ("--refusal-string", "", "a non-empty string"),
])
def test_nonsense_flags_are_one_line_errors(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith(f"scft-fast train: error: argument {flag}: ")
    assert expected in err[-1]


def test_flag_combinations(capsys):
    for argv, message in ((["--max-tokens", "512"], "argument --max-tokens: applies to packed micro-batches only"),
                          (["--resume-override"], "argument --resume-override: applies only with --resume")):
        with pytest.raises(SystemExit) as info:
            main(["train", *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err


def _no_heavy_work(monkeypatch):
    from scft_fast.training import loop

    def heavy(*args, **kwargs):
        raise AssertionError("a set-up error must be reported before the model or the data are built")

    monkeypatch.setattr(loop, "build_model", heavy)
    monkeypatch.setattr(loop, "build_data", heavy)


def _setup_cases(tmp_path):
    not_json = tmp_path / "bad.json"
    not_json.write_text('{"zero_optimization": {"stage": 2},}')
    a_list = tmp_path / "list.json"
    a_list.write_text('[{"zero_optimization": {"stage": 2}}]')
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes(b"")
    (tmp_path / "data_dir").mkdir()
    zero1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "zero1.json")
    return [
        (["--deepspeed", zero1], "--deepspeed needs a distributed launcher (RANK, WORLD_SIZE, MASTER_ADDR, "
                                 "MASTER_PORT not set): run `torchrun"),
        (["--deepspeed", str(not_json)], f"--deepspeed {not_json} is not valid JSON (Expecting property name"),
        (["--deepspeed", str(a_list)], f"--deepspeed {a_list} holds a JSON list: a DeepSpeed config is one JSON "
                                       f"object"),
        (["--deepspeed", str(tmp_path / "nope.json")], "no such file"),
        (["--model", str(tmp_path / "empty_model")], "is an empty directory: point it at a Hugging Face model"),
        (["--model", str(tmp_path / "no_config")], "has no config.json: it is not a Hugging Face model directory"),
        (["--model", "tinyy"], "--model 'tinyy' is neither a preset"),
        (["--data", str(tmp_path / "data_dir")], f"--data {tmp_path / 'data_dir'} is a directory: pass its JSONL "
                                                 f"files"),
        (["--backend", "triton"], "--backend triton needs a CUDA GPU, and none is visible here"),
    ]


def test_setup_errors_say_what_to_do_before_any_heavy_work(tmp_path, capsys, monkeypatch):
    import torch

    _no_heavy_work(monkeypatch)
    for key in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "TRITON_INTERPRET"):
        monkeypatch.delenv(key, raising=False)
    for argv, message in _setup_cases(tmp_path):
        if argv[0] == "--backend" and torch.cuda.is_available():
            continue
        assert main(["train", "--output-dir", str(tmp_path / "run"), *argv]) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("scft-fast train: error: ") and err.count("\n") == 1 and message in err, (argv, err)


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    from scft_fast.errors import ConfigError

    _no_heavy_work(monkeypatch)
    args = ["train", "--model", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="is an empty directory"):
        main(args + ["--debug"])
    monkeypatch.setenv("SCFT_FAST_DEBUG", "1")
    with pytest.raises(ConfigError, match="is an empty directory"):
        main(args)
