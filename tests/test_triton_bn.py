"""pe_kernels.triton bn_finalize / bn_running_update / bn_train_finalize / bn_finalize_backward / bn_apply /
bn_apply_backward against the reference, and the launches each makes per call.

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
from test_triton_conv import DTYPES, launches_per_call, make_layout

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


# One finalize per BatchNorm and training step: num_batches_tracked, running statistics, (scale, shift), one launch.
TRAIN_FINALIZE = {
    # name: (K, affine, momentum, with num_batches_tracked, with running stats, running dtype)
    "odd_affine": (7, True, 0.1, True, True, torch.float32),
    "cumulative": (7, True, None, True, True, torch.float32),             # momentum None: f = 1 / nbt (device)
    "no_affine_cumulative": (64, False, None, True, True, torch.float32),
    "no_nbt": (19, True, 0.3, False, True, torch.float32),
    "no_nbt_cumulative": (19, True, None, False, True, torch.float32),    # f = 0: running stats kept
    "no_running": (19, True, 0.1, True, False, None),                     # track_running_stats=False
    "wide": (1500, True, 0.1, True, True, torch.float32),                 # several loop steps of one program
    "fp16_running": (33, True, 0.1, True, True, torch.float16),
    "bf16_running_cumulative": (33, False, None, True, True, torch.bfloat16),
}


@pytest.mark.parametrize("name", list(TRAIN_FINALIZE))
def test_bn_train_finalize(name, kernel_device):
    K, affine, momentum, with_nbt, with_running, rdtype = TRAIN_FINALIZE[name]
    y = torch.randn(4, K, 3, 5) * 3 + 2
    stats, count = _stats(y).to(kernel_device), 4 * 3 * 5
    weight = (torch.rand(K) + 0.5).to(kernel_device) if affine else None
    bias = torch.randn(K).to(kernel_device) if affine else None

    def buffers():
        gen = torch.Generator().manual_seed(K)
        rm, rv = torch.randn(K, generator=gen), torch.rand(K, generator=gen) + 0.5
        running = (rm.to(kernel_device, rdtype), rv.to(kernel_device, rdtype)) if with_running else (None, None)
        nbt = torch.tensor(3, dtype=torch.long, device=kernel_device) if with_nbt else None
        return (*running, nbt)

    mine, same, r64 = buffers(), buffers(), buffers()
    scale, shift = tri.bn_train_finalize(stats, count, weight, bias, 1e-5, *mine, momentum)
    s_same, b_same = ref.bn_train_finalize(stats, count, weight, bias, 1e-5, *same, momentum)
    s64, b64 = ref.bn_train_finalize(to64(stats), count, to64(weight), to64(bias), 1e-5,
                                     *[to64(t) if t is not None and t.is_floating_point() else
                                       None if t is None else t.cpu() for t in r64],   # (nbt: on the CPU too)
                                     momentum)
    for t in (scale, shift):
        assert t.dtype == torch.float32 and t.shape == (K,) and t.is_contiguous() and t.device == stats.device
    assert_budget("scale", scale, s_same, s64, torch.float32)
    assert_budget("shift", shift, b_same, b64, torch.float32)
    if with_nbt:
        assert mine[2].item() == same[2].item() == 4 and mine[2].dtype == torch.long
    if with_running:
        tol = dict(rtol=1e-6, atol=1e-6) if rdtype == torch.float32 else {}
        for name_, got, want in zip(("running_mean", "running_var"), mine[:2], same[:2]):
            assert got.dtype == rdtype, name_
            torch.testing.assert_close(got, want, **tol, msg=name_)


def test_bn_train_finalize_strided_buffers_and_batchnorm2d(kernel_device):
    """Running buffers that are strided views, updated in place; momentum None over three steps equals
    nn.BatchNorm2d(momentum=None) (the cumulative average), num_batches_tracked included."""
    K = 11
    bn = torch.nn.BatchNorm2d(K, momentum=None)
    buf = torch.zeros(K, 3, device=kernel_device)
    rm, rv = buf[:, 0], buf[:, 2]
    rm.copy_(bn.running_mean)
    rv.copy_(bn.running_var)
    nbt = bn.num_batches_tracked.clone().to(kernel_device)
    weight, bias = bn.weight.detach().to(kernel_device), bn.bias.detach().to(kernel_device)
    for step in range(3):
        y = torch.randn(2, K, 3, 3) * (step + 1) + step
        bn(y)
        tri.bn_train_finalize(_stats(y).to(kernel_device), 18, weight, bias, bn.eps, rm, rv, nbt, None)
    torch.testing.assert_close(rm.cpu(), bn.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(rv.cpu(), bn.running_var, rtol=1e-5, atol=1e-6)
    assert nbt.item() == bn.num_batches_tracked.item() == 3
    assert not buf[:, 1].any()


def test_bn_train_finalize_errors(kernel_device):
    """count < 2 with running statistics raises as the reference does: after the num_batches_tracked bump, with the
    running statistics untouched."""
    stats = torch.zeros(2, 4, device=kernel_device)
    rm, rv = torch.zeros(4, device=kernel_device), torch.ones(4, device=kernel_device)
    nbt, nbt_ref = (torch.tensor(5, device=kernel_device) for _ in range(2))
    with pytest.raises(ValueError, match="count=1"):
        tri.bn_train_finalize(stats, 1, None, None, 1e-5, rm, rv, nbt, 0.1)
    with pytest.raises(ValueError, match="count=1"):
        ref.bn_train_finalize(stats, 1, None, None, 1e-5, rm.clone(), rv.clone(), nbt_ref, 0.1)
    assert nbt.item() == nbt_ref.item() == 6 and not rm.any() and torch.equal(rv, torch.ones_like(rv))
    scale, _ = tri.bn_train_finalize(stats, 1, None, None, 1e-5, None, None, None, 0.1)  # no running stats: fine
    assert scale.shape == (4,)
    with pytest.raises(ValueError, match="given together"):
        tri.bn_train_finalize(stats, 8, None, None, 1e-5, rm, None, None, 0.1)
    with pytest.raises(ValueError, match="num_batches_tracked"):
        tri.bn_train_finalize(stats, 8, None, None, 1e-5, rm, rv, torch.zeros(2, device=kernel_device), 0.1)


FINALIZE_BACKWARD = {
    # name: (grad_scale given, grad_shift given, weight dtype or None, needs_grad)
    "all": (True, True, torch.float32, (True, True, True)),
    "no_grad_scale": (False, True, torch.float32, (True, True, True)),
    "no_grad_shift": (True, False, torch.float32, (True, True, True)),
    "no_weight": (True, True, None, (True, True, True)),
    "fp16_weight": (True, True, torch.float16, (True, True, True)),
    "stats_only": (True, True, torch.float32, (True, False, False)),
    "weight_bias": (True, True, torch.float32, (False, True, True)),
    "bias_only_no_grad_shift": (True, False, torch.float32, (False, False, True)),
}


@pytest.mark.parametrize("K", [7, 1500])
@pytest.mark.parametrize("name", list(FINALIZE_BACKWARD))
def test_bn_finalize_backward(name, K, kernel_device):
    with_gs, with_gb, wdtype, needs_grad = FINALIZE_BACKWARD[name]
    stats, count = _stats(torch.randn(4, K, 3, 5) * 3 + 2).to(kernel_device), 4 * 3 * 5
    weight = (torch.rand(K) + 0.5).to(kernel_device, wdtype) if wdtype is not None else None
    g_scale = torch.randn(K).to(kernel_device) if with_gs else None
    g_shift = torch.randn(K).to(kernel_device) if with_gb else None
    args = (g_scale, g_shift, stats, count, weight, 1e-5, list(needs_grad))
    got = tri.bn_finalize_backward(*args)
    same = ref.bn_finalize_backward(*args)
    r64 = ref.bn_finalize_backward(*[to64(a) for a in args])
    ptrs = set()
    for gname, g, s_, r in zip(ref.FINALIZE_GRAD_NAMES, got, same, r64):
        if s_ is None:
            assert g is None, f"{gname}: expected None"
            continue
        assert g.dtype == s_.dtype and g.shape == s_.shape and g.is_contiguous() and g.device == stats.device, gname
        assert g.data_ptr() not in ptrs, f"{gname}: aliases another output"
        ptrs.add(g.data_ptr())
        assert_budget(f"d_{gname}", g, s_, r, g.dtype)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no_affine"])
def test_bn_launches(affine, kernel_device):
    """One launch per call of each finalize entry point, of the apply and of its backward (its sums reduced by the
    last programs of the same launch); no ATen launch anywhere (no torch.ones/zeros for an
    absent weight, bias or gradient; no copies of contiguous fp32 vectors; no torch reductions)."""
    K = 24
    stats, count = _stats(torch.randn(2, K, 3, 3)).to(kernel_device), 18
    weight = (torch.rand(K) + 0.5).to(kernel_device) if affine else None
    bias = torch.randn(K).to(kernel_device) if affine else None
    rm, rv = torch.zeros(K, device=kernel_device), torch.ones(K, device=kernel_device)
    nbt = torch.tensor(0, device=kernel_device)
    g = torch.randn(K).to(kernel_device)
    inputs = make_apply_inputs((2, K, 3, 3), torch.float16, "channels_last", "residual_bn", kernel_device)
    out = tri.bn_apply(*inputs, True)
    grad = torch.randn(out.shape).to(kernel_device, out.dtype)
    calls = {
        "bn_train_finalize": (lambda: tri.bn_train_finalize(stats, count, weight, bias, 1e-5, rm, rv, nbt, None),
                              (1, 0)),
        "bn_train_finalize_no_running": (lambda: tri.bn_train_finalize(stats, count, weight, bias, 1e-5, None, None,
                                                                       None, 0.1), (1, 0)),
        "bn_finalize_backward": (lambda: tri.bn_finalize_backward(g, g, stats, count, weight, 1e-5, [True] * 3),
                                 (1, 0)),
        "bn_finalize_backward_no_grad_scale": (lambda: tri.bn_finalize_backward(None, g, stats, count, weight, 1e-5,
                                                                                [True] * 3), (1, 0)),
        "bn_finalize": (lambda: tri.bn_finalize(stats, count, weight, bias, 1e-5), (1, 0)),
        "bn_running_update": (lambda: tri.bn_running_update(stats, count, rm, rv, 0.1), (1, 0)),
        "bn_apply": (lambda: tri.bn_apply(*inputs, True), (1, 0)),
        "bn_apply_backward": (lambda: tri.bn_apply_backward(grad, *inputs, True, out, [True] * 6), (1, 0)),
        "bn_apply_backward_no_sums": (lambda: tri.bn_apply_backward(grad, *inputs, True, out,
                                                                    [True, False, False, True, False, False]),
                                      (1, 0)),
    }
    for name, (call, expected) in calls.items():
        counted = launches_per_call(call)
        assert counted.totals() == expected, (name, counted.triton, counted.aten)


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
