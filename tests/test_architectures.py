"""Every causal LM that transformers registers: after apply_scft_fast it computes exactly its own loss, or it is
refused when it is patched, with an error that says why.

The sweep walks MODEL_FOR_CAUSAL_LM_MAPPING, so an architecture that a new transformers release adds is checked
too: it must match its own loss, and a new refusal fails until REFUSED lists it with its reason. Each model is built
on CPU from a tiny config (helpers.tiny_causal_lm), every logit scale and soft cap its config has set away from
its neutral value, so that the fused loss has to apply it to match.

Tolerance: float32, the fused loss and the model's own differ only in summation order (chunked log-sum-exp vs one
softmax over the N x V logits): losses rel 1e-5, the head's logits 1e-5, as in test_model.py.
"""
import pytest
import torch

transformers = pytest.importorskip("transformers")
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES  # noqa: E402

from helpers import TINY_VOCAB, tiny_causal_lm  # noqa: E402
from scft_fast import IGNORE_INDEX, SCFTConfig, apply_scft_fast  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread", "quiet_transformers")

# model_type -> (why it cannot be built here, text of the exception its build raises).
CANNOT_BUILD = {
    "gemma3n": ("its vision tower is a timm model and timm is not installed", "requires the timm library"),
    # Gemma 4's speculative-decoding assistants read every layer's key-value cache from their target model: no
    # config of their own builds (transformers' defaults included).
    "gemma4_assistant": ("a draft model that needs its target model's cache", "hidden_size_per_layer_input must be 0"),
    "gemma4_unified_assistant": ("a draft model that needs its target model's cache",
                                 "set of layer types producing a cache"),
}

OWN_LOSS = "{} computes its loss in its own forward, not with transformers' causal-LM loss"
TRANSFORMS_HIDDEN = ("{}'s logits are not get_output_embeddings()(final hidden state), scaled by 1 and soft-capped "
                     "by None: it transforms the decoder's hidden states before its output layer")
NOT_TEXT_ONLY = "{} cannot be checked: its own forward with labels on a text-only probe batch fails"
REFUSED = {  # model_type -> the start of its refusal ({} is the class name)
    **{t: OWN_LOSS for t in (
        # decoders of encoder-decoder models, and others: row t against labels[t], or n-gram / codebook losses
        "bart", "bigbird_pegasus", "blenderbot", "blenderbot-small", "cpmant", "marian", "mbart", "musicgen",
        "musicgen_melody", "mvp", "pegasus", "plbart", "prophetnet", "trocr", "whisper", "xlm", "xlnet")},
    **{t: TRANSFORMS_HIDDEN for t in (  # BERT-style prediction heads: dense + activation + norm before the output
        "bert", "big_bird", "camembert", "data2vec-text", "electra", "ernie", "megatron-bert", "modernbert-decoder",
        "roberta", "roberta-prelayernorm", "roc_bert", "roformer", "xlm-roberta", "xlm-roberta-xl", "xmod")},
    # output layers wider than the hidden size: both reversible streams (2 x 32); a separate output embedding size
    "reformer": "{}'s output layer reads 64 features, not the decoder's hidden size 32",
    "rembert": "{}'s output layer reads 1664 features, not the decoder's hidden size 32",
    "git": NOT_TEXT_ONLY,  # its loss skips the image tokens, which it counts even without an image
}


def batch(rows=2, length=10):
    """Row 0 full, row 1 right-padded by 2; the first 3 tokens a prompt without loss."""
    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, TINY_VOCAB, (rows, length), generator=g)
    attention_mask = torch.ones(rows, length, dtype=torch.long)
    attention_mask[1, -2:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, IGNORE_INDEX)
    labels[:, :3] = IGNORE_INDEX
    return dict(input_ids=input_ids, attention_mask=attention_mask, labels=labels)


@pytest.fixture(scope="module")
def quiet_transformers():
    """No warnings about tiny configs (unusual head counts, unrecognized loss types) while the sweep builds."""
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    yield
    transformers.logging.set_verbosity(verbosity)


@pytest.mark.parametrize("model_type", sorted(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES))
def test_own_loss_or_refused(model_type):
    if model_type in CANNOT_BUILD:
        reason, raised = CANNOT_BUILD[model_type]
        with pytest.raises(Exception, match=raised):  # still true, or the entry goes
            tiny_causal_lm(model_type)
        pytest.skip(f"cannot be built here: {reason}")
    model = tiny_causal_lm(model_type)
    name = type(model).__name__
    if model_type in REFUSED:
        with pytest.raises(ValueError) as refusal:
            apply_scft_fast(model)
        assert str(refusal.value).startswith(REFUSED[model_type].format(name)), str(refusal.value)
        return
    apply_scft_fast(model)
    b = batch()
    with torch.no_grad():
        own = model.base_forward(**b, use_cache=False).loss
        fused = model(**b)
        assert fused.logits is None
        torch.testing.assert_close(fused.loss, own, rtol=1e-5, atol=0)

        apply_scft_fast(model, SCFTConfig())
        cls_labels = torch.tensor([0, 1])
        out = model(**b, cls_labels=cls_labels)
        torch.testing.assert_close(out.lm_loss, own, rtol=1e-5, atol=0)
        hidden = model.final_hidden_states(input_ids=b["input_ids"], attention_mask=b["attention_mask"])
        last = b["attention_mask"].sum(1) - 1
        expected = model.score(hidden[torch.arange(2), last]).float()
        torch.testing.assert_close(out.cls_logits, expected, rtol=1e-5, atol=1e-6)
