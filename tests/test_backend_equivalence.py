"""Whole modules on the `triton` backend equal the `torch` backend (CPU: Triton interpreter; tiny shapes).

The per-kernel error budgets live in test_triton_*.py; here the composition is checked: a fused residual
block (prologue fusion in training, folded BN epilogues in eval) and a tiny packed ResNet, forward, every
parameter gradient and the running statistics, plus torch.compile(fullgraph=True) through the Triton ops.
"""

import copy

import pytest
import torch

import pe_kernels
from pe_kernels.models import packed_resnet
from pe_kernels.nn import PackedBottleneck, PackedConvBNReLU2d

pytestmark = pytest.mark.skipif(not pe_kernels.backends()["triton"].available,
                                reason=f"triton backend: {pe_kernels.backends()['triton'].reason}")


def _run(module, x, backend, train):
    module = module.train(train)
    x = x.clone().requires_grad_()
    with pe_kernels.use_backend(backend):
        out = module(x)
        out.float().square().mean().backward()
    grads = {n: p.grad.clone() for n, p in module.named_parameters()}
    buffers = {n: b.clone() for n, b in module.named_buffers()}
    return out.detach(), x.grad, grads, buffers


def _within_budget(ours, ref64, same_dtype, atol, what):
    """DESIGN.md: |kernel - ref64| <= 2 |torch_same_dtype - ref64| + atol, elementwise."""
    err = (ours.double() - ref64).abs()
    budget = 2 * (same_dtype.double() - ref64).abs() + atol
    worst = (err - budget).max()
    assert worst <= 0, f"{what}: error exceeds the budget by {worst.item():.3g} (max err {err.max().item():.3g})"


def _assert_same(module, x, train, atol=1e-4):
    """triton (fp32) vs torch (fp32) vs the float64 oracle: outputs, input and parameter gradients, buffers."""
    runs = {}
    for name, backend, dtype in (("triton", "triton", torch.float32), ("torch", "torch", torch.float32),
                                 ("ref64", "torch", torch.float64)):
        torch.manual_seed(0)
        runs[name] = _run(copy.deepcopy(module).to(dtype), x.to(dtype), backend, train)
    (out_t, dx_t, grads_t, bufs_t), (out_s, dx_s, grads_s, bufs_s), (out_r, dx_r, grads_r, bufs_r) = (
        runs["triton"], runs["torch"], runs["ref64"])
    _within_budget(out_t, out_r, out_s, atol, "output")
    _within_budget(dx_t, dx_r, dx_s, atol, "grad x")
    for name in grads_r:
        scale = grads_r[name].abs().max().item() + 1e-12
        _within_budget(grads_t[name], grads_r[name], grads_s[name], atol * scale, f"grad {name}")
    for name in bufs_r:
        _within_budget(bufs_t[name].double(), bufs_r[name].double(), bufs_s[name].double(), atol, name)


@pytest.mark.parametrize("train", [True, False])
def test_conv_bn_relu_triton_equals_torch(train):
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, gamma=2, padding=1, minimum_channels_per_group=4)
    _assert_same(layer, torch.randn(2, 16, 5, 5), train)


@pytest.mark.parametrize("train", [True, False])
def test_bottleneck_triton_equals_torch(train):
    block = PackedBottleneck(8, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1)
    _assert_same(block, torch.randn(2, 16, 6, 6), train)


@pytest.mark.slow
def test_tiny_packed_resnet_triton_equals_torch():
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar", width_multiplier=0.125)
    _assert_same(model, torch.randn(2, 3, 16, 16), train=True)   # 8 values per channel in layer4's BN


def test_compile_fullgraph_through_triton_ops():
    block = PackedBottleneck(8, 4, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0,
                             groups=1).eval()
    x = torch.randn(1, 16, 4, 4)
    with pe_kernels.use_backend("triton"):
        eager = block(x)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    assert pe_kernels.last_dispatch().backend == "triton"
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_relu_propagates_nan_like_torch(backend):
    """A NaN is never hidden by a fused ReLU (prologue, epilogue, apply): it shows where torch.relu shows it."""
    x = torch.randn(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    w = torch.randn(4, 2, 3, 3)
    scale, shift = torch.ones(4), torch.zeros(4)
    with pe_kernels.use_backend(backend):
        y, _ = pe_kernels.ops.conv_fused(x, w, in_scale=scale, in_shift=shift, in_relu=True, out_relu=True,
                                         padding=1, groups=2)
        out = pe_kernels.ops.bn_apply(x, scale, shift, relu=True)
    expected = torch.relu(torch.nn.functional.conv2d(torch.relu(x), w, padding=1, groups=2))
    assert torch.equal(torch.isnan(y), torch.isnan(expected)) and torch.isnan(y).any()
    assert torch.equal(torch.isnan(out), torch.isnan(x))
