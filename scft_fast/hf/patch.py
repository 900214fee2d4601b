"""SCFT for any Hugging Face causal LM, and the model stays that model.

``apply_scft_fast(model, config)`` patches a causal LM in place, as Liger-Kernel and Cut Cross-Entropy do: the
instance's class becomes a subclass of ``SCFTForCausalLM`` and of its own class, under the same name, so it
is still a ``LlamaForCausalLM`` (``Qwen2ForCausalLM``, ...) and a ``PreTrainedModel``. Saving and loading, Trainer
checkpoints (tied embeddings included), gradient checkpointing, PEFT, TRL's hooks and ``generate()`` are the
libraries' own code. Only ``forward`` changes. With labels, the decoder's final hidden states go straight into
``safety_loss`` (LM + RTO + the ``score`` head), and the N x V logits are never built. Without labels it is the
model's own forward. Every architecture is served through transformers' accessors: ``get_decoder()``,
``get_output_embeddings()`` and the config attributes of its logit scale and soft cap. An architecture whose
loss the fused op cannot reproduce is refused when it is patched (``check_architecture``), and
``apply_scft_fast`` checks on a probe batch that the model's own logits and loss are what the op computes.

ZeRO-3: the fused loss runs inside ``scft_loss``, a submodule with no parameters of its own. The LM head's and
the classifier's weights are registered as its external parameters, so DeepSpeed gathers them for its forward
and again for its backward. A partitioned weight is never read anywhere else.
"""
from __future__ import annotations

import contextlib
import inspect
import math
import os
import warnings
from dataclasses import asdict

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from ..data.checks import NoHeadLabelWarning, check_batch
from ..data.collate import positions_from_cu_seqlens, positions_from_mask, shift_labels
from ..ops import last_token_index, safety_loss
from .architectures import (
    LOGIT_SCALES,
    PROBE_LOGIT,
    PROBE_RTOL,
    PROBE_TOKENS,
    SOFTCAPS,
    check_architecture,
    evaluating,
    logit_scale,
    logit_softcap,
)
from .config import HEAD_NAME, HEAD_PREFIX, PLAIN_LM, SCFT_CONFIG_KEY, SCFTConfig, SCFTOutput
from .loading import has_head
from .peft import (
    ADAPTER_CONFIG,
    ADAPTER_LOADER_HINT,
    _load_adapter,
    _lora_wrapped,
    _refuse_dropped_head,
    train_head_with_adapter,
    unwrap,
)
from .private_patches import is_trl_fused_lm_head, sft_trainer_datasets


def _zero3_gathered(params: list[nn.Parameter], modifier_rank: int | None = 0):
    """DeepSpeed's gather of ZeRO-3 partitioned parameters, or nothing for ordinary ones."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


class FusedSafetyLoss(nn.Module):
    """``safety_loss`` over the final hidden states, as a module with no parameters of its own. It is a module
    so that ZeRO-3 gathers the weights it reads (registered as its external parameters) around its forward and
    backward; it takes the output layer and the head as modules and reads their weights itself, so that no other
    forward reads a partitioned weight (ZeRO-3 would then keep it gathered through the whole model's forward)."""

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H) final hidden states
        lm_head: nn.Module,  # the output layer: weight (V, H), optional bias (V,)
        score: nn.Module | None,  # the SCFT head: weight (C, H), optional bias (C,); None: no head term
        labels: torch.Tensor,  # (N,) already shifted
        transition_labels: torch.Tensor | None,  # (N,) already shifted
        pooled: dict,  # cls_index (S,), cls_labels (S,) of the head term
        num_items: torch.Tensor | int | None,
        num_cls: torch.Tensor | int | None,
        softcap: float | None,
        logit_scale: float,
        options: SCFTConfig,  # coefficients, backend, chunk size, ignore_index
        return_token_stats: bool = False,
    ) -> dict:
        lm_bias = getattr(lm_head, "bias", None)
        head = {} if score is None else dict(cls_weight=score.weight, cls_bias=score.bias, **pooled)
        if logit_scale != 1.0:
            # lm_head(hidden) * s = W (s hidden) + s b: an N x H product rather than a V x H one. The head reads the
            # same rows, so its weight comes divided by s and its logits stay cls_weight hidden + cls_bias.
            hidden = hidden * logit_scale
            lm_bias = None if lm_bias is None else lm_bias * logit_scale
            if head:
                head["cls_weight"] = head["cls_weight"] / logit_scale
        # Under autocast the op runs in the autocast dtype (safety_loss casts its inputs).
        out = safety_loss(
            hidden, lm_head.weight, labels, lm_bias=lm_bias, transition_labels=transition_labels, **head,
            lm_coef=options.lm_coef, transition_coef=options.transition_coef, cls_coef=options.cls_coef,
            num_items=num_items, num_cls=num_cls, ignore_index=options.ignore_index, softcap=softcap,
            backend=options.backend, chunk_size=options.chunk_size, return_token_stats=return_token_stats)
        # A dict, not the dataclass: ZeRO-3 finds the tensors its backward hooks attach to only inside tuples,
        # lists and dicts, and without those hooks the weights are not re-gathered for the backward.
        return vars(out)


_PATCHED_CLASSES: dict[type, type] = {}


def scft_class(model_class: type) -> type:
    """The class of ``model_class``'s models once patched: ``(SCFTForCausalLM, model_class)``, same name."""
    if issubclass(model_class, SCFTForCausalLM):
        return model_class
    if not (isinstance(model_class, type) and issubclass(model_class, PreTrainedModel)):
        raise TypeError(f"scft_fast patches transformers PreTrainedModel causal LMs, got {model_class!r}")
    if model_class not in _PATCHED_CLASSES:
        # Same __name__, so that save_pretrained records the architecture that plain loaders (AutoModel,
        # vLLM) know. Another __module__, so that pickle fails loudly rather than unpickling an unpatched model.
        _PATCHED_CLASSES[model_class] = type(model_class.__name__, (SCFTForCausalLM, model_class), {
            "__module__": __name__, "__qualname__": model_class.__qualname__, "__doc__": model_class.__doc__})
    return _PATCHED_CLASSES[model_class]


def apply_scft_fast(model: nn.Module, config: SCFTConfig | None = None, *, check_logits: bool = True) -> nn.Module:
    """Makes ``model`` (any HF causal LM, PEFT-wrapped or not) compute its training loss with the fused op, in
    place, and returns it.

    ``config=None``: a plain fused LM loss. With labels the forward never builds the logits, and
    ``num_items_in_batch`` is honoured as Trainer passes it; any trainer can use it for ordinary SFT. With an
    ``SCFTConfig`` the model also gets ``score``, the safety head (initialized as the architecture initializes
    a linear layer), and its forward accepts ``transition_labels`` / ``cls_labels`` / ``cls_index``. Under
    PEFT the head is added to the adapter's ``modules_to_save``, so it trains fully and adapter checkpoints
    carry it; called on a PEFT model whose base already has a head (``apply_scft_fast`` before
    ``get_peft_model``), it does just that. ``check_logits`` runs one 4-token forward to make sure the model's
    logits are ``lm_head(hidden)`` (this catches logit transforms that no config attribute names).
    """
    base = unwrap(model)
    if base is not model:
        _refuse_dropped_head(model, base)
    if isinstance(base, SCFTForCausalLM):
        if config is None or config == base.scft_config:
            if base is not model and base.scft_config is not None:  # LoRA put on a patched SCFT model
                train_head_with_adapter(model)
            return model
        if base.scft_config is not None:
            raise ValueError(f"the model already has an SCFT head ({base.scft_config}); apply_scft_fast cannot "
                             f"replace it with {config}")
    else:
        base.__class__ = scft_class(type(base))
    base._setup_scft(config, init_head=True)
    if check_logits:
        base._check_logits_match()
    if base is not model and config is not None:
        train_head_with_adapter(model)
    return model


class SCFTForCausalLM:
    """The mixin ``apply_scft_fast`` puts in front of a causal LM's class. Use ``from_causal_lm`` /
    ``apply_scft_fast`` on a model, or ``SCFTForCausalLM.from_pretrained(path)`` on a directory written by
    ``save_pretrained``: both give the architecture's own class, patched."""

    def __init__(self, config, *args, **kwargs):
        # Reached when transformers builds the patched class itself (from_pretrained, from_config, zero.Init):
        # the SCFT settings come from config.json, so the head is built before the weights are loaded.
        super().__init__(config, *args, **kwargs)
        saved = getattr(config, SCFT_CONFIG_KEY, None)
        self._setup_scft(SCFTConfig.from_dict(saved) if saved else None, init_head=True)

    def __setattr__(self, name: str, value) -> None:
        if (name == "forward" and not getattr(self, "_fused_lm_head_allowed", False)
                and is_trl_fused_lm_head(value)):
            self._refuse_trl_lm_head()
        super().__setattr__(name, value)

    def _refuse_trl_lm_head(self) -> None:
        """trl.SFTTrainer (not scft_fast's SCFTSFTTrainer) is patching its own LM head over this model's forward: its
        loss knows no RTO target and no head. Refused on an SCFT model, and on any model when the trainer's data
        carry RTO rows, whose harmful completions it would train as LM targets."""
        if getattr(self, "scft_config", None) is not None:
            raise ValueError(
                "trl.SFTTrainer computes its loss with a fused LM head of its own, patched over the model's forward: "
                "it knows no RTO target and no SCFT head, so the head would never train and RTO rows would be "
                "trained as LM targets. Train an SCFT model with scft_fast.SCFTSFTTrainer (SFTTrainer's "
                "constructor), or patch with apply_scft_fast(model) (no SCFTConfig) for plain SFT")
        from .trl import RTO_COLUMN, SAFETY_ROW_COLUMNS, _refuse_safety_columns

        _refuse_safety_columns(sft_trainer_datasets(), (RTO_COLUMN, *SAFETY_ROW_COLUMNS), trainer="trl.SFTTrainer")

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, config: SCFTConfig | None = None,
                       check_logits: bool = True) -> nn.Module:
        """``apply_scft_fast(causal_lm, config or SCFTConfig())``: the same model, with the head."""
        return apply_scft_fast(causal_lm, config or SCFTConfig(), check_logits=check_logits)

    @classmethod
    def from_pretrained(cls, path: str, *args, init_head: bool = False, config: SCFTConfig | None = None,
                        **kwargs) -> PreTrainedModel:
        """Loads what ``save_pretrained`` wrote (or any HF causal LM) as its architecture's patched class.
        A checkpoint without ``score.weight`` is an error unless ``init_head=True``; then ``config``, the
        checkpoint's SCFT settings or the defaults describe the new head. ``config`` overrides the saved
        settings (the head's shape must match). Other keyword arguments go to transformers' from_pretrained
        (dtype, device_map, attn_implementation, ...).

        A PEFT adapter directory (``adapter_config.json``) gives the ``PeftModel``: its base (the adapter's
        ``base_model_name_or_path``, or ``base_model=``) loaded with a head, then the adapter, whose
        ``modules_to_save`` hold the trained head. The head's shape is read from the adapter's tensors, its other
        settings from ``config``, else the ``scft_config.json`` SCFTTrainer writes beside its adapter
        checkpoints, else the base's, else the defaults. ``is_trainable=True`` keeps the adapter trainable."""
        if cls is not SCFTForCausalLM:  # a concrete patched class: transformers' own loading
            if config is not None:  # here, transformers' config argument
                kwargs["config"] = config
            return super().from_pretrained(path, *args, **kwargs)
        if os.path.isfile(os.path.join(path, ADAPTER_CONFIG)):
            return _load_adapter(path, *args, config=config, **kwargs)
        from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

        hf_config = kwargs.pop("hf_config", None) or AutoConfig.from_pretrained(path)
        saved = getattr(hf_config, SCFT_CONFIG_KEY, None)
        scft = config or (SCFTConfig.from_dict(saved) if saved else SCFTConfig())
        if not has_head(path) and not init_head:
            raise ValueError(f"{path} holds no SCFT head ({HEAD_PREFIX}weight not found in its weights); "
                             f"pass init_head=True to initialize a new one")
        from transformers.integrations import is_deepspeed_zero3_enabled

        transformers_loader = kwargs.pop("_transformers_loader", False)  # hf.zero3's fallback
        if is_deepspeed_zero3_enabled() and not transformers_loader and not args and not kwargs:
            # Under a live ZeRO-3 config, with no loading option of transformers': built partitioned, each rank
            # reading only its slice of the checkpoint (hf/zero3.py).
            from .zero3 import load_partitioned

            return load_partitioned(path, scft, init_head)
        setattr(hf_config, SCFT_CONFIG_KEY, asdict(scft))
        target = scft_class(MODEL_FOR_CAUSAL_LM_MAPPING[type(hf_config)])
        from transformers.utils import logging as hf_logging

        verbosity = hf_logging.get_verbosity()
        if init_head:  # the new head's "newly initialized" report is expected; other keys are checked below
            hf_logging.set_verbosity_error()
        try:
            model, info = target.from_pretrained(path, *args, config=hf_config, output_loading_info=True, **kwargs)
        finally:
            hf_logging.set_verbosity(verbosity)
        missing = [k for k in info.get("missing_keys", []) if not (init_head and k.startswith(HEAD_PREFIX))]
        if missing or info.get("unexpected_keys") or info.get("mismatched_keys"):
            raise ValueError(f"{path}: weights do not match {target.__name__} with SCFT head {scft}: missing "
                             f"{sorted(missing)[:5]}, unexpected {sorted(info.get('unexpected_keys', []))[:5]}, "
                             f"mismatched {sorted(k for k, *_ in info.get('mismatched_keys', []))[:5]}")
        return model

    def _setup_scft(self, config: SCFTConfig | None, init_head: bool) -> None:
        check_architecture(self)
        head = self.get_output_embeddings()
        weight = getattr(head, "weight", None)
        shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))  # ZeRO-3: the full shape
        if not isinstance(weight, torch.Tensor) or len(shape) != 2:
            raise ValueError(f"{type(self).__name__}.get_output_embeddings() must return a module with a (V, H) "
                             f"weight, got {head!r}")
        hidden_size = getattr(self.config.get_text_config(), "hidden_size", shape[1])
        if shape[1] != hidden_size:
            raise ValueError(
                f"{type(self).__name__}'s output layer reads {shape[1]} features, not the decoder's hidden size "
                f"{hidden_size}: a projection between the two (an embedding size other than the hidden size) that "
                f"scft_fast's fused loss, which reads the decoder's hidden states, does not apply")
        # Read once: the forward stays free of code inspection (torch.compile traces it).
        self.lm_logit_scale, self.softcap = logit_scale(self), logit_softcap(self)
        decoder_inputs = inspect.signature(self.lm_decoder().forward).parameters
        self._inputs_beyond_decoder = frozenset(inspect.signature(super().forward).parameters) - set(decoder_inputs)
        self.scft_config = config
        self.scft_loss = FusedSafetyLoss()
        if config is None:
            return
        if getattr(self, "score", None) is None:
            device = None if weight.device.type == "meta" else weight.device
            # skip_init: no kaiming draw that init_head would overwrite (and the RNG stream stays the model's).
            self.score = torch.nn.utils.skip_init(nn.Linear, shape[1], config.num_labels, bias=config.head_bias,
                                                  dtype=weight.dtype, device=device or "meta")
            if init_head:
                self.init_head()
        setattr(self.config, SCFT_CONFIG_KEY, asdict(config))

    @torch.no_grad()
    def init_head(self) -> None:
        """The head as the architecture initializes a linear layer: N(0, initializer_range), zero bias.

        Through ``torch.nn.init``, which transformers' ``no_init_weights`` disables: inside from_pretrained /
        _from_config (ZeRO-3's zero.Init route included) transformers initializes the head itself with the
        missing or new weights, in its module order, and a draw here would shift the random stream of every
        weight initialized after it (on rank 0 only, under ZeRO-3), so that runs would differ from one process."""
        std = getattr(self.config.get_text_config(), "initializer_range", 0.02)
        params = list(self.score.parameters())
        with _zero3_gathered(params, modifier_rank=0):
            if self.score.weight.device.type != "meta" and self.score.weight.numel():
                nn.init.normal_(self.score.weight, 0.0, std)
                if self.score.bias is not None:
                    nn.init.zeros_(self.score.bias)

    @torch.no_grad()
    def _check_logits_match(self) -> None:
        """Refuses a model whose own logits or loss on a probe batch are not what the fused loss computes: the
        output layer on ``lm_decoder()``'s hidden states, scaled and soft-capped as the config says, and the mean
        cross-entropy against the next token. The output layer's logits are scaled to reach +-PROBE_LOGIT
        (a power of two, exact), so that a soft cap or scale the config does not announce shows even in a
        random-initialized model, whose logits are small."""
        head = self.get_output_embeddings()
        weight = head.weight
        if weight.device.type == "meta" or weight.numel() == 0 or hasattr(weight, "ds_id"):
            return  # not materialized here (meta device, ZeRO-3 partition): nothing to probe
        name = type(self).__name__
        vocab = self.config.get_text_config().vocab_size
        probe = (torch.arange(PROBE_TOKENS, device=weight.device) * 7 + 3).remainder(vocab).unsqueeze(0)
        seen = {}

        def scale_logits(module, args, output):
            seen["input"] = args[0]
            seen["factor"] = 2.0 ** round(math.log2(PROBE_LOGIT / max(output.abs().max().item(), 1e-6)))
            return output * seen["factor"]

        with evaluating(self):
            hook = head.register_forward_hook(scale_logits)
            try:
                out = self.base_forward(input_ids=probe, labels=probe, use_cache=False)
            except Exception as error:
                raise ValueError(f"{name} cannot be checked: its own forward with labels on a text-only probe batch "
                                 f"fails ({type(error).__name__}: {error})") from error
            finally:
                hook.remove()
            hidden = self.final_hidden_states(input_ids=probe)
        if "input" not in seen:
            raise ValueError(f"{name}'s forward does not call get_output_embeddings() ({type(head).__name__}): "
                             f"its logits come from elsewhere, which scft_fast's fused loss cannot reproduce")
        if seen["input"].shape != hidden.shape:
            raise ValueError(f"{name}'s output layer reads {tuple(seen['input'].shape)} states, not the decoder's "
                             f"{tuple(hidden.shape)} hidden states; scft_fast's fused loss reads the latter")
        logits = out.logits.float()
        expected = self._logits(hidden, seen["factor"])
        rtol = PROBE_RTOL[weight.dtype]
        if not torch.allclose(logits, expected, rtol=0, atol=rtol * expected.abs().max().item()):
            diff = (logits - expected).abs().max().item()
            if not torch.allclose(seen["input"].float(), hidden.float(), rtol=1e-3, atol=1e-3 * hidden.abs().max()):
                why = "it transforms the decoder's hidden states before its output layer"
            else:
                why = (f"it applies a logit transform that no config attribute scft_fast knows names (logit scales: "
                       f"{', '.join(LOGIT_SCALES)}; soft caps: {', '.join(SOFTCAPS)})")
            raise ValueError(f"{name}'s logits are not get_output_embeddings()(final hidden state), scaled by "
                             f"{self.lm_logit_scale:g} and soft-capped by {self.softcap}: {why} (max difference "
                             f"{diff:.3g} on logits up to {expected.abs().max().item():.3g}). Training it with the "
                             f"fused loss would give a wrong loss.")
        fused = F.cross_entropy(logits[0, :-1], probe[0, 1:])
        if not torch.allclose(out.loss.float(), fused, rtol=rtol):
            unshifted = F.cross_entropy(logits[0], probe[0])
            why = ("it compares row t with labels[t], not labels[t + 1]" if torch.allclose(
                out.loss.float(), unshifted, rtol=rtol) else "it adds or leaves out terms")
            raise ValueError(f"{name}'s own loss on a probe batch is {out.loss.item():.6g}, not the mean "
                             f"cross-entropy of its logits against the next tokens ({fused.item():.6g}): {why}. "
                             f"Training it with the fused loss would give a wrong loss.")

    # -- accessors --------------------------------------------------------------------------------------------------
    def _logits(self, hidden: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
        """The model's logits as the fused loss sees them; ``factor`` scales the output layer's (the probe's)."""
        logits = self.get_output_embeddings()(hidden).float() * (factor * self.lm_logit_scale)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def lm_decoder(self) -> nn.Module:
        """The module whose ``last_hidden_state`` the output layer reads. ``get_decoder()`` gives the causal LM
        itself for Llama 4 and Mllama (their base_model_prefix names an attribute they do not have) and the output
        layer for ModernBERT-decoder; then it is the one PreTrainedModel child that does not hold the output layer."""
        head = self.get_output_embeddings()
        decoder = self.get_decoder()
        if not any(module is head for module in decoder.modules()):
            return decoder
        owner = self if decoder is head else decoder
        children = [child for child in owner.children() if isinstance(child, PreTrainedModel)
                    and not any(module is head for module in child.modules())]
        if len(children) != 1:
            raise ValueError(f"{type(self).__name__}.get_decoder() gives {type(decoder).__name__}, which holds the "
                             f"output layer, and {type(owner).__name__} has {len(children)} other transformers "
                             f"submodules ({[type(c).__name__ for c in children]}), not one decoder")
        return children[0]

    def base_forward(self, *args, **kwargs):
        """The architecture's own forward: its logits and, given labels, its own loss over them."""
        return super().forward(*args, **kwargs)

    def _register_zero3_external_parameters(self) -> None:
        """Tells ZeRO-3 that ``scft_loss``'s forward reads the LM head's and the classifier's weights (the model's
        own forward hands it the modules and reads neither weight: ZeRO-3 would register a partitioned weight read
        there on the model itself, keep it gathered through the whole forward, and, registered late, stop the next
        forward with a tracing error). Called on the first forward that sees partitioned weights, so it also holds
        under Trainer's own DeepSpeed set-up."""
        import deepspeed

        params = list(self.get_output_embeddings().parameters(recurse=False))
        if self.scft_config is not None:
            params += list(self.score.parameters())
        for param in params:
            deepspeed.zero.register_external_parameter(self.scft_loss, param)
        self._zero3_registered = True

    def final_hidden_states(self, **inputs) -> torch.Tensor:  # (B, T, H) what the output layer reads
        """``lm_decoder()``'s last hidden states. An input that the model's own forward takes and the decoder does
        not (a vision-language model's pixel_values, a MoE's output_router_logits) is refused: the decoder would
        leave it out without a word."""
        decoder = self.lm_decoder()
        dropped = sorted(name for name, value in inputs.items()
                         if value is not None and value is not False and name in self._inputs_beyond_decoder)
        if dropped:
            raise ValueError(f"{type(self).__name__}'s fused loss reads the hidden states of {type(decoder).__name__}, "
                             f"which does not take {dropped}: the model's own forward would use them (images, "
                             f"audio, a router loss), the fused loss would leave them out; scft_fast trains this "
                             f"model on batches without them")
        return decoder(**inputs, use_cache=False).last_hidden_state

    # -- forward ----------------------------------------------------------------------------------------------------
    def pooled_index(self, batch: int, length: int, attention_mask=None, position_ids=None, cu_seqlens=None,
                     cls_index=None, device=None) -> torch.Tensor:  # (S,) flat rows into the B*T hidden states
        if cls_index is not None:
            return cls_index.long()
        if cu_seqlens is None and attention_mask is None and position_ids is None:
            index = torch.arange(1, batch + 1, device=device) * length - 1
        else:
            index = last_token_index(attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens)
        return index - 1 if (self.scft_config or PLAIN_LM).pool == "pre_eos" else index

    def _packed_inputs(self, length: int, attention_mask, position_ids, cu_seqlens, max_seqlen, kwargs: dict):
        """A packed row is one block-diagonal causal attention: HF derives it from position_ids (SDPA, eager) or
        from cu_seq_lens_* (flash-attn), and only when no 2-D attention mask overrides it."""
        if cu_seqlens is None:
            cu_seqlens = kwargs.get("cu_seq_lens_q")
        if cu_seqlens is None:
            return attention_mask, position_ids, None
        if position_ids is None:
            position_ids = positions_from_cu_seqlens(cu_seqlens, length)
        if "flash" in str(self.config._attn_implementation) and "cu_seq_lens_q" not in kwargs:
            cu = cu_seqlens.to(torch.int32)
            longest = int(max_seqlen) if max_seqlen is not None else int(torch.diff(cu).max())
            kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        return None, position_ids, cu_seqlens

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T); packed: (1, L)
        attention_mask: torch.Tensor | None = None,  # (B, T), padded batches only
        position_ids: torch.Tensor | None = None,  # (B, T) or (T,); packed rows restart at 0
        past_key_values=None,
        inputs_embeds: torch.Tensor | None = None,  # (B, T, H)
        labels: torch.Tensor | None = None,  # (B, T) HF convention (unshifted)
        transition_labels: torch.Tensor | None = None,  # (B, T) like labels: the refusal token where RTO applies
        cls_labels: torch.Tensor | None = None,  # (S,) 0 safe, 1 unsafe, ignore_index: no label
        cu_seqlens: torch.Tensor | None = None,  # (S + 1,) packed sequence boundaries
        max_seqlen: int | None = None,  # longest packed sequence (flash-attn varlen)
        cls_index: torch.Tensor | None = None,  # (S,) flat pooled rows; default: from mask / positions
        num_items_in_batch: int | torch.Tensor | None = None,  # token normalizer over the accumulated batch
        num_cls_in_batch: int | torch.Tensor | None = None,  # labeled sequences over the accumulated batch
        return_token_stats: bool = False,  # out.token_accuracy, out.entropy over the LM targets (safety_loss's)
        use_cache: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> SCFTOutput | CausalLMOutputWithPast:
        """With any of labels / transition_labels / cls_labels: the fused loss, no logits. ``num_items_in_batch``
        and ``num_cls_in_batch`` make the token and classification terms sums over this micro-batch divided by
        batch-wide counts, so accumulated gradients equal the large batch's. Without labels: exactly the model's
        own forward; given ``cls_index`` too, its output with ``cls_logits`` at those rows."""
        reference = input_ids if input_ids is not None else inputs_embeds
        batch, length = reference.shape[:2]
        attention_mask, position_ids, cu_seqlens = self._packed_inputs(length, attention_mask, position_ids,
                                                                       cu_seqlens, max_seqlen, kwargs)
        if labels is None and transition_labels is None and cls_labels is None:
            if cu_seqlens is not None:
                use_cache = False  # HF derives a packed row's block-diagonal mask only without a cache
            if cls_index is not None and self.scft_config is not None:
                kwargs["output_hidden_states"] = True
            out = self.base_forward(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    past_key_values=past_key_values, inputs_embeds=inputs_embeds,
                                    use_cache=use_cache, logits_to_keep=logits_to_keep, **kwargs)
            if cls_index is None or self.scft_config is None:
                return out
            # Asked for pooled rows: the model's output plus the head's logits there (held-out evaluation, which
            # must go through the (DeepSpeed) module's forward).
            hidden = out.hidden_states[-1]
            return SCFTOutput(**out, cls_logits=self.score(hidden.reshape(-1, hidden.shape[-1])[cls_index]).float())
        options = self.scft_config or PLAIN_LM
        self._check_loss_inputs(transition_labels, cls_labels, num_items_in_batch, num_cls_in_batch, options, kwargs)
        if not self.__dict__.get("_first_batch_checked") and not torch.compiler.is_compiling():
            # The first batch from any collator (ours, TRL's, a user's): one host sync, once per model.
            check_batch({"input_ids": reference, "attention_mask": attention_mask, "position_ids": position_ids,
                         "labels": labels, "transition_labels": transition_labels, "cls_labels": cls_labels,
                         "cls_index": cls_index, "cu_seqlens": cu_seqlens}, options.ignore_index)
            self.__dict__["_first_batch_checked"] = True
        if self.training and not self.__dict__.get("_head_labels_checked") and not torch.compiler.is_compiling():
            self.__dict__["_head_labels_checked"] = True  # the first training batch (evaluation may come first)
            if self.scft_config is not None and cls_labels is None:
                warnings.warn(
                    "the model has an SCFT head (score) but its first training batch carries no cls_labels: the "
                    "head does not train, and generate_safe and scft-fast eval would read an untrained head. Train "
                    "with SCFTDataCollator (SCFTTrainer, SCFTSFTTrainer), or patch with apply_scft_fast(model) "
                    "without an SCFTConfig for plain instruction tuning", NoHeadLabelWarning, stacklevel=2)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        hidden = self.final_hidden_states(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, inputs_embeds=inputs_embeds, **kwargs)
        ignore = options.ignore_index
        if labels is None:
            labels = torch.full((batch, length), ignore, dtype=torch.long, device=hidden.device)
        lm_head = self.get_output_embeddings()
        if hasattr(next(lm_head.parameters()), "ds_id") and not getattr(self, "_zero3_registered", False):
            self._register_zero3_external_parameters()
        pooled = {}
        if cls_labels is not None:  # without labels the head is skipped: plain (fused) instruction tuning
            pooled = dict(cls_labels=cls_labels, cls_index=self.pooled_index(
                batch, length, attention_mask, position_ids, cu_seqlens, cls_index, device=hidden.device))
        out = self.scft_loss(
            hidden.reshape(batch * length, -1), lm_head, self.score if pooled else None,
            shift_labels(labels, position_ids, ignore).reshape(-1),
            None if transition_labels is None else shift_labels(transition_labels, position_ids, ignore).reshape(-1),
            pooled, num_items_in_batch, num_cls_in_batch, self.softcap, self.lm_logit_scale, options,
            return_token_stats)
        return SCFTOutput(**out)

    def _check_loss_inputs(self, transition_labels, cls_labels, num_items_in_batch, num_cls_in_batch,
                           options: SCFTConfig, kwargs: dict) -> None:
        """The combinations that would train something other than what is logged, refused before any work (attribute
        reads only: no host sync)."""
        safety_targets = transition_labels is not None or cls_labels is not None
        if kwargs.get("shift_labels") is not None:
            raise ValueError("shift_labels (labels already shifted, from a padding-free collator or sequence "
                             "parallelism) are not read by scft_fast's fused loss, which shifts labels itself: pass "
                             "the unshifted labels (HF convention) instead")
        if self.scft_config is None and safety_targets:
            raise ValueError("transition_labels / cls_labels need an SCFT head: apply_scft_fast(model, SCFTConfig())")
        if safety_targets and num_items_in_batch is not None and num_cls_in_batch is None:
            raise ValueError(
                "num_items_in_batch came without num_cls_in_batch beside transition_labels / cls_labels: a trainer "
                "that counts only LM labels (transformers.Trainer's num_items_in_batch does) would divide the RTO "
                "and head terms by the wrong count. Train with scft_fast.SCFTTrainer (or put SCFTTrainerMixin in "
                "front of your Trainer subclass; SCFTSFTTrainer for TRL), which counts LM + RTO targets and "
                "labeled sequences; a loop of your own passes both, counted as "
                "scft_fast.hf.accounting.step_targets counts them")
        if cls_labels is None or options.cls_coef == 0 or not (self.training and torch.is_grad_enabled()):
            return
        if _lora_wrapped(self.score):
            raise ValueError(
                f"PEFT put adapter layers on the SCFT head ({HEAD_NAME!r}; target_modules='all-linear' matches it): "
                f"the fused loss reads the head's weight, so that low-rank update would never train while the head "
                f"loss is logged. Call apply_scft_fast(peft_model) after get_peft_model (SCFTTrainer and "
                f"SCFTSFTTrainer do it), which gives the head its plain layer back and trains it fully, or leave it "
                f"out of LoRA with LoraConfig(exclude_modules=[{HEAD_NAME!r}], modules_to_save=[{HEAD_NAME!r}])")
        if not any(p.requires_grad for p in self.score.parameters()):  # a PEFT copy: one of the two trains
            raise ValueError(
                f"the SCFT head ({HEAD_NAME!r}) is frozen (requires_grad=False), yet cls_labels give it a loss that "
                f"would be logged every step while the head never moves. Under PEFT, call apply_scft_fast(peft_model) "
                f"after get_peft_model (SCFTTrainer and SCFTSFTTrainer do it) or add {HEAD_NAME!r} to the "
                f"LoraConfig's modules_to_save; to keep the head fixed on purpose, set SCFTConfig(cls_coef=0.0) or "
                f"pass no cls_labels")

    @torch.no_grad()
    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                 cls_index: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:  # (S, C) class probabilities of each (instruction, response)
        batch, length = input_ids.shape[:2]
        attention_mask, position_ids, cu_seqlens = self._packed_inputs(length, attention_mask, position_ids,
                                                                       cu_seqlens, None, kwargs)
        if attention_mask is not None and position_ids is None:  # left padding: positions count real tokens
            position_ids = positions_from_mask(attention_mask)
        hidden = self.final_hidden_states(input_ids=input_ids, attention_mask=attention_mask,
                                          position_ids=position_ids, **kwargs)
        index = self.pooled_index(batch, length, attention_mask, None if attention_mask is not None
                                  else position_ids, cu_seqlens, cls_index, device=hidden.device)
        return self.score(hidden.reshape(batch * length, -1)[index]).float().softmax(-1)


def __getattr__(name: str):
    """Patched classes carry this module's name (``scft_class``), so PEFT records it as the "parent_library" of an
    adapter trained on one and ``AutoPeftModel*.from_pretrained`` (given ``import_allowlist``) or pickle look the
    class up here. Neither can rebuild the head: say what loads it."""
    import transformers

    if isinstance(getattr(transformers, name, None), type) and issubclass(getattr(transformers, name), PreTrainedModel):
        raise AttributeError(f"{__name__}.{name} is a {name} patched by scft_fast, which cannot be rebuilt from its "
                             f"name: {ADAPTER_LOADER_HINT}; a full SCFT checkpoint loads with "
                             f"SCFTForCausalLM.from_pretrained(path) too")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
