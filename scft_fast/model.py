"""SCFT for any Hugging Face causal LM, and the model stays that model.

``apply_scft_fast(model, config)`` patches a causal LM in place, as Liger-Kernel and Cut Cross-Entropy do: the
instance's class becomes a subclass of ``SCFTForCausalLM`` and of its own class, under the same name, so it
is still a ``LlamaForCausalLM`` (``Qwen2ForCausalLM``, ...) and a ``PreTrainedModel``. Saving and loading, Trainer
checkpoints (tied embeddings included), gradient checkpointing, PEFT, TRL's hooks and ``generate()`` are the
libraries' own code. Only ``forward`` changes. With labels, the decoder's final hidden states go straight into
``safety_loss`` (LM + RTO + the ``score`` head), and the N x V logits are never built. Without labels it is the
model's own forward. Every architecture is served through transformers' accessors: ``get_decoder()``,
``get_output_embeddings()`` and ``config.final_logit_softcapping``.

ZeRO-3: the fused loss runs inside ``scft_loss``, a submodule with no parameters of its own. The LM head's and
the classifier's weights are registered as its external parameters, so DeepSpeed gathers them for its forward
and again for its backward. A partitioned weight is never read anywhere else.
"""
from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, PreTrainedModel
from transformers.modeling_outputs import CausalLMOutputWithPast

from .constants import IGNORE_INDEX, POOLS
from .data.collate import positions_from_mask
from .ops import last_token_index, safety_loss
from .ops.cls_head import MAX_CLASSES, MIN_CLASSES

HEAD_NAME = "score"  # the SCFT head's module name
HEAD_PREFIX = HEAD_NAME + "."
# What every error about an adapter loaded without its head tells the user to do instead.
ADAPTER_LOADER_HINT = ("load SCFT adapters with scft_fast.SCFTForCausalLM.from_pretrained(adapter_dir), which "
                       "builds the base with a head and loads the adapter's trained head into it "
                       "(AutoPeftModelForCausalLM and AutoModelForCausalLM build the base without one)")
SCFT_CONFIG_KEY = "scft"  # the SCFT settings live under this key of the causal LM's config.json

# Config attributes that change the logits in ways the fused loss does not reproduce, with the value that
# leaves the logits alone. A model that sets one to any other value is refused when it is wrapped.
LOGIT_TRANSFORMS = {
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1
    "output_multiplier_scale": 1.0,
    "mup_width_multiplier": 1.0,  # Phi-3-small: logits / mup_width_multiplier
    "logit_multiplier": 1.0,
    "scale_width": 1.0,  # MiniCPM: logits / (hidden_size / dim_model_base)
}


@dataclass
class SCFTConfig:
    num_labels: int = 2  # classes of the safety head (0 = safe, 1 = unsafe)
    # The RTO transition target ("Sorry"), recorded in config.json: the data makes the transition labels, the
    # model's loss never reads it; SCFTSFTTrainer refuses a data config whose refusal string gives another token.
    refusal_token_id: int | None = None
    pool: str = "eos"  # "eos": the last token | "pre_eos": the one before (free inference-time check)
    lm_coef: float = 1.0
    transition_coef: float = 1.0
    cls_coef: float = 1.0
    backend: str = "auto"  # safety_loss backend, one of scft_fast.ops.backends.BACKENDS
    chunk_size: int | None = None  # safety_loss rows per chunk; None: chosen from the shapes
    ignore_index: int = IGNORE_INDEX
    # False by default: Hugging Face's sequence-classification heads have no bias, so a bias-free head exports
    # to AutoModelForSequenceClassification exactly (export_sequence_classifier).
    head_bias: bool = False
    threshold: float | None = None  # calibrated p_unsafe threshold for gating; None: the caller's default

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if not MIN_CLASSES <= self.num_labels <= MAX_CLASSES:
            raise ValueError(f"num_labels must be in [{MIN_CLASSES}, {MAX_CLASSES}] (the fused head's range), got "
                             f"{self.num_labels}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1), got {self.threshold}")

    @classmethod
    def from_dict(cls, d: dict) -> "SCFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SCFT config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


# The loss settings of a model patched without an SCFTConfig (a plain fused LM loss).
PLAIN_LM = SCFTConfig()


@dataclass
class SCFTOutput(CausalLMOutputWithPast):
    """The causal LM's output with the fused loss's terms. ``loss`` is float32 and differentiable; the rest is
    detached, for logging. ``logits`` is None whenever a loss was computed."""

    lm_loss: torch.Tensor | None = None  # () mean over LM targets
    transition_loss: torch.Tensor | None = None  # () mean over RTO targets
    cls_loss: torch.Tensor | None = None  # () mean over labeled sequences
    cls_logits: torch.Tensor | None = None  # (S, C) float32, one row per pooled sequence
    n_lm: torch.Tensor | None = None
    n_tr: torch.Tensor | None = None
    n_cls: torch.Tensor | None = None


def unwrap(model: nn.Module) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def check_logit_transforms(config) -> None:
    """Refuses configs whose logits are more than ``lm_head(hidden)`` (+ Gemma's soft-capping)."""
    for name, neutral in LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and float(value) != neutral:
            raise ValueError(
                f"{type(config).__name__} sets {name} = {value}, a logit transform the fused loss does not apply "
                f"(it computes lm_head(hidden), soft-capped by final_logit_softcapping); expected {name} absent "
                f"or {neutral}. Training this model with scft_fast would give a wrong loss.")


def shift_labels(labels: torch.Tensor,  # (B, T) HF convention: labels[t] is token t
                 position_ids: torch.Tensor | None,  # (B, T) or (T,) packed rows, restarting at 0
                 ignore_index: int) -> torch.Tensor:  # (B, T): row t's target, token t + 1
    shifted = F.pad(labels[:, 1:], (0, 1), value=ignore_index)
    if position_ids is not None:
        # The last row of each packed sequence must not predict the next sequence's first token.
        pos = position_ids.expand_as(labels)
        shifted = shifted.masked_fill(F.pad(pos[:, 1:] == 0, (0, 1), value=False), ignore_index)
    return shifted


def positions_from_cu_seqlens(cu_seqlens: torch.Tensor,  # (S + 1,)
                              length: int) -> torch.Tensor:  # (1, length)
    starts = torch.zeros(length, dtype=torch.long, device=cu_seqlens.device)
    starts[cu_seqlens[1:-1].long()] = torch.diff(cu_seqlens.long())[:-1]
    return (torch.arange(length, device=cu_seqlens.device) - starts.cumsum(0)).unsqueeze(0)


def _zero3_gathered(params: list[nn.Parameter], modifier_rank: int | None = 0):
    """DeepSpeed's gather of ZeRO-3 partitioned parameters, or nothing for ordinary ones."""
    if not any(hasattr(p, "ds_id") for p in params):
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


class FusedSafetyLoss(nn.Module):
    """``safety_loss`` over the final hidden states, as a module with no parameters of its own. It is a module
    so that ZeRO-3 gathers the weights it reads (registered as its external parameters) around its forward and
    backward."""

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H) final hidden states
        lm_weight: torch.Tensor,  # (V, H) the LM head
        lm_bias: torch.Tensor | None,  # (V,)
        labels: torch.Tensor,  # (N,) already shifted
        transition_labels: torch.Tensor | None,  # (N,) already shifted
        head: dict,  # cls_weight (C, H), cls_bias (C,), cls_index (S,), cls_labels (S,); empty: no head term
        num_items: torch.Tensor | int | None,
        num_cls: torch.Tensor | int | None,
        softcap: float | None,
        options: SCFTConfig,  # coefficients, backend, chunk size, ignore_index
    ) -> dict:
        # Under autocast the op runs in the autocast dtype (safety_loss casts its inputs).
        out = safety_loss(
            hidden, lm_weight, labels, lm_bias=lm_bias, transition_labels=transition_labels, **head,
            lm_coef=options.lm_coef, transition_coef=options.transition_coef, cls_coef=options.cls_coef,
            num_items=num_items, num_cls=num_cls, ignore_index=options.ignore_index, softcap=softcap,
            backend=options.backend, chunk_size=options.chunk_size)
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


def train_head_with_adapter(peft_model: nn.Module) -> None:
    """Makes the SCFT head of a PEFT model train fully and ride in its adapter checkpoints: ``score`` joins every
    active adapter's ``modules_to_save``. A head that PEFT gave LoRA layers of its own ("all-linear" matches it)
    gets its plain layer back first: the fused op reads the head's weight, never a low-rank delta, so LoRA there
    would log a head loss for weights that never move. Idempotent; a no-op on a model without a head."""
    base = unwrap(peft_model)
    if base is peft_model or getattr(base, "scft_config", None) is None:
        return
    from peft.utils.other import set_additional_trainable_modules

    if _lora_wrapped(base.score):
        base.score = base.score.get_base_layer()
        names = getattr(peft_model.base_model, "targeted_module_names", None)
        if names is not None:
            names[:] = [n for n in names if n.rpartition(".")[2] != HEAD_NAME]
    for adapter in peft_model.active_adapters:
        peft_config = peft_model.peft_config[adapter]
        targets = peft_config.target_modules
        if isinstance(targets, (set, list)) and HEAD_NAME in targets:
            peft_config.target_modules = type(targets)(t for t in targets if t != HEAD_NAME)
        modules = list(getattr(peft_config, "modules_to_save", None) or [])
        if HEAD_NAME not in modules:
            peft_config.modules_to_save = modules + [HEAD_NAME]
        set_additional_trainable_modules(peft_model, peft_config, base.config, adapter)


def is_trl_fused_lm_head(forward) -> bool:
    """Whether ``forward`` is the one trl's ``add_fused_lm_head`` puts on a model (trl 1.16,
    trl/trainer/utils.py): SFTTrainer's own loss, which never calls the model's forward."""
    code = getattr(getattr(forward, "__func__", forward), "__code__", None)  # functools.wraps hides its names
    return (code is not None and code.co_name == "_fused_forward"
            and code.co_filename.replace(os.sep, "/").endswith("trl/trainer/utils.py"))


@contextlib.contextmanager
def fused_lm_head_allowed(model: nn.Module):
    """Inside it, trl may patch its fused LM head onto ``model`` (SCFTSFTTrainer, whose loss is the model's own
    forward, lets SFTTrainer's constructor do so)."""
    model.__dict__["_fused_lm_head_allowed"] = True
    try:
        yield
    finally:
        model.__dict__.pop("_fused_lm_head_allowed", None)


def _lora_wrapped(module: nn.Module) -> bool:
    """Whether PEFT injected adapter layers (LoRA and its kin) into ``module``: they keep the original layer as
    ``base_layer``; PEFT's modules_to_save copy (``original_module`` + ``modules_to_save``) does not."""
    return getattr(module, "base_layer", None) is not None


def _refuse_dropped_head(peft_model: nn.Module, base: nn.Module) -> None:
    """An adapter trained with an SCFT head lists it among ``modules_to_save``; a loader that built the base
    without a head (``AutoPeftModelForCausalLM``, ``PeftModel.from_pretrained`` on an unpatched base) dropped the
    trained head without a word. Adding a new, untrained head on top would hide that."""
    if getattr(base, "scft_config", None) is not None:
        return
    for name, peft_config in getattr(peft_model, "peft_config", {}).items():
        if HEAD_NAME in (getattr(peft_config, "modules_to_save", None) or ()):
            raise ValueError(f"adapter {name!r} was trained with an SCFT head ({HEAD_NAME!r} is among its "
                             f"modules_to_save), but the base model it was loaded onto has none, so its loader "
                             f"dropped the trained head: {ADAPTER_LOADER_HINT}")


def scft_base(model: nn.Module, what: str) -> PreTrainedModel:
    """The SCFT model with a head under ``model`` (PEFT-wrapped or not), or a ValueError saying why there is none
    and how to load one; ``what`` names the caller."""
    base = unwrap(model)
    if base is not model:
        _refuse_dropped_head(model, base)
    if getattr(base, "scft_config", None) is None:
        why = ("was patched without an SCFTConfig" if isinstance(base, SCFTForCausalLM)
               else "is a plain transformers model (AutoModelForCausalLM drops the score.* weights)")
        raise ValueError(f"{what} needs a model with an SCFT head, but {type(base).__name__} {why}: load a saved SCFT "
                         f"model with scft_fast.SCFTForCausalLM.from_pretrained(path) (an adapter directory "
                         f"included), or add a head with apply_scft_fast(model, SCFTConfig())")
    return base


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
        if (name == "forward" and getattr(self, "scft_config", None) is not None
                and not getattr(self, "_fused_lm_head_allowed", False) and is_trl_fused_lm_head(value)):
            raise ValueError(
                "trl.SFTTrainer computes its loss with a fused LM head of its own, patched over the model's forward: "
                "it knows no RTO target and no SCFT head, so the head would never train and RTO rows would be "
                "trained as LM targets. Train an SCFT model with scft_fast.SCFTSFTTrainer (SFTTrainer's "
                "constructor), or patch with apply_scft_fast(model) (no SCFTConfig) for plain SFT")
        super().__setattr__(name, value)

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
            from .hf.zero3 import load_partitioned

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
        check_logit_transforms(self.config.get_text_config())
        head = self.get_output_embeddings()
        weight = getattr(head, "weight", None)
        shape = tuple(getattr(weight, "ds_shape", getattr(weight, "shape", ())))  # ZeRO-3: the full shape
        if not isinstance(weight, torch.Tensor) or len(shape) != 2:
            raise ValueError(f"{type(self).__name__}.get_output_embeddings() must return a module with a (V, H) "
                             f"weight, got {head!r}")
        self.scft_config = config
        self.scft_loss = FusedSafetyLoss()
        if config is None:
            return
        if getattr(self, "score", None) is None:
            hidden_size = self.config.get_text_config().hidden_size
            device = None if weight.device.type == "meta" else weight.device
            # skip_init: no kaiming draw that init_head would overwrite (and the RNG stream stays the model's).
            self.score = torch.nn.utils.skip_init(nn.Linear, hidden_size, config.num_labels, bias=config.head_bias,
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
        weight = self.get_output_embeddings().weight
        if weight.device.type == "meta" or weight.numel() == 0 or hasattr(weight, "ds_id"):
            return  # not materialized here (meta device, ZeRO-3 partition): nothing to probe
        vocab = self.config.get_text_config().vocab_size
        probe = torch.arange(4, device=weight.device).remainder(vocab).unsqueeze(0)
        was_training = self.training
        self.eval()
        try:
            out = self.base_forward(input_ids=probe, output_hidden_states=True, use_cache=False)
        finally:
            self.train(was_training)
        expected = self._logits(out.hidden_states[-1]).float()
        if not torch.allclose(out.logits.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()):
            diff = (out.logits.float() - expected).abs().max().item()
            raise ValueError(
                f"{type(self).__name__}'s logits are not get_output_embeddings()(final hidden state) (soft-capped "
                f"by final_logit_softcapping): max difference {diff:.3g}. It applies a logit transform scft_fast "
                f"does not know; training it with the fused loss would give a wrong loss.")

    # -- accessors --------------------------------------------------------------------------------------------------
    @property
    def softcap(self) -> float | None:
        return getattr(self.config.get_text_config(), "final_logit_softcapping", None)

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.get_output_embeddings()(hidden)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def base_forward(self, *args, **kwargs):
        """The architecture's own forward: its logits and, given labels, its own loss over them."""
        return super().forward(*args, **kwargs)

    def _register_zero3_external_parameters(self) -> None:
        """Tells ZeRO-3 that ``scft_loss``'s forward reads the LM head's and the classifier's weights, and this
        model's forward, which hands them over, too. Called on the first forward that sees partitioned weights, so
        it also holds under Trainer's own DeepSpeed set-up.

        Registered on this model as well: ZeRO-3's parameter getter registers a weight on the running module
        whenever a forward reads it while partitioned, so this model (whose forward reads both to hand them over)
        would otherwise gain them one at a time, possibly after DeepSpeed has recorded its trace of the fetches; the
        next forward then stops with "tracing error" (measured: a ZeRO-3 run resumed from a checkpoint, at its
        held-out evaluation; tests/test_deepspeed.py)."""
        import deepspeed

        params = list(self.get_output_embeddings().parameters(recurse=False))
        if self.scft_config is not None:
            params += list(self.score.parameters())
        for param in params:
            deepspeed.zero.register_external_parameter(self.scft_loss, param)
            deepspeed.zero.register_external_parameter(self, param)
        self._zero3_registered = True

    # -- forward ----------------------------------------------------------------------------------------------------
    def pooled_index(self, batch: int, length: int, attention_mask=None, position_ids=None, cu_seqlens=None,
                     cls_index=None) -> torch.Tensor:  # (S,) flat rows into the B*T hidden states
        if cls_index is not None:
            return cls_index.long()
        device = self.get_output_embeddings().weight.device
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
        self._check_loss_inputs(transition_labels, cls_labels, num_items_in_batch, num_cls_in_batch, options)
        kwargs.pop("output_hidden_states", None)
        kwargs.pop("return_dict", None)
        hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    inputs_embeds=inputs_embeds, use_cache=False, **kwargs).last_hidden_state
        ignore = options.ignore_index
        if labels is None:
            labels = torch.full((batch, length), ignore, dtype=torch.long, device=hidden.device)
        lm_head = self.get_output_embeddings()
        if hasattr(lm_head.weight, "ds_id") and not getattr(self, "_zero3_registered", False):
            self._register_zero3_external_parameters()
        head = {}
        if cls_labels is not None:  # without labels the head is skipped: plain (fused) instruction tuning
            head = dict(cls_weight=self.score.weight, cls_bias=self.score.bias, cls_labels=cls_labels,
                        cls_index=self.pooled_index(batch, length, attention_mask, position_ids, cu_seqlens,
                                                    cls_index))
        out = self.scft_loss(
            hidden.reshape(batch * length, -1), lm_head.weight, getattr(lm_head, "bias", None),
            shift_labels(labels, position_ids, ignore).reshape(-1),
            None if transition_labels is None else shift_labels(transition_labels, position_ids, ignore).reshape(-1),
            head, num_items_in_batch, num_cls_in_batch, self.softcap, options)
        return SCFTOutput(**out)

    def _check_loss_inputs(self, transition_labels, cls_labels, num_items_in_batch, num_cls_in_batch,
                           options: SCFTConfig) -> None:
        """The combinations that would train something other than what is logged, refused before any work (attribute
        reads only: no host sync)."""
        safety_targets = transition_labels is not None or cls_labels is not None
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
        if not self.score.weight.requires_grad:
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
        hidden = self.get_decoder()(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                                    use_cache=False, **kwargs).last_hidden_state
        index = self.pooled_index(batch, length, attention_mask, None if attention_mask is not None
                                  else position_ids, cu_seqlens, cls_index)
        return self.score(hidden.reshape(batch * length, -1)[index]).float().softmax(-1)


ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_SCFT_CONFIG = "scft_config.json"  # the SCFT settings beside an adapter (PEFT's files have no place for them)


def write_adapter_scft_config(model: nn.Module, path: str) -> None:
    """Writes the SCFT settings of a PEFT model's head beside its adapter files in ``path``, where
    ``SCFTForCausalLM.from_pretrained(path)`` reads them back (pool, threshold, coefficients)."""
    scft = getattr(unwrap(model), "scft_config", None)
    if scft is not None:
        with open(os.path.join(path, ADAPTER_SCFT_CONFIG), "w") as f:
            json.dump(asdict(scft), f, indent=2, sort_keys=True)


def _load_adapter(path: str, *args, config: SCFTConfig | None = None, base_model: str | None = None,
                  is_trainable: bool = False, **kwargs) -> nn.Module:
    """``SCFTForCausalLM.from_pretrained`` of a PEFT adapter directory (see there)."""
    from peft import PeftConfig, PeftModel

    peft_config = PeftConfig.from_pretrained(path)
    base_path = base_model or peft_config.base_model_name_or_path
    if not base_path or not os.path.isfile(os.path.join(base_path, "config.json")):
        raise ValueError(f"{os.path.join(path, ADAPTER_CONFIG)}: its base model {base_path!r} is not a local model "
                         f"directory; pass base_model=PATH (the directory the adapter was trained on)")
    head = _read_head(path, prefix=ADAPTER_HEAD_PREFIX)
    if head is None:
        raise ValueError(f"{path}: the adapter holds no SCFT head ({ADAPTER_HEAD_PREFIX}weight): it was trained "
                         f"without one; load it with peft.PeftModel.from_pretrained(base, {path!r})")
    if config is None and os.path.isfile(os.path.join(path, ADAPTER_SCFT_CONFIG)):
        with open(os.path.join(path, ADAPTER_SCFT_CONFIG)) as f:
            config = SCFTConfig.from_dict(json.load(f))
    if config is None:
        saved = getattr(AutoConfig.from_pretrained(base_path), SCFT_CONFIG_KEY, None)
        config = SCFTConfig.from_dict(saved) if saved else SCFTConfig()
    config = replace(config, num_labels=head["weight"].shape[0], head_bias="bias" in head)
    base = SCFTForCausalLM.from_pretrained(base_path, *args, init_head=True, config=config, **kwargs)
    model = PeftModel.from_pretrained(base, path, is_trainable=is_trainable)
    score = unwrap(model).score
    if any(not torch.equal(getattr(score, k).detach().cpu(), v.to(getattr(score, k).dtype)) for k, v in head.items()):
        raise ValueError(f"{path}: the adapter's SCFT head did not load into the model (PEFT's modules_to_save "
                         f"{peft_config.modules_to_save!r} do not name {HEAD_NAME!r})")
    return model


def merged_state_dict(model: nn.Module, submodule: str = "") -> dict[str, torch.Tensor]:
    """The causal LM's state dict under its own key names, LoRA deltas merged in and PEFT's copy of the head
    unwrapped, without touching the model. ``submodule`` (a module name of the causal LM, e.g. "model.layers.3"):
    only that module's entries, under their full names (a ZeRO-3 export gathers one module at a time)."""
    base = unwrap(model)
    root = base.get_submodule(submodule)
    state = root.state_dict(prefix=f"{submodule}." if submodule else "")
    if base is model:
        return state
    from peft.tuners.lora import LoraLayer
    from peft.utils.other import ModulesToSaveWrapper

    state = {k: v for k, v in state.items() if ".lora_" not in k}
    for name, module in root.named_modules(prefix=submodule):
        if isinstance(module, LoraLayer):
            merged = state.pop(f"{name}.base_layer.weight").clone()
            for adapter in module.active_adapters:
                merged += module.get_delta_weight(adapter).to(merged.dtype)
            state[f"{name}.weight"] = merged
        elif isinstance(module, ModulesToSaveWrapper):
            trained = f"{name}.modules_to_save.{module.active_adapters[0]}."
            for key in [k for k in state if k.startswith(f"{name}.")]:
                tensor = state.pop(key)
                if key.startswith(trained):
                    state[f"{name}." + key[len(trained):]] = tensor
    return {k.replace(".base_layer.", "."): v for k, v in state.items()}


def save_merged(model: nn.Module, path: str, state_dict: dict[str, torch.Tensor] | None = None,
                **save_kwargs) -> None:
    """A full checkpoint that ``SCFTForCausalLM.from_pretrained`` and ``AutoModelForCausalLM.from_pretrained``
    load: the causal LM with LoRA merged, ``score.*`` beside its weights, the SCFT settings under config.json's
    "scft" key. ``state_dict`` (e.g. gathered from ZeRO-3 shards) overrides the model's own tensors and holds the
    keys of ``merged_state_dict(model)``. Without PEFT this is ``model.save_pretrained``."""
    base = unwrap(model)
    state = state_dict if state_dict is not None else (None if base is model else merged_state_dict(model))
    if state is not None and getattr(base, "scft_config", None) is not None and HEAD_PREFIX + "weight" not in state:
        raise ValueError(f"state_dict must hold the head ({HEAD_PREFIX}weight); got keys like {list(state)[:3]}")
    base.save_pretrained(path, state_dict=state, **save_kwargs)


def export_sequence_classifier(model: nn.Module, path: str, tokenizer=None, pad_token_id: int | None = None,
                               **save_kwargs) -> None:
    """Writes the SCFT head as a checkpoint that ``AutoModelForSequenceClassification.from_pretrained`` loads and
    that gives the head's class probabilities.

    transformers' sequence-classification models apply a bias-free ``score`` to the rightmost token that is not
    ``pad_token_id``. The head's token is the EOS (pool="eos"), so the export needs a pad token other than EOS
    (``pad_token_id``, else the tokenizer's, else the model's): inputs must end with EOS and be padded with that
    pad token.
    For pool="pre_eos" the export pads with EOS itself, so that the rightmost non-pad token is the one before the
    EOS. A head trained with a bias cannot be written into that bias-free layer: train with
    ``SCFTConfig(head_bias=False)`` (the default) or the export is refused."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    base = unwrap(model)
    scft = getattr(base, "scft_config", None)
    if scft is None:
        raise ValueError("the model has no SCFT head to export (apply_scft_fast(model, SCFTConfig()) adds one)")
    state = merged_state_dict(model)
    bias = state.pop(HEAD_PREFIX + "bias", None)
    if bias is not None and bool(bias.detach().float().abs().max() > 0):
        raise ValueError("the SCFT head has a non-zero bias, which AutoModelForSequenceClassification's bias-free "
                         "score layer cannot hold; train with SCFTConfig(head_bias=False) to export the head")
    text_config = base.config.get_text_config()
    eos = text_config.eos_token_id
    eos = eos[0] if isinstance(eos, (list, tuple)) else eos
    if scft.pool == "pre_eos":
        pad = eos
    else:
        candidates = [pad_token_id, getattr(tokenizer, "pad_token_id", None), text_config.pad_token_id]
        pad = next((c for c in candidates if c is not None and c != eos), None)
        if pad is None:
            raise ValueError("pool='eos' reads the EOS token, which AutoModelForSequenceClassification skips when "
                             "it is also the pad token: pass pad_token_id= (a token other than EOS) or a tokenizer "
                             "whose pad token is not EOS")
    config = base.config.__class__.from_dict(base.config.to_dict())
    config.num_labels = scft.num_labels
    config.id2label = {i: name for i, name in enumerate(["safe", "unsafe"][:scft.num_labels])} \
        if scft.num_labels == 2 else {i: f"LABEL_{i}" for i in range(scft.num_labels)}
    config.label2id = {v: k for k, v in config.id2label.items()}
    config.pad_token_id = pad
    if hasattr(config, SCFT_CONFIG_KEY):
        delattr(config, SCFT_CONFIG_KEY)
    classifier_class = MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    classifier = classifier_class(config)
    prefix = classifier.base_model_prefix
    # The causal LM's decoder keys (model.*) are the classifier's; the LM head is not part of it.
    lm_head_keys = {n for n, _ in base.named_parameters() if n.startswith("lm_head.")}
    weights = {k: v for k, v in state.items() if k.startswith(prefix + ".") or k == HEAD_PREFIX + "weight"}
    expected = set(classifier.state_dict())
    if set(weights) != expected:
        raise ValueError(f"cannot map {type(base).__name__}'s weights onto {classifier_class.__name__}: missing "
                         f"{sorted(expected - set(weights))[:5]}, extra "
                         f"{sorted(set(weights) - expected - lm_head_keys)[:5]}")
    classifier.load_state_dict(weights)
    classifier.save_pretrained(path, **save_kwargs)
    if tokenizer is not None:
        tokenizer = _copy_with_pad(tokenizer, pad)
        tokenizer.save_pretrained(path)


def _copy_with_pad(tokenizer, pad: int):
    import copy

    tokenizer = copy.deepcopy(tokenizer)
    tokenizer.pad_token = tokenizer.convert_ids_to_tokens(pad)
    return tokenizer


def has_head(path: str) -> bool:
    """Whether the checkpoint directory's weights hold ``score.weight`` (a config key alone makes no head)."""
    return _read_head(path) is not None


# How PEFT names the head (a modules_to_save copy) in adapter_model.safetensors.
ADAPTER_HEAD_PREFIX = "base_model.model." + HEAD_PREFIX


def _read_head(path: str, prefix: str = HEAD_PREFIX) -> dict[str, torch.Tensor] | None:
    """The head's tensors (names under ``prefix``, which is dropped) of a checkpoint directory: single file or
    sharded safetensors, a .bin, or PEFT's adapter_model.safetensors."""
    from safetensors import safe_open

    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith(prefix)})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(os.path.join(path, "adapter_model.safetensors")):
        files = ["adapter_model.safetensors"]
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        return head or None
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json, "
                                f"adapter_model.safetensors or pytorch_model.bin")
    head = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    head[key[len(prefix):]] = f.get_tensor(key)
    return head or None


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
