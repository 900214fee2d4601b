"""Every LoRA route trains and saves the SCFT head, or is refused with the fix (real PEFT 0.21, transformers'
Trainer, TRL's SFTTrainer; tiny random Llama, CPU, float32).

Routes: ``apply_scft_fast`` before or after ``peft.get_peft_model`` (LoRA on named layers, or on "all-linear", which
matches the head too), SCFTTrainer on such a PEFT model, SCFTSFTTrainer(peft_config=...); a loop of one's own and
plain transformers.Trainer, which nothing fixes up, are refused at their first forward. Reloads:
SCFTForCausalLM.from_pretrained(adapter_dir) and PeftModel.from_pretrained on a patched base give the trained
head exactly; AutoPeftModelForCausalLM cannot build it and every later use of the head names the loader.
"""
import pytest
import torch

peft = pytest.importorskip("peft")
from transformers import Trainer  # noqa: E402

import trainer_worker as w  # noqa: E402  (tests/ is on sys.path under pytest)
from scft_fast import (  # noqa: E402
    SCFTConfig,
    SCFTDataCollator,
    SCFTForCausalLM,
    SCFTTrainer,
    apply_scft_fast,
    generate_safe,
)
from scft_fast.data import refusal_token_id  # noqa: E402
from scft_fast.hf.peft import ADAPTER_SCFT_CONFIG  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
NAMED = ["q_proj", "v_proj"]


@pytest.fixture(scope="module")
def tok():
    return w.tokenizer()


@pytest.fixture(scope="module")
def rows(tok, embedded_train_head):
    return w.dataset(tok, embedded_train_head(24, balanced=True))


@pytest.fixture(scope="module")
def base_dir(tok, tmp_path_factory):
    """A saved base model: what adapters name as base_model_name_or_path, and reloads read."""
    path = tmp_path_factory.mktemp("base")
    w.causal_lm(tok).save_pretrained(path)
    return str(path)


def base_lm(base_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir)


def lora(targets, **kwargs):
    return peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, lora_dropout=0.0, **kwargs)


def scft_config(tok, **kwargs):
    return SCFTConfig(refusal_token_id=refusal_token_id(tok, "Sorry"), **kwargs)


def head_state(model) -> dict[str, torch.Tensor]:
    score = model.get_base_model().score if hasattr(model, "get_base_model") else model.score
    return {"weight": score.weight.detach().clone()}


def batch_of(tok, rows, n=4):
    return SCFTDataCollator(tok)([rows[i] for i in range(n)])


@pytest.mark.parametrize("targets", [NAMED, "all-linear"], ids=["named", "all_linear"])
@pytest.mark.parametrize("order", ["apply_first", "peft_first"])
def test_scft_trainer_trains_the_head_on_every_route(tok, rows, base_dir, tmp_path, order, targets):
    """SCFTTrainer fixes the head up before its optimizer exists: it moves, its adapter checkpoint carries it with
    the SCFT settings beside it, and from_pretrained(checkpoint) gives back exactly the trained head."""
    config = scft_config(tok, pool="pre_eos")
    if order == "apply_first":
        model = peft.get_peft_model(apply_scft_fast(base_lm(base_dir), config), lora(targets))
    else:
        model = apply_scft_fast(peft.get_peft_model(base_lm(base_dir), lora(targets)), config)
    before = head_state(model)
    trainer = SCFTTrainer(model=model, args=w.arguments(str(tmp_path), save_strategy="steps", save_steps=2),
                          train_dataset=rows, data_collator=SCFTDataCollator(tok))
    trainer.train()
    after = head_state(model)
    assert not torch.equal(after["weight"], before["weight"])
    assert not any(".score.lora_" in n for n, _ in model.named_parameters())
    assert all(p.requires_grad for n, p in model.named_parameters() if ".score.modules_to_save." in n)
    logs = [r for r in trainer.state.log_history if "cls_loss" in r]
    assert len(logs) == 2

    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / ADAPTER_SCFT_CONFIG).is_file()
    reloaded = SCFTForCausalLM.from_pretrained(str(checkpoint))
    assert isinstance(reloaded, peft.PeftModel) and reloaded.get_base_model().scft_config.pool == "pre_eos"
    torch.testing.assert_close(head_state(reloaded)["weight"], after["weight"], rtol=0, atol=0)
    batch = batch_of(tok, rows)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).loss, model(**batch).loss, rtol=1e-6, atol=0)


def test_peft_model_from_pretrained_on_a_patched_base_gives_the_trained_head(tok, rows, base_dir, tmp_path):
    model = peft.get_peft_model(apply_scft_fast(SCFTForCausalLM.from_pretrained(base_dir, init_head=True)),
                                lora(NAMED, task_type="CAUSAL_LM"))
    trainer = SCFTTrainer(model=model, args=w.arguments(str(tmp_path / "run"), save_strategy="steps", save_steps=2),
                          train_dataset=rows, data_collator=SCFTDataCollator(tok))
    trainer.train()
    adapter = str(tmp_path / "run" / "checkpoint-2")
    base = SCFTForCausalLM.from_pretrained(base_dir, init_head=True)
    reloaded = peft.PeftModel.from_pretrained(base, adapter)
    torch.testing.assert_close(head_state(reloaded)["weight"], head_state(model)["weight"], rtol=0, atol=0)


def test_a_loop_of_ones_own_refuses_a_head_peft_froze_or_gave_lora(tok, rows):
    batch = batch_of(tok, rows)
    frozen = peft.get_peft_model(apply_scft_fast(w.causal_lm(tok), scft_config(tok)), lora(NAMED)).train()
    with pytest.raises(ValueError, match=r"the SCFT head \('score'\) is frozen \(requires_grad=False\), yet "
                                         r"cls_labels give it a loss"):
        frozen(**batch)
    lora_head = peft.get_peft_model(apply_scft_fast(w.causal_lm(tok), scft_config(tok)), lora("all-linear")).train()
    with pytest.raises(ValueError, match=r"PEFT put adapter layers on the SCFT head \('score'; "
                                         r"target_modules='all-linear' matches it\)"):
        lora_head(**batch)
    # The fix the errors name: the head gets its plain layer back, joins modules_to_save and gets a gradient.
    for model in (frozen, lora_head):
        apply_scft_fast(model)
        model(**batch).loss.backward()
        grads = [p.grad for n, p in model.named_parameters() if ".score.modules_to_save." in n]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads)
    # Without cls_labels, or with a head frozen on purpose (cls_coef=0), nothing is refused.
    frozen_on_purpose = peft.get_peft_model(apply_scft_fast(w.causal_lm(tok), scft_config(tok, cls_coef=0.0)),
                                            lora(NAMED)).train()
    frozen_on_purpose(**batch)
    plain = peft.get_peft_model(apply_scft_fast(w.causal_lm(tok), scft_config(tok)), lora(NAMED)).train()
    plain(**{k: v for k, v in batch.items() if k not in ("cls_labels", "cls_index")})


def test_plain_trainer_on_scft_data_is_refused_with_the_trainer_to_use(tok, rows, tmp_path):
    """transformers.Trainer's num_items_in_batch counts LM labels only (the loss would be too large and RTO rows
    mis-weighted): refused at the first step, naming SCFTTrainer."""
    model = apply_scft_fast(w.causal_lm(tok), scft_config(tok))
    trainer = Trainer(model=model, args=w.arguments(str(tmp_path), remove_unused_columns=False),
                      train_dataset=rows, data_collator=SCFTDataCollator(tok))
    with pytest.raises(ValueError, match="num_items_in_batch came without num_cls_in_batch.*scft_fast.SCFTTrainer"):
        trainer.train()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_auto_peft_loaders_cannot_rebuild_the_head_and_say_what_can(tok, base_dir, tmp_path, task_type):
    model = peft.get_peft_model(apply_scft_fast(SCFTForCausalLM.from_pretrained(base_dir, init_head=True)),
                                lora(NAMED, task_type=task_type))
    apply_scft_fast(model)
    with torch.no_grad():
        head_state_before = head_state(model)
        model.get_base_model().score.weight.add_(1.0)  # a head unlike any fresh one
    adapter = str(tmp_path / "adapter")
    model.save_pretrained(adapter)
    loader = r"load SCFT adapters with scft_fast.SCFTForCausalLM.from_pretrained\(adapter_dir\)"
    if task_type is None:  # PEFT imports the patched class's module, which names the loader
        with pytest.raises(ValueError, match=r"import_allowlist=\['scft_fast.hf.patch'\]"):
            peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
        with pytest.raises(AttributeError, match=loader):
            peft.AutoPeftModelForCausalLM.from_pretrained(adapter, import_allowlist=["scft_fast.hf.patch"])
    else:  # AutoModelForCausalLM builds the base without a head: every use of the head is refused
        loaded = peft.AutoPeftModelForCausalLM.from_pretrained(adapter)
        with pytest.raises(ValueError, match="its loader dropped the trained head: " + loader):
            apply_scft_fast(loaded, SCFTConfig())
        with pytest.raises(ValueError, match="its loader dropped the trained head: " + loader):
            generate_safe(loaded, tok, ["How do I bake bread?"], max_new_tokens=2)
    reloaded = SCFTForCausalLM.from_pretrained(adapter)  # the loader they name: the trained head, exactly
    torch.testing.assert_close(head_state(reloaded)["weight"], head_state_before["weight"] + 1.0, rtol=0, atol=0)


def test_generate_safe_on_a_plain_model_names_the_loader(tok):
    with pytest.raises(ValueError, match=r"generate_safe needs a model with an SCFT head, but LlamaForCausalLM is a "
                                         r"plain transformers model .*SCFTForCausalLM.from_pretrained\(path\)"):
        generate_safe(w.causal_lm(tok), tok, ["How do I bake bread?"], max_new_tokens=2)
