"""The embedded default dataset and tokenizer: offline, reproducible, in the shape the training code expects."""
from __future__ import annotations

import json

import numpy as np
import pytest

datasets = pytest.importorskip("datasets")
pytest.importorskip("transformers")

from scft_fast.data import (IGNORE_INDEX, SAFE, UNSAFE, DataConfig, PaddedCollator, build_dataset,  # noqa: E402
                            default_data_files, load_default_tokenizer)
from scft_fast.data.embedded import generate  # noqa: E402


@pytest.fixture(scope="module")
def tok():
    return load_default_tokenizer()


def test_default_tokenizer(tok):
    assert tok.eos_token == "<|end_of_text|>" and tok.eos_token_id is not None
    assert tok.pad_token_id is not None and tok.bos_token_id is not None
    assert len(tok(("Sorry"), add_special_tokens=False)["input_ids"]) == 1
    assert 2000 <= len(tok) <= 4096
    text = "[INST] What is 2 plus 2? [\\INST] 2 plus 2 is 4.<|end_of_text|>"
    encoded = tok(text)["input_ids"]
    assert encoded[0] == tok.bos_token_id and encoded[-1] == tok.eos_token_id
    assert tok.decode(encoded, skip_special_tokens=False) == "<|begin_of_text|>" + text
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
                                   tokenize=False) == "[INST] Hi [\\INST] Yo<|end_of_text|>"
    text = "héllo ✓ 日本"  # byte-level: anything encodes and round-trips
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text


def test_committed_files_match_generator():
    generated = generate.generate()
    for split in ("train", "eval"):
        (path,) = default_data_files(split)
        with open(path, encoding="utf-8") as f:
            assert [json.loads(line) for line in f] == generated[split], split
    with pytest.raises(ValueError, match="split"):
        default_data_files("test")


def test_held_out_and_content():
    generated = generate.generate()
    train = {r["instruction"] for r in generated["train"]}
    assert not train & {r["instruction"] for r in generated["eval"]}
    for split, (n_helpful, n_harmful) in generate.SIZES.items():
        harmful = [r for r in generated[split] if "harmful_response" in r]
        assert len(harmful) == n_harmful and len(generated[split]) == n_helpful + n_harmful
        assert all(r["safe_response"].startswith("Sorry") for r in harmful)
        assert len({r["harmful_response"] for r in harmful}) > 0.9 * n_harmful  # varied
        gadgets = tuple(g.split(" ")[-1] for g in generate.GADGETS) + ("[", "banana", "napkin", "hum", "Spin")
        assert all(any(g in r["harmful_response"] for g in gadgets) for r in harmful)  # placeholders only


def test_embedded_eval_builds(tmp_path, tok):
    datasets.disable_progress_bars()
    ds, stats = build_dataset(default_data_files("eval"), tok, DataConfig(cache_dir=str(tmp_path), rto_keep=0.05))
    n_helpful, n_harmful = generate.SIZES["eval"]
    assert stats.samples_per_kind == {"helpful": n_helpful, "rto": n_harmful, "harmful_prefix": n_harmful}
    assert (stats.cls_safe, stats.cls_unsafe, stats.cls_unlabeled) == (n_helpful, n_harmful, n_harmful)
    assert stats.invalid == stats.dropped == stats.truncated_prompt == stats.truncated_target == 0
    lengths = np.asarray(ds["length"])
    assert np.percentile(lengths, 90) <= 128 and lengths.max() <= 192
    batch = PaddedCollator(tok.pad_token_id)([ds[i] for i in range(8)])
    assert set(batch["cls_labels"].tolist()) <= {SAFE, UNSAFE, IGNORE_INDEX}
    assert (batch["input_ids"].flatten()[batch["cls_index"]] == tok.eos_token_id).all()


def test_committed_tokenizer_matches_training_script(tmp_path):
    from scft_fast.data.embedded import EMBEDDED_DIR, TOKENIZER_DIR
    from scft_fast.data.embedded.train_tokenizer import train

    train(EMBEDDED_DIR / "train.jsonl", tmp_path)
    retrained = json.loads((tmp_path / "tokenizer.json").read_text())
    committed = json.loads((TOKENIZER_DIR / "tokenizer.json").read_text())
    assert retrained == committed
