"""Every Triton kernel variant the launchers can choose, compiled ahead of time for sm_80, sm_90 and sm_100 without a
GPU (Triton's ASTSource + GPUTarget, what triton/tools/compile.py does), to check what the interpreter cannot: that
each compiles, that nothing goes to the stack or local memory (spills), that each kernel stays within its register
budget (registers decide how many programs share an SM), and that bf16 rows move in 16-byte vectors.

The variants come from the launchers themselves, not from a list kept here. Each launcher (``launch_domain``) is
called over the shapes and dtypes real models give it, on small CPU tensors, with its kernel replaced by a recorder:
the recorder keeps the block sizes and warps the launcher chose and specializes the arguments as Triton's JIT does
(a pointer to its dtype, 16-byte aligned; an integer divisible by 16 marked so; an integer equal to 1 a constant).
A boolean constexpr the domain sets one way only (a new switch, off by default) is compiled all off, each on alone and
all on (the full product grows as 2^switches; register pressure peaks with every switch on), so a new switch in a
kernel is covered without touching this file.

The compiling runs in a subprocess, this file run as a script: under TRITON_INTERPRET=1 (set by conftest.py)
``@triton.jit`` gives interpreter objects that cannot be compiled. With SCFT_KERNEL_RESOURCES_OUT set, the table of
every variant's registers, stack, local memory and spill bytes is also written there (the GPU run keeps it).
Triton's cache keeps the compiled variants (234 compiles under Triton 3.9): the first run takes minutes on 2 cores,
later ones seconds.
"""
from __future__ import annotations

import itertools
import json
import os
import re
import subprocess
import sys

import pytest

triton = pytest.importorskip("triton")

ARCHS = (80, 90, 100)
KERNELS = ("safety_epilogue", "cls_head")
REGISTERS_PER_SM = 65536  # sm_80, sm_90 and sm_100 alike
FLOAT_POINTERS = ("*fp32", "*bf16", "*fp16")

# Registers per thread (cuobjdump's REG) a kernel's variants may take where occupancy pays, per Triton release line and
# arch: the most they take, rounded up to a multiple of 8 (the allocation unit). More registers, fewer programs share
# an SM and hide each other's memory latency: a change that halves them fails here. The epilogue's budget covers its
# training path (2-byte logits, V a multiple of 16, as every current vocabulary); its float32 and odd-V variants
# (38-112 registers under 3.9) are checked for spills only.
#                       kernel, Triton:  sm_80 sm_90 sm_100   programs per SM at the budget
REGISTER_BUDGET = {
    ("safety_epilogue", "3.9"): {80: 80, 90: 48, 100: 40},  # 8 warps: 3, 5, 6 (3.9 takes 56-75, 32-45, 34-39)
    ("safety_epilogue", "3.6"): {90: 64},  # 4 (bf16 took 56 on sm_90); sm_80 and sm_100 not measured yet
    ("cls_head", "3.9"): {80: 88, 90: 64, 100: 64},  # 4 warps: 5, 8, 8 (27-88, 27-64, 29-64)
    # safety_loss's options (label smoothing, z-loss, lse / token statistics, the loss-only forward) on the training
    # path, the token statistics' argmax and entropy sums at half the block (4 warps): 4 warps: 6, 7, 8; 8 warps:
    # 3, 3, 4 (3.9 takes 32-75, 31-71, 30-62).
    ("safety_epilogue options", "3.9"): {80: 80, 90: 72, 100: 64},
}
OPTIONS = ("HAS_SMOOTHING", "HAS_Z_LOSS", "ROW_STATS", "TOKEN_STATS")  # and COMPUTE_GRAD off


def budget_class(v: dict) -> str | None:
    """Which REGISTER_BUDGET entry a variant falls under: the kernel's own, "safety_epilogue options" for an
    epilogue with an option on, None for the epilogue's float32 and odd-V variants (checked for spills only)."""
    if v["kernel"] != "safety_epilogue":
        return v["kernel"]
    if v["types"]["logits_ptr"] not in ("*bf16:16", "*fp16:16") or v["types"]["V"] != "i32:16":
        return None
    options = any(v["constexprs"].get(k) for k in OPTIONS) or v["constexprs"].get("COMPUTE_GRAD") is False
    return "safety_epilogue options" if options else "safety_epilogue"


def blocks_per_sm(registers: int, num_warps: int) -> int:
    """Programs of num_warps warps that fit in an SM's registers (allocated per thread in multiples of 8)."""
    per_thread = -(-registers // 8) * 8
    return REGISTERS_PER_SM // (per_thread * 32 * num_warps)


def _variant_name(v: dict) -> str:
    shown = {k: c for k, c in v["constexprs"].items() if not k.startswith("stride")}
    dtypes = sorted({t.split(":")[0][1:] for t in v["types"].values() if t.split(":")[0] in FLOAT_POINTERS})
    ints = ", ".join(f"{k}%16" for k, t in v["types"].items() if t == "i32:16")
    return f"{v['kernel']} sm_{v['arch']} {'/'.join(dtypes)} warps={v['num_warps']} {shown} [{ints}]"


@pytest.fixture(scope="module")
def compiled() -> list[dict]:
    if "nvidia" not in triton.backends.backends:
        pytest.skip("this Triton build has no NVIDIA backend")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset; 1 is its default (and 3.6's)
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    report = os.environ.get("SCFT_KERNEL_RESOURCES_OUT")
    if report:
        with open(report, "w") as f:
            json.dump({"triton": triton.__version__, "variants": results}, f, indent=1)
    return results


def _of(compiled: list[dict], kernel: str, arch: int | None = None) -> list[dict]:
    found = [v for v in compiled if v["kernel"] == kernel and (arch is None or v["arch"] == arch)]
    assert found, f"no {kernel} variant compiled for sm_{arch}: the launcher recorded no launch"
    return found


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", KERNELS)
def test_no_variant_spills(compiled, kernel, arch):
    variants = _of(compiled, kernel, arch)
    if "stack" not in variants[0]:
        pytest.skip("cuobjdump is not in this Triton build: no resource usage")
    spilling = [f"{_variant_name(v)}: stack {v['stack']} B, local {v['local']} B, spill stores "
                f"{v['spill_store_bytes']} B, loads {v['spill_load_bytes']} B" for v in variants
                if v["stack"] or v["local"] or v["spill_store_bytes"] or v["spill_load_bytes"]]
    assert not spilling, f"{len(spilling)} of {len(variants)} variants spill:\n" + "\n".join(spilling)


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("kernel", [*KERNELS, "safety_epilogue options"])
def test_registers_within_budget(compiled, kernel, arch):
    variants = [v for v in _of(compiled, kernel.split(" ")[0], arch) if budget_class(v) == kernel]
    if "regs" not in variants[0]:
        pytest.skip("cuobjdump is not in this Triton build: no register counts")
    line = ".".join(triton.__version__.split(".")[:2])
    budget = REGISTER_BUDGET.get((kernel, line), {}).get(arch)
    if budget is None:
        pytest.skip(f"no register budget for {kernel} on sm_{arch} under Triton {line}: its variants take "
                    f"{min(v['regs'] for v in variants)}-{max(v['regs'] for v in variants)}; add it to REGISTER_BUDGET")
    over = [f"{_variant_name(v)}: {v['regs']} registers, {blocks_per_sm(v['regs'], v['num_warps'])} programs per SM "
            f"(budget {budget}: {blocks_per_sm(budget, v['num_warps'])})" for v in variants if v["regs"] > budget]
    assert not over, f"{len(over)} of {len(variants)} variants over the register budget:\n" + "\n".join(over)


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_switch_is_compiled_both_ways(compiled, kernel):
    """The variants come from the launchers: every boolean constexpr they pass is compiled off and on, and every
    block size they chose (per dtype) is there."""
    variants = _of(compiled, kernel, ARCHS[0])
    switches = {k for v in variants for k, c in v["constexprs"].items() if isinstance(c, bool)}
    assert switches, f"{kernel}: the launcher passed no boolean constexpr"
    for name in switches:
        assert {v["constexprs"][name] for v in variants} == {False, True}, name
    if kernel == "cls_head":
        assert {v["constexprs"]["BLOCK_C"] for v in variants} == {2, 4, 8, 16}
    else:
        assert {(v["constexprs"]["BLOCK_V"], v["num_warps"]) for v in variants} >= {(4096, 8), (2048, 4)}


def test_epilogue_bf16_rows_move_in_16_byte_vectors(compiled):
    """At V and row stride multiples of 16 (the JIT detects it at launch), the 2-byte variants at BLOCK_V = 4096 read
    each sweep in 16-byte loads and write back in 16-byte stores; with every switch off the only 2-byte loads left
    are the two target-logit gathers."""
    variants = [v for v in _of(compiled, "safety_epilogue") if v["constexprs"]["BLOCK_V"] == 4096
                and v["types"]["logits_ptr"] in ("*bf16:16", "*fp16:16") and v["types"]["V"] == "i32:16"]
    assert variants
    for v in variants:
        name = _variant_name(v)
        if v["constexprs"].get("COMPUTE_GRAD") is False:  # reduction="none"'s forward: the loss sweeps, no gradient
            assert v["ld.global.v4.b32"] >= 2 and v["st.global.b16"] == 0, (name, v)
            continue
        assert v["ld.global.v4.b32"] >= 4 and v["st.global.v4.b32"] >= 1, (name, v)
        if not any(c is True for c in v["constexprs"].values()):
            assert v["ld.global.b16"] <= 2 and v["st.global.b16"] == 0, (name, v)


# ----------------------------------------------------------------------------- the subprocess (this file as a script)

PTX_COUNTS = ("ld.global.v4.b32", "st.global.v4.b32", "ld.global.b16", "st.global.b16")
LAUNCH_OPTIONS = ("num_warps", "num_stages", "num_ctas", "maxnreg")


def launch_domain():
    """(launcher module, launcher name, calls): each call the (arguments, keyword arguments) of one launch, as real
    models and safety_loss's options give them. V:
    Llama 3's 128256, GPT-2's 50257 (not a multiple of 16) and one below the epilogue's largest block; C: the head's
    whole class range; H: a multiple of 16, as every model's hidden size (its value does not change the variant)."""
    import torch

    from scft_fast import IGNORE_INDEX
    from scft_fast.ops.cls_head import MAX_CLASSES, MIN_CLASSES

    dtypes = (torch.float32, torch.bfloat16, torch.float16)
    scale = torch.tensor(0.5)
    targets = torch.tensor([1, IGNORE_INDEX])
    epilogue = [((torch.randn(2, V).to(dtype), targets, targets.flip(0), scale, scale, softcap, IGNORE_INDEX), {})
                for dtype in dtypes for V in (128256, 50257, 2048) for softcap in (None, 30.0)]
    # safety_loss's options (label smoothing, z-loss, lse and token statistics, reduction="none"'s loss-only
    # forward), each alone and all at once, at Llama 3's vocabulary: the blocks the launcher picks for each.
    options = [{"label_smoothing": 0.1}, {"z_scale": scale}, {"row_stats": torch.empty(2, 5)},
               {"row_stats": torch.empty(2, 5), "token_stats": True}, {"compute_grad": False},
               {"label_smoothing": 0.1, "z_scale": scale, "row_stats": torch.empty(2, 5), "token_stats": True}]
    epilogue += [((torch.randn(2, 128256).to(dtype), targets, targets.flip(0), scale, scale, softcap, IGNORE_INDEX),
                  option) for dtype in dtypes for softcap in (None, 30.0) for option in options]
    cls_head = [((torch.randn(4, 4096).to(dtype), torch.tensor([0, 3]), torch.tensor([1, IGNORE_INDEX]),
                  torch.randn(C, 4096).to(dtype), bias, scale, IGNORE_INDEX, grad), {})
                for dtype in dtypes for C in range(MIN_CLASSES, MAX_CLASSES + 1)
                for bias in (None, torch.randn(C).to(dtype)) for grad in (False, True)]
    return [("scft_fast.kernels.safety_epilogue", "safety_epilogue_triton", epilogue),
            ("scft_fast.kernels.cls_head", "cls_head_triton", cls_head)]


def jit_type(value):
    """What Triton's JIT specializes a runtime argument to: "*bf16:16" (16-byte aligned pointer), "i32:16", "fp32",
    or the value itself for an integer equal to 1 (a constant)."""
    import torch

    if isinstance(value, torch.Tensor):
        dtype = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64",
                 torch.int32: "i32"}[value.dtype]
        return f"*{dtype}" + (":16" if value.data_ptr() % 16 == 0 else "")
    if isinstance(value, bool):
        return "u1"
    if isinstance(value, int):
        if value == 1:
            return 1
        return ("i32" if -2**31 <= value < 2**31 else "i64") + (":16" if value % 16 == 0 else "")
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for a launch argument of type {type(value).__name__}")


class LaunchRecorder:
    """Stands in for a kernel in its launcher's module: ``kernel[grid](*args, **kwargs)`` records the variant."""

    def __init__(self, name: str, kernel, launches: list):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in LAUNCH_OPTIONS if k in kwargs}
            bound = dict(zip(self.kernel.arg_names, args), **kwargs)
            types, constexprs = {}, {}
            for param in self.kernel.params:
                value = bound[param.name] if param.name in bound else param.default
                kind = value if param.is_constexpr else jit_type(value)
                if param.is_constexpr or not isinstance(kind, str):
                    constexprs[param.name] = kind
                else:
                    types[param.name] = kind
            self.launches.append({"kernel": self.name, "types": types, "constexprs": constexprs,
                                  "num_warps": options.get("num_warps", 4)})
        return launch


def recorded_variants() -> list[dict]:
    """Every launch the launchers make over ``launch_domain()``, without duplicates; the boolean constexprs the
    domain sets one way only (a new switch, off by default) expanded: all off, each on alone, all on."""
    import importlib

    from triton.runtime.jit import JITFunction

    launches: list[dict] = []
    for module_name, launcher, calls in launch_domain():
        module = importlib.import_module(module_name)
        kernels = {name: obj for name, obj in vars(module).items() if isinstance(obj, JITFunction)}
        for name, kernel in kernels.items():
            setattr(module, name, LaunchRecorder(module_name.rsplit(".", 1)[1], kernel, launches))
        try:
            for args, kwargs in calls:
                getattr(module, launcher)(*args, **kwargs)
        finally:
            for name, kernel in kernels.items():
                setattr(module, name, kernel)
    seen: dict[tuple[str, str], set] = {}
    for launch in launches:
        for name, value in launch["constexprs"].items():
            seen.setdefault((launch["kernel"], name), set()).add(value)
    variants = {}
    for launch in launches:
        switches = sorted(k for k, c in launch["constexprs"].items()
                          if isinstance(c, bool) and len(seen[launch["kernel"], k]) == 1)
        settings = [dict.fromkeys(switches, False), dict.fromkeys(switches, True)]
        settings += [{**dict.fromkeys(switches, False), name: True} for name in switches]
        for setting in settings:
            variant = {**launch, "constexprs": {**launch["constexprs"], **setting}}
            variants[json.dumps(variant, sort_keys=True)] = variant
    return list(variants.values())


def _instruction_bytes(sass: str, opcode: str) -> int:
    """Bytes moved by the static STL / LDL instructions of a SASS listing (what ptxas reports as spill stores /
    loads): STL is 4 bytes, STL.64 8, STL.128 16, STL.U8 1, STL.U16 2."""
    total = 0
    for suffixes in re.findall(rf"\b{opcode}((?:\.[A-Z0-9]+)*)\s", sass):
        widths = [int(w) for w in re.findall(r"(\d+)", suffixes)]
        total += max(widths) // 8 if widths else 4
    return total


def compile_variant(job: tuple[dict, int]) -> dict:
    import tempfile

    import triton.backends.nvidia
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    variant, arch = job
    kernel = KERNEL_FUNCTIONS[variant["kernel"]]
    signature, attrs, constexprs = {}, {}, {}
    for i, name in enumerate(kernel.arg_names):
        if name in variant["constexprs"]:
            signature[name] = "constexpr"
            constexprs[name] = variant["constexprs"][name]
            continue
        ty, _, hint = variant["types"][name].partition(":")
        signature[name] = ty
        if hint == "16":
            attrs[(i,)] = [["tt.divisibility", 16]]
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    binary = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": variant["num_warps"]})
    ptx = binary.asm["ptx"]
    result = {**variant, "arch": arch, **{op: len(re.findall(re.escape(op) + r"\b", ptx)) for op in PTX_COUNTS}}
    cuobjdump = os.path.join(os.path.dirname(triton.backends.nvidia.__file__), "bin", "cuobjdump")
    if os.path.exists(cuobjdump):
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(binary.asm["cubin"])
            f.flush()
            usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True,
                                   check=True).stdout
            fields = {k: int(v) for k, v in re.findall(r"\b(REG|STACK|LOCAL):(\d+)", usage)}
            # A spill needs a stack frame: the SASS (slow to disassemble) is read only when there is one.
            sass = "" if fields["STACK"] == 0 and fields["LOCAL"] == 0 else subprocess.run(
                [cuobjdump, "--dump-sass", f.name], capture_output=True, text=True, check=True).stdout
        result.update(regs=fields["REG"], stack=fields["STACK"], local=fields["LOCAL"],
                      spill_store_bytes=_instruction_bytes(sass, "STL"),
                      spill_load_bytes=_instruction_bytes(sass, "LDL"))
    return result


KERNEL_FUNCTIONS: dict = {}


def main() -> None:
    import multiprocessing

    from scft_fast.kernels.cls_head import _cls_head_kernel
    from scft_fast.kernels.safety_epilogue import _safety_epilogue_kernel

    KERNEL_FUNCTIONS.update(safety_epilogue=_safety_epilogue_kernel, cls_head=_cls_head_kernel)
    jobs = list(itertools.product(recorded_variants(), ARCHS))
    # Forked workers inherit the imported kernels; each compile is mostly single-threaded LLVM and ptxas.
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        results = pool.map(compile_variant, jobs, chunksize=4)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
