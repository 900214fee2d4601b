"""The embedded default dataset and its tokenizer, shipped with the package so that training needs no download.

    train.jsonl, eval.jsonl  triples ({"instruction", "response"} and {"instruction", "harmful_response",
                             "safe_response"}) written by benchmarks/embedded_data/generate.py (a
                             seeded template generator)
    separate.jsonl           held-out triples written by generate_separate.py there, a second generator that shares
                             no template, topic list or response style with the first; never trained on
    tokenizer/               a byte-level BPE trained on them by train_tokenizer.py, DeRTa's chat template,
                             eos "<|end_of_text|>" (DeRTa's own end-of-text string), "Sorry" a single token

The generators and the tokenizer's training script are experiment code, outside the package: regenerate the files
with python benchmarks/embedded_data/generate.py && python benchmarks/embedded_data/generate_separate.py && python
benchmarks/embedded_data/train_tokenizer.py (the tokenizer is trained on train.jsonl only)
"""
from __future__ import annotations

from pathlib import Path

EMBEDDED_DIR = Path(__file__).resolve().parent
TOKENIZER_DIR = EMBEDDED_DIR / "tokenizer"
SPLITS = ("train", "eval", "separate")


def default_data_files(split: str = "train") -> list[str]:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return [str(EMBEDDED_DIR / f"{split}.jsonl")]


def load_default_tokenizer():
    from transformers import PreTrainedTokenizerFast

    from ..constants import DERTA_CHAT_TEMPLATE

    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(TOKENIZER_DIR), local_files_only=True)
    if tokenizer.chat_template is None:  # transformers versions that do not read chat_template.jinja
        tokenizer.chat_template = DERTA_CHAT_TEMPLATE
    return tokenizer
