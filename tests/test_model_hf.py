"""The patched model is the Hugging Face model: apply_scft_fast in place, plain loaders, exports.

Tolerances as in test_model.py: the fused loss and the reference run the same float32 model and differ only in
summation order (losses rel 1e-5); the exported classifier runs the same weights through transformers' own
pooling (probabilities abs 1e-6).
"""
import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)

from scft_fast import IGNORE_INDEX, SCFTConfig, SCFTForCausalLM, apply_scft_fast  # noqa: E402
from scft_fast.hf.presets import random_causal_lm  # noqa: E402
from scft_fast.model import export_sequence_classifier  # noqa: E402

VOCAB, EOS, PAD = 96, 2, 0
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, eos_token_id=EOS, pad_token_id=PAD)


def llama(seed=0, **overrides):
    return random_causal_lm("llama", None, seed, **{**SMALL, "tie_word_embeddings": False, **overrides})


def sft_batch(seed=1, rows=3, length=12):
    """Right-padded rows ending in EOS (padded with PAD), the first 4 tokens a prompt without loss."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, VOCAB, (rows, length), generator=g)
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX)
    for r, n in enumerate([length, length - 3, length - 5][:rows]):
        input_ids[r, n - 1] = EOS
        input_ids[r, n:] = PAD
        attention_mask[r, :n] = 1
        labels[r, 4:n] = input_ids[r, 4:n]
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


def test_patched_in_place_and_still_the_architecture():
    model = llama()
    original_class = type(model)
    assert apply_scft_fast(model) is model
    assert isinstance(model, original_class) and isinstance(model, SCFTForCausalLM)
    assert isinstance(model, transformers.PreTrainedModel) and type(model).__name__ == "LlamaForCausalLM"
    assert model.can_generate() and model.scft_config is None and not hasattr(model, "score")
    assert apply_scft_fast(model) is model  # idempotent
    apply_scft_fast(model, SCFTConfig())
    assert model.score.weight.shape == (2, SMALL["hidden_size"])
    with pytest.raises(ValueError, match="already has an SCFT head"):
        apply_scft_fast(model, SCFTConfig(num_labels=3))


@pytest.mark.parametrize("model_fn", [llama, lambda: Qwen2ForCausalLM(Qwen2Config(**SMALL))])
def test_plain_fused_lm_loss_equals_the_models_own(model_fn):
    torch.manual_seed(0)
    model = apply_scft_fast(model_fn())
    b = sft_batch()
    own = model.base_forward(**b).loss
    fused = model(**b)
    assert fused.logits is None
    torch.testing.assert_close(fused.loss, own, rtol=1e-5, atol=1e-6)
    n = int((b["labels"][:, 1:] != IGNORE_INDEX).sum())
    own_sum = model.base_forward(**b, num_items_in_batch=2 * n).loss  # Trainer's normalizer over two batches
    torch.testing.assert_close(model(**b, num_items_in_batch=2 * n).loss, own_sum, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="need an SCFT head"):
        model(**b, transition_labels=b["labels"])


def test_plain_fused_lm_loss_under_peft_trains_only_adapters():
    peft = pytest.importorskip("peft")
    lm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    model = apply_scft_fast(lm)
    assert model is lm
    b = sft_batch()
    out = model(**b)
    own = model.get_base_model().base_forward(**b).loss
    torch.testing.assert_close(out.loss, own, rtol=1e-5, atol=1e-6)
    out.loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad and all("lora_" in n for n in with_grad)


def test_saved_scft_model_loads_with_plain_auto_model(tmp_path):
    model = SCFTForCausalLM.from_causal_lm(llama(tie_word_embeddings=True), SCFTConfig(pool="eos"))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["scft"]["num_labels"] == 2
    plain = AutoModelForCausalLM.from_pretrained(tmp_path)  # score.* reported as unexpected, not an error
    assert type(plain) is LlamaForCausalLM
    b = sft_batch()
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits,
                                   model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits)
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path), dtype=torch.float32)
    assert loaded.scft_config == model.scft_config and torch.equal(loaded.score.weight, model.score.weight)


def test_gradient_checkpointing_takes_hf_kwargs():
    model = SCFTForCausalLM.from_causal_lm(llama(), SCFTConfig()).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert model.get_decoder().gradient_checkpointing
    b = sft_batch()
    model(**b, cls_labels=torch.tensor([0, 1, 0])).loss.backward()
    assert model.score.weight.grad is not None and model.get_decoder().embed_tokens.weight.grad is not None


def _classifier_probs(path, b):
    classifier = AutoModelForSequenceClassification.from_pretrained(path).eval()
    with torch.no_grad():
        return classifier(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.softmax(-1)


@pytest.mark.parametrize("pool", ["eos", "pre_eos"])
def test_exported_classifier_gives_the_heads_probabilities(tmp_path, pool):
    model = SCFTForCausalLM.from_causal_lm(llama(), SCFTConfig(pool=pool)).eval()
    with torch.no_grad():
        model.score.weight.normal_(0.0, 0.2)  # readings spread over (0, 1), neither all near 0.5 nor saturated
    export_sequence_classifier(model, str(tmp_path))
    b = sft_batch()
    if pool == "pre_eos":  # the export pads with EOS, so that the rightmost non-pad token is the one before it
        b["input_ids"] = b["input_ids"].masked_fill(b["attention_mask"] == 0, EOS)
    expected = model.classify(b["input_ids"], b["attention_mask"])
    assert expected[:, 1].std() > 0.05
    torch.testing.assert_close(_classifier_probs(tmp_path, b), expected, rtol=0, atol=1e-6)


def test_exported_classifier_with_lora_merges_the_adapters(tmp_path):
    peft = pytest.importorskip("peft")
    lm = peft.get_peft_model(llama(), peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"],
                                                      init_lora_weights=False))
    model = SCFTForCausalLM.from_causal_lm(lm, SCFTConfig()).eval()
    export_sequence_classifier(model, str(tmp_path))
    b = sft_batch()
    torch.testing.assert_close(_classifier_probs(tmp_path, b), model.classify(b["input_ids"], b["attention_mask"]),
                               rtol=0, atol=1e-6)


def test_export_refuses_what_the_classifier_cannot_hold(tmp_path):
    biased = SCFTForCausalLM.from_causal_lm(llama(), SCFTConfig(head_bias=True))
    with torch.no_grad():
        biased.score.bias.fill_(0.5)
    with pytest.raises(ValueError, match="non-zero bias"):
        export_sequence_classifier(biased, str(tmp_path))
    pad_is_eos = SCFTForCausalLM.from_causal_lm(llama(pad_token_id=EOS), SCFTConfig(pool="eos"))
    with pytest.raises(ValueError, match="pad_token_id"):
        export_sequence_classifier(pad_is_eos, str(tmp_path))
    export_sequence_classifier(pad_is_eos, str(tmp_path), pad_token_id=PAD)  # a distinct pad token given
    assert json.loads((tmp_path / "config.json").read_text())["pad_token_id"] == PAD
