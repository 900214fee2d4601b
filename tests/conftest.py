"""Test-wide settings. Without CUDA, Triton runs under its interpreter: the variable must be set
before triton is first imported, which is why it lives here."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on shared cores: two intra-op threads spin against each other (20x slower here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
