"""The C++ CPU epilogue (csrc/safety_epilogue.cpp): loaded prebuilt, else built just in time, else None.

``safety_epilogue_cpu`` has the contract of its torch twin ``safety_epilogue_torch`` (safety_epilogue.py, the
spec); OpenMP over blocks of rows, three vectorized sweeps of each row in L2 (csrc/README.md). The cpu backend
has no C++ head: it uses ``cls_head_torch``.

Where the compiled module comes from, first hit wins, once per process:
1. ``scft_fast._C``, built by ``SCFT_BUILD_OPS=1 pip install ...`` (setup.py), if built from this source,
2. a just-in-time build with torch.utils.cpp_extension (ninja) into
   ``$SCFT_FAST_CACHE/cpu_extension/<key>`` (default ``~/.cache/scft_fast``), the key hashing the source and its
   path, the flags, torch, Python and the machine: the first use in a fresh cache compiles (about 30 s on 2 cores),
   later ones only load,
3. nothing: ``load_cpu_extension()`` returns None after one warning, and callers use the torch backend.
"""
from __future__ import annotations

import hashlib
import importlib
import os
import platform
import shutil
import sys
import threading
import warnings
from pathlib import Path
from types import ModuleType

import torch

SOURCE = Path(__file__).resolve().parents[2] / "csrc" / "safety_epilogue.cpp"
# No -march: the hot loops are multiversioned in the source (target_clones), so one build runs on any x86-64.
# -fopenmp: at::parallel_for is a header-only "#pragma omp parallel"; without it the loop runs on one thread.
# -Wno-psabi: the vector-returning helpers are always inlined, so GCC's ABI note about them does not apply.
CXX_FLAGS = ("-O3", "-fopenmp", "-Wno-psabi")
LINK_FLAGS = ("-fopenmp",)

_lock = threading.Lock()
_loaded = False
_module: ModuleType | None = None


def cache_dir() -> Path:
    return Path(os.environ.get("SCFT_FAST_CACHE") or Path.home() / ".cache" / "scft_fast") / "cpu_extension"


def build_key(source: Path = SOURCE) -> str:
    """Everything the build depends on: the source's bytes and its path (ninja's build file names the path, so two
    checkouts of the same source sharing a directory would rebuild each other's build), the flags, torch, Python and
    the machine."""
    digest = hashlib.sha256(source.read_bytes())
    for part in (str(source), *CXX_FLAGS, *LINK_FLAGS, torch.__version__, sys.version, platform.machine()):
        digest.update(part.encode())
    return digest.hexdigest()[:16]


def compile_flags() -> list[str]:
    """CXX_FLAGS plus the build key the module reports; setup.py builds scft_fast._C with these too."""
    return [*CXX_FLAGS, f"-DSCFT_BUILD_KEY={build_key()}"]


def _import_prebuilt() -> ModuleType:
    module = importlib.import_module("scft_fast._C")
    if SOURCE.is_file() and getattr(module, "build_key", None) != build_key():
        raise ImportError(f"scft_fast._C was not built from the current {SOURCE}")
    return module


def _build_just_in_time() -> ModuleType:
    from torch.utils import cpp_extension

    if not SOURCE.is_file():
        raise RuntimeError(f"the C++ source {SOURCE} is not there (csrc/ ships with the repository, not the wheel)")
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise RuntimeError(f"no C++ compiler: {compiler!r} is not on PATH (set CXX to pick one)")
    cpp_extension.verify_ninja_availability()
    key = build_key()
    build_dir = cache_dir() / key
    build_dir.mkdir(parents=True, exist_ok=True)
    # torch's load() holds a file lock in build_dir, so concurrent first uses (pytest-xdist) build once.
    return cpp_extension.load(
        name=f"scft_fast_cpu_{key}",
        sources=[str(SOURCE)],
        extra_cflags=compile_flags(),
        extra_ldflags=list(LINK_FLAGS),  # a copy: load() appends to the list it is given
        build_directory=str(build_dir),
        verbose=False,
    )


def load_cpu_extension() -> ModuleType | None:
    """The compiled module, or None (with a single warning) when it can be neither imported nor built."""
    global _loaded, _module
    with _lock:
        if _loaded:
            return _module
        try:
            _module = _import_prebuilt()
        except ImportError:
            try:
                _module = _build_just_in_time()
            except Exception as error:  # a failed build must never break training: the torch backend remains
                warnings.warn(
                    f"scft_fast: the C++ CPU epilogue could not be built ({type(error).__name__}: {error}); "
                    'backend="cpu" is unavailable and "auto" uses the torch backend on CPU.',
                    RuntimeWarning,
                    stacklevel=2,
                )
                _module = None
        _loaded = True
        return _module


def safety_epilogue_cpu(
    logits: torch.Tensor,  # (c, V) fp32/bf16/fp16 on CPU, contiguous; overwritten with d(loss)/d(logits)
    lm_target: torch.Tensor,  # (c,) int64, contiguous; in [0, V) or ignore_index, checked here
    tr_target: torch.Tensor,  # (c,) int64, contiguous; in [0, V) or ignore_index, checked here
    lm_scale: torch.Tensor,  # () or (c,) float32 on CPU
    tr_scale: torch.Tensor,  # () or (c,) float32 on CPU
    softcap: float | None,  # None or > 0
    ignore_index: int,
    label_smoothing: float = 0.0,
    z_scale: torch.Tensor | None = None,  # () or (c,) float32 on CPU
    row_stats: torch.Tensor | None = None,  # (c, 5) float32 on CPU, contiguous; written
    token_stats: bool = False,
    compute_grad: bool = True,
) -> torch.Tensor:  # (2,) float32: [sum of LM CEs, sum of transition CEs], unscaled
    module = load_cpu_extension()
    if module is None:
        raise RuntimeError("the C++ CPU epilogue is unavailable (see the warning above); use backend='torch'")
    return module.safety_epilogue(logits, lm_target, tr_target, lm_scale.contiguous(), tr_scale.contiguous(),
                                  softcap, ignore_index, label_smoothing,
                                  None if z_scale is None else z_scale.contiguous(), row_stats, token_stats,
                                  compute_grad)
