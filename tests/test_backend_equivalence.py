"""Whole modules on the `triton` backend equal the `torch` backend (tiny shapes).

The per-kernel error budgets live in test_triton_*.py; here the composition is checked: a fused residual
block (prologue fusion in training, folded BN epilogues in eval) and a tiny packed ResNet, forward, every
parameter gradient and the running statistics, plus torch.compile(fullgraph=True) through the Triton ops.
The triton run and the fp32 torch run are on `kernel_device` (CUDA on a GPU machine, CPU under the Triton
interpreter elsewhere), the float64 oracle on CPU. On a GPU both fp32 runs are IEEE fp32 (TF32 off): the budget
here is fp32 rounding; TF32 is the kernel tests' business (tests/_oracle.py).

Test data must leave every ReLU decidable in fp32: a ReLU input within fp32 rounding of zero may have either sign
in a correct fp32 run, and a flipped mask changes a gradient by the whole upstream gradient at that element, spread
over its receptive field, far beyond the budget (on an H100, 2026-11-22, the tiny ResNet's grad x: 41 of 1536
elements off by up to 6.4e-4, from a layer1 ReLU input of 1.27e-6 that fp32 computes with an error of 7.5e-7 on
CPU). `_assert_same` records the ReLU inputs of the torch fp32 run and of the float64 oracle and requires
|z64| > RELU_MARGIN * max|z32 - z64| for each ReLU call (exact zeros in both runs excepted): RELU_MARGIN = 4 is
twice the budget's factor 2 on torch's own error, so a kernel can flip a mask only with a pre-activation error
twice what the budget allows. Inputs are seeded so that they pass (tests/_oracle.py's `slack` is the per-element
alternative, for single kernels).
"""

import copy

import pytest
import torch

import pe_kernels
from pe_kernels.models import packed_resnet
from pe_kernels.nn import PackedBottleneck, PackedConvBNReLU2d

from _devices import ieee_fp32, kernel_device, require_backend
from _oracle import check_budget


@pytest.fixture(autouse=True)
def _needs_triton():
    require_backend("triton")


RELU_MARGIN = 4.0


def _run(module, x, backend, train, relu_inputs=None):
    """Output, input gradient, parameter gradients and buffers (on CPU) of one training/eval step. With a list as
    `relu_inputs`, the input of every torch.relu call (the torch backend's ReLUs, in order) is appended to it."""
    module = module.train(train)
    x = x.clone().requires_grad_()
    relu = torch.relu

    def recording_relu(t, *args, **kwargs):
        relu_inputs.append(t.detach().cpu().double())
        return relu(t, *args, **kwargs)

    if relu_inputs is not None:
        torch.relu = recording_relu
    try:
        with pe_kernels.use_backend(backend):
            out = module(x)
            out.float().square().mean().backward()
    finally:
        torch.relu = relu
    grads = {n: p.grad.cpu() for n, p in module.named_parameters()}
    buffers = {n: b.cpu() for n, b in module.named_buffers()}
    return out.detach().cpu(), x.grad.cpu(), grads, buffers


def _assert_relus_decidable(z32s: list, z64s: list) -> None:
    """Every ReLU input at least RELU_MARGIN x torch fp32's largest error on that call away from zero (module
    docstring): otherwise the test data, not a kernel, decides the mask."""
    assert z32s and len(z32s) == len(z64s), f"ReLU calls: {len(z32s)} in fp32, {len(z64s)} in float64"
    for i, (z32, z64) in enumerate(zip(z32s, z64s)):
        live = (z32 != 0) | (z64 != 0)
        err = (z32 - z64).abs().max().item()
        if not live.any() or err == 0:
            continue
        closest = z64.abs()[live].min().item()
        assert closest > RELU_MARGIN * err, (
            f"test data: ReLU call {i} has an input {closest:.3g} from zero while fp32 computes it with errors up to "
            f"{err:.3g}: its mask is not decidable in fp32 (change the input's seed)")


def _assert_same(module, x, train, device, atol=1e-4):
    """triton (fp32) vs torch (fp32) on `device` vs the float64 CPU oracle: outputs, input and parameter
    gradients, buffers."""
    runs, relus = {}, {"triton": None, "torch": [], "ref64": []}
    cpu = torch.device("cpu")
    with ieee_fp32():
        for name, backend, dtype, dev in (("triton", "triton", torch.float32, device),
                                          ("torch", "torch", torch.float32, device),
                                          ("ref64", "torch", torch.float64, cpu)):
            torch.manual_seed(0)
            runs[name] = _run(copy.deepcopy(module).to(dev, dtype), x.to(dev, dtype), backend, train, relus[name])
    _assert_relus_decidable(relus["torch"], relus["ref64"])
    (out_t, dx_t, grads_t, bufs_t), (out_s, dx_s, grads_s, bufs_s), (out_r, dx_r, grads_r, bufs_r) = (
        runs["triton"], runs["torch"], runs["ref64"])
    check_budget("output", out_t, out_s, out_r, atol)
    check_budget("grad x", dx_t, dx_s, dx_r, atol)
    for name in grads_r:
        scale = grads_r[name].abs().max().item() + 1e-12
        check_budget(f"grad {name}", grads_t[name], grads_s[name], grads_r[name], atol * scale)
    for name in bufs_r:
        check_budget(name, bufs_t[name].double(), bufs_s[name].double(), bufs_r[name].double(), atol)


@pytest.mark.parametrize("train", [True, False])
def test_conv_bn_relu_triton_equals_torch(train, kernel_device):
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, gamma=2, padding=1, minimum_channels_per_group=4)
    _assert_same(layer, torch.randn(2, 16, 5, 5), train, kernel_device)


@pytest.mark.parametrize("train", [True, False])
def test_bottleneck_triton_equals_torch(train, kernel_device):
    block = PackedBottleneck(8, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1)
    _assert_same(block, torch.randn(2, 16, 6, 6), train, kernel_device)


@pytest.mark.slow
def test_tiny_packed_resnet_triton_equals_torch(kernel_device):
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar", width_multiplier=0.125)
    # Seed 7: every ReLU input >= 29x torch fp32's error from zero on CPU (the global stream's draw had one at 1.7x).
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    _assert_same(model, x, True, kernel_device)   # 8 values per channel in layer4's BN


def test_compile_fullgraph_through_triton_ops(kernel_device):
    block = PackedBottleneck(8, 4, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0,
                             groups=1).eval().to(kernel_device)
    x = torch.randn(1, 16, 4, 4).to(kernel_device)
    with pe_kernels.use_backend("triton"):
        eager = block(x)
        compiled = torch.compile(block, backend="aot_eager", fullgraph=True)(x)
    assert pe_kernels.last_dispatch().backend == "triton"
    torch.testing.assert_close(compiled, eager)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_relu_propagates_nan_like_torch(backend):
    """A NaN is never hidden by a fused ReLU (prologue, epilogue, apply): it shows where torch.relu shows it.
    triton runs on the kernel device; torch on CPU (ATen's direct conv: cuDNN's Winograd/FFT may spread a NaN
    over a whole tile); the expected pattern from a float64 direct conv on CPU."""
    device = kernel_device() if backend == "triton" else torch.device("cpu")
    x = torch.randn(1, 4, 5, 5)
    x[0, 1, 2, 2] = float("nan")
    w = torch.randn(4, 2, 3, 3)
    scale, shift = torch.ones(4), torch.zeros(4)
    with pe_kernels.use_backend(backend):
        y, _ = pe_kernels.ops.conv_fused(x.to(device), w.to(device), in_scale=scale.to(device),
                                         in_shift=shift.to(device), in_relu=True, out_relu=True, padding=1, groups=2)
        out = pe_kernels.ops.bn_apply(x.to(device), scale.to(device), shift.to(device), relu=True)
    assert pe_kernels.last_dispatch().backend == backend and y.device.type == device.type
    expected = torch.relu(torch.nn.functional.conv2d(torch.relu(x.double()), w.double(), padding=1, groups=2))
    assert torch.equal(torch.isnan(y).cpu(), torch.isnan(expected)) and torch.isnan(y).any()
    assert torch.equal(torch.isnan(out).cpu(), torch.isnan(x))
