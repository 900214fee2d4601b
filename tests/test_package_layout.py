"""The Triton kernels install as scft_fast.kernels, never as a top-level `kernels` module (a library of
that name is imported by transformers)."""
import importlib.util
import pathlib
import subprocess
import sys

import scft_fast

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_kernels_is_a_subpackage():
    spec = importlib.util.find_spec("scft_fast.kernels")
    assert spec is not None and pathlib.Path(spec.origin).parent.name == "kernels"


def test_no_top_level_kernels_module_from_this_repo():
    code = "import importlib.util as u; s = u.find_spec('kernels'); print(s.origin if s else None)"
    found = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/").stdout.strip()
    assert found == "None" or not found.startswith(str(REPO)), found


def test_import_is_light():
    code = "import sys, scft_fast; print(','.join(m for m in ('triton', 'transformers', 'deepspeed', 'trl') if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip()
    assert loaded == "", f"`import scft_fast` pulled in {loaded}"
    assert scft_fast.__version__
