"""Trains the embedded tokenizer: python benchmarks/embedded_data/train_tokenizer.py

A byte-level BPE (GPT-2 pre-tokenization, so every string encodes) of about VOCAB_SIZE tokens on train.jsonl,
rendered in DeRTa's template. BOS <|begin_of_text|> is prepended by the post-processor; EOS is DeRTa's
end-of-text string <|end_of_text|>, so DeRTa-format files work verbatim; the pad token is separate.
The refusals are also fed without their leading space so that "Sorry" (DeRTa's refusal token, no space) is a
single token; the script checks it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from scft_fast.data.constants import BEGIN_OF_TEXT, DERTA_CHAT_TEMPLATE, END_OF_TEXT, PAD, REFUSAL_STRING
from scft_fast.data.embedded import EMBEDDED_DIR, TOKENIZER_DIR

VOCAB_SIZE = 3000


def _corpus(path: Path):
    with open(path, encoding="utf-8") as f:
        for raw in f:
            record = json.loads(raw)
            instruction = f"[INST] {record['instruction']} [\\INST]"
            for key in ("response", "harmful_response", "safe_response"):
                if key in record:
                    yield f"{instruction} {record[key]}"
            if "safe_response" in record:
                yield record["safe_response"]


def train(data: Path, out_dir: Path, vocab_size: int = VOCAB_SIZE):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[BEGIN_OF_TEXT, END_OF_TEXT, PAD],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(_corpus(data), trainer=trainer)
    bos_id = tokenizer.token_to_id(BEGIN_OF_TEXT)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BEGIN_OF_TEXT} $A", pair=f"{BEGIN_OF_TEXT} $A $B", special_tokens=[(BEGIN_OF_TEXT, bos_id)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BEGIN_OF_TEXT, eos_token=END_OF_TEXT,
                                   pad_token=PAD, chat_template=DERTA_CHAT_TEMPLATE, model_max_length=1024,
                                   clean_up_tokenization_spaces=False)
    refusal = fast(REFUSAL_STRING, add_special_tokens=False)["input_ids"]
    if len(refusal) != 1:
        raise RuntimeError(f"{REFUSAL_STRING!r} encodes to {refusal}, expected a single token")
    out_dir.mkdir(parents=True, exist_ok=True)
    fast.save_pretrained(str(out_dir))
    return fast


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", type=Path, default=EMBEDDED_DIR / "train.jsonl")
    parser.add_argument("--out-dir", type=Path, default=TOKENIZER_DIR)
    parser.add_argument("--vocab-size", type=int, default=VOCAB_SIZE)
    args = parser.parse_args()
    fast = train(args.data, args.out_dir, args.vocab_size)
    print(f"{args.out_dir}: vocab {len(fast)}, {REFUSAL_STRING!r} = {fast.convert_tokens_to_ids(REFUSAL_STRING)}")


if __name__ == "__main__":
    main()
