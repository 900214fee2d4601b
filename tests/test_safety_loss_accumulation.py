"""The float32 accumulation of the weight gradient from bfloat16 / float16 chunks, and which path it takes.

``chunked.accumulation_path`` picks, once per (device type, dtype), the fastest path of
``chunked.FP32_ACCUMULATION_PATHS`` that runs on 2 x 2 tensors; at the real shapes nothing is caught, so an
OutOfMemoryError inside the GEMM reaches the caller and the path stays what it was. On CUDA the test checks that
and on CPU, several chunks accumulate to the float64 product of the bf16 inputs: within float32 rounding (2e-5
relative to the largest entry, which a bf16 accumulator at 2^-8 cannot meet) on the out_dtype paths, within one
bf16 rounding per chunk on the last path, which rounds each chunk's product.
"""
import pytest
import torch

from scft_fast.ops import chunked

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture
def fresh_choice(monkeypatch):
    monkeypatch.setattr(chunked, "_chosen", {})
    monkeypatch.setattr(chunked, "_ran", {})


@pytest.mark.parametrize("device", DEVICES)
def test_chunks_accumulate_in_float32_and_the_path_is_recorded(device, fresh_choice):
    g = torch.Generator().manual_seed(60)
    a = torch.randn(3 * 64, 96, generator=g).to(device, torch.bfloat16)  # (rows, V): dlogits, chunked by rows
    b = torch.randn(3 * 64, 40, generator=g).to(device, torch.bfloat16)  # (rows, H): h
    acc = None
    for start in range(0, a.shape[0], 64):
        acc = chunked.accumulate_f32(acc, a[start:start + 64].T, b[start:start + 64])
    expected = a.double().T @ b.double()
    path = chunked.accumulation_path(torch.device(device), torch.bfloat16)
    tolerance = 3 * 2.0 ** -8 if path == "mm + float() + add_" else 2e-5
    assert acc.dtype == torch.float32
    torch.testing.assert_close(acc.double().cpu(), expected.cpu(), rtol=0,
                               atol=tolerance * expected.abs().max().item())
    assert chunked.accumulation_paths_run() == {f"{device} bfloat16": path}
    if device == "cpu":  # aten::mm.dtype has no CPU kernel
        assert path == "mm + float() + add_"


def test_an_out_of_memory_error_is_raised_and_does_not_change_the_path(monkeypatch, fresh_choice):
    a = torch.randn(8, 4).to(torch.bfloat16)
    first = chunked.accumulation_path(a.device, a.dtype)

    def out_of_memory(acc, x, y):
        if x.shape[0] > 2:  # the 2 x 2 probe has passed; the real shape fails
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return chunked._mm_then_float_add(acc, x, y)

    monkeypatch.setitem(chunked.FP32_ACCUMULATION_PATHS, first, out_of_memory)
    with pytest.raises(torch.OutOfMemoryError):
        chunked.accumulate_f32(None, a, a.T)
    assert chunked.accumulation_path(a.device, a.dtype) == first


def test_a_missing_overload_is_skipped_once_by_the_probe(monkeypatch, fresh_choice):
    calls = []

    def missing(acc, x, y):
        calls.append(x.shape)
        raise TypeError("mm() got an unexpected keyword argument 'out_dtype'")

    paths = {"missing": missing, **chunked.FP32_ACCUMULATION_PATHS}
    monkeypatch.setattr(chunked, "FP32_ACCUMULATION_PATHS", paths)
    a = torch.randn(8, 4).to(torch.float16)
    for _ in range(3):
        chunked.accumulate_f32(None, a, a.T)
    assert calls == [(2, 2)]
    assert chunked.accumulation_paths_run()["cpu float16"] != "missing"
