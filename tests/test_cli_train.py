"""`scft-fast train`'s flags are the config dataclasses' fields: the flag set frozen here, every field reachable
from the command line and landing where the library reads it, every flag documented."""
import dataclasses
import functools

import pytest

pytest.importorskip("transformers")
from scft_fast.cli import main  # noqa: E402
from scft_fast.cli.train import build_parser, config_from_args  # noqa: E402
from scft_fast.constants import IGNORE_INDEX  # noqa: E402
from scft_fast.data import DataConfig  # noqa: E402
from scft_fast.errors import ConfigError  # noqa: E402
from scft_fast.training import DataSpec, TrainConfig  # noqa: E402

# Every flag, its default and what it takes: a validator of scft_fast.arguments, its choices, "text" or "switch"
# (with argparse's nargs). Adding, dropping or changing a flag fails this test until the table says so: the flags
# are a contract (Makefile, README, run_dir's resume messages).
FLAGS = {
    "--model": ("tiny", "text"),
    "--pool": ("eos", ("eos", "pre_eos")),
    "--lora-rank": (0, "non_negative_int"),
    "--lora-alpha": (None, "positive_float"),
    "--lora-dropout": (0.0, "probability"),
    "--lora-target-modules": ("all-linear", "module_names"),
    "--gradient-checkpointing": (False, "switch"),
    "--head-bias": (None, "switch"),
    "--no-head-bias": (None, "switch"),
    "--lm-coef": (1.0, "non_negative_float"),
    "--transition-coef": (1.0, "non_negative_float"),
    "--cls-coef": (1.0, "non_negative_float"),
    "--backend": ("auto", ("auto", "triton", "torch", "cpu")),
    "--chunk-size": (None, "positive_int"),
    "--data": (None, "text +"),
    "--eval-data": (None, "text +"),
    "--max-length": (1024, "int_at_least"),
    "--truncation": ("prompt", ("prompt", "drop")),
    "--packing": (False, "switch"),
    "--max-tokens": (None, "positive_int"),
    "--micro-batch-size": (16, "positive_int"),
    "--rto-keep": (0.2, "fraction"),
    "--vanilla-safety": (True, "switch"),
    "--no-vanilla-safety": (True, "switch"),
    "--prefix-label": (None, ("safe", "unsafe")),
    "--refusal-string": ("Sorry", "non_empty_str"),
    "--skip-invalid": (False, "switch"),
    "--eval-samples": (1024, "non_negative_int"),
    "--num-proc": (1, "positive_int"),
    "--cache-dir": (None, "text"),
    "--lr": (None, "positive_float"),
    "--weight-decay": (None, "non_negative_float"),
    "--betas": ((0.9, 0.95), "decay_rate 2"),
    "--eps": (1e-8, "positive_float"),
    "--warmup-steps": (None, "non_negative_int"),
    "--warmup-ratio": (None, "fraction"),
    "--schedule": ("cosine", ("cosine", "constant")),
    "--grad-clip": (1.0, "non_negative_float"),
    "--output-dir": ("scft-output", "text"),
    "--max-steps": (None, "non_negative_int"),
    "--epochs": (None, "positive_int"),
    "--grad-accum": (1, "positive_int"),
    "--deepspeed": (None, "text"),
    "--bf16": (False, "switch"),
    "--seed": (0, "non_negative_int"),
    "--resume": (False, "switch"),
    "--resume-override": (False, "switch"),
    "--save-every": (100, "non_negative_int"),
    "--keep-checkpoints": (2, "non_negative_int"),
    "--no-progress": (True, "switch"),
    "--report-to": ("none", ("none", "tensorboard", "wandb")),
    "--debug": (False, "switch"),
    "--local_rank": (None, "int"),  # the deepspeed launcher's, undocumented
    "--local-rank": (None, "int"),
}
# Config fields no flag sets: the command line derives them.
NO_FLAG = {"optim.recipe", "summary"}
# A value other than the default, per validator.
EXAMPLES = {"non_negative_int": "7", "positive_int": "7", "int_at_least": "7", "positive_float": "0.5",
            "non_negative_float": "0.5", "fraction": "0.5", "probability": "0.5", "decay_rate": "0.5",
            "non_empty_str": "x", "module_names": "q_proj,v_proj", "text": "x"}


def takes(action):
    if action.nargs == 0:
        return "switch"
    if action.choices is not None:
        return tuple(action.choices)
    kind = action.type.__qualname__.split(".")[0] if action.type else "text"
    return kind if action.nargs is None else f"{kind} {action.nargs}"


def config_keys(cls, prefix=""):
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(f.default_factory):
            yield from config_keys(f.default_factory, f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def value_at(config, key):
    return functools.reduce(getattr, key.split("."), config)


def test_the_flag_set_is_frozen():
    found = {flag: (action.default, takes(action)) for action in build_parser()._actions
             for flag in action.option_strings if flag not in ("-h", "--help")}
    assert sorted(found) == sorted(FLAGS)
    assert found == FLAGS


def test_every_config_field_is_a_flag_that_sets_it():
    parser = build_parser()
    actions = {action.dest: action for action in parser._actions}
    keys = list(config_keys(TrainConfig))
    assert {key for key in keys if key not in actions} == NO_FLAG
    for key in (k for k in keys if k not in NO_FLAG):
        action = actions[key]
        if action.nargs == 0:  # the switch that moves the field off its default
            argv = next([flag] for flag in action.option_strings
                        if getattr(parser.parse_args([flag]), key) != action.default)
        else:
            choices = [c for c in action.choices or () if c != action.default]
            argv = [action.option_strings[0], *[choices[0] if choices else EXAMPLES[takes(action).split()[0]]] *
                    (action.nargs if isinstance(action.nargs, int) else 1)]
        args = parser.parse_args(argv)
        parsed = getattr(args, key)
        assert parsed != action.default, argv
        assert value_at(config_from_args(args), key) == (tuple(parsed) if isinstance(action.default, tuple) else
                                                         parsed), argv


def test_help_documents_every_flag_from_the_config(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for action in build_parser()._actions:
        if action.dest == "local_rank":
            continue
        assert action.help and all(flag in text for flag in action.option_strings), action.option_strings
    # A flag resolved from other flags when unset names the config's own default.
    assert f"(default: {TrainConfig().max_steps} unless --epochs is given)" in " ".join(text.split())


def test_the_data_layer_config_is_the_data_spec():
    """DataConfig takes DataSpec's fields of the same name, the head's pool and the run's seed."""
    from scft_fast.training.components import data_config_of

    assert {f.name for f in dataclasses.fields(DataConfig)} - {f.name for f in dataclasses.fields(DataSpec)} == \
        {"pool", "seed", "ignore_index"}  # ignore_index: the constant the loss is built on, not a setting
    argv = ["--truncation", "drop", "--prefix-label", "safe", "--skip-invalid", "--cache-dir", "cache", "--max-length",
            "64", "--rto-keep", "0.5", "--no-vanilla-safety", "--refusal-string", "No", "--num-proc", "2", "--pool",
            "pre_eos", "--seed", "3"]
    data = data_config_of(config_from_args(build_parser().parse_args(argv)))
    assert dataclasses.asdict(data) == {
        "refusal_string": "No", "rto_keep": 0.5, "pool": "pre_eos", "max_length": 64, "truncation": "drop",
        "prefix_label": "safe", "vanilla_safety": False, "skip_invalid": True, "seed": 3, "num_proc": 2,
        "ignore_index": IGNORE_INDEX, "cache_dir": "cache"}


def test_head_bias_and_chunk_size_reach_the_model(tmp_path):
    from scft_fast.training.components import build_model, build_tokenizer

    def model(*argv):
        config = config_from_args(build_parser().parse_args(list(argv)))
        tokenizer, refusal = build_tokenizer(config)
        return build_model(config, tokenizer, refusal), tokenizer

    plain, _ = model()
    assert plain.score.bias is None and plain.scft_config.chunk_size is None
    biased, tokenizer = model("--head-bias", "--chunk-size", "64")
    assert biased.score.bias is not None and biased.scft_config.chunk_size == 64
    biased.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    assert model("--model", str(tmp_path))[0].score.bias is not None  # a checkpoint's head keeps its own
    with pytest.raises(ConfigError, match="--no-head-bias: the SCFT head of .* has a bias"):
        model("--model", str(tmp_path), "--no-head-bias")


def test_resume_checks_name_the_flags_of_the_config(tmp_path):
    import json

    from scft_fast.errors import UserError
    from scft_fast.training.run_dir import RUN_DEFINING, resume_changes

    flags = {action.dest: action.option_strings[0] for action in build_parser()._actions}
    assert all(key in flags for key in RUN_DEFINING)
    run = ["--output-dir", str(tmp_path), "--resume"]
    saved = config_from_args(build_parser().parse_args(run))
    (tmp_path / "train_config.json").write_text(json.dumps(saved.to_dict()))
    changed = config_from_args(build_parser().parse_args(run + ["--truncation", "drop", "--chunk-size", "64"]))
    with pytest.raises(UserError, match=r"--resume: --truncation 'drop' \(the run's: 'prompt'\) would change"):
        resume_changes(changed)
    assert resume_changes(dataclasses.replace(changed, resume_override=True)) == [
        "--chunk-size 64 (was None)", "--truncation 'drop' (was 'prompt')"]


@pytest.mark.parametrize("argv, expected", [
    (["--chunk-size", "0"], "argument --chunk-size: expected a positive integer, got 0"),
    (["--betas", "1", "0.9"], "argument --betas: expected a number in [0, 1), got 1"),
    (["--eps", "0"], "argument --eps: expected a finite number > 0, got 0"),
    (["--truncation", "cut"], "argument --truncation: invalid choice: 'cut'"),
    (["--prefix-label", "maybe"], "argument --prefix-label: invalid choice: 'maybe'"),
])
def test_new_flags_are_validated(argv, expected, capsys):
    with pytest.raises(SystemExit) as info:
        main(["train", *argv])
    err = capsys.readouterr().err.strip().splitlines()
    assert info.value.code == 2 and err[-1].startswith("scft-fast train: error: ") and expected in err[-1]
