"""`pe_kernels.autotune`: measure the backends on the user's own device and let `auto` use the fastest correct one.

For every (op, shape key, dtype) met while running a model, each available backend (torch, triton, cuda) is

1. run once on copies of the op's inputs (an op that mutates its inputs, bn_running_update, never sees the
   originals) and checked against the float64 reference within the error budget of DESIGN.md,
   |out - ref64| <= 2 |torch_same_dtype - ref64| + atol * max(1, max|ref64|), elementwise;
   a backward that reads its forward's output (conv_fused_backward: y, the accumulator its statistics term
   uses, and stats) is checked on a y and stats recomputed by the float64 reference and stored in their dtype,
   because the reference recomputes the accumulator from x and weight: the forward's own rounding (TF32's,
   amplified by 2 * grad_stats[1] and summed over N*P*Q in the weight gradient) would otherwise be charged to
   the backward; the forward is checked in its own row (`_consistent_inputs`);
2. timed if correct: `warmup` calls, then the median of `repeats` single calls (CUDA events on a GPU), on the
   op's real inputs.

The fastest correct backend is cached on disk (PE_KERNELS_CACHE_DIR, default ~/.cache/pe_kernels/), one file
per device name and compute capability, valid only for the torch/triton/pe_kernels versions that wrote it.
`auto` consults that cache first; the committed dispatch table stays the prior. A refused backend is reported
with its error (wrong results) or its exception. PE_KERNELS_AUTOTUNE=1 (read once) tunes each new key on its
first call under `auto`. Hot path: a few cached lookups per call; once a device has choices, a shape key and a
dict lookup (no GPU query: the device name and capability are read once per device).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib.metadata
import json
import os
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch

from . import _backend, reference
from ._backend import Dispatch, backend_names
from .ops._common import no_autocast

Timer = Callable[[str, str, Callable[[], object]], float]  # (op, backend, one call) -> milliseconds
# atol of the error budget, relative to max|ref64| (as tests/_oracle.py). fp32 under TF32 gets fp16's: TF32 rounds
# the operands to fp16's 10 mantissa bits (measured on an H100, 2026-11-22: a x4 fp32 atol refused a correct TF32
# Triton conv, max err 1.0e-2, while cuDNN had picked a non-TF32 algorithm for the same call).
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2, torch.float64: 1e-9}


@dataclasses.dataclass(frozen=True)
class Choice:
    """What was chosen for one (op, shape, dtype) on one device, and why."""
    op: str
    shape: str                  # readable summary of the shape key
    dtype: str
    backend: str
    median_ms: dict             # backend -> median ms of the correct candidates
    refused: dict               # backend -> why it was not a candidate (wrong results, exception, unavailable)

    @property
    def why(self) -> str:
        t = self.median_ms
        if self.backend == "torch" or "torch" not in t:
            return "fastest correct" if len(t) > 1 else "only correct candidate"
        return f"{t['torch'] / t[self.backend]:.2f}x torch"


@dataclasses.dataclass(frozen=True)
class AutotuneReport:
    device: str
    cache_file: str
    rows: tuple

    def __str__(self) -> str:
        lines = [f"pe_kernels.autotune on {self.device}; cache {self.cache_file}"]
        if not self.rows:
            return lines[0] + "\n(no pe_kernels op ran: nothing to tune)"
        head = ("op", "dtype", "shape", "chosen", "why") + tuple(f"{b} ms" for b in backend_names())
        table = [head] + [(r.op, r.dtype, r.shape, r.backend, r.why) +
                          tuple(f"{r.median_ms[b]:.4g}" if b in r.median_ms else "-" for b in backend_names())
                          for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(head))]
        lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in table]
        refused = sorted({(b, why) for r in self.rows for b, why in r.refused.items()})
        lines += [f"refused {b}: {why}" for b, why in refused]
        return "\n".join(lines)


# ---- keys, devices, cache files -------------------------------------------------------------------------------

def _key_item(a):
    if isinstance(a, torch.Tensor):
        return a.shape
    if isinstance(a, list):
        return tuple(a)
    return None if isinstance(a, float) else a  # eps, momentum: no effect on speed


def shape_key(args: tuple) -> tuple:
    """Cheap key of an op call: layout of its first tensor, then each argument (tensor -> shape, int, bool,
    int list; floats dropped). E.g. conv_fused: x and weight shapes, which optional inputs are present,
    the relu/stats flags, stride, padding, dilation, groups."""
    first = args[0] if args and isinstance(args[0], torch.Tensor) else None
    layout = first is not None and first.dim() == 4 and first.is_contiguous(memory_format=torch.channels_last)
    return (layout,) + tuple(map(_key_item, args))


@functools.lru_cache(maxsize=None)
def _arg_names(op: str) -> tuple:
    return tuple(a.name for a in getattr(torch.ops.pe_kernels, op).default._schema.arguments)


@functools.lru_cache(maxsize=None)
def _mutated(op: str) -> tuple:
    """Positions of the arguments `op` writes to (bn_running_update: running_mean, running_var)."""
    args = getattr(torch.ops.pe_kernels, op).default._schema.arguments
    return tuple(i for i, a in enumerate(args) if a.alias_info is not None and a.alias_info.is_write)


def describe(op: str, key: tuple) -> str:
    """'x=2x8x8x8 weight=8x4x3x3 stride=1x1 ... groups=2' from a shape key."""
    parts = []
    for name, v in zip(_arg_names(op), key[1:]):
        if isinstance(v, tuple) and len(v) >= 2 and not any(isinstance(i, bool) for i in v):
            parts.append(f"{name}={'x'.join(map(str, v))}")
        elif type(v) is int:
            parts.append(f"{name}={v}")
    return " ".join(parts)


@functools.lru_cache(maxsize=None)
def _identity(device_type: str, index: Optional[int]) -> tuple[str, str]:
    """(device name, arch) of a device, queried once per device."""
    if device_type == "cuda":
        index = torch.cuda.current_device() if index is None else index
        major, minor = torch.cuda.get_device_capability(index)
        return torch.cuda.get_device_name(index), f"sm_{major}{minor}"
    return device_type, device_type


def _versions() -> dict:
    try:
        triton = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        triton = None
    return {"torch": torch.__version__, "triton": triton, "pe_kernels": sys.modules["pe_kernels"].__version__}


def default_cache_dir() -> Path:
    return Path(os.environ.get("PE_KERNELS_CACHE_DIR") or Path.home() / ".cache" / "pe_kernels")


def cache_file(cache_dir: Path, ident: tuple[str, str]) -> Path:
    name, arch = ident
    return Path(cache_dir) / f"autotune-{re.sub(r'[^A-Za-z0-9]+', '-', name).strip('-')}-{arch}.json"


def _tuplify(v):
    return tuple(map(_tuplify, v)) if isinstance(v, list) else v


def read_cache(path: Path, ident: tuple[str, str]) -> dict:
    """{(op, shape key, dtype): record} from `path`; empty when missing, for another device or other versions."""
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("device") != list(ident) or data.get("versions") != _versions():
        return {}
    return {(r["op"], _tuplify(json.loads(r["key"])), r["dtype"]): r for r in data.get("choices", ())}


def write_cache(path: Path, ident: tuple[str, str], records: dict) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"device": list(ident), "versions": _versions(), "choices": list(records.values())}
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)


def _dispatch(op: str, ident: tuple[str, str], backend: str) -> Dispatch:
    return Dispatch(op, backend, f"auto: {backend} measured fastest correct on {ident[0]} ({ident[1]}) "
                                 "by pe_kernels.autotune")


# In-memory choices per device identity, loaded once from the default cache dir, updated by tuning.
_tables: dict[tuple[str, str], dict[tuple, Dispatch]] = {}


def _table(ident: tuple[str, str]) -> dict:
    table = _tables.get(ident)
    if table is None:
        records = read_cache(cache_file(default_cache_dir(), ident), ident)
        table = _tables[ident] = {k: _dispatch(k[0], ident, r["backend"]) for k, r in records.items()}
    return table


# ---- measuring one op call -------------------------------------------------------------------------------------

def wall_timer(op: str, backend: str, fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def cuda_event_timer(op: str, backend: str, fn: Callable[[], object]) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def _copy(args: tuple, dtype: Optional[torch.dtype] = None) -> tuple:
    """Fresh copies of the tensor arguments (same strides), optionally cast (floating tensors only)."""
    return tuple(a.detach().to(dtype=dtype if dtype and a.is_floating_point() else a.dtype, copy=True)
                 if isinstance(a, torch.Tensor) else a for a in args)


def _run(module, op: str, args: tuple) -> list:
    """The op's results, then the arguments it mutated, as a flat list of tensors."""
    with torch.no_grad(), no_autocast(args[0].device):
        out = getattr(module, op)(*args)
    outs = list(out) if isinstance(out, (tuple, list)) else [] if out is None else [out]
    return [t for t in outs if t is not None] + [args[i] for i in _mutated(op)]


def _consistent_inputs(op: str, args: tuple) -> tuple:
    """`args` for the correctness check: conv_fused_backward's forward outputs `y` and `stats` replaced by the
    float64 reference's, stored as the forward stores them (y in its dtype and strides, stats of the accumulator
    rounded to x.dtype, in fp32). Other ops: `args` unchanged.

    Why: the triton and cuda backwards read the saved y as the accumulator of the grad_stats[1] term (DESIGN.md:
    the backward reads the saved output instead of recomputing the forward), while the reference recomputes it
    from x and weight. With a TF32 forward, y carries the forward's operand rounding; Triton feeds fp32 operands
    to the tensor cores unrounded (truncated to TF32, triton-lang/triton#4574), so that error is one-signed and
    adds up coherently: 2 * grad_stats[1] * (y - acc) summed against x over N*P*Q in the weight gradient.
    Measured on an H100 (2026-11-22, tests/test_autotune.py, a PackedConvBNReLU2d step): one weight-gradient
    element off by 0.0285 with a budget of ~0.028 from a correct backward; emulated on CPU (truncated TF32
    forward, 60 seeds) half of such steps are refused, none once y is consistent. The forward's error is judged
    in the forward's own row (conv_fused)."""
    if op != "conv_fused_backward":
        return args
    args = list(args)
    (x, weight, bias, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu, stride, padding,
     dilation, groups, y) = args[2:17]
    stats = args[18] if len(args) > 18 else None
    f64 = lambda t: t.detach().to(torch.float64) if isinstance(t, torch.Tensor) else t  # noqa: E731
    with torch.no_grad(), no_autocast(x.device):
        y64, _ = reference.conv_fused(f64(x), f64(weight), f64(bias), f64(in_scale), f64(in_shift), in_relu,
                                      f64(out_scale), f64(out_shift), f64(residual), out_relu, stride, padding,
                                      dilation, groups, False)
        if isinstance(y, torch.Tensor) and tuple(y.shape) == tuple(y64.shape):
            args[16] = torch.empty_like(y).copy_(y64)  # y's dtype and strides
        if isinstance(stats, torch.Tensor) and stats.numel():
            acc64, _ = reference.conv_fused(f64(x), f64(weight), f64(bias), f64(in_scale), f64(in_shift), in_relu,
                                            None, None, None, False, stride, padding, dilation, groups, False)
            args[18] = reference._stats(reference.stored_acc(acc64, x.dtype)).to(stats.dtype).contiguous()
    return tuple(args)


def _overflowed(o: torch.Tensor, r: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Where an infinite output is the dtype's range, not a wrong answer: the float64 reference's magnitude is at
    least half the dtype's largest finite value (an fp16 intermediate of that size may overflow in any correct
    order of summation), with the reference's sign. (Measured on an H100, 2026-11-23: autotune's fp16 training step
    of PE-(2,4,1) refused cuDNN's own backward, 9979 of 16.8 M grad_x elements inf where the reference was finite.)
    Elsewhere an inf still fails the check."""
    if not (dtype.is_floating_point and torch.finfo(dtype).bits < 64):
        return torch.zeros_like(o, dtype=torch.bool)
    return o.isinf() & (r.abs() >= 0.5 * torch.finfo(dtype).max) & (o.sign() == r.sign())


def check(outs: list, same: list, ref64: list, dtype: torch.dtype, device: torch.device) -> Optional[str]:
    """None if `outs` is within the error budget, else what is wrong (an inf where the reference is near the dtype's
    largest value counts as overflow: _overflowed)."""
    if len(outs) != len(ref64):
        return f"returned {len(outs)} tensors, the reference {len(ref64)}"
    tf32 = device.type == "cuda" and dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    for i, (o, s, r) in enumerate(zip(outs, same, ref64)):
        if tuple(o.shape) != tuple(r.shape):
            return f"output {i} has shape {tuple(o.shape)}, the reference {tuple(r.shape)}"
        if r.numel() == 0:
            continue
        o, s = o.to(r.device, torch.float64), s.to(r.device, torch.float64)
        atol = ATOL[torch.float16 if tf32 else dtype] * max(1.0, r.abs().max().item())
        err = (o - r).abs()
        bad = ~(err <= 2 * (s - r).abs() + atol) & ~(o.isnan() & r.isnan()) & ~_overflowed(o, r, dtype)
        if bad.any():
            return (f"wrong on this device: output {i}: {int(bad.sum())} of {bad.numel()} elements outside the "
                    f"error budget (max err {err.nan_to_num(float('inf')).max().item():.3g})")
    return None


def measure(op: str, args: tuple, device: torch.device, dtype: torch.dtype, *, timer: Optional[Timer] = None,
            warmup: int = 3, repeats: int = 15, candidates: Optional[Mapping[str, object]] = None) -> Choice:
    """Check and time every available backend on one call of `op` (its backend-level arguments `args`).
    `candidates` replaces the module of a backend (tests inject one that is wrong or raises)."""
    timer = timer or (cuda_event_timer if device.type == "cuda" else wall_timer)
    candidates = dict(candidates or {})
    unknown = set(candidates) - set(backend_names())
    if unknown:
        raise ValueError(f"candidates {sorted(unknown)} are not backends; choose among {backend_names()}")
    checked = _consistent_inputs(op, args)
    ref64 = _run(reference, op, _copy(checked, torch.float64))
    same = _run(reference, op, _copy(checked))
    median_ms, refused = {}, {}
    for name in backend_names():
        why = _backend._call_reason(name, device, dtype)
        if why is not None:
            refused[name] = f"unavailable: {why}"
            continue
        module = candidates.get(name) or _backend._module(name)
        try:
            why = check(_run(module, op, _copy(checked)), same, ref64, dtype, device)
        except Exception as exc:  # a backend that raises is refused, with the exception
            why = f"raised {type(exc).__name__}: {exc}"
        if why is not None:
            refused[name] = why
            continue
        work, fn = _copy(args), getattr(module, op)
        with torch.no_grad(), no_autocast(device):
            for _ in range(warmup):
                fn(*work)
            median_ms[name] = statistics.median(timer(op, name, lambda: fn(*work)) for _ in range(repeats))
    if "torch" not in median_ms:
        raise RuntimeError(f"autotune: the torch reference failed on {op}: {refused.get('torch')}")
    best = min(median_ms, key=median_ms.get)
    return Choice(op, describe(op, shape_key(args)), str(dtype).replace("torch.", ""), best, median_ms, refused)


# ---- sessions: autotune(model) and PE_KERNELS_AUTOTUNE=1 ----------------------------------------------------------

@dataclasses.dataclass
class _Session:
    cache_dir: Path
    remeasure: bool              # autotune(): measure every key met; first-call tuning: only unknown keys
    timer: Optional[Timer] = None
    warmup: int = 3
    repeats: int = 15
    candidates: Optional[Mapping[str, object]] = None
    rows: dict = dataclasses.field(default_factory=dict)
    devices: dict = dataclasses.field(default_factory=dict)  # ident -> cache file


_session: Optional[_Session] = None  # global, not a contextvar: autograd runs backward on other threads


@functools.lru_cache(maxsize=1)
def _first_call_session() -> Optional[_Session]:
    if os.environ.get("PE_KERNELS_AUTOTUNE", "0").strip() not in ("1", "true", "yes"):
        return None
    return _Session(default_cache_dir(), remeasure=False)


def has_choices(device: torch.device) -> bool:
    """True while pe_kernels.autotune measures (a session, or PE_KERNELS_AUTOTUNE=1), or when this device has
    measured choices on disk: then `auto` asks lookup() op by op."""
    if _session is not None or _first_call_session() is not None:
        return True
    return bool(_table(_identity(device.type, device.index)))


def lookup(op: str, device: torch.device, dtype: torch.dtype, args: tuple) -> Optional[Dispatch]:
    """`auto`'s first question: a measured choice for this call (tuning it first when a session asks)."""
    ident = _identity(device.type, device.index)
    table = _table(ident)
    session = _session or _first_call_session()
    if not table and session is None:
        return None
    key = (op, shape_key(args), str(dtype).replace("torch.", ""))
    choice = table.get(key)
    if (session is not None and (choice is None or (session.remeasure and (ident, key) not in session.rows))
            and not (device.type == "cuda" and torch.cuda.is_current_stream_capturing())):
        choice = table[key] = _tune(session, ident, key, args, device, dtype)
    if choice is None or _backend._call_reason(choice.backend, device, dtype) is not None:
        return None
    return choice


def _tune(session: _Session, ident: tuple, key: tuple, args: tuple, device: torch.device,
          dtype: torch.dtype) -> Dispatch:
    """Measure one call; record the row in the session and the choice in the session's cache file."""
    op, shape, dtype_name = key
    row = measure(op, args, device, dtype, timer=session.timer, warmup=session.warmup, repeats=session.repeats,
                  candidates=session.candidates)
    session.rows[(ident, key)] = row
    path = session.devices.setdefault(ident, cache_file(session.cache_dir, ident))
    records = read_cache(path, ident)
    records[key] = {"op": op, "key": json.dumps(shape), "dtype": dtype_name, "shape": row.shape,
                    "backend": row.backend, "median_ms": row.median_ms, "refused": row.refused}
    write_cache(path, ident, records)
    return _dispatch(op, ident, row.backend)


def autotune(model: torch.nn.Module, *example_inputs, backward: bool = False, cache_dir=None,
             timer: Optional[Timer] = None, warmup: int = 3, repeats: int = 15,
             candidates: Optional[Mapping[str, object]] = None) -> AutotuneReport:
    """Measure every backend on each pe_kernels op that `model(*example_inputs)` runs (and its backward when
    `backward=True`, model in train mode), keep the fastest correct one per (op, shape, dtype, device), cache
    it on disk for `auto`, and return a table of the choices. Runs on a copy of the model (its parameters,
    gradients and BatchNorm statistics are left untouched). Autocast applies if the caller enabled it."""
    global _session
    if backward and not model.training:
        raise ValueError("autotune(backward=True) times a training step: call model.train() first")
    if _session is not None:
        raise RuntimeError("pe_kernels.autotune is already running")
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got warmup={warmup}, repeats={repeats}")
    session = _Session(Path(cache_dir) if cache_dir is not None else default_cache_dir(), True, timer, warmup,
                       repeats, candidates)
    twin = copy.deepcopy(model)
    _session = session
    try:
        with _backend.use_backend("auto"):
            if backward:
                out = twin(*example_inputs)
                outs = out.values() if isinstance(out, dict) else out if isinstance(out, (tuple, list)) else [out]
                outs = [t for t in outs if isinstance(t, torch.Tensor) and t.requires_grad]
                if not outs:
                    raise ValueError("autotune(backward=True): the model's output does not require grad")
                sum(t.float().sum() for t in outs).backward()
            else:
                with torch.no_grad():
                    twin(*example_inputs)
    finally:
        _session = None
    device = ", ".join(f"{name} ({arch})" for name, arch in session.devices) or "no device"
    files = ", ".join(str(p) for p in session.devices.values()) or str(session.cache_dir)
    return AutotuneReport(device, files, tuple(session.rows.values()))
