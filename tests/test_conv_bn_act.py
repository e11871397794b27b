"""ops.conv_bn_act (training conv -> BatchNorm2d -> (+ affine residual) -> act as ONE autograd node) vs the two ops it
fuses on the host, ops.conv_bn_train then ops.bn_apply: the same backend calls, so the same output, running
statistics, num_batches_tracked and gradients bit for bit, on the torch backend (CPU) and the triton backend
(`kernel_device`); one pe_kernels node in the graph; the paths without a gradient, under torch.func and double
backward (the composition); the errors. The modules' training layers take it (PackedConvBNReLU2d, a block's tail).
"""

import pytest
import torch
import torch.nn.functional as F

import pe_kernels
from pe_kernels import ops
from pe_kernels.nn import PackedBottleneck, PackedConvBNReLU2d
from pe_kernels.ops.contract import param_dtype

from _devices import ieee_fp32, require_backend


def _inputs(device, dtype, prologue, residual, residual_affine, bias=True, c=6, k=8):
    g = torch.Generator().manual_seed(0)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=dtype)  # noqa: E731
    vdt = param_dtype(dtype)
    t = dict(x=rand(3, c, 5, 6).to(memory_format=torch.channels_last), w=rand(k, c // 2, 3, 3) / 3,
             b=rand(k) if bias else None,
             isc=(rand(c).abs() + 0.5).to(vdt) if prologue else None, ish=rand(c).to(vdt) if prologue else None,
             bn_w=(rand(k).abs() + 0.5).to(vdt), bn_b=rand(k).to(vdt),
             res=rand(3, k, 5, 6).to(memory_format=torch.channels_last) if residual else None,
             rs=(rand(k).abs() + 0.5).to(vdt) if residual_affine else None,
             rb=rand(k).to(vdt) if residual_affine else None)
    return {n: None if v is None else v.to(device).requires_grad_(True) for n, v in t.items()}


def _run(fused, t, relu, device, momentum=0.1):
    """(out, running_mean, running_var, nbt, grads) from conv_bn_act (fused) or conv_bn_train + bn_apply."""
    t = {n: None if v is None else v.detach().clone().requires_grad_(True) for n, v in t.items()}
    k = t["w"].shape[0]
    vdt = param_dtype(t["x"].dtype)
    rm, rv, nbt = torch.zeros(k, dtype=vdt, device=device), torch.ones(k, dtype=vdt, device=device), \
        torch.tensor(3, device=device)
    conv = dict(in_scale=t["isc"], in_shift=t["ish"], in_relu=t["isc"] is not None, padding=1, groups=2,
                bn_weight=t["bn_w"], bn_bias=t["bn_b"], eps=1e-5, running_mean=rm, running_var=rv,
                num_batches_tracked=nbt, momentum=momentum)
    if fused:
        out = ops.conv_bn_act(t["x"], t["w"], t["b"], **conv, residual=t["res"], residual_scale=t["rs"],
                              residual_shift=t["rb"], relu=relu)
    else:
        y, scale, shift = ops.conv_bn_train(t["x"], t["w"], t["b"], **conv)
        out = ops.bn_apply(y, scale, shift, t["res"], t["rs"], t["rb"], relu=relu)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype).to(device)
    out.backward(grad)
    return out, rm, rv, nbt, {n: v.grad for n, v in t.items() if v is not None}


def _assert_same(a, b):
    out_a, rm_a, rv_a, nbt_a, grads_a = a
    out_b, rm_b, rv_b, nbt_b, grads_b = b
    assert torch.equal(out_a, out_b)
    assert torch.equal(rm_a, rm_b) and torch.equal(rv_a, rv_b) and int(nbt_a) == int(nbt_b) == 4
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        assert grads_a[name] is not None, name
        assert torch.equal(grads_a[name], grads_b[name]), name


CASES = [pytest.param(False, False, False, True, id="relu"),
         pytest.param(True, True, False, True, id="prologue-residual-relu"),
         pytest.param(False, True, True, True, id="affine-residual-relu"),
         pytest.param(True, True, True, False, id="prologue-affine-residual-no-act")]


@pytest.mark.parametrize("prologue,residual,residual_affine,relu", CASES)
def test_torch_backend_is_the_two_ops_bit_for_bit(prologue, residual, residual_affine, relu):
    t = _inputs("cpu", torch.float64, prologue, residual, residual_affine)
    with pe_kernels.use_backend("torch"):
        _assert_same(_run(True, t, relu, "cpu"), _run(False, t, relu, "cpu"))


@pytest.mark.parametrize("prologue,residual,residual_affine,relu", CASES)
def test_triton_backend_is_the_two_ops_bit_for_bit(kernel_device, prologue, residual, residual_affine, relu):
    require_backend("triton")
    t = _inputs(kernel_device, torch.float32, prologue, residual, residual_affine)
    with pe_kernels.use_backend("triton"), ieee_fp32():
        _assert_same(_run(True, t, relu, kernel_device), _run(False, t, relu, kernel_device))


def test_matches_plain_pytorch():
    """The oracle: conv2d -> batch_norm (training) -> + residual -> relu as ordinary torch ops (float64)."""
    t = _inputs("cpu", torch.float64, False, True, False)
    with pe_kernels.use_backend("torch"):
        out, rm, rv, nbt, grads = _run(True, t, True, "cpu")
    ref = {n: None if v is None else v.detach().clone().requires_grad_(True) for n, v in t.items()}
    rm_ref, rv_ref = torch.zeros(8, dtype=torch.float64), torch.ones(8, dtype=torch.float64)
    y = F.batch_norm(F.conv2d(ref["x"], ref["w"], ref["b"], padding=1, groups=2), rm_ref, rv_ref, ref["bn_w"],
                     ref["bn_b"], True, 0.1, 1e-5)
    out_ref = torch.relu(y + ref["res"])
    out_ref.backward(torch.randn(out_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    torch.testing.assert_close(out, out_ref, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(rm, rm_ref, atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(rv, rv_ref, atol=1e-12, rtol=1e-12)
    for name, g in grads.items():
        torch.testing.assert_close(g, ref[name].grad, atol=1e-9, rtol=1e-9, msg=lambda m: f"d{name}: {m}")


def test_one_autograd_node():
    t = _inputs("cpu", torch.float64, False, True, True)
    with pe_kernels.use_backend("torch"):
        out = ops.conv_bn_act(t["x"], t["w"], padding=1, groups=2, bn_weight=t["bn_w"], bn_bias=t["bn_b"],
                              residual=t["res"], residual_scale=t["rs"], residual_shift=t["rb"], relu=True)
    node = out.grad_fn
    assert type(node).__name__ == "_ConvBnActFunctionBackward"
    # every input's gradient leaves this node directly (AccumulateGrad of the leaves: no second pe_kernels node)
    assert {type(n).__name__ for n, _ in node.next_functions if n is not None} == {"AccumulateGrad"}


def test_without_gradient_is_the_node_s_forward():
    """Without a gradient conv_bn_act runs conv_bn_train then bn_apply (no autograd node): the node's output and
    running statistics, bit for bit."""
    t = _inputs("cpu", torch.float64, True, True, True)
    with pe_kernels.use_backend("torch"):
        out, rm, rv, nbt, _ = _run(True, t, True, "cpu")
        k = t["w"].shape[0]
        rm2, rv2, nbt2 = torch.zeros(k, dtype=torch.float64), torch.ones(k, dtype=torch.float64), torch.tensor(3)
        with torch.no_grad():
            out2 = ops.conv_bn_act(t["x"], t["w"], t["b"], in_scale=t["isc"], in_shift=t["ish"], in_relu=True,
                                   padding=1, groups=2, bn_weight=t["bn_w"], bn_bias=t["bn_b"], running_mean=rm2,
                                   running_var=rv2, num_batches_tracked=nbt2, residual=t["res"],
                                   residual_scale=t["rs"], residual_shift=t["rb"], relu=True)
    assert out2.grad_fn is None and not out2.requires_grad
    assert torch.equal(out2, out) and torch.equal(rm2, rm) and torch.equal(rv2, rv) and int(nbt2) == int(nbt)


def test_double_backward_recomputes_the_composition():
    t = _inputs("cpu", torch.float64, False, True, True, bias=False, c=4, k=4)

    def fn(x, w, bn_w, res, rs):
        return ops.conv_bn_act(x, w, padding=1, groups=2, bn_weight=bn_w, residual=res, residual_scale=rs,
                               relu=False)

    with pe_kernels.use_backend("torch"):
        assert torch.autograd.gradgradcheck(fn, (t["x"], t["w"], t["bn_w"], t["res"], t["rs"]))


def test_torch_func_transform_uses_the_composition():
    t = {n: None if v is None else v.detach() for n, v in _inputs("cpu", torch.float64, False, True, False).items()}

    def fused(w):
        return ops.conv_bn_act(t["x"], w, padding=1, groups=2, residual=t["res"], relu=True).square().sum()

    def two_ops(w):
        y, scale, shift = ops.conv_bn_train(t["x"], w, padding=1, groups=2)
        return ops.bn_apply(y, scale, shift, t["res"], relu=True).square().sum()

    torch.testing.assert_close(torch.func.grad(fused)(t["w"]), torch.func.grad(two_ops)(t["w"]))


@pytest.mark.parametrize("kwargs,match", [
    (dict(residual=torch.randn(2, 4, 2, 3)), r"residual has shape \(2, 4, 2, 3\), y has \(2, 4, 3, 3\)"),
    (dict(residual_scale=torch.ones(4)), "without a residual"),
    (dict(residual=torch.randn(2, 4, 3, 3), residual_shift=torch.ones(5)), r"residual_shift must have shape \(4,\)"),
    (dict(x=torch.randn(1, 4, 1, 1)), "more than 1 value per channel"),
])
def test_bad_arguments_raise(kwargs, match):
    x = kwargs.pop("x", torch.randn(2, 4, 3, 3, requires_grad=True))
    with pe_kernels.use_backend("torch"), pytest.raises(ValueError, match=match):
        ops.conv_bn_act(x, torch.randn(4, 4, 1, 1, requires_grad=True), **kwargs)


def _pe_nodes(out: torch.Tensor) -> list[str]:
    """Names of the pe_kernels autograd nodes in out's graph."""
    seen, stack, names = set(), [out.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if type(node).__name__.startswith("_Conv") or type(node).__name__.startswith("_Bn"):
            names.append(type(node).__name__)
        stack.extend(n for n, _ in node.next_functions)
    return sorted(names)


def test_modules_take_it_in_training(kernel_device):
    """A PackedConvBNReLU2d layer is one node; a bottleneck block's last conv, its BN, the shortcut's BN tail and
    the ReLU are one node (the shortcut's conv -> BN and the deferred convs keep theirs: conv_bn_train)."""
    require_backend("triton")  # (the torch backend runs the stock modules)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1).to(kernel_device).train()
    block = PackedBottleneck(16, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0,
                             groups=1).to(kernel_device).train()
    with pe_kernels.use_backend("triton"):
        x = torch.randn(2, 16, 6, 6, device=kernel_device, requires_grad=True)
        assert _pe_nodes(layer(x)) == ["_ConvBnActFunctionBackward"]
        out = block(torch.randn(2, 32, 6, 6, device=kernel_device, requires_grad=True))
    assert _pe_nodes(out) == ["_ConvBnActFunctionBackward"] + ["_ConvBnTrainFunctionBackward"] * 3


def _bottleneck(seed=0):
    torch.manual_seed(seed)
    block = PackedBottleneck(16, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0,
                             groups=1)
    for bn in block.modules():
        if isinstance(bn, torch.nn.BatchNorm2d):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 1.5)
    return block


def test_block_with_the_last_bn_in_eval_and_a_training_shortcut_bn(kernel_device):
    """Mixed modes (bn3 eval, the shortcut's BN training): the tail is the last BN's folded affine and the shortcut's
    batch affine in one bn_apply, as the stock modules compute it."""
    from pe_kernels.models.registry import eager_twin

    require_backend("triton")
    block = _bottleneck().to(kernel_device).train()
    block.bn3.eval()
    twin = eager_twin(block)
    x = torch.randn(2, 32, 6, 6, device=kernel_device)
    with ieee_fp32():   # (the twin too: cuDNN's TF32 on a GPU)
        with pe_kernels.use_backend("triton"):
            out = block(x)
        expected = twin(x)
    torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(block.shortcut[1].running_var, twin.shortcut[1].running_var)


def test_block_one_value_error_bumps_the_last_bn_first(kernel_device):
    """BatchNorm2d's one-value error in the block's tail (the earlier BNs in eval, one output position): the last BN's
    num_batches_tracked is bumped and it raises before the shortcut runs, as in the stock modules."""
    from pe_kernels.models.registry import eager_twin

    require_backend("triton")
    block = _bottleneck().to(kernel_device).train()
    block.bn1.eval()
    block.bn2.eval()
    twin = eager_twin(block)
    x = torch.randn(1, 32, 2, 2, device=kernel_device)  # stride 2: one output position
    with pe_kernels.use_backend("triton"), pytest.raises(ValueError, match="more than 1 value per channel"):
        block(x)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        twin(x)
    assert int(block.bn3.num_batches_tracked) == int(twin.bn3.num_batches_tracked) == 1
    assert int(block.shortcut[1].num_batches_tracked) == int(twin.shortcut[1].num_batches_tracked) == 0
    torch.testing.assert_close(block.shortcut[1].running_mean, twin.shortcut[1].running_mean)
