"""Which backends of safety_loss the tests run on, on this machine."""
import importlib.util

import torch


def available_backends() -> list[str]:
    """torch always; triton and cpu as soon as their code exists in the package. A backend whose code
    exists but does not load is *not* skipped: its tests then fail, as they should."""
    names = ["torch"]
    if importlib.util.find_spec("triton") is not None and importlib.util.find_spec("scft_fast.kernels.safety_epilogue"):
        names.append("triton")
    if not torch.cuda.is_available() and importlib.util.find_spec("scft_fast.ops.cpu_extension") is not None:
        names.append("cpu")
    return names


def device_for(backend: str) -> torch.device:
    if backend == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")
