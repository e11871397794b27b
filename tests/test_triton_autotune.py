"""Partial-sum buffers under autotuning: every config must write the whole buffer.

On a GPU, Triton's autotuner runs every config of a kernel on the SAME arguments (the trials) and then the
winner. A kernel that writes per-tile partial sums into a buffer sized for one BLOCK_M and accumulated over
afterwards must leave no row of an earlier trial behind. These tests replay that sequence — BLOCK_M 64 then
128 (a 128-row winner after a 64-row trial) and 128 then 64 — on the same buffers, by standing in for the
launchers' `launch` (conv kernels) or the kernel object (bn_apply backward), and check the statistics, the
epilogue-backward sums (d_bias, d_out_scale, d_out_shift), the dgrad prologue-backward partials (d_in_scale,
d_in_shift) and the bn_apply backward partials against the float64 reference. Every allocation made by the
launchers is also poisoned with NaN, so a slot that no program writes shows up (buffers are torch.empty).
Runs under the interpreter on CPU and compiled on a GPU.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pe_kernels.reference as ref

# (importlib: pe_kernels.triton.bn_apply, as an attribute, is the function the package exports)
common, bn_apply_mod, conv_bwd_mod, conv_fwd_mod = (importlib.import_module(f"pe_kernels.triton.{name}")
                                                    for name in ("_common", "bn_apply", "conv_bwd", "conv_fwd"))

SEQUENCES = [pytest.param((64, 128), id="64-then-128"), pytest.param((128, 64), id="128-then-64")]


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


class _PoisonedTorch:
    """`torch`, with floating-point torch.empty filled with NaN (an unwritten element then shows)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def empty(*args, **kwargs):
        t = torch.empty(*args, **kwargs)
        return t.fill_(float("nan")) if t.is_floating_point() else t


@pytest.fixture
def replay(monkeypatch):
    """replay(block_ms): launches run every BLOCK_M in `block_ms` in order on the same arguments."""
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # IEEE fp32 dots on a GPU too
    for module in (common, conv_fwd_mod, conv_bwd_mod, bn_apply_mod):
        monkeypatch.setattr(module, "torch", _PoisonedTorch())

    def set_sequence(block_ms):
        def launch(kernel, tuned_kernel, grid, args, meta, tiles):
            for block_m in block_ms:  # the trials, then the winner (the last): same buffers throughout
                kernel[grid](*args, **meta, BLOCK_M=block_m)

        monkeypatch.setattr(conv_fwd_mod, "launch", launch)
        monkeypatch.setattr(conv_bwd_mod, "launch", launch)

        class ReplayedKernel:
            def __init__(self, kernel):
                self.kernel = kernel

            def __getitem__(self, grid):
                def run(*args, **kwargs):
                    for block_m in block_ms:
                        self.kernel[grid](*args, **{**kwargs, "BLOCK_M": block_m // 2})
                return run

        monkeypatch.setattr(bn_apply_mod, "_bn_apply_bwd_kernel", ReplayedKernel(bn_apply_mod._bn_apply_bwd_kernel))

    return set_sequence


def _close(name, got, want, rtol=1e-4):
    assert got is not None, name
    got = got.detach().cpu().double()
    scale = want.abs().max().item() + 1.0
    err = (got - want).abs().max().item()
    assert torch.isfinite(got).all(), f"{name}: non-finite values (a slot no program wrote)"
    assert err <= rtol * scale, f"{name}: max error {err:.3e} (scale {scale:.3e})"


def _conv_inputs():
    # M = N*P*Q = 2*9*9 = 162 rows: 3 slots of 64, two 128-row programs (the last slot of the second masked).
    g = torch.Generator().manual_seed(0)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    x = r(2, 16, 9, 9)
    w = r(32, 8, 3, 3) * 0.2
    vecs = dict(bias=r(32), in_scale=r(16).abs() + 0.5, in_shift=r(16) * 0.1, out_scale=r(32), out_shift=r(32))
    return x, w, vecs


GEOMETRY = dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=2)


@pytest.mark.parametrize("block_ms", SEQUENCES)
def test_conv_statistics_survive_autotune_trials(replay, block_ms):
    """Statistics after autotune trials on the same buffers: right, and the winner's bit for bit (each run's last
    programs merge them inside the kernel, the winner's run last; the counters are back at 0 after every trial)."""
    device = _device()
    x, w, v = _conv_inputs()
    geo = GEOMETRY.values()

    def forward():
        return conv_fwd_mod.conv_fwd(x.to(device), w.to(device), v["bias"].to(device), v["in_scale"].to(device),
                                     v["in_shift"].to(device), True, None, None, None, False, *geo, True,
                                     tiles={"BLOCK_M": 64})

    replay(block_ms)
    y, stats = forward()
    d64 = {k: t.double() for k, t in v.items()}
    y_ref, stats_ref = ref.conv_fused(x.double(), w.double(), d64["bias"], d64["in_scale"], d64["in_shift"], True,
                                      None, None, None, False, *geo, True)
    _close("y", y, y_ref)
    _close("stats", stats, stats_ref)
    replay(block_ms[-1:])  # the winner alone, on fresh buffers
    assert torch.equal(forward()[1], stats)


@pytest.mark.parametrize("with_epilogue", [True, False], ids=["epilogue", "train-mode"])
@pytest.mark.parametrize("block_ms", SEQUENCES)
def test_conv_backward_sums_survive_autotune_trials(replay, block_ms, with_epilogue):
    replay(block_ms)
    device = _device()
    x, w, v = _conv_inputs()
    geo = tuple(GEOMETRY.values())
    out_scale, out_shift = (v["out_scale"], v["out_shift"]) if with_epilogue else (None, None)
    args = (x, w, v["bias"], v["in_scale"], v["in_shift"], True, out_scale, out_shift, None, with_epilogue)
    y64, stats64 = ref.conv_fused(*[a.double() if isinstance(a, torch.Tensor) else a for a in args], *geo, True)
    gen = torch.Generator().manual_seed(1)
    grad_y = torch.randn(y64.shape, generator=gen)
    grad_stats = torch.randn(2, 32, generator=gen) * 0.01
    to = lambda t, dtype=None: None if t is None else t.to(device=device, dtype=dtype or t.dtype)  # noqa: E731
    y = to(y64, torch.float32).contiguous(memory_format=torch.channels_last)
    grads = conv_bwd_mod.conv_bwd(to(grad_y), to(grad_stats), *[to(a) if isinstance(a, torch.Tensor) else a
                                                                 for a in args], *geo, y, [True] * 8,
                                  to(stats64, torch.float32), tiles={"BLOCK_M": 64})
    want = ref.conv_fused_backward(grad_y.double(), grad_stats.double(),
                                   *[a.double() if isinstance(a, torch.Tensor) else a for a in args], *geo, y64,
                                   [True] * 8, stats64)
    names = ["dx", "dw", "d_bias", "d_in_scale", "d_in_shift", "d_out_scale", "d_out_shift"]
    errors = []
    for name, got, exp in zip(names, grads, want):
        if exp is not None:
            try:
                _close(name, got, exp, rtol=1e-3)
            except AssertionError as e:
                errors.append(str(e).splitlines()[0])
    assert not errors, errors


@pytest.mark.parametrize("block_ms", SEQUENCES)
def test_bn_apply_backward_sums_survive_autotune_trials(replay, block_ms):
    replay(block_ms)  # BLOCK_M 32 then 64, or 64 then 32, in programs (and slots) of 128 rows
    device = _device()
    gen = torch.Generator().manual_seed(2)
    y, res, grad = (torch.randn(2, 24, 9, 9, generator=gen) for _ in range(3))
    scale, shift, rscale, rshift = (torch.randn(24, generator=gen) for _ in range(4))
    args = (y, scale, shift, res, rscale, rshift, True)
    out = ref.bn_apply(*[a.double() if isinstance(a, torch.Tensor) else a for a in args])
    got = bn_apply_mod.bn_apply_bwd(grad.to(device), *[a.to(device) if isinstance(a, torch.Tensor) else a
                                                       for a in args], out.float().to(device), [True] * 6,
                                    tiles={"BLOCK_M": 64, "ROWS": 128})
    want = ref.bn_apply_backward(grad.double(), *[a.double() if isinstance(a, torch.Tensor) else a for a in args],
                                 out, [True] * 6)
    for name, g, w in zip(["dy", "d_scale", "d_shift", "d_residual", "d_residual_scale", "d_residual_shift"],
                          got, want):
        _close(name, g, w)
