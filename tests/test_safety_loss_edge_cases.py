"""Edge cases that must just work, and bad input that must fail early with a clear message."""
import re
import sys

import pytest
import torch

from helpers import available_backends, check, device_for, make_inputs, run_both
from scft_fast import IGNORE_INDEX, safety_loss
from scft_fast.ops import chunked
from scft_fast.ops.reference import safety_loss_ref

AVAILABLE_BACKENDS = available_backends()


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_every_row_ignored_gives_zero_loss_and_zero_gradients(backend):
    inputs = make_inputs(20, 16, 32, 1000, head=False, device=device_for(backend))
    inputs["labels"][:] = IGNORE_INDEX
    inputs["transition_labels"][:] = IGNORE_INDEX
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["lm_weight"].clone().requires_grad_()
    out = safety_loss(h, w, inputs["labels"], transition_labels=inputs["transition_labels"], backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.lm_loss.item() == 0.0 and int(out.n_lm) == 0
    assert torch.equal(h.grad, torch.zeros_like(h)) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_empty_batch(backend):
    device = device_for(backend)
    h = torch.randn(0, 32, device=device, requires_grad=True)
    w = torch.randn(1000, 32, device=device, requires_grad=True)
    cw = torch.randn(2, 32, device=device, requires_grad=True)
    empty = torch.zeros(0, dtype=torch.long, device=device)
    out = safety_loss(h, w, empty, cls_weight=cw, cls_index=empty, cls_labels=empty, backend=backend)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.cls_logits.shape == (0, 2)
    assert h.grad.shape == (0, 32) and torch.equal(w.grad, torch.zeros_like(w))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_no_pooled_rows(backend):
    inputs = make_inputs(21, 24, 32, 1000, s=0, device=device_for(backend))
    out, grads, ref, ref_grads = run_both(inputs, backend)
    check(out, grads, ref, ref_grads)
    assert out.cls_loss.item() == 0.0 and out.cls_logits.shape == (0, 2)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_duplicate_pooled_rows_add_their_gradients(backend):
    inputs = make_inputs(22, 24, 32, 1000, s=4, device=device_for(backend))
    inputs["cls_index"] = torch.tensor([5, 5, 9, 5], device=device_for(backend))
    inputs["cls_labels"] = torch.tensor([0, 1, 1, 0], device=device_for(backend))
    check(*run_both(inputs, backend))


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_all_pooled_rows_unlabeled(backend):
    inputs = make_inputs(23, 24, 32, 1000, s=3, device=device_for(backend))
    inputs["cls_labels"][:] = IGNORE_INDEX
    out, grads, ref, ref_grads = run_both(inputs, backend)
    check(out, grads, ref, ref_grads)
    assert out.cls_loss.item() == 0.0 and int(out.n_cls) == 0
    assert torch.equal(grads["cls_weight"], torch.zeros_like(grads["cls_weight"]))


def test_rows_without_a_target_never_reach_the_vocabulary(monkeypatch):
    """The chunk loop is handed exactly the rows with an LM or a transition target."""
    seen = []
    real = chunked.chunked_token_loss

    def spy(hidden, weight, bias, labels, transition_labels, rows, *args, **kwargs):
        seen.append(rows.clone() if rows is not None else None)
        return real(hidden, weight, bias, labels, transition_labels, rows, *args, **kwargs)

    monkeypatch.setattr(sys.modules["scft_fast.ops.safety_loss"], "chunked_token_loss", spy)
    inputs = make_inputs(24, 40, 32, 1000, device="cpu")
    safety_loss(**inputs, backend="torch")
    has_target = (inputs["labels"] != IGNORE_INDEX) | (inputs["transition_labels"] != IGNORE_INDEX)
    assert 0 < int(has_target.sum()) < 40
    assert torch.equal(seen[0], torch.nonzero(has_target).squeeze(1))


def test_automatic_chunk_size_is_bounded():
    cpu = torch.device("cpu")
    rows = chunked.default_chunk_size(8192, 256, 131072, torch.float32, cpu)
    assert rows * 131072 * 4 <= 256 << 20
    assert chunked.default_chunk_size(10, 4096, 128256, torch.bfloat16, cpu) == 10
    assert chunked.default_chunk_size(8192, 4096, 128256, torch.bfloat16, torch.device("cuda")) >= 256


@pytest.mark.parametrize("hidden_size,vocab,dtype", [(4096, 128256, torch.bfloat16), (8192, 128256, torch.bfloat16),
                                                      (4096, 32000, torch.float32), (2048, 256000, torch.bfloat16)])
def test_automatic_chunks_stay_at_or_above_the_minimum_on_gpu(hidden_size, vocab, dtype):
    """Issue 23: the rule once split 5462 visited rows (N = 8192, a third ignored) into 3 chunks of 1821 on CUDA,
    below its 2048-row minimum. Every visited count gives equal chunks of at least 2048 rows (or one chunk, when
    fewer rows are visited) within the byte budget; only where no split meets both (at V = 256000 the budget holds
    2097 rows, so 2110 rows can only go as two chunks) does the budget win."""
    cuda = torch.device("cuda")
    fewest, budget = chunked._MIN_CHUNK_ROWS["cuda"], chunked._MAX_CHUNK_BYTES["cuda"]
    itemsize = torch.empty((), dtype=dtype).element_size()
    most = budget // (vocab * itemsize)
    assert chunked.default_chunk_size(5462, 4096, 128256, torch.bfloat16, cuda) == 2731
    for rows in [*range(1, 20000, 37), 5461, 5462, 8192, 6143, 6144, 65536]:
        chunk = chunked.default_chunk_size(rows, hidden_size, vocab, dtype, cuda)
        assert chunk <= most, (rows, chunk)
        budget_forces_smaller = rows > most and -(-rows // most) > rows // fewest
        assert chunk >= min(rows, fewest) or budget_forces_smaller, (rows, chunk)
        assert not budget_forces_smaller or vocab == 256000, (rows, chunk)
        chunks = -(-rows // chunk)
        assert chunks * chunk - rows < chunks, (rows, chunk)  # equal chunks: the last one at most one row short


def test_automatic_chunks_stay_at_or_above_the_minimum_on_cpu():
    cpu = torch.device("cpu")
    fewest = chunked._DEFAULT_MIN_CHUNK_ROWS
    for rows in range(1, 5000, 7):
        chunk = chunked.default_chunk_size(rows, 512, 32000, torch.float32, cpu)
        assert chunk >= min(rows, fewest), (rows, chunk)
    # The round-to-nearest split is kept where it breaks no minimum: 518 rows at 256 go as 259 + 259.
    assert chunked.default_chunk_size(518, 64, 32000, torch.float32, cpu) == 259


def test_explicit_chunk_size_gives_the_same_result():
    inputs = make_inputs(25, 50, 32, 1000)
    base = safety_loss(**inputs, backend="torch").loss
    for chunk_size in (1, 3, 16, 1000):
        torch.testing.assert_close(safety_loss(**inputs, backend="torch", chunk_size=chunk_size).loss, base,
                                   rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_nan_in_an_unlabeled_pooled_row_stays_out_of_the_loss(backend):
    """Issue 21: harmful-prefix samples are pooled but unlabeled; a NaN hidden state there once made the loss NaN
    (NaN x 0 in the head). The row has no token target either, so it takes no part in any term."""
    inputs = make_inputs(26, 24, 32, 1000, s=4, cls_bias=True, device=device_for(backend))
    inputs["cls_index"] = torch.tensor([3, 9, 15, 23], device=device_for(backend))
    inputs["cls_labels"] = torch.tensor([0, IGNORE_INDEX, 1, 0], device=device_for(backend))
    inputs["labels"][9] = IGNORE_INDEX
    inputs["transition_labels"][9] = IGNORE_INDEX
    inputs["hidden"][9, 5] = float("nan")
    out, grads, ref, ref_grads = run_both(inputs, backend)
    assert torch.isfinite(out.loss) and all(torch.isfinite(g).all() for g in grads.values())
    ref_logits = ref.pop("cls_logits")  # NaN in row 1, as the op reports it: compared apart
    check(out, grads, dict(ref, cls_logits=None), ref_grads)
    assert out.cls_logits[1].isnan().all()
    torch.testing.assert_close(out.cls_logits[[0, 2, 3]].double().cpu(), ref_logits[[0, 2, 3]], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_num_cls_zero_behaves_like_num_items_zero(backend):
    """Issue 21: num_cls=0 once gave a finite 3e28 (a clamp at 1e-30) where num_items=0 gives 0."""
    inputs = make_inputs(27, 24, 32, 1000, device=device_for(backend))
    out, grads, ref, ref_grads = run_both(inputs, backend, num_cls=0)
    check(out, grads, ref, ref_grads)
    token_only = {k: v for k, v in inputs.items() if not k.startswith("cls_")}
    torch.testing.assert_close(out.loss, safety_loss(**token_only, backend=backend).loss)
    assert torch.equal(grads["cls_weight"], torch.zeros_like(grads["cls_weight"]))
    both_zero = safety_loss(**inputs, backend=backend, num_items=torch.tensor(0), num_cls=torch.tensor(0.0))
    assert both_zero.loss.item() == 0.0


@pytest.mark.parametrize("backend", AVAILABLE_BACKENDS)
def test_a_tiny_normalizer_is_not_clamped(backend):
    """Issue 21: a normalizer below 1e-30 was clamped to it. 1e-35 (a normal float32) now divides exactly; the
    float64 reference agrees."""
    inputs = make_inputs(28, 24, 32, 1000, device=device_for(backend))
    check(*run_both(inputs, backend, num_items=1e-35, num_cls=3e-36))


@pytest.mark.parametrize("name", ["num_items", "num_cls"])
@pytest.mark.parametrize("value,shown", [(1e-40, "1e-40"), (1e39, "1e+39"), (10**40, "1" + "0" * 40),
                                         (torch.tensor(1e39, dtype=torch.float64), "a tensor holding 1e+39"),
                                         (torch.tensor(1e-40, dtype=torch.float64), "a tensor holding 1e-40")])
def test_a_normalizer_out_of_float32_range_is_named(name, value, shown):
    """Issue 21: 1e39 once failed in a float32 fill with a message that did not name it, 1e-40 was mis-scaled.
    Neither has a float32 loss to give (1 / 1e-40 overflows): an error names the argument and the value."""
    with pytest.raises(ValueError, match=rf"{name} must be 0 or a normal float32 number in \[1\.175e-38, "
                                         rf"3\.403e\+38\].*got {re.escape(shown)}$"):
        safety_loss(**bad(**{name: value}))


def test_counts_are_exact_past_two_to_the_24_rows():
    """Issue 21: n_lm and n_tr once passed through float32, off by one past 2^24 labeled rows. 2^24 + 1 rows of
    H = 1, V = 2 (the counting path at its cheapest: about 5 s and 1.5 GB)."""
    rows = 2**24 + 1
    labels = torch.zeros(rows, dtype=torch.long)
    out = safety_loss(torch.ones(rows, 1), torch.tensor([[1.0], [-1.0]]), labels, transition_labels=labels,
                      backend="torch")
    assert out.n_lm.dtype == torch.int64 and int(out.n_lm) == rows and int(out.n_tr) == rows
    expected = torch.log(torch.tensor(1.0 + torch.e**-2, dtype=torch.float64)).item()  # lse - z, every row
    assert out.lm_loss.item() == pytest.approx(expected, rel=1e-5)


def bad(**changes):
    inputs = make_inputs(30, 12, 16, 100, c=3, s=3, bias=True, cls_bias=True)
    inputs.update(changes)
    return {k: v for k, v in inputs.items() if v is not None}


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(hidden=torch.randn(12, 16, dtype=torch.float64)), TypeError, "hidden must be float32"),
    (dict(hidden=torch.randn(12)), ValueError, r"hidden must be \(N, H\)"),
    (dict(lm_weight=torch.randn(100, 15)), ValueError, "lm_weight must be \\(V, H\\) with H = 16"),
    (dict(lm_weight=torch.randn(100, 16, dtype=torch.bfloat16)), TypeError, "lm_weight must have hidden's dtype"),
    (dict(lm_bias=torch.randn(99)), ValueError, r"lm_bias must have shape \(100,\)"),
    (dict(labels=torch.zeros(11, dtype=torch.long)), ValueError, r"labels must have shape \(12,\)"),
    (dict(labels=torch.zeros(12)), TypeError, "labels must be an int64 tensor"),
    (dict(labels=torch.tensor([0] * 11 + [100])), ValueError, r"labels\[11\] = 100 is outside \[0, V = 100\)"),
    (dict(labels=torch.tensor([-1] + [0] * 11)), ValueError, r"labels\[0\] = -1 is outside"),
    (dict(transition_labels=torch.tensor([IGNORE_INDEX] * 5 + [250] + [IGNORE_INDEX] * 6)), ValueError,
     r"transition_labels\[5\] = 250 is outside \[0, V = 100\)"),
    (dict(cls_index=torch.tensor([0, 12, 3])), ValueError, r"cls_index\[1\] = 12 is outside \[0, N = 12\)"),
    (dict(cls_labels=torch.tensor([0, 3, 1])), ValueError, r"cls_labels\[1\] = 3 is outside \[0, C = 3\)"),
    (dict(cls_labels=torch.tensor([0, 1])), ValueError, r"cls_labels must have shape \(3,\)"),
    (dict(cls_weight=torch.randn(1, 16)), ValueError, "2 <= C <= 16 classes, got C = 1"),
    (dict(cls_weight=torch.randn(17, 16), cls_bias=None), ValueError, "got C = 17"),
    (dict(cls_index=None), ValueError, "cls_weight, cls_index and cls_labels together.*without cls_index"),
    (dict(cls_weight=None, cls_bias=None), ValueError, "without cls_weight"),
    (dict(cls_bias=torch.randn(2)), ValueError, r"cls_bias must have shape \(3,\)"),
    (dict(num_items=-1), ValueError, "num_items must be >= 0"),
    (dict(num_items="12"), TypeError, "num_items must be an int or a 0-dim tensor"),
    (dict(num_cls=torch.ones(2)), ValueError, r"num_cls must be an int or a 0-dim tensor, got shape \(2,\)"),
    (dict(softcap=0.0), ValueError, "softcap must be None or a number > 0"),
    (dict(backend="cuda"), ValueError, "backend must be one of"),
    (dict(chunk_size=0), ValueError, "chunk_size must be None or an int >= 1"),
])
def test_bad_input_is_named(changes, error, pattern):
    with pytest.raises(error, match=pattern):
        safety_loss(**bad(**changes))


@pytest.mark.parametrize("changes,error,pattern", [
    (dict(num_items=float("nan")), ValueError, r"num_items must be >= 0 and finite, got nan"),
    (dict(num_items=float("inf")), ValueError, r"num_items must be >= 0 and finite, got inf"),
    (dict(num_items=torch.tensor(-3.0)), ValueError, r"num_items must be >= 0 and finite, got a tensor holding -3.0"),
    (dict(num_cls=torch.tensor(float("nan"))), ValueError,
     r"num_cls must be >= 0 and finite, got a tensor holding nan"),
    (dict(num_items=torch.tensor(True)), TypeError, r"num_items must be an int or a 0-dim tensor of real numbers"),
    (dict(softcap=float("inf")), ValueError, r"softcap must be None or a number > 0 \(finite, not a bool\), got inf"),
    (dict(softcap=True), ValueError, r"softcap must be None or a number > 0 \(finite, not a bool\), got True"),
    (dict(hidden=torch.randn(12, 0), lm_weight=torch.randn(100, 0), cls_weight=None, cls_index=None, cls_labels=None,
          cls_bias=None), ValueError, r"hidden has H = 0 features \(shape \(12, 0\)\)"),
])
def test_bad_normalizer_softcap_or_width_is_named(changes, error, pattern):
    """Issue 13's rows: each once silently zeroed the loss, gave NaN, was misread, or failed inside a reshape."""
    with pytest.raises(error, match=pattern):
        safety_loss(**bad(**changes))


def test_a_valid_tensor_normalizer_keeps_its_value():
    inputs = bad()
    torch.testing.assert_close(safety_loss(**inputs, num_items=torch.tensor(7), num_cls=torch.tensor(2.0)).loss,
                               safety_loss(**inputs, num_items=7, num_cls=2).loss)


def test_validate_false_skips_only_the_range_checks():
    inputs = bad()
    torch.testing.assert_close(safety_loss(**inputs, validate=False).loss, safety_loss(**inputs).loss)
    with pytest.raises(ValueError, match=re.escape("lm_weight must be (V, H)")):
        safety_loss(**bad(lm_weight=torch.randn(100, 15)), validate=False)


def test_reference_agrees_with_hf_style_cross_entropy():
    """The reference itself: the LM term is torch's cross_entropy on the naive logits."""
    inputs = make_inputs(31, 20, 16, 300, transition=False, head=False)
    logits = (inputs["hidden"] @ inputs["lm_weight"].T).double()
    expected = torch.nn.functional.cross_entropy(logits, inputs["labels"], ignore_index=IGNORE_INDEX)
    ref = safety_loss_ref(inputs["hidden"], inputs["lm_weight"], inputs["labels"])
    torch.testing.assert_close(ref["loss"], expected)


def test_a_second_backward_through_the_same_forward_is_refused():
    inputs = make_inputs(32, 12, 16, 100)
    h = inputs["hidden"].clone().requires_grad_()
    out = safety_loss(**dict(inputs, hidden=h), backend="torch")
    out.loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        out.loss.backward()


def test_autocast_runs_in_the_autocast_dtype_with_float32_master_gradients():
    inputs = make_inputs(33, 24, 32, 1000, bias=True)
    h = inputs["hidden"].clone().requires_grad_()
    w = inputs["lm_weight"].clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = safety_loss(**dict(inputs, hidden=h, lm_weight=w), backend="torch")
    out.loss.backward()
    assert h.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    as_bf16 = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in inputs.items()}
    torch.testing.assert_close(out.loss, safety_loss(**as_bf16, backend="torch").loss)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronizations exist only on CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_exactly_one_host_sync_per_call(backend):
    inputs = make_inputs(34, 64, 32, 1000, bias=True, cls_bias=True, device="cuda")
    inputs["hidden"].requires_grad_()
    safety_loss(**inputs, backend=backend, num_items=40).loss.backward()  # warm-up: kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            out = safety_loss(**inputs, backend=backend, num_items=40)
            out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host-device synchronizations exist only on CUDA")
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_device_tensor_normalizers_are_checked_on_the_one_host_sync(backend):
    inputs = make_inputs(35, 64, 32, 1000, bias=True, cls_bias=True, device="cuda")
    inputs["hidden"].requires_grad_()
    counts = dict(num_items=torch.tensor(40, device="cuda"), num_cls=torch.tensor(3.0, device="cuda"))
    safety_loss(**inputs, backend=backend, **counts).loss.backward()  # warm-up: kernels compiled
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        with pytest.warns(UserWarning) as record:
            safety_loss(**inputs, backend=backend, **counts).loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in record if "synchroniz" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]
    with pytest.raises(ValueError, match="num_items must be >= 0 and finite, got a tensor holding -3.0"):
        safety_loss(**inputs, backend=backend, num_items=torch.tensor(-3.0, device="cuda"))
