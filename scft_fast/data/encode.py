"""Samples -> token ids, LM labels, RTO transition labels and the pooled position.

Layout of one sample of n tokens (HF convention: labels sit at the positions of the tokens they name; the model
shifts them, so the hidden state at t - 1 is trained on labels[t]):

    input_ids:          [BOS] prompt ...        target ...        EOS
    labels:             ignore ... ignore      target ids ...    EOS id        (MLE samples)
    transition_labels:  ignore everywhere                                       (MLE samples)
    RTO samples: labels are ignore everywhere; transition_labels hold the refusal token id at a random
    ceil(rto_keep * m) >= 1 of the m target positions (EOS included, as DeRTa's), ignore elsewhere.
    cls_pos: n - 1 (pool="eos") or n - 2 (pool="pre_eos", the last target token).

Prompt and target are tokenized separately and concatenated, so the loss boundary is exact whatever the
tokenizer merges across it (DeRTa tokenized prefix + text and masked len(tokenize(prefix)) tokens).

Over max_length, truncation="prompt" drops the prompt's oldest tokens (after BOS) first; if the target alone
does not fit, it is cut on the right and keeps a final EOS as its pooled row, with no LM or transition label
there (the model must not learn to stop mid-answer). truncation="drop" drops the sample.

[BOS] is there when the tokenizer itself adds one and the rendered prompt does not already start with it
(bos_prefix, prompt_bos); a cut keeps it (keep_prompt_end). Generation lays out its prompts with the same three.
"""
from __future__ import annotations

import logging
import math

import numpy as np

from .config import DataConfig
from .records import Sample

logger = logging.getLogger(__name__)

STATUS_OK = "ok"
STATUS_TRUNCATED_PROMPT = "truncated_prompt"
STATUS_TRUNCATED_TARGET = "truncated_target"
STATUS_DROPPED = "dropped_too_long"
STATUS_INVALID = "invalid"


def refusal_token_id(tokenizer, refusal_string: str) -> int:
    ids = tokenizer(refusal_string, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"refusal string {refusal_string!r} encodes to no token")
    if len(ids) > 1:
        logger.warning("refusal string %r is %d tokens %s; RTO trains on its first token only (%d = %r)",
                       refusal_string, len(ids), ids, ids[0], tokenizer.convert_ids_to_tokens(ids[0]))
    return ids[0]


def rto_positions(m: int, rto_keep: float, seed) -> np.ndarray:
    """Sorted indices, among m target positions, that keep a refusal transition target. seed: anything
    np.random.default_rng takes; only drawn from when some positions are dropped."""
    keep = max(1, math.ceil(rto_keep * m - 1e-9))
    if keep >= m:
        return np.arange(m)
    return np.sort(np.random.default_rng(seed).permutation(m)[:keep])


def bos_prefix(tokenizer) -> list[int]:
    """[BOS] when the tokenizer itself adds one (Llama), else []: the ids that start every sample's prompt."""
    bos = tokenizer.bos_token_id
    return [bos] if bos is not None and tokenizer("a")["input_ids"][:1] == [bos] else []


def prompt_bos(tokenizer, prompt: str, bos: list[int]) -> list[int]:
    """The ids to put before a rendered prompt's tokens: bos (bos_prefix's), unless the chat template already wrote
    the BOS string at its start."""
    bos_text = tokenizer.bos_token
    return [] if bos_text and prompt.startswith(bos_text) else bos


def keep_prompt_end(prompt: list[int], length: int, bos_id: int | None) -> list[int]:
    """The prompt cut to length tokens by dropping its oldest ones after a leading BOS, which survives whatever
    length says: the end, where the response starts, is kept."""
    if len(prompt) <= length:
        return prompt
    head = 1 if bos_id is not None and prompt[:1] == [bos_id] else 0
    return prompt[:head] + prompt[len(prompt) - max(length - head, 0):]


class SampleEncoder:
    def __init__(self, tokenizer, config: DataConfig):
        if tokenizer.eos_token_id is None:
            raise ValueError("the tokenizer has no eos_token: samples end with EOS and the classifier pools on it")
        self.tokenizer, self.config = tokenizer, config
        self.eos_id = tokenizer.eos_token_id
        self.refusal_id = refusal_token_id(tokenizer, config.refusal_string)
        self.bos_id = tokenizer.bos_token_id
        self.bos = bos_prefix(tokenizer)

    def encode(self, samples: list[Sample], seeds: list) -> list[dict]:
        """One dict per sample: input_ids, labels, transition_labels, cls_pos, status. seeds[i] seeds the RTO
        positions of samples[i]."""
        if not samples:
            return []
        prompts = self._tokenize([s.prompt for s in samples])
        targets = self._tokenize([s.target for s in samples])
        return [self._layout(s, prompt_bos(self.tokenizer, s.prompt, self.bos) + p, t + [self.eos_id], seed)
                for s, p, t, seed in zip(samples, prompts, targets, seeds)]

    def _tokenize(self, texts: list[str]) -> list[list[int]]:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # the Rust tokenizer directly: same ids, without the Python wrapper's overhead
            return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def _layout(self, sample: Sample, prompt: list[int], target: list[int], seed) -> dict:
        cfg, ignore = self.config, self.config.ignore_index
        status, cut = STATUS_OK, False
        if len(prompt) + len(target) > cfg.max_length:
            if cfg.truncation == "drop":
                return {"status": STATUS_DROPPED}
            prompt = keep_prompt_end(prompt, max(cfg.max_length - len(target), 0), self.bos_id)
            if len(prompt) + len(target) <= cfg.max_length:
                status = STATUS_TRUNCATED_PROMPT
            else:
                target = target[: cfg.max_length - len(prompt) - 1] + [self.eos_id]
                status, cut = STATUS_TRUNCATED_TARGET, True
        n_prompt, n = len(prompt), len(prompt) + len(target)
        labels = [ignore] * n
        transition = [ignore] * n
        trained = len(target) - 1 if cut else len(target)  # a cut target's EOS is a pooled row only
        if sample.rto:
            for j in rto_positions(trained, cfg.rto_keep, seed):
                transition[n_prompt + int(j)] = self.refusal_id
        else:
            labels[n_prompt: n_prompt + trained] = target[:trained]
        return {"input_ids": prompt + target, "labels": labels, "transition_labels": transition,
                "cls_pos": n - 1 if cfg.pool == "eos" else n - 2, "status": status}
