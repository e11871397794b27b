"""pe_kernels.triton conv_fused / conv_fused_backward against the float64 reference.

Error budget (DESIGN.md, tests/_oracle.py): |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol,
elementwise, where ref64 is pe_kernels.reference on float64 CPU copies and torch_same_dtype the reference in the
test dtype on the kernel device; atol is relative to the magnitude of ref64. The kernels run on `kernel_device`:
CUDA on a GPU machine, CPU under TRITON_INTERPRET=1 elsewhere (conftest.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses

import pytest
import torch
import triton
import triton.language as tl
from hypothesis import given, settings, strategies as st

import pe_kernels.reference as ref
import pe_kernels.triton as tri
from pe_kernels.triton._common import CHUNK_SLOTS, chunk_counters, krsc, slot_chunks
from pe_kernels.triton.conv_bwd import _phase_taps, conv_bwd
from pe_kernels.triton.conv_fwd import conv_fwd, forward_tiles

from _devices import kernel_device, to_device
from _oracle import assert_budget

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),  # runs on CPU: bf16 dot operands are upcast under the interpreter
]


@dataclasses.dataclass(frozen=True)
class Case:
    N: int
    C: int
    K: int
    H: int
    W: int
    R: int
    S: int
    stride: tuple = (1, 1)
    padding: tuple = (0, 0)
    dilation: tuple = (1, 1)
    groups: int = 1


CASES = {
    "1x1_g1": Case(2, 16, 16, 8, 8, 1, 1),
    "3x3_pad1_g2_odd": Case(2, 6, 10, 7, 5, 3, 3, padding=(1, 1), groups=2),            # 3 in, 5 out per group
    "3x3_s2_pad1_g4_batch1": Case(1, 12, 20, 8, 7, 3, 3, stride=(2, 2), padding=(1, 1), groups=4),
    "3x3_dil2_g8_odd": Case(2, 24, 24, 8, 8, 3, 3, padding=(2, 2), dilation=(2, 2), groups=8),  # 3 per group
    "1x1_s2_odd_batch1": Case(1, 9, 7, 7, 7, 1, 1, stride=(2, 2)),
    "1x3_s21_pad01": Case(2, 8, 12, 5, 6, 1, 3, stride=(2, 1), padding=(0, 1), groups=2),
    # dgrad stride phases with dilation: along h, stride 3 and dilation 2 (live taps every 3rd, p steps of 2); along
    # w, stride 2, dilation 2 and padding 1 (gcd 2: every tap live on odd phases, none on even ones)
    "3x3_s32_dil2_pad21": Case(1, 8, 8, 11, 10, 3, 3, stride=(3, 2), padding=(2, 1), dilation=(2, 2), groups=2),
}
LAYOUTS = ["channels_last", "nchw", "sliced"]


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values as `t` in the requested memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return t.contiguous()
    # sliced: a non-contiguous view (every other column of a tensor twice as wide)
    big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype, device=t.device)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def make_inputs(case: Case, dtype, layout="channels_last", features="full", device=None):
    """x, weight and the optional per-channel/residual inputs on `device` (default: the kernel device); vectors
    fp32 as the contract says. Drawn on CPU, so both machines test the same values."""
    device = kernel_device() if device is None else device
    P = (case.H + 2 * case.padding[0] - case.dilation[0] * (case.R - 1) - 1) // case.stride[0] + 1
    Q = (case.W + 2 * case.padding[1] - case.dilation[1] * (case.S - 1) - 1) // case.stride[1] + 1
    x = make_layout(torch.randn(case.N, case.C, case.H, case.W).to(device, dtype), layout)
    w = (torch.randn(case.K, case.C // case.groups, case.R, case.S) / (case.C // case.groups * case.R * case.S)
         ** 0.5).to(device, dtype)
    full = features == "full"
    vectors = dict(
        bias=torch.randn(case.K) if full else None,
        in_scale=torch.rand(case.C) + 0.5 if full else None,
        in_shift=torch.randn(case.C) * 0.5 if full else None,
        out_scale=torch.rand(case.K) + 0.5 if full else None,
        out_shift=torch.randn(case.K) if full else None,
    )
    residual = make_layout(torch.randn(case.N, case.K, P, Q).to(device, dtype), layout) if full else None
    return dict(x=x, weight=w, **to_device(vectors, device), in_relu=full, residual=residual, out_relu=full,
                stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups)


def to64(args):
    """Float64 CPU copies: the reference's inputs."""
    return {k: (v.detach().cpu().double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def run_fwd(fn, args, compute_stats=True, **kw):
    a = args
    return fn(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["out_scale"],
              a["out_shift"], a["residual"], a["out_relu"], a["stride"], a["padding"], a["dilation"], a["groups"],
              compute_stats, **kw)


def run_bwd(fn, grad_y, grad_stats, args, y, needs_grad, stats=None, **kw):
    """`stats`: the forward's [mean, m2] (needed with grad_stats)."""
    a = args
    return fn(grad_y, grad_stats, a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"],
              a["out_scale"], a["out_shift"], a["residual"], a["out_relu"], a["stride"], a["padding"],
              a["dilation"], a["groups"], y, needs_grad, stats, **kw)


def check_forward(args, dtype, compute_stats=True, **kw):
    y, stats = run_fwd(conv_fwd, args, compute_stats, **kw)
    y_same, stats_same = run_fwd(ref.conv_fused, args, compute_stats)
    y64, stats64 = run_fwd(ref.conv_fused, to64(args), compute_stats)
    assert y.device == args["x"].device and y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_budget("y", y, y_same, y64, dtype, dot=True)
    if compute_stats:
        assert stats.dtype == torch.float32 and stats.shape == (2, args["weight"].shape[0])
        assert_budget("stats[0]", stats[0], stats_same[0], stats64[0], dtype, dot=True)
        assert_budget("stats[1]", stats[1], stats_same[1], stats64[1], dtype, dot=True, square=True)
    else:
        assert stats.numel() == 0
    return y64


def check_backward(args, dtype, grad_stats=True, needs_grad=(True,) * 8, grad_layout="nchw", **kw):
    device = args["x"].device
    y64, stats64 = run_fwd(ref.conv_fused, to64(args), True)
    # Each backward gets its own forward's statistics, as the contract says (the forward's are tested above):
    # they are those of acc rounded to the dtype, and the backward's acc - mean rounds the same acc. The kernel's
    # acc (fp32 accumulation, one rounding) and the reference's (an fp16/bf16 conv, rounded, plus the bias, rounded
    # again) round differently, so the reference's mean against the kernel's recomputed acc (full features: an
    # epilogue) left sum(acc_s - mean) = n * (their means' difference) in d_bias (bf16: 0.1).
    _, stats_same = run_fwd(ref.conv_fused, args, True)
    fwd_kw = dict(kw, tiles=forward_tiles(kw["tiles"])) if "tiles" in kw else kw   # (SPLIT etc.: the backward's)
    _, stats_own = run_fwd(conv_fwd, args, True, **fwd_kw)
    # The ReLU mask comes from y; give the kernel the float64 forward rounded to the dtype, so that a sign flip
    # of a value within rounding of zero cannot make the kernel and the oracle disagree about the mask.
    y = y64.to(dtype).to(device)
    grad_y = make_layout(torch.randn(y.shape).to(device, dtype), grad_layout)
    gs = torch.randn(2, args["weight"].shape[0]) * 0.1 if grad_stats else None
    out = run_bwd(conv_bwd, grad_y, to_device(gs, device), args, y, list(needs_grad), stats_own, **kw)
    same = run_bwd(ref.conv_fused_backward, grad_y, to_device(gs, device), args, y, list(needs_grad), stats_same)
    r64 = run_bwd(ref.conv_fused_backward, grad_y.cpu().double(), None if gs is None else gs.double(), to64(args),
                  y64, list(needs_grad), stats64)
    inputs = [args[n] for n in ref.CONV_GRAD_NAMES]
    for name, o, s, r, t, need in zip(ref.CONV_GRAD_NAMES, out, same, r64, inputs, needs_grad):
        if t is None or not need:
            assert o is None, f"{name}: expected None"
            continue
        assert o.dtype == t.dtype and o.device == device, f"{name}: {o.dtype} on {o.device}, not {t.dtype}"
        if name in ("x", "residual"):
            assert o.is_contiguous(memory_format=torch.channels_last), name
        else:
            assert o.is_contiguous(), name
        assert_budget(f"d_{name}", o, s, r, dtype, dot=True)


# ------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_full(case, layout, dtype, kernel_device):
    check_forward(make_inputs(case, dtype, layout, "full", kernel_device), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_plain(case, dtype, kernel_device):
    check_forward(make_inputs(case, dtype, "nchw", "plain", kernel_device), dtype, compute_stats=False)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("flags", ["in_scale", "in_shift", "in_relu", "bias", "out_scale", "out_shift",
                                   "residual", "out_relu"])
def test_forward_single_feature(flags, dtype, kernel_device):
    """Each prologue/epilogue input alone (the others absent), with statistics."""
    case = CASES["3x3_pad1_g2_odd"]
    full = make_inputs(case, dtype, "channels_last", "full", kernel_device)
    args = make_inputs(case, dtype, "channels_last", "plain", kernel_device)
    args[flags] = full[flags]
    check_forward(args, dtype)


def test_forward_padding_stays_zero(kernel_device):
    """in_shift > 0 would make padded pixels positive if the prologue touched them."""
    case = CASES["3x3_pad1_g2_odd"]
    args = make_inputs(case, torch.float32, "channels_last", "plain", kernel_device)
    args["in_shift"] = torch.full((case.C,), 5.0, device=kernel_device)
    args["in_relu"] = True
    check_forward(args, torch.float32)


def test_forward_public_api_matches_launcher(kernel_device):
    args = make_inputs(CASES["3x3_dil2_g8_odd"], torch.float32, device=kernel_device)
    y1, s1 = run_fwd(tri.conv_fused, args, True)
    y2, s2 = run_fwd(conv_fwd, args, True)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def test_forward_deterministic_stats(kernel_device):
    args = make_inputs(CASES["3x3_s2_pad1_g4_batch1"], torch.float32, device=kernel_device)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    runs = [run_fwd(conv_fwd, args, True, tiles=small) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_forward_refuses_backward_tiles(kernel_device):
    """A tile override the forward does not take (a backward's SPLIT) is a ValueError naming it on every device (a GPU
    launch raised Triton's KeyError, the interpreter ignored it); forward_tiles keeps a backward's forward part."""
    args = make_inputs(CASES["3x3_pad1_g2_odd"], torch.float32, device=kernel_device)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3, TRANS_ACC=True)
    with pytest.raises(ValueError, match=r"\['SPLIT', 'TRANS_ACC'\] are not the forward's"):
        run_fwd(conv_fwd, args, True, tiles=tiles)
    assert forward_tiles(tiles) == dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16) and forward_tiles(None) is None
    y, _ = run_fwd(conv_fwd, args, True, tiles=forward_tiles(tiles))
    assert torch.equal(y, run_fwd(conv_fwd, args, True, tiles=dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16))[0])


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("case", [CASES["3x3_pad1_g2_odd"], CASES["3x3_dil2_g8_odd"],
                                  Case(2, 12, 20, 9, 7, 3, 3, stride=(2, 2), padding=(1, 1), groups=4)],
                         ids=["g2", "g8", "s2"])
def test_small_tiles(case, dtype, kernel_device):
    """16x16x16 tiles: several M tiles, a partial last tile, masked channel and reduction columns, split wgrad; with
    stride 2, several tiles per dgrad stride phase (40 rows in the largest) and phases of unequal size (odd H, W)."""
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)
    args = make_inputs(case, dtype, "sliced", "full", kernel_device)
    check_forward(args, dtype, tiles=forward_tiles(tiles))
    check_backward(args, dtype, tiles=tiles)


# ------------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_backward_full(case, dtype, kernel_device):
    check_backward(make_inputs(case, dtype, "channels_last", "full", kernel_device), dtype)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
@pytest.mark.parametrize("case", [CASES["1x1_g1"], CASES["3x3_s2_pad1_g4_batch1"]], ids=["1x1", "3x3_s2"])
def test_backward_layouts(case, layout, kernel_device):
    check_backward(make_inputs(case, torch.float32, layout, "full", kernel_device), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_backward_plain_no_grad_stats(dtype, kernel_device):
    """No prologue/epilogue, no grad_stats: only x and weight gradients."""
    args = make_inputs(CASES["3x3_pad1_g2_odd"], dtype, "nchw", "plain", kernel_device)
    check_backward(args, dtype, grad_stats=False)


@pytest.mark.parametrize("needs_grad", [
    (True, False, False, False, False, False, False, False),
    (False, True, False, False, False, False, False, False),
    (False, False, True, True, False, False, True, False),
    (False, False, False, False, True, True, False, True),
], ids=["x", "weight", "bias_in_scale_out_shift", "in_shift_out_scale_residual"])
def test_backward_needs_grad_subsets(needs_grad, kernel_device):
    args = make_inputs(CASES["3x3_s2_pad1_g4_batch1"], torch.float32, "channels_last", "full", kernel_device)
    check_backward(args, torch.float32, needs_grad=needs_grad)


def test_backward_without_relu_or_grad_stats(kernel_device):
    args = make_inputs(CASES["3x3_dil2_g8_odd"], torch.float32, "channels_last", "full", kernel_device)
    args["in_relu"] = args["out_relu"] = False
    check_backward(args, torch.float32, grad_stats=False)


def test_empty_batch(kernel_device):
    args = make_inputs(Case(0, 6, 10, 5, 5, 3, 3, padding=(1, 1), groups=2), torch.float32, device=kernel_device)
    y, stats = run_fwd(tri.conv_fused, args, True)
    assert y.shape == (0, 10, 5, 5) and torch.equal(stats, torch.zeros(2, 10, device=kernel_device))
    grad_stats = torch.ones(2, 10, device=kernel_device)
    grads = run_bwd(tri.conv_fused_backward, torch.zeros_like(y), grad_stats, args, y, [True] * 8, stats)
    expected = run_bwd(ref.conv_fused_backward, torch.zeros_like(y), grad_stats, args, y, [True] * 8, stats)
    for name, g, e in zip(ref.CONV_GRAD_NAMES, grads, expected):
        assert g.shape == e.shape and g.device == y.device and torch.equal(g, torch.zeros_like(g)), name


def test_backward_nothing_needed(kernel_device):
    args = make_inputs(CASES["1x1_g1"], torch.float32, device=kernel_device)
    y, _ = run_fwd(conv_fwd, args, False)
    assert run_bwd(tri.conv_fused_backward, torch.ones_like(y), None, args, y, [False] * 8) == [None] * 8


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), c_g=st.integers(1, 5), k_g=st.integers(1, 6),
    h=st.integers(3, 7), w=st.integers(3, 7), r=st.sampled_from([1, 2, 3]), s=st.sampled_from([1, 3]),
    stride=st.integers(1, 2), pad=st.integers(0, 1), dil=st.integers(1, 2),
)
def test_property_shapes(kernel_device, n, groups, c_g, k_g, h, w, r, s, stride, pad, dil):
    case = Case(n, c_g * groups, k_g * groups, h, w, r, s, (stride, stride), (pad, pad), (dil, dil), groups)
    if (h + 2 * pad - dil * (r - 1) - 1) < 0 or (w + 2 * pad - dil * (s - 1) - 1) < 0:
        return  # empty output
    torch.manual_seed(n * 1000 + h * 10 + w)
    args = make_inputs(case, torch.float32, "channels_last", "full", kernel_device)
    check_forward(args, torch.float32)
    check_backward(args, torch.float32)


# ------------------------------------------------------------------------------------------- input errors
def _base_args(device):
    return make_inputs(CASES["1x1_g1"], torch.float32, "channels_last", "plain", device)


def test_error_rank(kernel_device):
    args = _base_args(kernel_device)
    args["x"] = args["x"][0]
    with pytest.raises(ValueError, match="x must be 4-D"):
        run_fwd(tri.conv_fused, args)


def test_error_groups_divisibility(kernel_device):
    args = make_inputs(Case(1, 9, 6, 4, 4, 1, 1), torch.float32, "nchw", "plain", kernel_device)
    args["groups"] = 2
    with pytest.raises(ValueError, match="in_channels=9 .* groups=2"):
        run_fwd(tri.conv_fused, args)


def test_error_weight_channels(kernel_device):
    args = _base_args(kernel_device)
    args["weight"] = torch.randn(16, 8, 1, 1, device=kernel_device)
    with pytest.raises(ValueError, match="8 input channels per group"):
        run_fwd(tri.conv_fused, args)


def test_error_dtypes(kernel_device):
    args = to_device(to64(_base_args(kernel_device)), kernel_device)
    with pytest.raises(TypeError, match="float64"):
        run_fwd(tri.conv_fused, args)
    args = _base_args(kernel_device)
    args["weight"] = args["weight"].half()
    with pytest.raises(TypeError, match="weight dtype"):
        run_fwd(tri.conv_fused, args)


def test_error_devices_and_shapes(kernel_device):
    args = _base_args(kernel_device)
    args["bias"] = torch.zeros(16, device="meta")
    with pytest.raises(ValueError, match="bias is on meta"):
        run_fwd(tri.conv_fused, args)
    args = _base_args(kernel_device)
    args["out_scale"] = torch.ones(15, device=kernel_device)
    with pytest.raises(ValueError, match="out_scale must be a 1-D tensor of 16"):
        run_fwd(tri.conv_fused, args)
    args = _base_args(kernel_device)
    args["residual"] = torch.zeros(2, 16, 4, 4, device=kernel_device)
    with pytest.raises(ValueError, match="residual must have shape"):
        run_fwd(tri.conv_fused, args)
    args = _base_args(kernel_device)
    args["stride"] = (0, 1)
    with pytest.raises(ValueError, match="stride"):
        run_fwd(tri.conv_fused, args)


def test_error_backward_needs_grad_length(kernel_device):
    args = _base_args(kernel_device)
    y, _ = run_fwd(conv_fwd, args, False)
    with pytest.raises(ValueError, match="needs_grad must have 8"):
        run_bwd(tri.conv_fused_backward, y, None, args, y, [True] * 7)


# --------------------------------------------------------------------------------------------- launches
# ATen ops that launch no GPU kernel: allocations, views and metadata. `to`, `_to_copy`, `contiguous` and `clone` are
# listed too: when they copy, the copy_ they call is counted instead.
NO_LAUNCH_OPS = frozenset({
    "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided", "view", "_unsafe_view", "view_as",
    "as_strided", "select", "slice", "narrow", "detach", "detach_", "alias", "expand", "expand_as", "unsqueeze",
    "squeeze",
    "permute", "transpose", "t", "reshape", "_reshape_alias", "unbind", "split", "chunk", "lift_fresh", "resize_",
    "size", "sym_size", "stride", "sym_stride", "numel", "sym_numel", "dim", "result_type", "is_nonzero", "to",
    "_to_copy", "contiguous", "clone", "set_", "item", "_local_scalar_dense",
})
_TRITON_LAUNCH = "pe_kernels.test::triton_launch"


@dataclasses.dataclass
class Launches:
    """What a block launched: Triton kernels and kernel-launching ATen ops, by name."""
    triton: collections.Counter = dataclasses.field(default_factory=collections.Counter)
    aten: collections.Counter = dataclasses.field(default_factory=collections.Counter)

    def totals(self) -> tuple[int, int]:
        return sum(self.triton.values()), sum(self.aten.values())


@contextlib.contextmanager
def count_launches():
    """Count the launches of the block (TOOLCHAIN.md, "Launch counting on CPU"): every Triton launch (JITFunction.run
    on a GPU, InterpretedFunction.run under the interpreter) and every ATen op that would launch a GPU kernel, from
    torch.profiler: the innermost ATen ops outside NO_LAUNCH_OPS (an op whose launching work is done by a child,
    such as clone's copy_ or zeros' fill_, counts once, through the child). ATen work the interpreter does inside a
    Triton launch is not counted. Deterministic: fine to assert on."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from triton.runtime.interpreter import InterpretedFunction
    from triton.runtime.jit import JITFunction

    result = Launches()
    saved = [(cls, cls.run) for cls in (InterpretedFunction, JITFunction)]

    def counted(original):
        def run(self, *args, **kwargs):
            result.triton[self.fn.__name__] += 1
            with record_function(_TRITON_LAUNCH):
                return original(self, *args, **kwargs)
        return run

    for cls, original in saved:
        cls.run = counted(original)
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            yield result
    finally:
        for cls, original in saved:
            cls.run = original

    def launches(event) -> bool:
        return event.name.startswith("aten::") and event.name[len("aten::"):] not in NO_LAUNCH_OPS

    def launching_descendant(event) -> bool:
        return any(launches(child) or launching_descendant(child) for child in event.cpu_children)

    def in_triton(event) -> bool:
        while event is not None:
            if event.name == _TRITON_LAUNCH:
                return True
            event = event.cpu_parent
        return False

    for event in prof.events():
        if launches(event) and not launching_descendant(event) and not in_triton(event):
            result.aten[event.name[len("aten::"):]] += 1


def launches_per_call(fn) -> Launches:
    """The launches of one call of `fn`, after a first call (which may make the cached dummy / identity vectors)."""
    fn()
    with count_launches() as counted:
        fn()
    return counted


def krsc_inputs(args: dict) -> dict:
    """`args` with the weight in KRSC (channels_last) memory order, as a caller's cached copy gives it."""
    return dict(args, weight=args["weight"].contiguous(memory_format=torch.channels_last))


def test_krsc_keeps_a_channels_last_weight():
    """A weight already channels_last-contiguous is used as it is (no copy: no launch); a KCRS 3x3 one is copied."""
    w = torch.randn(8, 3, 3, 3)
    w_cl = w.contiguous(memory_format=torch.channels_last)
    assert krsc(w_cl)[0] is w_cl
    copied, strides = krsc(w)
    assert copied.data_ptr() != w.data_ptr() and torch.equal(copied, w) and copied.stride() == strides
    w1 = torch.randn(8, 3, 1, 1)
    assert krsc(w1)[0] is w1


# The train-mode conv (prologue = the previous BN, statistics, no epilogue, no bias) and the eval-mode one (BN folded
# into the epilogue, bias, residual); weights KRSC as cached by the caller. Expected (Triton launches, ATen launches):
# one launch with statistics too (merged in the kernel by each column block's last program, on persistent counters).
FORWARD_LAUNCHES = {
    "plain": ("plain", {}, False, (1, 0)),
    "stats": ("plain", {}, True, (1, 0)),
    "prologue_stats": ("plain", {"in_scale", "in_shift", "in_relu"}, True, (1, 0)),
    "prologue_relu_only_stats": ("plain", {"in_relu"}, True, (1, 0)),       # absent scale/shift: cached identities
    "epilogue": ("full", set(), False, (1, 0)),
    "epilogue_stats": ("full", set(), True, (1, 0)),
}


@pytest.mark.parametrize("name", list(FORWARD_LAUNCHES))
def test_forward_launches(name, kernel_device):
    features, extra, compute_stats, expected = FORWARD_LAUNCHES[name]
    case = CASES["3x3_pad1_g2_odd"]
    args = krsc_inputs(make_inputs(case, torch.float16, "channels_last", features, kernel_device))
    full = make_inputs(case, torch.float16, "channels_last", "full", kernel_device)
    args.update({k: full[k] for k in extra})
    counted = launches_per_call(lambda: run_fwd(tri.conv_fused, args, compute_stats))
    assert counted.totals() == expected, (counted.triton, counted.aten)


# needs_grad over CONV_GRAD_NAMES (x, weight, bias, in_scale, in_shift, out_scale, out_shift, residual)
ALL, X, W = (True,) * 8, (True,) + (False,) * 7, (False, True) + (False,) * 6
BACKWARD_LAUNCHES = {
    # train mode: epilogue backward, wgrad, dgrad (the split and prologue sums reduced inside them)
    "train": ("train", True, ALL, {}, (3, 0)),
    "train_split": ("train", True, ALL, {"SPLIT": 3}, (3, 0)),
    "train_x": ("train", True, X, {}, (2, 0)),
    "train_weight": ("train", True, W, {}, (2, 0)),
    "plain_no_grad_stats": ("plain", False, ALL, {}, (3, 0)),
    # an epilogue: + the forward recomputed (fp32 acc) + one launch for d_bias, d_out_scale, d_out_shift
    "full": ("full", True, ALL, {}, (5, 0)),
    "full_bias_in_scale_out_shift": ("full", True, (False, False, True, True, False, False, True, False), {}, (4, 0)),
    "full_residual_only": ("full", True, (False,) * 7 + (True,), {}, (2, 0)),
}


@pytest.mark.parametrize("name", list(BACKWARD_LAUNCHES))
def test_backward_launches(name, kernel_device):
    features, with_grad_stats, needs_grad, tiles, expected = BACKWARD_LAUNCHES[name]
    case = CASES["3x3_pad1_g2_odd"]
    args = make_inputs(case, torch.float16, "channels_last", "plain" if features == "plain" else "full",
                       kernel_device)
    if features == "train":
        args.update(bias=None, out_scale=None, out_shift=None, residual=None, out_relu=False)
    args = krsc_inputs(args)
    y, stats = run_fwd(conv_fwd, args, True)
    grad_y = torch.randn(y.shape).to(kernel_device, y.dtype)
    grad_stats = (torch.randn(2, case.K) * 0.1).to(kernel_device) if with_grad_stats else None
    counted = launches_per_call(lambda: run_bwd(conv_bwd, grad_y, grad_stats, args, y, list(needs_grad), stats,
                                                tiles=tiles or None))
    assert counted.totals() == expected, (counted.triton, counted.aten)


def test_backward_split_reduction_is_deterministic(kernel_device):
    """The wgrad's split partials and the dgrad's prologue sums, summed by whichever program arrives last, in a
    fixed order: the same bits on every run."""
    args = make_inputs(CASES["3x3_pad1_g2_odd"], torch.float32, "channels_last", "full", kernel_device)
    args.update(bias=None, out_scale=None, out_shift=None, residual=None, out_relu=False)
    y, stats = run_fwd(conv_fwd, args, True)
    grad_y = torch.randn(y.shape).to(kernel_device)
    grad_stats = (torch.randn(2, y.shape[1]) * 0.1).to(kernel_device)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=4)
    runs = [run_bwd(conv_bwd, grad_y, grad_stats, args, y, [True] * 8, stats, tiles=tiles) for _ in range(2)]
    for name, a, b in zip(ref.CONV_GRAD_NAMES, *runs):
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b)), name


def test_reduction_counters_are_reset(kernel_device):
    """The last program of each tile resets its counter: a second launch on the same counters (an autotune trial, a
    CUDA graph replay) reduces again and gives the same result."""
    from pe_kernels.triton import conv_bwd as conv_bwd_mod
    from pe_kernels.triton.conv_fwd import conv_geometry

    case = CASES["3x3_pad1_g2_odd"]
    args = make_inputs(case, torch.float32, "channels_last", "full", kernel_device)
    geo = conv_geometry(args["x"], args["weight"], case.stride, case.padding, case.dilation, case.groups)
    g_acc = torch.randn(geo.N, geo.K, geo.P, geo.Q).to(kernel_device).contiguous(memory_format=torch.channels_last)
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=4)
    plan = conv_bwd_mod._wgrad_plan(geo, tiles)
    meta = conv_bwd_mod._dgrad_meta(geo, tiles)
    assert plan.split > 1 and plan.counters > 0
    sems = torch.zeros(64, dtype=torch.int32, device=kernel_device)
    prologue = (args["in_scale"], args["in_shift"], True)
    dws = [conv_bwd_mod._wgrad(g_acc, args["x"], args["weight"], *prologue, geo, plan, sems) for _ in range(2)]
    assert torch.equal(dws[0], dws[1]) and not sems.any()
    sums = [conv_bwd_mod._dgrad(g_acc, args["weight"], args["x"], *prologue, geo, True, True, meta, sems, tiles)[1]
            for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(*sums)) and not sems.any()


# ---------------------------------------------------------------------------------------- in-kernel statistics merge
# Many slots (PART_M = BLOCK_M = 16: more slots than one merge step of MERGE_SLOTS, a masked tail), several column
# blocks per group (BLOCK_N = 16), channel counts that are not multiples of 16 (on a GPU the conv's merge and
# merge_stats then get the same register layout, so the same order of sums: sm_90 TTGIR checked offline).
MERGE_CASES = {
    "1x1_k37_3_col_blocks_37_slots": (Case(2, 8, 37, 17, 17, 1, 1), torch.float32),
    "3x3_g2_k_g_21_2x2_col_blocks": (Case(2, 6, 42, 9, 9, 3, 3, padding=(1, 1), groups=2), torch.float16),
    "3x3_s2_g4_one_slot": (CASES["3x3_s2_pad1_g4_batch1"], torch.float32),         # 4 column blocks
}
MERGE_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)


def merge_partials(case: Case, dtype, device, features="plain", tiles=MERGE_TILES, seed=0):
    """(stats, partials) of one conv_fwd launch, the partials the kernel merged captured in a buffer of the test's."""
    torch.manual_seed(seed)
    args = make_inputs(case, dtype, "channels_last", features, device)
    P = (case.H + 2 * case.padding[0] - case.dilation[0] * (case.R - 1) - 1) // case.stride[0] + 1
    Q = (case.W + 2 * case.padding[1] - case.dilation[1] * (case.S - 1) - 1) // case.stride[1] + 1
    slots = -(-case.N * P * Q // tiles["BLOCK_M"])
    # every slot must be written; the chunks' level-2 slots follow (written where there are several chunks)
    part = torch.full((slots + slot_chunks(slots), 3, case.K), float("nan"), device=device)
    _, stats = run_fwd(conv_fwd, args, True, tiles=tiles, partials=part)
    part, level2 = part[:slots], part[slots:]
    assert not part.isnan().any() and torch.equal(part[:, 0].sum(0), torch.full_like(stats[0], case.N * P * Q))
    if slot_chunks(slots) > 1:   # each chunk's count: its rows
        counts = part.new_zeros(slot_chunks(slots), case.K)
        for c in range(slot_chunks(slots)):
            counts[c] = part[c * CHUNK_SLOTS:(c + 1) * CHUNK_SLOTS, 0].sum(0)
        assert torch.equal(level2[:, 0], counts)
    return stats, part


@pytest.mark.parametrize("name", list(MERGE_CASES))
def test_stats_merged_in_kernel_equal_the_separate_merge(name, kernel_device):
    """The kernel merges the slots in two levels as merge_stats(chunk=CHUNK_SLOTS) does in its two launches, bit for
    bit: the same chunks in slot order, the chunks in chunk order, the same k-way Chan steps (MERGE_SLOTS slots each;
    on a GPU the same tile and warps). Under the interpreter (chunks of 4 slots) two of the cases have several
    chunks, one has one; on a GPU (chunks of 64) each has one."""
    from pe_kernels.triton.conv_fwd import MERGE_SLOTS, merge_stats

    case, dtype = MERGE_CASES[name]
    stats, part = merge_partials(case, dtype, kernel_device)
    expected = merge_stats(part, block_s=MERGE_SLOTS, block_k=MERGE_TILES["BLOCK_N"], num_warps=4, chunk=CHUNK_SLOTS)
    assert torch.equal(stats, expected)
    # the same statistics as the one-level merge of the same partials, to rounding
    flat = merge_stats(part, block_s=MERGE_SLOTS, block_k=MERGE_TILES["BLOCK_N"], num_warps=4)
    torch.testing.assert_close(stats, flat, rtol=1e-5, atol=1e-5)


def test_stats_counters_are_reused_and_left_at_zero(kernel_device, monkeypatch):
    """The counters come from one persistent buffer per (device, stream): no launch to make or zero them after the
    first call, reset to 0 by the last programs (a second launch, an autotune trial, finds them ready), grown when a
    launch has more column blocks; repeated calls give the same bits. While a CUDA graph captures, a fresh zeroed buffer
    per launch, never cached."""
    from pe_kernels.triton import _common, conv_fwd as conv_fwd_mod

    used = []

    def spy(n, device):
        buf = _common.stream_counters(n, device)
        used.append((n, buf))
        return buf

    monkeypatch.setattr(conv_fwd_mod, "stream_counters", spy)
    small, _ = MERGE_CASES["3x3_s2_g4_one_slot"]
    wide, _ = MERGE_CASES["1x1_k37_3_col_blocks_37_slots"]
    runs = [merge_partials(small, torch.float32, kernel_device)[0] for _ in range(3)]
    assert all(torch.equal(runs[0], r) for r in runs[1:])
    # chunk_counters: 4 column blocks, the spare, one chunk (one slot) per column block
    assert [n for n, _ in used] == [chunk_counters(4, slot_chunks(1))] * 3
    assert len({buf.data_ptr() for _, buf in used}) == 1
    assert not used[0][1].any()
    # 3 column blocks and the chunks of 37 slots here; a buffer grown for a wider launch is used from then on
    big = _common.stream_counters(1024, kernel_device)
    assert big.numel() >= 1024 and big.data_ptr() != used[0][1].data_ptr()
    stats, _ = merge_partials(wide, torch.float32, kernel_device)
    assert used[-1][0] == chunk_counters(3, slot_chunks(37)) and used[-1][1] is big and not big.any()
    assert torch.equal(stats, merge_partials(wide, torch.float32, kernel_device)[0])
    # capture: a fresh buffer per launch, the cached one left alone
    real_capturing = _common.capturing
    monkeypatch.setattr(_common, "capturing", lambda device: True)
    assert torch.equal(merge_partials(small, torch.float32, kernel_device)[0], runs[0])
    monkeypatch.setattr(_common, "capturing", real_capturing)
    assert used[-1][1] is not big and not used[-1][1].any() and _common.stream_counters(1, kernel_device) is big


# ------------------------------------------------------------------------------------------------------ GPU
GPU_CASES = {
    "pe_bottleneck_1x1": Case(32, 256, 128, 16, 16, 1, 1, groups=8),
    "pe_bottleneck_3x3": Case(32, 128, 128, 16, 16, 3, 3, padding=(1, 1), groups=8),
    "pe_downsample_3x3_s2": Case(32, 128, 128, 16, 16, 3, 3, stride=(2, 2), padding=(1, 1), groups=4),
    "dense_3x3": Case(16, 64, 64, 32, 32, 3, 3, padding=(1, 1)),
}


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_vs_cudnn(case, dtype, tf32):
    """Real sizes on the GPU: the kernels vs cuDNN in the same dtype, both against the float64 CPU reference.
    With TF32 on, fp32 gets the budget of TF32's operands (tests/_oracle.py)."""
    if tf32 and dtype != torch.float32:
        pytest.skip("TF32 only concerns fp32")
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        gargs = make_inputs(case, dtype, "channels_last", "full", torch.device("cuda"))
        y, stats = run_fwd(tri.conv_fused, gargs, True)
        y_same, stats_same = run_fwd(ref.conv_fused, gargs, True)
        y64, stats64 = run_fwd(ref.conv_fused, to64(gargs), True)
        assert_budget("y", y, y_same, y64, dtype, dot=True)
        assert_budget("stats", stats, stats_same, stats64, dtype, dot=True)

        grad_y = torch.randn(y64.shape).to(dtype)
        gs = torch.randn(2, case.K) * 0.01
        ycast = y64.to(dtype)
        out = run_bwd(tri.conv_fused_backward, grad_y.cuda(), gs.cuda(), gargs, ycast.cuda(), [True] * 8, stats)
        same = run_bwd(ref.conv_fused_backward, grad_y.cuda(), gs.cuda(), gargs, ycast.cuda(), [True] * 8, stats)
        r64 = run_bwd(ref.conv_fused_backward, grad_y.double(), gs.double(), to64(gargs), y64, [True] * 8,
                      stats64)
        for name, o, s, r in zip(ref.CONV_GRAD_NAMES, out, same, r64):
            assert_budget(f"d_{name}", o, s, r, dtype, dot=True)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


# ------------------------------------------------------------------------------------- dgrad stride phases
@triton.jit
def _phase_taps_probe(out_ptr, params_ptr):
    i = tl.program_id(0)
    a = tl.load(params_ptr + 6 * i)
    R = tl.load(params_ptr + 6 * i + 1)
    pad = tl.load(params_ptr + 6 * i + 2)
    stride = tl.load(params_ptr + 6 * i + 3)
    dil = tl.load(params_ptr + 6 * i + 4)
    step = tl.load(params_ptr + 6 * i + 5)
    r0, T, c = _phase_taps(a, R, pad, stride, dil, step)
    tl.store(out_ptr + 3 * i, r0)
    tl.store(out_ptr + 3 * i + 1, T)
    tl.store(out_ptr + 3 * i + 2, c)


@pytest.mark.parametrize("case", [Case(2, 8, 8, 1, 3, 3, 3, stride=(2, 2), padding=(1, 1)),
                                  Case(1, 8, 8, 2, 1, 1, 1, stride=(3, 3))], ids=["h1_s2", "w1_s3"])
def test_dgrad_input_smaller_than_stride(case, kernel_device):
    """H or W < stride: stride phases without rows (and 1x1 / stride 3 phases without taps) compute nothing and divide
    by nothing (numpy raises here on an integer division by zero; the compiled kernel must not divide by 0 either)."""
    import numpy as np
    with np.errstate(divide="raise", invalid="raise"):
        check_backward(make_inputs(case, torch.float32, "channels_last", "full", kernel_device), torch.float32)


def test_dgrad_phase_taps_are_exactly_the_live_taps(kernel_device):
    """Each stride phase a runs T taps r = r0 + STEP t (STEP = stride / gcd(dilation, stride)), with output row
    p = h // stride + c - (dilation / gcd) t: exactly the taps with h + pad - r * dilation a multiple of the stride
    (brute force over rows h of the phase), none dead, none missed."""
    import math
    params, expected = [], []
    for R in (1, 2, 3, 5):
        for stride in (1, 2, 3):
            for dil in (1, 2, 3):
                for pad in (0, 1, 2):
                    for a in range(stride):
                        g = math.gcd(dil, stride)
                        params.append((a, R, pad, stride, dil, stride // g))
                        expected.append([r for r in range(R) if (a + pad - r * dil) % stride == 0])
    out = torch.zeros(3 * len(params), dtype=torch.int32, device=kernel_device)
    flat = torch.tensor([v for p in params for v in p], dtype=torch.int32, device=kernel_device)
    _phase_taps_probe[(len(params),)](out, flat)
    got = out.view(-1, 3).cpu().tolist()
    for (a, R, pad, stride, dil, step), live, (r0, T, c) in zip(params, expected, got):
        taps = [r0 + step * t for t in range(T)]
        assert taps == live, (a, R, pad, stride, dil, taps, live)
        for t, r in enumerate(taps):
            for h in range(a, a + 4 * stride, stride):   # rows of the phase: p from the phase formula
                assert (h + pad - r * dil) // stride == h // stride + c - (dil // math.gcd(dil, stride)) * t


@pytest.mark.parametrize("c_g, rs, hw", [(64, 3, 32), (64, 1, 32), (128, 3, 16), (16, 3, 32), (256, 1, 8)])
def test_wgrad_split_targets_warps_not_programs(monkeypatch, c_g, rs, hw):
    """On a GPU the wgrad splits its reduction over M until about 4096 warps run (1024 programs of 4 warps, 512 of
    8): counting programs would double the splits, and their fp32 partials' HBM traffic, of the 8-warp tiles."""
    from pe_kernels.triton import conv_bwd as conv_bwd_mod
    from pe_kernels.triton.conv_fwd import ConvGeometry

    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    pad = rs // 2
    geo = ConvGeometry(N=128, C=2 * c_g, H=hw, W=hw, K=2 * c_g, R=rs, S=rs, P=hw, Q=hw, groups=2, C_g=c_g, K_g=c_g,
                       stride=(1, 1), padding=(pad, pad), dilation=(1, 1), dtype=torch.float16)
    plan = conv_bwd_mod._wgrad_plan(geo, None)
    assert plan.split > 1
    warps = plan.grid[0] * plan.grid[1] * plan.grid[2] * plan.num_warps
    # the last split may round the programs up by one tile's worth, the floor of 8 tiles per split down
    assert 4096 * 0.5 <= warps <= 4096 * 1.25, (plan, warps)
