"""pe_kernels.triton conv_bn_train_backward (conv_bwd.conv_bn_bwd) against the float64 reference.

The backward of a training conv -> BatchNorm: on the fast path (weight gradient needed) the wgrad and the dgrad form
g_acc = grad_y + d_mean/n + 2 d_m2 (y - mean) on load, the BN finalize's backward computed per channel inside them,
and the wgrad writes d_bn_weight, d_bn_bias and, when needed, the conv bias's d_bias = sum g_acc: two Triton
launches. Other cases fall back to the composition of bn_finalize_backward and conv_fused_backward
(ops/contract.composed_conv_bn_train_backward).

Oracle: pe_kernels.reference.conv_bn_train_backward, error budget of tests/_oracle.py
(|kernel - ref64| <= 2 |ref_same_dtype - ref64| + atol); each side gets its own forward's y and statistics (the
kernel the Triton conv_fused's: a consumer tested on its producer's real output). And, in fp32, the fast path equals
the composed Triton path (same tiles): the same roundings. Runs under the Triton interpreter on CPU (conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

import pe_kernels.reference as ref
import pe_kernels.triton as tri
from pe_kernels.ops.contract import CONV_BN_GRAD_NAMES, composed_conv_bn_train_backward
from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton.conv_bwd import conv_bn_bwd, conv_bn_train_backward

from _devices import ieee_fp32
from _oracle import assert_budget
from test_triton_conv import launches_per_call

DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")]
EPS = 1e-5


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    stride: int = 1
    padding: int = 0
    groups: int = 1


CASES = {
    "1x1_g1": Case(2, 8, 12, 5, 6, 1),
    "3x3_s2_g2": Case(2, 8, 10, 7, 6, 3, stride=2, padding=1, groups=2),
    "3x3_s2_g4_batch1": Case(1, 12, 20, 8, 7, 3, stride=2, padding=1, groups=4),
}
# Small tiles: a wgrad split of 3 (each tile's last split sums the partials), several k row blocks (K_g = 40 / 20)
# and j = (r, s, c) column blocks (d_bn_* come from the programs of j tile 0, split 0 only), several dgrad M tiles.
TILED_CASES = {
    "3x3_g1_k40": Case(2, 8, 40, 6, 6, 3, padding=1),
    "3x3_s2_g2_k40": Case(2, 8, 40, 11, 11, 3, stride=2, padding=1, groups=2),
}
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)

# needs_grad over CONV_BN_GRAD_NAMES (x, weight, bias, in_scale, in_shift, bn_weight, bn_bias)
ALL_BUT_BIAS = (True, True, False, True, True, True, True)
ALL = (True,) * 7


def make_inputs(case: Case, dtype, device, prologue=True, bias=False, bn_weight=True, weight_layout="kcrs"):
    """The conv_bn_train_backward arguments but the gradients, y and stats (drawn on CPU: both machines test the same
    values)."""
    C_g = case.C // case.groups
    x = torch.randn(case.N, case.C, case.H, case.W).to(device, dtype).contiguous(memory_format=torch.channels_last)
    w = (torch.randn(case.K, C_g, case.R, case.R) / (C_g * case.R * case.R) ** 0.5).to(device, dtype)
    if weight_layout == "channels_last":
        w = w.contiguous(memory_format=torch.channels_last)
    vec = lambda t: t.to(device)  # noqa: E731
    return dict(
        x=x, weight=w, bias=vec(torch.randn(case.K)) if bias else None,
        in_scale=vec(torch.rand(case.C) + 0.5) if prologue else None,
        in_shift=vec(torch.randn(case.C) * 0.5) if prologue else None, in_relu=prologue,
        stride=(case.stride,) * 2, padding=(case.padding,) * 2, dilation=(1, 1), groups=case.groups,
        bn_weight=vec(torch.rand(case.K) + 0.5) if bn_weight else None, eps=EPS)


def to64(args: dict) -> dict:
    return {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def forward(fn_module, args: dict):
    """(y, stats) of the training conv (conv_fused with statistics, no epilogue) of `fn_module`."""
    a = args
    return fn_module.conv_fused(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], None,
                                None, None, False, a["stride"], a["padding"], a["dilation"], a["groups"], True)


def backward(fn, grads: tuple, args: dict, y, stats, needs_grad, **kw):
    a = args
    return fn(*grads, a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["stride"],
              a["padding"], a["dilation"], a["groups"], y, stats, a["bn_weight"], a["eps"], list(needs_grad), **kw)


def make_grads(y_shape, K, dtype, device, absent=(), grad_layout=torch.contiguous_format):
    """(grad_y, grad_scale, grad_shift), the names in `absent` None; grad_y in `grad_layout` (a memory format)."""
    grads = dict(grad_y=torch.randn(y_shape).to(device, dtype).contiguous(memory_format=grad_layout),
                 grad_scale=torch.randn(K).to(device),
                 grad_shift=torch.randn(K).to(device))
    return tuple(None if name in absent else grads[name] for name in ("grad_y", "grad_scale", "grad_shift"))


def check(args: dict, dtype, needs_grad=ALL_BUT_BIAS, absent=(), grad_layout=torch.contiguous_format, **kw):
    """The kernel's seven gradients against the reference's, in budget; None exactly where the reference has None;
    dtypes and layouts as the contract says (dw in the weight's strides). Returns the kernel's gradients."""
    device = args["x"].device
    y, stats = forward(tri, args)
    y_same, stats_same = forward(ref, args)
    args64 = to64(args)
    y64, stats64 = forward(ref, args64)
    grads = make_grads(y.shape, y.shape[1], dtype, device, absent, grad_layout)
    out = backward(conv_bn_bwd, grads, args, y, stats, needs_grad, **kw)
    same = backward(ref.conv_bn_train_backward, grads, args, y_same, stats_same, needs_grad)
    grads64 = tuple(None if g is None else g.cpu().double() for g in grads)
    r64 = backward(ref.conv_bn_train_backward, grads64, args64, y64, stats64, needs_grad)
    likes = [args[n] for n in ("x", "weight", "bias", "in_scale", "in_shift", "bn_weight")] + [stats[0]]
    for name, o, s, r, like, need in zip(CONV_BN_GRAD_NAMES, out, same, r64, likes, needs_grad):
        if r is None:
            assert o is None, f"{name}: expected None"
            continue
        assert need and o is not None, f"{name}: missing"
        assert o.device == device and o.dtype == like.dtype, f"{name}: {o.dtype} on {o.device}, not {like.dtype}"
        if name == "x":
            assert o.is_contiguous(memory_format=torch.channels_last), name
        elif name == "weight":
            assert o.stride() == like.stride(), f"dw strides {o.stride()} != the weight's {like.stride()}"
        else:
            assert o.is_contiguous(), name
        assert_budget(f"d_{name}", o, s, r, dtype, dot=True)
    return out


# -------------------------------------------------------------------------------------------------- against ref64
@pytest.mark.parametrize("prologue", [True, False], ids=["prologue", "no_prologue"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_fast_path(case, dtype, prologue, kernel_device):
    check(make_inputs(case, dtype, kernel_device, prologue=prologue), dtype)


def wgrad_plan(args: dict, tiles):
    geo = conv_bwd_mod.conv_geometry(args["x"], args["weight"], args["stride"], args["padding"], args["dilation"],
                                     args["groups"])
    return conv_bwd_mod._wgrad_plan(geo, tiles)


@pytest.mark.parametrize("dtype, weight_layout", [(torch.float32, "kcrs"), (torch.float16, "channels_last")],
                         ids=["fp32-kcrs", "fp16-channels_last"])
@pytest.mark.parametrize("case", list(TILED_CASES.values()), ids=list(TILED_CASES))
def test_small_tiles_split(case, dtype, weight_layout, kernel_device):
    args = make_inputs(case, dtype, kernel_device, weight_layout=weight_layout)
    plan = wgrad_plan(args, TILES)
    assert plan.split == 3 and plan.grid[0] > 2, plan  # 3 splits; k blocks x j blocks per group
    check(args, dtype, tiles=TILES)


# The conv bias's gradient on the fast path: d_bias = sum g_acc from the wgrad's programs of j tile 0, written
# directly (split 1) or through (SPLIT, K) partials summed with dw's: in one chunk (split 3), or in two levels (5
# splits in chunks of 2: 2, 2, 1; dw too).
BIAS_TILES = [pytest.param(None, 1, 1, id="split1"), pytest.param(TILES, 3, 1, id="split3"),
              pytest.param(dict(TILES, SPLIT=5, SPLIT_CHUNK=2), 5, 3, id="split5_3chunks")]


@pytest.mark.parametrize("tiles, split, chunks", BIAS_TILES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(TILED_CASES.values()), ids=list(TILED_CASES))
def test_bias_grad(case, dtype, tiles, split, chunks, kernel_device):
    args = make_inputs(case, dtype, kernel_device, bias=True)
    plan = wgrad_plan(args, tiles)
    assert (plan.split, plan.chunks) == (split, chunks) or (tiles is None and kernel_device.type != "cpu")
    out = check(args, dtype, needs_grad=ALL, tiles=tiles)
    assert out[2] is not None and out[2].dtype == args["bias"].dtype


@pytest.mark.parametrize("absent", [("grad_y",), ("grad_scale",), ("grad_shift",),
                                    ("grad_y", "grad_scale", "grad_shift")],
                         ids=["grad_y", "grad_scale", "grad_shift", "all"])
def test_absent_gradients(absent, kernel_device):
    check(make_inputs(CASES["3x3_s2_g2"], torch.float32, kernel_device), torch.float32, absent=absent)


def test_bn_weight_none(kernel_device):
    out = check(make_inputs(CASES["3x3_s2_g2"], torch.float16, kernel_device, bn_weight=False), torch.float16)
    assert out[5] is None and out[6] is not None


def test_bias_present_not_needed_stays_fast(kernel_device):
    """A conv bias whose gradient is not needed changes nothing (y includes it; g_acc does not depend on it)."""
    check(make_inputs(CASES["1x1_g1"], torch.float32, kernel_device, bias=True), torch.float32)


# The fallback (composition) cases and the fast path's subsets.
NEEDS = {
    "weight_only": ((False, True, False, False, False, False, False), False),
    "weight_in_scale": ((False, True, False, True, False, False, False), False),
    "weight_bn_bias": ((False, True, False, False, False, False, True), False),
    "x_only_fallback": ((True, False, False, False, False, False, False), False),
    "bn_only_fallback": ((False, False, False, False, False, True, True), False),
    "bias": (ALL, True),
    "weight_bias": ((False, True, True, False, False, False, False), True),
    "bias_no_weight_fallback": ((True, False, True, True, True, True, True), True),
}


@pytest.mark.parametrize("name", list(NEEDS))
def test_needs_grad_subsets(name, kernel_device):
    needs_grad, bias = NEEDS[name]
    check(make_inputs(CASES["3x3_s2_g2"], torch.float32, kernel_device, bias=bias), torch.float32,
          needs_grad=needs_grad)


def test_public_entry_matches_launcher(kernel_device):
    args = make_inputs(CASES["3x3_s2_g2"], torch.float32, kernel_device)
    y, stats = forward(tri, args)
    grads = make_grads(y.shape, y.shape[1], torch.float32, kernel_device)
    a = backward(conv_bn_train_backward, grads, args, y, stats, ALL_BUT_BIAS)
    b = backward(conv_bn_bwd, grads, args, y, stats, ALL_BUT_BIAS)
    assert all((u is None and v is None) or torch.equal(u, v) for u, v in zip(a, b))


# ------------------------------------------------------------------------------------- equal to the 4-launch path
def fast_and_composed(args: dict, dtype, needs_grad, tiles=None):
    device = args["x"].device
    with ieee_fp32():
        y, stats = forward(tri, args)
        grads = make_grads(y.shape, y.shape[1], dtype, device)
        fast = backward(conv_bn_bwd, grads, args, y, stats, needs_grad, tiles=tiles)
        composed = backward(lambda *a: composed_conv_bn_train_backward(tri, *a), grads, args, y, stats, needs_grad)
    return fast, composed


@pytest.mark.parametrize("bias", [False, True], ids=["no_bias", "bias"])
@pytest.mark.parametrize("weight_layout", ["kcrs", "channels_last"])
@pytest.mark.parametrize("case", [CASES["3x3_s2_g2"], CASES["1x1_g1"]], ids=["3x3_s2_g2", "1x1"])
def test_fp32_equals_the_composed_path(case, weight_layout, bias, kernel_device):
    """g_acc formed on load with the epilogue kernel's expression and the finalize-backward math: in fp32 the two
    launches give the composed path's four (five with d_bias) launches' results (bit for bit under the interpreter,
    but d_bias: numpy sums the wgrad's k x m tile along its contiguous axis pairwise, the epilogue's m x k tile
    row after row). The fast path reads the saved y here (RECOMPUTE_Y off: a recomputed y may differ in the last
    place; test_recomputed_y below)."""
    args = make_inputs(case, torch.float32, kernel_device, weight_layout=weight_layout, bias=bias)
    fast, composed = fast_and_composed(args, torch.float32, ALL if bias else ALL_BUT_BIAS, {"RECOMPUTE_Y": False})
    for name, f, c in zip(CONV_BN_GRAD_NAMES, fast, composed):
        assert (f is None) == (c is None), name
        if f is None:
            continue
        if kernel_device.type == "cpu" and name != "bias":
            assert torch.equal(f, c), f"{name}: max diff {(f - c).abs().max().item():.3e}"
        else:  # the compiler may contract the two paths' arithmetic differently (FMA); d_bias: summation order
            torch.testing.assert_close(f, c, rtol=1e-5, atol=1e-5, msg=name)


@pytest.mark.parametrize("tiles, split, chunks", BIAS_TILES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_bias_grad_matches_the_composed_path(dtype, tiles, split, chunks, kernel_device):
    """d_bias from the wgrad (split 1, split 3, split 5 in 3 chunks; groups 2) against the composed path's reduce
    launch: the same sum of g_acc (fp16: of g_acc rounded to fp16, as the dot consumes it, where the composed path sums
    the fp32 value)."""
    args = make_inputs(TILED_CASES["3x3_s2_g2_k40"], dtype, kernel_device, bias=True)
    fast, composed = fast_and_composed(args, dtype, ALL, tiles)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-3, atol=2e-2)
    torch.testing.assert_close(fast[2], composed[2], **tol)


def test_counters_left_at_zero_and_deterministic(kernel_device):
    """The persistent stream counters the wgrad split and the dgrad sums use are reset by their last programs: a
    second call finds them at 0 and gives the same bits."""
    from pe_kernels.triton._common import stream_counters

    args = make_inputs(TILED_CASES["3x3_g1_k40"], torch.float32, kernel_device)
    y, stats = forward(tri, args)
    grads = make_grads(y.shape, y.shape[1], torch.float32, kernel_device)
    runs = [backward(conv_bn_bwd, grads, args, y, stats, ALL_BUT_BIAS, tiles=TILES) for _ in range(2)]
    for name, a, b in zip(CONV_BN_GRAD_NAMES, *runs):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name
    assert not stream_counters(1, kernel_device).any()


def test_empty_batch_falls_back(kernel_device):
    """N = 0: no wgrad program would write d_bn_*: the composition runs, whose bn_finalize_backward rejects count 0."""
    args = make_inputs(Case(0, 8, 12, 5, 6, 1), torch.float32, kernel_device)
    y = torch.zeros(0, 12, 5, 6, device=kernel_device)
    stats = torch.zeros(2, 12, device=kernel_device)
    with pytest.raises(ValueError, match="count must be >= 1"):
        backward(conv_bn_bwd, (y, None, None), args, y, stats, ALL_BUT_BIAS)


def test_input_errors(kernel_device):
    args = make_inputs(CASES["1x1_g1"], torch.float32, kernel_device)
    y, stats = forward(tri, args)
    with pytest.raises(ValueError, match="needs_grad must have 7"):
        backward(conv_bn_bwd, (y, None, None), args, y, stats, [True] * 8)
    with pytest.raises(ValueError, match="stats must have shape"):
        backward(conv_bn_bwd, (y, None, None), args, y, stats[:, :5], ALL_BUT_BIAS)
    with pytest.raises(ValueError, match="grad_shift must be a 1-D tensor of 12"):
        backward(conv_bn_bwd, (y, None, torch.zeros(5, device=kernel_device)), args, y, stats, ALL_BUT_BIAS)


# ------------------------------------------------------------------------------------------------------ launches
# (Triton launches, ATen launches) per call; weights channels_last (a caller's cached KRSC copy: no copy in the dgrad).
LAUNCHES = {
    "fast": (ALL_BUT_BIAS, False, (), (2, 0)),
    "fast_no_grad_y": (ALL_BUT_BIAS, False, ("grad_y", "grad_scale"), (2, 0)),
    "fast_weight_only": ((False, True, False, False, False, True, True), False, (), (1, 0)),
    "fast_bias": (ALL, True, (), (2, 0)),
    "fast_weight_bias": ((False, True, True, False, False, False, False), True, (), (1, 0)),
    # the composition (weight not needed): finalize backward, epilogue, dgrad, and the d_bias reduction
    "fallback_bias_no_weight": ((True, False, True, True, True, True, True), True, (), (4, 0)),
}


@pytest.mark.parametrize("name", list(LAUNCHES))
def test_launches(name, kernel_device):
    needs_grad, bias, absent, expected = LAUNCHES[name]
    args = make_inputs(CASES["3x3_s2_g2"], torch.float16, kernel_device, bias=bias, weight_layout="channels_last")
    y, stats = forward(tri, args)
    grads = make_grads(y.shape, y.shape[1], torch.float16, kernel_device, absent)
    counted = launches_per_call(lambda: backward(tri_conv_bn_train_backward(), grads, args, y, stats, needs_grad))
    assert counted.totals() == expected, (counted.triton, counted.aten)
    if name.startswith("fast"):
        assert set(counted.triton) <= {"_conv_wgrad_kernel", "_conv_dgrad_kernel"}, counted.triton


def tri_conv_bn_train_backward():
    """The backend's public entry (the package exports it once ops/ registers the op; the module's until then)."""
    return getattr(tri, "conv_bn_train_backward", conv_bn_train_backward)


# ------------------------------------------------------------------------------------------------ sm_90 compile
_COMPILE_SCRIPT = r"""
import importlib, sys
import torch
from triton.backends.compiler import GPUTarget
from triton.runtime import jit

class CompileOnlyDriver:  # an sm_90 target that launches nothing (as tests/test_triton_compile.py)
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")

importlib.import_module("triton.runtime.driver").driver.set_active(CompileOnlyDriver())
compiled = []
run = jit.JITFunction.run
def compile_only(self, *args, grid, warmup, **kwargs):
    kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
    compiled.append((self.fn.__name__, kwargs.get("GACC_ON_LOAD"), kernel.metadata.shared))
    return kernel
jit.JITFunction.run = compile_only
sys.path.insert(0, ".")
import pe_kernels.triton.conv_bwd as conv_bwd
all_configs = {"on": True}
def launch(kernel, tuned, grid, args, meta, tiles):
    for cfg in tuned.configs if all_configs["on"] else tuned.configs[:1]:
        kernel[grid](*args, **meta, **cfg.kwargs, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
conv_bwd.launch = launch
for dtype in (torch.float16, torch.bfloat16, torch.float32):
    all_configs["on"] = dtype == torch.float16
    # a 3x3 and a 1x1 / stride 2 with a bias (the dgrad reads the g_acc the wgrad stored), a 1x1 recomputing y
    # (the dgrad forms g_acc on load)
    for C, K, g, R, stride, pad, prologue in ((64, 64, 8, 3, 1, 1, True), (256, 128, 4, 1, 2, 0, False),
                                              (64, 128, 2, 1, 1, 0, True)):
        x = torch.randn(2, C, 9, 9).to(dtype).contiguous(memory_format=torch.channels_last)
        w = torch.randn(K, C // g, R, R).to(dtype).contiguous(memory_format=torch.channels_last)
        P = (9 + 2 * pad - R) // stride + 1
        y = torch.randn(2, K, P, P).to(dtype).contiguous(memory_format=torch.channels_last)
        pro = (torch.randn(C), torch.randn(C), True) if prologue else (None, None, False)
        bias = None if prologue else torch.randn(K)   # the second shape with the conv bias's gradient (BIAS_GRAD)
        conv_bwd.conv_bn_bwd(torch.randn(y.shape).to(dtype), torch.randn(K), torch.randn(K), x, w, bias, *pro,
                             (stride, stride), (pad, pad), (1, 1), g, y, torch.rand(2, K), torch.rand(K), 1e-5,
                             [True, True, bias is not None, True, True, True, True])
names = sorted({(n, bool(f)) for n, f, _ in compiled})
print("compiled:", names, "max shared bytes:", max(s for _, _, s in compiled))
"""


@pytest.mark.slow
def test_fast_path_kernels_compile_for_sm90():
    """The GACC_ON_LOAD wgrad and the dgrad (reading the g_acc the wgrad stored, or forming it on load where it
    recomputes y) through the real Triton -> PTX -> cubin pipeline for sm_90 (the interpreter never sees what the
    compiler rejects), within the H100's shared memory; only these two kernels compiled."""
    import os
    import subprocess
    import sys

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the tests above compile and run the kernels for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=900, cwd=repo)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    line = next(s for s in proc.stdout.splitlines() if s.startswith("compiled:"))
    assert ("[('_conv_dgrad_kernel', False), ('_conv_dgrad_kernel', True), ('_conv_wgrad_kernel', True)]"
            in line), line
    assert int(line.rsplit(" ", 1)[1]) <= 227 * 1024, line


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", ["1x1_g1", "1x1_s2_g2", "1x1_c40_small_tiles"])
def test_recomputed_y(case, dtype, kernel_device):
    """A 1x1 conv without padding or bias: the wgrad and the dgrad recompute y = W x' from the x' they read
    (RECOMPUTE_Y: no read of y) — a y of NaN changes nothing — and the gradients are the saved-y path's to the
    rounding of y (fp32: to 1e-5; fp16: within the reference budget, `check`). With 16-wide tiles and 40 channels a
    group, y is summed over three channel steps in both kernels, in several column / j tiles."""
    cases = dict(CASES, **{"1x1_s2_g2": Case(2, 8, 12, 7, 6, 1, stride=2, groups=2),
                           "1x1_c40_small_tiles": Case(2, 40, 24, 5, 6, 1)})
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2) if case.endswith("small_tiles") else None
    args = make_inputs(cases[case], dtype, kernel_device)
    with ieee_fp32():
        y, stats = forward(tri, args)
        plan = conv_bwd_mod._plan_conv_bn_bwd(*make_grads(y.shape, y.shape[1], dtype, kernel_device), args["x"],
                                              args["weight"], None, args["in_scale"], args["in_shift"], True,
                                              args["stride"], args["padding"], args["dilation"], args["groups"], y,
                                              stats, args["bn_weight"], EPS, ALL_BUT_BIAS, tiles)
        assert plan.wgrad.meta["RECOMPUTE_Y"] and plan.dgrad.meta["RECOMPUTE_Y"]
        grads = make_grads(y.shape, y.shape[1], dtype, kernel_device)
        saved = backward(conv_bn_bwd, grads, args, y, stats, ALL_BUT_BIAS, tiles=dict(tiles or {}, RECOMPUTE_Y=False))
        nan_y = torch.full_like(y, float("nan"))
        recomputed = backward(conv_bn_bwd, grads, args, nan_y, stats, ALL_BUT_BIAS, tiles=tiles)
    for name, r, v in zip(CONV_BN_GRAD_NAMES, recomputed, saved):
        assert (r is None) == (v is None), name
        if r is not None:
            assert torch.isfinite(r).all(), name
            tol = 1e-5 if dtype == torch.float32 else 2e-2
            torch.testing.assert_close(r.float(), v.float(), rtol=tol, atol=tol * max(1.0, v.abs().max().item()),
                                       msg=name)
    check(args, dtype)  # and the recomputing path against the float64 reference
