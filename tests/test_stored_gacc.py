"""The g_acc the wgrad stores for the dgrad (STORE_GACC): on the conv -> BN training backward's fast path the wgrad
forms g_acc = grad_y * s + d_mean/n + 2 d_m2 (y - mean) on load, rounded to x's dtype as its dot consumes it; its
programs of j tile 0 store it (channels_last), and the dgrad launched after it reads that g_acc instead of reading
grad_y and y and forming it again (conv_bwd.stores_gacc: the same bytes; the dgrad's loop forms nothing). Where the
dgrad recomputes y instead of reading it (a 1x1 conv without bias whose x it reads anyway), storing would add bytes:
there the dgrad still forms g_acc on load from the terms the wgrad wrote.

Checks: which launch does what (every wgrad and dgrad launch's flags recorded), all seven gradients against the
float64 reference on both paths, and the stored path's results equal the on-load path's (bit for bit in the
interpreter, whose elementwise arithmetic is the same in both kernels; within a rounding of the dtype on a GPU, whose
compiler may contract the two kernels' multiply-adds differently).
"""

from __future__ import annotations

import pytest
import torch

from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton.conv_bwd import conv_bn_bwd
from pe_kernels.triton.conv_fwd import conv_fwd

import test_triton_conv_bn_train_bwd as tb

from _launch_flags import recorded_flags

TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)
# (case, prologue, bias, whether the dgrad recomputes y: a 1x1 conv, no padding, no bias, its x read for the
# prologue's ReLU mask; and then whether C_g fits one 16-channel tile: the dgrad forms its x' tile once (X_ONCE), the
# wgrad recomputes y from its x' tile B (Y_FROM_B), or both load 16 channels a step)
CASES = {
    "3x3_s2_g2": (tb.Case(2, 32, 32, 7, 6, 3, stride=2, padding=1, groups=2), True, True, False),
    "1x1_bias": (tb.Case(2, 16, 32, 5, 6, 1), True, True, False),
    "1x1_recompute": (tb.Case(2, 16, 32, 5, 6, 1, groups=2), True, False, (True, True)),
    "1x1_recompute_c40": (tb.Case(2, 80, 32, 5, 6, 1, groups=2), True, False, (True, False)),   # 16, 16, 8 a step
}


def _gacc_flags(name, kwargs):
    if name == "_conv_wgrad_kernel":
        yield "wgrad", (kwargs.get("STORE_GACC"), kwargs.get("Y_FROM_B")) if kwargs.get("RECOMPUTE_Y") else (
            kwargs.get("STORE_GACC"))
    elif name == "_conv_dgrad_kernel":
        yield "dgrad", (kwargs.get("GACC_ON_LOAD"), kwargs.get("X_ONCE")) if kwargs.get("RECOMPUTE_Y") else (
            kwargs.get("GACC_ON_LOAD"))


def recorded_gacc():
    """{"wgrad": set of STORE_GACC (with Y_FROM_B), "dgrad": set of GACC_ON_LOAD (with X_ONCE) (where y is
    recomputed)} of the launches in the block."""
    return recorded_flags(_gacc_flags)


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name, dtype, kernel_device):
    case, prologue, bias, recomputes = CASES[name]
    args = tb.make_inputs(case, dtype, kernel_device, prologue=prologue, bias=bias)
    with recorded_gacc() as seen:
        tb.check(args, dtype, needs_grad=tb.ALL, tiles=TILES)
    wgrad = (False, recomputes[1]) if recomputes else True   # (the wgrad's j tile: TILES' BLOCK_K on any device)
    if recomputes and kernel_device.type != "cpu":
        # on a GPU the dgrad's x' tile is the GPU's own, whatever TILES say (conv_bwd._dgrad_plan): 32 channels in
        # fp32, C_g rounded up to a power of two in fp16 / bf16
        recomputes = (True, case.C // case.groups <= (32 if dtype == torch.float32 else 128))
    assert dict(seen) == {"wgrad": {wgrad}, "dgrad": {recomputes}}, dict(seen)


def test_no_dgrad_no_store(kernel_device):
    """Without the dgrad (only dw and the BN vectors needed) nothing is stored."""
    case, *_ = CASES["3x3_s2_g2"]
    args = tb.make_inputs(case, torch.float32, kernel_device, prologue=False)
    with recorded_gacc() as seen:
        tb.check(args, torch.float32, needs_grad=(False, True, False, False, False, True, True), tiles=TILES)
    assert dict(seen) == {"wgrad": {False}}, dict(seen)


def _run(args, device, dtype):
    a = args
    y, stats = conv_fwd(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], None, None, None,
                        False, a["stride"], a["padding"], a["dilation"], a["groups"], True)
    grads = tb.make_grads(y.shape, y.shape[1], dtype, device, grad_layout=torch.channels_last)
    return tb.backward(conv_bn_bwd, grads, args, y, stats, tb.ALL, tiles=TILES)


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("name", ["3x3_s2_g2", "1x1_bias"])
def test_same_results_as_formed_on_load(name, dtype, kernel_device, monkeypatch):
    case, prologue, bias, _ = CASES[name]
    results = {}
    for mode in ("stored", "on_load"):
        torch.manual_seed(0)
        args = tb.make_inputs(case, dtype, kernel_device, prologue=prologue, bias=bias)
        with monkeypatch.context() as m, recorded_gacc() as seen:
            if mode == "on_load":
                m.setattr(conv_bwd_mod, "stores_gacc", lambda dgrad: False)
            results[mode] = _run(args, kernel_device, dtype)
        assert dict(seen) == {"wgrad": {mode == "stored"}, "dgrad": {mode == "on_load"}}, (mode, dict(seen))
    for i, (a, b) in enumerate(zip(results["stored"], results["on_load"])):
        assert (a is None) == (b is None), i
        if a is None:
            continue
        if kernel_device.type == "cpu":
            assert torch.equal(a, b), f"gradient {i} differs between the stored and the on-load g_acc"
        else:
            torch.testing.assert_close(a, b, rtol=2 ** -8, atol=2 ** -8 * float(b.abs().max()))


@pytest.mark.parametrize("c_g, k_g, dtype, expect", [
    (32, 128, torch.float16, (32, 64, 32, True)),      # a narrow group's expansion: 32 columns, 64-deep tap steps
    (64, 256, torch.bfloat16, (64, 64, 64, True)),
    (32, 128, "prologue", (32, 64, 32, True)),         # x' formed by a prologue: once, before the loop
    (32, 32, torch.float16, (32, 32, 32, True)),       # K_g = 32: a 64-deep step would span it twice (no tap steps)
    (128, 512, torch.float16, (64, 32, 128, True)),    # 128-channel x' tiles: half-depth steps (spilled otherwise)
    (128, 512, torch.float32, (64, 16, 32, False)),    # TF32: half-depth steps, 32 channels a step of the recompute
])
def test_recomputing_dgrad_gpu_tiles(c_g, k_g, dtype, expect, monkeypatch):
    """(BLOCK_N, BLOCK_K, BLOCK_C, X_ONCE) of a dgrad recomputing y on a GPU: a narrow group's 32 channels in one
    32-wide column tile (not a half-masked 64-wide one); fp16 / bf16 form the rows' x' tile of all C_g channels once,
    before the loop (not with the prologue at every step), and reduce 64 channels a step where K_g holds whole steps
    and C_g <= 64 (the per-step work halves; fp16 sm_90, the model's 1x1 expansions' dgrads 290 / 196 / 282 ->
    141 / 78 / 106 us modelled a launch)."""
    from pe_kernels.triton.conv_fwd import ConvGeometry

    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    cl = torch.channels_last
    prologue = dtype == "prologue"
    dtype = torch.float16 if prologue else dtype
    geo = ConvGeometry(N=2, C=2 * c_g, H=4, W=4, K=2 * k_g, R=1, S=1, P=4, Q=4, groups=2, C_g=c_g, K_g=k_g,
                       stride=(1, 1), padding=(0, 0), dilation=(1, 1), dtype=dtype)
    x = torch.zeros(2, 2 * c_g, 4, 4, dtype=dtype).contiguous(memory_format=cl)
    y = torch.zeros(2, 2 * k_g, 4, 4, dtype=dtype).contiguous(memory_format=cl)
    w = torch.zeros(2 * k_g, c_g, 1, 1, dtype=dtype)
    vec = torch.zeros(2 * k_g)
    on_load = conv_bwd_mod.GaccOnLoad(y, vec, vec, torch.zeros(2, 2 * k_g), vec + 1, 32, 1e-5, vec.clone(),
                                      vec.clone(), recompute=True, terms=torch.zeros(3, 2 * k_g))
    scale = torch.ones(2 * c_g) if prologue else None
    launch = conv_bwd_mod._dgrad_launch(y, w, x, scale, scale, prologue, geo, True, False,
                                        conv_bwd_mod._dgrad_meta(geo, None), None, on_load)
    assert launch.meta["RECOMPUTE_Y"] and launch.meta["TAP_STEPS"]
    assert tuple(launch.meta[k] for k in ("BLOCK_N", "BLOCK_K", "BLOCK_C", "X_ONCE")) == expect
