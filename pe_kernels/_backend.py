"""Backend selection: which implementation (`torch`, `triton`, `cuda`) runs each op.

* `torch` (pe_kernels.reference): ATen — cuDNN on GPU, native kernels on CPU. Always available.
* `triton` (pe_kernels.triton): CUDA tensors; CPU tensors only under TRITON_INTERPRET=1 (tests).
* `cuda` (pe_kernels.cuda): the compiled extension pe_kernels._C, CUDA tensors.
* `auto` (the default): per op and call, the fastest correct backend measured on this device by
  `pe_kernels.autotune` (its on-disk cache, per op, shape key and dtype), else a fast path listed in the
  committed dispatch table (dispatch_table.json, written from GPU results that proved it correct and faster on
  that GPU architecture), else `torch`. Every fallback keeps a reason: `pe_kernels.last_dispatch()`.

Choose with `PE_KERNELS_BACKEND=<name>` or `with pe_kernels.use_backend(<name>):` (the context manager wins; names
are case-insensitive). A module that runs its submodules instead of its fused kernels (a hook on one of them, a
subclass: pe_kernels.nn) records that with `record()`, backend "modules".
A forced backend that cannot run the call raises BackendUnavailableError with the reason; it never falls back.
Nothing here touches a GPU at import.

Backward: the request in force when the forward ran governs its backward. use_backend() lives in a contextvar,
and autograd runs a CUDA backward on a device thread that does not see it, so each op records
`requested_backend()` in its autograd context and passes it to its backward op (`select(..., requested=)`).
A forced forward gets the same backend for the backward (or BackendUnavailableError); an `auto` forward gets
`auto`'s choice for the backward op itself (forward and backward kernels are validated separately). Under
torch.compile the request is read when the graph is traced. The backward's choice is recorded by
last_dispatch() in the context autograd ran it in (on CUDA: autograd's thread, not the caller's).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import importlib
import json
import os
import re
import sys
from pathlib import Path
from types import ModuleType
from typing import Callable, Iterator, Optional

import torch

BACKENDS = ("torch", "triton", "cuda")  # the built-in backends (registered below); backend_names() lists all
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


@dataclasses.dataclass(frozen=True)
class BackendSpec:
    """A backend as the dispatcher finds it (register_backend): the module implementing ops/contract.Backend and
    three questions, each answered without touching a GPU at import."""
    name: str
    module: str                                                   # importable module, e.g. "pe_kernels.triton"
    unavailable: Callable[[], Optional[str]]                      # why it cannot run in this process, else None
    call_reason: Callable[[torch.device, torch.dtype], Optional[str]]   # why not this call's (device, dtype)
    runs_on: Callable[[], str]                                    # where it runs, for backends() (when available)


_REGISTRY: dict[str, BackendSpec] = {}
_stock_choices: dict[tuple, object] = {}  # stock_path's answers per (op, request, device, dtype)
_requested_choices: dict[tuple, tuple] = {}  # select's runnable answers for a requested backend (select's key)
_env_parsed: dict[str, str] = {}  # PE_KERNELS_BACKEND values parsed
_modules: dict[str, ModuleType] = {}  # backend name -> its imported module


def register_backend(spec: BackendSpec) -> None:
    """Make backend `spec.name` selectable (use_backend, PE_KERNELS_BACKEND, autotune candidates). Its module
    must implement ops/contract.Backend (tests/test_ops.py checks the registered ones); it is imported when first
    selected. Re-registering a name of yours replaces it; the built-in ones (BACKENDS) cannot be replaced."""
    if not isinstance(spec, BackendSpec):
        raise TypeError(f"register_backend takes a BackendSpec, got {type(spec).__name__}")
    if not re.fullmatch(r"[a-z][a-z0-9_]*", spec.name) or spec.name == "auto":
        raise ValueError(f"backend name must be lower-case [a-z][a-z0-9_]* and not 'auto', got {spec.name!r}")
    if spec.name in BACKENDS and spec.name in _REGISTRY:
        raise ValueError(f"{spec.name!r} is a built-in backend: register yours under another name")
    _REGISTRY[spec.name] = spec
    _modules.pop(spec.name, None)
    _env_parsed.clear()
    _stock_choices.clear()
    _requested_choices.clear()


def unregister_backend(name: str) -> None:
    """Remove a backend registered with register_backend (the built-in ones cannot be removed)."""
    if name in BACKENDS:
        raise ValueError(f"{name!r} is a built-in backend")
    _REGISTRY.pop(name, None)
    _modules.pop(name, None)
    _env_parsed.clear()
    _stock_choices.clear()
    _requested_choices.clear()


def clear_choice_caches() -> None:
    """Forget the dispatcher's per-process answers (stock_path's, a requested backend's runnability, the parsed
    PE_KERNELS_BACKEND values): for a test that changes what they depend on by hand (an import state, a version, a
    module flag) rather than as a process would (the reason functions are in the keys, TRITON_INTERPRET in a CPU
    call's; registering a backend clears them). A CUDA call cached as runnable stays so if TRITON_INTERPRET changes
    later: its kernels were compiled for the GPU, and they run on CUDA tensors either way."""
    _env_parsed.clear()
    _stock_choices.clear()
    _requested_choices.clear()


def backend_names() -> tuple[str, ...]:
    """The registered backends, built-in ones first."""
    return tuple(_REGISTRY)


def _check_name(name: str, source: Optional[str] = None) -> str:
    """`name` as a registered backend or 'auto', case and surrounding whitespace ignored ('Torch ' -> 'torch').
    `source` names where it came from in the error (the environment variable)."""
    key = name.strip().lower() if isinstance(name, str) else name
    if key != "auto" and key not in _REGISTRY:
        what = f"{source}={name!r}" if source else f"pe_kernels backend {name!r}"
        raise ValueError(f"unknown {what}: choose one of {', '.join(backend_names() + ('auto',))} "
                         "(case-insensitive)")
    return key


def requested_backend() -> str:
    """The backend asked for: use_backend() context, else PE_KERNELS_BACKEND, else 'auto'."""
    forced = _forced.get()
    if forced is not None:
        return forced
    raw = os.environ.get("PE_KERNELS_BACKEND", "")
    parsed = _env_parsed.get(raw)
    if parsed is None:  # parsed once per value (an invalid one raises every time)
        parsed = _check_name(raw.strip() or "auto", "PE_KERNELS_BACKEND")
        _env_parsed[raw] = parsed
    return parsed


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
def _import_exception(module: str) -> Optional[BaseException]:
    """The exception importing `module` raised (None if it imports); recorded once, never raised here."""
    try:
        importlib.import_module(module)
    except Exception as exc:  # reported by backends() and on a forced call
        return exc
    return None


def _import_error(module: str) -> Optional[str]:
    """Why `module` cannot be imported, in words (None if it imports)."""
    exc = _import_exception(module)
    if exc is None:
        return None
    missing = exc.name if isinstance(exc, ImportError) else None
    if missing == "triton":
        return "triton is not installed (pip install triton)"
    if missing == "numpy":
        return ("numpy is missing: Triton's interpreter (TRITON_INTERPRET=1) imports it (pip install numpy)"
                if _interpreter_on() else f"numpy is missing ({module} needs it; pip install numpy)")
    return f"{module} failed to import: {type(exc).__name__}: {exc}"


def _module(name: str) -> ModuleType:
    """The backend's module (imported on first use; looked up once per registration, not per call)."""
    module = _modules.get(name)
    if module is None:
        spec = _REGISTRY.get(name)
        if spec is None:  # e.g. an autotune choice recorded for a backend unregistered since
            raise BackendUnavailableError(f"pe_kernels backend {name!r} is not registered "
                                          f"(registered: {', '.join(backend_names())})")
        module = _modules[name] = importlib.import_module(spec.module)
    return module


def _version_tuple(version: str) -> tuple[int, ...]:
    """(3, 6, 0) from '3.6.0', '3.6.0+git1234' or '2.4.0rc1' (leading integers only)."""
    return tuple(int(part) for part in re.findall(r"\d+", version.split("+")[0])[:3])


@functools.lru_cache(maxsize=None)
def _package_version(name: str) -> Optional[str]:
    """`name.__version__` of an importable package, else None (cached: versions do not change in a process)."""
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:
        return None


# Triton's interpreter before triton PR #9172 (in 3.8 and later, not in 3.6) turns one-element numpy arrays into
# Python ints with int(array), which numpy >= 2.4 refuses.
_INTERPRETER_FIXED_TRITON = (3, 7)
_NUMPY_SCALAR_STRICT = (2, 4)


def _interpreter_numpy_conflict() -> Optional[str]:
    """Why this triton's interpreter cannot run with this numpy (None when the pair works)."""
    triton_version, numpy_version = _package_version("triton"), _package_version("numpy")
    if triton_version is None or numpy_version is None:
        return None
    if (_version_tuple(triton_version) < _INTERPRETER_FIXED_TRITON
            and _version_tuple(numpy_version) >= _NUMPY_SCALAR_STRICT):
        return (f"triton {triton_version}'s interpreter (TRITON_INTERPRET=1) fails with numpy {numpy_version} "
                "(\"only 0-dimensional arrays can be converted to Python scalars\"): install numpy < 2.4 "
                "(pip install 'numpy<2.4') or triton >= 3.8")
    return None


def _interpreter_import_mismatch() -> Optional[str]:
    """Why kernels imported with another TRITON_INTERPRET setting than today's cannot run (None if consistent).

    triton.jit decides at decoration time whether a kernel is compiled for a GPU or interpreted, for Triton's
    own library functions (at `import triton`) and for ours (at `import pe_kernels.triton`)."""
    on = _interpreter_on()
    stale = []
    standard = sys.modules.get("triton.language.standard")
    if standard is not None and hasattr(standard, "cdiv"):
        if (type(standard.cdiv).__name__ == "InterpretedFunction") != on:
            stale.append("triton")
    common = sys.modules.get("pe_kernels.triton._common")
    if common is not None and getattr(common, "INTERPRET", on) != on:
        stale.append("pe_kernels.triton")
    if not stale:
        return None
    which = " and ".join(stale)
    if on:
        return (f"TRITON_INTERPRET=1 was set after {which} was imported, so its kernels were built for a GPU "
                "(Triton would fail with '0 active drivers'): set TRITON_INTERPRET=1 before importing triton "
                "or pe_kernels.triton (in the shell, or at the top of conftest.py)")
    return (f"TRITON_INTERPRET was 1 when {which} was imported and is now off, so its kernels stay interpreted "
            "(emulated on the CPU): set or unset TRITON_INTERPRET before importing triton or pe_kernels.triton")


def _triton_reason() -> Optional[str]:
    """Why the triton backend cannot run anywhere in this process (None if it can run somewhere)."""
    if _interpreter_on() and _package_version("numpy") is None:
        return "numpy is missing: Triton's interpreter (TRITON_INTERPRET=1) needs it (pip install numpy)"
    reason = _import_error("triton")
    if reason is not None:
        return reason
    if not torch.cuda.is_available() and not _interpreter_on():
        return "triton kernels need a CUDA device (none found; TRITON_INTERPRET=1 runs them on CPU for tests)"
    reason = _interpreter_import_mismatch()
    if reason is None and _interpreter_on():
        reason = _interpreter_numpy_conflict()
    return reason or _import_error("pe_kernels.triton")


def _cuda_reason() -> Optional[str]:
    """Why the cuda backend cannot run anywhere in this process (None if it can run somewhere)."""
    err = _import_error("pe_kernels.cuda")
    if err is not None:
        return err
    from pe_kernels.cuda import _ext

    if not _ext.is_built():
        return _ext.load_error() or "pe_kernels._C is not built"
    if not torch.cuda.is_available():
        return "the cuda backend needs a CUDA device (none found)"
    return None


def _kernel_call_reason(name: str, interpreted: bool):
    """call_reason of a kernel backend: fp16/bf16/fp32 CUDA tensors (and CPU tensors where `interpreted` and
    TRITON_INTERPRET=1)."""
    def reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
        if dtype not in FAST_DTYPES:
            return f"the {name} backend handles float16, bfloat16 and float32, not {dtype}"
        if device.type == "cuda" or (interpreted and device.type == "cpu" and _interpreter_on()):
            return None
        return f"the {name} backend needs CUDA tensors, got a tensor on {device}"
    return reason


for _spec in (
    BackendSpec("torch", "pe_kernels.reference", lambda: None, lambda device, dtype: None,
                lambda: "ATen (cuDNN on CUDA, native on CPU)"),
    BackendSpec("triton", "pe_kernels.triton", _triton_reason, _kernel_call_reason("triton", True),
                lambda: "Triton interpreter on CPU" if not torch.cuda.is_available() else "Triton on CUDA"),
    BackendSpec("cuda", "pe_kernels.cuda", _cuda_reason, _kernel_call_reason("cuda", False),
                lambda: "pe_kernels._C on CUDA"),
):
    register_backend(_spec)


def _static_reason(name: str) -> Optional[str]:
    """Why backend `name` cannot run anywhere in this process (None if it can run somewhere)."""
    spec = _REGISTRY.get(name)
    if spec is None:
        raise ValueError(f"unknown backend {name!r}")
    return spec.unavailable()


def backends() -> dict[str, BackendStatus]:
    """Each registered backend's availability in this process, with the reason when it is unavailable."""
    out = {}
    for name, spec in _REGISTRY.items():
        reason = spec.unavailable()
        out[name] = BackendStatus(name, True, spec.runs_on()) if reason is None else BackendStatus(name, False,
                                                                                                    reason)
    return out


def _call_reason(name: str, device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why backend `name` cannot run a call on (device, dtype); None if it can."""
    reason = _static_reason(name)
    return reason if reason is not None else _REGISTRY[name].call_reason(device, dtype)


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


@functools.lru_cache(maxsize=1)
def _autotune_module() -> ModuleType:
    # imported on first use: pe_kernels.tuning imports this module
    return importlib.import_module("pe_kernels.tuning")


def _auto_choice(op: str, device: torch.device, dtype: torch.dtype, args: tuple = ()) -> Dispatch:
    """What `auto` runs: this device's measured choice (pe_kernels.autotune cache, per op + shape key of `args`
    + dtype), else the committed dispatch table (the prior), else torch."""
    measured = _autotune_module().lookup(op, device, dtype, args)
    if measured is not None:
        return measured
    if device.type != "cuda":
        return Dispatch(op, "torch", f"auto: {device.type} tensors run on the torch reference path")
    arch, dtype_name, entry = _table_entry(op, device, dtype)
    if entry is not None:
        backend = entry["backend"]
        reason = _call_reason(backend, device, dtype)
        if reason is None:
            return Dispatch(op, backend, f"auto: validated on {arch} ({entry.get('evidence', 'bench/results')})")
        return Dispatch(op, "torch", f"auto: {backend} is listed for {op} on {arch} but {reason}")
    return Dispatch(op, "torch", f"auto: no validated fast path for {op} ({dtype_name}) on {arch} in the "
                                 "dispatch table; using the cuDNN/ATen reference")


def _table_entry(op: str, device: torch.device, dtype: torch.dtype) -> tuple[str, str, Optional[dict]]:
    """(arch, dtype name, the dispatch table's first entry for `op` on this CUDA device's arch and dtype or None)."""
    arch = _cuda_arch(device.index if device.index is not None else torch.cuda.current_device())
    dtype_name = str(dtype).replace("torch.", "")
    for entry in dispatch_table():
        if entry.get("op") == op and entry.get("arch") == arch and dtype_name in entry.get("dtypes", ()):
            return arch, dtype_name, entry
    return arch, dtype_name, None


def stock_path(op: str, device: torch.device, dtype: torch.dtype) -> Optional[Dispatch]:
    """Dispatch(op, 'torch', why) when a whole layer runs as the stock modules' ATen ops (F.conv2d, BatchNorm2d's
    F.batch_norm, relu: cuDNN on a GPU, with stock launches and host cost), else None (the layer runs the kernels'
    ops, each choosing its backend with select()). Stock: the torch backend requested, or `auto` with neither a
    measured choice on this device (pe_kernels.autotune) nor a validated fast path for `op` in the dispatch table."""
    name = requested_backend()
    if name != "torch" and (name != "auto" or _autotune_module().has_choices(device)):
        return None
    key = (op, name, device, dtype)
    choice = _stock_choices.get(key)
    if choice is None:  # the decision depends on nothing else (the dispatch table is read once)
        choice = _stock_choices[key] = _stock_choice(op, name, device, dtype)
    return choice or None


def _stock_choice(op: str, name: str, device: torch.device, dtype: torch.dtype):
    """stock_path's answer (False for the kernels' path) for request `name` ('torch', or 'auto' with nothing
    measured)."""
    if name == "torch":
        return Dispatch(op, "torch", "requested: the stock modules' ATen ops")
    if device.type != "cuda":
        return Dispatch(op, "torch", f"auto: {device.type} tensors run the stock modules' ATen ops")
    arch, dtype_name, entry = _table_entry(op, device, dtype)
    if entry is not None:
        return False
    return Dispatch(op, "torch", f"auto: no validated fast path for {op} ({dtype_name}) on {arch} in the dispatch "
                                 "table; the stock modules' ATen ops (cuDNN)")


def select(op: str, device: torch.device, dtype: torch.dtype,
           requested: Optional[str] = None, args: tuple = ()) -> tuple[ModuleType, Dispatch]:
    """The backend module that runs `op` for tensors on (device, dtype), and why it was chosen.

    `requested` (a backward op passes the request its forward recorded) replaces the current request.
    `args`: the arguments the backend will get, for `auto`'s measured choices (pe_kernels.autotune)."""
    name = requested_backend() if not requested else _check_name(requested)
    if name == "auto":
        choice = _auto_choice(op, device, dtype, args)
        _last.set(choice)
        return _module(choice.backend), choice
    # A requested backend: its answer depends only on this key (the reason functions are in it, so a test's or a
    # tool's replacement of them is a new key), and only a runnable answer is kept. The interpreter switch decides
    # what CPU tensors can run, so it is in a CPU call's key; a CUDA call reads no environment here (its kernels
    # were compiled for the GPU whatever the variable says later).
    interpret = os.environ.get("TRITON_INTERPRET") if device.type == "cpu" else None
    key = (op, name, not requested, device, dtype, interpret, _call_reason, _static_reason)
    hit = _requested_choices.get(key)
    if hit is None:
        reason = _call_reason(name, device, dtype)
        if reason is not None:
            raise BackendUnavailableError(f"pe_kernels backend {name!r} was requested for {op} but {reason}")
        hit = (_module(name), Dispatch(op, name, "requested" if not requested else "requested when its forward ran"))
        if len(_requested_choices) >= 1024:
            _requested_choices.clear()
        _requested_choices[key] = hit
    _last.set(hit[1])
    return hit


def record(op: str, backend: str, reason: str) -> None:
    """Record a choice made above the ops as last_dispatch() (what select() does for an op): a module that ran
    its submodules one by one instead of its fused kernels records (its class name, "modules", why)."""
    _last.set(Dispatch(op, backend, reason))


def record_dispatch(choice: Dispatch) -> None:
    """record() of a Dispatch already made (stock_path's cached answers: no new object per call)."""
    _last.set(choice)


def last_dispatch() -> Optional[Dispatch]:
    """The most recent backend choice in this context (op, backend, reason). A backward that autograd ran on
    another thread (CUDA) records its choice there, not here."""
    return _last.get()
