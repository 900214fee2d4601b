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


@pytest.fixture(scope="module")
def tok():
    """The embedded tokenizer, loaded once per module (a module that pads differently defines its own)."""
    from scft_fast.data import load_default_tokenizer

    return load_default_tokenizer()


@pytest.fixture(scope="module")
def quiet_datasets():
    """No datasets progress bars while a module's tests build datasets."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


@pytest.fixture(scope="module")
def embedded_train_head(tmp_path_factory):
    """make(n): the first n records of the embedded training split, as a JSONL file of their own. balanced=True
    alternates helpful and harmful triples (the split has three helpful records per harmful one), so that every
    few rows hold an RTO sample."""
    import itertools

    from scft_fast.data import default_data_files

    def make(lines: int, balanced: bool = False) -> str:
        path = tmp_path_factory.mktemp("data") / "train.jsonl"
        with open(default_data_files("train")[0]) as f:
            records = f.readlines()
        if balanced:
            harmful = [r for r in records if '"harmful_response"' in r]
            helpful = [r for r in records if '"harmful_response"' not in r]
            records = list(itertools.chain.from_iterable(zip(helpful, harmful)))
        path.write_text("".join(records[:lines]))
        return str(path)

    return make


@pytest.fixture(scope="module")
def small_data(embedded_train_head):
    return embedded_train_head(48)
