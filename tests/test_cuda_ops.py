"""pe_kernels.cuda against the reference (GPU only: marker `gpu`; skipped where pe_kernels._C is not built).

Oracle: |cuda - ref64| <= 2*|torch_same_dtype - ref64| + atol elementwise, ref64 = the float64 reference on CPU,
torch_same_dtype = the reference (cuDNN) on the GPU in the tested dtype with the same TF32 setting.
"""

from __future__ import annotations

import pytest
import torch

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
    gs64 = torch.randn(2, y64.shape[1], generator=g, dtype=torch.float64) * 1e-2
    needs = [True] * 8
    back = lambda mod, a, gy, gs, yy: mod.conv_fused_backward(  # noqa: E731
        gy, gs, a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["out_scale"],
        a["out_shift"], a["residual"], a["out_relu"], conv["stride"], conv["padding"], conv["dilation"],
        conv["groups"], yy, needs)
    gsd = gs64.to(dev, ref.param_dtype(dtype))
    # The backward is a function of the saved output y (its ReLU mask): give all three the same y, rounded to the
    # tested dtype, so that a mask flipped by forward rounding is not mistaken for a backward error.
    y_common = y64.to(dtype)
    g64 = back(ref, cpu64, gy64, gs64, y_common.double())
    g_same = back(ref, gpu, gy64.to(dev, dtype), gsd, y_common.to(dev))
    g_ours = back(cuda_backend, gpu, gy64.to(dev, dtype), gsd, y_common.to(dev, memory_format=torch.channels_last))
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
    stats = torch.stack([y.sum((0, 2, 3)), (y * y).sum((0, 2, 3))])
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
    b1 = cuda_backend.conv_fused_backward(gy, None, x, w, *args[:-4], (1, 1), (1, 1), (1, 1), 4, y1, [True] * 8)
    b2 = cuda_backend.conv_fused_backward(gy, None, x, w, *args[:-4], (1, 1), (1, 1), (1, 1), 4, y1, [True] * 8)
    for a, b in zip(b1, b2):
        assert (a is None and b is None) or torch.equal(a, b)
