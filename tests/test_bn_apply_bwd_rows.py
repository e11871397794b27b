"""bn_apply's backward as row loops (triton/bn_apply.py: bwd_tiles, FLAT, channel-centred sums).

Each program loops over ROWS rows of one column block, accumulates its sums element-wise and sums them across rows
once, into one slot; channels_last tensors are addressed as m * K + k (FLAT), others by their strides. These tests
pin the loop (several steps, a short last program, several chunks of slots) against the float64 reference, the two
addressings against each other bit for bit, the centring on each channel's first value (exact at a constant
channel), and the tile choice and its errors. Under the interpreter on CPU and compiled on a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pe_kernels.reference as ref
from pe_kernels.triton import _common
from pe_kernels.triton._common import CHUNK_SLOTS

from _oracle import assert_budget

bn_apply_mod = importlib.import_module("pe_kernels.triton.bn_apply")

NEEDS_ALL = [True] * 6


def _inputs(N, K, H, W, device, seed=0, dtype=torch.float32):
    """(y, scale, shift, residual, rscale, rshift), grad_out: NCHW-contiguous, drawn on CPU."""
    gen = torch.Generator().manual_seed(seed)
    mk = lambda: torch.randn(N, K, H, W, generator=gen).to(device, dtype)  # noqa: E731
    y, residual, grad_out = mk(), mk(), mk()
    vec = lambda: (torch.rand(K, generator=gen) + 0.5).to(device)  # noqa: E731
    return (y, vec(), vec() - 1.0, residual, vec(), vec() - 1.0), grad_out


def _channels_last(t):
    return t.contiguous(memory_format=torch.channels_last) if t is not None and t.dim() == 4 else t


def _plan(grad_out, inputs, out, tiles):
    return bn_apply_mod._ApplyBwdPlan(grad_out, *inputs, True, out, NEEDS_ALL, tiles)


def test_row_loop_over_steps_short_program_and_chunks_matches_float64(kernel_device):
    """Programs of ROWS = 3 x 16 rows (three steps), 2 * CHUNK_SLOTS + 3 of them (several chunks, a short last one)
    and a last program of 5 rows, in 3 column blocks (K = 40, 16-wide tiles): every output within the fp32 budget of
    the float64 reference, the counters left at 0, the same bits twice."""
    rows, programs = 48, 2 * CHUNK_SLOTS + 3
    M = (programs - 1) * rows + 5
    inputs, grad_out = _inputs(1, 40, 1, M, kernel_device)
    inputs, grad_out = tuple(_channels_last(t) for t in inputs), _channels_last(grad_out)
    tiles = dict(BLOCK_M=16, BLOCK_K=16, ROWS=rows)
    out = bn_apply_mod.bn_apply_fwd(*inputs, True)
    plan = _plan(grad_out, inputs, out, tiles)
    assert plan.grid == (programs, 3) and plan.meta["FLAT"]
    runs = [bn_apply_mod.bn_apply_bwd(grad_out, *inputs, True, out, NEEDS_ALL, tiles=tiles) for _ in range(2)]
    assert not _common.stream_counters(1, kernel_device).any()
    for a, b in zip(*runs):
        assert torch.equal(a, b)
    cpu = [t.cpu() for t in (grad_out, *inputs, out)]
    same = ref.bn_apply_backward(cpu[0], *cpu[1:7], True, cpu[7], NEEDS_ALL)
    ref64 = ref.bn_apply_backward(cpu[0].double(), *(t.double() for t in cpu[1:7]), True, cpu[7].double(), NEEDS_ALL)
    for name, got, s, r in zip(ref.APPLY_GRAD_NAMES, runs[0], same, ref64):
        assert_budget(name, got.cpu(), s, r, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32], ids=["fp16", "fp32"])
def test_flat_and_strided_addressing_give_the_same_bits(dtype, kernel_device):
    """The same values channels_last (FLAT: rows at m * K + k) and NCHW (strided: (n, h, w) from m): dy, d_residual
    and the four sums equal bit for bit (the loop's arithmetic does not depend on the addressing); programs of two
    steps, the last one short."""
    inputs, grad_out = _inputs(2, 24, 5, 7, kernel_device, seed=3, dtype=dtype)   # 70 rows: programs of 32
    tiles = dict(BLOCK_M=16, BLOCK_K=16, ROWS=32)
    out = bn_apply_mod.bn_apply_fwd(*inputs, True)
    results = {}
    for layout, convert in (("flat", _channels_last), ("strided", lambda t: t)):
        args = tuple(convert(t) for t in inputs)
        g, o = convert(grad_out), convert(out)
        assert _plan(g, args, o, tiles).meta["FLAT"] == (layout == "flat")
        results[layout] = bn_apply_mod.bn_apply_bwd(g, *args, True, o, NEEDS_ALL, tiles=tiles)
    for name, a, b in zip(ref.APPLY_GRAD_NAMES, results["flat"], results["strided"]):
        assert a.dtype == b.dtype and torch.equal(a, b), name


def test_one_strided_tensor_takes_the_strided_path(kernel_device):
    """FLAT needs every tensor read at m * K + k: a grad_out sliced along channels (row stride != K) does not."""
    inputs, _ = _inputs(2, 8, 3, 3, kernel_device)
    inputs = tuple(_channels_last(t) for t in inputs)
    wide = torch.randn(2, 16, 3, 3, device=kernel_device).contiguous(memory_format=torch.channels_last)
    out = bn_apply_mod.bn_apply_fwd(*inputs, True)
    assert not _plan(wide[:, :8], inputs, out, None).meta["FLAT"]
    assert _plan(wide[:, :8].contiguous(memory_format=torch.channels_last), inputs, out, None).meta["FLAT"]


def test_scale_sums_are_centred_on_each_channels_first_value(kernel_device):
    """At a channel of constant value c (1000.5, far from 0: an uncentred sum g*y would round there), every
    y - y0 is 0, so d_scale is exactly fl(c * d_shift), and likewise d_residual_scale; as reference.sum_centred."""
    N, K, H, W = 2, 4, 6, 6
    inputs, grad_out = _inputs(N, K, H, W, kernel_device, seed=5)
    y, scale, shift, residual, rscale, rshift = (_channels_last(t) for t in inputs)
    c = torch.tensor([1000.5, -3.25, 77.0, 0.0], device=kernel_device)
    y = (torch.zeros_like(y) + c[None, :, None, None]).contiguous(memory_format=torch.channels_last)
    residual = (torch.zeros_like(y) - 2 * c[None, :, None, None]).contiguous(memory_format=torch.channels_last)
    args = (y, scale, shift, residual, rscale, rshift)
    out = bn_apply_mod.bn_apply_fwd(*args, True)
    dy, d_scale, d_shift, dres, d_rscale, d_rshift = bn_apply_mod.bn_apply_bwd(
        _channels_last(grad_out), *args, True, out, NEEDS_ALL, tiles=dict(BLOCK_M=16, BLOCK_K=16, ROWS=32))
    assert torch.equal(d_shift, d_rshift)
    assert torch.equal(d_scale, c * d_shift)
    assert torch.equal(d_rscale, (-2 * c) * d_shift)


def test_backward_tiles_on_a_gpu(monkeypatch):
    """bwd_tiles' GPU choice: BWD_TILE_ELEMS elements a step, ROWS the power-of-two steps (at most 16) that leave at
    least BWD_PROGRAMS programs; one step where there are fewer tiles; a `tiles` BLOCK_M alone means one step. The
    elements a step: halved for fp32 and again with the residual's sum."""
    monkeypatch.setattr(bn_apply_mod, "INTERPRET", False)
    tiles = bn_apply_mod.bwd_tiles
    assert bn_apply_mod.BWD_PROGRAMS == 1024 and bn_apply_mod.BWD_TILE_ELEMS == 1024
    assert tiles(128 * 32 * 32, 128, None) == (8, 128, 128)          # PE-(2,4,1) layer1: 1024 programs of 16 steps
    assert tiles(128 * 16 * 16, 256, None) == (8, 128, 64)           # layer2: 2 column blocks of 512 programs
    assert tiles(128 * 4 * 4, 1024, None) == (8, 128, 16)            # layer4: 8 column blocks of 128 programs
    assert tiles(128 * 4 * 4, 1024, None, 2048) == (16, 128, 16)     # 128 x 8 programs of one step
    assert tiles(10**7, 64, None) == (16, 64, 256)                   # the steps stop at 16
    assert tiles(4096, 40, dict(BLOCK_M=32)) == (32, 64, 32)
    assert tiles(4096, 40, dict(BLOCK_M=32, ROWS=96)) == (32, 64, 96)
    elems = bn_apply_mod.bwd_tile_elems
    assert (elems(False, 2), elems(False, 4), elems(True, 2), elems(True, 4)) == (1024, 512, 512, 256)


@pytest.mark.parametrize("bad,match", [(dict(BLOCK_M=16, ROWS=24), "ROWS = 24 must be a positive multiple of "
                                        "BLOCK_M = 16"),
                                       (dict(ROWS=0), "ROWS = 0"),
                                       (dict(PART_M=16), r"unknown key\(s\) \['PART_M'\]")])
def test_backward_tiles_refuse_what_they_cannot_run(bad, match, kernel_device):
    inputs, grad_out = _inputs(1, 8, 4, 4, kernel_device)
    out = bn_apply_mod.bn_apply_fwd(*inputs, True)
    with pytest.raises(ValueError, match=match):
        bn_apply_mod.bn_apply_bwd(grad_out, *inputs, True, out, NEEDS_ALL, tiles=bad)


def test_dgrad_prologue_and_tail_sums_are_centred_on_each_channels_first_value(kernel_device):
    """The dgrad's prologue sums (d_in_scale = sum g x) and its tail's (d_scale = sum g y_t, d_residual_scale =
    sum g r) are centred on each channel's first value as reference.sum_centred: at channels of constant value each
    centred part is 0, so the scale sums are exactly fl(c * the shift sum) (several tiles, chunks, column blocks)."""
    from pe_kernels.triton.conv_bwd import TailBwd, conv_bn_bwd_ext, conv_bwd

    gen = torch.Generator().manual_seed(4)
    N, C, K, H, W, groups = 2, 12, 12, 9, 9, 2
    c = torch.tensor([1000.5, -3.25, 77.0, 0.0, 12.5, 2.0, -64.0, 0.5, 300.0, -1.0, 5.0, 9.0])
    const = lambda v: (torch.zeros(N, C, H, W) + v[None, :, None, None]).to(kernel_device).contiguous(  # noqa: E731
        memory_format=torch.channels_last)
    x = const(c)
    w = (torch.randn(K, C // groups, 3, 3, generator=gen) / 4).to(kernel_device)
    vec = lambda: (torch.rand(C, generator=gen) + 0.5).to(kernel_device)  # noqa: E731
    geo = ((1, 1), (1, 1), (1, 1), groups)
    y = torch.randn(N, K, H, W, generator=gen).to(kernel_device).contiguous(memory_format=torch.channels_last)
    grad_y = torch.randn(N, K, H, W, generator=gen).to(kernel_device).contiguous(memory_format=torch.channels_last)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2)
    got = conv_bwd(grad_y, None, x, w, None, vec(), vec() - 1, False, None, None, None, False, *geo, y,
                   [True] * 5 + [False] * 3, None, tiles=tiles)
    d_in_scale, d_in_shift = got[3], got[4]
    assert d_in_shift.abs().max() > 0
    assert torch.equal(d_in_scale, c.to(kernel_device) * d_in_shift)

    out = torch.relu(torch.randn(N, C, H, W, generator=gen)).to(kernel_device).contiguous(
        memory_format=torch.channels_last)
    y_h = torch.randn(N, K, H, W, generator=gen).to(kernel_device).contiguous(memory_format=torch.channels_last)
    stats_h = torch.stack([y_h.mean((0, 2, 3)), y_h.var((0, 2, 3), unbiased=False) * N * H * W]).float()
    side = torch.randn(N, C, H, W, generator=gen).to(kernel_device)
    y_t, res = const(c), const(-2 * c)
    grad_scale, grad_shift, bn_w = vec(), vec(), vec()
    _, sums = conv_bn_bwd_ext(grad_y, grad_scale, grad_shift, out, w, None, None, None, False, *geo, y_h, stats_h,
                              bn_w, 1e-5, [True, True, False, False, False, True, True], tiles,
                              tail=TailBwd(y_t, side, res, True))
    d_scale, d_shift, d_res_scale = sums
    assert d_shift.abs().max() > 0
    assert torch.equal(d_scale, c.to(kernel_device) * d_shift)
    assert torch.equal(d_res_scale, (-2 * c).to(kernel_device) * d_shift)


def test_a_non_finite_first_value_is_no_centre(kernel_device):
    """A channel whose first value is inf (or NaN) is summed plainly (its centre 0), as reference.sum_centred: the
    inf reaches d_scale once, with its gradient's sign (centred on inf, every row's y - inf would make it NaN); a NaN
    first value gives NaN; the other channels are finite, within the budget."""
    N, K, H, W = 2, 3, 4, 4
    inputs, grad_out = _inputs(N, K, H, W, kernel_device, seed=6)
    y = inputs[0].clone()
    y[0, 0, 0, 0], y[0, 1, 0, 0] = float("inf"), float("nan")
    args = tuple(_channels_last(t) for t in (y, *inputs[1:]))
    needs = [True, True, True, False, False, False]
    got = bn_apply_mod.bn_apply_bwd(_channels_last(grad_out), *args[:3], None, None, None, False, None, needs,
                                    tiles=dict(BLOCK_M=16, BLOCK_K=16))
    want = ref.bn_apply_backward(grad_out.cpu().double(), y.cpu().double(), *(t.cpu().double() for t in args[1:3]),
                                 None, None, None, False, None, needs)
    d_scale, expected = got[1].cpu().double(), want[1]
    assert torch.isinf(expected[0]) and torch.isnan(expected[1])
    assert d_scale[0] == expected[0] and torch.isnan(d_scale[1])
    torch.testing.assert_close(d_scale[2], expected[2], rtol=1e-4, atol=1e-4)
