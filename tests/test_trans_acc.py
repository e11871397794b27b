"""The wgrad's transposed product (TRANS_ACC) and its tiles for narrow groups.

dw[k, j] = sum_m g_acc[m, k] x'[m, j] is a GEMM whose M is the k tile and N the j tile. Where a group has 32 output
channels or fewer (the PE models' layer1), a 64-row k tile is half or three quarters masked and wgmma takes no
smaller M, so the wgrad computes dw^T = x'^T g_acc instead: the 128-deep j tile is the MMA's M, a k tile of K_g rows
its N (16 or 32), then transposes its accumulator before the store (a 32-channel 3x3 layer's loop 411 -> 291 SASS a
step, fp16 sm_90). Every other 8-warp plan takes the transposed product too: both operands then come from shared
memory, the g_acc formed on load stored there as is instead of read back transposed into the MMA's registers (a
128-channel 3x3 layer's loop 335 -> 311 SASS a step, 208 -> 192 registers). A 1x1 layer with R*S*C_g <= 32 takes
one j tile of that width, and with K_g >= 128 a 128-row k tile (elsewhere 128-row k tiles spilled,
bench/kernel_audit.py).

Checks: the GPU plans (monkeypatched off the interpreter: what a Hopper would launch), and every wgrad path with the
transposed product forced (the generic backward, the conv -> BN training backward forming g_acc on load with the
bias gradient, the stored g_acc, y recomputed; splits, masked tiles on every dimension, channels_last and NCHW)
against the float64 reference, with the flags of every wgrad launch recorded so that the path meant is the one run.
"""

from __future__ import annotations

import pytest
import torch

from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton import conv_fwd as conv_fwd_mod

import test_triton_conv as tc
import test_triton_conv_bn_train_bwd as tb

from _launch_flags import recorded_flags

# 16-wide tiles over K_g = 24 and R*S*C_g = 108 or 12: the last k and j tiles masked; rows not a multiple of 16;
# three splits
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3, TRANS_ACC=True)
CASES = {
    "3x3_p1_g2": tc.Case(2, 24, 48, 5, 7, 3, 3, padding=(1, 1), groups=2),
    "3x3_s2_g2": tc.Case(2, 24, 48, 7, 6, 3, 3, stride=(2, 2), padding=(1, 1), groups=2),
    "1x1_g2": tc.Case(2, 24, 48, 5, 6, 1, 1, groups=2),
}


def _wgrad_flags(name, kwargs):
    if name == "_conv_wgrad_kernel":
        yield "trans", kwargs.get("TRANS_ACC")
        yield "on_load", kwargs.get("GACC_ON_LOAD")
        yield "recompute", kwargs.get("RECOMPUTE_Y")
        yield "store", kwargs.get("STORE_GACC")


def _geo(c_g, k_g, r, dtype, groups=4):
    return conv_fwd_mod.ConvGeometry(N=8, C=groups * c_g, H=8, W=8, K=groups * k_g, R=r, S=r, P=8, Q=8, groups=groups,
                                     C_g=c_g, K_g=k_g, stride=(1, 1), padding=(r // 2,) * 2, dilation=(1, 1),
                                     dtype=dtype)


def test_gpu_plans(monkeypatch):
    """(block_n, block_k, warps, TRANS_ACC) of the wgrad plan a GPU launches (cuDNN's TF32 setting as torch's)."""
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    h, b, f = torch.float16, torch.bfloat16, torch.float32
    for (c_g, k_g, r, dtype), expect in [
        ((32, 32, 3, h), (32, 128, 8, True)),              # layer1's 3x3: a 32-row k tile as the MMA's N
        ((16, 16, 3, b), (16, 128, 8, True)),              # 16-channel groups: N = 16
        ((32, 32, 3, f), (32, 64, 8, True)),               # TF32: the 64-deep j tile on 8 warps
        ((64, 64, 3, h), (64, 128, 8, True)),              # wider groups: 64-row k tiles, transposed on 8 warps
        ((128, 32, 1, h), (32, 128, 8, True)),             # 1x1 reduction to 32 channels
        ((32, 128, 1, h), (128, 32, 4, False)),            # one 32-wide j tile, 128-row k tiles
        ((32, 128, 1, b), (128, 32, 4, False)),
        ((32, 128, 1, f), (64, 32, 4, False)),
        ((32, 64, 1, h), (64, 32, 4, False)),              # one 32-wide j tile
        ((128, 128, 1, h), (64, 128, 8, True)),            # 128-row k tiles spilled beside 128-deep j tiles
        ((3, 128, 3, h), (64, 32, 4, False)),              # the stem: 27 columns
    ]:
        plan = conv_bwd_mod._wgrad_plan(_geo(c_g, k_g, r, dtype), None)
        assert (plan.block_n, plan.block_k, plan.num_warps, plan.trans_acc) == expect, (c_g, k_g, r, dtype, plan)


def test_interpreter_takes_the_plain_product_unless_told(monkeypatch):
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", True)   # (the interpreter's rule, on any machine)
    geo = _geo(32, 32, 3, torch.float32)
    assert not conv_bwd_mod._wgrad_plan(geo, None).trans_acc
    assert conv_bwd_mod._wgrad_plan(geo, dict(TRANS_ACC=True)).trans_acc


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_backward_against_reference(name, layout, kernel_device):
    """The generic conv backward (g_acc from the epilogue kernel), x and grad_y in `layout`, a prologue on x."""
    dtype = torch.float32
    args = tc.make_inputs(CASES[name], dtype, layout, "full", kernel_device)
    with recorded_flags(_wgrad_flags) as seen:
        tc.check_backward(args, dtype, grad_layout=layout, tiles=TILES)
    assert seen["trans"] == {True} and seen["on_load"] == {False} and seen["store"] == {False}, dict(seen)


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_bn_train_backward_against_reference(name, bias, dtype, kernel_device):
    """g_acc formed on load (with the conv bias's gradient, or y recomputed in a 1x1 conv without bias), stored for
    the dgrad where it reads y: all seven gradients."""
    case = CASES[name]
    bn_case = tb.Case(case.N, case.C, case.K, case.H, case.W, case.R, case.stride[0], case.padding[0], case.groups)
    args = tb.make_inputs(bn_case, dtype, kernel_device, prologue=True, bias=bias)
    with recorded_flags(_wgrad_flags) as seen:
        tb.check(args, dtype, needs_grad=tb.ALL, tiles=TILES)
    recomputes = case.R == 1 and not bias
    assert dict(seen) == {"trans": {True}, "on_load": {True}, "recompute": {recomputes},
                          "store": {not recomputes}}, dict(seen)


def test_weight_gradient_only(kernel_device):
    """Only dw needed (no dgrad, nothing stored), a plain fp32 conv -> BN without a prologue."""
    case = CASES["3x3_p1_g2"]
    bn_case = tb.Case(case.N, case.C, case.K, case.H, case.W, case.R, case.stride[0], case.padding[0], case.groups)
    args = tb.make_inputs(bn_case, torch.float32, kernel_device, prologue=False, bias=False)
    with recorded_flags(_wgrad_flags) as seen:
        tb.check(args, torch.float32, needs_grad=(False, True, False, False, False, True, True), tiles=TILES)
    assert seen["trans"] == {True} and seen["store"] == {False}, dict(seen)
