"""pe_kernels.triton bn_finalize / bn_running_update / bn_apply / bn_apply_backward against the reference.

Two oracles: the float64 reference on CPU with the error budget |kernel - ref64| <= 2 |torch_same_dtype - ref64|
+ atol (tests/_oracle.py), and nn.BatchNorm2d (+ ReLU) in fp32, running statistics included. The kernels run on
`kernel_device`: CUDA on a GPU machine, CPU under the Triton interpreter elsewhere (conftest.py).
"""

from __future__ import annotations

import pytest
import torch

import pe_kernels.reference as ref
import pe_kernels.triton as tri
from pe_kernels.triton.bn_apply import bn_apply_bwd, bn_apply_fwd

from _devices import ieee_fp32
from _oracle import assert_budget
from test_triton_conv import DTYPES, make_layout

SHAPES = {"2x16x8x8": (2, 16, 8, 8), "1x7x5x3_odd": (1, 7, 5, 3), "2x40x3x5": (2, 40, 3, 5)}
LAYOUTS = ["channels_last", "nchw", "sliced"]


def to64(v):
    """A float64 CPU copy (the reference's input); None stays None."""
    return v.detach().cpu().double() if isinstance(v, torch.Tensor) else v


# ---------------------------------------------------------------------------------------------- finalize
def _stats(y: torch.Tensor) -> torch.Tensor:
    """[mean, m2] per channel (the conv_fused contract), computed in float64, returned in fp32."""
    y = y.double()
    mean = y.mean((0, 2, 3))
    return torch.stack([mean, (y - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))]).float()


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
@pytest.mark.parametrize("K", [7, 64, 1500])
def test_bn_finalize(K, affine, kernel_device):
    y = torch.randn(4, K, 3, 5) * 3 + 2
    stats, count = _stats(y).to(kernel_device), 4 * 3 * 5
    weight = (torch.rand(K) + 0.5).to(kernel_device) if affine else None
    bias = torch.randn(K).to(kernel_device) if affine else None
    scale, shift = tri.bn_finalize(stats, count, weight, bias, 1e-5)
    s_same, b_same = ref.bn_finalize(stats, count, weight, bias, 1e-5)
    s64, b64 = ref.bn_finalize(to64(stats), count, to64(weight), to64(bias), 1e-5)
    for t in (scale, shift):
        assert t.dtype == torch.float32 and t.shape == (K,) and t.is_contiguous() and t.device == stats.device
    assert_budget("scale", scale, s_same, s64, torch.float32)
    assert_budget("shift", shift, b_same, b64, torch.float32)


def test_bn_finalize_strided_inputs(kernel_device):
    stats_t = _stats(torch.randn(2, 9, 4, 4)).to(kernel_device).t().contiguous().t()  # (2, K), column-major
    assert not stats_t.is_contiguous()
    w = torch.rand(18).to(kernel_device)[::2]
    scale, shift = tri.bn_finalize(stats_t, 32, w, None, 1e-3)
    s_ref, b_ref = ref.bn_finalize(stats_t, 32, w, None, 1e-3)
    torch.testing.assert_close(scale, s_ref)
    torch.testing.assert_close(shift, b_ref)


@pytest.mark.parametrize("momentum", [0.1, 1.0, 0.0])
def test_bn_running_update(momentum, kernel_device):
    K = 19
    stats, count = _stats(torch.randn(2, K, 3, 3)).to(kernel_device), 18
    rm, rv = torch.randn(K).to(kernel_device), (torch.rand(K) + 0.5).to(kernel_device)
    rm_ref, rv_ref = rm.clone(), rv.clone()
    assert tri.bn_running_update(stats, count, rm, rv, momentum) is None
    ref.bn_running_update(stats, count, rm_ref, rv_ref, momentum)
    torch.testing.assert_close(rm, rm_ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv, rv_ref, rtol=1e-6, atol=1e-6)


def test_bn_running_update_strided_buffers(kernel_device):
    K = 11
    stats = _stats(torch.randn(3, K, 2, 2)).to(kernel_device)
    buf = torch.rand(K, 3).to(kernel_device)
    rm, rv = buf[:, 0], buf[:, 2]  # stride 3: views into buf, updated in place
    rm_ref, rv_ref, middle = rm.clone(), rv.clone(), buf[:, 1].clone()
    tri.bn_running_update(stats, 12, rm, rv, 0.3)
    ref.bn_running_update(stats, 12, rm_ref, rv_ref, 0.3)
    torch.testing.assert_close(buf[:, 0], rm_ref)
    torch.testing.assert_close(buf[:, 2], rv_ref)
    assert torch.equal(buf[:, 1], middle)


def test_bn_matches_batchnorm2d_relu(kernel_device):
    """Finalize + running update + apply == nn.BatchNorm2d (train) + ReLU in fp32 on CPU, buffers included.
    The statistics come from the conv kernel with an identity weight, in IEEE fp32 (TF32 would round y)."""
    K = 12
    y = torch.randn(3, K, 5, 4) * 2 + 1
    bn = torch.nn.BatchNorm2d(K, momentum=0.2)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
    rm, rv = bn.running_mean.clone().to(kernel_device), bn.running_var.clone().to(kernel_device)
    expected = torch.relu(bn(y))
    yd = y.to(kernel_device)
    with ieee_fp32():
        stats = tri.conv_fused(yd, torch.eye(K, device=kernel_device).view(K, K, 1, 1), None, None, None, False,
                               None, None, None, False, (1, 1), (0, 0), (1, 1), 1, True)[1]
    count = 3 * 5 * 4
    weight, bias = bn.weight.detach().to(kernel_device), bn.bias.detach().to(kernel_device)
    scale, shift = tri.bn_finalize(stats, count, weight, bias, bn.eps)
    tri.bn_running_update(stats, count, rm, rv, 0.2)
    out = tri.bn_apply(yd, scale, shift, None, None, None, True)
    torch.testing.assert_close(out.cpu(), expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rm.cpu(), bn.running_mean, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(rv.cpu(), bn.running_var, rtol=1e-6, atol=1e-6)


def test_bn_finalize_errors(kernel_device):
    zeros = lambda *shape, **kw: torch.zeros(*shape, device=kernel_device, **kw)  # noqa: E731
    with pytest.raises(ValueError, match="count=1"):
        tri.bn_running_update(zeros(2, 4), 1, zeros(4), zeros(4) + 1, 0.1)
    with pytest.raises(ValueError, match="count=0"):
        tri.bn_finalize(zeros(2, 4), 0, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"stats must have shape \(2, K\)"):
        tri.bn_finalize(zeros(3, 4), 8, None, None, 1e-5)
    with pytest.raises(ValueError, match="weight must be a 1-D tensor of 4"):
        tri.bn_finalize(zeros(2, 4), 8, zeros(5) + 1, None, 1e-5)
    with pytest.raises(TypeError, match="float32"):
        tri.bn_finalize(zeros(2, 4, dtype=torch.float64), 8, None, None, 1e-5)


# ------------------------------------------------------------------------------------------------- apply
def make_apply_inputs(shape, dtype, layout, residual_mode, device):
    """(y, scale, shift, residual, residual_scale, residual_shift) on `device`, drawn on CPU."""
    N, K, H, W = shape
    y = make_layout(torch.randn(shape).to(device, dtype), layout)
    scale, shift = (torch.rand(K) + 0.5).to(device), torch.randn(K).to(device)
    residual = rscale = rshift = None
    if residual_mode != "none":
        residual = make_layout(torch.randn(shape).to(device, dtype), layout)
    if residual_mode == "residual_bn":
        rscale, rshift = (torch.rand(K) + 0.5).to(device), torch.randn(K).to(device)
    return y, scale, shift, residual, rscale, rshift


RESIDUAL_MODES = ["none", "residual", "residual_bn"]


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual_mode", RESIDUAL_MODES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_bn_apply(shape, dtype, layout, residual_mode, relu, kernel_device):
    inputs = make_apply_inputs(shape, dtype, layout, residual_mode, kernel_device)
    out = tri.bn_apply(*inputs, relu)
    same = ref.bn_apply(*inputs, relu)
    r64 = ref.bn_apply(*[to64(t) for t in inputs], relu)
    assert out.dtype == dtype and out.device == inputs[0].device
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_budget("out", out, same, r64, dtype)


def check_apply_backward(inputs, dtype, relu, needs_grad=(True,) * 6, tiles=None):
    y, scale, shift, residual, rscale, rshift = inputs
    out64 = ref.bn_apply(*[to64(t) for t in inputs], relu)
    out = out64.to(dtype).to(y.device)  # the ReLU mask of the oracle (see test_triton_conv.check_backward)
    grad = make_layout(torch.randn(y.shape).to(y.device, dtype), "nchw")
    got = bn_apply_bwd(grad, *inputs, relu, out, list(needs_grad), tiles=tiles)
    same = ref.bn_apply_backward(grad, *inputs, relu, out, list(needs_grad))
    r64 = ref.bn_apply_backward(to64(grad), *[to64(t) for t in inputs], relu, out64, list(needs_grad))
    for name, g, s, r in zip(ref.APPLY_GRAD_NAMES, got, same, r64):
        if r is None:
            assert g is None, f"{name}: expected None"
            continue
        if name in ("y", "residual"):
            assert g.is_contiguous(memory_format=torch.channels_last) and g.dtype == dtype, name
        else:
            assert g.dtype == torch.float32 and g.is_contiguous(), name
        assert g.device == y.device, name
        assert_budget(f"d_{name}", g, s, r, dtype)


@pytest.mark.parametrize("relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("residual_mode", RESIDUAL_MODES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_bn_apply_backward(shape, dtype, residual_mode, relu, kernel_device):
    check_apply_backward(make_apply_inputs(shape, dtype, "channels_last", residual_mode, kernel_device), dtype,
                         relu)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
def test_bn_apply_backward_layouts(layout, kernel_device):
    check_apply_backward(make_apply_inputs(SHAPES["2x40x3x5"], torch.float32, layout, "residual_bn", kernel_device),
                         torch.float32, True)


@pytest.mark.parametrize("needs_grad", [
    (True, False, False, False, False, False),
    (False, True, True, False, False, False),
    (False, False, False, True, True, True),
    (False, True, False, False, True, False),
], ids=["y", "scale_shift", "residual_all", "scale_rscale"])
def test_bn_apply_backward_needs_grad(needs_grad, kernel_device):
    inputs = make_apply_inputs(SHAPES["2x16x8x8"], torch.float32, "channels_last", "residual_bn", kernel_device)
    check_apply_backward(inputs, torch.float32, True, needs_grad)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_bn_apply_small_tiles(dtype, kernel_device):
    """16 x 16 tiles on 40 channels and 30 rows: partial tiles in both directions, several partial rows."""
    inputs = make_apply_inputs(SHAPES["2x40x3x5"], dtype, "sliced", "residual_bn", kernel_device)
    tiles = dict(BLOCK_M=16, BLOCK_K=16)
    out = bn_apply_fwd(*inputs, True, tiles=tiles)
    assert_budget("out", out, ref.bn_apply(*inputs, True), ref.bn_apply(*[to64(t) for t in inputs], True), dtype)
    check_apply_backward(inputs, dtype, True, tiles=tiles)


def test_bn_apply_backward_deterministic(kernel_device):
    inputs = make_apply_inputs(SHAPES["2x16x8x8"], torch.float32, "channels_last", "residual_bn", kernel_device)
    out = tri.bn_apply(*inputs, True)
    grad = torch.randn(out.shape).to(kernel_device)
    a = tri.bn_apply_backward(grad, *inputs, True, out, [True] * 6)
    b = tri.bn_apply_backward(grad, *inputs, True, out, [True] * 6)
    assert all(torch.equal(x, y) for x, y in zip(a, b))


def test_bn_apply_empty_batch(kernel_device):
    inputs = make_apply_inputs((0, 5, 3, 3), torch.float32, "channels_last", "residual_bn", kernel_device)
    out = tri.bn_apply(*inputs, True)
    assert out.shape == (0, 5, 3, 3)
    grads = tri.bn_apply_backward(out, *inputs, True, out, [True] * 6)
    assert [tuple(g.shape) for g in grads] == [(0, 5, 3, 3), (5,), (5,), (0, 5, 3, 3), (5,), (5,)]
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads)


def test_bn_apply_errors(kernel_device):
    y = torch.randn(2, 4, 3, 3).to(kernel_device)
    ones, zeros = torch.ones(4, device=kernel_device), torch.zeros(4, device=kernel_device)
    with pytest.raises(ValueError, match="y must be 4-D"):
        tri.bn_apply(y[0], ones, zeros, None, None, None, False)
    with pytest.raises(ValueError, match="scale must be a 1-D tensor of 4"):
        tri.bn_apply(y, ones[:3], zeros, None, None, None, False)
    with pytest.raises(ValueError, match="residual must have shape"):
        tri.bn_apply(y, ones, zeros, torch.zeros(2, 4, 3, 2, device=kernel_device), None, None, False)
    with pytest.raises(ValueError, match="shift is on meta"):
        tri.bn_apply(y, ones, torch.zeros(4, device="meta"), None, None, None, False)
    with pytest.raises(TypeError, match="float64"):
        tri.bn_apply(y.double(), ones, zeros, None, None, None, False)
    with pytest.raises(ValueError, match="needs_grad must have 6"):
        tri.bn_apply_backward(y, y, ones, zeros, None, None, None, False, y, [True] * 5)


# --------------------------------------------------------------------------------------------------- GPU
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(128, 256, 16, 16), (32, 1024, 8, 8)], ids=["128x256x16x16", "32x1024x8x8"])
def test_gpu_bn_vs_aten(shape, dtype):
    cuda = make_apply_inputs(shape, dtype, "channels_last", "residual_bn", torch.device("cuda"))
    out64 = ref.bn_apply(*[to64(t) for t in cuda], True)
    out = tri.bn_apply(*cuda, True)
    assert_budget("out", out, ref.bn_apply(*cuda, True), out64, dtype)
    grad = torch.randn(shape).to(dtype)
    got = tri.bn_apply_backward(grad.cuda(), *cuda, True, out64.to(dtype).cuda(), [True] * 6)
    same = ref.bn_apply_backward(grad.cuda(), *cuda, True, out64.to(dtype).cuda(), [True] * 6)
    r64 = ref.bn_apply_backward(grad.double(), *[to64(t) for t in cuda], True, out64, [True] * 6)
    for name, g, s, r in zip(ref.APPLY_GRAD_NAMES, got, same, r64):
        assert_budget(name, g, s, r, dtype)
    stats = _stats(torch.randn(shape)).cuda()
    K = shape[1]
    w, b = torch.rand(K).cuda(), torch.randn(K).cuda()
    torch.testing.assert_close(tri.bn_finalize(stats, 1000, w, b, 1e-5), ref.bn_finalize(stats, 1000, w, b, 1e-5))
