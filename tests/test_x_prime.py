"""The x' a training forward stores for its backward (STORE_XP, conv_fwd.stores_x_prime): a conv -> BN training layer
with a prologue, x' = act(x * in_scale + in_shift), forms x' at every filter tap of its forward and of its backward's
wgrad (the wgrad's prologue was ~1/3 of its loop: fp16 sm_90, the 3x3 wgrads of 32-, 64- and 128-channel groups
305 -> 216, 158 -> 116, 124 -> 91 us modelled). Where a tap reads every row's own input position (stride 1, the output
as large as the input; 2-byte operands), the forward's programs of column block 0 store x' at those positions after
their loop, and the wgrad reads it instead of x (the dgrad still reads x: the prologue's backward needs x itself),
in 128-row steps for narrow groups (no prologue beside them: no spill). The autograd nodes
(ops.conv_bn_train, ops.conv_bn_act) ask a backend with contract.X_PRIME for it and hand it to its backward.

Checks: the rule; the stored x' against act(x * in_scale + in_shift) (within one rounding of the dtype: the kernel's
multiply-add is fused), the launch's other results unchanged; the backward with x' gives the gradients it gives
without (bit for bit in the interpreter: the wgrad reads the very values it would form) and the float64 reference's;
the ops' autograd path (the forward's STORE_XP and the wgrad without a prologue recorded), bit for bit as without.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pe_kernels
from pe_kernels import ops
from pe_kernels.triton import conv_fwd as conv_fwd_mod
from pe_kernels.triton.conv_bwd import conv_bn_bwd
from pe_kernels.triton.conv_fwd import ConvGeometry, conv_bn_train, stores_x_prime

from _devices import require_backend
from _oracle import assert_budget
from _launch_flags import recorded_flags

DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.bfloat16, id="bf16")]   # (fp32: none stored)
# (N, C, H, W, K, R, padding, dilation, groups, tiles): column blocks of 16 (several per group where K_g = 32),
# 16-deep steps (two a tap where C_g = 32), two groups a program (BLOCK_N = 2 K_g)
CASES = {
    "3x3_g4": (2, 64, 6, 5, 64, 3, 1, 1, 4, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
    "3x3_g4_pack": (2, 64, 6, 5, 64, 3, 1, 1, 4, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=16)),
    "3x3_g2_k32_c32": (2, 64, 5, 7, 64, 3, 1, 1, 2, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
    "5x5_dil2_g1": (1, 16, 9, 8, 24, 5, 4, 2, 1, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)),
}


def _flags(name, kwargs):
    if name == "_conv_fwd_kernel":
        yield "fwd", kwargs.get("STORE_XP")
    elif name == "_conv_wgrad_kernel":
        yield "wgrad", kwargs.get("PROLOGUE")


def _geo(c_g, r, stride=1, padding=1, dilation=1, h=8, groups=2):
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    return ConvGeometry(N=2, C=groups * c_g, H=h, W=h, K=groups * c_g, R=r, S=r, P=p, Q=p, groups=groups, C_g=c_g,
                        K_g=c_g, stride=(stride, stride), padding=(padding, padding), dilation=(dilation, dilation),
                        dtype=torch.float16)


def test_rule():
    steps = dict(BLOCK_K=32)
    assert stores_x_prime(_geo(32, 3), steps, True)
    assert stores_x_prime(_geo(32, 5, padding=4, dilation=2), steps, True)
    assert not stores_x_prime(_geo(32, 3), steps, False)                      # no prologue: x' is x
    assert not stores_x_prime(_geo(32, 3, stride=2), steps, True)             # a tap misses rows' positions
    assert not stores_x_prime(_geo(32, 3, padding=0), steps, True)            # output smaller than the input
    assert not stores_x_prime(_geo(32, 1, padding=0), steps, True)            # one tap: the 1x1 wgrad's own path
    assert not stores_x_prime(_geo(32, 3, padding=3, dilation=2, h=9), steps, True)   # padding not on a tap
    assert not stores_x_prime(_geo(48, 3), steps, True)                       # steps spanning taps
    fp32 = dataclasses.replace(_geo(32, 3), dtype=torch.float32)
    assert not stores_x_prime(fp32, steps, True)                               # fp32: spilled beside it


def _inputs(name, dtype, device, layout="channels_last"):
    n, c, h, w, k, r, pad, dil, groups, tiles = CASES[name]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(n, c, h, w, generator=gen).to(device, dtype)
    x = x.contiguous(memory_format=torch.channels_last) if layout == "channels_last" else x
    if layout == "sliced":
        x = torch.randn(n, c + 8, h, w, generator=gen).to(device, dtype)[:, 4:c + 4]
    wt = (torch.randn(k, c // groups, r, r, generator=gen) / (c // groups * r * r) ** 0.5).to(device, dtype)
    sc = (torch.rand(c, generator=gen) + 0.5).to(device)
    sh = (torch.randn(c, generator=gen) * 0.5).to(device)
    geo = ((1, 1), (pad, pad), (dil, dil), groups)
    return x, wt, sc, sh, geo, tiles


def _train(x, wt, sc, sh, geo, tiles, x_prime, relu=True):
    k = wt.shape[0]
    running = (torch.zeros(k, device=x.device), torch.ones(k, device=x.device),
               torch.zeros((), dtype=torch.long, device=x.device))
    out = conv_bn_train(x, wt, None, sc, sh, relu, *geo, None, None, 1e-5, *running, 0.1, tiles=tiles,
                        x_prime=x_prime)
    return out, running


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_forward_stores_x_prime(name, dtype, relu, kernel_device):
    x, wt, sc, sh, geo, tiles = _inputs(name, dtype, kernel_device)
    with recorded_flags(_flags) as seen:
        (y, stats, scale, shift, xp), running = _train(x, wt, sc, sh, geo, tiles, True, relu)
        plain, running0 = _train(x, wt, sc, sh, geo, tiles, False, relu)
    assert seen["fwd"] == {True, False}, dict(seen)
    want = x.float() * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)
    want = torch.relu(want) if relu else want
    assert xp.dtype == dtype and xp.shape == x.shape and xp.is_contiguous(memory_format=torch.channels_last)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(xp.float(), want.to(dtype).float(), rtol=eps, atol=eps * float(want.abs().max()))
    for a, b in zip((y, stats, scale, shift, *running), (*plain, *running0)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
def test_forward_x_prime_layouts(layout, kernel_device):
    """x in any layout: x' channels_last all the same."""
    x, wt, sc, sh, geo, tiles = _inputs("3x3_g4_pack", torch.float16, kernel_device, layout)
    (_, _, _, _, xp), _ = _train(x, wt, sc, sh, geo, tiles, True)
    want = torch.relu(x.float() * sc.view(1, -1, 1, 1) + sh.view(1, -1, 1, 1)).half()
    assert xp.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(xp, want, rtol=2 ** -10, atol=2 ** -10 * float(want.abs().max()))


def test_no_x_prime_where_the_rule_says_no(kernel_device):
    """Stride 2 (no tap at every row's own position), or fp32: None, and the wgrad forms x' as before."""
    x, wt, sc, sh, geo, tiles = _inputs("3x3_g4", torch.float16, kernel_device)
    (_, _, _, _, xp), _ = _train(x, wt, sc, sh, ((2, 2), (1, 1), (1, 1), 4), tiles, True)
    assert xp is None
    x, wt, sc, sh, geo, tiles = _inputs("3x3_g4", torch.float32, kernel_device)
    (_, _, _, _, xp), _ = _train(x, wt, sc, sh, geo, tiles, True)
    assert xp is None


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["3x3_g4_pack", "3x3_g2_k32_c32", "5x5_dil2_g1"])
def test_backward_reads_x_prime(name, dtype, kernel_device):
    """The wgrad on the stored x' (no prologue): every gradient as without it, and against float64."""
    x, wt, sc, sh, geo, tiles = _inputs(name, dtype, kernel_device)
    (y, stats, scale, shift, xp), _ = _train(x, wt, sc, sh, geo, tiles, True)
    gen = torch.Generator().manual_seed(1)
    gy = torch.randn(y.shape, generator=gen).to(kernel_device, dtype).contiguous(memory_format=torch.channels_last)
    gs, gh = torch.randn(y.shape[1], generator=gen).to(kernel_device), torch.randn(y.shape[1], generator=gen).to(
        kernel_device)
    needs = [True, True, False, True, True, False, False]
    bwd = dict(tiles=dict(tiles, SPLIT=2))
    with recorded_flags(_flags) as seen:
        with_xp = conv_bn_bwd(gy, gs, gh, x, wt, None, sc, sh, True, *geo, y, stats, None, 1e-5, needs, **bwd,
                              x_prime=xp)
    assert seen["wgrad"] == {False}, dict(seen)
    without = conv_bn_bwd(gy, gs, gh, x, wt, None, sc, sh, True, *geo, y, stats, None, 1e-5, needs, **bwd)
    for a, b in zip(with_xp, without):
        assert (a is None) == (b is None)
        if a is None:
            continue
        if kernel_device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2 ** -8, atol=2 ** -8 * float(b.abs().max()))
    # and against the float64 reference, the reference in the dtype beside it (the oracle's budget)
    from pe_kernels import reference as ref
    same = ref.conv_bn_train_backward(gy, gs, gh, x, wt, None, sc, sh, True, *geo, y, stats, None, 1e-5, needs)
    to64 = lambda t: t.detach().cpu().double()  # noqa: E731
    r64 = ref.conv_bn_train_backward(*map(to64, (gy, gs, gh, x, wt)), None, to64(sc), to64(sh), True, *geo, to64(y),
                                     to64(stats), None, 1e-5, needs)
    for name_, o, s_, r in zip(("x", "weight", "bias", "in_scale", "in_shift"), with_xp, same, r64):
        if r is not None:
            assert_budget(f"d_{name_}", o, s_, r, dtype, dot=True)


def test_x_prime_errors(kernel_device):
    x, wt, sc, sh, geo, tiles = _inputs("3x3_g4", torch.float16, kernel_device)
    (y, stats, _, _, xp), _ = _train(x, wt, sc, sh, geo, tiles, True)
    needs = [True, True, False, True, True, False, False]
    with pytest.raises(ValueError, match="x_prime"):
        conv_bn_bwd(y, None, None, x, wt, None, sc, sh, True, *geo, y, stats, None, 1e-5, needs, x_prime=xp[:, :8])
    with pytest.raises(TypeError, match="x_prime"):
        conv_bn_bwd(y, None, None, x, wt, None, sc, sh, True, *geo, y, stats, None, 1e-5, needs, x_prime=xp.float())


def _tap_tiles(geo, prologue=False, stats=False):
    """The interpreter's tiles with one-tap steps (its own span taps: no x' there)."""
    return dict(BLOCK_N=16, BLOCK_K=16)


@pytest.fixture
def fresh_plans():
    from pe_kernels.triton._common import clear_launch_plans

    clear_launch_plans()
    yield
    clear_launch_plans()


@pytest.mark.parametrize("op", ["conv_bn_train", "conv_bn_act"])
def test_ops_save_x_prime_for_the_backward(op, kernel_device, monkeypatch, fresh_plans):
    """ops.conv_bn_train / ops.conv_bn_act on the triton backend with gradients: the forward stores x', the wgrad
    reads it; outputs, running statistics and every gradient as without it."""
    require_backend("triton")
    import pe_kernels.triton as tri

    if kernel_device.type == "cpu":   # (plans made with these tiles are forgotten after the test: fresh_plans)
        monkeypatch.setattr(conv_fwd_mod, "fwd_tiles", _tap_tiles)
    results = []
    for store in (True, False):
        if not store:   # a backend without contract.X_PRIME: the node asks for no x'
            monkeypatch.setattr(tri, "X_PRIME", False)
        gen = torch.Generator().manual_seed(0)
        # 32-channel groups: on a GPU their steps lie in one tap (16-channel ones span taps: no x' there)
        x = torch.randn(2, 64, 6, 5, generator=gen).to(kernel_device, torch.float16).contiguous(
            memory_format=torch.channels_last).requires_grad_(True)
        w = (torch.randn(32, 32, 3, 3, generator=gen) / 17).to(kernel_device, torch.float16).requires_grad_(True)
        sc = (torch.rand(64, generator=gen) + 0.5).to(kernel_device).requires_grad_(True)
        sh = torch.randn(64, generator=gen).to(kernel_device).requires_grad_(True)
        rm, rv = torch.zeros(32, device=kernel_device), torch.ones(32, device=kernel_device)
        kw = dict(in_scale=sc, in_shift=sh, in_relu=True, padding=1, groups=2, running_mean=rm, running_var=rv)
        with pe_kernels.use_backend("triton"), recorded_flags(_flags) as seen:
            if op == "conv_bn_act":
                out = ops.conv_bn_act(x, w, **kw, relu=True)
            else:
                y, scale, shift = ops.conv_bn_train(x, w, **kw)
                out = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
            out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(kernel_device,
                                                                                                out.dtype))
        assert dict(seen) == {"fwd": {store}, "wgrad": {not store}}, (store, dict(seen))
        results.append((out, rm, rv, x.grad, w.grad, sc.grad, sh.grad))
    for a, b in zip(*results):
        if kernel_device.type == "cpu":
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=2 ** -10, atol=2 ** -10 * float(b.abs().max()))


def test_gpu_wgrad_rows_on_the_stored_x_prime(monkeypatch):
    """On a GPU: the narrow groups' wgrad (K_g <= 32, dw^T on 8 warps) steps 128 rows where it reads x as is (the
    stored x'), 64 where it forms x' (a prologue: 128 spilled in bf16) or in fp32."""
    from pe_kernels.triton import conv_bwd as conv_bwd_mod

    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    monkeypatch.setattr(conv_fwd_mod, "INTERPRET", False)
    for dtype, c_g, x_prime, expect in ((torch.float16, 32, True, 128), (torch.bfloat16, 32, True, 128),
                                        (torch.float16, 32, False, 64), (torch.float32, 32, True, 64),
                                        (torch.float16, 64, True, 64)):
        x = torch.empty(2, 4 * c_g, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(4 * c_g, c_g, 3, 3, dtype=dtype)
        y = torch.empty(2, 4 * c_g, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        vec = torch.ones(4 * c_g)
        plan = conv_bwd_mod._plan_conv_bn_bwd(y, None, None, x, w, None, vec, vec, True, (1, 1), (1, 1), (1, 1), 4, y,
                                              torch.zeros(2, 4 * c_g), None, 1e-5,
                                              [True, True, False, True, True, False, False], None, None, None,
                                              x if x_prime else None)
        meta = plan.wgrad.meta
        assert (meta["BLOCK_M"], meta["PROLOGUE"]) == (expect, not x_prime), (dtype, c_g, x_prime, meta)
