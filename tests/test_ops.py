"""The op contract on the torch backend vs plain PyTorch (F.conv2d, BatchNorm2d, relu), forward and backward.

These run on CPU on every machine (the contract's semantics, float64 included); opcheck runs each backend on
`kernel_device` (CUDA on a GPU machine, CPU under the Triton interpreter elsewhere).
"""


import pytest
import torch
import torch.nn.functional as F

import pe_kernels
from pe_kernels import ops

from _devices import require_backend

DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5)]


def plain_conv_fused(x, w, b, in_scale, in_shift, in_relu, out_scale, out_shift, residual, out_relu, stride,
                     padding, dilation, groups):
    """The module docstring's math with ordinary autograd-tracked torch ops (an independent oracle)."""
    v = lambda t: t.view(1, -1, 1, 1)
    xp = x
    if in_scale is not None:
        xp = xp * v(in_scale)
    if in_shift is not None:
        xp = xp + v(in_shift)
    if in_relu:
        xp = torch.relu(xp)
    acc = F.conv2d(xp, w, b, stride, padding, dilation, groups)
    z = acc
    if out_scale is not None:
        z = z * v(out_scale)
    if out_shift is not None:
        z = z + v(out_shift)
    if residual is not None:
        z = z + residual
    if out_relu:
        z = torch.relu(z)
    mean = acc.mean((0, 2, 3))
    stats = torch.stack([mean, (acc - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))])   # [mean, m2]
    return z, stats


def _make(dtype, n=2, c=6, h=7, w=5, k=8, groups=2, r=3, stride=1, padding=1, dilation=1, layout="nchw"):
    x = torch.randn(n, c, h, w, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = torch.randn(n, c * 2, h + 1, w, dtype=dtype)[:, ::2, 1:]
    weight = torch.randn(k, c // groups, r, r, dtype=dtype) / r
    p = (h + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    q = (w + 2 * padding - dilation * (r - 1) - 1) // stride + 1
    return x, weight, (n, k, p, q)


CONFIGS = [  # (prologue, epilogue, bias, stats)
    (False, False, False, True),
    (True, False, True, True),
    (False, True, True, False),
    (True, True, False, True),
]
GEOMETRY = [dict(r=3, stride=1, padding=1), dict(r=1, stride=2, padding=0), dict(r=3, stride=2, padding=1,
                                                                               dilation=2, h=9, w=8)]


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("prologue,epilogue,use_bias,stats", CONFIGS)
@pytest.mark.parametrize("geometry", GEOMETRY)
@pytest.mark.parametrize("layout", ["nchw", "channels_last", "sliced"])
def test_conv_fused_forward_backward(dtype, atol, prologue, epilogue, use_bias, stats, geometry, layout):
    x, w, out_shape = _make(dtype, layout=layout, **geometry)
    c, k = x.shape[1], w.shape[0]
    leaf = lambda t: t.detach().clone().requires_grad_(True) if t is not None else None
    b = torch.randn(k, dtype=dtype) if use_bias else None
    in_scale, in_shift = (torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)) if prologue else (None, None)
    out_scale, out_shift = (torch.rand(k, dtype=dtype) + 0.5, torch.randn(k, dtype=dtype)) if epilogue else (None,
                                                                                                          None)
    residual = torch.randn(out_shape, dtype=dtype) if epilogue else None
    args = [x, w, b, in_scale, in_shift, out_scale, out_shift, residual]
    ours_in, plain_in = [leaf(t) for t in args], [leaf(t) for t in args]
    geo = dict(stride=geometry["stride"], padding=geometry["padding"], dilation=geometry.get("dilation", 1))
    y, s = ops.conv_fused(ours_in[0], ours_in[1], ours_in[2], in_scale=ours_in[3], in_shift=ours_in[4],
                          in_relu=prologue, out_scale=ours_in[5], out_shift=ours_in[6], residual=ours_in[7],
                          out_relu=epilogue, groups=2, compute_stats=stats, **geo)
    y_ref, s_ref = plain_conv_fused(plain_in[0], plain_in[1], plain_in[2], plain_in[3], plain_in[4], prologue,
                                    plain_in[5], plain_in[6], plain_in[7], epilogue, geo["stride"], geo["padding"],
                                    geo["dilation"], 2)
    assert y.shape == out_shape and y.dtype == dtype
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, y_ref, atol=atol, rtol=1e-5)
    gy = torch.randn_like(y_ref)
    loss, loss_ref = (y * gy).sum(), (y_ref * gy).sum()
    if stats:
        gs = torch.randn_like(s_ref)
        torch.testing.assert_close(s, s_ref, atol=atol * 100, rtol=1e-5)
        loss, loss_ref = loss + (s * gs).sum(), loss_ref + (s_ref * gs).sum()
    else:
        assert s.numel() == 0
    loss.backward()
    loss_ref.backward()
    for name, a, r in zip(["x", "w", "b", "in_scale", "in_shift", "out_scale", "out_shift", "residual"], ours_in,
                          plain_in):
        if a is not None:
            torch.testing.assert_close(a.grad, r.grad, atol=atol * 100, rtol=1e-4, msg=lambda m: f"d{name}: {m}")


def test_conv_fused_gradcheck():
    dt = torch.float64
    x, w, out_shape = _make(dt, n=1, c=4, h=5, w=4, k=4, groups=2)
    tensors = [x, w, torch.randn(4, dtype=dt), torch.rand(4, dtype=dt) + 0.5, torch.randn(4, dtype=dt),
               torch.rand(4, dtype=dt) + 0.5, torch.randn(4, dtype=dt), torch.randn(out_shape, dtype=dt)]
    tensors = [t.requires_grad_(True) for t in tensors]

    def fn(x, w, b, isc, ish, osc, osh, res):
        return ops.conv_fused(x, w, b, in_scale=isc, in_shift=ish, in_relu=True, out_scale=osc, out_shift=osh,
                              residual=res, out_relu=True, padding=1, groups=2, compute_stats=True)

    assert torch.autograd.gradcheck(fn, tensors)


def test_bn_ops_match_batchnorm2d_train():
    """conv_fused(stats) -> bn_running_update -> bn_finalize -> bn_apply(relu) == relu(BatchNorm2d(y))."""
    y0 = torch.randn(4, 6, 5, 5, dtype=torch.float64)
    bn = torch.nn.BatchNorm2d(6, momentum=0.3).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.normal_()
    wt, bs = bn.weight.detach().clone().requires_grad_(), bn.bias.detach().clone().requires_grad_()
    y_ref, y_ours = y0.clone().requires_grad_(), y0.clone().requires_grad_()
    out_ref = torch.relu(bn(y_ref))
    mean = y_ours.mean((0, 2, 3))
    stats = torch.stack([mean, (y_ours - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))])   # [mean, m2]
    count = 4 * 5 * 5
    rm, rv = torch.zeros(6, dtype=torch.float64), torch.ones(6, dtype=torch.float64)
    ops.bn_running_update(stats.detach(), count, rm, rv, 0.3)
    scale, shift = ops.bn_finalize(stats, count, wt, bs, bn.eps)
    out = ops.bn_apply(y_ours, scale, shift, relu=True)
    torch.testing.assert_close(out, out_ref)
    torch.testing.assert_close(rm, bn.running_mean)
    torch.testing.assert_close(rv, bn.running_var)
    g = torch.randn_like(out)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(y_ours.grad, y_ref.grad)
    torch.testing.assert_close(wt.grad, bn.weight.grad)
    torch.testing.assert_close(bs.grad, bn.bias.grad)


@pytest.mark.parametrize("dtype,atol", DTYPES)
@pytest.mark.parametrize("residual_mode", [None, "plain", "affine"])
@pytest.mark.parametrize("relu", [False, True])
def test_bn_apply(dtype, atol, residual_mode, relu):
    v = lambda t: t.view(1, -1, 1, 1)
    y = torch.randn(2, 5, 3, 4, dtype=dtype)[:, :, :, :]
    tensors = {"y": y, "scale": torch.randn(5, dtype=dtype), "shift": torch.randn(5, dtype=dtype)}
    if residual_mode:
        tensors["residual"] = torch.randn(2, 5, 3, 4, dtype=dtype).to(memory_format=torch.channels_last)
    if residual_mode == "affine":
        tensors["residual_scale"] = torch.randn(5, dtype=dtype)
        tensors["residual_shift"] = torch.randn(5, dtype=dtype)
    ours = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    ref = {k: t.clone().requires_grad_() for k, t in tensors.items()}
    out = ops.bn_apply(relu=relu, **ours)
    z = ref["y"] * v(ref["scale"]) + v(ref["shift"])
    if residual_mode:
        r = ref["residual"]
        if residual_mode == "affine":
            r = r * v(ref["residual_scale"]) + v(ref["residual_shift"])
        z = z + r
    z = torch.relu(z) if relu else z
    torch.testing.assert_close(out, z, atol=atol, rtol=1e-5)
    g = torch.randn_like(z)
    (out * g).sum().backward()
    (z * g).sum().backward()
    for k in tensors:
        torch.testing.assert_close(ours[k].grad, ref[k].grad, atol=atol * 100, rtol=1e-4)


def test_bn_finalize_gradcheck():
    stats = torch.stack([torch.randn(5), torch.rand(5) * 10 + 5]).double().requires_grad_()
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda s, w, b: ops.bn_finalize(s, 3, w, b, 1e-5), (stats, w, b))


def test_autocast_cpu_bf16():
    x = torch.randn(2, 8, 6, 6)
    w = torch.randn(8, 4, 3, 3, requires_grad=True)
    scale, shift = torch.rand(8) + 0.5, torch.randn(8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y, stats = ops.conv_fused(x, w, out_scale=scale, out_shift=shift, out_relu=True, padding=1, groups=2,
                                  compute_stats=True)
        out = ops.bn_apply(y, scale, shift, relu=True)
    assert y.dtype == torch.bfloat16 and out.dtype == torch.bfloat16 and stats.dtype == torch.float32
    ref, _ = plain_conv_fused(x.bfloat16(), w.bfloat16(), None, None, None, False, scale, shift, None, True, 1, 1,
                              1, 2)
    torch.testing.assert_close(y.float(), ref.float(), atol=0.1, rtol=0.05)
    out.float().sum().backward()
    assert w.grad is not None and w.grad.dtype == torch.float32


def _opcheck_samples():
    x, w, out_shape = _make(torch.float32, n=2, c=4, h=5, w=5, k=6, groups=2)
    yield "conv_fused", (x, w, torch.randn(6), torch.rand(4), torch.randn(4), True, torch.rand(6), torch.randn(6),
                         torch.randn(out_shape), True, [1, 1], [1, 1], [1, 1], 2, True)
    yield "conv_fused", (x.to(memory_format=torch.channels_last), w, None, None, None, False, None, None, None,
                         False, [2, 2], [0, 0], [1, 1], 2, False)
    # a channels_last (KRSC) weight, as the modules pass it: its gradient in the weight's strides (the fake's promise)
    yield "conv_fused", (x.to(memory_format=torch.channels_last), w.to(memory_format=torch.channels_last), None,
                         torch.rand(4), torch.randn(4), True, None, None, None, False, [1, 1], [1, 1], [1, 1], 2, True)
    stats = torch.stack([torch.randn(6), torch.rand(6) * 10 + 5])
    yield "bn_finalize", (stats, 10, torch.rand(6), torch.randn(6), 1e-5)
    yield "bn_finalize", (stats, 10, None, None, 1e-3)
    yield "bn_running_update", (stats, 10, torch.zeros(6), torch.ones(6), 0.1)
    y = torch.randn(2, 6, 3, 3)
    yield "bn_apply", (y, torch.randn(6), torch.randn(6), torch.randn(2, 6, 3, 3), torch.randn(6), torch.randn(6),
                       True)
    yield "bn_apply", (y, torch.randn(6), torch.randn(6), None, None, None, False)


    g = torch.randn(2, 6, 5, 5)
    yield "conv_fused_backward", (g, torch.randn(2, 6), x, w, torch.randn(6), torch.rand(4), torch.randn(4), True,
                                  torch.rand(6), torch.randn(6), torch.randn(2, 6, 5, 5), True, [1, 1], [1, 1],
                                  [1, 1], 2, torch.randn(2, 6, 5, 5).relu(), [True] * 8, stats)
    yield "conv_fused_backward", (g, None, x, w, None, None, None, False, None, None, None, False, [1, 1], [1, 1],
                                  [1, 1], 2, torch.randn(2, 6, 5, 5), [True, False] + [True] * 6)
    yield "bn_apply_backward", (y, y, torch.randn(6), torch.randn(6), torch.randn(2, 6, 3, 3), torch.randn(6),
                                torch.randn(6), True, y.relu(), [True] * 6)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("index", range(10))
def test_opcheck(index, backend, kernel_device):
    """Schema, fake (meta) implementation and strides, autograd registration, under each backend, on the kernel
    device (on a GPU the fake must match cuDNN's and the kernels' real CUDA strides)."""
    require_backend(backend)
    name, args = list(_opcheck_samples())[index]
    differentiable = name in ("conv_fused", "bn_finalize", "bn_apply")
    args = tuple(a.to(kernel_device, copy=True).requires_grad_(differentiable and a.is_floating_point())
                 if isinstance(a, torch.Tensor) else a for a in args)
    with pe_kernels.use_backend(backend):
        torch.library.opcheck(getattr(torch.ops.pe_kernels, name).default, args)


@pytest.mark.parametrize("call,exc,match", [
    (lambda: ops.conv_fused(torch.randn(2, 4, 5), torch.randn(4, 4, 1, 1)), ValueError, "4-D"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 3, 1, 1)), ValueError, "channels"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(6, 1, 1, 1), groups=4), ValueError, "divisible"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1).double()), TypeError, "float64"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 2, 2), torch.randn(4, 4, 3, 3)), ValueError, "smaller"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1), stride=0), ValueError, "stride"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1), bias=torch.randn(3)), ValueError,
     r"\(4,\)"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1), residual=torch.randn(1, 4, 4, 4)),
     ValueError, "residual"),
    (lambda: ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1, device="meta")), RuntimeError,
     "meta"),
    (lambda: ops.conv_fused(torch.randint(0, 3, (1, 4, 5, 5)), torch.randn(4, 4, 1, 1)), TypeError, "int64"),
    (lambda: ops.bn_apply(torch.randn(1, 4, 2, 2), torch.randn(3), torch.randn(4)), ValueError, "scale"),
    (lambda: ops.bn_finalize(torch.randn(3, 4), 10, None, None, 1e-5), ValueError, "stats"),
    (lambda: ops.bn_running_update(torch.randn(2, 4), 1, torch.zeros(4), torch.ones(4), 0.1), ValueError,
     "more than 1"),
])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_backend_dispatch_is_recorded():
    x, w, _ = _make(torch.float32)
    with pe_kernels.use_backend("torch"):
        ops.conv_fused(x, w, padding=1, groups=2)
    assert pe_kernels.last_dispatch().backend == "torch"
    ops.conv_fused(x, w, padding=1, groups=2)
    last = pe_kernels.last_dispatch()
    assert last.backend == "torch" and "auto" in last.reason


def test_registered_backends_are_the_three_modules():
    from pe_kernels import _backend

    assert {name: _backend._REGISTRY[name].module for name in pe_kernels.backend_names()} == {
        "torch": "pe_kernels.reference", "triton": "pe_kernels.triton", "cuda": "pe_kernels.cuda"}


@pytest.mark.parametrize("module_name", ["pe_kernels.reference", "pe_kernels.triton", "pe_kernels.cuda"])
def test_backend_modules_implement_the_contract(module_name):
    """Every backend module has each function of ops/contract.Backend with exactly its parameters (names, order,
    defaults), so that the ops can call any backend alike. (Importing pe_kernels.triton/.cuda never needs a GPU;
    a backend that cannot import here is skipped with the reason.)"""
    import importlib
    import inspect

    from pe_kernels.ops import contract

    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        pytest.skip(f"{module_name} does not import here: {exc}")
    for name in contract.BACKEND_FUNCTIONS:
        assert hasattr(module, name), f"{module_name} lacks {name}"
        expected = [(p.name, p.default) for p in list(inspect.signature(getattr(contract.Backend, name)).parameters
                                                      .values())[1:]]
        got = [(p.name, p.default) for p in inspect.signature(getattr(module, name)).parameters.values()]
        assert got[:len(expected)] == expected, f"{module_name}.{name}{inspect.signature(getattr(module, name))}"
        assert all(p.default is not inspect.Parameter.empty for p in
                   list(inspect.signature(getattr(module, name)).parameters.values())[len(expected):]), \
            f"{module_name}.{name}: extra parameters must have defaults"
    for name in contract.OPTIONAL_BACKEND_FUNCTIONS:  # where a backend has one: op_key, then the op's parameters
        if hasattr(module, name):
            base = name[:-len("_keyed")]
            expected = ["op_key"] + list(inspect.signature(getattr(contract.Backend, base)).parameters)[1:]
            params = list(inspect.signature(getattr(module, name)).parameters.values())
            assert [p.name for p in params[:len(expected)]] == expected, f"{module_name}.{name}"
            assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is not inspect.Parameter.empty
                       for p in params[len(expected):]), f"{module_name}.{name}: extras must be keywords with defaults"


def test_conv_args_describe_the_contract_call():
    """ConvArgs names conv_fused's arguments in the contract's order (one description of a conv call); the op's
    checked arguments are one, and a backend takes it unpacked."""
    import inspect

    from pe_kernels.ops import contract
    from pe_kernels.ops.conv_fused import checked_args

    assert contract.ConvArgs._fields == tuple(inspect.signature(contract.Backend.conv_fused).parameters)[1:]
    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 2, 3, 3)
    args = checked_args(x, w, None, None, None, True, None, None, None, False, 2, 1, 1, 2, True)
    assert isinstance(args, contract.ConvArgs)
    assert (args.stride, args.padding, args.dilation, args.groups, args.in_relu) == ([2, 2], [1, 1], [1, 1], 2, True)
    y, stats = pe_kernels.reference.conv_fused(*args)
    assert y.shape == (2, 6, 3, 3) and stats.shape == (2, 6)
