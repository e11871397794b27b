"""Helpers shared by the Triton launchers: interpreter detection, argument checks, tile choice, launching.

Nothing here queries a GPU at import time. `INTERPRET` is read once, at import, because `triton.jit` itself
decides at decoration time whether a kernel becomes an interpreted function (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported on a machine without CUDA).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

# dtypes the kernels take for activations; fp64 goes to the reference backend.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _disable_interpreter_overflow_sanitizer() -> None:
    """The interpreter's integer-overflow sanitizer costs ~2.5x and checks nothing we rely on."""
    try:
        from triton.runtime.interpreter import interpreter_builder
        interpreter_builder.options = dataclasses.replace(interpreter_builder.options, sanitize_overflow=False)
    except (ImportError, AttributeError, TypeError):  # another Triton version: keep its defaults
        pass


if INTERPRET:
    _disable_interpreter_overflow_sanitizer()


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def pow2_tile(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (tl.dot needs >= 16 per dimension on a GPU)."""
    return max(lo, min(hi, triton.next_power_of_2(max(int(n), 1))))


def upcast_bf16(dtype: torch.dtype) -> bool:
    """bf16 tl.dot returns garbage under the interpreter (triton #11584): feed it fp32 operands there."""
    return INTERPRET and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot input precision: TF32 for fp32 operands when torch allows it for convolutions, else IEEE."""
    if dtype == torch.float32 and torch.backends.cudnn.allow_tf32:
        return "tf32"
    return "ieee"


def check_activation_dtype(name: str, t: Tensor) -> None:
    if t.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"triton backend: {name} has dtype {t.dtype}; supported: fp16, bf16, fp32 "
                        "(use the torch backend for other dtypes)")


def check_4d(name: str, t: Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 4:
        raise ValueError(f"{name} must be 4-D (N, C, H, W), got shape {tuple(t.shape)} (rank {t.dim()})")


def check_same_device(device: torch.device, **tensors: Optional[Tensor]) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != device:
            raise ValueError(f"{name} is on {t.device} but the input is on {device}")


def check_shape(name: str, t: Optional[Tensor], shape: Sequence[int]) -> None:
    if t is not None and tuple(t.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def check_vector(name: str, t: Optional[Tensor], length: int) -> None:
    """A per-channel vector: 1-D of `length` elements, floating point (any stride)."""
    if t is None:
        return
    if t.dim() != 1 or t.numel() != length:
        raise ValueError(f"{name} must be a 1-D tensor of {length} elements, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{name} must be floating point, got {t.dtype}")


def pair(name: str, v: Sequence[int], minimum: int) -> tuple[int, int]:
    v = tuple(int(i) for i in v)
    if len(v) != 2 or min(v) < minimum:
        raise ValueError(f"{name} must be two integers >= {minimum}, got {v}")
    return v


def empty_channels_last(shape: Sequence[int], dtype: torch.dtype, device: torch.device) -> Tensor:
    return torch.empty(tuple(shape), dtype=dtype, device=device, memory_format=torch.channels_last)


def strides4(t: Optional[Tensor]) -> tuple[int, int, int, int]:
    """Element strides of a 4-D tensor in logical (N, C, H, W) order; zeros for an absent tensor."""
    return tuple(t.stride()) if t is not None else (0, 0, 0, 0)


@triton.jit
def nhwc_tile(pid_m, pid_k, M, K, H, W, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr):
    """Indices of one (BLOCK_M x BLOCK_K) tile of the (M = N*H*W) x K view of a 4-D tensor.

    Returns (offs_m, offs_k, mask_m, mask_k, n, h, w, k) with n, h, w, k in int64 for address math."""
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    n = (offs_m // (H * W)).to(tl.int64)
    hw = offs_m % (H * W)
    h = (hw // W).to(tl.int64)
    w = (hw % W).to(tl.int64)
    return offs_m, offs_k, offs_m < M, offs_k < K, n, h, w, offs_k.to(tl.int64)


@triton.jit
def tile_offsets(n, h, w, k, s_n, s_c, s_h, s_w):
    """Element offsets (rows x channels) of a 4-D tensor with strides (s_n, s_c, s_h, s_w)."""
    return (n * s_n + h * s_h + w * s_w)[:, None] + (k * s_c)[None, :]


def launch(kernel, tuned_kernel, grid, args: tuple, meta: dict, tiles: Optional[dict]) -> None:
    """Run `tuned_kernel` (autotuned on a GPU), or `kernel` with explicit `tiles` (the interpreter's single
    config, or a caller's override such as a small-tile test)."""
    if tiles is not None:
        kernel[grid](*args, **meta, **tiles)
    else:
        tuned_kernel[grid](*args, **meta)
