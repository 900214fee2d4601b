"""DeepSpeed ZeRO 1/2/3 (+ tied head, CPU offload, packed rows) on 2 CPU ranks (gloo) against one process.

2 ranks x 2 accumulation steps see exactly the micro-batches one process sees with 4 accumulation steps (the
loop's BatchPlan), and both normalize by the same batch-wide counts, so the runs differ only in float32
summation order: per-step losses within 1e-5 relative, every parameter of the final consolidated model within
1e-4 absolute (weights are O(0.02-1); three AdamW steps at lr <= 1.1e-3). Clipping is explicit (1.0) on both.
"""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

pytest.importorskip("deepspeed")

from deepspeed_worker import LORA, PACKED_TOKENS  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import load_export  # noqa: E402
from scft_fast.data import default_data_files  # noqa: E402
from scft_fast.training import DataSpec, ModelSpec, TrainConfig, train  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["zero1", "zero2", "zero2_packed", "zero3", "zero3_tied", "zero3_offload", "zero3_checkpoint",
          "zero3_lora", "zero1_sections"]
REFERENCES = {"tiny": ["zero1", "zero2", "zero3", "zero3_offload"], "tiny-tied": ["zero3_tied"],
              "tiny-packed": ["zero2_packed"], "checkpoint": ["zero3_checkpoint"], "checkpoint-lora": ["zero3_lora"]}
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
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": REPO}
    with socket.socket() as probe:  # a free port: other test runs may be launching ranks at the same time
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
           os.path.join(REPO, "tests", "deepspeed_worker.py"), str(out), small_data, checkpoint_dir,
           tied_checkpoint_dir, *STAGES]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return out


def single_process(tmp_path, data_file, reference, checkpoint):
    out = tmp_path / reference
    packing = reference.endswith("-packed")
    model = checkpoint if reference.startswith("checkpoint") else reference.removesuffix("-packed")
    lora = LORA if reference.endswith("-lora") else {}
    train(TrainConfig(model=ModelSpec(name_or_path=model, **lora),
                      data=DataSpec(files=[data_file], micro_batch_size=4, eval_samples=0, packing=packing,
                                    max_tokens=PACKED_TOKENS if packing else None),
                      output_dir=str(out), max_steps=3, grad_accum=4, save_every=0, progress=False, summary=False))
    return out


def metrics_file(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def metrics(run_dir):
    return metrics_file(os.path.join(run_dir, "metrics.jsonl"))


@pytest.mark.parametrize("reference_name", list(REFERENCES))
def test_zero_stages_match_one_process(distributed_runs, small_data, checkpoint_dir, tmp_path, reference_name):
    reference_dir = single_process(tmp_path, small_data, reference_name, checkpoint_dir)
    reference = metrics(reference_dir)
    reference_model = load_export(os.path.join(reference_dir, "model"))
    for stage in REFERENCES[reference_name]:
        run = distributed_runs / stage
        steps = metrics(run)
        assert [r["step"] for r in steps] == [1, 2, 3]
        for ours, ref in zip(steps, reference):
            for key in LOSSES:
                if ref[key] is None:  # a batch without RTO samples has no transition loss: null in both runs
                    assert ours[key] is None and ours["rto_tokens"] == ref["rto_tokens"] == 0, (stage, key)
                    continue
                assert ours[key] == pytest.approx(ref[key], rel=1e-5), (stage, ours["step"], key)
            assert ours["tokens"] == ref["tokens"]
        model = load_export(os.path.join(run, "model"))
        assert model.keys() == reference_model.keys(), stage
        for name, tensor in model.items():
            assert tensor.shape == reference_model[name].shape, (stage, name)  # full shapes, even under ZeRO-3
            torch.testing.assert_close(tensor, reference_model[name], rtol=0, atol=1e-4, msg=f"{stage} {name}")
        assert os.path.exists(os.path.join(run, "model", "tokenizer.json"))
    # The parameters did move: a stage that silently skipped its update would still match an unmoved reference.
    assert reference[-1]["loss"] < reference[0]["loss"]


def test_zero3_resume_repeats_the_step(distributed_runs):
    run = distributed_runs / "zero3"
    first, resumed = metrics_file(run / "metrics_first.jsonl"), metrics(run)
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for key in LOSSES + ("grad_norm", "lr"):
        if first[2][key] is None:  # a batch without RTO samples has no transition loss: null in both runs
            assert key == "transition_loss" and resumed[2][key] is None and resumed[2]["rto_tokens"] == 0, key
            continue
        assert resumed[2][key] == pytest.approx(first[2][key], rel=1e-6), key


def test_zero3_summary_and_single_writer(distributed_runs):
    run = distributed_runs / "zero3"
    with open(run / "summary.json") as f:
        summary = json.load(f)
    assert summary["world_size"] == 2
    assert summary["eval_after"]["head_samples"] > 0
    assert len(metrics(run)) == 3  # one writer: two would duplicate every line
    config = json.loads((run / "model" / "config.json").read_text())
    assert config["scft"]["num_labels"] == 2


def one_process_build(model_dir):
    """The model `scft-fast train --model model_dir` builds on one process (SCFTForCausalLM.from_pretrained)."""
    from scft_fast.training.components import build_model, build_tokenizer

    config = TrainConfig(model=ModelSpec(name_or_path=model_dir))
    tokenizer, refusal = build_tokenizer(config)
    torch.manual_seed(config.seed)
    return build_model(config, tokenizer, refusal)


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
    for rank in range(2):
        params = json.loads((distributed_runs / f"build_{build}_rank{rank}.json").read_text())
        assert "score.weight" in params and "model.embed_tokens.weight" in params
        assert ("lm_head.weight" in params) == (build != "tied")  # tied: one parameter under the embedding's name
        for name, p in params.items():
            assert p["local"] == 0, (rank, name)  # the module's tensor is freed: only the partition is stored
            assert p["partition"] == -(-p["full"] // 2), (rank, name)  # ceil(full / 2 ranks)
    state = torch.load(distributed_runs / f"build_{build}.pt")
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
    wrong = (distributed_runs / "build_wrong_shape_error.txt").read_text()
    assert "wrong_shape/model.safetensors: tensor model.norm.weight has shape (3,)" in wrong and "(64,)" in wrong
    missing = (distributed_runs / "build_missing_error.txt").read_text()
    assert "no tensor for ['model.layers.1.mlp.up_proj.weight']" in missing and "missing/model.safetensors" in missing


def test_zero3_master_weights_are_the_model_partitions(distributed_runs):
    """Float32 ZeRO-3 keeps no second float32 copy of the partition (hf/patches.py; the runs above still
    match one process); optimizer offload keeps its own, and ZeRO-1/2 are not the ZeRO-3 optimizer."""
    shared = json.loads((distributed_runs / "master_weights.json").read_text())
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
    index = json.loads((model_dir / "model.safetensors.index.json").read_text())
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
    """DeepSpeed built the JSON's AdamW and WarmupLR (linear warmup from warmup_min_lr 0 to --lr over the tiny
    preset's 10 warmup steps), not our AdamW and schedule: the logged learning rates are WarmupLR's."""
    run = distributed_runs / "zero1_sections"
    rows = metrics(run)
    ours = metrics(distributed_runs / "zero1")
    assert [r["lr"] for r in rows] == pytest.approx([3e-3 * k / 10 for k in (0, 1, 2)], rel=1e-6, abs=1e-12)
    assert [r["lr"] for r in ours] != pytest.approx([r["lr"] for r in rows])
    assert rows[0]["loss"] == pytest.approx(ours[0]["loss"], rel=1e-5)  # same model and batch before any step
    optimizer = json.loads((run / "summary.json").read_text())["optimizer"]
    assert (optimizer["optimizer"], optimizer["scheduler"]) == ("AdamW", "WarmupLR")
