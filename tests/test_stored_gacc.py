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
# prologue's ReLU mask)
CASES = {
    "3x3_s2_g2": (tb.Case(2, 32, 32, 7, 6, 3, stride=2, padding=1, groups=2), True, True, False),
    "1x1_bias": (tb.Case(2, 16, 32, 5, 6, 1), True, True, False),
    "1x1_recompute": (tb.Case(2, 16, 32, 5, 6, 1, groups=2), True, False, True),
}


def _gacc_flags(name, kwargs):
    if name == "_conv_wgrad_kernel":
        yield "wgrad", kwargs.get("STORE_GACC")
    elif name == "_conv_dgrad_kernel":
        yield "dgrad", kwargs.get("GACC_ON_LOAD")


def recorded_gacc():
    """{"wgrad": set of STORE_GACC, "dgrad": set of GACC_ON_LOAD} of the launches in the block."""
    return recorded_flags(_gacc_flags)


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_against_reference(name, dtype, kernel_device):
    case, prologue, bias, recomputes = CASES[name]
    args = tb.make_inputs(case, dtype, kernel_device, prologue=prologue, bias=bias)
    with recorded_gacc() as seen:
        tb.check(args, dtype, needs_grad=tb.ALL, tiles=TILES)
    assert dict(seen) == {"wgrad": {not recomputes}, "dgrad": {recomputes}}, dict(seen)


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
