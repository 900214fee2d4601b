"""DeepSpeed ZeRO 1/2/3 (+ tied head, CPU offload, packed rows, a checkpoint, LoRA, the JSON's own optimizer and
scheduler) on 2 CPU ranks (gloo) against one process, through `scft-fast train` as users run it (its main() on
their flags, in one torchrun launch: deepspeed_worker.py); and a plain transformers.Trainer with run_callbacks.

Data order: Trainer's sampler is seeded (--seed), and accelerate's default sharding gives rank r the micro-batches
r, r + 2, r + 4, ... of that one order, so 2 ranks x grad-accum 2 train, step by step, on exactly the micro-batches
one process trains on with grad-accum 4 (checked below on every stage, micro-batch by micro-batch). Both normalize
by the same step-wide counts (SCFTTrainer counts the targets over ranks), so the runs differ only in float32
summation order: per-step losses within 1e-5 relative, every parameter of the final exported model within 1e-4
absolute (weights are O(0.02-1); three AdamW steps at lr <= 3e-3, which move every trained tensor by more than 5x
that, checked). Clipping is the default (1.0) on both.
"""
import hashlib
import json
import os

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed_worker import (  # noqa: E402  (tests/ is on sys.path under pytest)
    LORA_TARGETS,
    PLAIN_STEPS,
    PLAIN_STOP,
    STAGES,
    recording,
    scft_fast_train,
    train_flags,
)
from helpers import launch_two_ranks, load_export  # noqa: E402
from scft_fast.data import default_data_files  # noqa: E402

# One-process reference (a stage's flags, ranks=1) -> the 2-rank stages that must equal it.
REFERENCES = {"zero1": ["zero1", "zero2", "zero3", "zero3_offload"], "zero3_tied": ["zero3_tied"],
              "zero2_packed": ["zero2_packed"], "zero3_checkpoint": ["zero3_checkpoint"],
              "zero3_lora": ["zero3_lora"]}
LOSSES = ("loss", "lm_loss", "transition_loss", "cls_loss")


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    with open(default_data_files("train")[0]) as f:
        lines = [next(f) for _ in range(40)]
    path.write_text("".join(lines))
    return str(path)


def plain_checkpoint(path, preset: str, **save_kwargs) -> str:
    """A plain Llama checkpoint (no SCFT head) with its tokenizer: what --model points at in a real run."""
    from transformers import LlamaForCausalLM

    from scft_fast.data import load_default_tokenizer
    from scft_fast.hf.presets import preset_config

    tokenizer = load_default_tokenizer()
    torch.manual_seed(1)
    LlamaForCausalLM(preset_config(preset, tokenizer)).save_pretrained(path, **save_kwargs)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """Sharded (model.safetensors.index.json + several files), untied."""
    return plain_checkpoint(tmp_path_factory.mktemp("checkpoint"), "tiny", max_shard_size="300KB")


@pytest.fixture(scope="module")
def tied_checkpoint_dir(tmp_path_factory):
    """One model.safetensors, tied embeddings (no lm_head.weight in the file)."""
    return plain_checkpoint(tmp_path_factory.mktemp("tied_checkpoint"), "tiny-tied")


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory, small_data, checkpoint_dir, tied_checkpoint_dir):
    out = tmp_path_factory.mktemp("ds")
    launch_two_ranks("deepspeed_worker.py", out, small_data, checkpoint_dir, tied_checkpoint_dir, *STAGES, "plain",
                     timeout=1200)
    return out


def read_json(path):
    with open(path) as f:
        return json.load(f)


def metrics_file(path) -> list[dict]:
    """The training records of a metrics.jsonl (Trainer's end-of-training record left out)."""
    with open(path) as f:
        return [r for r in map(json.loads, f) if "loss" in r]


def metrics(run_dir) -> list[dict]:
    return metrics_file(os.path.join(run_dir, "metrics.jsonl"))


def single_process(tmp_path, stage, data_file, checkpoint):
    """`scft-fast train` on one process with ``stage``'s flags (train_flags, ranks=1), recording its micro-batches.
    The process's random state is set to something else first: the model matches the ranks' only because
    train() draws the initial weights from --seed."""
    out = tmp_path / stage
    torch.manual_seed(1234)
    with recording(str(tmp_path / "batches_rank{rank}.json")):
        scft_fast_train(train_flags(stage, data_file, checkpoint, str(out), ranks=1))
    return out, read_json(tmp_path / "batches_rank0.json")["batches"]


def assert_losses_match(ours: dict, ref: dict, rel: float, keys=LOSSES, what=""):
    for key in keys:
        if key not in ref:  # a step without RTO samples logs no transition loss: absent in both runs
            assert key == "transition_loss" and key not in ours, (what, key)
            continue
        assert ours[key] == pytest.approx(ref[key], rel=rel), (what, ours["step"], key)


@pytest.mark.parametrize("reference_name", list(REFERENCES))
def test_zero_stages_match_one_process(distributed_runs, small_data, checkpoint_dir, tmp_path, reference_name):
    reference_dir, reference_batches = single_process(tmp_path, reference_name, small_data, checkpoint_dir)
    reference = metrics(reference_dir)
    assert [r["step"] for r in reference] == [1, 2, 3] and len(reference_batches) == 3 * 4
    reference_model = load_export(os.path.join(reference_dir, "model"))
    for stage in REFERENCES[reference_name]:
        run = distributed_runs / stage
        # Rank r's j-th micro-batch is the one process's micro-batch 2j + r: step k's four are 4k .. 4k + 3 on both.
        for rank in range(2):
            batches = read_json(distributed_runs / "records" / f"{stage}_rank{rank}.json")["batches"]
            assert batches == reference_batches[rank::2], (stage, rank)
        steps = metrics(run)
        assert [r["step"] for r in steps] == [1, 2, 3]
        for ours, ref in zip(steps, reference):
            assert_losses_match(ours, ref, 1e-5, what=stage)
        model = load_export(os.path.join(run, "model"))
        assert model.keys() == reference_model.keys(), stage
        for name, tensor in model.items():
            assert tensor.shape == reference_model[name].shape, (stage, name)  # full shapes, even under ZeRO-3
            torch.testing.assert_close(tensor, reference_model[name], rtol=0, atol=1e-4, msg=f"{stage} {name}")
        assert os.path.exists(os.path.join(run, "model", "tokenizer.json"))
    # The weights did move, each trained tensor by more than 5x the tolerance (>= 9e-4 measured): a stage that
    # silently skipped an update would not match. LoRA trains its targets (merged into them) and the head only.
    model = STAGES[reference_name][1]
    initial = one_process_build(checkpoint_dir if model == "checkpoint" else model).state_dict()
    lora = "--lora-rank" in STAGES[reference_name][3]
    for name, tensor in reference_model.items():
        trained = not lora or name.startswith("score.") or any(f".{t}." in name for t in LORA_TARGETS)
        moved = float((tensor - initial[name]).abs().max())
        assert moved > 5e-4 if trained else moved == 0, (reference_name, name, moved)


def test_zero3_resume_repeats_the_step(distributed_runs):
    """`scft-fast train --resume` from the ZeRO-3 run's step-2 checkpoint (every rank reloads its partition of the
    weights and the optimizer) re-runs step 3 on the same micro-batches with the same losses, gradient norm and
    learning rate as the first time, within 1e-6 relative."""
    run = distributed_runs / "zero3"
    first, resumed = metrics_file(distributed_runs / "records" / "zero3_metrics_first.jsonl"), metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    assert_losses_match(resumed[2], first[2], 1e-6, LOSSES + ("grad_norm", "learning_rate"))
    for rank in range(2):
        once = read_json(distributed_runs / "records" / f"zero3_rank{rank}.json")["batches"]
        again = read_json(distributed_runs / "records" / f"zero3_resumed_rank{rank}.json")["batches"]
        assert again == once[-2:], rank  # step 3's two micro-batches of this rank, nothing else


def test_zero3_summary_and_single_writer(distributed_runs):
    run = distributed_runs / "zero3"
    summary = read_json(run / "summary.json")
    assert summary["world_size"] == 2
    assert summary["eval_after"]["head_samples"] > 0 and summary["eval_before"]["head_samples"] > 0
    with open(run / "metrics.jsonl") as f:
        steps = [json.loads(line)["step"] for line in f]
    assert steps == [1, 2, 3, 3]  # one writer (two would duplicate every line); the last: Trainer's end record
    config = read_json(run / "model" / "config.json")
    assert config["scft"]["num_labels"] == 2


def one_process_build(model_dir):
    """The model `scft-fast train --model model_dir` builds on one process (run.build_model, seeded as train()
    seeds it)."""
    from transformers import set_seed

    from scft_fast.cli.train import parse_args
    from scft_fast.hf.run import build_model, build_tokenizer

    model_args, data_args, args, _ = parse_args(["--model", model_dir])
    tokenizer, refusal = build_tokenizer(model_args, data_args)
    set_seed(args.seed)
    return build_model(model_args, tokenizer, refusal)


@pytest.mark.parametrize("build", ["plain", "tied", "scft", "bin"])
def test_zero3_build_from_checkpoint_is_partitioned(distributed_runs, checkpoint_dir, tied_checkpoint_dir, build):
    """Right after the ZeRO-3 build from a checkpoint directory (zero3.load_partitioned: each rank reads its
    own slice of every tensor) no rank holds any parameter whole, the head included, and the weights are exactly
    those one process loads: a sharded untied checkpoint, a single-file tied one, and an SCFT export (head and
    settings from the directory). A new head is the one a single process initializes from the same seed.
    "bin": the same checkpoint as one pytorch_model.bin, which goes through transformers' ZeRO-3 loader (the
    fallback): partitioned and equal too."""
    model_dir = {"plain": checkpoint_dir, "tied": tied_checkpoint_dir,
                 "scft": str(distributed_runs / "zero3_checkpoint" / "model"), "bin": str(distributed_runs / "bin")}[build]
    records = distributed_runs / "records"
    for rank in range(2):
        params = read_json(records / f"build_{build}_rank{rank}.json")
        assert "score.weight" in params and "model.embed_tokens.weight" in params
        assert ("lm_head.weight" in params) == (build != "tied")  # tied: one parameter under the embedding's name
        for name, p in params.items():
            assert p["local"] == 0, (rank, name)  # the module's tensor is freed: only the partition is stored
            assert p["partition"] == -(-p["full"] // 2), (rank, name)  # ceil(full / 2 ranks)
    state = torch.load(records / f"build_{build}.pt")
    reference = one_process_build(model_dir)
    assert reference.model.embed_tokens.weight is reference.get_output_embeddings().weight or build != "tied"
    expected = dict(reference.named_parameters())
    assert state.keys() == expected.keys()
    for name, tensor in state.items():
        torch.testing.assert_close(tensor, expected[name].detach(), rtol=0, atol=0, msg=name)
    head = state["score.weight"]
    assert head.shape == (2, 64)
    if build != "scft":  # a new head: initializer_range, not an uninitialized buffer
        assert 0.5 * 0.02 < float(head.std()) < 1.5 * 0.02


def test_zero3_build_names_the_bad_tensor(distributed_runs):
    wrong = (distributed_runs / "records" / "build_wrong_shape_error.txt").read_text()
    assert "wrong_shape/model.safetensors: tensor model.norm.weight has shape (3,)" in wrong and "(64,)" in wrong
    missing = (distributed_runs / "records" / "build_missing_error.txt").read_text()
    assert "no tensor for ['model.layers.1.mlp.up_proj.weight']" in missing and "missing/model.safetensors" in missing


def test_zero3_master_weights_are_the_model_partitions(distributed_runs):
    """Float32 ZeRO-3 keeps no second float32 copy of the partition (hf/patches.py, which SCFTTrainer.train
    applies; the runs above still match one process); optimizer offload keeps its own, and ZeRO-1/2 are not the
    ZeRO-3 optimizer."""
    shared = {stage: read_json(distributed_runs / "records" / f"{stage}_rank{rank}.json")["master_weights_shared"]
              for stage in STAGES for rank in range(2)}
    assert shared["zero3"] is True and shared["zero3_tied"] is True and shared["zero3_checkpoint"] is True
    assert shared["zero3_lora"] is True
    assert shared["zero3_offload"] is False
    assert shared["zero1"] is None and shared["zero2"] is None


def test_zero3_master_weights_shared_is_scoped():
    """Outside the context the optimizer's method is DeepSpeed's own again."""
    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3

    from scft_fast.hf.private_patches import master_weights_shared

    original = Stage3._create_fp32_partitions
    with master_weights_shared():
        assert Stage3._create_fp32_partitions is not original
    assert Stage3._create_fp32_partitions is original


def test_zero3_export_shards_hold_at_most_a_rank_share(distributed_runs):
    """With the default shard size no shard of the 2-rank export holds more than half the model plus one unit
    (a decoder layer or the embedding), so rank 0 never copies the whole model at once; the shards together are
    the whole model."""
    from safetensors import safe_open

    model_dir = distributed_runs / "zero3" / "model"
    index = read_json(model_dir / "model.safetensors.index.json")
    files = sorted(set(index["weight_map"].values()))
    assert len(files) >= 2
    sizes, tensors = [], {}
    for name in files:
        with safe_open(str(model_dir / name), framework="pt") as f:
            shard = {k: f.get_tensor(k) for k in f.keys()}
        tensors.update(shard)
        sizes.append(sum(t.numel() * t.element_size() for t in shard.values()))
    total = sum(sizes)
    assert total == index["metadata"]["total_size"]
    largest_unit = max(
        sum(t.numel() * t.element_size() for k, t in tensors.items() if k.startswith(prefix))
        for prefix in ["model.embed_tokens.", "lm_head."] + [f"model.layers.{i}." for i in range(64)])
    for size in sizes[:-1]:
        assert -(-total // 2) <= size < -(-total // 2) + largest_unit
    assert sizes[-1] < -(-total // 2) + largest_unit


def test_zero3_exports_load_as_hf_models(distributed_runs):
    """The sharded ZeRO-3 export loads with transformers' own loader; LoRA's is merged."""
    from transformers import AutoModelForCausalLM

    sharded = distributed_runs / "zero3_checkpoint" / "model"
    assert (sharded / "model.safetensors.index.json").exists()
    AutoModelForCausalLM.from_pretrained(sharded)
    model = load_export(distributed_runs / "zero3_lora" / "model")
    assert not any("lora" in k or "base_layer" in k or "modules_to_save" in k for k in model)
    assert "score.weight" in model and "model.layers.0.self_attn.q_proj.weight" in model


def test_json_optimizer_and_scheduler_sections_are_used(distributed_runs):
    """DeepSpeed built the JSON's AdamW and WarmupLR itself (without the sections it is handed Trainer's optimizer
    and holds no scheduler), their "auto" fields filled from the flags (AdamW's betas (0.9, 0.95) and eps 1e-8 of
    the recipe; WarmupLR from 0 to --lr over the tiny preset's 10 warmup steps, log-shaped: lr_k = 3e-3 *
    ln(k + 1) / ln(10)); the logged learning rates are WarmupLR's, not the linear warmup of the stage without
    sections (3e-3 * k / 10), and the summary names them."""
    import math

    run = distributed_runs / "zero1_sections"
    rows, ours = metrics(run), metrics(distributed_runs / "zero1")
    assert [r["learning_rate"] for r in rows] == pytest.approx([3e-3 * math.log(k + 1) / math.log(10) for k in range(3)],
                                                              rel=1e-6, abs=1e-12)
    assert [r["learning_rate"] for r in ours] == pytest.approx([3e-3 * k / 10 for k in range(3)], rel=1e-6, abs=1e-12)
    assert rows[0]["loss"] == pytest.approx(ours[0]["loss"], rel=1e-5)  # same model and batch before any step
    for rank in range(2):
        built = read_json(distributed_runs / "records" / f"zero1_sections_rank{rank}.json")
        assert (built["optimizer"], built["scheduler"], built["optimizer_from_config"]) == ("AdamW", "WarmupLR", True)
        assert built["hyperparameters"] == {"betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.0}
        own = read_json(distributed_runs / "records" / f"zero1_rank{rank}.json")  # Trainer's, stepped by Trainer
        assert (own["scheduler"], own["optimizer_from_config"]) == (None, False)
    optimizer = read_json(run / "summary.json")["optimizer"]
    assert (optimizer["optimizer"], optimizer["scheduler"]) == ("AdamW", "WarmupLR")


# -- a plain transformers.Trainer with run_callbacks under ZeRO-3 --------------------------------------------------
def sha256(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def test_plain_trainer_checkpoints_carry_checksums_the_ranks_wrote_together(distributed_runs):
    """Every checkpoint of a plain transformers.Trainer with run_callbacks under ZeRO-3 on 2 ranks holds
    checksums.json: the SHA-256 of every other file in it, both ranks' ZeRO partitions included, correct, and
    hashed in shares by the two ranks together (each hashed some, none a file the other hashed)."""
    records = distributed_runs / "records"
    for run in ("through", "resumed"):
        writes = [read_json(records / f"plain_{run}_hashed_rank{rank}.json") for rank in range(2)]
        assert [w["directory"] for w in writes[0]] == [w["directory"] for w in writes[1]]
        last = {}
        for share0, share1 in zip(*writes):
            assert share0["files"] and share1["files"] and not set(share0["files"]) & set(share1["files"])
            last[share0["directory"]] = set(share0["files"]) | set(share1["files"])
        checkpoints = sorted(p for p in (distributed_runs / "plain" / run).iterdir() if p.name.startswith("checkpoint-")
                             and not p.name.endswith(".damaged"))
        assert [p.name for p in checkpoints] == [f"checkpoint-{step}" for step in range(1, PLAIN_STEPS + 1)]
        for checkpoint in checkpoints:
            sums = read_json(checkpoint / "checksums.json")["sha256"]
            files = {os.path.relpath(os.path.join(parent, name), checkpoint)
                     for parent, _, names in os.walk(checkpoint) for name in names if name != "checksums.json"}
            assert set(sums) == files == last[f"plain/{run}/{checkpoint.name}"], checkpoint
            step = checkpoint.name.removeprefix("checkpoint-")
            assert {f"global_step{step}/zero_pp_rank_{rank}_mp_rank_00_model_states.pt" for rank in range(2)} <= files
            for name, digest in sums.items():
                assert digest == sha256(checkpoint / name), (checkpoint, name)


def test_plain_trainer_resumes_from_the_newest_intact_checkpoint(distributed_runs):
    """A plain transformers.Trainer with run_callbacks under ZeRO-3 on 2 ranks, stopped after step 3 with
    checkpoint-3 damaged (a byte of rank 1's model states changed after its checksums were written), resumes with
    a new Trainer from newest_intact_checkpoint: checkpoint-2 (checkpoint-3 set aside as .damaged when the Trainer
    was built). Steps 3 and 4 then have the losses, gradient norms and learning rates of the uninterrupted run
    within 1e-6 relative, and the final weights equal its own within 1e-6 absolute; metrics.jsonl, written by
    one rank, reads as one run (each step once)."""
    records = distributed_runs / "records"
    assert read_json(records / "plain_resume.json")["checkpoint"] == "plain/resumed/checkpoint-2"
    resumed_dir = distributed_runs / "plain" / "resumed"
    assert (resumed_dir / f"checkpoint-{PLAIN_STOP}.damaged").is_dir()
    through, resumed = metrics(distributed_runs / "plain" / "through"), metrics(resumed_dir)
    assert [r["step"] for r in through] == [r["step"] for r in resumed] == list(range(1, PLAIN_STEPS + 1))
    for ours, ref in zip(resumed, through):
        assert_losses_match(ours, ref, 1e-6, ("loss", "grad_norm", "learning_rate"))
    assert through[-1]["loss"] < through[0]["loss"]
    states = torch.load(records / "plain_states.pt")
    assert states["through"].keys() == states["resumed"].keys()
    for name, tensor in states["resumed"].items():
        torch.testing.assert_close(tensor, states["through"][name], rtol=0, atol=1e-6, msg=name)
