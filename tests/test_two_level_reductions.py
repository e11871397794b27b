"""Two-level in-launch reductions (triton/_common: slot_chunk, sum_chunks_if_last; conv_fwd's statistics merge).

A launch's per-column totals over its slots are summed per chunk of CHUNK_SLOTS slots by the chunk's last tile,
then per column block by the last chunk (one program summing every slot was a serial tail on an H100). These tests
pin the chunk layout (independent of BLOCK_M, per stride phase), and the totals of every kernel that reduces this way
with several chunks, a short last chunk, an exact multiple and a single chunk, against float64 references; the
counters are left at 0 and a second launch gives the same bits. Under the interpreter CHUNK_SLOTS is 4 (few slots,
several chunks); on a GPU 64, and the shapes scale with it.
"""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

import pe_kernels.reference as ref
from pe_kernels.triton import _common
from pe_kernels.triton._common import CHUNK_SLOTS, slot_chunk, slot_chunks

from _devices import ieee_fp32
from _oracle import assert_budget


@triton.jit
def _slot_chunk_probe(out_ptr, tiles_ph, slots_ph, PROGS: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    phase = pid // tiles_ph
    tile = pid % tiles_ph
    chunk, arrivals, first, count = slot_chunk(tile, tiles_ph, phase, slots_ph, PROGS, CHUNK)
    tl.store(out_ptr + 4 * pid + 0, chunk)
    tl.store(out_ptr + 4 * pid + 1, arrivals)
    tl.store(out_ptr + 4 * pid + 2, first)
    tl.store(out_ptr + 4 * pid + 3, count)


def _chunks_seen(slots_ph: int, phases: int, per_tile: int, device) -> dict:
    """chunk -> (arrivals, first, count, tiles that named it) as the kernel computes them, for tiles owning
    `per_tile` slots each (BLOCK_M = per_tile * PART_M)."""
    tiles_ph = -(-slots_ph // per_tile)
    out = torch.full((phases * tiles_ph, 4), -1, dtype=torch.int32, device=device)
    _slot_chunk_probe[(phases * tiles_ph,)](out, tiles_ph, slots_ph, PROGS=CHUNK_SLOTS // per_tile, CHUNK=CHUNK_SLOTS)
    seen: dict = {}
    for chunk, arrivals, first, count in out.cpu().tolist():
        entry = seen.setdefault(chunk, [arrivals, first, count, 0])
        assert entry[:3] == [arrivals, first, count], (chunk, entry, (arrivals, first, count))
        entry[3] += 1
    return seen


@pytest.mark.parametrize("slots_ph,phases", [(1, 1), (CHUNK_SLOTS, 1), (2 * CHUNK_SLOTS + 3, 1),
                                             (CHUNK_SLOTS + 1, 4), (3 * CHUNK_SLOTS, 2)])
def test_chunks_partition_each_phases_slots_whatever_the_tile(slots_ph, phases, kernel_device):
    """Chunks cover every slot of every phase once, in order; each chunk's arrivals are the tiles that name it; the
    layout (chunk, first slot, count) is the same for tiles of one slot and of two (the autotune configs' BLOCK_M of
    PART_M and 2 PART_M), so a buffer sized by slot_chunks fits every config."""
    layouts = []
    for per_tile in (1, 2):
        seen = _chunks_seen(slots_ph, phases, per_tile, kernel_device)
        assert sorted(seen) == list(range(slot_chunks(slots_ph, phases)))
        for chunk, (arrivals, _, _, tiles) in seen.items():
            assert arrivals == tiles, (chunk, arrivals, tiles)
        covered = []
        for chunk in sorted(seen):
            _, first, count, _ = seen[chunk]
            assert 1 <= count <= CHUNK_SLOTS
            covered.extend(range(first, first + count))
        assert covered == list(range(phases * slots_ph))
        layouts.append({c: tuple(v[1:3]) for c, v in seen.items()})
    assert layouts[0] == layouts[1]


def _apply_inputs(rows_h: int, K: int, device, dtype=torch.float32, seed=0):
    """bn_apply inputs of N=2, W=8 and H = rows_h: with BLOCK_M = 16, exactly rows_h slots."""
    gen = torch.Generator().manual_seed(seed)
    shape = (2, K, rows_h, 8)
    mk = lambda: torch.randn(shape, generator=gen).to(device, dtype).contiguous(  # noqa: E731
        memory_format=torch.channels_last)
    y, residual, grad_out = mk(), mk(), mk()
    scale = (torch.rand(K, generator=gen) + 0.5).to(device)
    shift = torch.randn(K, generator=gen).to(device)
    rscale = (torch.rand(K, generator=gen) + 0.5).to(device)
    rshift = torch.randn(K, generator=gen).to(device)
    return (y, scale, shift, residual, rscale, rshift), grad_out


@pytest.mark.parametrize("slots", [2 * CHUNK_SLOTS + 3, 2 * CHUNK_SLOTS, CHUNK_SLOTS - 1],
                         ids=["short_last_chunk", "whole_chunks", "one_chunk"])
def test_bn_apply_backward_sums_in_two_levels(slots, kernel_device):
    """bn_apply's backward sums (d_scale, d_shift, d_residual_scale, d_residual_shift) over `slots` slots of 16 rows
    in 3 column blocks (K = 40, 16-wide tiles): the float64 reference's, within the fp32 budget; counters left at 0;
    the same bits twice."""
    from pe_kernels.triton.bn_apply import bn_apply_bwd, bn_apply_fwd

    inputs, grad_out = _apply_inputs(slots, 40, kernel_device)
    tiles = dict(BLOCK_M=16, BLOCK_K=16)
    out = bn_apply_fwd(*inputs, True, tiles=tiles)
    needs = [True] * 6
    runs = [bn_apply_bwd(grad_out, *inputs, True, out, needs, tiles=tiles) for _ in range(2)]
    assert not _common.stream_counters(1, kernel_device).any()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    cpu = [t.cpu() for t in (grad_out, *inputs, out)]
    same = ref.bn_apply_backward(cpu[0], *cpu[1:7], True, cpu[7], needs)
    ref64 = ref.bn_apply_backward(cpu[0].double(), *(t.double() for t in cpu[1:7]), True, cpu[7].double(), needs)
    for name, got, s, r in zip(ref.APPLY_GRAD_NAMES, runs[0], same, ref64):
        assert_budget(name, got.cpu(), s, r, torch.float32)


@pytest.mark.parametrize("stride", [1, 2])
def test_dgrad_prologue_sums_in_two_levels(stride, kernel_device):
    """The dgrad's prologue sums (d_in_scale, d_in_shift) by stride phase in chunks (16-row tiles: with stride 2,
    four phases of more than two chunks each, a short last chunk in each), against the float64 reference; the
    composed backward's epilogue sums (reduce_slots: d_bias, d_out_scale, d_out_shift) in two levels too."""
    from pe_kernels.triton.conv_bwd import conv_bwd

    H = W = 2 * stride * (CHUNK_SLOTS // 2 + 1) + 1   # odd: phases of unequal sizes
    gen = torch.Generator().manual_seed(1)
    N, C, K, groups = 2, 12, 12, 2
    x = torch.randn(N, C, H, W, generator=gen)
    w = torch.randn(K, C // groups, 3, 3, generator=gen) / 4
    vec = lambda: torch.rand(C, generator=gen) + 0.5  # noqa: E731
    args = dict(x=x, weight=w, bias=torch.randn(K, generator=gen), in_scale=vec(), in_shift=vec() - 1, in_relu=True,
                out_scale=vec(), out_shift=vec(), residual=None, out_relu=False, stride=(stride, stride),
                padding=(1, 1), dilation=(1, 1), groups=groups)
    y = ref.conv_fused(*(args[k] for k in ("x", "weight", "bias", "in_scale", "in_shift", "in_relu", "out_scale",
                                           "out_shift", "residual", "out_relu", "stride", "padding", "dilation",
                                           "groups")), False)[0]
    grad_y = torch.randn(y.shape, generator=gen)
    needs = [True] * 7 + [False]
    order = ("x", "weight", "bias", "in_scale", "in_shift", "in_relu", "out_scale", "out_shift", "residual",
             "out_relu", "stride", "padding", "dilation", "groups")

    def call(fn, cast, **kw):
        a = {k: cast(v) for k, v in args.items()}
        return fn(cast(grad_y), None, *(a[k] for k in order), cast(y), needs, None, **kw)

    dev = lambda t: (t.to(kernel_device).contiguous(memory_format=torch.channels_last)  # noqa: E731
                     if isinstance(t, torch.Tensor) and t.dim() == 4 else
                     t.to(kernel_device) if isinstance(t, torch.Tensor) else t)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2)
    got = [call(conv_bwd, dev, tiles=tiles) for _ in range(2)]
    assert not _common.stream_counters(1, kernel_device).any()
    same = call(ref.conv_fused_backward, lambda t: t)
    ref64 = call(ref.conv_fused_backward, lambda t: t.double() if isinstance(t, torch.Tensor) else t)
    for name, a, b, s, r in zip(ref.CONV_GRAD_NAMES, *got, same, ref64):
        if r is None:
            continue
        assert torch.equal(a, b), name
        assert_budget(name, a.cpu(), s, r, torch.float32, dot=True)


def test_conv_statistics_from_tiles_of_two_slots(monkeypatch, kernel_device):
    """conv_fwd's merge when each M tile owns two slots (BLOCK_M = 2 PART_M, as the 128-row GPU config on 64-row
    slots): a chunk is CHUNK_SLOTS / 2 tiles, the same slots and level-2 layout; the statistics are the float64
    reference's and those of one-slot tiles, to rounding."""
    from pe_kernels.triton import conv_fwd as conv_fwd_mod

    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 2 * CHUNK_SLOTS + 5, 16, generator=gen)   # 2 * H * 16 rows: slots of 16 rows
    w = torch.randn(24, 4, 1, 1, generator=gen) / 2
    geometry = ((1, 1), (0, 0), (1, 1), 2)

    def stats(block_m):
        def launch(kernel, tuned_kernel, grid, args, meta, tiles):
            kernel[grid](*args, **meta, BLOCK_M=block_m)

        monkeypatch.setattr(conv_fwd_mod, "launch", launch)
        dev = x.to(kernel_device).contiguous(memory_format=torch.channels_last)
        return conv_fwd_mod.conv_fwd(dev, w.to(kernel_device), None, None, None, False, None, None, None, False,
                                     *geometry, True, tiles={"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16})[1]

    with ieee_fp32():   # (TF32 dots on a GPU would round the conv beyond the tolerance below)
        one, two = stats(16), stats(32)
    assert not _common.stream_counters(1, kernel_device).any()
    _, ref64 = ref.conv_fused(x.double(), w.double(), None, None, None, False, None, None, None, False, *geometry,
                              True)
    torch.testing.assert_close(two.cpu().double(), ref64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(two, one, rtol=1e-5, atol=1e-6)
