"""scft_fast.data: sample layouts in every format, padding, packing, errors, statistics, reproducibility."""
from __future__ import annotations

import json
import logging
import math
import os

import numpy as np
import pytest
import torch

pytest.importorskip("datasets")
pytest.importorskip("transformers")

from helpers import DERTA  # noqa: E402
from scft_fast.data import (  # noqa: E402
    IGNORE_INDEX,
    SAFE,
    UNSAFE,
    DataConfig,
    DataError,
    PackedBatchSampler,
    PackedCollator,
    PaddedCollator,
    build_dataset,
)
from scft_fast.data.encode import rto_positions  # noqa: E402
from scft_fast.data.records import harmful_prefix_words  # noqa: E402

DERTA_EXAMPLE = DERTA / "example_data_to_read.json"
IGN = IGNORE_INDEX
pytestmark = pytest.mark.usefixtures("quiet_datasets")


def ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


def write(tmp_path, lines, name="data.jsonl"):
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((line if isinstance(line, str) else json.dumps(line)) + "\n" for line in lines))
    return path


# Every RTO position and no vanilla refusal, so that the layouts below are exact and each triple's samples are
# named; the recipe's own defaults (a fifth of the RTO positions, vanilla refusals on) are tested on their own.
EXACT = dict(rto_keep=1.0, vanilla_safety=False)


def build(tmp_path, lines, tok, **config):
    config.setdefault("cache_dir", str(tmp_path / "cache"))
    return build_dataset([write(tmp_path, lines)], tok, DataConfig(**{**EXACT, **config}))


def rows(ds):
    return [ds[i] for i in range(len(ds))]


def expected_mle(tok, prompt, target):
    """[BOS] prompt target EOS with labels on target + EOS."""
    p, t = [tok.bos_token_id] + ids(tok, prompt), ids(tok, target) + [tok.eos_token_id]
    return p + t, [IGN] * len(p) + t


# ---------------------------------------------------------------------------------------------------- layouts

def test_derta_mle_layout_exact(tmp_path, tok):
    ds, _ = build(tmp_path, [{"prefix": "[INST] Hi there [\\INST]", "text": " Hello friend<|end_of_text|>",
                              "safe": "false"}], tok)
    (row,) = rows(ds)
    input_ids, labels = expected_mle(tok, "[INST] Hi there [\\INST]", " Hello friend")
    assert row["input_ids"] == input_ids
    assert row["labels"] == labels
    assert row["transition_labels"] == [IGN] * len(input_ids)
    assert row["input_ids"][0] == tok.bos_token_id and row["input_ids"][-1] == tok.eos_token_id
    assert row["cls_pos"] == len(input_ids) - 1
    assert (row["cls_label"], row["kind"], row["length"]) == (SAFE, "mle", len(input_ids))


def test_derta_rto_layout_exact(tmp_path, tok):
    ds, stats = build(tmp_path, [{"prefix": "[INST] Q [\\INST]", "text": " Bad answer here<|end_of_text|>",
                                  "safe": "true"}], tok)
    (row,) = rows(ds)
    input_ids, labels = expected_mle(tok, "[INST] Q [\\INST]", " Bad answer here")
    n_target = sum(label != IGN for label in labels)
    sorry = tok.convert_tokens_to_ids("Sorry")
    assert row["input_ids"] == input_ids
    assert row["labels"] == [IGN] * len(input_ids)  # DeRTa replaces the LM targets, it does not add to them
    assert row["transition_labels"] == [IGN] * (len(input_ids) - n_target) + [sorry] * n_target
    assert (row["cls_label"], row["kind"]) == (UNSAFE, "rto")
    assert stats.rto_positions == n_target and stats.lm_tokens == 0


@pytest.mark.skipif(not DERTA_EXAMPLE.exists(), reason=f"DeRTa's reference data is not at {DERTA_EXAMPLE}")
def test_derta_example_file(tmp_path, tok):
    records = [json.loads(line) for line in DERTA_EXAMPLE.read_text().splitlines()]
    ds, stats = build_dataset([DERTA_EXAMPLE], tok, DataConfig(cache_dir=str(tmp_path)))
    assert [r["kind"] for r in rows(ds)] == ["mle", "mle", "harmful_prefix"]
    assert [r["cls_label"] for r in rows(ds)] == [SAFE, SAFE, IGN]
    for record, row in zip(records, rows(ds)):
        assert record["text"].endswith("<|end_of_text|>")
        input_ids, labels = expected_mle(tok, record["prefix"], record["text"][: -len("<|end_of_text|>")])
        assert row["input_ids"] == input_ids
        assert row["labels"] == labels
        assert row["input_ids"].count(tok.eos_token_id) == 1  # the literal end-of-text became the one EOS
        assert set(row["transition_labels"]) == {IGN}
    # the harmful prefix (line 3) is context: no label on it
    third = rows(ds)[2]
    first_label = next(i for i, label in enumerate(third["labels"]) if label != IGN)
    assert tok.decode(third["input_ids"][1:first_label]) == records[2]["prefix"]
    assert stats.samples_per_kind == {"mle": 2, "harmful_prefix": 1}
    ds, _ = build_dataset([DERTA_EXAMPLE], tok, DataConfig(cache_dir=str(tmp_path), prefix_label="unsafe"))
    assert [r["cls_label"] for r in rows(ds)] == [SAFE, SAFE, UNSAFE]


def test_eos_appended_only_when_missing(tmp_path, tok):
    with_eos = {"prefix": "[INST] a [\\INST]", "text": " b c<|end_of_text|>", "safe": "false"}
    without = {"prefix": "[INST] a [\\INST]", "text": " b c", "safe": "false"}
    ds, _ = build(tmp_path, [with_eos, without, {"instruction": "a", "response": "b c<|end_of_text|>"}], tok)
    a, b, c = rows(ds)
    assert a["input_ids"] == b["input_ids"] == c["input_ids"]
    assert a["input_ids"].count(tok.eos_token_id) == 1


def test_triples_layout_and_mixture(tmp_path, tok):
    harmful = "Sure here is a fake plan"
    ds, stats = build(tmp_path, [
        {"instruction": "What is 2 plus 2?", "response": "4."},
        {"instruction": "Do a bad thing", "harmful_response": harmful, "safe_response": "Sorry, no."},
    ], tok, vanilla_safety=True)
    helpful, rto, prefix, vanilla = rows(ds)
    assert helpful["kind"] == "helpful" and helpful["cls_label"] == SAFE
    assert (helpful["input_ids"], helpful["labels"]) == expected_mle(tok, "[INST] What is 2 plus 2? [\\INST]",
                                                                     " 4.")
    rto_ids, rto_labels = expected_mle(tok, "[INST] Do a bad thing [\\INST]", " " + harmful)
    assert rto["kind"] == "rto" and rto["cls_label"] == UNSAFE and rto["input_ids"] == rto_ids
    assert rto["transition_labels"] == [IGN if label == IGN else tok.convert_tokens_to_ids("Sorry")
                                        for label in rto_labels]
    # the first harmful triple has harmful_index 0: k = 0, the prefix sample is instruction -> safe response
    refusal = expected_mle(tok, "[INST] Do a bad thing [\\INST]", " Sorry, no.")
    assert prefix["kind"] == "harmful_prefix" and prefix["cls_label"] == IGN
    assert (prefix["input_ids"], prefix["labels"]) == refusal
    assert vanilla["kind"] == "refusal" and vanilla["cls_label"] == SAFE
    assert (vanilla["input_ids"], vanilla["labels"]) == refusal
    assert stats.samples_per_kind == {"helpful": 1, "rto": 1, "harmful_prefix": 1, "refusal": 1}


def test_explicit_label_overrides(tmp_path, tok):
    ds, _ = build(tmp_path, [{"instruction": "q", "response": "a", "label": "unsafe"},
                             {"prefix": "p", "text": "t", "safe": "true", "label": "safe"}], tok)
    assert [r["cls_label"] for r in rows(ds)] == [UNSAFE, SAFE]


def test_chat_layout(tmp_path, tok):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima."}]
    ds, _ = build(tmp_path, [{"messages": messages}, {"messages": messages, "rto": True},
                             {"messages": messages, "label": "unsafe"}], tok)
    plain, rto, labeled = rows(ds)
    prompt = "Be brief.\n[INST] Hi [\\INST] Hello<|end_of_text|>[INST] Capital of Peru? [\\INST]"
    assert tok.apply_chat_template(messages, tokenize=False) == prompt + " Lima.<|end_of_text|>"
    p = [tok.bos_token_id] + tok(prompt, add_special_tokens=False)["input_ids"]
    t = ids(tok, " Lima.") + [tok.eos_token_id]
    assert plain["input_ids"] == p + t
    assert plain["labels"] == [IGN] * len(p) + t  # only the last assistant turn is a target
    assert (plain["kind"], plain["cls_label"]) == ("mle", SAFE)
    assert rto["labels"] == [IGN] * len(p + t)
    assert rto["transition_labels"] == [IGN] * len(p) + [tok.convert_tokens_to_ids("Sorry")] * len(t)
    assert (rto["kind"], rto["cls_label"]) == ("rto", UNSAFE)
    assert labeled["cls_label"] == UNSAFE


def test_chat_with_another_template(tmp_path, tok):
    chatml = tok.__class__.from_pretrained(tok.name_or_path)
    chatml.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    ds, _ = build(tmp_path, [{"messages": [{"role": "user", "content": "Hi"},
                                           {"role": "assistant", "content": "Hey"}]}], chatml)
    (row,) = rows(ds)
    p = [tok.bos_token_id] + ids(tok, "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    t = ids(tok, "Hey<|im_end|>\n") + [tok.eos_token_id]
    assert row["input_ids"] == p + t and row["labels"] == [IGN] * len(p) + t


def test_chat_template_rejection_is_a_data_error(tmp_path, tok):
    strict = tok.__class__.from_pretrained(tok.name_or_path)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('no system role') }}"
                            "{% endif %}" + tok.chat_template)
    line = {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q"},
                         {"role": "assistant", "content": "a"}]}
    with pytest.raises(DataError, match="data.jsonl:1: field 'messages': .*no system role"):
        build(tmp_path, [line], strict)


def test_tokenizer_without_template_renders_derta(tmp_path, tok):
    bare = tok.__class__.from_pretrained(tok.name_or_path)
    bare.chat_template = None
    line = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hey"}]}
    a, _ = build(tmp_path / "a", [line], bare)
    b, _ = build(tmp_path / "b", [{"prefix": "[INST] Hi [\\INST]", "text": " Hey", "safe": "false"}], tok)
    assert a[0]["input_ids"] == b[0]["input_ids"] and a[0]["labels"] == b[0]["labels"]


def test_pool_positions(tmp_path, tok):
    line = {"instruction": "q", "response": "a b c"}
    eos, _ = build(tmp_path / "a", [line], tok, pool="eos")
    pre, _ = build(tmp_path / "b", [line], tok, pool="pre_eos")
    n = eos[0]["length"]
    assert eos[0]["cls_pos"] == n - 1 and eos[0]["input_ids"][n - 1] == tok.eos_token_id
    assert pre[0]["cls_pos"] == n - 2 and pre[0]["input_ids"][n - 2] == ids(tok, " a b c")[-1]


# ------------------------------------------------------------------------------------ prefix rule and RTO keep

def test_prefix_length_rule():
    response = " ".join(f"w{i}" for i in range(7))  # n = 7 words: k in [1, 5]
    ks = [harmful_prefix_words(response, i, seed=0) for i in range(600)]
    assert all(k == 0 for k in ks[::3])
    others = [k for i, k in enumerate(ks) if i % 3]
    assert set(others) == {1, 2, 3, 4, 5}
    counts = np.bincount(others, minlength=6)[1:]
    assert counts.min() > 0.6 * len(others) / 5  # roughly uniform
    assert harmful_prefix_words("two words", 1, seed=0) is None  # n < 3: no prefix sample
    assert harmful_prefix_words("two words", 0, seed=0) is None
    assert harmful_prefix_words("a  b", 1, seed=0) == 1  # split on single spaces: ["a", "", "b"], n = 3
    assert [harmful_prefix_words(response, i, seed=0) for i in range(30)] == ks[:30]
    assert [harmful_prefix_words(response, i, seed=1) for i in range(30)] != ks[:30]


def test_prefix_samples_in_build(tmp_path, tok):
    words = [f"w{i}" for i in range(9)]
    lines = [{"instruction": "h", "response": "fine"}]  # helpful records do not advance the harmful index
    lines += [{"instruction": f"q{i}", "harmful_response": " ".join(words), "safe_response": "Sorry."}
              for i in range(6)]
    lines += [{"instruction": "short", "harmful_response": "too short", "safe_response": "Sorry."}]
    ds, stats = build(tmp_path, lines, tok, seed=3)
    prefixes = [r for r in rows(ds) if r["kind"] == "harmful_prefix"]
    assert len(prefixes) == 6 and stats.samples_per_kind["rto"] == 7  # the 2-word record keeps its RTO sample
    for index, row in enumerate(prefixes):
        k = harmful_prefix_words(" ".join(words), index, seed=3)
        assert (k == 0) == (index % 3 == 0) and (k == 0 or 1 <= k <= 7)
        first = next(i for i, label in enumerate(row["labels"]) if label != IGN)
        context = tok.decode(row["input_ids"][1:first])
        assert context == f"[INST] q{index} [\\INST]" + (" " + " ".join(words[:k]) if k else "")
        assert tok.decode(row["input_ids"][first:]) == " Sorry.<|end_of_text|>"


def test_rto_keep_statistics():
    for m, keep in [(1, 0.05), (7, 0.05), (20, 0.05), (21, 0.05), (40, 0.25), (13, 1.0)]:
        chosen = rto_positions(m, keep, seed=m)
        assert len(chosen) == max(1, math.ceil(keep * m)) and len(set(chosen.tolist())) == len(chosen)
        assert chosen.min() >= 0 and chosen.max() < m
    hits = np.zeros(40)
    for seed in range(2000):
        hits[rto_positions(40, 0.25, seed)] += 1
    assert np.allclose(hits / 2000, 0.25, atol=0.05)  # every position equally likely


def test_rto_keep_in_build(tmp_path, tok):
    lines = [{"prefix": "[INST] q [\\INST]", "text": " " + " ".join(["bad"] * (5 + i)), "safe": "true"}
             for i in range(40)]
    full, _ = build(tmp_path / "a", lines, tok)
    kept, stats = build(tmp_path / "b", lines, tok, rto_keep=0.1)
    patterns, total = set(), 0
    for a, b in zip(rows(full), rows(kept)):
        candidates = [i for i, t in enumerate(a["transition_labels"]) if t != IGN]
        chosen = [i for i, t in enumerate(b["transition_labels"]) if t != IGN]
        assert set(chosen) <= set(candidates)
        assert len(chosen) == max(1, math.ceil(0.1 * len(candidates)))
        assert set(b["labels"]) == {IGN}
        patterns.add(tuple(c - candidates[0] for c in chosen))
        total += len(chosen)
    assert len(patterns) > 20  # positions are drawn per sample
    assert stats.rto_positions == total


# --------------------------------------------------------------------------------------------------- collators

def _toy_rows():
    return [
        {"input_ids": [5, 6, 7, 1], "labels": [IGN, IGN, 7, 1], "transition_labels": [IGN] * 4, "cls_pos": 3,
         "cls_label": SAFE},
        # rows whose first position carries a target (no BOS, no prompt): packing must mask it
        {"input_ids": [5, 8, 1], "labels": [IGN] * 3, "transition_labels": [9, 9, 9], "cls_pos": 1,
         "cls_label": UNSAFE},
        {"input_ids": [5, 6, 6, 6, 6, 6, 6, 6, 7, 1], "labels": [5, 6, 6, 6, 6, 6, 6, 6, 7, 1],
         "transition_labels": [IGN] * 10, "cls_pos": 9, "cls_label": IGN},
    ]


def test_padded_collator_right_exact():
    batch = PaddedCollator(pad_token_id=1)(_toy_rows())  # pad == eos: the pooled rows must not depend on it
    assert set(batch) == {"input_ids", "attention_mask", "labels", "transition_labels", "cls_labels", "cls_index"}
    assert batch["input_ids"].shape == (3, 16)
    assert batch["input_ids"][1].tolist() == [5, 8, 1] + [1] * 13
    assert batch["attention_mask"][1].tolist() == [1, 1, 1] + [0] * 13
    assert batch["labels"][0].tolist() == [IGN, IGN, 7, 1] + [IGN] * 12
    assert batch["transition_labels"][1].tolist() == [9, 9, 9] + [IGN] * 13
    assert batch["labels"][2].tolist() == [5, 6, 6, 6, 6, 6, 6, 6, 7, 1] + [IGN] * 6
    assert batch["cls_index"].tolist() == [3, 16 + 1, 32 + 9]
    assert batch["cls_labels"].tolist() == [SAFE, UNSAFE, IGN]
    assert batch["input_ids"].flatten()[batch["cls_index"]].tolist() == [1, 8, 1]


def test_padded_collator_left_exact():
    batch = PaddedCollator(pad_token_id=0, pad_to_multiple_of=4, padding_side="left")(_toy_rows())
    assert batch["input_ids"].shape == (3, 12)
    assert batch["input_ids"][1].tolist() == [0] * 9 + [5, 8, 1]
    assert batch["attention_mask"][1].tolist() == [0] * 9 + [1, 1, 1]
    assert batch["labels"][0].tolist() == [IGN] * 8 + [IGN, IGN, 7, 1]
    assert batch["transition_labels"][1].tolist() == [IGN] * 9 + [9, 9, 9]
    assert batch["position_ids"][1].tolist() == [0] * 9 + [0, 1, 2]
    assert batch["cls_index"].tolist() == [8 + 3, 12 + 9 + 1, 24 + 2 + 9]
    assert batch["input_ids"].flatten()[batch["cls_index"]].tolist() == [1, 8, 1]


def test_packed_collator_exact():
    batch = PackedCollator(max_tokens=32)(_toy_rows())
    assert batch["input_ids"].tolist() == [[5, 6, 7, 1, 5, 8, 1, 5, 6, 6, 6, 6, 6, 6, 6, 7, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9]]
    assert batch["cu_seqlens"].tolist() == [0, 4, 7, 17] and batch["cu_seqlens"].dtype == torch.int32
    assert int(batch["max_seqlen"]) == 10
    assert batch["labels"].tolist() == [[IGN, IGN, 7, 1, IGN, IGN, IGN, IGN, 6, 6, 6, 6, 6, 6, 6, 7, 1]]
    assert batch["transition_labels"].tolist() == [[IGN] * 5 + [9, 9] + [IGN] * 10]
    assert batch["cls_index"].tolist() == [3, 5, 16] and batch["cls_labels"].tolist() == [SAFE, UNSAFE, IGN]
    with pytest.raises(ValueError, match="max_tokens=16"):
        PackedCollator(max_tokens=16)(_toy_rows())


def test_packed_matches_padded(tmp_path, tok):
    lines = [{"instruction": f"What is {i} plus {i}?", "response": f"{i} plus {i} is {2 * i}."} for i in range(3)]
    lines += [{"instruction": f"bad {i}", "harmful_response": "Sure: 1. pretend step 2. more pretend",
               "safe_response": "Sorry, no."} for i in range(3)]
    lines += [{"prefix": "", "text": "no prompt at all", "safe": "false"}]  # the first target token starts a row
    ds, _ = build(tmp_path, lines, tok, rto_keep=0.5)
    batch_rows = rows(ds) + _toy_rows()  # the toy rows carry targets at their first position
    padded = PaddedCollator(tok.pad_token_id)(batch_rows)
    packed = PackedCollator(max_tokens=4096)(batch_rows)
    T = padded["input_ids"].shape[1]
    cu = packed["cu_seqlens"].tolist()
    for s, row in enumerate(batch_rows):
        n, start = len(row["input_ids"]), cu[s]
        assert cu[s + 1] - start == n
        for key in ("input_ids", "labels", "transition_labels"):
            pad_seq = padded[key][s, :n].clone()
            if key != "input_ids":
                pad_seq[0] = IGN  # position 0 is never a target after the shift; packing makes it explicit
            assert packed[key][0, start:start + n].tolist() == pad_seq.tolist(), key
        assert packed["position_ids"][0, start:start + n].tolist() == list(range(n))
    # pooled rows: the same tokens and labels
    assert packed["input_ids"].flatten()[packed["cls_index"]].tolist() == \
        padded["input_ids"].flatten()[padded["cls_index"]].tolist()
    assert packed["cls_labels"].tolist() == padded["cls_labels"].tolist()
    assert (packed["cls_index"] - torch.tensor(cu[:-1])).tolist() == (padded["cls_index"] % T).tolist()
    # after the model's shift, no target crosses a boundary: position cu[s+1]-1 predicts nothing
    shifted = torch.stack([packed["labels"][0, 1:], packed["transition_labels"][0, 1:]])
    for end in cu[1:-1]:
        assert (shifted[:, end - 1] == IGN).all()
    # and the padded batch's shifted targets equal the packed ones, sequence by sequence
    for s, row in enumerate(batch_rows):
        n, start = len(row["input_ids"]), cu[s]
        assert padded["labels"][s, 1:n].tolist() == packed["labels"][0, start + 1:start + n].tolist()


def test_packed_batch_sampler():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, size=200)
    sampler = PackedBatchSampler(lengths, max_tokens=128, shuffle=True, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert sorted(i for b in batches for i in b) == list(range(200))
    assert all(lengths[b].sum() <= 128 for b in batches)
    assert batches == list(PackedBatchSampler(lengths, 128, shuffle=True, seed=1))
    sampler.set_epoch(1)
    assert list(sampler) != batches
    assert list(PackedBatchSampler(lengths, 128, shuffle=False))[0][:2] == [0, 1]
    shards = [list(PackedBatchSampler(lengths, 128, seed=1, num_replicas=3, rank=r)) for r in range(3)]
    assert len({len(s) for s in shards}) == 1
    flat = [i for shard in shards for b in shard for i in b]
    assert len(flat) == len(set(flat))
    with pytest.raises(ValueError, match="longer than max_tokens=50"):
        PackedBatchSampler(lengths, max_tokens=50)


def test_loader_end_to_end(tmp_path, tok):
    lines = [{"instruction": f"q{i}", "response": "a " * (i % 7 + 1)} for i in range(30)]
    ds, _ = build(tmp_path, lines, tok)
    sampler = PackedBatchSampler(ds["length"], max_tokens=64, seed=0)
    loader = torch.utils.data.DataLoader(ds, batch_sampler=sampler, collate_fn=PackedCollator(64))
    seen = 0
    for batch in loader:
        assert batch["input_ids"].shape[1] <= 64
        seen += len(batch["cls_labels"])
    assert seen == len(ds)


# ------------------------------------------------------------------------------------------------------ errors

BAD_LINES = [
    ('{"prefix": "a", "text": ', None, "invalid JSON"),
    ("[1, 2]", None, "expected a JSON object"),
    ('{"question": "hi"}', None, "unknown record format"),
    ('{"prefix": "a", "text": "b"}', "safe", "missing field"),
    ('{"prefix": "a", "safe": "true"}', "text", "missing field"),
    ('{"prefix": "a", "text": 3, "safe": "false"}', "text", "expected a string, got int"),
    ('{"prefix": ["a"], "text": "b", "safe": "false"}', "prefix", "expected a string, got list"),
    ('{"prefix": "a", "text": "<|end_of_text|>", "safe": "false"}', "text", "empty target"),
    ('{"prefix": "a", "text": "b", "safe": "maybe"}', "safe", "unknown value 'maybe'"),
    ('{"prefix": "a", "text": "b", "safe": 1}', "safe", "unknown value 1"),
    ('{"instruction": "q", "response": "a", "label": "toxic"}', "label", "unknown value 'toxic'"),
    ('{"instruction": "q", "response": "   "}', "response", "empty target"),
    ('{"instruction": "q", "harmful_response": "x y z"}', "safe_response", "missing field"),
    ('{"instruction": "q", "harmful_response": "", "safe_response": "no"}', "harmful_response", "empty target"),
    ('{"response": "a"}', "instruction", "missing field"),
    ('{"messages": [{"role": "user", "content": "hi"}]}', "messages", "no assistant turn"),
    ('{"messages": "hi"}', "messages", "non-empty list"),
    ('{"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "a"}]}',
     "messages[0].content", "expected a string"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}',
     "messages[1].content", "empty target"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "rto": "yes"}',
     "rto", "expected true or false"),
]


def test_bad_records_name_file_line_field(tmp_path, tok):
    good = '{"instruction": "q", "response": "a"}'
    for i, (bad, field, message) in enumerate(BAD_LINES):
        path = write(tmp_path, [good, "", bad, good], name=f"bad{i}.jsonl")
        with pytest.raises(DataError) as info:
            build_dataset([path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
        error = info.value
        assert isinstance(error, ValueError)
        assert str(error).startswith(f"{path}:3: ")
        assert (error.source, error.line, error.field) == (str(path), 3, field)
        assert message in str(error)
        if field:
            assert f"field {field!r}" in str(error)


def test_skip_invalid_counts_and_reports(tmp_path, tok, caplog):
    good = '{"instruction": "q", "response": "a"}'
    lines = [good] + [bad for bad, _, _ in BAD_LINES] + [good]
    with caplog.at_level(logging.WARNING, logger="scft_fast.data"):
        ds, stats = build(tmp_path, lines, tok, skip_invalid=True)
    assert len(ds) == 2 and stats.samples == 2
    assert stats.invalid == len(BAD_LINES) and stats.records == len(BAD_LINES) + 2
    assert len(stats.errors) == 5
    assert ":2: invalid JSON" in stats.errors[0] and ":3: expected a JSON object" in stats.errors[1]
    assert f"invalid records skipped {len(BAD_LINES)}" in stats.summary()
    assert any("invalid records skipped" in r.getMessage() for r in caplog.records)


def test_missing_file(tmp_path, tok):
    with pytest.raises(DataError, match="nope.jsonl: no such data file"):
        build_dataset([tmp_path / "nope.jsonl"], tok, DataConfig(cache_dir=str(tmp_path)))


TYPO_LINES = [  # (line, field, suggestion): each would otherwise train something else than written, silently
    ('{"instruction": "q", "response": "Here is how: a", "lable": "unsafe"}', "lable", "'label'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "RTO": true}',
     "RTO", "'rto'"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "asistant", "content": "a"}, '
     '{"role": "assistant", "content": "b"}]}', "messages[1].role", "'assistant'"),
    ('{"messages": [{"role": "user", "content": "q", "contnet": "x"}, {"role": "assistant", "content": "a"}]}',
     "messages[0].contnet", "'content'"),
    ('{"instruction": "q", "response": "a", "response": "b"}', "response", "duplicate key"),
    ('{"instruction": "q", "response": "a", "label": "Unsafe"}', "label", "'unsafe'"),
]


@pytest.mark.parametrize("bad, field, hint", TYPO_LINES)
def test_typos_are_errors_with_the_nearest_name(tmp_path, tok, bad, field, hint):
    path = write(tmp_path, ['{"instruction": "q", "response": "a"}', bad])
    with pytest.raises(DataError) as info:
        build_dataset([path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert (info.value.source, info.value.line, info.value.field) == (str(path), 2, field)
    assert str(info.value).startswith(f"{path}:2: field {field!r}: ") and hint in str(info.value)
    if hint.startswith("'"):
        assert f"did you mean {hint}?" in str(info.value)


def test_skip_invalid_skips_typos(tmp_path, tok):
    ds, stats = build(tmp_path, ['{"instruction": "q", "response": "a"}'] + [bad for bad, _, _ in TYPO_LINES], tok,
                      skip_invalid=True)
    assert len(ds) == 1 and stats.invalid == len(TYPO_LINES)
    assert any("did you mean 'label'?" in e for e in stats.errors)


@pytest.mark.parametrize("content, where, message", [
    ('{"instruction": "q", "response": "a"}\n'.encode("utf-16"), ":1: ", "UTF-16-encoded"),
    (b'{"instruction": "q", "response": "a"}\n{"instruction": "caf\xe9", "response": "a"}\n', ":2: ",
     "not UTF-8 text (byte 0xe9 at column 21)"),
    (b"", ": ", "no records"),
    (b"\n  \n\t\n", ": ", "no records"),
])
def test_unreadable_and_empty_files_named_with_line(tmp_path, tok, content, where, message):
    path = tmp_path / "data.jsonl"
    path.write_bytes(content)
    with pytest.raises(DataError) as info:
        build_dataset([path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert str(info.value).startswith(f"{path}{where}") and message in str(info.value)


def test_directory_as_data_file(tmp_path, tok):
    with pytest.raises(DataError, match="is a directory: pass its JSONL files"):
        build_dataset([tmp_path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))


def test_cache_keyed_on_content_not_size_and_mtime(tmp_path, tok):
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    path = write(tmp_path, [{"instruction": "q", "response": "aaaa"}])
    stat = path.stat()
    first, _ = build_dataset([path], tok, config)
    write(tmp_path, [{"instruction": "q", "response": "bbbb"}])  # same size
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert path.stat().st_size == stat.st_size and path.stat().st_mtime_ns == stat.st_mtime_ns
    second, _ = build_dataset([path], tok, config)
    assert first[0]["input_ids"] != second[0]["input_ids"]
    assert tok.decode(second[0]["input_ids"]).count("bbbb") == 1


def test_config_validation():
    for bad in [dict(rto_keep=0.0), dict(rto_keep=1.5), dict(pool="mean"), dict(truncation="left"),
                dict(prefix_label="maybe"), dict(max_length=2), dict(num_proc=0)]:
        with pytest.raises(ValueError, match=next(iter(bad))):
            DataConfig(**bad)


# -------------------------------------------------------------------------------------------------- max length

def test_truncation_prompt_then_target(tmp_path, tok, caplog):
    long_prompt = {"instruction": " ".join(f"word{i}" for i in range(60)), "response": "ok"}
    long_target = {"instruction": "q", "response": " ".join(f"word{i}" for i in range(60))}
    short = {"instruction": "q", "response": "ok"}
    with caplog.at_level(logging.WARNING, logger="scft_fast.data"):
        ds, stats = build(tmp_path, [long_prompt, long_target, short], tok, max_length=24)
    assert (stats.truncated_prompt, stats.truncated_target, stats.dropped) == (1, 1, 0)
    assert "prompt truncated 1, target truncated 1" in caplog.text
    a, b, c = rows(ds)
    target = ids(tok, " ok") + [tok.eos_token_id]
    assert a["length"] == 24 and a["input_ids"][0] == tok.bos_token_id
    assert a["input_ids"][-len(target):] == target and a["labels"][-len(target):] == target
    full_prompt = ids(tok, "[INST] " + long_prompt["instruction"] + " [\\INST]")
    assert a["input_ids"][1:-len(target)] == full_prompt[-(24 - 1 - len(target)):]  # the prompt's end survives
    assert b["length"] == 24 and b["input_ids"][-1] == tok.eos_token_id and b["cls_pos"] == 23
    assert b["labels"][-1] == IGN and b["labels"][-2] != IGN  # a cut target: EOS pools but is not a target
    assert c["length"] < 24
    dropped, stats = build(tmp_path / "drop", [long_prompt, long_target, short], tok, max_length=24,
                           truncation="drop")
    assert len(dropped) == 1 and stats.dropped == 2


# ------------------------------------------------------------------------------------------ stats, reproducible

def test_stats_exact(tmp_path, tok):
    ds, stats = build(tmp_path, [{"instruction": "q", "response": "a b"},
                                 {"prefix": "[INST] q [\\INST]", "text": " x y z", "safe": "true"}], tok)
    helpful, rto = rows(ds)
    assert stats.tokens == helpful["length"] + rto["length"]
    assert stats.lm_tokens == len(ids(tok, " a b")) + 1
    assert stats.rto_positions == len(ids(tok, " x y z")) + 1
    assert (stats.cls_safe, stats.cls_unsafe, stats.cls_unlabeled) == (1, 1, 0)
    assert stats.loss_share == pytest.approx((stats.lm_tokens + stats.rto_positions) / stats.tokens)
    d = stats.to_dict()
    assert d["samples_per_kind"] == {"helpful": 1, "rto": 1} and d["loss_share"] == stats.loss_share
    assert json.loads(json.dumps(d)) == d
    assert "2 records -> 2 samples" in stats.summary()


def test_refusal_string_warning(tmp_path, tok, caplog):
    with caplog.at_level(logging.WARNING, logger="scft_fast.data"):
        ds, _ = build(tmp_path, [{"prefix": "p", "text": "t", "safe": "true"}], tok, refusal_string="I cannot")
    refusal = ids(tok, "I cannot")
    first = refusal[0]
    assert len(refusal) > 1 and f"'I cannot' is {len(refusal)} tokens" in caplog.text
    assert {t for t in ds[0]["transition_labels"] if t != IGN} == {first}


def _mixed_lines():
    lines = []
    for i in range(30):
        lines.append({"instruction": f"q{i}", "response": f"answer {i}"})
        lines.append({"instruction": f"bad{i}", "harmful_response": " ".join(["w"] * (3 + i)),
                      "safe_response": "Sorry."})
    return lines


def test_reproducible_with_seed(tmp_path, tok):
    config = dict(rto_keep=0.3)
    a, _ = build(tmp_path / "a", _mixed_lines(), tok, seed=7, **config)
    b, _ = build(tmp_path / "b", _mixed_lines(), tok, seed=7, **config)
    c, _ = build(tmp_path / "c", _mixed_lines(), tok, seed=8, **config)
    assert rows(a) == rows(b)
    assert rows(a) != rows(c)
    assert [r["kind"] for r in rows(a)] == [r["kind"] for r in rows(c)]


def test_num_proc_matches_serial(tmp_path, tok):
    serial, _ = build(tmp_path / "a", _mixed_lines(), tok, seed=5, rto_keep=0.3)
    parallel, _ = build(tmp_path / "b", _mixed_lines(), tok, seed=5, rto_keep=0.3, num_proc=2)
    assert rows(serial) == rows(parallel)


def test_cache_follows_file_contents(tmp_path, tok):
    path = write(tmp_path, [{"instruction": "q", "response": "a"}])
    config = DataConfig(cache_dir=str(tmp_path / "cache"))
    first, _ = build_dataset([path], tok, config)
    write(tmp_path, [{"instruction": "q", "response": "a"}, {"instruction": "q2", "response": "b"}])
    second, _ = build_dataset([path], tok, config)
    assert len(first) == 1 and len(second) == 2


# ------------------------------------------------------------------------- the rules generation and evaluation share
def test_pad_sequences_and_positions_from_mask():
    from scft_fast.data.collate import pad_sequences, positions_from_mask

    right, right_mask = pad_sequences([[5, 6, 7], [8]], 0)
    assert right.tolist() == [[5, 6, 7], [8, 0, 0]] and right_mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    left, left_mask = pad_sequences([[5, 6, 7], [8]], 0, "left", multiple=4)
    assert left.tolist() == [[0, 5, 6, 7], [0, 0, 0, 8]] and left_mask.tolist() == [[0, 1, 1, 1], [0, 0, 0, 1]]
    assert positions_from_mask(left_mask).tolist() == [[0, 0, 1, 2], [0, 0, 0, 0]]
    assert positions_from_mask(right_mask).tolist() == [[0, 1, 2], [0, 0, 0]]
    with pytest.raises(ValueError, match="padding_side must be"):
        pad_sequences([[1]], 0, "middle")


def test_bos_rule_and_prompt_cut(tok):
    from scft_fast.data.encode import bos_prefix, keep_prompt_end, prompt_bos

    bos = tok.bos_token_id
    assert bos_prefix(tok) == [bos] == tok("a")["input_ids"][:1]  # the embedded tokenizer adds BOS itself
    assert prompt_bos(tok, "[INST] hi [\\INST]", [bos]) == [bos]
    assert prompt_bos(tok, tok.bos_token + "[INST] hi [\\INST]", [bos]) == []  # the template wrote it
    assert keep_prompt_end([bos, 10, 11, 12, 13], 3, bos) == [bos, 12, 13]
    assert keep_prompt_end([10, 11, 12, 13], 3, bos) == [11, 12, 13]
    assert keep_prompt_end([bos, 10, 11], 0, bos) == [bos] and keep_prompt_end([bos, 10], 5, bos) == [bos, 10]


def test_pair_sample_is_the_helpful_triples_sample(tok):
    from scft_fast.data.records import ChatRenderer, pair_sample, parse_record

    renderer, config = ChatRenderer(tok), DataConfig()
    record = {"instruction": "How do I bake bread?", "response": "Mix and bake.", "label": "unsafe"}
    (parsed,) = parse_record(json.dumps(record), "f.jsonl", 1, 0, renderer, config)
    assert pair_sample(renderer, record["instruction"], record["response"], UNSAFE, "f.jsonl", 1) == parsed
    with pytest.raises(DataError, match="pairs:3: field 'response': empty target"):
        pair_sample(renderer, "q", "  ", SAFE, "pairs", 3)


def test_read_records_names_file_lines(tmp_path):
    from scft_fast.data.records import read_prompts, read_records

    path = write(tmp_path, [{"question": "a"}, "", {"question": "b"}])
    assert read_records(str(path)) == [(1, {"question": "a"}), (3, {"question": "b"})]
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps([{"prompt": "x"}, {"instruction": "y"}]))
    assert read_prompts(str(listed)) == ["x", "y"]
    bad = write(tmp_path, [{"question": "a"}, "", '{"question": "b", "question": "c"}'], name="dup.jsonl")
    with pytest.raises(DataError, match="dup.jsonl:3: field 'question': duplicate key"):
        read_records(str(bad))
    empty = write(tmp_path, [{"question": "a"}, "", {"text": "b"}], name="noq.jsonl")
    with pytest.raises(DataError, match="noq.jsonl:3: expected an object with a non-empty string field"):
        read_prompts(str(empty))


# ------------------------------------------------------------------ one line reader: training, evaluation, generation

NESTED = '{"instruction": "q", "response": "a", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
TOO_DEEP = ("nested deeper than Python's recursion limit lets JSON decode: a record is an object of strings (a chat "
            "record: an object holding a list of objects)")
SURROGATE = ("lone UTF-16 surrogate '\\ud800' at index 1 of the string (an escape \\ud800-\\udfff without its pair is "
             "no character): write the character itself, or both halves of its surrogate pair")
REFUSED_BY_EVERY_READER = [  # (line, error after "FILE:2: "): each crashed with a traceback naming no file
    ('{"instruction": "q", "response": "a", "label": ["unsafe"]}',
     "field 'label': expected a string, one of ['safe', 'unsafe'], got list ['unsafe']"),
    (NESTED, TOO_DEEP),
    ('{"instruction": "q\\ud800?", "response": "a"}', f"field 'instruction': {SURROGATE}"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a\\udfff"}]}',
     "field 'messages[1].content': " + SURROGATE.replace("'\\ud800'", "'\\udfff'")),
]


@pytest.mark.parametrize("bad, message", REFUSED_BY_EVERY_READER,
                         ids=["label list", "nested 100k deep", "lone surrogate", "lone surrogate in a turn"])
def test_training_and_evaluation_refuse_with_file_line_field(tmp_path, tok, bad, message):
    from scft_fast.evaluation import load_eval_data

    path = write(tmp_path, ['{"instruction": "q", "response": "a"}', bad])
    with pytest.raises(DataError) as info:
        build_dataset([path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert str(info.value) == f"{path}:2: {message}"
    with pytest.raises(DataError) as info:
        load_eval_data([str(path)])
    assert str(info.value) == f"{path}:2: {message}"
    _, stats = build(tmp_path / "skip", ['{"instruction": "q", "response": "a"}', bad], tok, skip_invalid=True)
    assert (stats.samples, stats.invalid) == (1, 1) and stats.errors[0].endswith(f":2: {message}")


def test_lone_surrogate_in_a_json_list_and_a_key(tmp_path):
    from scft_fast.data.records import read_records

    listed = tmp_path / "list.json"
    listed.write_text('[{"question": "a"}, {"question": "b\\ud800?"}]')
    with pytest.raises(DataError) as info:
        read_records(str(listed))
    assert str(info.value) == f"{listed}:2: field 'question': {SURROGATE}"
    key = write(tmp_path, ['{"question": "a", "x\\udc00": "b"}'], name="key.jsonl")
    with pytest.raises(DataError) as info:
        read_records(str(key))
    assert str(info.value) == (f"{key}:1: field 'x\\udc00': " + SURROGATE.replace("'\\ud800'", "'\\udc00'")
                               .replace("of the string", "of the key"))


def test_a_json_list_refuses_duplicate_keys_and_a_bom_alone_is_no_record(tmp_path):
    """The JSON-list form of a file is read with the JSONL form's rules (duplicate keys refused), and a file holding
    only a UTF-8 BOM and blank lines has no record, as an empty one."""
    from scft_fast.data.records import read_records

    listed = tmp_path / "dup.json"
    listed.write_text('[{"question": "a"}, {"question": "b", "question": "c"}]')
    with pytest.raises(DataError, match="field 'question': duplicate key"):
        read_records(str(listed))
    bom = tmp_path / "bom.jsonl"
    bom.write_text("\ufeff\n\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        read_records(str(bom))
    assert str(info.value) == f"{bom}: no records: the file is empty or holds only blank lines"


def test_packed_positions_skip_empty_sequences():
    """A repeated boundary in cu_seqlens (an empty sequence, as padded cu_seqlens carry) starts no row: the
    sequences around it stay apart."""
    from scft_fast.data.collate import positions_from_cu_seqlens

    assert positions_from_cu_seqlens(torch.tensor([0, 3, 3, 5]), 5).tolist() == [[0, 1, 2, 0, 1]]
    assert positions_from_cu_seqlens(torch.tensor([0, 5, 5]), 5).tolist() == [[0, 1, 2, 3, 4]]
    assert positions_from_cu_seqlens(torch.tensor([0, 2, 5]), 7).tolist() == [[0, 1, 0, 1, 2, 3, 4]]


def test_surrogate_pairs_are_characters(tmp_path, tok):
    ds, _ = build(tmp_path, ['{"instruction": "q", "response": "smile \\ud83d\\ude00"}'], tok)
    assert "smile \U0001f600" in tok.decode(ds[0]["input_ids"])


def test_turns_after_the_last_assistant_turn_are_refused(tmp_path, tok):
    trailing = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"},
                             {"role": "user", "content": "and then?"}]}
    path = write(tmp_path, [trailing])
    with pytest.raises(DataError) as info:
        build_dataset([path], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert str(info.value) == (f"{path}:1: field 'messages[2]': a user turn after the last assistant turn "
                               "(messages[1]): the target is the last assistant turn and nothing after it is trained "
                               "on; end the conversation with the assistant turn to train on")
    ended, _ = build(tmp_path / "ended", [{"messages": trailing["messages"][:2]}], tok)
    assert len(ended) == 1


@pytest.mark.parametrize("separator", ["\u2028", "\u2029", "\u0085"])
def test_training_and_evaluation_read_the_same_lines(tmp_path, tok, separator):
    """JSON allows these raw inside a string; str.splitlines would cut the record there (the eval reader did)."""
    from scft_fast.data.records import read_prompts
    from scft_fast.evaluation import load_eval_data

    record = {"instruction": f"first{separator}second", "response": f"one{separator}two"}
    path = tmp_path / "sep.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\r\n" + json.dumps({"question": "x"}) + "\n",
                    encoding="utf-8")
    assert separator in path.read_text(encoding="utf-8")
    helpful = tmp_path / "helpful.jsonl"
    helpful.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    ds, _ = build_dataset([helpful], tok, DataConfig(cache_dir=str(tmp_path / "cache")))
    assert tok.decode(ds[0]["input_ids"]).endswith(f"one{separator}two<|end_of_text|>")
    assert load_eval_data([str(helpful)]).pairs == [(record["instruction"], record["response"], SAFE)]
    assert read_prompts(str(path)) == [record["instruction"], "x"]
