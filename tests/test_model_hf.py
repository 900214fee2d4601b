"""The patched model is the Hugging Face model: apply_scft_fast in place, plain loaders, exports.

Tolerances as in test_model.py: the fused loss and the reference run the same float32 model and differ only in
summation order (losses rel 1e-5, gradients 1e-4 of each tensor's largest entry); the exported classifier runs
the same weights through transformers' own pooling (probabilities abs 1e-6); bfloat16 losses rel 2e-2.
"""
import json
import re

import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen2Config,
    Qwen2ForCausalLM,
)
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

from helpers import tiny_causal_lm, tiny_config  # noqa: E402
from scft_fast import IGNORE_INDEX, SCFTConfig, SCFTForCausalLM, apply_scft_fast  # noqa: E402
from scft_fast.hf.export import export_sequence_classifier  # noqa: E402
from scft_fast.hf.presets import random_causal_lm  # noqa: E402

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


# -- architectures: each one's own loss, or a refusal that says why (the registry sweep: test_architectures.py) ----
LOGIT_TRANSFORMS = {  # model type -> a logit scale or soft cap, under the name its config uses
    "cohere": dict(logit_scale=0.0625),  # logits * value
    "granite": dict(logits_scaling=4.0),  # logits / value
    "hyperclovax": dict(logits_scaling=4.0),  # logits * value: the same name the other way round
    "falcon_h1": dict(lm_head_multiplier=0.25),
    "inkling_text": dict(logits_mup_width_multiplier=4.0),  # hidden / value, before the output layer
    "gemma2": dict(final_logit_softcapping=3.0),
    "recurrent_gemma": dict(logits_soft_cap=3.0),
    "xlstm": dict(output_logit_soft_cap=3.0),
    "inkling2_text": dict(final_logit_softcapping=3.0),  # read in __init__ (a soft-cap module), not in forward
}


def assert_grads_close(model, expected: dict[str, torch.Tensor]):
    """Each gradient to 1e-4 of its largest entry (float32, summation order only)."""
    for name, param in model.named_parameters():
        if name in expected:
            torch.testing.assert_close(param.grad, expected[name], rtol=0,
                                       atol=1e-4 * expected[name].abs().max().item() + 1e-8, msg=name)


def own_loss_and_grads(model, b):
    loss = model(**b, use_cache=False).loss  # recurrent models' caches expect generation, not a loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def patch_and_compare(model, b) -> torch.Tensor:
    """``apply_scft_fast(model)``: its fused loss and every gradient equal the model's own; returns the own loss."""
    own, own_grads = own_loss_and_grads(model, b)
    apply_scft_fast(model)
    fused = model(**b)
    fused.loss.backward()
    torch.testing.assert_close(fused.loss.detach(), own, rtol=1e-5, atol=0)
    assert_grads_close(model, own_grads)
    return own


@pytest.mark.parametrize("model_type", sorted(LOGIT_TRANSFORMS))
def test_logit_scale_or_soft_cap_under_its_own_config_name(model_type, one_thread):
    model = tiny_causal_lm(model_type, **LOGIT_TRANSFORMS[model_type])
    with torch.no_grad():  # logits well beyond the soft caps
        model.get_output_embeddings().weight.mul_(20.0)
    b = sft_batch()
    own = patch_and_compare(model, b)
    with torch.no_grad():  # the transform matters: the loss of the bare output layer is another loss
        hidden = model.final_hidden_states(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        bare = F.cross_entropy(model.get_output_embeddings()(hidden)[:, :-1].flatten(0, 1),
                               b["labels"][:, 1:].flatten(), ignore_index=IGNORE_INDEX)
    assert abs(bare - own) > 0.01 * own

    apply_scft_fast(model, SCFTConfig())  # the head reads the unscaled hidden states
    with torch.no_grad():
        out = model(**b, cls_labels=torch.tensor([0, 1, 0]))
        torch.testing.assert_close(out.lm_loss, own, rtol=1e-5, atol=0)
        last = b["attention_mask"].sum(1) - 1
        torch.testing.assert_close(out.cls_logits, model.score(hidden[torch.arange(3), last]), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("model_type, model_class", [
    ("llama4_text", None), ("llama4", None), ("llama4", "Llama4ForConditionalGeneration"),
    ("mllama", None), ("mllama", "MllamaForConditionalGeneration")])
def test_decoders_that_get_decoder_does_not_give(model_type, model_class, one_thread):
    """Llama 4's and Mllama's get_decoder() return the causal LM itself: the fused loss finds the text model."""
    if model_class is None:
        model = tiny_causal_lm(model_type)
    else:
        torch.manual_seed(0)
        model = getattr(transformers, model_class)(tiny_config(CONFIG_MAPPING[model_type], model_type)).eval()
    b = sft_batch()
    patch_and_compare(model, b)
    if model_class is not None:  # the text decoder would leave the image out
        decoder = type(model.lm_decoder()).__name__
        with pytest.raises(ValueError, match=re.escape(
                f"{model_class}'s fused loss reads the hidden states of {decoder}, which does not take "
                f"['pixel_values']: the model's own forward would use them")):
            model(**b, pixel_values=torch.zeros(1, 3, 32, 32))


REFUSALS = {  # case -> (model type, config fields, the refusal)
    "electra_narrower_output": ("electra", dict(embedding_size=16), (
        "ElectraForCausalLM's output layer reads 16 features, not the decoder's hidden size 32: a projection between "
        "the two (an embedding size other than the hidden size) that scft_fast's fused loss, which reads the "
        "decoder's hidden states, does not apply")),
    "rembert_wider_output": ("rembert", dict(output_embedding_size=48), (
        "RemBertForCausalLM's output layer reads 48 features, not the decoder's hidden size 32")),
    "bart_decoder_unshifted": ("bart", {}, (
        "BartForCausalLM computes its loss in its own forward, not with transformers' causal-LM loss "
        "(self.loss_function, which predicts labels[t + 1] at row t); scft_fast's fused loss is that loss only, so "
        "training BartForCausalLM with it would give a wrong loss")),
    "whisper_decoder_unshifted": ("whisper", {}, "WhisperForCausalLM computes its loss in its own forward"),
    "xlnet_unshifted": ("xlnet", {}, "XLNetLMHeadModel computes its loss in its own forward"),
    "mixtral_router_loss": ("mixtral", dict(output_router_logits=True), (
        "MixtralConfig sets output_router_logits = True: MixtralForCausalLM then adds its router's load-balancing "
        "loss, which scft_fast's fused loss does not compute; set config.output_router_logits = False to train it "
        "with scft_fast")),
    "bert_prediction_head": ("bert", {}, (
        "BertLMHeadModel's logits are not get_output_embeddings()(final hidden state), scaled by 1 and soft-capped "
        "by None: it transforms the decoder's hidden states before its output layer")),
}


@pytest.mark.parametrize("case", sorted(REFUSALS))
def test_architectures_the_fused_loss_cannot_serve_are_refused_when_patched(case, one_thread):
    model_type, fields, refusal = REFUSALS[case]
    with pytest.raises(ValueError, match="^" + re.escape(refusal)):
        apply_scft_fast(tiny_causal_lm(model_type, **fields))


def test_a_loss_type_other_than_the_causal_lm_loss_is_refused():
    model = llama()
    model.loss_type = "ForMaskedLM"
    with pytest.raises(ValueError, match=re.escape(
            "LlamaForCausalLM.loss_function is ForMaskedLMLoss, not transformers' ForCausalLMLoss (loss_type "
            "'ForMaskedLM'); scft_fast's fused loss is ForCausalLMLoss only")):
        apply_scft_fast(model)


class UnshiftedLlama(LlamaForCausalLM):
    """A subclass that keeps transformers' loss function but compares row t with labels[t]."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        if labels is not None:
            out.loss = F.cross_entropy(out.logits.flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE_INDEX)
        return out


class SoftCappedLlama(LlamaForCausalLM):
    """A soft cap that no config attribute names, at 30: a random model's logits (about 1) hardly feel it."""

    def forward(self, input_ids=None, labels=None, **kwargs):
        out = super().forward(input_ids=input_ids, **kwargs)
        out.logits = 30.0 * torch.tanh(out.logits / 30.0)
        if labels is not None:
            out.loss = self.loss_function(out.logits, labels, self.config.vocab_size)
        return out


def test_the_probe_finds_what_no_config_attribute_says():
    torch.manual_seed(0)
    unshifted = UnshiftedLlama(LlamaConfig(**SMALL))
    with pytest.raises(ValueError, match=r"own loss on a probe batch is [\d.]+, not the mean cross-entropy of its "
                                         r"logits against the next tokens \([\d.]+\): it compares row t with "
                                         r"labels\[t\], not labels\[t \+ 1\]"):
        apply_scft_fast(unshifted)
    torch.manual_seed(0)
    capped = SoftCappedLlama(LlamaConfig(**SMALL))
    with torch.no_grad():
        assert capped(**sft_batch()).logits.abs().max() < 3  # 30 tanh(z / 30) is z within 0.4 %
    with pytest.raises(ValueError, match="SoftCappedLlama's logits are not get_output_embeddings.* it applies a "
                                         "logit transform that no config attribute scft_fast knows names"):
        apply_scft_fast(capped)


@pytest.mark.parametrize("model_type", ["gemma2", "cohere"])
def test_the_probe_accepts_bf16_models(model_type):
    """16-bit logits round to 8 bits: the probe's tolerance follows the weights' dtype, no false refusal."""
    model = tiny_causal_lm(model_type, **LOGIT_TRANSFORMS[model_type]).to(torch.bfloat16)
    apply_scft_fast(model)
    b = sft_batch()
    with torch.no_grad():
        torch.testing.assert_close(model(**b).loss, model.base_forward(**b).loss.float(), rtol=2e-2, atol=0)


def test_the_probe_runs_without_dropout_and_leaves_the_mode_alone():
    model = tiny_causal_lm("gpt2", resid_pdrop=0.5, embd_pdrop=0.5, attn_pdrop=0.5).train()
    apply_scft_fast(model)  # a probe in training mode would compare two different dropout draws
    assert model.training


def test_router_loss_asked_of_the_forward_is_refused():
    model = apply_scft_fast(tiny_causal_lm("mixtral"))
    b = sft_batch()
    model(**b, output_router_logits=False)
    with pytest.raises(ValueError, match=re.escape(
            "MixtralForCausalLM's fused loss reads the hidden states of MixtralModel, which does not take "
            "['output_router_logits']: the model's own forward would use them (images, audio, a router loss), the "
            "fused loss would leave them out; scft_fast trains this model on batches without them")):
        model(**b, output_router_logits=True)
