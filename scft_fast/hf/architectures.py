"""What an architecture's logits and loss are, read from its config and its code: the logit scale and soft cap the
fused op applies, and the causal LMs it refuses (``check_architecture``) because their loss is another."""
from __future__ import annotations

import contextlib
import inspect

import torch
from torch import nn
from transformers import PreTrainedModel

# Logit scales, by the config attribute that holds the value: logits = lm_head(hidden) * value ** power. The
# fused loss applies one by scaling the hidden states it reads (and the head's weight back: _scaled_operands).
LOGIT_SCALES = {
    "logit_scale": 1,  # Cohere
    "logits_scaling": -1,  # Granite: logits / value; MiniCPM3: hidden / value
    "lm_head_multiplier": 1,  # Falcon-H1
    "logits_mup_width_multiplier": -1,  # Inkling: hidden / value
}


# Architectures that read one of those attributes the other way round.
LOGIT_SCALE_POWERS = {"hyperclovax": {"logits_scaling": 1}}  # HyperCLOVAX: logits * logits_scaling


# Soft caps, cap * tanh(logits / cap), by the config attribute that holds the cap: Gemma 2-4, VaultGemma, Beam,
# NanoChat, Inkling 2 | RecurrentGemma | xLSTM.
SOFTCAPS = ("final_logit_softcapping", "logits_soft_cap", "output_logit_soft_cap")


# The patch-time probe (_check_logits_match): a few tokens, the output layer's logits scaled to about this size
# (beyond any soft cap in use), and the agreement asked of the model's own logits and loss, relative: float32
# differs only in summation order; 16-bit weights round the logits to 8-11 bits.
PROBE_TOKENS = 8


PROBE_LOGIT = 1024.0


PROBE_RTOL = {torch.float32: 1e-4, torch.float64: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


# Config attributes of logit transforms the fused loss does not reproduce (read by remote-code models, none of
# transformers' own), with the value that leaves the logits alone. A model that sets one to any other value is
# refused when it is patched.
LOGIT_TRANSFORMS = {
    "output_multiplier_scale": 1.0,
    "mup_width_multiplier": 1.0,  # Phi-3-small: logits / mup_width_multiplier
    "logit_multiplier": 1.0,
    "scale_width": 1.0,  # MiniCPM: logits / (hidden_size / dim_model_base)
}


def check_logit_transforms(config) -> None:
    """Refuses configs whose logits are more than ``lm_head(hidden)``, scaled and soft-capped as LOGIT_SCALES and
    SOFTCAPS name."""
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and float(value) != neutral:
            raise ValueError(
                f"{type(config).__name__} sets {name} = {value}, a logit transform the fused loss does not apply "
                f"(it computes lm_head(hidden), scaled by {', '.join(LOGIT_SCALES)} and soft-capped by "
                f"{', '.join(SOFTCAPS)}); expected {name} absent or {neutral}. Training this model with scft_fast "
                f"would give a wrong loss.")


def own_code_names(model_class: type) -> frozenset[str]:
    """The names (attributes, globals) that the causal LM's own ``__init__`` and ``forward`` read: their code, not
    their docstrings, through each ``super()`` call down to transformers' PreTrainedModel. Inkling 2 reads its soft
    cap in ``__init__``, Gemma 2 in ``forward``."""
    from .patch import SCFTForCausalLM

    if issubclass(model_class, SCFTForCausalLM):
        model_class = model_class.__mro__[model_class.__mro__.index(SCFTForCausalLM) + 1]
    names = set()
    for method in ("__init__", "forward"):
        for owner in model_class.__mro__:
            if owner in PreTrainedModel.__mro__:
                break
            if method in vars(owner):
                code_names = inspect.unwrap(vars(owner)[method]).__code__.co_names
                names.update(code_names)
                if "super" not in code_names:
                    break
    return frozenset(names)


def logit_scale(model: PreTrainedModel) -> float:
    """The factor of the logits over ``lm_head(hidden)``: the LOGIT_SCALES attributes that the model's code reads,
    from its text config (MPT's config has a logit_scale that transformers' MPT never reads)."""
    config = model.config.get_text_config()
    read = own_code_names(type(model))
    powers = {**LOGIT_SCALES, **LOGIT_SCALE_POWERS.get(config.model_type, {})}
    scale = 1.0
    for name, power in powers.items():
        value = getattr(config, name, None) if name in read else None
        if value is not None:
            scale *= float(value) ** power
    return scale


def logit_softcap(model: PreTrainedModel) -> float | None:
    """The soft cap of the SOFTCAPS attribute that the model's code reads, or None (Gemma 3's vision-language model
    leaves its text config's final_logit_softcapping unread)."""
    config = model.config.get_text_config()
    read = own_code_names(type(model))
    return next((float(getattr(config, name)) for name in SOFTCAPS
                 if name in read and getattr(config, name, None)), None)


def check_architecture(model: PreTrainedModel) -> None:
    """Refuses, when it is patched, a causal LM whose training loss is not the fused op's: the mean cross-entropy
    of its (scaled, soft-capped) logits against the next token, through transformers' causal-LM loss.

    The decoders of encoder-decoder models (BART, mBART, MVP, Pegasus, BigBird-Pegasus, Marian, Blenderbot,
    PLBart, TrOCR, Whisper) and CPM-Ant, XLM, XLNet, ProphetNet, MusicGen compute a loss of their own in their
    forward: row t against labels[t], n-gram or codebook losses. Trainer, TRL and scft_fast count a batch's
    targets the causal-LM way (labels[..., 1:]), so these are refused rather than served with another rule.
    This reads the model's code (``own_code_names``); ``apply_scft_fast`` also compares the losses on a probe
    batch (``_check_logits_match``)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    name = type(model).__name__
    if "loss_function" not in own_code_names(type(model)):
        raise ValueError(
            f"{name} computes its loss in its own forward, not with transformers' causal-LM loss "
            f"(self.loss_function, which predicts labels[t + 1] at row t); scft_fast's fused loss is that loss "
            f"only, so training {name} with it would give a wrong loss")
    if model.loss_function is not ForCausalLMLoss:
        raise ValueError(
            f"{name}.loss_function is {getattr(model.loss_function, '__name__', model.loss_function)}, not "
            f"transformers' ForCausalLMLoss (loss_type {getattr(model, 'loss_type', None)!r}); scft_fast's fused "
            f"loss is ForCausalLMLoss only")
    text_config = model.config.get_text_config()
    if getattr(text_config, "output_router_logits", False):
        raise ValueError(
            f"{type(text_config).__name__} sets output_router_logits = True: {name} then adds its router's "
            f"load-balancing loss, which scft_fast's fused loss does not compute; set "
            f"config.output_router_logits = False to train it with scft_fast")
    check_logit_transforms(text_config)


@contextlib.contextmanager
def evaluating(module: nn.Module):
    """``module`` in eval mode (no dropout) inside the block, back in its own mode after it."""
    was_training = module.training
    module.eval()
    try:
        yield module
    finally:
        module.train(was_training)
