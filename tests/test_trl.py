"""TRL's SFTTrainer (trl 1.16, real) with scft_fast: SCFTSFTTrainer for SCFT + DeRTa from TRL's dataset forms, and
plain SFT with apply_scft_fast(model), through SCFTSFTTrainer and through an unmodified trl.SFTTrainer.

Tiny random Llama, the embedded tokenizer, a few CPU steps on one fixed batch (the whole dataset), float32. Nothing
is patched. An unmodified SFTTrainer computes its loss with the fused LM head it patches in itself
(trl.trainer.utils.add_fused_lm_head), not through the model's forward: the test checks that it trains an
apply_scft_fast model and that this loss, scft_fast's fused loss and the model's own float64 loss agree.
"""
import copy
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from scft_fast import SCFTConfig, SCFTForCausalLM, SCFTSFTTrainer, apply_scft_fast
from scft_fast.data import IGNORE_INDEX, REFUSAL_STRING, SAFE, UNSAFE, default_data_files, load_default_tokenizer
from scft_fast.data.config import DataConfig
from scft_fast.data.encode import refusal_token_id
from scft_fast.hf.config import SCFTOutput
from scft_fast.hf.presets import random_causal_lm  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TOKENIZER = load_default_tokenizer()
REFUSAL = refusal_token_id(TOKENIZER, REFUSAL_STRING)
STEPS = 6


def tiny_llama(seed=0):
    return random_causal_lm("llama", TOKENIZER, seed, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                            tie_word_embeddings=False)


def embedded_triples(helpful=4, harmful=4):
    out, counts = [], {"helpful": 0, "harmful": 0}
    with open(default_data_files("train")[0]) as f:
        for line in f:
            record = json.loads(line)
            kind = "harmful" if "harmful_response" in record else "helpful"
            if counts[kind] < (helpful if kind == "helpful" else harmful):
                counts[kind] += 1
                out.append(record)
    return out


def trl_dataset(form: str, safety_columns: bool = True) -> Dataset:
    """Each helpful triple: an MLE row (label left to the default); each harmful triple: an RTO row on the harmful
    response (unsafe) and an MLE row on the refusal (safe)."""
    rows = []
    for record in embedded_triples():
        question = [{"role": "user", "content": record["instruction"]}]
        targets = ([(record["response"], False, None)] if "response" in record else
                   [(record["harmful_response"], True, "unsafe"), (record["safe_response"], False, "safe")])
        for answer, rto, label in targets:
            answer_turn = [{"role": "assistant", "content": answer}]
            row = ({"prompt": question, "completion": answer_turn} if form == "prompt_completion"
                   else {"messages": question + answer_turn})
            if safety_columns:
                row.update(rto=rto, label=label)
            rows.append(row)
    return Dataset.from_list(rows)


def sft_config(tmp_path, rows: int, **overrides) -> SFTConfig:
    return SFTConfig(**{**dict(
        output_dir=str(tmp_path), max_steps=STEPS, per_device_train_batch_size=rows, learning_rate=3e-3,
        lr_scheduler_type="constant", logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
        bf16=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0), **overrides})


def scft_model():
    return apply_scft_fast(tiny_llama(), SCFTConfig(refusal_token_id=REFUSAL))


@pytest.mark.parametrize("form", ["prompt_completion", "messages"])
def test_scft_sft_trainer_trains_lm_rto_and_head(tmp_path, form):
    dataset = trl_dataset(form)
    trainer = SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, len(dataset)), train_dataset=dataset,
                             processing_class=TOKENIZER)
    trainer.train()
    logs = [r for r in trainer.state.log_history if "loss" in r]
    assert len(logs) == STEPS
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "head_accuracy", "num_tokens"):
        assert all(key in r and math.isfinite(r[key]) for r in logs), (key, logs)
    # TRL's token metrics, from the fused op's token statistics (test_scft_sft_trainer_logs_trls_token_metrics)
    assert all(0 <= r["mean_token_accuracy"] <= 1 and r["entropy"] > 0 for r in logs)
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss"):
        assert logs[-1][key] < logs[0][key], (key, [r[key] for r in logs])
    assert all(r["transition_loss"] > 0 and r["cls_loss"] > 0 for r in logs)
    if form != "prompt_completion":
        return
    # evaluate() prepares a raw TRL dataset the same way; save_model writes what from_pretrained loads
    metrics = trainer.evaluate(trl_dataset(form))
    for key in ("eval_loss", "eval_lm_loss", "eval_transition_loss", "eval_cls_loss", "eval_head_accuracy",
                "eval_head_auroc"):
        assert math.isfinite(metrics[key]), (key, metrics)
    trainer.save_model(str(tmp_path / "model"))
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path / "model"))
    batch = next(iter(trainer.get_train_dataloader()))
    trainer.model.eval()
    with torch.no_grad():
        expected, got = trainer.model(**batch), loaded(**batch)
    for key in ("loss", "lm_loss", "transition_loss", "cls_loss", "cls_logits"):
        torch.testing.assert_close(getattr(got, key), getattr(expected, key), rtol=1e-5, atol=1e-6)


def prepared_rows(form: str, tmp_path, config: dict | None = None, **trainer_kwargs) -> list[dict]:
    dataset = trl_dataset(form)
    trainer = SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, len(dataset), **(config or {})),
                             train_dataset=dataset, processing_class=TOKENIZER, **trainer_kwargs)
    return list(trainer.train_dataset)


def test_safety_rows_follow_trl_tokenization(tmp_path):
    """The rows SCFTSFTTrainer trains on: TRL's own tokenization and completion labels, the RTO target on exactly
    the completion TRL would train, the head on each row's EOS."""
    plain = SFTTrainer(model=tiny_llama(), args=sft_config(tmp_path, 4), processing_class=TOKENIZER,
                       train_dataset=trl_dataset("prompt_completion", safety_columns=False)).train_dataset
    every_position = DataConfig(rto_keep=1.0)  # the recipe's default keeps a fifth of them (below)
    rows = prepared_rows("prompt_completion", tmp_path, data_config=every_position)
    specs = trl_dataset("prompt_completion")
    assert len(rows) == len(plain) == len(specs)
    for row, trl_row, spec in zip(rows, plain, specs):
        assert row["input_ids"] == trl_row["input_ids"]
        completion = [t for t, label in enumerate(trl_row["labels"]) if label != IGNORE_INDEX]
        assert completion and completion[-1] == len(row["input_ids"]) - 1
        if spec["rto"]:
            assert set(row["labels"]) == {IGNORE_INDEX}
            assert [t for t, x in enumerate(row["transition_labels"]) if x != IGNORE_INDEX] == completion
            assert {row["transition_labels"][t] for t in completion} == {REFUSAL}
        else:
            assert row["labels"] == trl_row["labels"]
            assert set(row["transition_labels"]) == {IGNORE_INDEX}
        assert row["input_ids"][row["cls_pos"]] == TOKENIZER.eos_token_id
        assert row["cls_label"] == (UNSAFE if spec["rto"] else SAFE)
    # messages rows: the RTO target sits on the last assistant turn, where the prompt/completion form puts it
    messages = prepared_rows("messages", tmp_path, data_config=every_position)
    assert [r["transition_labels"] for r in messages] == [r["transition_labels"] for r in rows]
    # DeRTa's rto_keep: a seeded ceil(rto_keep * m) of the m completion positions
    kept = prepared_rows("prompt_completion", tmp_path, data_config=DataConfig(rto_keep=0.25, seed=3))
    for row, full in zip(kept, rows):
        targets = [t for t, x in enumerate(row["transition_labels"]) if x != IGNORE_INDEX]
        full_targets = [t for t, x in enumerate(full["transition_labels"]) if x != IGNORE_INDEX]
        assert set(targets) <= set(full_targets) and len(targets) == math.ceil(0.25 * len(full_targets))
    # TRL's max_length truncation (keep_start) cuts the EOS off long rows: no pooled token, no head label
    recipe = prepared_rows("prompt_completion", tmp_path)
    for row, full in zip(recipe, rows):
        targets = [t for t, x in enumerate(row["transition_labels"]) if x != IGNORE_INDEX]
        full_targets = [t for t, x in enumerate(full["transition_labels"]) if x != IGNORE_INDEX]
        assert len(targets) == math.ceil(DataConfig().rto_keep * len(full_targets))
    cut = prepared_rows("prompt_completion", tmp_path, config=dict(max_length=20))
    assert any(TOKENIZER.eos_token_id not in r["input_ids"] for r in cut)
    for row in cut:
        has_eos = TOKENIZER.eos_token_id in row["input_ids"]
        assert len(row["input_ids"]) <= 20 and (row["cls_label"] != IGNORE_INDEX) == has_eos


def test_scft_sft_trainer_errors(tmp_path):
    dataset = trl_dataset("prompt_completion")
    with pytest.raises(ValueError, match="unpatched LlamaForCausalLM"):
        SCFTSFTTrainer(model=tiny_llama(), args=sft_config(tmp_path, 4), train_dataset=dataset,
                       processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="args.packing=True"):
        SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, 4, packing=True), train_dataset=dataset,
                       processing_class=TOKENIZER)
    bad = dataset.map(lambda row, i: {"label": "harmless" if i == 2 else row["label"]}, with_indices=True)
    with pytest.raises(ValueError, match="column 'label', row 2: unknown safety label 'harmless'"):
        SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, 4), train_dataset=bad,
                       processing_class=TOKENIZER)


def own_loss_float64(model, batch) -> torch.Tensor:
    """The architecture's own logits, in float64 on a copy of the model's current weights, and the mean
    cross-entropy of the shifted labels (HF's own loss upcasts the logits to float32 only)."""
    reference = tiny_llama()
    reference.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = reference.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)


@pytest.mark.parametrize("trainer_cls", [SFTTrainer, SCFTSFTTrainer])
def test_plain_sft_with_apply_scft_fast(tmp_path, trainer_cls):
    dataset = trl_dataset("prompt_completion", safety_columns=False)
    model = apply_scft_fast(tiny_llama())
    trainer = trainer_cls(model=model, args=sft_config(tmp_path, len(dataset)), train_dataset=dataset,
                          processing_class=TOKENIZER)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert len(losses) == STEPS and all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses

    batch = next(iter(trainer.get_train_dataloader()))
    expected = own_loss_float64(model, batch)
    with torch.no_grad():
        fused = model(**batch)  # the model's forward: scft_fast's fused loss, no logits
        trainer_loss = trainer.compute_loss(model, dict(batch))  # what this trainer trains with
        n_lm = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
        normalized = model(**batch, num_items_in_batch=2 * n_lm).loss
    assert isinstance(fused, SCFTOutput) and fused.logits is None
    torch.testing.assert_close(fused.loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(trainer_loss.double(), expected, rtol=1e-5, atol=0)
    torch.testing.assert_close(normalized.double(), expected / 2, rtol=1e-5, atol=0)


def test_plain_sft_padding_free(tmp_path):
    """Plain SFT through SCFTSFTTrainer keeps TRL's padding-free collator: one flattened row per batch, the same
    loss as the padded batch of the same rows."""
    dataset = trl_dataset("prompt_completion", safety_columns=False)
    model = apply_scft_fast(tiny_llama())
    trainer = SCFTSFTTrainer(model=model, args=sft_config(tmp_path, len(dataset), padding_free=True, max_length=None),
                             train_dataset=dataset, processing_class=TOKENIZER)
    trainer.train()
    losses = [r["loss"] for r in trainer.state.log_history if "loss" in r]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    flat = next(iter(trainer.get_train_dataloader()))
    assert "attention_mask" not in flat and flat["input_ids"].shape[0] == 1 and "cu_seq_lens_q" in flat
    padded = DataCollatorForLanguageModeling(pad_token_id=TOKENIZER.pad_token_id)(list(trainer.train_dataset))
    with torch.no_grad():
        torch.testing.assert_close(model(**flat).loss, model(**padded).loss, rtol=1e-5, atol=0)


def test_unmodified_sft_trainer_keeps_the_model_generating(tmp_path):
    """SFTTrainer patches its fused LM head onto the apply_scft_fast model; generate() still gives the
    architecture's own greedy tokens."""
    model = apply_scft_fast(tiny_llama())
    reference = copy.deepcopy(model)
    SFTTrainer(model=model, args=sft_config(tmp_path, 4), processing_class=TOKENIZER,
               train_dataset=trl_dataset("prompt_completion", safety_columns=False))
    prompt = torch.tensor([TOKENIZER("[INST] How do I bake bread? [\\INST]")["input_ids"]])
    greedy = dict(max_new_tokens=6, do_sample=False, pad_token_id=TOKENIZER.pad_token_id)
    assert torch.equal(model.generate(prompt, **greedy), reference.generate(prompt, **greedy))


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], "all-linear"], ids=["named", "all_linear"])
def test_scft_sft_trainer_with_peft_config_trains_the_head(tmp_path, targets):
    """SFTTrainer wraps the model in PEFT itself (peft_config=), which freezes the head or gives it LoRA layers:
    SCFTSFTTrainer puts it back among modules_to_save, so it moves and the adapter checkpoint carries it."""
    import peft
    from safetensors.torch import load_file

    dataset = trl_dataset("prompt_completion")
    trainer = SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, len(dataset), save_strategy="steps",
                                                                 save_steps=STEPS),
                             train_dataset=dataset, processing_class=TOKENIZER,
                             peft_config=peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets))
    score = trainer.model.get_base_model().score
    before = score.weight.detach().clone()
    trainer.train()
    assert not torch.equal(score.weight.detach(), before)
    assert not any(".score.lora_" in n for n, _ in trainer.model.named_parameters())
    adapter = load_file(str(tmp_path / f"checkpoint-{STEPS}" / "adapter_model.safetensors"))
    torch.testing.assert_close(adapter["base_model.model.score.weight"], score.weight.detach(), rtol=0, atol=0)


def test_unmodified_sft_trainer_refuses_an_scft_model(tmp_path):
    """SFTTrainer's own fused LM head knows no RTO target and no head: an SCFT model under it would log nothing
    wrong and train no safety term, so the patch of its LM head is refused, naming SCFTSFTTrainer."""
    with pytest.raises(ValueError, match="trl.SFTTrainer computes its loss with a fused LM head of its own.*"
                                         "scft_fast.SCFTSFTTrainer"):
        SFTTrainer(model=scft_model(), args=sft_config(tmp_path, 4), processing_class=TOKENIZER,
                   train_dataset=trl_dataset("prompt_completion"))


def test_safety_columns_without_an_scft_config_are_refused(tmp_path):
    """A model patched without an SCFTConfig would train RTO rows' harmful completions as LM targets."""
    for columns, found in ((True, "['rto', 'label']"), (False, None)):
        dataset = trl_dataset("prompt_completion", safety_columns=columns)
        make = lambda: SCFTSFTTrainer(model=apply_scft_fast(tiny_llama()), args=sft_config(tmp_path, 4),  # noqa: E731
                                      train_dataset=dataset, processing_class=TOKENIZER)
        if found is None:
            make()
            continue
        with pytest.raises(ValueError, match=rf"train_dataset has the safety column\(s\) {re.escape(found)}, but the "
                                             rf"model was patched without an SCFTConfig"):
            make()


def test_unmodified_sft_trainer_refuses_rto_rows_on_a_plain_model(tmp_path):
    """An unmodified SFTTrainer's loss ignores the rto column: given RTO rows, even on a model patched without an
    SCFTConfig, it would train their harmful completions as LM targets; refused when it patches its LM head."""
    with pytest.raises(ValueError, match=r"trl.SFTTrainer's train_dataset has the safety column\(s\) \['rto'\], "
                                         r"which its loss ignores.*scft_fast.SCFTSFTTrainer"):
        SFTTrainer(model=apply_scft_fast(tiny_llama()), args=sft_config(tmp_path, 4), processing_class=TOKENIZER,
                   train_dataset=trl_dataset("prompt_completion"))


def test_scft_sft_trainer_logs_trls_token_metrics(tmp_path):
    """mean_token_accuracy and entropy, TRL's names, as TRL defines them (the share of LM targets whose argmax is the
    label; the mean softmax entropy over them), from the op's statistics of the step's batch: equal to a float64
    forward over the same batch (one step at learning rate 0; rel 1e-4, the float32 sums')."""
    dataset = trl_dataset("prompt_completion")
    trainer = SCFTSFTTrainer(model=scft_model(), args=sft_config(tmp_path, len(dataset), max_steps=1,
                                                                 learning_rate=0.0),
                             train_dataset=dataset, processing_class=TOKENIZER)
    trainer.train()
    (log,) = [r for r in trainer.state.log_history if "loss" in r]
    batch = next(iter(trainer.get_train_dataloader()))
    reference = tiny_llama()
    reference.load_state_dict({k: v for k, v in trainer.model.state_dict().items() if not k.startswith("score.")})
    with torch.no_grad():
        logits = reference.double()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    rows, targets = logits[:, :-1][labels != IGNORE_INDEX], labels[labels != IGNORE_INDEX]
    accuracy = (rows.argmax(-1) == targets).double().mean().item()
    entropy = -(rows.softmax(-1) * rows.log_softmax(-1)).sum(-1).mean().item()
    assert log["mean_token_accuracy"] == pytest.approx(accuracy, rel=1e-4)
    assert log["entropy"] == pytest.approx(entropy, rel=1e-4)
