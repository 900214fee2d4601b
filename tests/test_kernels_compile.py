"""Compiles every kernel in kernels/ for an H100 (sm_90) without a GPU, through Triton's ahead-of-time path
(what triton/tools/compile.py does), to check what the interpreter cannot: that the kernels compile, that bf16
rows are read and written with 16-byte vector accesses when V and the row stride are multiples of 16 (the
divisibility Triton's JIT detects at launch), and that nothing spills to local memory.

It runs in a subprocess because under TRITON_INTERPRET=1 ``@triton.jit`` yields interpreter objects that cannot
be compiled.
"""
import json
import os
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

SCRIPT = r"""
import json, os, re, subprocess, sys, tempfile
import triton
import triton.backends.nvidia
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from scft_fast.kernels.cls_head import _cls_head_kernel
from scft_fast.kernels.safety_epilogue import _safety_epilogue_kernel

CUOBJDUMP = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
KERNELS = {"safety_epilogue": _safety_epilogue_kernel, "cls_head": _cls_head_kernel}

def compile_sm90(kernel, types, constexprs, num_warps):
    # types: argument name -> "ty" or "ty:16" (divisible by 16, as the JIT specializes it), as in tools/compile.py
    signature, attrs = {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        ty, _, hint = types[name].partition(":")
        signature[name] = ty
        if hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    ptx = compiled.asm["ptx"]
    result = {op: len(re.findall(re.escape(op) + r"\b", ptx))
              for op in ("ld.global.v4.b32", "st.global.v4.b32", "ld.global.b16", "st.global.b16")}
    if os.path.exists(CUOBJDUMP):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
        result["regs"] = int(re.search(r"REG:(\d+)", usage).group(1))
        result["local"] = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    return result

variants = json.loads(sys.argv[1])
print(json.dumps({name: compile_sm90(KERNELS[v["kernel"]], v["types"], v["constexprs"], v["num_warps"])
                  for name, v in variants.items()}))
"""


def _epilogue(dtype, softcap):
    types = {"logits_ptr": f"*{dtype}:16", "lm_target_ptr": "*i64:16", "tr_target_ptr": "*i64:16",
             "lm_scale_ptr": "*fp32:16", "tr_scale_ptr": "*fp32:16", "ce_ptr": "*fp32:16", "V": "i32:16",
             "stride_row": "i32:16", "softcap": "fp32", "ignore_index": "i32"}
    # BLOCK_V and num_warps as safety_epilogue picks them for V >= 4096; unit strides become constants, as the
    # JIT specializes integer arguments equal to 1.
    return dict(kernel="safety_epilogue", types=types, num_warps=8,
                constexprs={"stride_lm": 1, "stride_tr": 1, "HAS_SOFTCAP": softcap, "BLOCK_V": 4096})


def _cls_head(dtype, bias, grad, block_c):
    types = {name: "*fp32:16" for name in ("cls_scale_ptr", "ce_ptr", "logits_ptr", "grad_pooled_ptr",
                                           "grad_weight_ptr", "grad_bias_ptr")}
    types.update({name: f"*{dtype}:16" for name in ("hidden_ptr", "weight_ptr", "bias_ptr")})
    types.update({name: "*i64:16" for name in ("cls_index_ptr", "cls_labels_ptr")})
    types.update({"C": "i32", "H": "i32:16", "stride_hn": "i32:16", "stride_wc": "i32:16", "ignore_index": "i32"})
    unit_strides = {name: 1 for name in ("stride_hh", "stride_wh", "stride_b", "stride_idx", "stride_lbl")}
    return dict(kernel="cls_head", types=types, num_warps=4,
                constexprs={**unit_strides, "HAS_BIAS": bias, "COMPUTE_GRAD": grad, "BLOCK_C": block_c, "BLOCK_H": 256})


VARIANTS = {
    "epilogue_bf16": _epilogue("bf16", False),
    "epilogue_bf16_softcap": _epilogue("bf16", True),
    "epilogue_fp32": _epilogue("fp32", False),
    "cls_head_bf16_bias_grad": _cls_head("bf16", True, True, 16),
    "cls_head_fp32_forward": _cls_head("fp32", False, False, 2),
}


@pytest.fixture(scope="module")
def compiled():
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(VARIANTS)], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_compiles_without_spills(compiled, name):
    result = compiled[name]
    if "local" in result:
        assert result["local"] == 0, f"{name} spills to local memory: {result}"


@pytest.mark.parametrize("name", ["epilogue_bf16", "epilogue_bf16_softcap"])
def test_epilogue_rows_move_in_16_byte_vectors(compiled, name):
    result = compiled[name]
    # Two 16-byte loads per thread per sweep (16 bf16 elements), one store of 16 bytes or more per thread;
    # the only 2-byte loads left are the two target-logit gathers.
    assert result["ld.global.v4.b32"] >= 4 and result["st.global.v4.b32"] >= 1, result
    assert result["ld.global.b16"] <= 2 and result["st.global.b16"] == 0, result
    if "regs" in result:
        # <= 64 registers: at least 4 programs of 256 threads per SM to overlap the bandwidth-bound sweeps.
        assert result["regs"] <= 64, result
