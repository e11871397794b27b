"""Backend selection: which implementation (`torch`, `triton`, `cuda`) runs each op.

* `torch` (pe_kernels.reference): ATen — cuDNN on GPU, native kernels on CPU. Always available.
* `triton` (pe_kernels.triton): CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (tests).
* `cuda` (pe_kernels.cuda): the compiled extension pe_kernels._C, CUDA tensors.
* `auto` (the default): per op and call, a fast path listed in the committed dispatch table
  (dispatch_table.json, written from GPU results that proved it correct and faster on that GPU architecture),
  else `torch`. Every fallback keeps a reason: `pe_kernels.last_dispatch()`.

Choose with `PE_KERNELS_BACKEND=<name>` or `with pe_kernels.use_backend(<name>):` (the context manager wins).
A forced backend that cannot run the call raises BackendUnavailableError with the reason; it never falls back.
Nothing here touches a GPU at import.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import os
from pathlib import Path
from types import ModuleType
from typing import Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")
CHOICES = BACKENDS + ("auto",)
FAST_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
DISPATCH_TABLE_PATH = Path(__file__).with_name("dispatch_table.json")

_forced: contextvars.ContextVar[Optional[str]] = contextvars.ContextVar("pe_kernels_backend", default=None)
_last: contextvars.ContextVar[Optional["Dispatch"]] = contextvars.ContextVar("pe_kernels_last", default=None)


class BackendUnavailableError(RuntimeError):
    """A backend the user asked for cannot run this call (the message says why)."""


@dataclasses.dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str  # why it is unavailable, or what it runs on


@dataclasses.dataclass(frozen=True)
class Dispatch:
    op: str
    backend: str
    reason: str


def _check_name(name: str) -> str:
    if name not in CHOICES:
        raise ValueError(f"unknown pe_kernels backend {name!r}; choose one of {', '.join(CHOICES)}")
    return name


def requested_backend() -> str:
    """The backend asked for: use_backend() context, else PE_KERNELS_BACKEND, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    env = os.environ.get("PE_KERNELS_BACKEND", "auto").strip().lower() or "auto"
    if env not in CHOICES:
        raise ValueError(f"PE_KERNELS_BACKEND={env!r} is not one of {', '.join(CHOICES)}")
    return env


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the ops inside the block on backend `name` ('torch', 'triton', 'cuda' or 'auto')."""
    token = _forced.set(_check_name(name))
    try:
        yield
    finally:
        _forced.reset(token)


def _interpreter_on() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=None)
def _import_error(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # recorded, reported by backends() and on a forced call
        return f"{module} failed to import: {type(exc).__name__}: {exc}"
    return None


def _module(name: str) -> ModuleType:
    return importlib.import_module({"torch": "pe_kernels.reference", "triton": "pe_kernels.triton",
                                    "cuda": "pe_kernels.cuda"}[name])


def _static_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run anywhere in this process (None if it can run somewhere)."""
    if name == "torch":
        return None
    if name == "triton":
        if _import_error("triton") is not None:
            return "triton is not installed (pip install triton)"
        if not torch.cuda.is_available() and not _interpreter_on():
            return "triton kernels need a CUDA device (none found; TRITON_INTERPRET=1 runs them on CPU for tests)"
        return _import_error("pe_kernels.triton")
    if name == "cuda":
        err = _import_error("pe_kernels.cuda")
        if err is not None:
            return err
        from pe_kernels.cuda import _ext

        if not _ext.is_built():
            return _ext.load_error() or "pe_kernels._C is not built"
        if not torch.cuda.is_available():
            return "the cuda backend needs a CUDA device (none found)"
        return None
    raise ValueError(f"unknown backend {name!r}")


def backends() -> dict[str, BackendStatus]:
    """Each backend's availability in this process, with the reason when it is unavailable."""
    out = {}
    for name in BACKENDS:
        reason = _static_reason(name)
        if reason is None:
            where = {"torch": "ATen (cuDNN on CUDA, native on CPU)",
                     "triton": "Triton interpreter on CPU" if not torch.cuda.is_available() else "Triton on CUDA",
                     "cuda": "pe_kernels._C on CUDA"}[name]
            out[name] = BackendStatus(name, True, where)
        else:
            out[name] = BackendStatus(name, False, reason)
    return out


def _call_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run a call on (device, dtype); None if it can."""
    reason = _static_reason(name)
    if reason is not None or name == "torch":
        return reason
    if dtype not in FAST_DTYPES:
        return f"the {name} backend handles float16, bfloat16 and float32, not {dtype}"
    if device.type == "cuda":
        return None
    if name == "triton" and device.type == "cpu" and _interpreter_on():
        return None
    return f"the {name} backend needs CUDA tensors, got a tensor on {device}"


@functools.lru_cache(maxsize=1)
def dispatch_table() -> tuple[dict, ...]:
    """Committed validated fast paths: entries {op, backend, arch ("sm_90"), dtypes, evidence}."""
    if not DISPATCH_TABLE_PATH.exists():
        return ()
    data = json.loads(DISPATCH_TABLE_PATH.read_text())
    return tuple(data.get("entries", ()))


@functools.lru_cache(maxsize=None)
def _cuda_arch(index: int) -> str:
    """'sm_90' for the CUDA device `index` (queried once per device, not on every op call)."""
    major, minor = torch.cuda.get_device_capability(index)
    return f"sm_{major}{minor}"


def _auto_choice(op: str, device: torch.device, dtype: torch.dtype) -> Dispatch:
    if device.type != "cuda":
        return Dispatch(op, "torch", f"auto: {device.type} tensors run on the torch reference path")
    arch = _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    dtype_name = str(dtype).replace("torch.", "")
    for entry in dispatch_table():
        if entry.get("op") == op and entry.get("arch") == arch and dtype_name in entry.get("dtypes", ()):
            backend = entry["backend"]
            reason = _call_reason(backend, device, dtype)
            if reason is None:
                return Dispatch(op, backend, f"auto: validated on {arch} ({entry.get('evidence', 'bench/results')})")
            return Dispatch(op, "torch", f"auto: {backend} is listed for {op} on {arch} but {reason}")
    return Dispatch(op, "torch", f"auto: no validated fast path for {op} ({dtype_name}) on {arch} in the "
                                 "dispatch table; using the cuDNN/ATen reference")


def select(op: str, device: torch.device, dtype: torch.dtype) -> tuple[ModuleType, Dispatch]:
    """The backend module that runs `op` for tensors on (device, dtype), and why it was chosen."""
    name = requested_backend()
    if name == "auto":
        choice = _auto_choice(op, device, dtype)
    else:
        reason = _call_reason(name, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"pe_kernels backend {name!r} was requested for {op} but {reason}")
        choice = Dispatch(op, name, "requested")
    _last.set(choice)
    return _module(choice.backend), choice


def last_dispatch() -> Optional[Dispatch]:
    """The most recent backend choice in this context (op, backend, reason)."""
    return _last.get()
