"""torch.func transforms (grad, vmap, jvp over functional_call), forward-mode AD and double backward
(create_graph=True) on pe_kernels modules.

They run the ops as differentiable ATen compositions (pe_kernels/ops/_transforms.py) and must equal the same
transforms over stock modules with the same weights; a forced kernel backend raises instead of falling back.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from torch.autograd import forward_ad
from torch.func import functional_call, grad, jvp, vmap

import pe_kernels
from pe_kernels.nn import PackedBottleneck, PackedConv2d, PackedConvBNReLU2d

ATOL = 1e-4  # fp32, sums of squares over 400 values


def _randomise(module: nn.Module) -> nn.Module:
    """Non-trivial BN affine and running statistics, so folding and normalisation are exercised."""
    torch.manual_seed(1)
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return module


def _fused_and_stock(training: bool = False) -> tuple[nn.Module, nn.Module]:
    """The fused module and its stock twin. In training, as torch.func asks of BatchNorm, without running
    statistics (replace_all_batch_norm_modules_): a transform may not mutate captured buffers."""
    torch.manual_seed(0)
    fused = _randomise(PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1))
    stock = nn.Sequential(copy.deepcopy(fused.conv.conv), copy.deepcopy(fused.bn), nn.ReLU())
    for m in (fused, stock):
        m.train(training)
        if training:
            torch.func.replace_all_batch_norm_modules_(m)
    return fused, stock


def _close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a, b, atol=ATOL, rtol=1e-4)


@pytest.mark.parametrize("training", [False, True])
def test_grad_over_functional_call_equals_stock(training):
    fused, stock = _fused_and_stock(training)
    x = torch.randn(4, 16, 5, 5)
    params = dict(fused.named_parameters())
    stock_params = {"0.weight": params["conv.conv.weight"], "1.weight": params["bn.weight"],
                    "1.bias": params["bn.bias"]}
    g = grad(lambda p: functional_call(fused, p, (x,)).square().sum())(params)
    g_ref = grad(lambda p: functional_call(stock, p, (x,)).square().sum())(stock_params)
    _close(g["conv.conv.weight"], g_ref["0.weight"])
    _close(g["bn.weight"], g_ref["1.weight"])
    _close(g["bn.bias"], g_ref["1.bias"])
    assert pe_kernels.last_dispatch().reason.startswith("torch.func transform")


def test_grad_wrt_input_of_a_fused_block():
    torch.manual_seed(0)
    block = _randomise(PackedBottleneck(16, 4, stride=1, alpha=2, num_estimators=2, gamma=1, conv_bias=False,
                                        dropout_rate=0.0, groups=1)).eval()
    x = torch.randn(2, 32, 4, 4)
    dx = grad(lambda t: block(t).sum())(x)
    x_ref = x.clone().requires_grad_()
    with pe_kernels.use_backend("torch"):
        block(x_ref).sum().backward()
    _close(dx, x_ref.grad)


def test_vmap_over_inputs_equals_a_loop():
    fused, stock = _fused_and_stock()
    fused.eval()
    stock.eval()
    xs = torch.randn(3, 2, 16, 5, 5)
    _close(vmap(fused)(xs), torch.stack([stock(x) for x in xs]))
    conv = PackedConv2d(8, 8, 3, alpha=2, num_estimators=2, padding=1, last=True)
    expected = torch.stack([conv.conv(x).reshape(2, 2, 8, 5, 5).transpose(0, 1).reshape(4, 8, 5, 5) for x in xs])
    _close(vmap(conv)(xs), expected)


@pytest.mark.parametrize("training", [False, True])
def test_jvp_equals_stock(training):
    fused, stock = _fused_and_stock(training)
    x, t = torch.randn(4, 16, 5, 5), torch.randn(4, 16, 5, 5)
    out, tangent = jvp(fused, (x,), (t,))
    out_ref, tangent_ref = jvp(stock, (x,), (t,))
    _close(out, out_ref)
    _close(tangent, tangent_ref)


def test_running_statistics_under_a_transform_fail_as_stock():
    """Tracked running statistics are captured buffers a transform may not mutate: the same error as stock."""
    fused, stock = _fused_and_stock()
    fused.train()
    stock.train()
    x = torch.randn(4, 16, 5, 5)
    for module in (stock, fused):
        with pytest.raises(RuntimeError, match="in-place operation"):
            grad(lambda t: module(t).sum())(x)


def test_forward_ad_dual_tensors_equal_stock():
    fused, stock = _fused_and_stock()
    fused.eval()
    stock.eval()
    x, t = torch.randn(4, 16, 5, 5), torch.randn(4, 16, 5, 5)
    with forward_ad.dual_level():
        tangent = forward_ad.unpack_dual(fused(forward_ad.make_dual(x, t))).tangent
        tangent_ref = forward_ad.unpack_dual(stock(forward_ad.make_dual(x, t))).tangent
    _close(tangent, tangent_ref)


def test_forced_kernel_backend_raises_under_transforms():
    fused, _ = _fused_and_stock()
    x = torch.randn(4, 16, 5, 5)
    with pe_kernels.use_backend("triton"):
        with pytest.raises(pe_kernels.BackendUnavailableError, match="torch.func transforms"):
            grad(lambda t: fused(t).sum())(x)


def test_plain_autograd_keeps_the_custom_ops():
    fused, _ = _fused_and_stock()
    x = torch.randn(4, 16, 5, 5, requires_grad=True)
    with pe_kernels.use_backend("torch"):
        fused(x).sum().backward()
    assert "transform" not in pe_kernels.last_dispatch().reason


@pytest.mark.parametrize("training", [False, True])
def test_double_backward_equals_stock(training):
    fused, stock = _fused_and_stock()
    fused.train(training)
    stock.train(training)
    x = torch.randn(4, 16, 5, 5)
    results = []
    for module in (fused, stock):
        xi = x.clone().requires_grad_()
        (gx,) = torch.autograd.grad(module(xi).square().sum(), xi, create_graph=True)
        penalty = gx.square().sum()
        results.append(torch.autograd.grad(penalty, [xi, *module.parameters()]))
    for ours, ref in zip(*results):
        _close(ours, ref)


@pytest.mark.parametrize("training", [False, True])
def test_gradgradcheck_float64(training):
    torch.manual_seed(0)
    fused = _randomise(PackedConvBNReLU2d(4, 4, 3, alpha=1, num_estimators=2, padding=1, bias=True)).double()
    fused.train(training)
    if training:
        torch.func.replace_all_batch_norm_modules_(fused)  # gradgradcheck calls forward many times
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradgradcheck(lambda t: fused(t), (x,), fast_mode=True)


def test_forced_kernel_backend_raises_on_double_backward(kernel_device):
    fused, _ = _fused_and_stock()
    fused.to(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device, requires_grad=True)
    with pe_kernels.use_backend("triton"):
        out = fused(x).square().sum()
        with pytest.raises(pe_kernels.BackendUnavailableError, match="double backward"):
            torch.autograd.grad(out, x, create_graph=True)
