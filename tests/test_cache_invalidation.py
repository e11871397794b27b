"""Values cached from parameters (eval BatchNorm folds, cast weights) never outlive a change of what they were made
from, also for writes that do not bump version counters (seen on an H100: a fused SGD step left a stale KRSC weight
copy; our kernels' running-statistics updates left a stale eval fold).

Each test fills the caches with an eval forward first, changes the model, and compares the next eval forward with
the stock modules' (torch backend) on the same parameters."""

import pytest
import torch

import pe_kernels
from pe_kernels import functional as PF
from pe_kernels.nn import PackedConvBNReLU2d
from _devices import ieee_fp32


def _layer(device):
    torch.manual_seed(0)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1, minimum_channels_per_group=4)
    return layer.to(device)


def _eval_matches_stock(layer, x, backend):
    layer.eval()
    with torch.no_grad(), ieee_fp32():  # fp32 rounding on both sides on a GPU (no TF32)
        with pe_kernels.use_backend(backend):
            got = layer(x)
        with pe_kernels.use_backend("torch"):
            expected = layer.forward_modules(x)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


@pytest.fixture
def backend():
    if not pe_kernels.backends()["triton"].available:
        pytest.skip("triton unavailable")
    return "triton"


def test_running_statistics_written_by_the_kernels_bump_their_versions(kernel_device, backend):
    """A training step on the kernels updates running_mean / running_var / num_batches_tracked in place; their
    version counters move as an ATen in-place op's would, and the next eval forward uses the new statistics."""
    layer = _layer(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    _eval_matches_stock(layer, x, backend)  # fills the fold cache
    bn = layer.bn
    versions = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    generation = PF._GENERATION[0]
    layer.train()
    with pe_kernels.use_backend(backend):
        layer(x).sum().backward()
    PF._GENERATION[0] = generation  # only the version counters may tell the eval fold about the new statistics
    after = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    assert all(a > b for a, b in zip(after, versions)), (versions, after)
    _eval_matches_stock(layer, x, backend)


@pytest.mark.parametrize("optimizer", ["sgd-fused", "adamw-fused", "sgd-foreach"])
def test_an_optimizer_step_drops_the_caches(kernel_device, backend, optimizer):
    """Fused optimizers write parameters without bumping their version counters: every step clears the caches
    (torch.optim's global step post-hook), so eval after a step sees the new weights."""
    name, impl = optimizer.split("-")
    layer = _layer(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    kwargs = {impl: True}
    opt = (torch.optim.SGD(layer.parameters(), lr=0.5, **kwargs) if name == "sgd"
           else torch.optim.AdamW(layer.parameters(), lr=0.5, **kwargs))
    for _ in range(2):
        _eval_matches_stock(layer, x, backend)
        _eval_matches_stock(layer, x, backend)  # a cache hit
        for p in layer.parameters():
            p.grad = torch.randn_like(p)
        opt.step()
    _eval_matches_stock(layer, x, backend)


def test_unversioned_writes_need_a_mode_change_or_clear_caches(kernel_device, backend):
    """`.data` writes bump no version counter: a mode change of a pe_kernels module or clear_caches() drops the
    caches (README, Behaviour); a version-bumping write needs neither."""
    layer = _layer(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    _eval_matches_stock(layer, x, backend)
    with torch.no_grad():
        layer.bn.weight.mul_(3.0)  # bumps the version: seen
    _eval_matches_stock(layer, x, backend)
    layer.bn.weight.data.mul_(0.5)  # unversioned, then a round trip through train mode
    layer.train()
    _eval_matches_stock(layer, x, backend)
    layer.conv.conv.weight.data.mul_(-1.0)  # unversioned, then clear_caches()
    pe_kernels.clear_caches()
    _eval_matches_stock(layer, x, backend)


def test_clear_caches_empties_them(kernel_device, backend):
    layer = _layer(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    _eval_matches_stock(layer, x, backend)
    assert len(PF._FOLDED) > 0
    generation = PF._GENERATION[0]
    pe_kernels.clear_caches()
    assert len(PF._FOLDED) == 0 and len(PF._CAST) == 0 and PF._GENERATION[0] == generation + 1
