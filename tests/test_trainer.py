"""SCFTTrainer: the real transformers.Trainer (and DDP / DeepSpeed on 2 gloo ranks, PEFT), tiny random Llama.

Tolerances: everything runs in float32 and two runs differ only in summation order (padding to another length,
gradients summed over micro-batches or ranks): losses and gradients within 1e-5 relative (gradients to the
largest entry of each tensor), weights after two AdamW steps at lr 1e-3 within 1e-5 absolute.
"""
import json
import os

import pytest
import torch

pytest.importorskip("transformers")
from safetensors.torch import load_file  # noqa: E402
from transformers.trainer_callback import TrainerCallback  # noqa: E402

import trainer_worker as w  # noqa: E402  (tests/ is on sys.path under pytest)
from helpers import launch_two_ranks, load_export  # noqa: E402
from scft_fast import IGNORE_INDEX, SCFTDataCollator, SCFTForCausalLM, SCFTTrainer  # noqa: E402
from scft_fast.metrics import auroc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
TERMS = ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy")


@pytest.fixture(scope="module")
def data_file(embedded_train_head):
    return embedded_train_head(40, balanced=True)  # RTO, harmful-prefix and head targets in every few rows


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def rows(tok, data_file):
    return w.dataset(tok, data_file)


class Gradients(TrainerCallback):
    """Every parameter's gradient just before each optimizer step (clipping off: max_grad_norm=0)."""

    def __init__(self):
        self.steps = []

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        self.steps.append({n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})


def assert_grads_close(ours: dict, ref: dict):
    assert ours.keys() == ref.keys() and ours
    for name, g in ours.items():
        scale = ref[name].abs().max().item()
        # float32 summation order: after one optimizer step the two runs' second gradients differ by up to ~4e-5
        # of the tensor's largest entry (down_proj on the embedded RTO rows), the bound test_model.py uses.
        torch.testing.assert_close(g, ref[name], rtol=1e-5, atol=1e-4 * scale, msg=name)


def one_batch(tok, model, rows):
    """The model on all rows as one padded batch, its own normalizers: the definition of the large-batch loss."""
    batch = SCFTDataCollator(tok)([rows[i] for i in range(len(rows))])
    return model(**batch)


def test_default_arguments_train_log_and_evaluate(tok, rows, tmp_path):
    """TrainingArguments' defaults (remove_unused_columns, average_tokens_across_devices, ...) but the length of
    the run: the raw columns reach the collator, the loss terms are logged, eval_loss is the whole eval set taken
    as one batch and the head's accuracy and AUROC come from its probabilities."""
    from transformers import TrainingArguments

    eval_set = rows.select(range(10))  # 3 evaluation batches of 4, 4, 2 rows
    trainer, _ = w.trainer(tok, rows, TrainingArguments(output_dir=str(tmp_path), max_steps=2, logging_steps=1,
                                                        per_device_train_batch_size=4,
                                                        per_device_eval_batch_size=4), eval_set)
    assert trainer.args.remove_unused_columns and trainer.args.average_tokens_across_devices
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and all(k in logs[0] for k in ("lm_loss", "cls_loss", "head_accuracy", "token_accuracy",
                                                          "entropy"))
    metrics = trainer.evaluate()
    model = trainer.model.eval()
    with torch.no_grad():
        ref = one_batch(tok, model, eval_set)
        probs = model.classify(**{k: v for k, v in SCFTDataCollator(tok)(list(eval_set)).items()
                                  if k == "input_ids" or k == "attention_mask"})
    assert metrics["eval_loss"] == pytest.approx(float(ref.loss), rel=1e-5)
    for key in ("lm_loss", "transition_loss", "cls_loss"):
        assert metrics[f"eval_{key}"] == pytest.approx(float(getattr(ref, key)), rel=1e-5), key
    labels = torch.tensor(eval_set["cls_label"])
    labeled = labels != IGNORE_INDEX
    accuracy = (probs.argmax(-1) == labels)[labeled].float().mean().item()
    assert metrics["eval_head_accuracy"] == pytest.approx(accuracy)
    assert metrics["eval_head_auroc"] == pytest.approx(auroc(probs[labeled, 1].numpy(), labels[labeled].numpy() == 1))


def only(rows, kind):
    """RTO-only: the dataset's RTO samples (no LM target). Head-only: LM and RTO targets removed, head labels kept."""
    if kind == "rto_only":
        return rows.filter(lambda k: k == "rto", input_columns="kind")
    if kind == "head_only":
        return rows.map(lambda r: {"labels": [IGNORE_INDEX] * len(r["labels"]),
                                   "transition_labels": [IGNORE_INDEX] * len(r["labels"])})
    return rows


@pytest.mark.parametrize("kind", ["mixed", "rto_only", "head_only"])
def test_accumulation_equals_twice_the_batch(tok, rows, tmp_path, kind):
    """2 micro-batches of 2 == 1 batch of 4: logged loss and terms, and every gradient; an accumulated batch of
    RTO-only or head-only samples keeps its term (Trainer's own count would be 0 there)."""
    data = only(rows, kind).select(range(8))
    runs = {}
    for name, (size, accumulation) in {"accumulated": (2, 2), "large": (4, 1)}.items():
        grads = Gradients()
        trainer, trace = w.trainer(tok, data, w.arguments(str(tmp_path / name), per_device_train_batch_size=size,
                                                          gradient_accumulation_steps=accumulation,
                                                          max_grad_norm=0.0))
        trainer.add_callback(grads)
        trainer.train()
        runs[name] = trace.logs, grads.steps
    (logs, grads), (ref_logs, ref_grads) = runs["accumulated"], runs["large"]
    for ours, ref in zip(logs, ref_logs):
        for key in TERMS:
            assert (key in ours) == (key in ref), key
            if key in ref:
                assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
    assert len(grads) == len(ref_grads) == 2
    for ours, ref in zip(grads, ref_grads):
        assert_grads_close(ours, ref)
        # The terms the data carries do reach the weights: the head always, the LM head unless head-only.
        assert ref["score.weight"].abs().max() > 0
        assert (ref["lm_head.weight"].abs().max() > 0) == (kind != "head_only")
    # The large batch is the definition: its first loss is the model's on those 4 rows, before any update.
    first = one_batch(tok, w.model(tok), data.select(range(4)))
    assert ref_logs[0]["loss"] == pytest.approx(first.loss.item(), rel=1e-5)
    if kind == "rto_only":
        assert "lm_loss" not in ref_logs[0] and ref_logs[0]["transition_loss"] > 0
    if kind == "head_only":
        assert ref_logs[0]["loss"] == pytest.approx(ref_logs[0]["cls_loss"], rel=1e-5)


def test_plain_trainer_with_apply_scft_fast(tok, rows, tmp_path):
    """Ordinary SFT: transformers.Trainer itself over apply_scft_fast(model) (no head), Trainer's own
    num_items_in_batch: 2 accumulated micro-batches of 2 == 1 batch of 4, loss and every gradient."""
    from torch.nn.utils.rnn import pad_sequence
    from transformers import Trainer

    from scft_fast import apply_scft_fast

    def collate(batch):
        ids = [torch.tensor(r["input_ids"]) for r in batch]
        return {"input_ids": pad_sequence(ids, batch_first=True, padding_value=tok.pad_token_id),
                "attention_mask": pad_sequence([torch.ones_like(i) for i in ids], batch_first=True),
                "labels": pad_sequence([torch.tensor(r["labels"]) for r in batch], batch_first=True,
                                       padding_value=IGNORE_INDEX)}

    data = rows.filter(lambda k: k != "rto", input_columns="kind").select(range(8))
    runs = {}
    for name, (size, accumulation) in {"accumulated": (2, 2), "large": (4, 1)}.items():
        model = apply_scft_fast(w.causal_lm(tok))
        assert model.scft_config is None
        grads = Gradients()
        trainer = Trainer(model=model, args=w.arguments(str(tmp_path / name), per_device_train_batch_size=size,
                                                        gradient_accumulation_steps=accumulation,
                                                        max_grad_norm=0.0),
                          train_dataset=data, data_collator=collate, callbacks=[grads])
        trainer.train()
        runs[name] = [r["loss"] for r in trainer.state.log_history if "loss" in r], grads.steps
    (losses, grads), (ref_losses, ref_grads) = runs["accumulated"], runs["large"]
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for ours, ref in zip(grads, ref_grads):
        assert_grads_close(ours, ref)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpoint_resume_gives_identical_losses(tok, rows, tmp_path, lora):
    """Full fine-tuning resumes from our save_model's checkpoint, started from other random weights (so all of
    them are reloaded); LoRA from Trainer's adapter checkpoint (adapters and the head, among modules_to_save) over
    the same base model, whose adapters and head have moved by step 2."""
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    trainer, trace = w.trainer(tok, rows, w.arguments(str(tmp_path), **args), lora=lora)
    trainer.train()
    if lora:
        adapter = load_file(str(tmp_path / "checkpoint-2" / "adapter_model.safetensors"))
        assert any(".score." in k for k in adapter) and any("lora_" in k for k in adapter)
    resumed, resumed_trace = w.trainer(tok, rows, w.arguments(str(tmp_path), **args), seed=0 if lora else 1,
                                       lora=lora)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-2"))
    assert len(resumed_trace.logs) == 2
    for ours, ref in zip(resumed_trace.logs, trace.logs[2:]):
        assert ours.keys() == ref.keys()
        for key in set(TERMS + ("grad_norm",)) & ref.keys():
            assert ours[key] == pytest.approx(ref[key], rel=1e-6), key


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_save_model_loads_with_the_same_outputs(tok, rows, tmp_path, tied):
    """Checkpoints (tied embeddings included) and save_model -> SCFTForCausalLM.from_pretrained, with gradient
    checkpointing on (TrainingArguments passes HF's kwargs)."""
    trainer, _ = w.trainer(tok, rows, w.arguments(str(tmp_path), save_strategy="steps", save_steps=1,
                                                  gradient_checkpointing=True), tied=tied)
    trainer.train()
    assert trainer.model.is_gradient_checkpointing
    assert os.path.isdir(tmp_path / "checkpoint-2")
    trainer.save_model(str(tmp_path / "final"))
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    model = trainer.model.eval()
    batch = SCFTDataCollator(tok)([rows[i] for i in range(6)])
    with torch.no_grad():
        ours, ref = loaded(**batch), model(**batch)
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-6, atol=0)
    torch.testing.assert_close(ours.cls_logits, ref.cls_logits, rtol=1e-5, atol=1e-6)
    if tied:
        assert "lm_head.weight" not in load_file(str(tmp_path / "final" / "model.safetensors"))


def test_peft_lora_trains_the_adapters_and_the_head(tok, rows, tmp_path):
    trainer, trace = w.trainer(tok, rows, w.arguments(str(tmp_path)), lora=True)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    moved = {n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])}
    assert moved and all("lora_" in n or ".score.modules_to_save." in n for n in moved)
    assert any(".score." in n for n in moved)
    trainer.save_model(str(tmp_path / "final"))
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path / "final")).eval()
    batch = SCFTDataCollator(tok)([rows[i] for i in range(6)])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).loss, trainer.model.eval()(**batch).loss, rtol=1e-5, atol=0)


def test_packed_collator_gives_the_padded_loss(tok, rows):
    """SCFTDataCollator(packing=True): only forward arguments, flash-attn's names, positions restarting per
    sequence (SDPA's block-diagonal mask): the same loss and head logits as the padded batch."""
    model = w.model(tok).eval()
    picked = [rows[i] for i in range(5)]
    packed = SCFTDataCollator(tok, packing=True)(picked)
    assert set(packed) == {"input_ids", "position_ids", "labels", "transition_labels", "cls_labels", "cls_index",
                           "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k"}
    assert packed["cu_seq_lens_q"].dtype == torch.int32 and packed["max_length_q"] == max(r["length"] for r in picked)
    with torch.no_grad():
        ours, ref = model(**packed), model(**SCFTDataCollator(tok)(picked))
    torch.testing.assert_close(ours.loss, ref.loss, rtol=1e-5, atol=0)
    torch.testing.assert_close(ours.cls_logits, ref.cls_logits, rtol=1e-5, atol=1e-6)



@pytest.mark.parametrize("layout", ["padded", "packed", "packed_cu_seqlens_only"])
def test_loss_targets_count_what_the_model_counts(tok, rows, layout):
    from scft_fast.data import PackedCollator
    from scft_fast.hf.accounting import loss_targets

    picked = [rows[i] for i in range(6)]
    batch = (SCFTDataCollator(tok) if layout == "padded" else PackedCollator(10 ** 6))(picked)
    if layout != "padded":
        # Labels on every sequence's first token too (PackedCollator leaves them out): the model then drops the
        # targets that would cross a boundary, and the count must drop them as well.
        starts = batch["cu_seqlens"][:-1].long()
        batch["labels"][0, starts] = batch["input_ids"][0, starts]
    if layout == "packed_cu_seqlens_only":
        del batch["position_ids"]  # the model derives the positions from cu_seqlens; so must the count
    with torch.no_grad():
        out = w.model(tok)(**batch)
    tokens, labeled = loss_targets(batch).tolist()
    assert (tokens, labeled) == (int(out.n_lm + out.n_tr), int(out.n_cls)) and tokens > 0 and labeled > 0


def test_trainer_trains_packed_batches(tok, rows, tmp_path):
    trainer = SCFTTrainer(model=w.model(tok), args=w.arguments(str(tmp_path)), train_dataset=rows,
                          data_collator=SCFTDataCollator(tok, packing=True))
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == 2 and logs[0]["lm_loss"] > 0 and logs[0]["cls_loss"] > 0


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory, data_file):
    out = tmp_path_factory.mktemp("trainer_ranks")
    launch_two_ranks("trainer_worker.py", out, data_file)
    return out


@pytest.fixture(scope="module")
def one_process(tok, rows, tmp_path_factory):
    out = tmp_path_factory.mktemp("one_process")
    trainer, trace = w.trainer(tok, rows, w.arguments(str(out), gradient_accumulation_steps=2,
                                                      per_device_eval_batch_size=4), rows.select(range(16)))
    trainer.train()
    evaluation = trainer.evaluate()
    trainer.save_model()
    assert trace.logs[-1]["loss"] < trace.logs[0]["loss"]  # the runs compared below do move the weights
    return trace.logs, evaluation, load_file(str(out / "model.safetensors"))


@pytest.mark.parametrize("run", w.RUNS)
def test_two_ranks_match_one_process(distributed_runs, one_process, run):
    """DDP, ZeRO-2 and ZeRO-3 (every parameter partitioned) on 2 gloo ranks x 2 rows x 2 accumulation steps ==
    one process x 4 rows x 2: logged losses, the evaluation, and the saved model (gathered from ZeRO-3)."""
    ref_logs, ref_eval, ref_model = one_process
    with open(distributed_runs / run / "result.json") as f:
        result = json.load(f)
    assert result["backend"] == "gloo"
    assert result["engine"] == ("DistributedDataParallel" if run == "ddp" else "DeepSpeedEngine")
    assert len(result["logs"]) == len(ref_logs) == 2
    for ours, ref in zip(result["logs"], ref_logs):
        for key in TERMS:
            assert ours[key] == pytest.approx(ref[key], rel=1e-5), key
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy", "head_auroc"):
        assert result["eval"][f"eval_{key}"] == pytest.approx(ref_eval[f"eval_{key}"], rel=1e-5), key
    assert result["master_weights_shared"] is (True if run == "zero3" else None)  # hf/patches.py
    model = load_export(distributed_runs / run)  # ZeRO-3: shards of at most half the model each
    assert model.keys() == ref_model.keys()
    for name, tensor in model.items():
        assert tensor.shape == ref_model[name].shape, name  # full shapes, gathered from the ZeRO-3 partitions
        torch.testing.assert_close(tensor, ref_model[name], rtol=0, atol=1e-5, msg=name)


@pytest.mark.parametrize("setting, message", [
    (dict(args=dict(label_smoothing_factor=0.1)), "label_smoothing_factor=0.1: Trainer's label smoother"),
    (dict(args=dict(use_liger_kernel=True)), "use_liger_kernel=True: Liger-Kernel replaces the model's forward"),
    (dict(compute_loss_func=lambda outputs, labels, num_items_in_batch=None: outputs.loss),
     "compute_loss_func: SCFTTrainer's loss is the model's fused SCFT loss"),
])
def test_settings_that_take_the_loss_from_the_model_are_refused(tok, rows, tmp_path, setting, message):
    """Each would train something else than the fused SCFT loss (the label smoother pops the labels: no head, no
    RTO; Liger replaces the forward), or crash mid-run: refused when the trainer is built, naming the setting."""
    from scft_fast.errors import ConfigError

    args = w.arguments(str(tmp_path), **setting.get("args", {}))
    extra = {k: v for k, v in setting.items() if k != "args"}
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        SCFTTrainer(model=w.model(tok), args=args, train_dataset=rows, data_collator=SCFTDataCollator(tok), **extra)


def test_a_head_trained_without_head_labels_is_warned_about(tok, rows, tmp_path):
    """An SCFT model trained on batches without cls_labels (a plain LM collator): the head would stay random while
    generate_safe reads it. A warning at the first training batch; none on SCFT batches."""
    import warnings

    from scft_fast.data.checks import NoHeadLabelWarning

    batch = SCFTDataCollator(tok)([rows[i] for i in range(4)])
    plain = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}
    model = w.model(tok).train()
    with pytest.warns(NoHeadLabelWarning, match="no cls_labels: the head does not train"):
        model(**plain)
    model = w.model(tok).train()
    with warnings.catch_warnings():
        warnings.simplefilter("error", NoHeadLabelWarning)
        model(**batch)
        model(**plain)  # only the first training batch is checked
