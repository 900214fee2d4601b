"""SCFTForCausalLM: any Hugging Face causal LM plus SCFT's classification head, trained through the fused loss.

One generic wrapper serves every architecture through transformers' own accessors: ``get_decoder()`` gives
the final (normed) hidden states, ``get_output_embeddings()`` the LM head, ``config.final_logit_softcapping``
Gemma 2's soft-capping. With labels the N x V logits are never built: the decoder's hidden states go straight
into ``safety_loss``. Without labels the wrapped model runs unchanged and its logits are returned.

ZeRO-3: the fused op runs inside ``SafetyHead.forward``. The head owns the classifier (``score.weight`` /
``score.bias``) and registers the LM head weight as an external parameter, so DeepSpeed gathers all of them
for the forward and again for the backward; a partitioned weight is never read outside a forward.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedModel
from transformers.utils import ModelOutput

from .ops import IGNORE_INDEX, last_token_index, safety_loss

POOLS = ("eos", "pre_eos")
HEAD_PREFIX = "score."
SCFT_CONFIG_KEY = "scft"  # the SCFT settings live under this key of the causal LM's config.json

# Config attributes that change the logits in ways the fused loss does not reproduce, with the value that
# leaves the logits alone. A model carrying one with another value is refused at wrap time.
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
    refusal_token_id: int | None = None  # RTO transition target ("Sorry"); informational for the model
    pool: str = "eos"  # "eos": the last token | "pre_eos": the one before (free inference-time check)
    lm_coef: float = 1.0
    transition_coef: float = 1.0
    cls_coef: float = 1.0
    backend: str = "auto"  # safety_loss backend: "auto" | "triton" | "torch"
    chunk_size: int | None = None  # safety_loss rows per chunk; None: chosen from the shapes
    ignore_index: int = IGNORE_INDEX
    head_bias: bool = True
    threshold: float | None = None  # p_unsafe above it is blocked (scft-fast eval --store-threshold); None: 0.5

    def __post_init__(self):
        if self.pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {self.pool!r}")
        if not 2 <= self.num_labels <= 16:
            raise ValueError(f"num_labels must be in [2, 16] (the fused head's range), got {self.num_labels}")
        if self.threshold is not None and not 0.0 < self.threshold < 1.0:
            raise ValueError(f"threshold must be in (0, 1) or None, got {self.threshold}")

    @classmethod
    def from_dict(cls, d: dict) -> "SCFTConfig":
        known = {f.name for f in fields(cls)}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown SCFT config keys {sorted(unknown)}; expected a subset of {sorted(known)}")
        return cls(**d)


@dataclass
class SCFTOutput(ModelOutput):
    loss: torch.Tensor | None = None  # () float32, differentiable
    lm_loss: torch.Tensor | None = None  # () detached, mean over LM targets
    transition_loss: torch.Tensor | None = None  # () detached, mean over RTO targets
    cls_loss: torch.Tensor | None = None  # () detached
    cls_logits: torch.Tensor | None = None  # (S, C) float32, one row per pooled sequence
    logits: torch.Tensor | None = None  # (B, T, V), only without labels
    past_key_values: Any = None
    n_lm: torch.Tensor | None = None
    n_tr: torch.Tensor | None = None
    n_cls: torch.Tensor | None = None


def _unwrap(causal_lm: nn.Module) -> PreTrainedModel:
    """The transformers model under an optional PEFT wrapper."""
    get_base = getattr(causal_lm, "get_base_model", None)
    return get_base() if callable(get_base) else causal_lm


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


class SafetyHead(nn.Module):
    """SCFT's classifier (C, H) and the fused LM + RTO + classification loss over the final hidden states."""

    def __init__(self, hidden_size: int, num_labels: int, bias: bool, dtype: torch.dtype | None = None,
                 device=None):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_labels, hidden_size, dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(num_labels, dtype=dtype, device=device)) if bias else None

    def forward(
        self,
        hidden: torch.Tensor,  # (N, H) final hidden states
        cls_index: torch.Tensor,  # (S,) rows pooled by the classifier
        lm_head: nn.Module | None = None,  # the causal LM's output embedding (V, H); None: classify only
        labels: torch.Tensor | None = None,  # (N,) already shifted
        transition_labels: torch.Tensor | None = None,  # (N,) already shifted
        cls_labels: torch.Tensor | None = None,  # (S,); None: no classification term, no cls_logits
        num_items: torch.Tensor | int | None = None,
        num_cls: torch.Tensor | int | None = None,  # labeled sequences over the accumulated batch
        softcap: float | None = None,
        config: SCFTConfig | None = None,  # coefficients, backend, ignore_index (default: SCFTConfig())
    ) -> dict | torch.Tensor:  # SafetyLossOutput's fields, or (S, C) float32 logits without lm_head
        if lm_head is None:
            return F.linear(hidden[cls_index], self.weight, self.bias).float()
        config = config or SCFTConfig()
        lm_bias = getattr(lm_head, "bias", None)
        head = {}
        if cls_labels is not None:  # without labels the head is skipped: plain (fused) instruction tuning
            head = dict(cls_weight=self.weight, cls_bias=self.bias, cls_index=cls_index, cls_labels=cls_labels)
        # Under autocast the op itself runs in the autocast dtype (safety_loss casts its inputs).
        out = safety_loss(
            hidden, lm_head.weight, labels, lm_bias=lm_bias, transition_labels=transition_labels, **head,
            lm_coef=config.lm_coef, transition_coef=config.transition_coef, cls_coef=config.cls_coef,
            num_items=num_items, num_cls=num_cls, ignore_index=config.ignore_index, softcap=softcap,
            backend=config.backend, chunk_size=config.chunk_size)
        # A dict, not the dataclass: ZeRO-3 finds the tensors its backward hooks attach to only inside tuples,
        # lists and dicts, and without those hooks the weights are not re-gathered for the backward.
        return vars(out)


class SCFTForCausalLM(nn.Module):
    """A causal LM (optionally PEFT-wrapped) and ``score``, its SCFT safety head."""

    def __init__(self, causal_lm: nn.Module, config: SCFTConfig, check_logits: bool = True):
        super().__init__()
        base = _unwrap(causal_lm)
        check_logit_transforms(base.config)
        head = base.get_output_embeddings()
        if head is None or not isinstance(getattr(head, "weight", None), torch.Tensor) or head.weight.dim() != 2:
            raise ValueError(f"{type(base).__name__}.get_output_embeddings() must return a module with a (V, H) "
                             f"weight, got {head!r}")
        self.causal_lm = causal_lm
        self.scft_config = config
        hidden_size = base.config.get_text_config().hidden_size
        weight = head.weight
        self.score = SafetyHead(hidden_size, config.num_labels, config.head_bias,
                                dtype=weight.dtype, device=weight.device if weight.device.type != "meta" else None)
        self.init_head()
        if check_logits:
            self._check_logits_match()

    # -- construction ---------------------------------------------------------------------------------------------
    @classmethod
    def from_causal_lm(cls, causal_lm: nn.Module, config: SCFTConfig | None = None,
                       check_logits: bool = True) -> "SCFTForCausalLM":
        """Wraps ``causal_lm`` with a freshly initialized head. ``check_logits`` runs one 4-token forward to make
        sure the model's logits are ``lm_head(hidden)`` (catches logit transforms no config attribute names)."""
        return cls(causal_lm, config or SCFTConfig(), check_logits=check_logits)

    @classmethod
    def from_pretrained(cls, path: str, init_head: bool = False, config: SCFTConfig | None = None,
                        **causal_lm_kwargs) -> "SCFTForCausalLM":
        """Loads what ``save_pretrained`` wrote. A checkpoint without ``score.weight`` is an error unless
        ``init_head=True`` (then ``config``, the checkpoint's SCFT settings or the defaults describe the head)."""
        hf_config = AutoConfig.from_pretrained(path)
        saved = getattr(hf_config, SCFT_CONFIG_KEY, None)
        scft = config or (SCFTConfig.from_dict(saved) if saved else SCFTConfig())
        head = _read_head(path)
        if head is None and not init_head:
            raise ValueError(f"{path} holds no SCFT head ({HEAD_PREFIX}weight not found in its weights); "
                             f"pass init_head=True to initialize a new one")
        causal_lm = _load_causal_lm(path, **causal_lm_kwargs)
        model = cls(causal_lm, scft, check_logits=False)
        if head is not None:
            missing = {"weight"} | ({"bias"} if scft.head_bias else set())
            if set(head) != missing:
                raise ValueError(f"{path}: SCFT head has {sorted(head)} but the config expects {sorted(missing)}")
            model.score.load_state_dict({k: v.to(model.score.weight.dtype) for k, v in head.items()})
        return model

    @torch.no_grad()
    def init_head(self) -> None:
        std = getattr(self.hf_config, "initializer_range", 0.02)
        if self.score.weight.device.type != "meta":
            self.score.weight.normal_(0.0, std)
            if self.score.bias is not None:
                self.score.bias.zero_()

    @torch.no_grad()
    def _check_logits_match(self) -> None:
        weight = self.lm_head.weight
        if weight.device.type == "meta" or weight.numel() == 0 or hasattr(weight, "ds_id"):
            return  # not materialized here (meta device, ZeRO-3 partition): nothing to probe
        vocab = self.hf_config.get_text_config().vocab_size
        probe = torch.arange(4, device=weight.device).remainder(vocab).unsqueeze(0)
        was_training = self.causal_lm.training
        self.causal_lm.eval()
        try:
            out = self.causal_lm(input_ids=probe, output_hidden_states=True, use_cache=False)
        finally:
            self.causal_lm.train(was_training)
        expected = self._logits(out.hidden_states[-1]).float()
        if not torch.allclose(out.logits.float(), expected, rtol=1e-2, atol=1e-2 * expected.abs().max().item()):
            diff = (out.logits.float() - expected).abs().max().item()
            raise ValueError(
                f"{type(_unwrap(self.causal_lm)).__name__}'s logits are not get_output_embeddings()(final hidden "
                f"state) (soft-capped by final_logit_softcapping): max difference {diff:.3g}. It applies a logit "
                f"transform scft_fast does not know; training it with the fused loss would give a wrong loss.")

    # -- accessors --------------------------------------------------------------------------------------------------
    @property
    def hf_config(self):
        return _unwrap(self.causal_lm).config

    @property
    def config(self):
        return self.hf_config

    @property
    def lm_head(self) -> nn.Module:
        return _unwrap(self.causal_lm).get_output_embeddings()

    @property
    def decoder(self) -> nn.Module:
        return _unwrap(self.causal_lm).get_decoder()

    @property
    def softcap(self) -> float | None:
        return getattr(self.hf_config.get_text_config(), "final_logit_softcapping", None)

    @property
    def device(self) -> torch.device:
        return self.score.weight.device

    def _logits(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.lm_head(hidden)
        if self.softcap:
            logits = self.softcap * torch.tanh(logits / self.softcap)
        return logits

    def register_zero3_external_parameters(self) -> None:
        """Tells ZeRO-3 that ``score``'s forward reads the LM head weight (call after deepspeed.initialize)."""
        import deepspeed

        for param in self.lm_head.parameters(recurse=False):
            deepspeed.zero.register_external_parameter(self.score, param)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None) -> None:
        _unwrap(self.causal_lm).gradient_checkpointing_enable(
            gradient_checkpointing_kwargs=gradient_checkpointing_kwargs or {"use_reentrant": False})

    def generate(self, *args, **kwargs):
        return self.causal_lm.generate(*args, **kwargs)

    # -- forward ----------------------------------------------------------------------------------------------------
    def pooled_index(self, batch: int, length: int, attention_mask=None, position_ids=None, cu_seqlens=None,
                     cls_index=None) -> torch.Tensor:  # (S,) flat rows into the B*T hidden states
        if cls_index is not None:
            return cls_index.long()
        if cu_seqlens is None and attention_mask is None and position_ids is None:
            index = torch.arange(1, batch + 1, device=self.device) * length - 1
        else:
            index = last_token_index(attention_mask, position_ids=position_ids, cu_seqlens=cu_seqlens)
        return index - 1 if self.scft_config.pool == "pre_eos" else index

    def forward(
        self,
        input_ids: torch.Tensor | None = None,  # (B, T); packed: (1, L)
        attention_mask: torch.Tensor | None = None,  # (B, T), padded batches only
        labels: torch.Tensor | None = None,  # (B, T) HF convention (unshifted)
        transition_labels: torch.Tensor | None = None,  # (B, T) like labels: the refusal token where RTO applies
        cls_labels: torch.Tensor | None = None,  # (S,) 0 safe, 1 unsafe, ignore_index: no label
        position_ids: torch.Tensor | None = None,  # (B, T) or (T,); packed rows restart at 0
        cu_seqlens: torch.Tensor | None = None,  # (S + 1,) packed sequence boundaries
        num_items_in_batch: int | torch.Tensor | None = None,  # token normalizer over the accumulated batch
        max_seqlen: int | None = None,  # longest packed sequence (flash-attn varlen)
        cls_index: torch.Tensor | None = None,  # (S,) flat pooled rows; default: from mask/positions
        num_cls_in_batch: int | None = None,  # labeled sequences over the accumulated batch
        hf_loss: bool = False,  # labels only, through the wrapped model's own loss (materialized logits)
        **kwargs,
    ) -> SCFTOutput:
        """With any of labels / transition_labels / cls_labels: the fused loss, no logits. ``num_items_in_batch``
        and ``num_cls_in_batch`` make the token and classification terms sums over this micro-batch divided by
        batch-wide counts, so accumulated gradients equal the large batch's."""
        reference = input_ids if input_ids is not None else kwargs["inputs_embeds"]
        batch, length = reference.shape[:2]
        ignore = self.scft_config.ignore_index
        if cu_seqlens is not None:
            # A packed row is one block-diagonal causal attention; HF derives it from position_ids (SDPA, eager)
            # or from cu_seq_lens_* (flash-attn), and only when no 2-D attention mask overrides it.
            attention_mask = None
            if position_ids is None:
                position_ids = positions_from_cu_seqlens(cu_seqlens, length)
            if "flash" in str(self.hf_config._attn_implementation):
                cu = cu_seqlens.to(torch.int32)
                longest = int(max_seqlen) if max_seqlen is not None else int(torch.diff(cu).max())
                kwargs.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=longest, max_length_k=longest)
        if labels is None and transition_labels is None and cls_labels is None:
            return self._inference(input_ids, attention_mask, position_ids, cu_seqlens, cls_index, **kwargs)
        kwargs.pop("output_hidden_states", None)
        if hf_loss:
            return self._hf_loss(input_ids, attention_mask, position_ids, labels, num_items_in_batch, **kwargs)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                              use_cache=False, **kwargs).last_hidden_state  # (B, T, H)
        if labels is None:
            labels = torch.full((batch, length), ignore, dtype=torch.long, device=hidden.device)
        index = self.pooled_index(batch, length, attention_mask, position_ids, cu_seqlens, cls_index)
        out = self.score(
            hidden.reshape(batch * length, -1), index, self.lm_head,
            labels=shift_labels(labels, position_ids, ignore).reshape(-1),
            transition_labels=None if transition_labels is None
            else shift_labels(transition_labels, position_ids, ignore).reshape(-1),
            cls_labels=cls_labels, num_items=num_items_in_batch, num_cls=num_cls_in_batch, softcap=self.softcap,
            config=self.scft_config)
        return SCFTOutput(**out)

    def _hf_loss(self, input_ids, attention_mask, position_ids, labels, num_items_in_batch, **kwargs) -> SCFTOutput:
        """The baseline the fused loss replaces: the wrapped model's logits and its own cross-entropy."""
        out = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             labels=labels, num_items_in_batch=num_items_in_batch, use_cache=False, **kwargs)
        n_lm = (shift_labels(labels, position_ids, self.scft_config.ignore_index) != self.scft_config.ignore_index
                ).sum()
        lm_loss = out.loss.detach().float()
        if num_items_in_batch is not None:
            lm_loss = lm_loss * float(num_items_in_batch) / n_lm.clamp_min(1)
        zero = torch.zeros((), device=lm_loss.device)
        return SCFTOutput(loss=out.loss, lm_loss=lm_loss, transition_loss=zero, cls_loss=zero, n_lm=n_lm,
                          n_tr=zero.long(), n_cls=zero.long())

    def _inference(self, input_ids, attention_mask, position_ids, cu_seqlens, cls_index, **kwargs) -> SCFTOutput:
        """Exactly the wrapped model's forward (logits, cache), plus the head's logits at the pooled rows."""
        kwargs["output_hidden_states"] = True
        if cu_seqlens is not None:
            kwargs["use_cache"] = False  # HF derives the block-diagonal mask of a packed row only without a cache
        out = self.causal_lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                             **kwargs)
        hidden = out.hidden_states[-1]
        batch, length = hidden.shape[:2]
        index = self.pooled_index(batch, length, attention_mask, position_ids, cu_seqlens, cls_index)
        cls_logits = self.score(hidden.reshape(batch * length, -1), index)
        return SCFTOutput(logits=out.logits, past_key_values=getattr(out, "past_key_values", None),
                          cls_logits=cls_logits)

    @torch.no_grad()
    def classify(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 **kwargs) -> torch.Tensor:  # (B, C) safe/unsafe probabilities of each (instruction, response)
        if attention_mask is not None and "position_ids" not in kwargs:  # left padding: positions count real tokens
            kwargs["position_ids"] = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
        hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False,
                              **kwargs).last_hidden_state
        batch, length = hidden.shape[:2]
        index = self.pooled_index(batch, length, attention_mask)
        return self.score(hidden.reshape(batch * length, -1), index).softmax(-1)

    # -- saving -----------------------------------------------------------------------------------------------------
    def merged_state_dict(self) -> dict[str, torch.Tensor]:
        """The causal LM's state dict with LoRA deltas merged in (without touching the model), plus the head."""
        base = _unwrap(self.causal_lm)
        state = {k: v for k, v in base.state_dict().items() if ".lora_" not in k}
        if base is not self.causal_lm:
            from peft.tuners.lora import LoraLayer

            for name, module in base.named_modules():
                if isinstance(module, LoraLayer):
                    weight_key = f"{name}.base_layer.weight"
                    merged = state.pop(weight_key).clone()
                    for adapter in module.active_adapters:
                        merged += module.get_delta_weight(adapter).to(merged.dtype)
                    state[f"{name}.weight"] = merged
            state = {k.replace(".base_layer.", "."): v for k, v in state.items()}
        state.update({HEAD_PREFIX + k: v for k, v in self.score.state_dict().items()})
        return state

    def save_pretrained(self, path: str, state_dict: dict[str, torch.Tensor] | None = None,
                        **save_kwargs) -> None:
        """A normal HF checkpoint: the causal LM (LoRA merged), ``score.weight`` / ``score.bias`` beside its
        weights and the SCFT settings under config.json's "scft" key. ``state_dict`` (e.g. gathered from ZeRO-3
        shards) overrides the model's own tensors; it must hold the same keys as ``merged_state_dict()``."""
        base = _unwrap(self.causal_lm)
        state = state_dict if state_dict is not None else self.merged_state_dict()
        if HEAD_PREFIX + "weight" not in state:
            raise ValueError(f"state_dict must hold the head ({HEAD_PREFIX}weight); got keys like {list(state)[:3]}")
        setattr(base.config, SCFT_CONFIG_KEY, asdict(self.scft_config))
        base.save_pretrained(path, state_dict=state, **save_kwargs)

def _read_head(path: str) -> dict[str, torch.Tensor] | None:
    """``score.*`` tensors of a checkpoint directory (single file or sharded safetensors, or a .bin)."""
    from safetensors import safe_open

    index_file = os.path.join(path, "model.safetensors.index.json")
    if os.path.exists(index_file):
        with open(index_file) as f:
            weight_map = json.load(f)["weight_map"]
        files = sorted({v for k, v in weight_map.items() if k.startswith(HEAD_PREFIX)})
    elif os.path.exists(os.path.join(path, "model.safetensors")):
        files = ["model.safetensors"]
    elif os.path.exists(os.path.join(path, "pytorch_model.bin")):
        state = torch.load(os.path.join(path, "pytorch_model.bin"), map_location="cpu", weights_only=True)
        head = {k[len(HEAD_PREFIX):]: v for k, v in state.items() if k.startswith(HEAD_PREFIX)}
        return head or None
    else:
        raise FileNotFoundError(f"{path} has no model.safetensors, model.safetensors.index.json or pytorch_model.bin")
    head = {}
    for name in files:
        with safe_open(os.path.join(path, name), framework="pt") as f:
            for key in f.keys():
                if key.startswith(HEAD_PREFIX):
                    head[key[len(HEAD_PREFIX):]] = f.get_tensor(key)
    return head or None


def _load_causal_lm(path: str, **kwargs) -> PreTrainedModel:
    """AutoModelForCausalLM.from_pretrained without the 'unexpected score.* keys' report (they are ours);
    any other missing or unexpected key still raises."""
    from transformers.utils import logging as hf_logging

    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, **kwargs)
    finally:
        hf_logging.set_verbosity(verbosity)
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(HEAD_PREFIX)]
    if info.get("missing_keys") or unexpected:
        raise ValueError(f"{path}: weights do not match {type(model).__name__}: missing "
                         f"{sorted(info.get('missing_keys', []))[:5]}, unexpected {sorted(unexpected)[:5]}")
    return model
