"""The conv GEMMs' tap steps (TAP_STEPS): a reduction step of the forward or the dgrad that lies in one filter tap
carries the tap as scalars from step to step and forms bounds and offsets per row, instead of splitting
j = (tap, channel) per element with integer divisions (~20 SASS instructions each). Taken when the channel count is a
multiple of the tile (_common.tap_steps: every step full, no reduction-column mask); the same tiles in the same order
as the per-element split, so the same bits.

Checks: the selection; forward and every gradient (the generic backward and the conv -> BN training backward, which
forms g_acc on load) against the float64 reference with several steps per tap, stride, padding, dilation and dgrad
stride phases without live taps; and equality, bit for bit, with the per-element path forced on the same tiles.
Every launch's TAP_STEPS is recorded, so a test cannot pass on the path it did not mean to run.
"""

from __future__ import annotations

import contextlib

import pytest
import torch

from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton import conv_fwd as conv_fwd_mod
from pe_kernels.triton._common import gpu_tap_tile_k, gpu_tile_n, tap_steps, wide_tiles
from pe_kernels.triton.conv_bwd import conv_bn_bwd, conv_bwd
from pe_kernels.triton.conv_fwd import conv_fwd, forward_tiles

import test_triton_conv as tc
import test_triton_conv_bn_train_bwd as tb
from _launch_flags import recorded_flags

GEMMS = ("_conv_fwd_kernel", "_conv_dgrad_kernel")   # (the wgrad's j tiles are per program: no per-step split)
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)
FWD_TILES = forward_tiles(TILES)

# C_g and K_g multiples of 16: the forward and the dgrad take tap steps with 16-deep tiles (32: two steps per tap)
CASES = {
    "3x3_s2_g2": tc.Case(2, 32, 64, 9, 7, 3, 3, stride=(2, 2), padding=(1, 1), groups=2),
    "3x3_c32_dil2": tc.Case(1, 32, 32, 8, 8, 3, 3, padding=(2, 2), dilation=(2, 2)),
    # dgrad stride phases: along w every tap live on odd phases, none on even ones (tc.CASES' 3x3_s32_dil2_pad21)
    "3x3_s32_dil2_g2": tc.Case(1, 32, 32, 11, 10, 3, 3, stride=(3, 2), padding=(2, 1), dilation=(2, 2), groups=2),
}


def _tap_flags(name, kwargs):
    if name in GEMMS:
        yield name, kwargs.get("TAP_STEPS")
        yield (name, "even"), kwargs.get("EVEN_N")


def recorded_tap_steps():
    """{kernel name: set of TAP_STEPS values} of the GEMM launches in the block (interpreter and GPU launches); and
    of EVEN_N under the key (name, "even")."""
    return recorded_flags(_tap_flags)


@contextlib.contextmanager
def per_element_split(monkeypatch):
    """Force TAP_STEPS off in every launcher (the per-element split of j)."""
    with monkeypatch.context() as m:
        m.setattr(conv_fwd_mod, "tap_steps", lambda *a: False)
        m.setattr(conv_bwd_mod, "tap_steps", lambda *a: False)
        yield


def test_selection():
    assert tap_steps(64, 64) and tap_steps(128, 64) and tap_steps(16, 16)
    assert not tap_steps(32, 64) and not tap_steps(3, 32) and not tap_steps(24, 16) and not tap_steps(100, 64)
    # GPU column tiles: 128 for wide groups whose steps lie in one tap, else 64
    h = torch.float16
    assert gpu_tile_n(128, True, h) == 128 and gpu_tile_n(512, True, torch.bfloat16) == 128
    assert gpu_tile_n(128, False, h) == 64 and gpu_tile_n(64, True, h) == 64 and gpu_tile_n(32, True, h) == 64
    # reduction tiles: 32-deep steps where they keep a multi-tap reduction's steps in one tap and 64 would not
    assert gpu_tap_tile_k(h, 9, 32) == 32 and gpu_tap_tile_k(h, 9, 96) == 32 and tap_steps(32, 32)
    assert gpu_tap_tile_k(h, 9, 64) == 64 and gpu_tap_tile_k(h, 9, 128) == 64 and gpu_tap_tile_k(h, 1, 64) == 64
    assert gpu_tap_tile_k(h, 9, 48) == 64 and gpu_tap_tile_k(torch.float32, 9, 32) == 32
    assert gpu_tap_tile_k(h, 9, 3) == 32   # the stem: 27 in one step (gpu_tile_k)
    # a narrow group's 1x1 reduction (32 channels): one full 32-deep tap step, not a half-masked 64-deep one
    assert gpu_tap_tile_k(h, 1, 32) == 32 and gpu_tap_tile_k(torch.bfloat16, 1, 16) == 16
    assert gpu_tap_tile_k(h, 1, 33) == 64


def test_wide_tiles_only_on_tensor_cores(monkeypatch):
    """IEEE fp32 (TF32 off) keeps the 64-column tiles and the wgrad's 4-warp plan: its tl.dot runs on FMAs with the
    tiles in registers, where the wider ones spilled."""
    geo = conv_fwd_mod.ConvGeometry(N=8, C=256, H=8, W=8, K=256, R=3, S=3, P=8, Q=8, groups=2, C_g=128, K_g=128,
                                    stride=(1, 1), padding=(1, 1), dilation=(1, 1), dtype=torch.float32)
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    for tf32, wide in ((True, True), (False, False)):
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
        assert wide_tiles(torch.float32) is wide and wide_tiles(torch.float16)
        assert gpu_tile_n(128, True, torch.float32) == (128 if wide else 64)
        plan = conv_bwd_mod._wgrad_plan(geo, None)
        assert (plan.num_warps, plan.block_k) == ((8, 64) if wide else (4, 32)), plan


def test_wgrad_takes_128_deep_j_tiles_wherever_two_fit(monkeypatch):
    """fp16 on a GPU: 128-deep j tiles on 8 warps wherever R*S*C_g holds two 64-deep ones, a masked last tile
    included (a 64-channel 3x3 layer: 576 columns in 5 tiles); 64 on 4 warps below that."""
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    for c_g, r, expect in ((64, 3, (8, 128)), (32, 3, (8, 128)), (128, 1, (8, 128)), (64, 1, (4, 64)),
                           (96, 1, (4, 64))):
        geo = conv_fwd_mod.ConvGeometry(N=8, C=2 * c_g, H=8, W=8, K=128, R=r, S=r, P=8, Q=8, groups=2, C_g=c_g,
                                        K_g=64, stride=(1, 1), padding=(r // 2,) * 2, dilation=(1, 1),
                                        dtype=torch.float16)
        plan = conv_bwd_mod._wgrad_plan(geo, None)
        assert (plan.num_warps, plan.block_k) == expect, (c_g, r, plan)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_conv_against_reference(case, dtype, kernel_device):
    args = tc.make_inputs(case, dtype, "sliced", "full", kernel_device)
    with recorded_tap_steps() as seen:
        tc.check_forward(args, dtype, tiles=FWD_TILES)
        tc.check_backward(args, dtype, tiles=TILES)
    assert {k: seen[k] for k in GEMMS} == {k: {True} for k in GEMMS}, dict(seen)
    # 16-wide tiles divide K_g and C_g: no output-column mask (EVEN_N) -- the masked form runs in test_triton_conv
    assert {k: seen[(k, "even")] for k in GEMMS} == {k: {True} for k in GEMMS}, dict(seen)


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("prologue", [True, False], ids=["prologue", "no_prologue"])
@pytest.mark.parametrize("case", ["3x3_s2_g2", "3x3_s32_dil2_g2"])
def test_conv_bn_train_backward_against_reference(case, prologue, dtype, kernel_device):
    c = CASES[case]
    args = tb.make_inputs(tb.Case(c.N, c.C, c.K, c.H, c.W, c.R, c.stride[0], c.padding[0], c.groups), dtype,
                          kernel_device, prologue=prologue, bias=True)
    with recorded_tap_steps() as seen:
        tb.check(args, dtype, needs_grad=tb.ALL, tiles=TILES)
    assert seen["_conv_dgrad_kernel"] == {True}, dict(seen)


def _conv_runs(args, dtype, device):
    y, stats = tc.run_fwd(conv_fwd, args, True, tiles=FWD_TILES)
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    gs = (torch.randn(2, y.shape[1], generator=torch.Generator().manual_seed(2)) * 0.1).to(device)
    grads = tc.run_bwd(conv_bwd, grad_y, gs, args, y, [True] * 8, stats, tiles=TILES)
    return [y, stats, *grads]


def _conv_bn_runs(args, dtype, device):
    a = args
    y, stats = conv_fwd(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], None, None, None,
                        False, a["stride"], a["padding"], a["dilation"], a["groups"], True, tiles=FWD_TILES)
    grads = tb.make_grads(y.shape, y.shape[1], dtype, device)
    return [y, stats, *tb.backward(conv_bn_bwd, grads, args, y, stats, tb.ALL, tiles=TILES)]


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("case", ["3x3_s2_g2", "3x3_s32_dil2_g2"])
def test_same_bits_as_the_per_element_split(case, dtype, kernel_device, monkeypatch):
    c = CASES[case]
    torch.manual_seed(0)
    conv_args = tc.make_inputs(c, dtype, "channels_last", "full", kernel_device)
    bn_args = tb.make_inputs(tb.Case(c.N, c.C, c.K, c.H, c.W, c.R, c.stride[0], c.padding[0], c.groups), dtype,
                             kernel_device, bias=True)
    runs = {}
    for mode in ("tap", "element"):
        torch.manual_seed(3)
        with recorded_tap_steps() as seen, (per_element_split(monkeypatch) if mode == "element"
                                            else contextlib.nullcontext()):
            runs[mode] = _conv_runs(conv_args, dtype, kernel_device) + _conv_bn_runs(bn_args, dtype, kernel_device)
        assert {k: seen[k] for k in GEMMS} == {k: {mode == "tap"} for k in GEMMS}, (mode, dict(seen))
    for i, (a, b) in enumerate(zip(runs["tap"], runs["element"])):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.equal(a, b), f"result {i} differs between the tap steps and the per-element split"


def test_dgrad_takes_128_deep_steps_on_a_stored_g_acc(monkeypatch):
    """fp16 on a GPU: the conv -> BN training backward's dgrad reads the g_acc the wgrad stored and steps 128 deep
    where K_g is a multiple of 128 (as the forward's deep_steps), else as before: 64, 32 for 32-channel 3x3 groups,
    and where it forms g_acc on load (y recomputed: the 1x1 expansions) its own tiles."""
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    monkeypatch.setattr(conv_fwd_mod, "INTERPRET", False)
    h, groups = torch.float16, 4
    for c_g, k_g, r, prologue, expect in ((128, 128, 3, True, (128, 64, False)),   # the prologue's sums: 64 columns
                                          (128, 256, 3, True, (128, 64, False)),
                                          (64, 64, 3, True, (64, 64, False)),
                                          (32, 32, 3, True, (32, 64, False)),
                                          (512, 128, 1, False, (128, 128, False)),
                                          (128, 128, 1, False, (32, 64, True))):      # y recomputed, g_acc on load
        x = torch.empty(2, groups * c_g, 8, 8, dtype=h).to(memory_format=torch.channels_last)
        w = torch.empty(groups * k_g, c_g, r, r, dtype=h)
        y = torch.empty(2, groups * k_g, 8, 8, dtype=h).to(memory_format=torch.channels_last)
        vec = torch.ones(groups * c_g) if prologue else None
        plan = conv_bwd_mod._plan_conv_bn_bwd(y, None, None, x, w, None, vec, vec, prologue, (1, 1), (r // 2,) * 2,
                                              (1, 1), groups, y, torch.zeros(2, groups * k_g), None, 1e-5,
                                              [True, True, False, prologue, prologue, False, False], None)
        meta = plan.dgrad.meta
        assert (meta["BLOCK_K"], meta["BLOCK_N"], meta["GACC_ON_LOAD"]) == expect, (c_g, k_g, r, prologue, meta)
