"""pe_kernels.autotune: the decision logic (injected timings), correctness refusals (a wrong backend, one that
raises, a mutating op measured on copies), the on-disk cache round trip, and `auto` following the cache.

Timings are injected (a fake timer), so no test depends on speed. Tests take `kernel_device` (conftest.py): on
CPU the triton candidate runs under the interpreter; on a GPU machine the same tests run on CUDA tensors.
"""

from __future__ import annotations

import importlib
import json

import pytest
import torch

import pe_kernels
from _devices import require_backend, to_device
from pe_kernels import _backend, reference
from pe_kernels.nn import PackedConvBNReLU2d

at = importlib.import_module("pe_kernels.tuning")  # the module behind the function `pe_kernels.autotune`


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Each test gets an empty cache dir and no in-memory choices; nothing leaks into other test files."""
    monkeypatch.setenv("PE_KERNELS_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("PE_KERNELS_AUTOTUNE", raising=False)
    monkeypatch.delenv("PE_KERNELS_BACKEND", raising=False)
    at._tables.clear()
    at._first_call_session.cache_clear()
    yield
    at._tables.clear()
    at._first_call_session.cache_clear()


NEVER_MS = 1e9  # what the fake timer gives a backend the test does not list: measured (if correct), never chosen


def timings(**ms):
    """A fake timer: fixed milliseconds per backend (the call itself is not run). A backend the test does not list
    (cuda where the extension is built) takes NEVER_MS: it is still checked for correctness, and never wins."""
    return lambda op, backend, fn: ms.get(backend, NEVER_MS)


def listed(median_ms: dict) -> dict:
    """The medians of the backends a test timed itself (those at NEVER_MS dropped)."""
    return {b: t for b, t in median_ms.items() if t != NEVER_MS}


def apply_args(device, relu=True):
    """Backend-level arguments of bn_apply: (y, scale, shift, residual, residual_scale, residual_shift, relu)."""
    y = torch.randn(2, 8, 4, 4, device=device).contiguous(memory_format=torch.channels_last)
    return (y, torch.rand(8, device=device) + 0.5, torch.randn(8, device=device), None, None, None, relu)


class Wrong:
    """A backend that returns slightly wrong results (as a miscompiled kernel might on some GPU)."""

    @staticmethod
    def bn_apply(*args):
        return reference.bn_apply(*args) * 1.01 + 0.01

    @staticmethod
    def bn_running_update(stats, count, running_mean, running_var, momentum):
        reference.bn_running_update(stats, count, running_mean, running_var, momentum)
        running_var.add_(0.1)


class Raises:
    @staticmethod
    def bn_apply(*args):
        raise RuntimeError("boom: no kernel for this shape")


def test_shape_key_tells_geometry_apart_and_ignores_floats():
    x = torch.randn(2, 8, 5, 5)
    w = torch.randn(8, 4, 3, 3)
    base = (x, w, None, [1, 1], [1, 1], 2, False, 1e-5)
    assert at.shape_key(base) == at.shape_key((x.clone(), w.clone(), None, [1, 1], [1, 1], 2, False, 0.1))
    for other in ((x, w, None, [2, 2], [1, 1], 2, False, 1e-5), (x, w, None, [1, 1], [1, 1], 4, False, 1e-5),
                  (x[:1], w, None, [1, 1], [1, 1], 2, False, 1e-5), (x, w, w[0, 0, 0], [1, 1], [1, 1], 2, False, 0.)):
        assert at.shape_key(other) != at.shape_key(base)
    assert at.shape_key((x.contiguous(memory_format=torch.channels_last),) + base[1:]) != at.shape_key(base)
    key = at.shape_key((x, w, None, None, None, False, None, None, None, True, [2, 2], [1, 1], [1, 1], 2, True))
    assert at.describe("conv_fused", key) == "x=2x8x5x5 weight=8x4x3x3 stride=2x2 padding=1x1 dilation=1x1 groups=2"


@pytest.mark.parametrize("fast, slow", [("triton", "torch"), ("torch", "triton")])
def test_fastest_correct_backend_is_chosen(kernel_device, fast, slow):
    require_backend("triton")
    choice = at.measure("bn_apply", apply_args(kernel_device), kernel_device, torch.float32,
                        timer=timings(**{fast: 1.0, slow: 3.0}), warmup=0, repeats=3)
    assert choice.backend == fast
    assert listed(choice.median_ms) == {fast: 1.0, slow: 3.0}
    assert "triton" not in choice.refused
    assert choice.why == ("3.00x torch" if fast == "triton" else "fastest correct")


def test_wrong_backend_is_refused_even_when_faster(kernel_device):
    require_backend("triton")
    choice = at.measure("bn_apply", apply_args(kernel_device), kernel_device, torch.float32,
                        timer=timings(torch=5.0, triton=1.0), warmup=0, repeats=1, candidates={"triton": Wrong})
    assert choice.backend == "torch"
    assert set(listed(choice.median_ms)) == {"torch"} and "triton" not in choice.median_ms
    assert choice.refused["triton"].startswith("wrong on this device: output 0:")
    assert "outside the error budget" in choice.refused["triton"]


def test_backend_that_raises_is_refused_with_the_exception(kernel_device):
    require_backend("triton")
    choice = at.measure("bn_apply", apply_args(kernel_device), kernel_device, torch.float32,
                        timer=timings(torch=5.0, triton=1.0), warmup=0, repeats=1, candidates={"triton": Raises})
    assert choice.backend == "torch"
    assert choice.refused["triton"] == "raised RuntimeError: boom: no kernel for this shape"


def test_mutating_op_is_measured_on_copies_and_its_writes_are_checked(kernel_device):
    require_backend("triton")
    stats = torch.stack([torch.randn(8), torch.rand(8) + 1]).to(kernel_device) * 32
    mean, var = torch.zeros(8, device=kernel_device), torch.ones(8, device=kernel_device)
    args = (stats, 32, mean, var, 0.1)
    timer = timings(torch=2.0, triton=1.0)
    good = at.measure("bn_running_update", args, kernel_device, torch.float32, timer=timer, warmup=2, repeats=3)
    assert good.backend == "triton"
    bad = at.measure("bn_running_update", args, kernel_device, torch.float32, timer=timer, warmup=0, repeats=1,
                     candidates={"triton": Wrong})
    assert bad.backend == "torch" and "output 1" in bad.refused["triton"]  # running_var, the second write
    assert torch.equal(mean.cpu(), torch.zeros(8)) and torch.equal(var.cpu(), torch.ones(8)), "originals changed"


def test_cache_round_trip_and_invalidation(tmp_path, monkeypatch):
    ident = ("Some GPU 80GB", "sm_90")
    key = ("conv_fused", at.shape_key((torch.randn(2, 8, 5, 5), torch.randn(8, 4, 3, 3), None, [1, 1], 2, True)),
           "float16")
    record = {"op": "conv_fused", "key": json.dumps(key[1]), "dtype": "float16", "shape": "x=2x8x5x5",
              "backend": "triton", "median_ms": {"torch": 2.0, "triton": 1.0}, "refused": {}}
    path = at.cache_file(tmp_path, ident)
    assert path.name == "autotune-Some-GPU-80GB-sm_90.json"
    at.write_cache(path, ident, {key: record})
    assert at.read_cache(path, ident) == {key: record}
    assert at.read_cache(path, ("Other GPU", "sm_90")) == {}
    assert at.read_cache(tmp_path / "missing.json", ident) == {}
    monkeypatch.setattr(at, "_versions", lambda: {"torch": "9.9", "triton": None, "pe_kernels": "0.1.0"})
    assert at.read_cache(path, ident) == {}, "a cache written by other versions must be ignored"


def _bn_apply_under_auto(args):
    y, scale, shift, _, _, _, relu = args
    with pe_kernels.use_backend("auto"):
        out = pe_kernels.ops.bn_apply(y, scale, shift, relu=relu)
    return out, pe_kernels.last_dispatch()


def _write_choice(args, backend, tmp_path):
    device = args[0].device
    ident = at._identity(device.type, device.index)
    key = ("bn_apply", at.shape_key(args), "float32")
    record = {"op": "bn_apply", "key": json.dumps(key[1]), "dtype": "float32", "shape": "", "backend": backend,
              "median_ms": {}, "refused": {}}
    at.write_cache(at.cache_file(tmp_path, ident), ident, {key: record})


def test_auto_follows_the_cached_choice(kernel_device, tmp_path):
    require_backend("triton")
    args = apply_args(kernel_device)
    _, before = _bn_apply_under_auto(args)
    assert "measured" not in before.reason
    at._tables.clear()
    _write_choice(args, "triton", tmp_path)
    out, chosen = _bn_apply_under_auto(args)
    assert chosen.backend == "triton" and "measured fastest correct" in chosen.reason
    torch.testing.assert_close(out, reference.bn_apply(*args))
    _, other_shape = _bn_apply_under_auto(apply_args(kernel_device, relu=False))  # another key: not in the cache
    assert "measured" not in other_shape.reason


def test_auto_skips_a_cached_backend_that_cannot_run(kernel_device, tmp_path, monkeypatch):
    args = apply_args(kernel_device)
    _write_choice(args, "cuda", tmp_path)
    monkeypatch.setattr(_backend, "_static_reason", lambda name: None if name == "torch" else "not here")
    _, chosen = _bn_apply_under_auto(args)
    assert chosen.backend == "torch"


def test_nothing_tuned_costs_no_key(kernel_device, monkeypatch):
    """With no cache for the device and no tuning asked, `auto` never computes a shape key."""
    monkeypatch.setattr(at, "shape_key", lambda args: pytest.fail("shape key computed on the untuned hot path"))
    _, chosen = _bn_apply_under_auto(apply_args(kernel_device))
    assert "measured" not in chosen.reason


def test_autotune_a_training_step_then_auto_uses_it(kernel_device, tmp_path):
    require_backend("triton")
    torch.manual_seed(0)
    layer = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, gamma=2, padding=1,
                               minimum_channels_per_group=4).to(kernel_device).train()
    x = torch.randn(2, 16, 6, 6, device=kernel_device)
    state = {k: v.clone() for k, v in layer.state_dict().items()}
    report = pe_kernels.autotune(layer, x, backward=True, timer=timings(torch=2.0, triton=1.0, cuda=3.0),
                                 warmup=0, repeats=1, cache_dir=tmp_path / "tuned")
    ops = [row.op for row in report.rows]
    # conv_fused (_backward) stands for the training conv + BatchNorm (ops.conv_bn_train runs the backend the conv
    # op chose; its finalize is fused into the conv's kernels)
    assert sorted(ops) == sorted(["conv_fused", "bn_apply", "bn_apply_backward", "conv_fused_backward"])
    assert all(row.backend == "triton" for row in report.rows), str(report)
    assert all(torch.equal(v, state[k]) for k, v in layer.state_dict().items()), "the user's model was changed"
    assert all(p.grad is None for p in layer.parameters())
    text = str(report)
    assert "conv_fused_backward" in text and "2.00x torch" in text and str(tmp_path / "tuned") in text
    files = list((tmp_path / "tuned").glob("autotune-*.json"))
    assert len(files) == 1 and len(json.loads(files[0].read_text())["choices"]) == 4
    with pe_kernels.use_backend("auto"):  # this process follows the choices just made
        layer(x)
    assert pe_kernels.last_dispatch().backend == "triton"


def test_first_call_tuning_from_the_environment(kernel_device, tmp_path, monkeypatch):
    monkeypatch.setenv("PE_KERNELS_AUTOTUNE", "1")
    out, chosen = _bn_apply_under_auto(apply_args(kernel_device))
    assert "measured fastest correct" in chosen.reason
    (path,) = tmp_path.glob("autotune-*.json")
    (record,) = json.loads(path.read_text())["choices"]
    assert record["op"] == "bn_apply" and record["backend"] == chosen.backend and "torch" in record["median_ms"]


def test_autotune_argument_errors():
    layer = PackedConvBNReLU2d(8, 8, 1, alpha=1, num_estimators=1).eval()
    with pytest.raises(ValueError, match="model.train"):
        pe_kernels.autotune(layer, torch.randn(1, 8, 2, 2), backward=True)
    with pytest.raises(ValueError, match="repeats >= 1"):
        pe_kernels.autotune(layer, torch.randn(1, 8, 2, 2), repeats=0)
    with pytest.raises(ValueError, match="not backends"):
        at.measure("bn_apply", apply_args("cpu"), torch.device("cpu"), torch.float32, candidates={"cudnn": Wrong})
    report = pe_kernels.autotune(torch.nn.Conv2d(3, 3, 1), torch.randn(1, 3, 2, 2))
    assert report.rows == () and "nothing to tune" in str(report)


def _tf32_truncated(t):
    """`t` (fp32) with its mantissa cut to TF32's 10 bits, as tensor cores read fp32 operands Triton feeds them
    unrounded (triton-lang/triton#4574): a one-signed rounding, about -2**-11 relative on average."""
    return (t.float().contiguous().view(torch.int32) & ~0x1FFF).view(torch.float32)


def test_backward_is_checked_on_a_forward_output_consistent_with_its_inputs(kernel_device):
    """conv_fused_backward reads the saved y as the accumulator of its grad_stats[1] term; the reference recomputes
    it from x and weight. A y from a TF32 forward (truncated operands) must not get a correct triton backward
    refused: 2 * grad_stats[1] * (y - acc), summed against x in the weight gradient, is the forward's error, not
    the backward's (on an H100 it refused triton: 1 of 576 weight-gradient elements outside, max err 0.0285).
    The check therefore runs on y and stats recomputed by the float64 reference; the timing on the real inputs."""
    require_backend("triton")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 6, 6, generator=g)
    w = torch.randn(16, 4, 3, 3, generator=g) / 6
    geo = ([1, 1], [1, 1], [1, 1], 4)
    y, stats = reference.conv_fused(_tf32_truncated(x), _tf32_truncated(w), None, None, None, False, None, None,
                                    None, False, *geo, True)  # y and stats as a truncating TF32 forward gives them
    grad_y = torch.randn(y.shape, generator=g)
    grad_stats = torch.stack([torch.randn(16, generator=g) * 50, torch.randn(16, generator=g)])
    needs = [False, True] + [False] * 6  # the weight gradient, as for a layer whose input needs no gradient
    args = tuple(to_device((grad_y, grad_stats, x, w, None, None, None, False, None, None, None, False, *geo, y,
                            needs, stats), kernel_device))
    original_y = args[16].clone()
    choice = at.measure("conv_fused_backward", args, kernel_device, torch.float32,
                        timer=timings(torch=2.0, triton=1.0), warmup=0, repeats=1)
    assert choice.backend == "triton", choice.refused
    assert torch.equal(args[16], original_y), "the caller's y was changed"


def test_tf32_gets_fp16_budget_on_cuda(monkeypatch):
    """fp32 under TF32 (a CUDA tensor, torch's cuDNN TF32 flag on) has fp16's operand rounding: a correct TF32 result
    must pass (on an H100 a x4 fp32 atol refused a correct Triton conv), and with TF32 off the same error is refused."""
    g = torch.Generator().manual_seed(3)
    ref64 = torch.randn(4, 16, 6, 6, generator=g, dtype=torch.float64) * 5
    same = ref64.float()  # cuDNN may pick a non-TF32 algorithm: no error to borrow from
    tf32_like = (ref64 * (1 + 3e-4 * torch.randn(ref64.shape, generator=g, dtype=torch.float64))).float()
    cuda = torch.device("cuda")  # check() reads only the device type; the tensors stay on the CPU
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert at.check([tf32_like], [same], [ref64], torch.float32, cuda) is None
    assert at.check([tf32_like], [same], [ref64], torch.float32, torch.device("cpu")) is not None  # CPU: exact fp32
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert "outside the error budget" in at.check([tf32_like], [same], [ref64], torch.float32, cuda)


def test_overflow_near_the_dtype_limit_is_not_a_wrong_answer():
    """fp16 gradients of a large upstream gradient: an inf where the float64 reference is near fp16's largest value
    (with its sign) is the dtype's range, and the fp16 reference itself may stay finite there (cuDNN's own backward
    was refused so on an H100); an inf where the reference is small, or of the wrong sign, is still refused."""
    cpu = torch.device("cpu")
    ref64 = torch.tensor([1.0, -2.0, 60000.0, -50000.0], dtype=torch.float64)
    same = ref64.half()  # all finite
    overflowed = torch.tensor([1.0, -2.0, float("inf"), float("-inf")], dtype=torch.float16)
    assert at.check([overflowed], [same], [ref64], torch.float16, cpu) is None
    wrong_sign = torch.tensor([1.0, -2.0, float("-inf"), float("-inf")], dtype=torch.float16)
    assert "1 of 4 elements" in at.check([wrong_sign], [same], [ref64], torch.float16, cpu)
    small = torch.tensor([float("inf"), -2.0, 60000.0, -50000.0], dtype=torch.float16)
    assert "1 of 4 elements" in at.check([small], [same], [ref64], torch.float16, cpu)
    fp32_ref = torch.tensor([60000.0], dtype=torch.float64)  # far from fp32's range: an inf is wrong
    assert at.check([torch.tensor([float("inf")])], [fp32_ref.float()], [fp32_ref], torch.float32, cpu) is not None
