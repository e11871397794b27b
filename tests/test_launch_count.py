"""Kernel launches per conv and host syncs of Table 8 models, counted on CPU by bench/launches.py (issue 11).

Counts are deterministic (Triton launches of a dry run + ATen ops that launch a kernel, from torch.profiler), so
they are asserted with exact upper bounds: a change that adds a launch fails here. Measured 2026-11-22 at this
commit (python bench/launches.py --model pe-2-4-1 single; models channels_last on every provider; --nchw: 226,
210 before the KRSC weight copy stopped being cached across calls):
pe-triton inference 58 / 56 launches for 53 convs (issue 11's target: <= 1.2 per conv; 395 before the fold and
weight caches); training step 193 / 190 = 3.64 / 3.58 per conv (target <= 5; 1657 at the start of issue 11, 418
before conv_bn_train fused the BatchNorm finalize into the conv and its backward into wgrad/dgrad, the weights went
channels_last with dw in their layout and the apply backward reduced its sums in-kernel; 225 / 222 before the
junctions (issue 12: a block's tail and the next block's first conv -> BN in one node, the tail's backward in that
conv's dgrad epilogue: 16 apply backwards and 16 gradient adds gone; a shortcut conv's backward in its junction
too)).
The stock path (`torch` backend: the stock modules' ATen ops) must never launch more than the stock eager twin.
A step must not sync with the host (aten::_local_scalar_dense): a CUDA graph could not capture it.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch

import pe_kernels
from pe_kernels.nn import PackedConvBNReLU2d

from _devices import ieee_fp32

REPO = Path(__file__).resolve().parents[1]

# exact upper bounds (launches per inference forward / training step), 53 convs each
INFER_BOUND = {"pe-2-4-1": 58, "single": 56}
TRAIN_BOUND = {"pe-2-4-1": 193, "single": 190}


def _tool():
    spec = importlib.util.spec_from_file_location("bench_launches_under_test", REPO / "bench" / "launches.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def counts():
    """bench/launches.count in a fresh interpreter-free process: the dry run needs pe_kernels.triton imported with
    TRITON_INTERPRET unset (the test session set it), so the rows come from a subprocess."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "launches.py"), "--model", "pe-2-4-1", "single",
                           "--provider", "pe-triton", "pe-torch", "eager", "--json"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "launches.py"), "--model", "pe-2-4-1", "--mode",
                           "train", "--provider", "pe-triton", "--nchw", "--json"],
                          env=env, capture_output=True, text=True, timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows += [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    return {(r["model"], r["mode"], r["provider"], r["layout"]): r for r in rows}


@pytest.mark.parametrize("model", ["pe-2-4-1", "single"])
def test_inference_is_one_launch_per_conv(counts, model):
    row = counts[(model, "infer", "pe-triton", "channels_last")]
    assert row["convs"] == 53 and row["triton_kernels"].get("_conv_fwd_kernel") == 53, row
    assert row["launches"] <= INFER_BOUND[model], row
    assert row["per_conv"] <= 1.2, row


@pytest.mark.parametrize("model", ["pe-2-4-1", "single"])
def test_training_step_launches_within_bound(counts, model):
    row = counts[(model, "train", "pe-triton", "channels_last")]
    assert row["triton_kernels"].get("_conv_wgrad_kernel") == 53, row  # a real step: every conv's backward ran
    assert row["launches"] <= TRAIN_BOUND[model], row


@pytest.mark.parametrize("model", ["pe-2-4-1", "single"])
def test_training_step_meets_the_target(counts, model):
    """Issue 11: <= 5 launches per conv in a training step (forward, loss, backward); each conv is one forward
    launch (conv + statistics + BatchNorm finalize) and at most two backward ones (wgrad, dgrad: g_acc on load)."""
    row = counts[(model, "train", "pe-triton", "channels_last")]
    assert row["per_conv"] <= 5.0, row
    kernels = row["triton_kernels"]
    assert kernels.get("_conv_fwd_kernel") == 53 and kernels.get("_conv_dgrad_kernel") == 52, kernels
    for gone in ("_bn_finalize_kernel", "_bn_finalize_bwd_kernel", "_conv_bwd_epilogue_kernel", "_sum_slots_kernel"):
        assert gone not in kernels, kernels
    assert "aten::copy_" not in row["aten_ops"] or row["aten_ops"]["aten::copy_"] <= 6, row["aten_ops"]


def test_nchw_model_training_step(counts):
    """A model left in the default layout (KCRS weights): a KRSC copy of each 3x3 weight per launch that reads it
    (never cached: triton/_common.krsc), and the weight gradients in the parameters' own layout (no AccumulateGrad
    copy): 193 + 17 forward copies (16 bottleneck 3x3 convs and the stem) + 16 dgrad copies (the stem has no dgrad).
    model.to(memory_format=torch.channels_last) takes all 33 away (test above)."""
    row = counts[("pe-2-4-1", "train", "pe-triton", "nchw")]
    assert row["launches"] <= 226, row
    assert row["aten_ops"].get("aten::copy_", 0) <= 39, row["aten_ops"]


@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("model", ["pe-2-4-1", "single"])
def test_stock_path_launches_no_more_than_stock(counts, model, mode):
    ours, stock = counts[(model, mode, "pe-torch", "channels_last")], counts[(model, mode, "eager", "channels_last")]
    assert ours["launches"] <= stock["launches"], (ours, stock)


@pytest.mark.parametrize("provider", ["pe-triton", "pe-torch", "eager"])
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("model", ["pe-2-4-1", "single"])
def test_no_host_sync(counts, model, mode, provider):
    assert counts[(model, mode, provider, "channels_last")]["syncs"] == 0


def _syncs(step) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        step()
    return sum(1 for e in prof.events() if e.name == "aten::_local_scalar_dense")


@pytest.mark.parametrize("momentum", [0.1, None])
def test_kernel_path_training_step_is_capture_safe(kernel_device, momentum):
    """A training step on the kernels' path, cumulative-average BN (momentum=None, whose factor 1/num_batches_tracked
    stock BatchNorm2d reads on the host) included, performs no host sync; the running statistics are BatchNorm2d's."""
    backend = "triton" if pe_kernels.backends()["triton"].available else pytest.skip("triton unavailable")
    torch.manual_seed(0)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1, momentum=momentum,
                               minimum_channels_per_group=4).to(kernel_device).train()
    stock = torch.nn.Sequential(torch.nn.Conv2d(16, 16, 3, padding=1, groups=2, bias=False),
                                torch.nn.BatchNorm2d(16, momentum=momentum)).to(kernel_device).train()
    stock[0].weight.data.copy_(layer.conv.conv.weight.data)
    x = torch.randn(2, 16, 5, 5, device=kernel_device)
    with ieee_fp32():   # (both sides: the running mean of a TF32 conv is 2e-3 off relative)
        with pe_kernels.use_backend(backend):
            for _ in range(2):
                assert _syncs(lambda: layer(x).sum().backward()) == 0
        for _ in range(2):
            stock(x)
    torch.testing.assert_close(layer.bn.running_mean, stock[1].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(layer.bn.running_var, stock[1].running_var, rtol=1e-4, atol=1e-5)
    assert int(layer.bn.num_batches_tracked) == 2


def test_eval_caches_follow_parameter_versions(kernel_device):
    """The folded BN and the cast weight are reused while nothing changes and recomputed when a parameter or buffer
    changes in place (version counters): no stale result."""
    backend = "triton" if pe_kernels.backends()["triton"].available else pytest.skip("triton unavailable")
    torch.manual_seed(0)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1,
                               minimum_channels_per_group=4).to(kernel_device).eval()
    x = torch.randn(2, 16, 5, 5, device=kernel_device)

    def expected():
        with pe_kernels.use_backend("torch"), torch.no_grad():
            return layer.forward_modules(x)

    with pe_kernels.use_backend(backend), torch.no_grad(), ieee_fp32():   # (TF32: 1e-3 off, both sides)
        torch.testing.assert_close(layer(x), expected(), rtol=1e-4, atol=1e-5)
        for change in (lambda: layer.bn.running_var.mul_(2.0), lambda: layer.bn.weight.add_(0.5),
                       lambda: layer.bn.running_mean.add_(1.0), lambda: layer.bn.bias.sub_(0.25),
                       lambda: layer.conv.conv.weight.mul_(-1.0)):
            change()
            torch.testing.assert_close(layer(x), expected(), rtol=1e-4, atol=1e-5)
        layer.load_state_dict({k: v * 0.5 if v.is_floating_point() else v for k, v in layer.state_dict().items()})
        torch.testing.assert_close(layer(x), expected(), rtol=1e-4, atol=1e-5)
        for _ in range(3):  # a buffer replaced by a new tensor (maybe at the freed one's address, version 0)
            var = layer.bn.running_var
            layer.bn.running_var = None
            del var
            layer.bn.running_var = torch.rand(16, device=kernel_device) + 0.5
            torch.testing.assert_close(layer(x), expected(), rtol=1e-4, atol=1e-5)


def test_eval_weight_cast_cache_under_autocast(kernel_device):
    """Under autocast the weight's cast (and KRSC copy) is made once per weight version and follows changes."""
    backend = "triton" if pe_kernels.backends()["triton"].available else pytest.skip("triton unavailable")
    torch.manual_seed(0)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1,
                               minimum_channels_per_group=4).to(kernel_device).eval()
    x = torch.randn(2, 16, 5, 5, device=kernel_device)
    amp = torch.autocast(kernel_device.type, dtype=torch.bfloat16)

    def expected():
        with pe_kernels.use_backend("torch"), torch.no_grad(), amp:
            return layer.forward_modules(x).float()

    with pe_kernels.use_backend(backend), torch.no_grad():
        for step in range(3):
            for _ in range(2):  # a miss, then a hit
                with amp:
                    out = layer(x)
                assert out.dtype == torch.bfloat16
                torch.testing.assert_close(out.float(), expected(), rtol=2e-2, atol=2e-2)
            layer.conv.conv.weight.mul_(-1.0 if step == 0 else 2.0)


def test_krsc_copy_is_never_cached():
    """The launchers' KRSC copy of a KCRS 3x3 weight is made per call (triton/_common.krsc), so a write no version
    counter sees (a fused optimizer's step, `.data`) is never missed; a channels_last weight is used as it is."""
    if not pe_kernels.backends()["triton"].available:
        pytest.skip("triton unavailable")
    from pe_kernels.triton._common import krsc

    w = torch.randn(8, 4, 3, 3)
    first, strides = krsc(w)
    assert first.is_contiguous(memory_format=torch.channels_last) and strides == (36, 1, 12, 4)
    torch.testing.assert_close(first, w)
    w.data.mul_(2.0)  # no version bump
    second = krsc(w)[0]
    assert second is not first
    torch.testing.assert_close(second, w)
    cl = w.contiguous(memory_format=torch.channels_last)
    assert krsc(cl)[0] is cl                      # already KRSC: itself, no copy
    one = torch.randn(8, 4, 1, 1)
    assert krsc(one)[0] is one                    # a 1x1 filter: both layouts are one


def test_training_weight_gradient_in_the_parameter_layout(kernel_device):
    """On the kernel path a KCRS (default) conv weight gets a KCRS gradient and a channels_last one a channels_last
    gradient: AccumulateGrad has nothing to copy."""
    backend = "triton" if pe_kernels.backends()["triton"].available else pytest.skip("triton unavailable")
    torch.manual_seed(0)
    for channels_last in (False, True):
        layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1,
                                   minimum_channels_per_group=4).to(kernel_device).train()
        if channels_last:
            layer = layer.to(memory_format=torch.channels_last)
        x = torch.randn(2, 16, 5, 5, device=kernel_device)
        with pe_kernels.use_backend(backend):
            layer(x).sum().backward()
        weight = layer.conv.conv.weight
        assert weight.grad.stride() == weight.stride(), (channels_last, weight.grad.stride(), weight.stride())
