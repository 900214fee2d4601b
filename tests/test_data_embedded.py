"""The embedded default dataset and tokenizer: offline, reproducible, in the shape the training code expects."""
from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from scft_fast.constants import IGNORE_INDEX  # noqa: E402
from scft_fast.data import DataConfig, PaddedCollator, build_dataset, default_data_files  # noqa: E402
from scft_fast.data.constants import SAFE, UNSAFE  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks" / "embedded_data"))
import generate  # noqa: E402  (benchmarks/embedded_data: experiment code, outside the package)
import generate_separate  # noqa: E402
import train_tokenizer  # noqa: E402

from scft_fast.data.embedded import SPLITS  # noqa: E402


def test_default_tokenizer(tok):
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.bos_token_id is not None
    assert len(tok(("Sorry"), add_special_tokens=False)["input_ids"]) == 1
    assert len(tok) == train_tokenizer.VOCAB_SIZE  # the script's size, special tokens included
    text = "[INST] What is 2 plus 2? [\\INST] 2 plus 2 is 4.<|end_of_text|>"
    encoded = tok(text)["input_ids"]
    assert encoded[0] == tok.bos_token_id and encoded[-1] == tok.eos_token_id
    assert tok.decode(encoded, skip_special_tokens=False) == "<|begin_of_text|>" + text
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                   tokenize=False) == "[INST] Hi [\\INST] Yo<|end_of_text|>"
    text = "héllo ✓ 日本"  # byte-level: anything encodes and round-trips
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def _generated() -> dict[str, list[dict]]:
    return {**generate.generate(), **generate_separate.generate()}


def test_committed_files_match_generators():
    generated = _generated()
    assert set(generated) == set(SPLITS)
    for split in SPLITS:
        (path,) = default_data_files(split)
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == generated[split], split
    with pytest.raises(ValueError, match="split"):
        default_data_files("test")


def test_splits_share_no_instruction():
    instructions = {split: {r["instruction"] for r in records} for split, records in _generated().items()}
    for a, b in itertools.combinations(SPLITS, 2):
        assert not instructions[a] & instructions[b], (a, b)


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z']+", text.lower())


def _ngrams(records: list[dict], n: int, keys=("instruction", "response", "harmful_response", "safe_response")):
    grams = set()
    for r in records:
        for key in keys:
            words = _words(r.get(key, ""))
            grams |= {tuple(words[i:i + n]) for i in range(len(words) - n + 1)}
    return grams


def test_separate_split_is_written_apart():
    """No request of the separate split names a training action or starts like a training template, and no fake
    answer uses a training placeholder or opener (nor a training fake answer a separate one): what the head scores
    there, it has not seen in those words."""
    generated = _generated()
    separate, train = generated["separate"], generated["train"]
    actions = ([action for action, _ in generate.HARMFUL_ACTIONS] + list(generate.HOWTO_TASKS)
               + [action for action, _ in generate.ALARMING_BUT_SAFE + generate.INTENT_BUT_SAFE]
               + list(generate.PRETEND_PLAY))
    templates = [t.split("{")[0] for t in generate.REQUEST_TEMPLATES if t.split("{")[0]]
    openers = [o.split("{")[0] for o in generate.COMPLY_OPENERS if o.split("{")[0]]
    placeholders = ([f"{a} {n}" for a in generate.PRETEND_ADJECTIVES for n in generate.PRETEND_NOUNS]
                    + [f"[{a} {n}]" for a in generate.TAG_WORDS[0] for n in generate.TAG_WORDS[1]])
    for r in separate:
        assert not any(a in r["instruction"] for a in actions), r["instruction"]
        if "harmful_response" in r:
            assert not any(r["instruction"].startswith(t) for t in templates), r["instruction"]
            assert not any(g in r["harmful_response"] for g in placeholders + openers), r["harmful_response"]
    for r in train:
        assert not any(p in r.get("harmful_response", "") for p in generate_separate.PLACEHOLDERS), r
        assert not any(a in r["instruction"] for a, _ in generate_separate.HARMFUL_TOPICS), r["instruction"]
        assert not any(a in r["instruction"] for a, _ in generate_separate.ALARMING_REQUESTS), r["instruction"]


def test_separate_split_shares_few_ngrams_with_train():
    """Measured overlap (data README): of the separate split's distinct word 4-grams, 1.4% occur anywhere in
    train.jsonl, stock phrases such as "what is the best way to"; of its 5-grams 0.5%."""
    generated = _generated()
    for n, bound in ((4, 0.02), (5, 0.01)):
        separate, train = _ngrams(generated["separate"], n), _ngrams(generated["train"], n)
        assert len(separate & train) / len(separate) < bound, (n, sorted(separate & train)[:20])


def test_held_out_and_content():
    generated = _generated()
    sizes = {**generate.SIZES, **generate_separate.SIZES}
    for split, (n_helpful, n_harmful) in sizes.items():
        harmful = [r for r in generated[split] if "harmful_response" in r]
        assert len(harmful) == n_harmful and len(generated[split]) == n_helpful + n_harmful
        assert len({r["harmful_response"] for r in harmful}) > 0.9 * n_harmful  # varied
        if split != "separate":
            assert all(r["safe_response"].startswith("Sorry") for r in harmful)
            gadgets = tuple(generate.PRETEND_ADJECTIVES) + ("[", "banana", "napkin", "hum", "sticky")
        else:
            gadgets = tuple(p.split(" ")[-1] for p in generate_separate.PLACEHOLDERS) + ("[", "pretend", "crayons")
        assert all(any(g.lower() in r["harmful_response"].lower() for g in gadgets) for r in harmful)  # placeholders
    train = generated["train"]
    helpful = [r for r in train if "response" in r]
    harmful = [r for r in train if "harmful_response" in r]
    # Step-shaped compliant answers come with both labels, so their shape does not give the label away.
    for shape in ("1. ", "First, ", "- ", "a) "):
        assert any(shape in r["response"] for r in helpful)
        assert any(shape in r["harmful_response"] for r in harmful)
    # So do placeholders (toys, props, blanks) and every request template: the label needs the request.
    assert any("[" in r["response"] for r in helpful)
    assert any(any(f"{a} " in r["response"] for a in generate.PRETEND_ADJECTIVES) for r in helpful)
    for template in generate.REQUEST_TEMPLATES:
        start = template.split("{")[0]
        assert any(start in r["instruction"] for r in helpful), template
        assert any(start in r["instruction"] for r in harmful), template


@pytest.mark.usefixtures("quiet_datasets")
def test_embedded_eval_builds(tmp_path, tok):
    ds, stats = build_dataset(default_data_files("eval"), tok, DataConfig(cache_dir=str(tmp_path), rto_keep=0.05))
    n_helpful, n_harmful = generate.SIZES["eval"]
    # The recipe's vanilla refusals: each harmful triple also gives (request, refusal), labeled safe.
    assert stats.samples_per_kind == {"helpful": n_helpful, "rto": n_harmful, "harmful_prefix": n_harmful,
                                      "refusal": n_harmful}
    assert (stats.cls_safe, stats.cls_unsafe, stats.cls_unlabeled) == (n_helpful + n_harmful, n_harmful, n_harmful)
    assert stats.invalid == stats.dropped == stats.truncated_prompt == stats.truncated_target == 0
    lengths = np.asarray(ds["length"])
    assert np.percentile(lengths, 90) <= 128 and lengths.max() <= 192
    batch = PaddedCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    assert set(batch["cls_labels"].tolist()) <= {SAFE, UNSAFE, IGNORE_INDEX}
    assert (batch["input_ids"].flatten()[batch["cls_index"]] == tok.eos_token_id).all()


def test_committed_tokenizer_matches_training_script(tmp_path):
    from train_tokenizer import train

    from scft_fast.data.embedded import EMBEDDED_DIR, TOKENIZER_DIR

    train(EMBEDDED_DIR / "train.jsonl", tmp_path)
    retrained = json.loads((tmp_path / "tokenizer.json").read_text())
    committed = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert retrained == committed
