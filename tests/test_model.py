"""SCFTForCausalLM against a naive reference built from each architecture's own logits.

Tolerances: the models run in float32 and the reference is the same float32 model's logits, so the two differ
only in summation order (chunked log-sum-exp vs. one softmax): losses to 1e-5 relative, gradients to 1e-4
relative to the largest entry of each tensor.
"""
import pytest
import torch
import torch.nn.functional as F

transformers = pytest.importorskip("transformers")
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

from scft_fast import (
    IGNORE_INDEX,  # noqa: E402
    SCFTConfig,
    SCFTForCausalLM,
)
from scft_fast.hf.export import save_merged  # noqa: E402
from scft_fast.hf.presets import random_causal_lm  # noqa: E402

VOCAB, REFUSAL = 96, 7
SMALL = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64)

ARCHS = {  # name -> (the factory's architecture, its config fields beside SMALL)
    "llama": ("llama", dict(tie_word_embeddings=False)),
    "llama_tied": ("llama", dict(tie_word_embeddings=True)),
    "mistral": ("mistral", dict(tie_word_embeddings=False)),
    "qwen2": ("qwen2", dict(tie_word_embeddings=False)),
    "gemma2_softcap": ("gemma2", dict(head_dim=8, final_logit_softcapping=3.0, query_pre_attn_scalar=8,
                                      tie_word_embeddings=True)),
}


def tiny(arch="llama", seed=0, **overrides):
    factory_arch, extra = ARCHS[arch]
    model = random_causal_lm(factory_arch, seed=seed, **{**SMALL, **extra, **overrides})
    if arch == "gemma2_softcap":
        with torch.no_grad():  # make the soft-cap bite: logits well beyond +-3
            model.get_output_embeddings().weight.mul_(20.0)
    return model


def batch(seed=1, rows=3, length=11):
    """Right-padded rows of different lengths: prompt (no loss), response, EOS; row 1 is an RTO sample."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(8, VOCAB, (rows, length), generator=g)
    lengths = [length, length - 3, length - 5][:rows]
    attention_mask = torch.zeros(rows, length, dtype=torch.long)
    labels = torch.full((rows, length), IGNORE_INDEX)
    transition = torch.full((rows, length), IGNORE_INDEX)
    for r, n in enumerate(lengths):
        attention_mask[r, :n] = 1
        if r == 1:
            transition[r, 3:n] = REFUSAL
        else:
            labels[r, 3:n] = input_ids[r, 3:n]
    cls_labels = torch.tensor([0, 1, IGNORE_INDEX, 0, 1][:rows])
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels, transition_labels=transition,
                cls_labels=cls_labels)


def reference_loss(model: SCFTForCausalLM, b, pool="eos", coefs=(1.0, 1.0, 1.0)):
    """HF's own logits (soft-capped by the model itself) and the three terms written out by hand."""
    out = model.base_forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"], output_hidden_states=True)
    logits = out.logits[:, :-1].float()
    logp = logits.log_softmax(-1)
    lm_t, tr_t = b["labels"][:, 1:], b["transition_labels"][:, 1:]
    lm_mask, tr_mask = lm_t != IGNORE_INDEX, tr_t != IGNORE_INDEX
    lm_sum = -(logp.gather(-1, lm_t.clamp_min(0)[..., None])[..., 0] * lm_mask).sum()
    tr_sum = -(logp.gather(-1, tr_t.clamp_min(0)[..., None])[..., 0] * tr_mask).sum()
    denom = lm_mask.sum() + tr_mask.sum()
    last = b["attention_mask"].sum(1) - 1 - (1 if pool == "pre_eos" else 0)
    pooled = out.hidden_states[-1][torch.arange(len(last)), last]
    cls_logits = F.linear(pooled, model.score.weight, model.score.bias).float()
    cls_loss = F.cross_entropy(cls_logits, b["cls_labels"], ignore_index=IGNORE_INDEX)
    lm_coef, tr_coef, cls_coef = coefs
    return (lm_coef * lm_sum + tr_coef * tr_sum) / denom + cls_coef * cls_loss, cls_logits


def grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_grads_close(a, b, rtol=1e-4):
    assert a.keys() == b.keys()
    for name in a:
        scale = b[name].abs().max().clamp_min(1e-6)
        assert (a[name] - b[name]).abs().max() <= rtol * scale, name


@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("pool", ["eos", "pre_eos"])
def test_loss_and_gradients_match_reference(arch, pool):
    model = SCFTForCausalLM.from_causal_lm(tiny(arch), SCFTConfig(pool=pool, refusal_token_id=REFUSAL,
                                                                  transition_coef=0.7, cls_coef=1.3))
    b = batch()
    out = model(**b)
    out.loss.backward()
    fused = grads(model)
    model.zero_grad()
    ref, ref_cls = reference_loss(model, b, pool, coefs=(1.0, 0.7, 1.3))
    ref.backward()
    torch.testing.assert_close(out.loss, ref.detach(), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out.cls_logits, ref_cls.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(fused, grads(model))
    assert out.transition_loss > 0 and out.lm_loss > 0 and out.cls_loss > 0


def test_training_forward_never_builds_logits():
    model = SCFTForCausalLM.from_causal_lm(tiny("llama"), SCFTConfig())

    def no_logits(*args, **kwargs):
        raise AssertionError("the LM head's forward (the N x V logits) ran during a training forward")

    model.lm_head.forward = no_logits
    out = model(**batch())
    out.loss.backward()
    assert out.logits is None and model.lm_head.weight.grad is not None


def test_lm_only_equals_hf_loss():
    model = SCFTForCausalLM.from_causal_lm(tiny("qwen2"), SCFTConfig(cls_coef=0.0))
    b = batch()
    hf = model.base_forward(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"]).loss
    torch.testing.assert_close(ours, hf, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gemma2_softcap"])
def test_inference_returns_wrapped_logits(arch):
    lm = tiny(arch).eval()  # the unpatched model: from_causal_lm patches its argument in place
    model = SCFTForCausalLM.from_causal_lm(tiny(arch)).eval()
    assert isinstance(model, type(lm)) and type(model).__name__ == type(lm).__name__
    b = batch()
    with torch.no_grad():
        ours = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        theirs = lm(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        probs = model.classify(b["input_ids"], b["attention_mask"])
    assert torch.equal(ours.logits, theirs.logits)
    assert type(ours) is type(theirs)  # without labels: exactly the model's own forward
    last = b["attention_mask"].sum(1) - 1
    hidden = model.get_decoder()(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).last_hidden_state
    expected = F.linear(hidden[torch.arange(3), last], model.score.weight, model.score.bias).float().softmax(-1)
    assert probs.shape == (3, 2)
    torch.testing.assert_close(probs, expected)
    generated = model.generate(b["input_ids"][:1, :4], max_new_tokens=3, do_sample=False)
    assert torch.equal(generated, lm.generate(b["input_ids"][:1, :4], max_new_tokens=3, do_sample=False))


def test_accumulation_with_num_items_equals_large_batch():
    model = SCFTForCausalLM.from_causal_lm(tiny("llama"), SCFTConfig())
    b = batch(rows=3)
    model(**b).loss.backward()
    large = grads(model)
    model.zero_grad()
    parts = [{k: v[:1] for k, v in b.items()}, {k: v[1:] for k, v in b.items()}]
    n_tokens = int((b["labels"][:, 1:] != IGNORE_INDEX).sum() + (b["transition_labels"][:, 1:] != IGNORE_INDEX).sum())
    n_cls = int((b["cls_labels"] != IGNORE_INDEX).sum())
    for part in parts:
        model(**part, num_items_in_batch=n_tokens, num_cls_in_batch=n_cls).loss.backward()
    assert_grads_close(grads(model), large)


def packed(b):
    """The padded batch's sequences concatenated into one row."""
    lengths = b["attention_mask"].sum(1).tolist()
    row = {k: torch.cat([b[k][r, :n] for r, n in enumerate(lengths)])[None]
           for k in ("input_ids", "labels", "transition_labels")}
    starts = torch.tensor([0] + lengths).cumsum(0)
    row["position_ids"] = torch.cat([torch.arange(n) for n in lengths])[None]
    row["cu_seqlens"] = starts.to(torch.int32)
    row["max_seqlen"] = max(lengths)
    row["cls_labels"] = b["cls_labels"]
    return row


@pytest.mark.parametrize("arch", ["llama", "gemma2_softcap"])
def test_packed_equals_padded(arch):
    model = SCFTForCausalLM.from_causal_lm(tiny(arch), SCFTConfig())
    b = batch()
    # A label on each sequence's first token: harmless when padded (nothing predicts it), but packed, the previous
    # sequence's last row would be trained to predict it unless the shift stops at sequence boundaries.
    b["labels"][:, 0] = b["input_ids"][:, 0]
    padded = model(**b)
    padded.loss.backward()
    padded_grads = grads(model)
    model.zero_grad()
    row = packed(b)
    out = model(**row)
    out.loss.backward()
    for field in ("loss", "lm_loss", "transition_loss", "cls_loss", "cls_logits"):
        torch.testing.assert_close(getattr(out, field), getattr(padded, field), rtol=1e-5, atol=1e-5)
    assert_grads_close(grads(model), padded_grads)
    # inference on the packed row pools the same rows
    packed_inference = model.classify(input_ids=row["input_ids"], position_ids=row["position_ids"],
                                      cu_seqlens=row["cu_seqlens"])
    torch.testing.assert_close(packed_inference, padded.cls_logits.softmax(-1), rtol=1e-5, atol=1e-5)
    # Without cu_seqlens, position_ids alone must give the same block-diagonal attention and pooling.
    model.zero_grad()
    row.pop("cu_seqlens")
    torch.testing.assert_close(model(**row).cls_logits, padded.cls_logits, rtol=1e-5, atol=1e-5)


def test_packed_cross_attention_would_change_the_loss():
    """Guards the test above: dropping the block-diagonal mask (one causal row) must change the loss."""
    model = SCFTForCausalLM.from_causal_lm(tiny("llama"), SCFTConfig())
    row = packed(batch())
    block = model(**row).loss
    row.pop("cu_seqlens")
    row["position_ids"] = torch.arange(row["input_ids"].shape[1])[None]
    row.pop("cls_labels")
    assert not torch.allclose(model(**row).loss, block)


def test_save_load_round_trip(tmp_path):
    model = SCFTForCausalLM.from_causal_lm(tiny("llama_tied"), SCFTConfig(pool="pre_eos", refusal_token_id=7,
                                                                        cls_coef=0.5))
    model.save_pretrained(tmp_path)
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path))
    assert loaded.scft_config == model.scft_config
    original = model.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor, original[name]), name
    b = batch()
    torch.testing.assert_close(loaded(**b).loss, model(**b).loss, rtol=0, atol=0)


def test_checkpoint_without_head_is_an_error(tmp_path):
    tiny("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="no SCFT head.*init_head=True"):
        SCFTForCausalLM.from_pretrained(str(tmp_path))
    model = SCFTForCausalLM.from_pretrained(str(tmp_path), init_head=True)
    assert model.score.weight.abs().sum() > 0


def test_lora_trains_adapters_and_head_and_saves_merged(tmp_path):
    peft = pytest.importorskip("peft")
    lm = peft.get_peft_model(tiny("llama"), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    model = SCFTForCausalLM.from_causal_lm(lm, SCFTConfig(head_bias=True))
    assert model is lm  # the PEFT model, patched underneath
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"base_model.model.score.modules_to_save.default.weight",
            "base_model.model.score.modules_to_save.default.bias"} <= trainable
    assert all("lora_" in n or ".score.modules_to_save." in n for n in trainable)
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)
    b = batch()
    head_before = model.score.weight.detach().clone()
    for _ in range(2):
        model(**b).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    assert not torch.equal(model.score.weight, head_before)
    save_merged(model, tmp_path)
    loaded = SCFTForCausalLM.from_pretrained(str(tmp_path))
    with torch.no_grad():
        a, c = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]), loaded(
            input_ids=b["input_ids"], attention_mask=b["attention_mask"])
    torch.testing.assert_close(c.logits, a.logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loaded.classify(b["input_ids"], b["attention_mask"]),
                               model.classify(b["input_ids"], b["attention_mask"]), rtol=1e-5, atol=1e-5)


def test_gradient_checkpointing_gives_the_same_gradients():
    model = SCFTForCausalLM.from_causal_lm(tiny("llama"), SCFTConfig()).train()
    b = batch()
    model(**b).loss.backward()
    plain = grads(model)
    model.zero_grad()
    model.gradient_checkpointing_enable()
    assert model.get_decoder().gradient_checkpointing
    model(**b).loss.backward()
    assert_grads_close(grads(model), plain, rtol=1e-6)


def test_unknown_logit_transforms_are_refused():
    phi3_small_like = LlamaForCausalLM(LlamaConfig(**SMALL, mup_width_multiplier=8.0))  # a remote-code attribute
    with pytest.raises(ValueError, match="mup_width_multiplier = 8.0"):
        SCFTForCausalLM.from_causal_lm(phi3_small_like)

    class ScaledLogits(LlamaForCausalLM):  # a transform no config attribute announces
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 2.0
            return out

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="logit transform"):
        SCFTForCausalLM.from_causal_lm(ScaledLogits(LlamaConfig(**SMALL)))


def test_config_validation():
    with pytest.raises(ValueError, match="pool must be one of"):
        SCFTConfig(pool="mean")
    with pytest.raises(ValueError, match="num_labels"):
        SCFTConfig(num_labels=1)


def test_bf16_autocast_runs_the_loss_in_bf16():
    """Under autocast the fused loss runs in bfloat16 (float32 accumulation): close to the float32 loss."""
    model = SCFTForCausalLM.from_causal_lm(tiny("llama"), SCFTConfig())
    b = batch()
    full = model(**b).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model(**b)
    half.loss.backward()
    assert float(half.loss.detach()) == pytest.approx(float(full.detach()), rel=2e-2)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
