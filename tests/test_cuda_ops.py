"""pe_kernels.cuda against the reference (GPU only: marker `gpu`; skipped where pe_kernels._C is not built).

Oracle: |cuda - ref64| <= 2*|torch_same_dtype - ref64| + atol elementwise, ref64 = the float64 reference on CPU,
torch_same_dtype = the reference (cuDNN) on the GPU in the tested dtype with the same TF32 setting.
Statistics are [mean, m2] (.lab/CONTRACT.md): at a large mean/std they are checked against a condition-aware bound
(C * eps * mean/std), and NaN must propagate (statistics, running_var) and pass ReLU backward as torch's
threshold_backward does; NaN positions are compared exactly (the budget alone would let a NaN through).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from _devices import ieee_fp32
from pe_kernels import reference as ref

pytestmark = pytest.mark.gpu

DTYPES = [(torch.float16, 2e-2), (torch.bfloat16, 1e-1), (torch.float32, 1e-3), (torch.float64, 1e-9)]

# (N, C, H, W, K, R, S, stride, pad, dil, groups)
SHAPES = [
    (2, 3, 9, 9, 16, 3, 3, 1, 1, 1, 1),        # stem-like, C not a multiple of anything
    (2, 32, 8, 8, 64, 1, 1, 1, 0, 1, 4),       # 1x1 grouped (Kg = 16: narrow tile)
    (1, 64, 7, 7, 128, 3, 3, 2, 1, 1, 2),      # strided, odd sizes, Kg = 64
    (3, 24, 6, 10, 48, 3, 3, 1, 2, 2, 3),      # dilated, Cg = 8
    (2, 128, 5, 5, 256, 3, 3, 1, 1, 1, 4),     # several reduction steps and column tiles
]


def _cuda():
    import pe_kernels.cuda as cuda_backend

    if not cuda_backend.is_built():
        pytest.skip(cuda_backend.load_error())
    return cuda_backend


def _budget(out, same, ref64, atol, what):
    out64 = out.detach().double().cpu()
    same64 = same.detach().double().cpu()
    err = (out64 - ref64).abs()
    bound = 2 * (same64 - ref64).abs() + atol * (1 + ref64.abs())
    bad = err > bound
    assert not bad.any(), (f"{what}: {int(bad.sum())} of {bad.numel()} elements out of budget; "
                           f"max err {err.max().item():.3e}")


def _make(shape, dtype, prologue, epilogue, residual, bias):
    N, C, H, W, K, R, S, stride, pad, dil, groups = shape
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64)
    w = torch.randn(K, C // groups, R, S, generator=g, dtype=torch.float64) / (C // groups * R * S) ** 0.5
    vec = lambda n, lo=0.5: (torch.rand(n, generator=g, dtype=torch.float64) + lo)  # noqa: E731
    args = dict(
        bias=torch.randn(K, generator=g, dtype=torch.float64) if bias else None,
        in_scale=vec(C) if prologue else None, in_shift=torch.randn(C, generator=g, dtype=torch.float64) * 0.1
        if prologue else None, in_relu=prologue,
        out_scale=vec(K) if epilogue else None, out_shift=torch.randn(K, generator=g, dtype=torch.float64) * 0.1
        if epilogue else None,
        residual=torch.randn(N, K, (H + 2 * pad - dil * (R - 1) - 1) // stride + 1,
                             (W + 2 * pad - dil * (S - 1) - 1) // stride + 1, generator=g, dtype=torch.float64)
        if residual else None,
        out_relu=epilogue,
    )
    conv = dict(stride=(stride, stride), padding=(pad, pad), dilation=(dil, dil), groups=groups)
    return x, w, args, conv


def _to(t, device, dtype):
    if t is None or isinstance(t, bool):
        return t
    if t.dim() == 4:
        return t.to(device=device, dtype=dtype)
    return t.to(device=device, dtype=ref.param_dtype(dtype))


def _kink_band(cpu64, conv, dtype, tf32):
    """Where the tested dtype cannot decide the epilogue ReLU: |z64| <= a first-order bound of |z - z64| for any
    correct kernel, z64 = the float64 pre-activation. x, x' = relu(x*in_scale + in_shift), w and the residual are
    rounded to the dtype (TF32 rounds x', w to 10 bits), acc sums fan_in products in fp32:
        |z - z64| <= (3u |out_scale| conv(|x| in_scale + |in_shift|, |w|) + u |residual| + fp32 accumulation)
                  <= (2 eps + fan_in * 2^-24) * mag,   u = eps/2,
        mag = |out_scale| (conv(|x| |in_scale| + |in_shift|, |w|) + |bias|) + |out_shift| + |residual|.
    The `same` reference (cuDNN, acc rounded to the dtype) stays within it too (one more u |acc|). A kernel that
    masks on its own z (the cuda backend recomputes acc when d out_scale or grad_stats is wanted) may decide such an
    element either way, which moves d weight by ~ |grad_y * out_scale * x'| (up to 4.5 in bf16 at these shapes;
    the float64 oracle cannot see it, the same-dtype reference flips elsewhere): the backward test zeroes grad_y
    there, so every element it judges has a decidable mask (tests/test_bn_stability.py's KINK, on the
    pre-activation, so that masked elements stay tested)."""
    eps = 2.0 ** -10 if (tf32 and dtype == torch.float32) else torch.finfo(dtype).eps
    acc_eps = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    w = cpu64["weight"]
    a = cpu64["x"].abs()
    if cpu64["in_scale"] is not None:
        a = a * _nchw(cpu64["in_scale"].abs())
    if cpu64["in_shift"] is not None:
        a = a + _nchw(cpu64["in_shift"].abs())
    mag = F.conv2d(a, w.abs(), None, **conv)
    if cpu64["bias"] is not None:
        mag = mag + _nchw(cpu64["bias"].abs())
    if cpu64["out_scale"] is not None:
        mag = mag * _nchw(cpu64["out_scale"].abs())
    if cpu64["out_shift"] is not None:
        mag = mag + _nchw(cpu64["out_shift"].abs())
    if cpu64["residual"] is not None:
        mag = mag + cpu64["residual"].abs()
    z64, _ = ref.conv_fused(cpu64["x"], w, cpu64["bias"], cpu64["in_scale"], cpu64["in_shift"], cpu64["in_relu"],
                            cpu64["out_scale"], cpu64["out_shift"], cpu64["residual"], False, conv["stride"],
                            conv["padding"], conv["dilation"], conv["groups"], False)
    return z64.abs() <= (2 * eps + w[0].numel() * acc_eps) * mag


@pytest.fixture(params=[False, True], ids=["ieee", "tf32"])
def tf32(request):
    """torch's cuDNN TF32 flag, which the cuda backend follows for fp32 convolutions."""
    old = torch.backends.cudnn.allow_tf32
    torch.backends.cudnn.allow_tf32 = request.param
    yield request.param
    torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("dtype, atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("fused", [False, True], ids=["plain", "fused"])
def test_conv_fused_forward_and_backward(shape, dtype, atol, fused, tf32):
    cuda_backend = _cuda()
    if tf32 and dtype != torch.float32:
        pytest.skip("TF32 only concerns fp32")
    if tf32:  # TF32 rounds the operands to 10 mantissa bits; cuDNN may pick a non-TF32 algorithm for the same call
        atol *= 4
    x, w, args, conv = _make(shape, dtype, prologue=fused, epilogue=fused, residual=fused, bias=True)
    dev = torch.device("cuda")
    cpu64 = dict(x=x, weight=w, **args)
    gpu = {k: _to(v, dev, dtype) for k, v in cpu64.items()}
    call = lambda mod, a: mod.conv_fused(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"],  # noqa
                                         a["in_relu"], a["out_scale"], a["out_shift"], a["residual"], a["out_relu"],
                                         conv["stride"], conv["padding"], conv["dilation"], conv["groups"], True)
    y64, st64 = call(ref, cpu64)
    y_same, st_same = call(ref, gpu)
    y, st = call(cuda_backend, gpu)
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == dtype
    _budget(y, y_same, y64, atol, "y")
    _budget(st, st_same, st64, atol * 10, "stats")

    g = torch.Generator().manual_seed(1)
    gy64 = torch.randn(y64.shape, generator=g, dtype=torch.float64)
    n = y64.shape[0] * y64.shape[2] * y64.shape[3]
    # grad_acc gets grad_stats[0] / n + 2 * grad_stats[1] * (acc - mean): both terms ~1e-2 of grad_y.
    gs64 = torch.randn(2, y64.shape[1], generator=g, dtype=torch.float64) * 1e-2 * torch.tensor([[float(n)], [1.0]])
    if args["out_relu"]:  # no judgement where the dtype cannot decide the epilogue ReLU (_kink_band)
        band = _kink_band(cpu64, conv, dtype, tf32)
        assert band.double().mean() < 0.15, f"test set-up: {band.double().mean():.1%} of the elements undecidable"
        gy64 = torch.where(band, torch.zeros((), dtype=gy64.dtype), gy64)
    needs = [True] * 8
    back = lambda mod, a, gy, gs, yy, st: mod.conv_fused_backward(  # noqa: E731
        gy, gs, a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["out_scale"],
        a["out_shift"], a["residual"], a["out_relu"], conv["stride"], conv["padding"], conv["dilation"],
        conv["groups"], yy, needs, st)
    pdt = ref.param_dtype(dtype)
    gsd = gs64.to(dev, pdt)
    # The backward is a function of the ReLU mask and of the forward's stats (the mean in the gradient of m2): give
    # all three the same y, rounded to the tested dtype, and the same stats (the float64 forward's), so that a
    # forward rounding is not mistaken for a backward error. The mask comes from y (or, where the kernel recomputes
    # acc, from its own z, which agrees with y's where it is decidable: grad_y is zero in the kink band above).
    y_common = y64.to(dtype)
    g64 = back(ref, cpu64, gy64, gs64, y_common.double(), st64)
    g_same = back(ref, gpu, gy64.to(dev, dtype), gsd, y_common.to(dev), st64.to(dev, pdt))
    g_ours = back(cuda_backend, gpu, gy64.to(dev, dtype), gsd, y_common.to(dev, memory_format=torch.channels_last),
                  st64.to(dev, pdt))
    for name, a, b, c in zip(ref.CONV_GRAD_NAMES, g_ours, g_same, g64):
        assert (a is None) == (c is None), name
        if a is not None:
            assert a.shape == c.shape, name
            _budget(a, b, c, atol * 10, f"grad {name}")


@pytest.mark.parametrize("dtype, atol", DTYPES, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("residual", [False, True])
def test_bn_ops(dtype, atol, residual):
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(2)
    N, K, H, W = 3, 40, 5, 7
    y = torch.randn(N, K, H, W, generator=g, dtype=torch.float64)
    mean = y.mean((0, 2, 3))
    stats = torch.stack([mean, (y - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))])  # [mean, m2]
    weight, bias = torch.rand(K, dtype=torch.float64) + 0.5, torch.randn(K, dtype=torch.float64)
    count = N * H * W
    pdt = ref.param_dtype(dtype)
    sc64, sh64 = ref.bn_finalize(stats, count, weight, bias, 1e-5)
    sc, sh = cuda_backend.bn_finalize(stats.to(dev, pdt), count, weight.to(dev, pdt), bias.to(dev, pdt), 1e-5)
    sc_s, sh_s = ref.bn_finalize(stats.to(dev, pdt), count, weight.to(dev, pdt), bias.to(dev, pdt), 1e-5)
    _budget(sc, sc_s, sc64, 1e-6, "scale")
    _budget(sh, sh_s, sh64, 1e-6, "shift")

    rm, rv = torch.zeros(K, device=dev, dtype=pdt), torch.ones(K, device=dev, dtype=pdt)
    rm_r, rv_r = rm.clone(), rv.clone()
    cuda_backend.bn_running_update(stats.to(dev, pdt), count, rm, rv, 0.1)
    ref.bn_running_update(stats.to(dev, pdt), count, rm_r, rv_r, 0.1)
    torch.testing.assert_close(rm, rm_r)
    torch.testing.assert_close(rv, rv_r)

    r = torch.randn(N, K, H, W, generator=g, dtype=torch.float64) if residual else None
    rs = torch.rand(K, dtype=torch.float64) + 0.5 if residual else None
    rsh = torch.randn(K, dtype=torch.float64) if residual else None
    cpu = (y, sc64, sh64, r, rs, rsh)
    gpu = [_to(t, dev, dtype) for t in cpu]
    out64 = ref.bn_apply(*cpu, True)
    out_s = ref.bn_apply(*gpu, True)
    out = cuda_backend.bn_apply(*gpu, True)
    _budget(out, out_s, out64, atol, "bn_apply")

    go = torch.randn(N, K, H, W, generator=g, dtype=torch.float64)
    needs = [True] * 6
    g64 = ref.bn_apply_backward(go, *cpu[:3], *cpu[3:], True, out64, needs)
    g_s = ref.bn_apply_backward(go.to(dev, dtype), *gpu, True, out_s, needs)
    g_o = cuda_backend.bn_apply_backward(go.to(dev, dtype), *gpu, True, out, needs)
    for name, a, b, c in zip(ref.APPLY_GRAD_NAMES, g_o, g_s, g64):
        assert (a is None) == (c is None), name
        if a is not None:
            _budget(a, b, c, atol * 10, f"grad {name}")


def test_deterministic():
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    x = torch.randn(8, 64, 16, 16, device=dev, dtype=torch.float16)
    w = torch.randn(128, 16, 3, 3, device=dev, dtype=torch.float16) * 0.1
    args = (None, None, None, False, None, None, None, True, (1, 1), (1, 1), (1, 1), 4)
    y1, s1 = cuda_backend.conv_fused(x, w, *args, True)
    y2, s2 = cuda_backend.conv_fused(x, w, *args, True)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)
    gy = torch.randn_like(y1)
    gs = torch.randn_like(s1)
    b1 = cuda_backend.conv_fused_backward(gy, gs, x, w, *args[:-4], (1, 1), (1, 1), (1, 1), 4, y1, [True] * 8, s1)
    b2 = cuda_backend.conv_fused_backward(gy, gs, x, w, *args[:-4], (1, 1), (1, 1), (1, 1), 4, y1, [True] * 8, s1)
    for a, b in zip(b1, b2):
        assert (a is None and b is None) or torch.equal(a, b)


# ---------------------------------------------------------------------------------------------------------------
# The statistics contract: [mean, m2] stable at a large mean/std; NaN propagates; ReLU backward passes NaN.

def _nchw(v: torch.Tensor) -> torch.Tensor:
    return v.view(1, -1, 1, 1)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("ratio", [1e4, 1e5])
def test_stats_stable_at_large_mean(dtype, ratio):
    """Every channel's mean is >= `ratio` times its standard deviation. One-pass [sum, sum of squares] loses the
    variance there in fp32 (eps * mean^2 >> var); the per-tile two-pass statistics merged with Chan's formula must
    stay within C * eps * mean/std (relative) of the float64 reference, and so must the BatchNorm output."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W, K, groups = 4, 16, 11, 11, 24, 2  # N*P*Q = 484 rows: several row tiles, the last one partial
    conv = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=groups)
    pdt = ref.param_dtype(dtype)
    g = torch.Generator().manual_seed(3)
    # Inputs rounded to the tested dtype first: the float64 reference sees exactly what the kernel sees.
    x = torch.randn(N, C, H, W, generator=g, dtype=torch.float64).to(dtype).double()
    w = torch.randn(K, C // groups, 3, 3, generator=g, dtype=torch.float64) / (9 * C // groups) ** 0.5
    w = w.to(dtype).double()
    plain = F.conv2d(x, w, None, **conv)
    mu, sd = plain.mean((0, 2, 3)), plain.std((0, 2, 3), unbiased=False)
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(K // 2)
    bias = sign * ratio * (1.5 + torch.rand(K, generator=g, dtype=torch.float64)) * sd - mu
    bias = bias.to(pdt).double()
    n = N * H * W
    tail = (None, None, False, None, None, None, False, conv["stride"], conv["padding"], conv["dilation"], groups,
            True)
    y64, st64 = ref.conv_fused(x, w, bias, *tail)
    cond = st64[0].abs() / (st64[1] / n).sqrt()  # mean/std per channel
    assert (cond >= ratio).all(), f"test set-up: min mean/std {cond.min().item():.3g} < {ratio:g}"

    eps = torch.finfo(dtype).eps
    with ieee_fp32():
        y, st = cuda_backend.conv_fused(x.to(dev, dtype), w.to(dev, dtype), bias.to(dev, pdt), *tail)
    st_cpu = st.double().cpu()
    assert st_cpu.isfinite().all()
    err_mean = (st_cpu[0] - st64[0]).abs()
    bad = err_mean > 64 * eps * st64[0].abs()
    assert not bad.any(), f"mean: {int(bad.sum())} channels, max rel err {(err_mean / st64[0].abs()).max():.3e}"
    rel_m2 = (st_cpu[1] - st64[1]).abs() / st64[1]
    bound = 16 * eps * cond
    assert (rel_m2 <= bound).all(), (f"m2: {int((rel_m2 > bound).sum())} channels out of the bound 16*eps*mean/std; "
                                     f"max rel err {rel_m2.max():.3e}, max ratio to bound {(rel_m2 / bound).max():.3g}")

    weight = torch.rand(K, generator=g, dtype=torch.float64) + 0.5
    beta = torch.randn(K, generator=g, dtype=torch.float64)
    sc64, sh64 = ref.bn_finalize(st64, n, weight, beta, 1e-5)
    out64 = ref.bn_apply(y64, sc64, sh64, None, None, None, False)
    sc, sh = cuda_backend.bn_finalize(st, n, weight.to(dev, pdt), beta.to(dev, pdt), 1e-5)
    out = cuda_backend.bn_apply(y, sc, sh, None, None, None, False)
    err = (out.double().cpu() - out64).abs()
    # y rounded at |mean|, the scale's relative error (half m2's) times |x_hat|, the shift mean*scale ~ cond*weight.
    x_hat = (out64 - _nchw(beta)) / _nchw(weight)
    bound = 32 * eps * _nchw(cond * weight) * (1 + x_hat.abs())
    bad = err > bound
    assert not bad.any(), (f"bn output: {int(bad.sum())} of {bad.numel()} out of the bound; max err "
                           f"{err.max():.3e}, max ratio to bound {(err / bound).max():.3g}")


def test_nan_statistics_propagate():
    """A NaN activation makes its channel's [mean, m2] NaN; bn_running_update and bn_finalize pass it on with no
    clamp, as torch's BatchNorm2d does; the other channels are untouched."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W = 2, 8, 5, 5
    g = torch.Generator().manual_seed(4)
    x = torch.randn(N, C, H, W, generator=g)
    x[1, 3, 2, 2] = float("nan")
    w = torch.rand(C, 1, 1, 1, generator=g) + 0.5  # depthwise 1x1: the NaN stays in channel 3
    nan_k = torch.arange(C) == 3
    with ieee_fp32():
        y, st = cuda_backend.conv_fused(x.to(dev), w.to(dev), None, None, None, False, None, None, None, False,
                                        (1, 1), (0, 0), (1, 1), C, True)
    assert torch.equal(st.isnan().cpu(), nan_k.expand(2, C))
    n = N * H * W

    bn = torch.nn.BatchNorm2d(C).to(dev).train()  # torch's own BatchNorm on the same y is the oracle
    with torch.no_grad():
        out_t = bn(y)
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    cuda_backend.bn_running_update(st, n, rm, rv, bn.momentum)
    assert torch.equal(rm.isnan().cpu(), nan_k) and torch.equal(rv.isnan().cpu(), nan_k)
    torch.testing.assert_close(rm, bn.running_mean, rtol=1e-5, atol=1e-6, equal_nan=True)
    torch.testing.assert_close(rv, bn.running_var, rtol=1e-5, atol=1e-6, equal_nan=True)
    sc, sh = cuda_backend.bn_finalize(st, n, bn.weight.detach(), bn.bias.detach(), bn.eps)
    assert torch.equal(sc.isnan().cpu(), nan_k) and torch.equal(sh.isnan().cpu(), nan_k)
    out = cuda_backend.bn_apply(y, sc, sh, None, None, None, False)
    torch.testing.assert_close(out, out_t, rtol=1e-5, atol=1e-5, equal_nan=True)

    # Only m2 NaN (the mean finite): running_var and the scale NaN, running_mean finite; as the reference.
    stats = torch.stack([torch.randn(C, generator=g), torch.rand(C, generator=g) * n])
    stats[1, 5] = float("nan")
    rm, rv = torch.zeros(C, device=dev), torch.ones(C, device=dev)
    rm_r, rv_r = torch.zeros(C), torch.ones(C)
    cuda_backend.bn_running_update(stats.to(dev), n, rm, rv, 0.1)
    ref.bn_running_update(stats, n, rm_r, rv_r, 0.1)
    assert rv[5].isnan() and rm.isfinite().all()
    torch.testing.assert_close(rm.cpu(), rm_r, equal_nan=True)
    torch.testing.assert_close(rv.cpu(), rv_r, equal_nan=True)
    sc, sh = cuda_backend.bn_finalize(stats.to(dev), n, None, None, 1e-5)
    sc_r, sh_r = ref.bn_finalize(stats, n, None, None, 1e-5)
    torch.testing.assert_close(sc.cpu(), sc_r, equal_nan=True)
    torch.testing.assert_close(sh.cpu(), sh_r, equal_nan=True)


def test_bn_apply_relu_backward_passes_nan():
    """relu's backward is torch's threshold_backward(grad, out, 0): zero where out <= 0, the gradient elsewhere,
    NaN outputs included. Oracle: torch autograd in float64 on CPU."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, K, H, W = 2, 8, 4, 4
    g = torch.Generator().manual_seed(5)
    y = torch.randn(N, K, H, W, generator=g)
    y[0, 1, 1, 1] = y[1, 5, 3, 0] = float("nan")
    sc, sh = torch.rand(K, generator=g) + 0.5, torch.randn(K, generator=g) * 0.1
    go = torch.randn(N, K, H, W, generator=g)
    yd = y.to(dev).contiguous(memory_format=torch.channels_last)
    out = cuda_backend.bn_apply(yd, sc.to(dev), sh.to(dev), None, None, None, True)
    nan = y.isnan()
    assert torch.equal(out.isnan().cpu(), nan)
    grads = cuda_backend.bn_apply_backward(go.to(dev), yd, sc.to(dev), sh.to(dev), None, None, None, True, out,
                                           [True, True, True, False, False, False])

    yt, sct, sht = (t.double().requires_grad_() for t in (y, sc, sh))
    torch.relu(yt * _nchw(sct) + _nchw(sht)).backward(go.double())
    gy = grads[0].double().cpu()
    assert (gy[nan] != 0).all(), "the gradient must pass where the output is NaN"
    for name, ours, want in zip(("y", "scale", "shift"), grads, (yt.grad, sct.grad, sht.grad)):
        torch.testing.assert_close(ours.double().cpu(), want, rtol=1e-5, atol=1e-5, equal_nan=True, msg=name)


@pytest.mark.parametrize("mask_from", ["y", "acc"])
def test_conv_relu_backward_passes_nan(mask_from):
    """A NaN input pixel: the prologue ReLU's input and the epilogue ReLU's input (z) are NaN there; both ReLU
    backwards pass the gradient (torch's threshold_backward). `y`: the epilogue mask comes from the saved output;
    `acc`: d out_scale is wanted, so the kernel recomputes acc and masks on z. Oracle: torch autograd in float64
    (the kernels in float64 too, so that no sign flips by rounding)."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W, K, groups = 2, 8, 6, 6, 8, 2
    g = torch.Generator().manual_seed(6)
    r64 = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    leaves = dict(x=r64(N, C, H, W), weight=r64(K, C // groups, 3, 3) / 12 ** 0.5, bias=r64(K) * 0.1,
                  in_scale=r64(C).abs() + 0.5, in_shift=r64(C) * 0.1, out_scale=r64(K).abs() + 0.5,
                  out_shift=r64(K) * 0.1, residual=r64(N, K, H, W))
    leaves["x"][1, 2, 3, 3] = float("nan")
    t = {k: v.clone().requires_grad_() for k, v in leaves.items()}
    pre = t["x"] * _nchw(t["in_scale"]) + _nchw(t["in_shift"])
    acc = F.conv2d(torch.relu(pre), t["weight"], t["bias"], 1, 1, 1, groups)
    y_t = torch.relu(acc * _nchw(t["out_scale"]) + _nchw(t["out_shift"]) + t["residual"])
    gy = r64(*y_t.shape)
    y_t.backward(gy)

    a = {k: v.to(dev) for k, v in leaves.items()}
    conv = ((1, 1), (1, 1), (1, 1), groups)
    y, _ = cuda_backend.conv_fused(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], True,
                                   a["out_scale"], a["out_shift"], a["residual"], True, *conv, False)
    assert torch.equal(y.isnan().cpu(), y_t.isnan())
    needs = [True] * 8
    needs[5] = mask_from == "acc"  # out_scale
    grads = cuda_backend.conv_fused_backward(gy.to(dev), None, a["x"], a["weight"], a["bias"], a["in_scale"],
                                             a["in_shift"], True, a["out_scale"], a["out_shift"], a["residual"],
                                             True, *conv, y, needs, None)
    got = dict(zip(ref.CONV_GRAD_NAMES, grads))
    nan_y = y_t.isnan()
    assert nan_y.any()
    assert torch.equal(got["residual"].cpu()[nan_y], gy[nan_y]), "epilogue ReLU must pass the gradient at NaN z"
    gx = got["x"].cpu()[1, 2, 3, 3]
    assert gx.isfinite() and gx != 0, f"prologue ReLU must pass the gradient at NaN pre, got {gx.item()}"
    for name, need in zip(ref.CONV_GRAD_NAMES, needs):
        if not need:
            assert got[name] is None, name
            continue
        torch.testing.assert_close(got[name].cpu(), t[name].grad, rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)


@pytest.mark.parametrize("with_grad_stats", [False, True], ids=["no_grad_stats", "grad_stats"])
def test_conv_backward_nan_acc_without_relu(with_grad_stats):
    """A NaN input pixel makes acc NaN around it. With d out_scale wanted the kernel recomputes acc; without
    grad_stats the statistics term of grad acc is absent (not 0 * (acc - mean) = NaN), so grad x, grad bias and
    grad in_shift stay finite as torch's; with grad_stats the NaN channel mean makes that channel's grad acc NaN,
    as in the reference. No ReLU anywhere (the NaN reaches grad acc only through acc). Oracle: the float64
    reference on CPU (NaN positions exactly, values to 1e-9), the kernels in float64."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W, K, groups = 2, 8, 6, 6, 8, 2
    g = torch.Generator().manual_seed(7)
    r64 = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    a = dict(x=r64(N, C, H, W), weight=r64(K, C // groups, 3, 3) / 12 ** 0.5, bias=r64(K) * 0.1,
             in_scale=r64(C).abs() + 0.5, in_shift=r64(C) * 0.1, out_scale=r64(K).abs() + 0.5,
             out_shift=r64(K) * 0.1, residual=r64(N, K, H, W))
    a["x"][1, 2, 3, 3] = float("nan")
    conv = ((1, 1), (1, 1), (1, 1), groups)
    d = {k: v.to(dev) for k, v in a.items()}
    fwd = lambda m, t: m.conv_fused(t["x"], t["weight"], t["bias"], t["in_scale"], t["in_shift"], False,  # noqa
                                    t["out_scale"], t["out_shift"], t["residual"], False, *conv, True)
    y, st = fwd(cuda_backend, d)
    y64, st64 = fwd(ref, a)
    assert torch.equal(st.isnan().cpu(), st64.isnan()) and st64.isnan().any()
    gy = r64(*y64.shape)
    gs = r64(2, K) if with_grad_stats else None
    needs = [True] * 8
    bwd = lambda m, t, gy_, gs_, y_, st_: m.conv_fused_backward(  # noqa: E731
        gy_, gs_, t["x"], t["weight"], t["bias"], t["in_scale"], t["in_shift"], False, t["out_scale"],
        t["out_shift"], t["residual"], False, *conv, y_, needs, st_)
    got = dict(zip(ref.CONV_GRAD_NAMES, bwd(cuda_backend, d, gy.to(dev), None if gs is None else gs.to(dev), y,
                                            st if with_grad_stats else None)))
    want = dict(zip(ref.CONV_GRAD_NAMES, bwd(ref, a, gy, gs, y64, st64 if with_grad_stats else None)))
    if not with_grad_stats:
        for name in ("x", "bias", "in_shift", "out_shift", "residual"):
            assert got[name].isfinite().all(), f"grad {name}: NaN where torch's is finite (0 * NaN acc)"
    for name in ref.CONV_GRAD_NAMES:
        torch.testing.assert_close(got[name].cpu(), want[name], rtol=1e-9, atol=1e-9, equal_nan=True, msg=name)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["float16", "bfloat16",
                                                                                         "float32"])
def test_relu_mask_same_from_acc_and_from_y(dtype):
    """With the kernel's own forward output y, the two ways the backward finds the epilogue ReLU mask agree: from y
    (nothing recomputed) and from z of the recomputed acc (d out_scale wanted). So a mask flip against the float64
    oracle (_kink_band) is a rounding the forward made too, never a backward of another function than the forward
    computed. grad residual = the masked grad_y, compared exactly."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    shape = (2, 128, 5, 5, 256, 3, 3, 1, 1, 1, 4)
    x, w, args, conv = _make(shape, dtype, prologue=True, epilogue=True, residual=True, bias=True)
    d = {k: _to(v, dev, dtype) for k, v in dict(x=x, weight=w, **args).items()}
    tail = (conv["stride"], conv["padding"], conv["dilation"], conv["groups"])
    with ieee_fp32():
        y, _ = cuda_backend.conv_fused(d["x"], d["weight"], d["bias"], d["in_scale"], d["in_shift"], True,
                                       d["out_scale"], d["out_shift"], d["residual"], True, *tail, False)
        gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(8)).to(dev, dtype)
        res = []
        for from_acc in (False, True):
            needs = [False, False, False, False, False, from_acc, False, True]  # out_scale: recompute acc
            grads = cuda_backend.conv_fused_backward(gy, None, d["x"], d["weight"], d["bias"], d["in_scale"],
                                                     d["in_shift"], True, d["out_scale"], d["out_shift"],
                                                     d["residual"], True, *tail, y, needs, None)
            res.append(grads[7])
    zero = y == 0
    assert zero.any() and not zero.all()
    assert torch.equal(res[0], res[1]), (f"ReLU mask from acc differs from the mask from y at "
                                         f"{int((res[0] != res[1]).sum())} elements")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64],
                         ids=["float16", "bfloat16", "float32", "float64"])
def test_stats_describe_the_stored_output(dtype):
    """Issue 10 in fp16/bf16: the statistics are those of acc rounded to the stored dtype, the values the BN apply
    reads from y. Without an epilogue y = T(acc), so they are [mean, m2] of y itself (to fp32 summation): a constant
    channel (zero weights, a bias that T cannot represent) has mean == y exactly and m2 == 0, and BN of y gives
    exactly the BN bias there, not (T(b) - b) * weight / sqrt(eps). Channels with a large mean against a small
    spread make the rounding of acc visible in mean and m2 too. fp32/fp64: unchanged (acc_s = acc = y)."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W, K, groups = 3, 16, 9, 9, 32, 2  # n = 243 rows: several row tiles, the last one partial
    g = torch.Generator().manual_seed(9)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C // groups, 3, 3, generator=g) * 0.1 / (9 * C // groups) ** 0.5
    const = torch.arange(K) % 4 == 0
    w[const] = 0.0
    bias = 3.0 + 0.0123 * torch.arange(K, dtype=torch.float32) + 1e-4  # not representable in fp16/bf16
    pdt = ref.param_dtype(dtype)
    assert ((bias.to(dtype).float() - bias)[const] != 0).all() or dtype in (torch.float32, torch.float64)
    tail = (None, None, False, None, None, None, False, (1, 1), (1, 1), (1, 1), groups, True)
    with ieee_fp32():
        y, st = cuda_backend.conv_fused(x.to(dev, dtype), w.to(dev, dtype), bias.to(dev, pdt), *tail)
    yd = y.double().cpu()
    st = st.double().cpu()
    n = N * H * W
    rounded = dtype in (torch.float16, torch.bfloat16)
    yc = yd[:, const]
    assert (yc == yc[:1, :, :1, :1]).all(), "test set-up: the zero-weight channels must be constant"
    if rounded:
        # Constant channels: exact (a value of <= 11 significant bits summed <= 128 times per row tile is exact in
        # fp32, and so are the tile mean and Chan's merge of equal means).
        assert torch.equal(st[0, const], yc[0, :, 0, 0]), (st[0, const] - yc[0, :, 0, 0])
        assert (st[1, const] == 0).all(), st[1, const]
    # Every channel: the statistics of the stored y, to fp32 summation (the missing rounding is ~1e-3 of m2 here).
    mean64 = yd.mean((0, 2, 3))
    m2_64 = (yd - _nchw(mean64)).square().sum((0, 2, 3))
    # fp16/bf16 values sum exactly within a row tile (few significant bits); fp32 ones round at every addition.
    tol = {torch.float64: 1e-13, torch.float32: 2.0 ** -16}.get(dtype, 2.0 ** -20)
    assert ((st[0] - mean64).abs() <= tol * mean64.abs()).all(), (st[0] - mean64).abs().max()
    m2_tol = 16 * tol * m2_64 + n * (tol * mean64.abs()) ** 2  # the second term: a constant fp32/fp64 channel
    assert ((st[1] - m2_64).abs() <= m2_tol).all(), ((st[1] - m2_64).abs() - m2_tol).max()
    if not rounded:
        return  # fp32/fp64: acc_s = acc = y, nothing else changed by issue 10
    # BN of y with these statistics: exactly the bias at the constant channels.
    beta = torch.randn(K, generator=g).to(dev, pdt)
    weight = (torch.rand(K, generator=g) + 0.5).to(dev, pdt)
    sc, sh = cuda_backend.bn_finalize(st.to(dev, pdt), n, weight, beta, 1e-5)
    out = cuda_backend.bn_apply(y, sc, sh, None, None, None, False).double().cpu()
    want = beta.to(dtype).double().cpu()
    err = (out[:, const] - _nchw(want[const])).abs()
    # One rounding of out to the dtype, plus the fp32 rounding of y * scale (~1e3 here) that shift cancels.
    bound = 2 * torch.finfo(dtype).eps * _nchw(want[const].abs()) + 8 * 2.0 ** -24 * (yc * _nchw(sc.cpu()[const])).abs()
    assert (err <= bound).all(), f"BN of a constant channel: max err {err.max():.3e} (stock BatchNorm: 0)"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["float16", "bfloat16",
                                                                                         "float32"])
def test_grad_of_m2_uses_the_stored_acc(dtype):
    """The backward's statistics term is 2 * grad_stats[1] * (acc_s - mean) with the acc_s the forward's statistics
    were taken of (acc rounded to the stored dtype). With grad_y = 0 and grad_stats = [0, 1], grad bias =
    2 * sum (acc_s - mean) = 0 up to fp32 summation of the mean: exactly 0 at a constant channel (acc - mean would
    give 2 n (b - T(b)) there), tiny elsewhere (acc - mean would leave 2 sum (acc - T(acc)))."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    N, C, H, W, K, groups = 3, 16, 9, 9, 32, 2
    g = torch.Generator().manual_seed(10)
    x = torch.randn(N, C, H, W, generator=g)
    w = torch.randn(K, C // groups, 3, 3, generator=g) * 0.1 / (9 * C // groups) ** 0.5
    const = torch.arange(K) % 4 == 0
    w[const] = 0.0
    bias = 3.0 + 0.0123 * torch.arange(K, dtype=torch.float32) + 1e-4
    pdt = ref.param_dtype(dtype)
    conv = ((1, 1), (1, 1), (1, 1), groups)
    xd, wd, bd = x.to(dev, dtype), w.to(dev, dtype), bias.to(dev, pdt)
    with ieee_fp32():
        y, st = cuda_backend.conv_fused(xd, wd, bd, None, None, False, None, None, None, False, *conv, True)
        gs = torch.stack([torch.zeros(K), torch.ones(K)]).to(dev, pdt)
        needs = [False, False, True, False, False, False, False, False]
        grads = cuda_backend.conv_fused_backward(torch.zeros_like(y), gs, xd, wd, bd, None, None, False, None,
                                                 None, None, False, *conv, y, needs, st)
    gb = grads[2].double().cpu()
    n = N * H * W
    if dtype != torch.float32:  # fp32: the mean of a constant fp32 channel is itself rounded (acc_s = acc)
        assert (gb[const] == 0).all(), f"grad bias at constant channels: {gb[const]}"
    # 2 n |mean error|: a few ulps where the tile sums are exact (fp16/bf16 values), up to a tile's (128 rows)
    # worth of fp32 roundings in fp32.
    ulps = 128 if dtype == torch.float32 else 4
    tol = 2 * n * ulps * 2.0 ** -24 * y.double().abs().max().item()
    assert (gb.abs() <= tol).all(), f"grad bias = 2 sum(acc_s - mean) must vanish: max {gb.abs().max():.3e} > {tol:.3e}"


# ---------------------------------------------------------------------------------------------------------------
# Centred scale-gradient sums (csrc/common.cuh, "Centred scale-gradient sums"; reference.sum_centred): the BN
# weight gradient is invstd (sum g*v - mean sum g); at a constant channel its exact value is 0.

# tests/test_bn_stability.py::test_scale_gradient_at_a_constant_channel[cuda-*] runs the end-to-end case on this
# backend (fp32, 1024 values a channel: 16 row blocks of bn_apply_bwd, 16 row tiles of the dgrad). A CPU emulation
# of the kernels' summation order (csrc/README.md) puts the plain sums at 2.7x (apply) and 8.5x (prologue) one
# rounding on its channel 1, a shift per lane at 6.75x (apply) and one per row block / tile at 1.35x / 5.7x; the
# kernels' (one shift per channel, v0 * sum g added once in the reduction with the same sum g as d_shift) at 0.


def _one_rounding_check(what, s_v, s_g, c, dtype):
    """At a channel of constant value c the centred sum is fl(c * sum g) (g*(v - v0) = 0 at every row, and the
    reduction adds v0 * sum g once, with sum g summed as the kernel's own sum g output), so
    |sum g*v - c sum g| <= one rounding of c * sum g whatever the number of row blocks. The plain sum g*v (and a
    shift per block or lane) rounds at every row (block, lane)."""
    s_v, s_g = float(s_v), float(s_g)
    u = 2.0 ** -53 if dtype == torch.float64 else 2.0 ** -24
    err = abs(s_v - c * s_g)
    assert err <= u * abs(c * s_g), f"{what}: |sum g*v - c sum g| = {err:.3e} > one rounding {u * abs(c * s_g):.3e}"


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.float64],
                         ids=["float16", "float32", "float64"])
def test_centred_sums_at_a_constant_channel(dtype):
    """Every centred sum of the CUDA backend at a constant channel, 256 rows (4 row blocks, 4 dgrad row tiles):
    bn_apply_backward's d_scale (y) and d_residual_scale (residual), conv_fused_backward's d_out_scale (acc: the
    channel's weights 0, its bias c) and d_in_scale (x, the dgrad's prologue). Each must be within one rounding
    of c * (the kernel's sum g). Also NaN and Inf at row 0 (the shift's row): that channel is the plain sum (NaN,
    +-Inf, as the reference gives) and the other channels are untouched."""
    cuda_backend = _cuda()
    dev = torch.device("cuda")
    gen = torch.Generator().manual_seed(11)
    N, K, H, W = 4, 6, 8, 8   # 256 rows: 4 row blocks (bn_apply_bwd, epilogue) and 4 dgrad row tiles
    c_y, c_r = 3.25, -2.75
    y = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64)
    y[:, 1] = c_y
    y[0, 4, 0, 0] = float("nan")   # the shift's row of channel 4: NaN, the sum NaN
    y[0, 5, 0, 0] = float("inf")   # channel 5: Inf, the sum +-Inf (the plain sum), not NaN
    r = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64)
    r[:, 2] = c_r
    r64 = lambda *shape: torch.randn(*shape, generator=gen, dtype=torch.float64)  # noqa: E731
    sc, sh = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5, r64(K)
    rs, rsh = torch.rand(K, generator=gen, dtype=torch.float64) + 0.5, r64(K)
    go = torch.randn(N, K, H, W, generator=gen, dtype=torch.float64)
    cpu = (y, sc, sh, r, rs, rsh)
    gpu = [_to(t, dev, dtype) for t in cpu]
    out = cuda_backend.bn_apply(*gpu, False)
    grads = cuda_backend.bn_apply_backward(go.to(dev, dtype), *gpu, False, out, [False, True, True, False, True, True])
    got = {name: (None if t is None else t.double().cpu()) for name, t in zip(ref.APPLY_GRAD_NAMES, grads)}
    _one_rounding_check("bn_apply d_scale", got["scale"][1], got["shift"][1], c_y, dtype)
    _one_rounding_check("bn_apply d_residual_scale", got["residual_scale"][2], got["residual_shift"][2], c_r, dtype)
    want = ref.bn_apply_backward(go.to(dtype).double(), y.to(dtype).double(), *cpu[1:3], r.to(dtype).double(),
                                 *cpu[4:], False, None, [False, True, True, False, True, True])
    assert got["scale"][4].isnan() and got["scale"][5].isinf()
    assert torch.sign(got["scale"][5]) == torch.sign(want[1][5])
    finite = [0, 1, 2, 3]
    torch.testing.assert_close(got["scale"][finite], want[1][finite], rtol=1e-2 if dtype == torch.float16 else 1e-5,
                               atol=1e-3, msg="d_scale, finite channels")

    # conv_fused_backward: 1x1 conv K -> K; output channel 1 has zero weights and bias c_y (acc = c_y); input
    # channel 1 of x is c_y (the dgrad's d_in_scale at a constant channel).
    x = y.clone()
    x[0, 4, 0, 0] = 0.5
    x[0, 5, 0, 0] = -0.5
    w = torch.randn(K, K, 1, 1, generator=gen, dtype=torch.float64) / K ** 0.5
    w[1] = 0.0
    b = torch.randn(K, generator=gen, dtype=torch.float64)
    b[1] = c_y
    d = dict(x=x, weight=w, bias=b, in_scale=sc, in_shift=sh, out_scale=rs, out_shift=rsh)
    d = {k: _to(v, dev, dtype) for k, v in d.items()}
    tail = ((1, 1), (0, 0), (1, 1), 1)
    with ieee_fp32():
        yy, _ = cuda_backend.conv_fused(d["x"], d["weight"], d["bias"], d["in_scale"], d["in_shift"], False,
                                        d["out_scale"], d["out_shift"], None, False, *tail, False)
        gy = go.to(dev, dtype)
        cg = cuda_backend.conv_fused_backward(gy, None, d["x"], d["weight"], d["bias"], d["in_scale"], d["in_shift"],
                                              False, d["out_scale"], d["out_shift"], None, False, *tail, yy,
                                              [True, False, False, True, True, True, True, False], None)
    cg = {name: (None if t is None else t.double().cpu()) for name, t in zip(ref.CONV_GRAD_NAMES, cg)}
    _one_rounding_check("conv d_out_scale (acc)", cg["out_scale"][1], cg["out_shift"][1], c_y, dtype)
    _one_rounding_check("conv d_in_scale (x)", cg["in_scale"][1], cg["in_shift"][1], c_y, dtype)
