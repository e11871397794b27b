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


def test_running_statistics_written_by_the_kernels_bump_their_versions(kernel_device, backend, monkeypatch):
    """A training step on the kernels updates running_mean / running_var / num_batches_tracked in place; their
    version counters move as an ATen in-place op's would, and the next eval forward uses the new statistics (the
    mode switches' cache clearing switched off: only the version counters may tell the eval fold)."""
    layer = _layer(kernel_device)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    _eval_matches_stock(layer, x, backend)  # fills the fold cache
    monkeypatch.setattr(PF, "clear_caches", lambda: None)
    bn = layer.bn
    versions = [t._version for t in (bn.running_mean, bn.running_var, bn.num_batches_tracked)]
    layer.train()
    with pe_kernels.use_backend(backend):
        layer(x).sum().backward()
    assert len(PF._FOLDED) > 0  # the entry of the first eval is still there
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


def test_an_optimizer_step_keeps_the_caches_of_models_it_does_not_train(kernel_device, backend):
    """Only what was cached from the stepped optimizer's parameters is dropped: a teacher model kept in eval keeps
    its folded BatchNorm across the student's steps."""
    teacher, student = _layer(kernel_device).eval(), _layer(kernel_device).eval()  # (a mode switch clears all)
    x = torch.randn(4, 16, 5, 5, device=kernel_device)
    _eval_matches_stock(teacher, x, backend)
    _eval_matches_stock(student, x, backend)
    assert teacher.bn in PF._FOLDED and student.bn in PF._FOLDED
    opt = torch.optim.SGD(student.parameters(), lr=0.5, fused=True)
    for p in student.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    assert teacher.bn in PF._FOLDED and student.bn not in PF._FOLDED
    _eval_matches_stock(student, x, backend)


def test_a_grown_identity_buffer_stays_alive(kernel_device, backend):
    """identity_vector hands out views of a cached buffer (a CUDA graph may capture one); growing it keeps the old
    buffer alive, so a captured view never reads freed memory."""
    from pe_kernels.triton import _common

    small = _common.identity_vector(1.0, 3, kernel_device)
    storage = small.untyped_storage().data_ptr()
    big = _common.identity_vector(1.0, 2 * _common._IDENTITIES[(kernel_device, 1.0)].numel() + 1, kernel_device)
    assert big.untyped_storage().data_ptr() != storage
    assert any(b.untyped_storage().data_ptr() == storage for b in _common._RETIRED_IDENTITIES)
    assert torch.equal(small, torch.ones(3, device=kernel_device))


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
