"""benchmarks/head_swaps.py on a small random SCFT model: every swap group is scored with the evaluation's own
scoring, on the pairs it says it builds (a few seconds on 2 cores)."""
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import head_swaps  # noqa: E402
from scft_fast import SCFTConfig, SCFTForCausalLM  # noqa: E402
from scft_fast.data import load_default_tokenizer  # noqa: E402
from scft_fast.evaluation import EvalConfig, load_for_eval, score_pairs  # noqa: E402
from scft_fast.hf.presets import random_causal_lm  # noqa: E402
from scft_fast.metrics import auroc  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_swap_groups_are_the_pairs_they_name(tmp_path, embedded_train_head):
    tokenizer = load_default_tokenizer()
    base = random_causal_lm("llama", tokenizer, seed=0, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024)
    model = SCFTForCausalLM.from_causal_lm(base, SCFTConfig())
    with torch.no_grad():
        model.score.weight.normal_(0.0, 1.0)  # a head whose scores differ from pair to pair
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    same, separate = embedded_train_head(8, balanced=True), embedded_train_head(6, balanced=True)
    out = tmp_path / "swaps.json"
    assert head_swaps.main(["--model", str(tmp_path / "model"), "--data", same, separate, "--output", str(out)]) == 0

    result = json.loads(out.read_text())
    report = result["report"]
    harmful, benign = head_swaps._read(same)
    groups = report["splits"]["same"]
    assert groups["harmful + fake"]["n"] == len(harmful) and groups["benign + answer"]["n"] == len(benign)
    assert groups["benign + fake"]["n"] == len(benign) and groups["harmful + benign answer"]["n"] == len(harmful)
    assert report["cross"]["separate harmful + same fake"]["n"] == len(head_swaps._read(separate)[0])

    # The labeled groups scored again here with the evaluation's scoring give the file's medians and AUROC.
    loaded, tok, _ = load_for_eval(str(tmp_path / "model"), "cpu", "float32")
    config = EvalConfig(progress=False, batch_size=32)
    unsafe = score_pairs(loaded, tok, [(r["instruction"], r["harmful_response"], 1) for r in harmful], config)
    refusal = score_pairs(loaded, tok, [(r["instruction"], r["safe_response"], 0) for r in harmful], config)
    assert groups["harmful + fake"]["median_p_unsafe"] == pytest.approx(float(np.median(unsafe)), rel=1e-6)
    expected = auroc(np.r_[unsafe, refusal], np.r_[np.ones(len(unsafe)), np.zeros(len(refusal))])
    assert groups["auroc"]["fake vs refusal"] == pytest.approx(expected, abs=1e-12)
    assert result["commit"] and result["command"].startswith("python benchmarks/head_swaps.py")
