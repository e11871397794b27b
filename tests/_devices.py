"""Where the kernels under test run, asked when a test runs (never at import, never in a decorator).

On a machine with CUDA the Triton kernels run compiled, on CUDA tensors; elsewhere they run on CPU tensors under
the Triton interpreter (conftest.py sets TRITON_INTERPRET=1 there). Tests of kernels and of the `triton` backend
take the `kernel_device` argument (conftest.py parametrises it with this device, so the test id says where it
ran); float64 references stay on CPU; tests of CPU semantics (torch backend, modules on `auto`) stay on CPU.
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest
import torch


def kernel_device() -> torch.device:
    """cuda when torch sees a GPU, else cpu (Triton interpreter)."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def to_device(obj: Any, device: torch.device | str) -> Any:
    """`obj` with every tensor in it (nested in dicts, lists, tuples) moved to `device`; other values unchanged."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_device(v, device) for v in obj)
    return obj


def require_backend(name: str) -> None:
    """Skip (with the backend's own reason) when backend `name` cannot run in this process."""
    import pe_kernels

    status = pe_kernels.backends()[name]
    if not status.available:
        pytest.skip(f"{name} backend: {status.reason}")


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 convolutions and matmuls in IEEE fp32 inside the block (TF32 off; nothing changes on CPU).

    For tests whose budget is fp32 rounding (composition, BatchNorm semantics): on a GPU torch's default lets
    cuDNN, and the Triton kernels that follow torch.backends.cudnn.allow_tf32, round fp32 operands to TF32.
    """
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
