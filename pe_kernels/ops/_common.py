"""Helpers shared by the op files: argument checks, autocast casting, optional-gradient packing."""

from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Sequence

import torch

Tensor = torch.Tensor

# A custom op cannot return None: a gradient that is not needed travels as this empty marker.
def empty_grad(like: Tensor) -> Tensor:
    return like.new_empty((0,))


def empty_channels_last(like: Tensor, shape, dtype: Optional[torch.dtype] = None) -> Tensor:
    """An uninitialised channels_last tensor on like's device (what fake implementations return)."""
    return torch.empty(shape, dtype=dtype or like.dtype, device=like.device, memory_format=torch.channels_last)


def unpack_grads(grads: Iterable[Tensor]) -> list[Optional[Tensor]]:
    return [None if g.numel() == 0 and g.dim() == 1 else g for g in grads]


def pack_grads(grads: Iterable[Optional[Tensor]], likes: Sequence[Optional[Tensor]], anchor: Tensor) -> list[Tensor]:
    """Gradients as a custom op may return them: empty markers for None, each in storage of its own from
    offset 0, as the fake implementation promises (a backend may hand back views of one reduction buffer, or
    one tensor for two equal gradients, e.g. sum(g) for shift and residual_shift)."""
    out, seen = [], set()
    for g, _ in zip(grads, likes):
        if g is None:
            out.append(empty_grad(anchor))
            continue
        if g.storage_offset() != 0 or g.untyped_storage().data_ptr() in seen:
            g = g.clone()
        seen.add(g.untyped_storage().data_ptr())
        out.append(g)
    return out


_NULL = contextlib.nullcontext()
# Whether autocast is on for any device type: one C call (~0.15 us) before the per-device checks (torch >= 2.4;
# True, i.e. ask per device, where it is missing).
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
PLAIN_TENSORS = (torch.Tensor, torch.nn.Parameter)


def mark_written(*tensors: Optional[Tensor]) -> None:
    """Bump the version counters of tensors a kernel wrote in place (running statistics, num_batches_tracked), as
    ATen's in-place ops do: caches keyed by versions (functional.py's folded BatchNorm) then see the change. Absent
    tensors and inference tensors (no version counter) are skipped."""
    for t in tensors:
        if t is not None and not t.is_inference():
            torch.autograd.graph.increment_version(t)


def metadata_key(*values) -> Optional[tuple]:
    """A hashable key of an op's arguments as its checks see them: a plain tensor's (type, shape, strides, dtype,
    device), None and strings as they are, a bool / int / float with its type (1, 1.0 and True are checked
    differently), tuples / lists of ints with their type; None (no key: check every time) for anything else (a
    tensor subclass, a SymInt, ...)."""
    key = []
    for v in values:
        kind = type(v)
        if v is None or kind is str:
            key.append(v)
        elif kind is bool or kind is int or kind is float:
            key.append((kind, v))
        elif kind in PLAIN_TENSORS:
            key.append((kind, v.shape, v.stride(), v.dtype, v.device))
        elif kind is tuple or kind is list:
            for i in v:
                if type(i) is not int:
                    return None
            key.append((kind, *v))
        else:
            return None
    return tuple(key)


class CheckMemo:
    """The checks of an op's arguments memoised on their metadata (metadata_key): checks that read only shapes,
    strides, dtypes, devices and the scalar arguments (never a tensor's values) pass or raise alike for every call
    with the same key, so a key that passed once needs no second run; a check that raised stores nothing. Eager mode
    only: while torch.compile / export traces or a TorchDispatchMode is active the checks run every time (a memo
    lookup would become a guard on the memo, and shapes may be symbolic). Cleared at LIMIT entries."""

    LIMIT = 1024

    def __init__(self) -> None:
        self.results: dict = {}

    def run(self, check, *args):
        """check(*args)'s result (it must not depend on tensor values), computed once per metadata_key(*args)."""
        return self.run_keyed(check, *args)[0]

    def run_keyed(self, check, *args) -> tuple:
        """(run's result, the metadata key it was memoised under, or None where it was not: traced, a dispatch mode,
        an argument without a key). A caller may hand the key on (a backend's launch plan keyed on it)."""
        if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
            return check(*args), None
        key = metadata_key(*args)
        if key is None:
            return check(*args), None
        hit = self.results.get(key, self)
        if hit is self:
            hit = check(*args)
            if len(self.results) >= self.LIMIT:
                self.results.clear()
            self.results[key] = hit
        return hit, key


def no_autocast(device: torch.device):
    """Disable autocast inside an op's implementation (the public wrapper already cast the inputs); nothing to do
    (and no context to build) when it is off."""
    if _any_autocast() and device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type):
        return torch.autocast(device_type=device.type, enabled=False)
    return _NULL


def eager_context(ctx, setup_context, inputs: tuple, output):
    """An eager autograd.Function's ctx filled as the custom op's `setup_context` fills it, marked `eager` (its
    backward calls the backend directly) and with absent output gradients passed as None; returns `output`."""
    setup_context(ctx, inputs, output)
    ctx.eager = True
    ctx.set_materialize_grads(False)
    return output


def eager_dispatch(*tensors: Optional[Tensor]) -> bool:
    """True when an op may call its backend directly (an autograd.Function in eager mode) instead of going
    through torch.library's dispatch, whose Python layers cost ~90 us a call (measured on CPU, 2026-11): not
    while torch.compile or export traces, not under a TorchDispatchMode (FakeTensorMode, ...), only for plain
    tensors (a subclass may need the dispatcher). The registered custom op stays what tracing sees."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    for t in tensors:  # (a loop: no generator on this hot path)
        if t is not None and type(t) not in PLAIN_TENSORS:
            return False
    return True


def autocast_dtype(x: Tensor) -> Optional[torch.dtype]:
    """The dtype autocast would run a convolution in for `x`, or None when autocast is off."""
    if not _any_autocast() or not x.is_floating_point() or x.dtype == torch.float64:
        return None
    device_type = x.device.type
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_activation(t: Optional[Tensor], dtype: Optional[torch.dtype]) -> Optional[Tensor]:
    return t if t is None or dtype is None or t.dtype == dtype else t.to(dtype)


def cast_vector(t: Optional[Tensor], dtype: torch.dtype) -> Optional[Tensor]:
    return t if t is None or t.dtype == dtype else t.to(dtype)


def pair(value, name: str) -> list[int]:
    """[a, b] from an int, a 1-sequence (expanded, as ATen and nn.Conv2d do: padding=(1,)) or a 2-sequence."""
    if isinstance(value, int):
        return [value, value]
    try:
        values = list(value)
    except TypeError:  # a float, None, ...
        raise ValueError(f"{name} must be an int or a sequence of one or two ints, got {value!r}") from None
    if len(values) == 1:
        values = values * 2
    if len(values) != 2 or not all(isinstance(v, int) for v in values):
        raise ValueError(f"{name} must be an int or a sequence of one or two ints, got {value!r}")
    return values


def check_4d(t: Tensor, name: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)}")


def check_vector(t: Optional[Tensor], name: str, length: int, ref: Tensor) -> None:
    if t is None:
        return
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a Tensor or None, got {type(t).__name__}")
    if t.dim() != 1 or t.shape[0] != length:
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    check_same_device(t, name, ref)
    if not t.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {t.dtype}")


def check_same_device(t: Tensor, name: str, ref: Tensor) -> None:
    if t.device != ref.device:
        raise RuntimeError(f"{name} is on {t.device} but the input is on {ref.device}; move both to one device")


def check_floating(t: Tensor, name: str) -> None:
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
