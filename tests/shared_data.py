"""DeRTa's reference files, read in place from ../shared/data/derta (never copied into the repository)."""
from pathlib import Path

import pytest

DERTA = Path(__file__).resolve().parents[2] / "shared" / "data" / "derta"
needs_derta = pytest.mark.skipif(not DERTA.is_dir(), reason=f"DeRTa's reference files are not at {DERTA}")
