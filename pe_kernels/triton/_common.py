"""Helpers shared by the Triton launchers: interpreter detection, argument checks, tile choice, launching.

Nothing here queries a GPU at import time. `INTERPRET` is read once, at import, because `triton.jit` itself
decides at decoration time whether a kernel becomes an interpreted function (tests/conftest.py sets
TRITON_INTERPRET=1 before any kernel module is imported on a machine without CUDA).

PE_KERNELS_TRITON_CONFIG (read once, at import, into `CONFIG_POLICY`; never on the hot path) chooses how an
autotuned kernel is launched on a GPU:
  autotune (default)  Triton's autotuner: the first launch of each new autotune key compiles and benchmarks
                      every config, then runs the fastest.
  first               the first config of the kernel's list, launched directly: one compile per specialisation
                      and no benchmarking. For test runs (tests/conftest.py sets it on a GPU machine, where the
                      ~1150 tests otherwise spend most of their time compiling and benchmarking configs they do
                      not test) and for a quick first step. Every config is still checked by
                      tests/test_triton_configs.py, which launches each one explicitly.
Under the interpreter the launchers pass explicit tiles, so the variable changes nothing there. A test or a tool
may change `CONFIG_POLICY` at run time (monkeypatch); the launch reads the module attribute.
"""

from __future__ import annotations

import dataclasses
import os
import threading
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"

CONFIG_POLICIES = ("autotune", "first")


def config_policy_from_env(value: Optional[str]) -> str:
    """PE_KERNELS_TRITON_CONFIG's value as one of CONFIG_POLICIES (unset or empty: autotune; case-insensitive)."""
    policy = (value or "autotune").strip().lower()
    if policy not in CONFIG_POLICIES:
        raise ValueError(f"unknown PE_KERNELS_TRITON_CONFIG={value!r}: choose one of {', '.join(CONFIG_POLICIES)}")
    return policy


CONFIG_POLICY = config_policy_from_env(os.environ.get("PE_KERNELS_TRITON_CONFIG"))

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


def next_pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1), in plain Python (triton.next_power_of_2 is a
    ConstexprFunction whose call costs ~2.5 us on the host in Triton 3.9; launchers call this one)."""
    return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


def pow2_tile(n: int, lo: int, hi: int) -> int:
    """Smallest power of two >= n, clamped to [lo, hi] (tl.dot needs >= 16 per dimension on a GPU)."""
    return max(lo, min(hi, next_pow2(max(int(n), 1))))


def gpu_tile_k(dtype: torch.dtype, length: int) -> int:
    """A conv GEMM's tile along R*S*C_g (the forward's reduction, the wgrad's columns; the dgrad's R*S*K_g) on a GPU,
    for `length` of it: 64 for 2-byte operands, 32 for fp32 (TF32 or IEEE) ones, whose 64-deep tiles spilled
    registers; a length up to 32, the power of two >= it (>= 16): the stem's 27 (3 channels) in one 32-deep step, its
    64-deep tiles spilled too, and the narrow groups' 1x1 layers (R*S*C_g or R*S*K_g = 32) in one full 32-deep step
    (tap steps) instead of a half-masked 64-deep one spanning no tap: fp16 sm_90, their dgrad 109 -> 51 us and
    forwards 65 -> 52, 33 -> 21 us modelled, at their roofline floors (bench/kernel_audit.py). A shorter last step
    is masked."""
    full = 32 if dtype == torch.float32 else 64
    return full if length > 32 else pow2_tile(length, 16, full)


def gpu_tap_tile_k(dtype: torch.dtype, taps: int, channels: int) -> int:
    """gpu_tile_k for a reduction over `taps` filter taps of `channels` channels each (tap-major): 32 instead of 64
    where 32 divides the channels and 64 does not, with more than one tap (a 3x3 layer's 32- or 96-channel groups),
    so that every step lies in one tap (tap_steps: the tap as scalars) instead of spanning two (a division per
    element). More steps, each cheaper: a 32-channel 3x3 layer's loop SASS per program (9 steps of 32, not 5 of
    64) forward 1245 -> 981, dgrad with g_acc on load 3615 -> 2889 (bench/kernel_audit.py, fp16 sm_90). A
    single tap keeps the dtype's tile (the narrow 1x1 layers share the others' compiled kernels)."""
    block = gpu_tile_k(dtype, taps * channels)
    if taps > 1 and block == 64 and channels % 64 != 0 and channels % 32 == 0:
        return 32
    return block


def divisor_magic(d: int) -> tuple[int, int]:
    """(m, s) for fast_div by d >= 1: x // d == umulhi(x, m) >> s for every 0 <= x < 2**31 (the round-up method:
    l = ceil(log2 d), m = ceil(2**(31 + l) / d) < 2**32, s = l - 1; exact because x (m d - 2**(31 + l)) < 2**31 d
    <= 2**(31 + l)); (2**31, 0) for d = 1 (fast_div returns x). m >= 2**31 always: one argument type (int64) for
    every divisor, so one compiled kernel."""
    d = int(d)
    if d < 1:
        raise ValueError(f"divisor_magic: the divisor must be >= 1, got {d}")
    if d == 1:
        return 1 << 31, 0
    lg = (d - 1).bit_length()
    return -(-(1 << (31 + lg)) // d), lg - 1


@triton.jit
def fast_div(x, d, m, s):
    """x // d for int32 0 <= x < 2**31 and the host's divisor_magic(d) = (m, s): a high multiply and a shift instead
    of a 32-bit division (~20 instructions with a runtime divisor)."""
    q = (tl.umulhi(x.to(tl.uint32), m.to(tl.uint32)) >> s.to(tl.uint32)).to(tl.int32)
    return tl.where(d == 1, x, q)


@triton.jit
def advance_tap(c0, s, r, BLOCK: tl.constexpr, C, S):
    """The next full step of a tap-major reduction (tap (r, s), channels c0 .. c0 + BLOCK - 1 of C, S taps a row;
    TAP_STEPS): c0 + BLOCK, or the next tap's first channels, or the next row's first tap. Scalars, no division."""
    c0 += BLOCK
    next_tap = c0 >= C
    c0 = tl.where(next_tap, 0, c0)
    s = tl.where(next_tap, s + 1, s)
    next_row = s >= S
    s = tl.where(next_row, 0, s)
    r = tl.where(next_row, r + 1, r)
    return c0, s, r


def tap_steps(channels: int, block: int) -> bool:
    """Whether every `block`-deep step of a conv GEMM's reduction over j = (tap, channel), channel fastest, is full and
    lies in one filter tap: `channels` a multiple of `block`. The kernels then carry the step's tap as scalars and
    form bounds and offsets per row, without a reduction-column mask (TAP_STEPS); otherwise a step may span taps and
    they split j per element (a division by the channel count per column)."""
    return channels % block == 0


def pack_groups(groups: int, columns: int, channels: int, block_n: int, block_k: int) -> int:
    """Groups per program of a grouped conv GEMM whose column tile is `block_n` over `columns` a group (the forward's
    K_g, the dgrad's C_g), reducing over taps of `channels` a group (C_g, K_g) `block_k` a step: 2 where the tile is
    exactly two groups' columns, the groups even and every step in one tap (tap_steps), else 1. Two groups of 32
    share a step's rows, bounds and offsets, its barriers and pipeline bookkeeping, where one left half of a
    64-column tile masked (the loops are issue-bound, bench/kernel_audit.py). Two products, not one block-diagonal
    one: a non-finite value of one group must not reach the other's columns (0 * inf = NaN)."""
    return 2 if block_n == 2 * columns and groups % 2 == 0 and tap_steps(channels, block_k) else 1


def dense_rows(strides: Sequence[int], n: int, h: int, w: int) -> bool:
    """Whether an (n, c, h, w) tensor of these element strides (logical NCHW order) puts row m = (i h + y) w + x at
    m * stride_w for every (i, y, x): channels_last and its likes. A GEMM reducing over rows then addresses them as m
    times one stride, without (i, y, x) (two divisions and three 64-bit products per row and operand layout)."""
    sn, _, sh, sw = strides
    return (h == 1 or sh == w * sw) and (n == 1 or sn == h * w * sw)


def wide_tiles(dtype: torch.dtype) -> bool:
    """Whether a GEMM may take the wider tiles (128 columns, the wgrad's 128-deep j tile on 8 warps): tensor-core
    operands only (fp16, bf16, TF32). IEEE fp32 (TF32 off) runs tl.dot on FMAs with the tile in registers: the wider
    tiles spilled there (wgrad up to 784 B on sm_90, bench/kernel_audit.py)."""
    return dtype != torch.float32 or dot_precision(dtype) == "tf32"


def gpu_tile_n(n: int, steps_in_one_tap: bool, dtype: torch.dtype) -> int:
    """A conv GEMM's column tile on a GPU for `n` columns per group (the forward's K_g, the dgrad's C_g): 128 for groups
    of 128 and more whose reduction steps each lie in one filter tap (tap_steps), else 64 (narrower groups are masked;
    wider ones take several column blocks). The per-step work of the A operand (addresses, masks, async copies: the
    loops are issue-bound, bench/kernel_audit.py) is shared by twice the MMA work with 128 columns. The per-element
    split of j (the stem, narrow groups) spilled registers with 128 columns, as did 4-warp configs with the prologue
    / finalize epilogues before the tap steps (bench/kernel_audit.py); so did IEEE fp32 (wide_tiles)."""
    return 128 if n >= 128 and steps_in_one_tap and wide_tiles(dtype) else 64


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
    """An uninitialised channels_last (NHWC) tensor: torch.empty_strided with channels_last_strides (the strides
    torch.empty(memory_format=torch.channels_last) gives, for every shape; half its host cost)."""
    shape = tuple(shape)
    return torch.empty_strided(shape, channels_last_strides(shape), dtype=dtype, device=device)


def krsc_strides(weight: Tensor) -> tuple[int, int, int, int]:
    """The strides krsc(weight) gives, in logical (K, C_g, R, S) order: (R*S*C_g, 1, S*C_g, C_g)."""
    _, C_g, R, S = weight.shape
    return (R * S * C_g, 1, S * C_g, C_g)


def channels_last_strides(shape: Sequence[int]) -> tuple[int, ...]:
    """The strides of empty_channels_last(shape, ...): torch's rule (the raw sizes, size-0 and size-1 dims
    included), in plain Python: no ATen op (a launch counter would count a meta tensor's)."""
    _, C, H, W = shape
    return (H * W * C, 1, W * C, C)


def krsc(weight: Tensor) -> tuple[Tensor, tuple[int, int, int, int]]:
    """(weight, strides): the weight (K, C_g, R, S) in KRSC memory order (channels_last) and its strides
    (R*S*C_g, 1, S*C_g, C_g) in logical order, also for size-1 dims (whose strides are never used), so B-operand
    loads are contiguous along c and 1x1 and 3x3 convolutions share compiled kernels. No copy (no launch) for a
    weight that is already channels_last-contiguous or a 1x1 filter; a KCRS 3x3 weight is copied per launch, never
    cached across calls: a version-keyed cache went stale under fused optimizers (which write parameters without
    bumping their version counters) and kept allocations alive in torch.compile's CUDA-graph pools (both seen on an
    H100, tests/test_cuda_graphs.py). A model in channels_last (model.to(memory_format=torch.channels_last)) has no
    copy at all; in eval, functional.py's cast cache hands the launchers channels_last weights."""
    strides = krsc_strides(weight)
    if weight.is_contiguous(memory_format=torch.channels_last):
        return weight, strides
    with torch.no_grad():
        return weight.detach().contiguous(memory_format=torch.channels_last), strides


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


@triton.jit
def store_part(part_ptr, pid_m, M, slot_elems, offs, mask, value, PART_M: tl.constexpr, BLOCK_M: tl.constexpr):
    """Store one program's per-column partial sum `value` into a partial-sum buffer of cdiv(M, PART_M) slots.

    The buffer's layout does not depend on the launch config: a program of BLOCK_M = j * PART_M rows owns
    slots pid_m*j ... pid_m*j + j-1 and writes `value` into the first, zeros into the others (masked to the
    buffer). So every config writes the whole buffer: an autotuner's trials leave nothing stale, and the
    buffer needs no zeroing. `part_ptr` points at this sum's column block (slot 0), `slot_elems` is the slot
    stride in elements, `offs`/`mask` the columns."""
    n_slots = tl.cdiv(M, PART_M)
    for jj in tl.static_range(BLOCK_M // PART_M):
        slot = pid_m * (BLOCK_M // PART_M) + jj
        ptrs = part_ptr + slot.to(tl.int64) * slot_elems + offs
        # (the slot test as a vector: the interpreter rejects a scalar mask broadcast into a block)
        in_buffer = mask & (tl.zeros_like(offs) + slot < n_slots)
        if jj == 0:
            tl.store(ptrs, value, mask=in_buffer)
        else:
            tl.store(ptrs, tl.zeros_like(value), mask=in_buffer)


def part_rows(configs, tiles: Optional[dict], interpret_block_m: int) -> int:
    """PART_M, the rows per partial-sum slot: an explicit tile's BLOCK_M, the interpreter's single BLOCK_M, or
    the smallest BLOCK_M among the autotune configs (every config's BLOCK_M is a multiple of it)."""
    if tiles is not None and tiles.get("BLOCK_M") is not None:
        return int(tiles["BLOCK_M"])
    if INTERPRET:
        return interpret_block_m
    sizes = [c.kwargs["BLOCK_M"] for c in configs]
    smallest = min(sizes)
    if any(s % smallest for s in sizes):
        raise ValueError(f"autotune BLOCK_M sizes {sizes} must be multiples of the smallest")
    return smallest


_ALLOCATOR_THREAD: list = []  # [ThreadPoolExecutor]: made on the first CUDA buffer a cache keeps


def persistent(device: torch.device, make) -> Tensor:
    """`make()`'s tensor, allocated so that no private memory pool claims it: for a buffer a module-level cache keeps
    beyond the call. torch.compile(mode="reduce-overhead") warms its CUDA graphs up with every allocation of the
    calling thread routed to the graph tree's private pool (`_cuda_beginAllocateCurrentThreadToPool`), and a pool
    block still alive after the warm-up fails its check ("tensor(s) in the cudagraph pool not tracked as outputs").
    So on CUDA `make` runs on one helper thread, with the caller's device and current stream: the tensor comes from
    the ordinary caching allocator, owned by the caller's stream, and whatever `make` enqueues (a memset, a copy)
    precedes the caller's next launch on that stream. Caches miss rarely (first use per device/stream, growth), so
    the hand-off is off the hot path. On CPU (the interpreter), `make()` here."""
    if device.type != "cuda":
        return make()
    if not _ALLOCATOR_THREAD:
        with _ALLOCATOR_LOCK:
            if not _ALLOCATOR_THREAD:
                from concurrent.futures import ThreadPoolExecutor
                _ALLOCATOR_THREAD.append(ThreadPoolExecutor(max_workers=1, thread_name_prefix="pe_kernels-alloc"))
    index = device.index if device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(index)

    def on_helper() -> Tensor:
        with torch.cuda.device(index), torch.cuda.stream(stream):
            return make()

    return _ALLOCATOR_THREAD[0].submit(on_helper).result()


_ALLOCATOR_LOCK = threading.Lock()
_DUMMIES: dict = {}


def dummy(device: torch.device, dtype: torch.dtype = torch.float32) -> Tensor:
    """A 16-byte aligned tensor for pointer arguments a launch does not use (their loads are compiled out). fp32 for
    all float arguments: one dtype for all of them keeps compile and autotune keys independent of which arguments are
    absent (the autotuner keys on every tensor argument's dtype); int32 for an absent int32 counter buffer, for the
    same reason. Made once per device and dtype (one launch, `persistent`), not per call; while a CUDA graph
    captures, a miss is not cached (the tensor belongs to the graph's pool)."""
    t = _DUMMIES.get((device, dtype))
    if t is None:
        if capturing(device):
            return torch.zeros(16 // dtype.itemsize, dtype=dtype, device=device)
        t = _DUMMIES[(device, dtype)] = persistent(
            device, lambda: torch.zeros(16 // dtype.itemsize, dtype=dtype, device=device))
    return t


_IDENTITIES: dict = {}


def capturing(device: torch.device) -> bool:
    """Whether a CUDA graph captures on the current stream (never on CPU)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def identity_vector(value: float, length: int, device: torch.device) -> Tensor:
    """A read-only contiguous fp32 vector of `length` copies of `value` (1.0 or 0.0: an absent scale or shift),
    a view of a per-device cached buffer: no launch per call (one when the buffer is made or grown, to a power of
    two). Made on the host and copied synchronously, so that a kernel on any stream sees it filled; not cached
    while a CUDA graph captures (the graph's own copy is filled by the captured launch). A buffer replaced by a
    larger one is kept alive (_RETIRED_IDENTITIES): a CUDA graph captured with a view of it reads it in every
    replay. Allocated by `persistent` (no private pool keeps it)."""
    key = (device, float(value))
    buf = _IDENTITIES.get(key)
    if buf is None or buf.numel() < length:
        if capturing(device):
            return torch.full((int(length),), float(value), dtype=torch.float32, device=device)
        if buf is not None:
            _RETIRED_IDENTITIES.append(buf)
        size = next_pow2(max(int(length), 16))
        buf = _IDENTITIES[key] = persistent(
            device, lambda: torch.full((size,), float(value), dtype=torch.float32).to(device))
    return buf[:length]


_RETIRED_IDENTITIES: list = []  # identity buffers replaced by larger ones: never freed (a few KB in all)


_COUNTERS: dict = {}


def stream_counters(n: int, device: torch.device) -> Tensor:
    """At least `n` int32 counters, all 0, for a launch whose last-arriving programs (last_arrival) reset the counters
    they use: no launch per call. One buffer per (device, CUDA stream), made with torch.zeros on first use (one
    launch, on that stream) and again only when a launch needs more counters (grown to a power of two, the old buffer
    dropped: the caching allocator reuses its memory in stream order). Launches on one stream run one after the other,
    so no two of them use the counters at the same time; a launch on another stream has its own buffer. Under the
    interpreter (CPU) launches run on the calling thread: one buffer per (device, thread). While a CUDA graph captures,
    a fresh zeroed buffer for this launch only (a memset node of the graph), never cached: a cached buffer baked into a
    graph would be shared with whatever runs on the stream the graph is replayed on. Allocated by `persistent`: the
    warm-up of torch.compile(mode="reduce-overhead") runs on the graph tree's own stream, whose buffer must not be
    made in the tree's private pool."""
    if capturing(device):
        return torch.zeros(max(int(n), 1), dtype=torch.int32, device=device)
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        # a tensor's device has its index; a caller's "cuda" gets the stream's ("cuda:0"): one buffer, not two
        key = (device if device.index is not None else stream.device, stream.cuda_stream)
    else:
        key = (device, threading.get_ident())
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        size = next_pow2(max(int(n), 64))
        buf = _COUNTERS[key] = persistent(device, lambda: torch.zeros(size, dtype=torch.int32, device=device))
    return buf


def affine_pair(scale: Optional[Tensor], shift: Optional[Tensor], length: int, like: Tensor
                ) -> tuple[Tensor, Tensor]:
    """(scale, shift) as contiguous vectors, the absent one as its identity (cached ones / zeros: no launch), so
    that a kernel has one affine flag instead of one per vector. The modules always pass both. A vector that is
    already contiguous is passed as it is (no copy)."""
    scale = identity_vector(1.0, length, like.device) if scale is None else scale.contiguous()
    shift = identity_vector(0.0, length, like.device) if shift is None else shift.contiguous()
    return scale, shift


# ---------------------------------------------------------------------------------------------------------------
# Reductions of per-slot partial sums, inside the kernels: deterministic (fixed order), no atomics on values.
# ---------------------------------------------------------------------------------------------------------------
REDUCE_SLOTS = 32  # slots summed per step by sum_slot_rows (a constexpr: one value, one compile)

# Two-level reductions. A launch's per-column totals over thousands of slots (batch 128: 2048-4096) were summed by one
# program per column block, slot block after slot block: a serial tail of ~1-3 us a step on one SM while the others
# idled (Nsight Compute on an H100, bench/results/RUNS_20261123.md; kernel_audit.py's SUM_STEP_US, MERGE_STEP_US).
# Now the slots are grouped in chunks of CHUNK_SLOTS: the last program of a chunk to arrive sums the chunk into a
# level-2 slot (two steps), and the last chunk to arrive sums the level-2 slots (one step per REDUCE_SLOTS chunks).
# Fixed orders at both levels, so the bits do not depend on which program is last. Under the interpreter a small
# chunk, so that the tests' few slots make several chunks.
CHUNK_SLOTS = 4 if INTERPRET else 64


def slot_chunks(slots_per_phase: int, phases: int = 1) -> int:
    """Level-2 slots of a two-level reduction: chunks of CHUNK_SLOTS slots, a phase's last chunk short (the dgrad's
    stride phases own their slots apart)."""
    return phases * cdiv(slots_per_phase, CHUNK_SLOTS)


def chunk_counters(n_cols: int, n_chunks: int) -> int:
    """int32 counters of a two-level reduction over `n_cols` column blocks: the column blocks' own (0 .. n_cols-1),
    one spare (n_cols: the forward's num_batches_tracked), then one per (column block, chunk)."""
    return n_cols + 1 + n_cols * n_chunks


@triton.jit
def slot_chunk(tile, tiles_ph, phase, slots_ph, PROGS: tl.constexpr, CHUNK: tl.constexpr):
    """The chunk of M tile `tile` (of `tiles_ph` in its phase; a launch without phases: phase 0, tiles_ph every
    tile) for a two-level reduction over `slots_ph` slots a phase, a tile owning BLOCK_M / PART_M consecutive slots
    and a chunk PROGS = CHUNK * PART_M / BLOCK_M tiles: (chunk index over all phases, tiles that arrive at its
    counter, its first slot over all phases, its slot count). A phase of slots_ph slots has cdiv(slots_ph, CHUNK)
    chunks whatever BLOCK_M (cdiv(tiles_ph, PROGS) is that too): the level-2 layout does not depend on the config."""
    tl.static_assert(PROGS >= 1, "a chunk must hold at least one tile's slots (CHUNK * PART_M >= BLOCK_M)")
    local = tile // PROGS
    chunk = phase * tl.cdiv(slots_ph, CHUNK) + local
    arrivals = tl.minimum(tiles_ph - local * PROGS, PROGS)
    first = phase * slots_ph + local * CHUNK
    count = tl.minimum(slots_ph - local * CHUNK, CHUNK)
    return chunk, arrivals, first, count


@triton.jit
def sum_slot_rows(part_ptr, n_slots, slot_elems, K, offs, mask, ROW0: tl.constexpr, ROW1: tl.constexpr,
                  ROW2: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Per column `offs` (BLOCK_C of them, `mask`ed), the fp32 sums over slots 0 .. n_slots-1 of rows 0, 1, 2 (those
    asked for; row i at part_ptr + i*K of each slot, slot stride `slot_elems` elements; zeros for a row not asked
    for): BLOCK_S slots per step, every row's loaded before any is summed (one memory latency a step, not one per
    row), summed in registers, the steps in slot order. A fixed order whoever runs it: deterministic. The loads bypass
    L1 (.cg): a program that arrived last (last_arrival) reads what the other programs of its launch wrote."""
    t0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    for s0 in range(0, n_slots, BLOCK_S):
        slots = s0 + tl.arange(0, BLOCK_S)
        ptrs = part_ptr + (slots.to(tl.int64) * slot_elems)[:, None] + offs[None, :]
        m = (slots < n_slots)[:, None] & mask[None, :]
        if ROW0:
            v0 = tl.load(ptrs, mask=m, other=0.0, cache_modifier=".cg")
        if ROW1:
            v1 = tl.load(ptrs + K, mask=m, other=0.0, cache_modifier=".cg")
        if ROW2:
            v2 = tl.load(ptrs + 2 * K, mask=m, other=0.0, cache_modifier=".cg")
        if ROW0:
            t0 += tl.sum(v0, axis=0)
        if ROW1:
            t1 += tl.sum(v1, axis=0)
        if ROW2:
            t2 += tl.sum(v2, axis=0)
    return t0, t1, t2


@triton.jit
def sum_chunks_if_last(part_ptr, level2_ptr, slot_elems, K, sem_ptr, col, n_cols, n_chunks, chunk, arrivals, first,
                       count, offs, mask, ROW0: tl.constexpr, ROW1: tl.constexpr, ROW2: tl.constexpr,
                       BLOCK_S: tl.constexpr, BLOCK_C: tl.constexpr):
    """Two-level per-column totals of rows 0, 1, 2 (those asked for; row i at part_ptr + i*K in each slot of
    `slot_elems` elements) for column block `col` (columns `offs`, `mask`ed). Each program arrives at its chunk's
    counter (sem_ptr + n_cols + 1 + col * n_chunks + chunk; slot_chunk gives chunk, arrivals, first, count); the last
    of the chunk sums its `count` slots from `first` (sum_slot_rows, slot order), and, with more than one chunk, stores
    them in level-2 slot `chunk` (level2_ptr, same slot layout) and arrives at the column block's counter
    (sem_ptr + col), whose last program sums the n_chunks level-2 slots in chunk order. Counters reset by their last
    programs. Returns (t0, t1, t2, final): `final` is true in the one program per column block holding the totals."""
    t0 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t1 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    t2 = tl.zeros((BLOCK_C,), dtype=tl.float32)
    csem = sem_ptr + n_cols + 1 + col * n_chunks + chunk
    chunk_last = last_arrival(csem, arrivals)
    final = chunk_last & (n_chunks == 1)
    if chunk_last:
        tl.store(csem, 0)
        t0, t1, t2 = sum_slot_rows(part_ptr + tl.cast(first, tl.int64) * slot_elems, count, slot_elems, K, offs, mask,
                                   ROW0, ROW1, ROW2, BLOCK_S, BLOCK_C)
        if n_chunks > 1:
            dst = level2_ptr + tl.cast(chunk, tl.int64) * slot_elems + offs
            if ROW0:
                tl.store(dst, t0, mask=mask)
            if ROW1:
                tl.store(dst + K, t1, mask=mask)
            if ROW2:
                tl.store(dst + 2 * K, t2, mask=mask)
            final = last_arrival(sem_ptr + col, n_chunks)
            if final:
                tl.store(sem_ptr + col, 0)
                t0, t1, t2 = sum_slot_rows(level2_ptr, n_chunks, slot_elems, K, offs, mask, ROW0, ROW1, ROW2,
                                           BLOCK_S, BLOCK_C)
    return t0, t1, t2, final


@triton.jit
def apply_prologue(a, scale_ptr, shift_ptr, c, mask_c, valid, IN_RELU: tl.constexpr):
    """x' = act(a * scale[c] + shift[c]) of a loaded tile `a` (columns c, `mask_c`ed vectors), in fp32, rounded to
    a's dtype as the dot reads it; 0 where not `valid` (the prologue acts on real pixels only: zero padding stays
    zero). The conv forward's prologue and the backward's recomputed x' (conv_bwd): one expression
    (prologue_values)."""
    return prologue_values(a, tl.load(scale_ptr + c, mask=mask_c, other=0.0).to(tl.float32),
                           tl.load(shift_ptr + c, mask=mask_c, other=0.0).to(tl.float32), valid, IN_RELU)


@triton.jit
def prologue_values(a, scale, shift, valid, IN_RELU: tl.constexpr):
    """apply_prologue with its fp32 column vectors at hand (`scale`, `shift`: loaded once where every step reads the
    same channels). With the ReLU, -inf is added where not `valid` before it (the masked elements were loaded as 0:
    x' is 0 there): one add per element, where a select after the ReLU was moved past the rounding by the compiler,
    onto the packed fp16 / bf16 halves (~2.5 instructions per element; fp16 sm_90: a 32-channel 3x3 layer's training
    forward 366 -> 332 SASS a step, its wgrad 453 -> 414, bench/kernel_audit.py); fp32 keeps the select (one
    instruction, nothing packed). Exact wherever shift is finite (a non-finite shift, a BatchNorm without variance
    nor eps, gives NaN at padding instead of 0: the valid x' of that channel are already non-finite)."""
    af = a.to(tl.float32) * scale[None, :] + shift[None, :]
    if IN_RELU:
        if a.dtype != tl.float32:
            af = af + tl.where(valid, 0.0, float("-inf"))
            return tl.maximum(af, 0.0, propagate_nan=tl.PropagateNan.ALL).to(a.dtype)
        af = tl.maximum(af, 0.0, propagate_nan=tl.PropagateNan.ALL)
    return tl.where(valid, af, 0.0).to(a.dtype)


@triton.jit
def dot_acc(a, b, acc, TRANS: tl.constexpr, PRECISION: tl.constexpr):
    """acc + a b; with TRANS, acc holds (a b)^T and gets b^T a^T: the operand formed in registers (the forward's x',
    the wgrad's g_acc) becomes the MMA's B operand, read from shared memory (TRANS_ACC; tl.trans(acc) after the
    loop)."""
    if TRANS:
        acc = tl.dot(tl.trans(b), tl.trans(a), acc, input_precision=PRECISION)
    else:
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
    return acc


@triton.jit
def last_arrival(sem_ptr, arrivals):
    """True in the last of the `arrivals` programs that call it on the int32 counter at `sem_ptr` (which must be 0
    when the first arrives; the last program resets it with tl.store(sem_ptr, 0) once done). The barrier orders
    every thread's earlier stores before the counter's release; the counter's acquire (and the barrier Triton
    places after a scalar atomic) orders the last program's later loads after every other program's stores.
    Counting only: the values themselves are reduced in a fixed order (sum_slot_rows), never with atomics."""
    tl.debug_barrier()
    return tl.atomic_add(sem_ptr, 1, sem="acq_rel", scope="gpu") == arrivals - 1


@triton.jit(do_not_specialize=["n_slots", "K"])
def _sum_slots_kernel(
    part_ptr,       # (n_slots, rows, K) fp32 contiguous partial sums, then (chunks, rows, K) level-2 slots
    out0_ptr, out1_ptr, out2_ptr,   # out: (K,) contiguous, any float dtype: the totals of rows 0, 1, 2 (or unused)
    sem_ptr,        # (chunk_counters(column blocks, chunks),) int32 counters, 0 at launch, left at 0
    n_slots, K,     # slots, channels
    ROWS: tl.constexpr,          # rows per slot (<= 3)
    OUT0: tl.constexpr, OUT1: tl.constexpr, OUT2: tl.constexpr,   # which rows' totals are written
    BLOCK_S: tl.constexpr, BLOCK_K: tl.constexpr, CHUNK: tl.constexpr,
):
    """Per-channel totals of rows of a partial-sum buffer, in two levels as the kernels' in-launch sums
    (sum_chunks_if_last): program (column block, chunk) sums its chunk of CHUNK slots, the last chunk of a column
    block the chunks' totals; each written in its output's dtype."""
    col = tl.program_id(0)
    offs = col * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = offs < K
    chunk, arrivals, first, count = slot_chunk(tl.program_id(1), tl.num_programs(1), 0, n_slots, 1, CHUNK)
    level2 = part_ptr + tl.cast(n_slots, tl.int64) * ROWS * K
    t0, t1, t2, final = sum_chunks_if_last(part_ptr, level2, ROWS * K, K, sem_ptr, col, tl.num_programs(0),
                                           tl.num_programs(1), chunk, arrivals, first, count, offs, mask, OUT0, OUT1,
                                           OUT2, BLOCK_S, BLOCK_K)
    if final:
        if OUT0:
            tl.store(out0_ptr + offs, t0.to(out0_ptr.dtype.element_ty), mask=mask)
        if OUT1:
            tl.store(out1_ptr + offs, t1.to(out1_ptr.dtype.element_ty), mask=mask)
        if OUT2:
            tl.store(out2_ptr + offs, t2.to(out2_ptr.dtype.element_ty), mask=mask)


def reduce_slots(part: Tensor, n_slots: int, outputs: Sequence[tuple[int, Optional[Tensor]]]) -> None:
    """One launch: for each (row, out) with `out` given, out[k] = sum over slots of part[slot, row, k], in out's
    dtype, in two levels (chunks of CHUNK_SLOTS slots in parallel, then the chunks: fixed orders, deterministic).
    `part` is (n_slots + slot_chunks(n_slots), rows, K) fp32 contiguous: the n_slots slots, then room for the chunks'
    level-2 slots; rows <= 3, each row at most once; each out a contiguous (K,) tensor of its own. The counters are
    the stream's (stream_counters)."""
    rows, K = part.shape[1], part.shape[2]
    outputs = [(row, out) for row, out in outputs if out is not None]
    if not outputs or K == 0:
        return
    given = [row for row, _ in outputs]
    if rows > 3 or len(set(given)) != len(given) or not all(0 <= row < rows for row in given):
        raise ValueError(f"reduce_slots sums distinct rows of at most 3, got rows {given} of a {rows}-row buffer")
    chunks = slot_chunks(n_slots)
    if part.shape[0] != n_slots + chunks:
        raise ValueError(f"reduce_slots needs {n_slots} + {chunks} slots (the chunks' level-2 room), "
                         f"got {part.shape[0]}")
    if n_slots == 0:   # the sums of nothing (no program would run)
        for _, out in outputs:
            out.zero_()
        return
    unused = dummy(part.device)
    by_row = dict(outputs)
    block_k = 128  # one tile everywhere (interpreter included): one compile, and the suite's compile count is the GPU's
    cols = cdiv(K, block_k)
    sems = stream_counters(chunk_counters(cols, chunks), part.device)
    _sum_slots_kernel[(cols, chunks)](
        part, *(by_row.get(row, unused) for row in range(3)), sems, n_slots, K, ROWS=rows, OUT0=0 in by_row,
        OUT1=1 in by_row, OUT2=2 in by_row, BLOCK_S=REDUCE_SLOTS, BLOCK_K=block_k, CHUNK=CHUNK_SLOTS, num_warps=4)


def tensor_key(t: Optional[Tensor]) -> Optional[tuple]:
    """A tensor's metadata as a launch plan depends on it: (shape, strides, dtype, device); None when absent; the
    type of anything else (the plan's checks then raise their error, and a plan that raised is never stored)."""
    if t is None:
        return None
    if isinstance(t, Tensor):
        return (t.shape, t.stride(), t.dtype, t.device)
    return (type(t),)


class LaunchPlans:
    """A launcher's metadata-only work, memoised: key -> plan. A launcher's checks and its launch configuration
    (geometry, tiles, grid, constexprs, every integer argument) depend only on its arguments' metadata (shapes,
    strides, dtypes, devices, which optional tensors are given) and on its scalar arguments; the key holds all of
    them (tensor_key), so a hit is exactly the miss it memoises: the same checks passed, the same launch. Only a
    plan whose checks passed is stored. A plan holds no tensor (nothing kept alive, nothing baked into a CUDA graph):
    the run allocates its outputs and reads its caches (krsc, identity vectors, counters) as before. The memo is
    cleared when it reaches LIMIT entries (shapes that keep changing cost a plan each, never unbounded memory)."""

    LIMIT = 1024
    ALL: "list[LaunchPlans]" = []

    def __init__(self, name: str) -> None:
        self.name = name
        self.plans: dict = {}
        self.hits = self.misses = 0
        LaunchPlans.ALL.append(self)

    def get(self, key):
        plan = self.plans.get(key)
        if plan is None:
            self.misses += 1
        else:
            self.hits += 1
        return plan

    def put(self, key, plan):
        if len(self.plans) >= self.LIMIT:
            self.plans.clear()
        self.plans[key] = plan
        return plan


def clear_launch_plans() -> None:
    """Forget every memoised launch plan (tests; a process never needs it: plans follow their keys)."""
    for memo in LaunchPlans.ALL:
        memo.plans.clear()
        memo.hits = memo.misses = 0


def tried_configs(tuner, args: tuple, kwargs: dict) -> list:
    """The configs Triton's autotuner `tuner` tries for a launch with `args` and `kwargs` (its autotune key new): its
    configs less those its early_config_prune drops (the tools that audit or count compiles follow it)."""
    configs = list(tuner.configs)
    prune = getattr(tuner, "early_config_prune", None)
    if prune is None or len(configs) < 2:
        return configs
    return list(prune(configs, dict(zip(tuner.arg_names, args)), **kwargs))


def launch(kernel, tuned_kernel, grid, args: tuple, meta: dict, tiles: Optional[dict]) -> None:
    """Run `tuned_kernel` (autotuned on a GPU), or `kernel` with explicit `tiles` (the interpreter's single
    config, or a caller's override such as a small-tile test), or, with CONFIG_POLICY "first", `kernel` with the
    first of `tuned_kernel`'s configs (the same compile as that config's autotune trial: same constexprs, warps
    and stages)."""
    if tiles is not None:
        kernel[grid](*args, **meta, **tiles)
    elif CONFIG_POLICY == "first":
        kernel[grid](*args, **meta, **tuned_kernel.configs[0].all_kwargs())
    else:
        tuned_kernel[grid](*args, **meta)
