"""`scft-fast train`'s flags: every field of ModelArguments, DataArguments and SCFTTrainingArguments (all of
TrainingArguments'), the flags of earlier releases as aliases, each documented; values land where the library reads
them; bad values and set-up errors are one line naming the flag, before any heavy work."""
import dataclasses
import json
import os

import pytest

pytest.importorskip("transformers")
from transformers import TrainingArguments  # noqa: E402

from scft_fast.cli import SUBCOMMANDS, main  # noqa: E402
from scft_fast.cli.train import build_parser, parse_args  # noqa: E402
from scft_fast.constants import IGNORE_INDEX  # noqa: E402
from scft_fast.data import DataConfig  # noqa: E402
from scft_fast.errors import ConfigError  # noqa: E402
from scft_fast.hf.arguments import DataArguments, ModelArguments, SCFTTrainingArguments  # noqa: E402

# The flags of scft-fast train's own arguments (not TrainingArguments'), with their defaults. Adding, dropping or
# changing one fails this test until the table says so: they are a contract (Makefile, README, resume messages).
OWN_FLAGS = {
    "--model": "tiny", "--pool": "eos", "--head-bias": None, "--no-head-bias": None, "--lm-coef": 1.0,
    "--transition-coef": 1.0, "--cls-coef": 1.0, "--backend": "auto", "--chunk-size": None, "--lora-rank": 0,
    "--lora-alpha": None, "--lora-dropout": 0.0, "--lora-target-modules": "all-linear", "--data": None,
    "--eval-data": None, "--eval-samples": 1024, "--max-length": 1024, "--truncation": "prompt", "--packing": False,
    "--rto-keep": 0.2, "--vanilla-safety": True, "--no-vanilla-safety": True, "--prefix-label": None,
    "--refusal-string": "Sorry", "--skip-invalid": False, "--num-proc": 1, "--cache-dir": None, "--resume": False,
    "--resume-override": False, "--debug": False, "--no-progress": None,
}
# Flags of earlier releases, now aliases of TrainingArguments fields (dest), with the recipe's defaults.
ALIASES = {"--lr": ("learning_rate", None), "--micro-batch-size": ("per_device_train_batch_size", 16),
           "--grad-accum": ("gradient_accumulation_steps", 1), "--epochs": ("num_train_epochs", 1.0),
           "--save-every": ("save_steps", 100), "--keep-checkpoints": ("save_total_limit", 2),
           "--eps": ("adam_epsilon", 1e-8), "--grad-clip": ("max_grad_norm", 1.0),
           "--output-dir": ("output_dir", "scft-output"), "--max-steps": ("max_steps", 200),
           "--weight-decay": ("weight_decay", None), "--warmup-steps": ("warmup_steps", None),
           "--bf16": ("bf16", False), "--seed": ("seed", 0), "--deepspeed": ("deepspeed", None),
           "--report-to": ("report_to", "none"), "--gradient-checkpointing": ("gradient_checkpointing", None)}
# Flags of earlier releases that Trainer replaces (README, "Training"): --betas (--adam-beta1/2), --warmup-ratio
# (--warmup-steps below 1), --schedule (--lr-scheduler-type), --max-tokens (packing packs a micro-batch).
REMOVED = ("--betas", "--warmup-ratio", "--schedule", "--max-tokens")


def flags():
    return {flag: action for action in build_parser()._actions for flag in action.option_strings}


def test_the_flag_set_is_frozen():
    found = flags()
    for flag, default in OWN_FLAGS.items():
        assert flag in found, flag
        assert found[flag].default == default or flag.startswith("--no-"), (flag, found[flag].default)
    for flag, (dest, default) in ALIASES.items():
        assert found[flag].dest == dest and found[flag].default == default, flag
    assert not set(REMOVED) & set(found)
    # Every TrainingArguments field is a flag (but its --debug: ours shows the traceback).
    for f in dataclasses.fields(TrainingArguments):
        if f.init and f.name != "debug":
            assert f"--{f.name}" in found, f.name


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--help"])
    assert info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in list(OWN_FLAGS) + list(ALIASES):
        assert flag in text, flag
    for action in build_parser()._actions:
        assert action.help, action.option_strings  # every flag has its help
    assert main(["no-such-command"]) == 2 and "train" in SUBCOMMANDS


def test_the_data_recipe_is_data_config():
    """DataArguments take DataConfig's defaults; the DataConfig the run builds is the flags', the head's pool and
    the run's seed."""
    shared = {f.name for f in dataclasses.fields(DataConfig)} & {f.name for f in dataclasses.fields(DataArguments)}
    assert {f.name for f in dataclasses.fields(DataConfig)} - shared == {"pool", "seed", "ignore_index"}
    for name in shared:
        assert getattr(DataArguments(), name) == getattr(DataConfig(), name), name
    model, data, training, _ = parse_args([
        "--truncation", "drop", "--prefix-label", "safe", "--skip-invalid", "--cache-dir", "cache", "--max-length",
        "64", "--rto-keep", "0.5", "--no-vanilla-safety", "--refusal-string", "No", "--num-proc", "2", "--pool",
        "pre_eos", "--seed", "3"])
    assert dataclasses.asdict(data.data_config(model.pool, training.seed)) == {
        "refusal_string": "No", "rto_keep": 0.5, "pool": "pre_eos", "max_length": 64, "truncation": "drop",
        "prefix_label": "safe", "vanilla_safety": False, "skip_invalid": True, "seed": 3, "num_proc": 2,
        "ignore_index": IGNORE_INDEX, "cache_dir": "cache"}


def test_aliases_and_trainer_names_set_the_same_field():
    for argv in (["--lr", "1e-4", "--micro-batch-size", "3", "--grad-accum", "2", "--save-every", "7",
                  "--keep-checkpoints", "5", "--grad-clip", "0.5"],
                 ["--learning_rate", "1e-4", "--per-device-train-batch-size", "3", "--gradient_accumulation_steps",
                  "2", "--save_steps", "7", "--save-total-limit", "5", "--max-grad-norm", "0.5"]):
        _, _, training, _ = parse_args(argv)
        assert (training.learning_rate, training.per_device_train_batch_size, training.gradient_accumulation_steps,
                training.save_steps, training.save_total_limit, training.max_grad_norm) == (1e-4, 3, 2, 7, 5, 0.5)


def test_recipe_defaults_follow_the_model(tmp_path):
    def training(*argv):
        return parse_args(list(argv))[2]

    preset, full = training(), training("--model", str(tmp_path))
    lora = training("--model", str(tmp_path), "--lora-rank", "8")
    assert (preset.learning_rate, preset.warmup_steps, preset.weight_decay) == (3e-3, 10, 0.0)
    assert (full.learning_rate, full.warmup_steps, full.weight_decay) == (2e-5, 0.03, 0.0)
    assert lora.learning_rate == 1e-4
    assert (preset.lr_scheduler_type, preset.lr_scheduler_kwargs, preset.adam_beta2) == (
        "cosine_with_min_lr", {"min_lr_rate": 0.1}, 0.95)
    given = training("--model", str(tmp_path), "--lr", "1e-5", "--warmup-steps", "7")
    assert (given.learning_rate, given.warmup_steps) == (1e-5, 7)
    model = parse_args(["--lora-rank", "96", "--lora-alpha", "16", "--lora-dropout", "0.05",
                        "--lora-target-modules", "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"])[0]
    assert (model.lora_rank, model.lora_alpha, model.lora_dropout, len(model.target_modules)) == (96, 16, 0.05, 7)


@pytest.mark.parametrize("argv, max_steps, epochs", [([], 200, 1), (["--epochs", "3"], -1, 3),
                                                    (["--max-steps", "50"], 50, 1),
                                                    (["--max-steps", "0", "--epochs", "2"], -1, 2),
                                                    (["--max-steps=50", "--epochs", "2"], 50, 2),
                                                    (["--epochs=2"], -1, 2),
                                                    (["--max-st", "50", "--epochs", "2"], 50, 2)])
def test_steps_or_epochs(argv, max_steps, epochs):
    training = parse_args(argv)[2]
    assert (training.max_steps, training.num_train_epochs) == (max_steps, epochs)


def test_zero_means_never_and_all():
    training = parse_args(["--save-every", "0", "--keep-checkpoints", "0"])[2]
    assert training.save_strategy == "no" and training.save_total_limit is None


@pytest.mark.parametrize("flag, value, expected", [
    ("--grad-accum", "-1", "a positive integer"), ("--grad-accum", "0", "a positive integer"),
    ("--micro-batch-size", "0", "a positive integer"), ("--max-steps", "-3", "an integer >= -1"),
    ("--epochs", "0", "a finite number > 0"), ("--epochs", "-2", "a finite number > 0"),
    ("--warmup-steps", "-5", "a number >= 0"), ("--grad-clip", "-1", "a finite number >= 0"),
    ("--grad-clip", "nan", "a finite number >= 0"), ("--lora-rank", "-4", "a non-negative integer"),
    ("--eval-samples", "-5", "a non-negative integer"), ("--cls-coef", "-1", "a finite number >= 0"),
    ("--lm-coef", "nan", "a finite number >= 0"), ("--lr", "inf", "a finite number > 0"),
    ("--lr", "0", "a finite number > 0"), ("--rto-keep", "0", "(0, 1]"), ("--max-length", "3", "an integer >= 4"),
    ("--save-every", "x", "invalid float value: 'x'"), ("--refusal-string", " ", "a non-empty string"),
    ("--chunk-size", "0", "a positive integer"), ("--eps", "0", "a finite number > 0"),
    ("--adam-beta2", "1", "a number in [0, 1)"), ("--truncation", "cut", "invalid choice: 'cut'"),
    ("--prefix-label", "maybe", "invalid choice: 'maybe'"), ("--keep-checkpoints", "-1", "a non-negative integer"),
])
def test_nonsense_flags_are_one_line_errors(flag, value, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", flag, value])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("scft-fast train: error: argument ") and expected in err[-1]
    assert flag in err[-1] or flag.replace("-", "_") in err[-1]


def test_resume_override_needs_resume(capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", "--resume-override"])
    assert info.value.code == 2 and "argument --resume-override: applies only with --resume" in capsys.readouterr().err


def _no_heavy_work(monkeypatch):
    from scft_fast.hf import run

    def heavy(*args, **kwargs):
        raise AssertionError("a set-up error must be reported before the model or the data are built")

    monkeypatch.setattr(run, "build_model", heavy)
    monkeypatch.setattr(run, "build_datasets", heavy)
    monkeypatch.setattr(run, "build_tokenizer", heavy)


def _setup_cases(tmp_path):
    not_json = tmp_path / "bad.json"
    not_json.write_text('{"zero_optimization": {"stage": 2},}')
    (tmp_path / "empty_model").mkdir()
    (tmp_path / "no_config").mkdir()
    (tmp_path / "no_config" / "model.safetensors").write_bytes(b"")
    (tmp_path / "data_dir").mkdir()
    zero1 = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "training", "zero1.json")
    return [
        (["--deepspeed", zero1], "--deepspeed needs a distributed launcher (RANK, WORLD_SIZE, MASTER_ADDR, "
                                 "MASTER_PORT not set): run `torchrun"),
        (["--model", str(tmp_path / "empty_model")], "has no config.json: it is not a Hugging Face model directory"),
        (["--model", str(tmp_path / "no_config")], "has no config.json: it is not a Hugging Face model directory"),
        (["--model", "tinyy"], "--model 'tinyy' is neither a preset"),
        (["--data", str(tmp_path / "data_dir")], f"--data {tmp_path / 'data_dir'} is a directory: pass its JSONL "
                                                 f"files"),
        (["--data", str(tmp_path / "nope.jsonl")], "nope.jsonl: no such file"),
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
    assert not os.path.exists(tmp_path / "run" / "train_config.json")


def test_debug_keeps_the_traceback(tmp_path, monkeypatch):
    _no_heavy_work(monkeypatch)
    args = ["train", "--model", str(tmp_path), "--output-dir", str(tmp_path / "run")]
    with pytest.raises(ConfigError, match="has no config.json"):
        main(args + ["--debug"])
    monkeypatch.setenv("SCFT_FAST_DEBUG", "1")
    with pytest.raises(ConfigError, match="has no config.json"):
        main(args)


def test_head_bias_and_chunk_size_reach_the_model(tmp_path):
    from scft_fast.hf.run import build_model, build_tokenizer

    def model(*argv):
        model_args, data_args, _, _ = parse_args(list(argv))
        tokenizer, refusal = build_tokenizer(model_args, data_args)
        return build_model(model_args, tokenizer, refusal), tokenizer

    plain, _ = model()
    assert plain.score.bias is None and plain.scft_config.chunk_size is None
    biased, tokenizer = model("--head-bias", "--chunk-size", "64")
    assert biased.score.bias is not None and biased.scft_config.chunk_size == 64
    biased.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert model("--model", str(tmp_path))[0].score.bias is not None  # a checkpoint's head keeps its own
    with pytest.raises(ConfigError, match="--no-head-bias: the SCFT head of .* has a bias"):
        model("--model", str(tmp_path), "--no-head-bias")


def test_resume_checks_name_the_flags(tmp_path):
    from scft_fast.errors import UserError
    from scft_fast.hf.run import RUN_DEFINING, flag_of, resume_changes, run_config

    known = flags()
    assert all(flag_of(key) in known for key in RUN_DEFINING)
    saved = run_config(*parse_args(["--output-dir", str(tmp_path)])[:3])
    (tmp_path / "train_config.json").write_text(json.dumps(saved))
    changed = run_config(*parse_args(["--output-dir", str(tmp_path), "--truncation", "drop", "--chunk-size",
                                      "64"])[:3])
    with pytest.raises(UserError, match=r"--resume: --truncation 'drop' \(the run's: 'prompt'\) would change"):
        resume_changes(str(tmp_path), changed, override=False)
    assert resume_changes(str(tmp_path), changed, override=True) == [
        "--chunk-size 64 (was None)", "--truncation 'drop' (was 'prompt')"]


def test_model_arguments_build_the_scft_config():
    config = ModelArguments(pool="pre_eos", cls_coef=0.5, backend="torch").scft_config(refusal_token_id=7)
    assert (config.pool, config.cls_coef, config.backend, config.refusal_token_id) == ("pre_eos", 0.5, "torch", 7)
    assert SCFTTrainingArguments(output_dir="x").logging_nan_inf_filter is False


ALLOCATOR_PROBE = r"""
import ctypes, json, sys
from scft_fast.cli.train import configure_allocator, parse_args

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                                     "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
_, _, training, _ = parse_args(sys.argv[1:])
configured = configure_allocator(training)
# glibc's dynamic threshold: a freed 4 MiB mmapped block raises it, so the next 4 MiB block comes from the heap.
libc.free(libc.malloc(4 << 20))
before = libc.mallinfo2().hblks  # the blocks the imports left mmapped
block = libc.malloc(4 << 20)
mapped = libc.mallinfo2().hblks - before
libc.free(block)
print(json.dumps({"configured": configured, "mapped": mapped}))
"""


@pytest.mark.parametrize("config, fixed", [(None, False), ("zero1.json", True), ("zero3.json", True),
                                           ("zero3_offload.json", True)])
def test_the_mmap_threshold_is_fixed_only_under_deepspeed(config, fixed, tmp_path):
    """Under DeepSpeed freed buffers and gathers must go back to the system (ZeRO-3 per-rank peak RSS: 1.08x one
    process without, 0.73x with); without it glibc's dynamic threshold is kept (a fixed one costs a CPU step 21-35%:
    bench_train). Checked in a fresh process through glibc's own statistics: a 4 MiB block after a freed one is
    mmapped only when the threshold is fixed."""
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = ["--output-dir", str(tmp_path / "out")]
    if config:
        argv += ["--deepspeed", os.path.join(root, "training", config)]
    env = {**os.environ, "WORLD_SIZE": "1", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": "29533"}
    env.pop("MALLOC_MMAP_THRESHOLD_", None)
    done = subprocess.run([sys.executable, "-c", ALLOCATOR_PROBE, *argv], capture_output=True, text=True, env=env,
                          cwd=str(tmp_path), timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout.strip().splitlines()[-1])
    assert result == {"configured": fixed, "mapped": 1 if fixed else 0}


@pytest.mark.parametrize("flag, replacement", [("--betas", "--adam-beta1 and --adam-beta2"),
                                               ("--warmup-ratio=0.1", "--warmup-steps with a value below 1"),
                                               ("--schedule", "--lr-scheduler-type"), ("--max-tokens", "--packing")])
def test_removed_flags_name_their_replacement(flag, replacement, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", flag, "1"])
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1, err
    assert err.startswith(f"scft-fast train: error: argument {flag.split('=')[0]}: removed; use ") and replacement in err


def test_resume_from_checkpoint_is_refused_in_favour_of_resume(capsys):
    """TrainingArguments' field is a flag like every other, but the command resumes only through --resume (the
    newest intact checkpoint): the field alone would be ignored and the run would start over."""
    for spelling in ("--resume-from-checkpoint", "--resume_from_checkpoint"):
        with pytest.raises(SystemExit) as info:
            main(["train", spelling, "out/checkpoint-5"])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1 and "resumes with --resume" in err, err


def test_launched_as_a_module_the_flags_come_from_sys_argv(monkeypatch):
    """`torchrun -m scft_fast.cli.train --epochs 3` calls main() without argv: --epochs must still decide."""
    monkeypatch.setattr("sys.argv", ["scft_fast.cli.train", "--epochs", "3"])
    training = parse_args(None)[2]
    assert (training.max_steps, training.num_train_epochs) == (-1, 3)


def test_a_bad_record_leaves_the_output_directory_as_it_was(tmp_path, capsys):
    """The data are read after the run's settings are written: a bad record ends the run before training, and the
    corrected command then runs without --resume."""
    from scft_fast.hf.callbacks import existing_run_files

    good = {"instruction": "How do I bake bread?", "response": "Mix flour, water and yeast, then bake it."}
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(good) + "\n" + json.dumps({"instruction": "Hi", "respnse": "Hello"}) + "\n")
    argv = ["train", "--data", str(data), "--output-dir", str(tmp_path / "run"), "--max-steps", "1",
            "--eval-samples", "0", "--save-every", "0", "--no-progress", "--micro-batch-size", "1"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert f"{data}:2" in err and "did you mean 'response'" in err, err
    assert existing_run_files(str(tmp_path / "run")) == []
    data.write_text((json.dumps(good) + "\n") * 4)
    assert main(argv) == 0
    assert "metrics.jsonl" in existing_run_files(str(tmp_path / "run"))


def test_flags_that_take_the_loss_from_the_fused_forward_are_refused(capsys):
    """Trainer's label smoother and Liger-Kernel would compute the loss instead of the model's fused SCFT forward
    (SCFTTrainer refuses them as well): refused while parsing, before any heavy work."""
    for flag, value in (("--label-smoothing-factor", "0.1"), ("--use-liger-kernel", "true")):
        with pytest.raises(SystemExit) as info:
            main(["train", flag, value])
        err = capsys.readouterr().err
        assert info.value.code == 2 and err.count("\n") == 1, err
        assert err.startswith(f"scft-fast train: error: argument {flag}: it takes the loss away"), err
