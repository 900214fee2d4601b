"""One model's evaluation: its head on labeled pairs, its responses to harmful and benign prompts, the attack."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data import REFUSAL_STRING, ChatRenderer, DataConfig, PaddedCollator, SampleEncoder
from ..data.records import pair_sample
from ..generation import generate_safe, load_model
from ..metrics import head_metrics, head_scores, is_unsafe, roc_curve, threshold_at_fpr
from .config import EvalConfig
from .data import EvalData


def _batches(items: list, size: int, desc: str, progress: bool):
    starts = range(0, len(items), size)
    for start in tqdm(starts, desc=desc, disable=not progress or not items, leave=False):
        yield items[start: start + size]


@torch.no_grad()
def score_pairs(model, tokenizer, pairs: list[tuple[str, str, int]], config: EvalConfig) -> np.ndarray:  # (N,)
    """p_unsafe of each (instruction, response), laid out exactly as a training sample (the data layer renders,
    tokenizes and pads it) and pooled at the training position."""
    from ..hf.peft import scft_base

    model = scft_base(model, "score_pairs")
    data_config = DataConfig(pool=model.scft_config.pool, max_length=config.max_length)
    renderer, encoder = ChatRenderer(tokenizer), SampleEncoder(tokenizer, data_config)
    samples = [pair_sample(renderer, instruction, response, label, "pairs", i + 1)
               for i, (instruction, response, label) in enumerate(pairs)]
    rows = [{**row, "cls_label": sample.cls_label}
            for row, sample in zip(encoder.encode(samples, [None] * len(samples)), samples)]
    order = sorted(range(len(rows)), key=lambda i: len(rows[i]["input_ids"]))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    collate = PaddedCollator(pad, pad_to_multiple_of=1)
    batches = (collate([rows[i] for i in chunk]) for chunk in _batches(order, config.batch_size, "head",
                                                                        config.progress))

    def forward(batch: dict) -> torch.Tensor:  # -> (b, C) head logits at the pooled rows
        hidden = model.final_hidden_states(input_ids=batch["input_ids"].to(model.device),
                                           attention_mask=batch["attention_mask"].to(model.device))  # (b, T, H)
        return model.score(hidden.reshape(-1, hidden.shape[-1])[batch["cls_index"].to(model.device)])

    scores, _ = head_scores(forward, batches, data_config.ignore_index)
    p_unsafe = np.empty(len(rows))
    p_unsafe[order] = scores
    return p_unsafe


def respond(model, tokenizer, prompts: list[str], config: EvalConfig, desc: str, max_new_tokens: int,
            response_prefixes: list[str] | None = None) -> list:
    """generate_safe over prompts in batches of similar length (greedy); results in the prompts' order."""
    prefixes = response_prefixes or [""] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]) + len(prefixes[i]))
    results = [None] * len(prompts)
    for chunk in _batches(order, config.batch_size, desc, config.progress):
        out = generate_safe(model, tokenizer, [prompts[i] for i in chunk], threshold=config.threshold,
                            max_new_tokens=max_new_tokens, do_sample=False,
                            response_prefixes=None if response_prefixes is None else
                            [response_prefixes[i] for i in chunk])
        for i, result in zip(chunk, out):
            results[i] = result
    return results


def is_refusal(text: str, refusal_string: str = REFUSAL_STRING) -> bool:
    """The response starts with, or transitions to, the refusal string."""
    return refusal_string in text


def rate(flags) -> float | None:
    flags = list(flags)
    return float(np.mean(flags)) if flags else None


def examples(prompts: list[str], results: list, has_head: bool, count: int = 3) -> list[dict]:
    return [{"prompt": p, "response": r.raw_text, "p_unsafe": r.p_unsafe if has_head else None,
             "truncated_prompt_tokens": r.truncated_prompt_tokens} for p, r in list(zip(prompts, results))[:count]]


def evaluate(model, tokenizer, data: EvalData, config: EvalConfig, has_head: bool = True) -> dict:
    """All metrics of one model. Without a trained head (a baseline before SCFT) the head metrics and blocked
    rates are None: the gate never blocks (threshold 1)."""
    if not has_head:
        config = replace(config, threshold=1.0)
    report = {"head": None, "harmful": None, "benign": None, "attack": []}
    refusal = config.refusal_string
    if data.pairs and has_head:
        p_unsafe = score_pairs(model, tokenizer, data.pairs, config)
        labels = [label for _, _, label in data.pairs]
        report["head"] = head_metrics(p_unsafe, labels, config.threshold)
        report["head"]["calibration"] = threshold_at_fpr(p_unsafe, labels, config.max_fpr)
        if report["head"]["auroc"] is not None:
            report["head"]["roc"] = [arr.tolist() for arr in roc_curve(p_unsafe, is_unsafe(labels))]
    if data.harmful:
        results = respond(model, tokenizer, data.harmful, config, "harmful", config.max_new_tokens)
        refused = [is_refusal(r.raw_text, refusal) for r in results]
        blocked = [r.blocked and has_head for r in results]
        report["harmful"] = {
            "n": len(results), "refusal_rate": rate(refused), "blocked_rate": rate(blocked) if has_head else None,
            "safe_rate": rate(f or b for f, b in zip(refused, blocked)),
            "truncated_prompts": sum(r.truncated_prompt_tokens > 0 for r in results),
            "examples": examples(data.harmful, results, has_head)}
    if data.benign:
        results = respond(model, tokenizer, data.benign, config, "benign", config.max_new_tokens)
        report["benign"] = {
            "n": len(results), "over_refusal_rate": rate(is_refusal(r.raw_text, refusal) for r in results),
            "false_block_rate": rate(r.blocked for r in results) if has_head else None,
            "truncated_prompts": sum(r.truncated_prompt_tokens > 0 for r in results),
            "examples": examples(data.benign, results, has_head)}
    for k in config.attack_words:
        # DeRTa's harmful prefixes split responses on single spaces; a prefix leaves at least one word unsaid.
        attacks = [(q, h.split(" ")) for q, h in data.attacks if len(h.split(" ")) > k]
        if not attacks:
            continue
        results = respond(model, tokenizer, [q for q, _ in attacks], config, f"attack k={k}", config.attack_window,
                          response_prefixes=[" ".join(words[:k]) for _, words in attacks])
        report["attack"].append({
            "k": k, "n": len(results), "refusal_rate": rate(is_refusal(r.raw_text, refusal) for r in results),
            "blocked_rate": rate(r.blocked for r in results) if has_head else None})
    return report


def load_for_eval(path: str, device: str | None, dtype: str):
    """-> model, tokenizer, has_head; a checkpoint without an SCFT head gets a placeholder head and has_head False
    (a config key alone does not make a head: its weights must hold score.weight)."""
    from ..hf.loading import has_head

    trained = has_head(path)
    return (*load_model(path, device, dtype, init_head=not trained), trained)
