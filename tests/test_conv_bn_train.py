"""ops.conv_bn_train (training conv -> BatchNorm2d batch, one autograd node) vs plain PyTorch: F.conv2d then
F.batch_norm in training mode (running statistics, num_batches_tracked, momentum None), forward and gradients.

torch backend on CPU (float64 and float32), the triton backend on `kernel_device`; the traced / transform / double
backward paths (the composition of the registered ops); the errors.
"""

import pytest
import torch
import torch.nn.functional as F

import pe_kernels
from pe_kernels import ops
from pe_kernels.ops.contract import param_dtype

from _devices import ieee_fp32, require_backend


def _plain(x, w, b, isc, ish, in_relu, bn_w, bn_b, rm, rv, momentum, eps, stride, padding, groups):
    """act_in(x * isc + ish) -> conv -> BatchNorm2d (training) as ordinary torch ops: the oracle."""
    xp = x
    if isc is not None:
        xp = xp * isc.view(1, -1, 1, 1) + ish.view(1, -1, 1, 1)
    if in_relu:
        xp = torch.relu(xp)
    y = F.conv2d(xp, w, b, stride, padding, 1, groups)
    out = F.batch_norm(y, rm, rv, bn_w, bn_b, True, 0.0 if momentum is None else momentum, eps)
    return y, out


def _inputs(dtype, device, prologue, bias, affine, layout, c=6, k=8, groups=2, r=3):
    x = torch.randn(3, c, 7, 6, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(3, 2 * c, 8, 6, dtype=dtype)[:, ::2, 1:]
    w = torch.randn(k, c // groups, r, r, dtype=dtype) / r
    vec = lambda n, lo=None: (torch.rand(n, dtype=dtype) + 0.5) if lo else torch.randn(n, dtype=dtype)  # noqa: E731
    tensors = dict(x=x, w=w, b=vec(k) if bias else None, isc=vec(c, 1) if prologue else None,
                   ish=vec(c) if prologue else None, bn_w=vec(k, 1) if affine else None,
                   bn_b=vec(k) if affine else None)
    return {n: None if t is None else t.to(device).requires_grad_(True) for n, t in tensors.items()}


def _check(backend, device, dtype, atol, prologue, bias, affine, layout, momentum, stride=1, padding=1):
    t = _inputs(dtype, device, prologue, bias, affine, layout)
    ref = {n: None if v is None else v.detach().clone().cpu().double().requires_grad_(True) for n, v in t.items()}
    k = t["w"].shape[0]
    rm = torch.randn(k, device=device, dtype=param_dtype(dtype))
    rv = torch.rand(k, device=device, dtype=param_dtype(dtype)) + 0.5
    rm_ref, rv_ref = rm.detach().cpu().double(), rv.detach().cpu().double()
    nbt = torch.tensor(4, device=device)
    with pe_kernels.use_backend(backend), ieee_fp32():
        y, scale, shift = ops.conv_bn_train(t["x"], t["w"], t["b"], in_scale=t["isc"], in_shift=t["ish"],
                                            in_relu=prologue, stride=stride, padding=padding, groups=2,
                                            bn_weight=t["bn_w"], bn_bias=t["bn_b"], eps=1e-5, running_mean=rm,
                                            running_var=rv, num_batches_tracked=nbt, momentum=momentum)
        out = y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)
        g = torch.randn_like(out)
        (out * g).sum().backward()
    # momentum None: the cumulative factor after the bump is 1/5
    y_ref, out_ref = _plain(ref["x"], ref["w"], ref["b"], ref["isc"], ref["ish"], prologue, ref["bn_w"], ref["bn_b"],
                            rm_ref, rv_ref, 0.2 if momentum is None else momentum, 1e-5, stride, padding, 2)
    (out_ref * g.cpu().double()).sum().backward()
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert scale.dtype == shift.dtype == param_dtype(dtype) and scale.shape == (k,)
    close = lambda a, b, tol, what: torch.testing.assert_close(  # noqa: E731
        a.detach().cpu().double(), b.detach(), atol=tol, rtol=tol, msg=lambda m: f"{what}: {m}")
    close(y, y_ref, atol, "y")
    close(out, out_ref, atol * 10, "BN(conv(x))")
    close(rm, rm_ref, atol, "running_mean")
    close(rv, rv_ref, atol, "running_var")
    assert int(nbt) == 5
    for name in t:
        if t[name] is not None:
            close(t[name].grad, ref[name].grad, atol * 100, f"d{name}")


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("prologue,bias,affine", [(False, False, True), (True, True, True), (True, False, False)])
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_torch_backend_matches_conv_then_batch_norm(momentum, prologue, bias, affine, layout):
    _check("torch", torch.device("cpu"), torch.float64, 1e-9, prologue, bias, affine, layout, momentum)


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("prologue,bias,affine,stride,padding", [(False, False, True, 1, 1), (True, True, True, 2, 0),
                                                                 (True, False, False, 1, 1)])
def test_triton_backend_matches_conv_then_batch_norm(kernel_device, momentum, prologue, bias, affine, stride, padding):
    require_backend("triton")
    _check("triton", kernel_device, torch.float32, 1e-4, prologue, bias, affine, "channels_last", momentum, stride,
           padding)


def test_no_running_statistics_and_no_grad():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 1, 1)
    with pe_kernels.use_backend("torch"), torch.no_grad():
        y, scale, shift = ops.conv_bn_train(x, w)
    ref = F.batch_norm(F.conv2d(x, w), None, None, None, None, True, 0.1, 1e-5)
    torch.testing.assert_close(y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1), ref, atol=1e-5, rtol=1e-5)
    assert not y.requires_grad


def test_double_backward_recomputes_the_composition():
    dt = torch.float64
    x = torch.randn(2, 4, 4, 4, dtype=dt, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, dtype=dt, requires_grad=True)
    bn_w = (torch.rand(4, dtype=dt) + 0.5).requires_grad_(True)

    def fn(x, w, bn_w):
        y, scale, shift = ops.conv_bn_train(x, w, padding=1, groups=2, bn_weight=bn_w)
        return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    with pe_kernels.use_backend("torch"):
        assert torch.autograd.gradgradcheck(fn, (x, w, bn_w))


def test_torch_func_transform_uses_the_composition():
    x, w = torch.randn(2, 4, 4, 4, dtype=torch.float64), torch.randn(4, 4, 1, 1, dtype=torch.float64)

    def loss(w):
        y, scale, shift = ops.conv_bn_train(x, w)
        return (y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)).square().sum()

    def plain(w):
        return F.batch_norm(F.conv2d(x, w), None, None, None, None, True, 0.1, 1e-5).square().sum()

    torch.testing.assert_close(torch.func.grad(loss)(w), torch.func.grad(plain)(w))


def test_compiled_matches_eager():
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    rm, rv, nbt = torch.zeros(6), torch.ones(6), torch.tensor(0)

    def fn(x, w):
        y, scale, shift = ops.conv_bn_train(x, w, padding=1, running_mean=rm, running_var=rv,
                                            num_batches_tracked=nbt, momentum=None)
        return y * scale.view(1, -1, 1, 1) + shift.view(1, -1, 1, 1)

    with pe_kernels.use_backend("torch"):
        eager = fn(x, w)
        rm_eager = rm.clone()
        compiled = torch.compile(fn, backend="aot_eager", fullgraph=True)(x, w)
    torch.testing.assert_close(compiled, eager)
    torch.testing.assert_close(rm, rm_eager)   # momentum None: the second batch's factor is 1/2 of the same stats
    assert int(nbt) == 2


@pytest.mark.parametrize("kwargs,match", [
    (dict(x=torch.randn(1, 4, 1, 1)), "more than 1 value per channel"),
    (dict(eps=0.0), "eps must be > 0"),
    (dict(running_mean=torch.zeros(4)), "given together"),
    (dict(bn_weight=torch.ones(3)), r"bn_weight must have shape \(4,\)"),
    (dict(num_batches_tracked=torch.zeros(2)), "one-element tensor"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(x=torch.randn(2, 4, 3, 3), eps=1e-5)
    args.update(kwargs)
    x = args.pop("x")
    with pytest.raises(ValueError, match=match):
        ops.conv_bn_train(x, torch.randn(4, 4, 1, 1), **args)
