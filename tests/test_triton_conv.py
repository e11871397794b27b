"""pe_kernels.triton conv_fused / conv_fused_backward against the float64 reference.

Error budget (DESIGN.md): |kernel - ref64| <= 2 * |torch_same_dtype - ref64| + atol, elementwise, where ref64 is
pe_kernels.reference on float64 copies and torch_same_dtype the reference in the test dtype; atol is relative
to the magnitude of ref64. On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest.py).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from hypothesis import given, settings, strategies as st

import pe_kernels.reference as ref
import pe_kernels.triton as tri
from pe_kernels.triton.conv_bwd import conv_bwd
from pe_kernels.triton.conv_fwd import conv_fwd

DTYPES = [
    pytest.param(torch.float32, id="fp32"),
    pytest.param(torch.float16, id="fp16"),
    pytest.param(torch.bfloat16, id="bf16"),  # runs on CPU: bf16 dot operands are upcast under the interpreter
]
# atol of the error budget, relative to max|ref64| (>= 1): covers one rounding of the output in the dtype.
ATOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


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
}
LAYOUTS = ["channels_last", "nchw", "sliced"]


def make_layout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """The same logical values as `t` in the requested memory layout."""
    if layout == "channels_last":
        return t.contiguous(memory_format=torch.channels_last)
    if layout == "nchw":
        return t.contiguous()
    # sliced: a non-contiguous view (every other column of a tensor twice as wide)
    big = torch.zeros(t.shape[:-1] + (2 * t.shape[-1],), dtype=t.dtype)
    big[..., ::2] = t
    view = big[..., ::2]
    assert not view.is_contiguous() and not view.is_contiguous(memory_format=torch.channels_last)
    return view


def assert_budget(name, out, same, ref64, dtype, atol_scale=1.0):
    """|out - ref64| <= 2 |same - ref64| + atol, elementwise."""
    assert out is not None, f"{name}: kernel returned None"
    assert out.shape == ref64.shape, f"{name}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    out, same, ref64 = out.double(), same.double(), ref64.double()
    atol = ATOL[dtype] * atol_scale * max(1.0, ref64.abs().max().item())
    err = (out - ref64).abs()
    budget = 2 * (same - ref64).abs() + atol
    bad = err > budget
    assert not bad.any(), (f"{name} ({dtype}): {int(bad.sum())} of {bad.numel()} elements outside the budget; "
                           f"max err {err.max().item():.3e}, max budget excess {(err - budget).max().item():.3e}")


def make_inputs(case: Case, dtype, layout="channels_last", features="full"):
    """x, weight and the optional per-channel/residual inputs; vectors fp32 as the contract says."""
    P = (case.H + 2 * case.padding[0] - case.dilation[0] * (case.R - 1) - 1) // case.stride[0] + 1
    Q = (case.W + 2 * case.padding[1] - case.dilation[1] * (case.S - 1) - 1) // case.stride[1] + 1
    x = make_layout(torch.randn(case.N, case.C, case.H, case.W).to(dtype), layout)
    w = (torch.randn(case.K, case.C // case.groups, case.R, case.S) / (case.C // case.groups * case.R * case.S)
         ** 0.5).to(dtype)
    full = features == "full"
    args = dict(
        x=x, weight=w,
        bias=torch.randn(case.K) if full else None,
        in_scale=torch.rand(case.C) + 0.5 if full else None,
        in_shift=torch.randn(case.C) * 0.5 if full else None,
        in_relu=full,
        out_scale=torch.rand(case.K) + 0.5 if full else None,
        out_shift=torch.randn(case.K) if full else None,
        residual=make_layout(torch.randn(case.N, case.K, P, Q).to(dtype), layout) if full else None,
        out_relu=full,
        stride=case.stride, padding=case.padding, dilation=case.dilation, groups=case.groups,
    )
    return args


def to64(args):
    return {k: (v.double() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


def run_fwd(fn, args, compute_stats=True, **kw):
    a = args
    return fn(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["out_scale"],
              a["out_shift"], a["residual"], a["out_relu"], a["stride"], a["padding"], a["dilation"], a["groups"],
              compute_stats, **kw)


def run_bwd(fn, grad_y, grad_stats, args, y, needs_grad, **kw):
    a = args
    return fn(grad_y, grad_stats, a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"],
              a["out_scale"], a["out_shift"], a["residual"], a["out_relu"], a["stride"], a["padding"],
              a["dilation"], a["groups"], y, needs_grad, **kw)


def check_forward(args, dtype, compute_stats=True, **kw):
    y, stats = run_fwd(conv_fwd, args, compute_stats, **kw)
    y_same, stats_same = run_fwd(ref.conv_fused, args, compute_stats)
    y64, stats64 = run_fwd(ref.conv_fused, to64(args), compute_stats)
    assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last)
    assert_budget("y", y, y_same, y64, dtype)
    if compute_stats:
        assert stats.dtype == torch.float32 and stats.shape == (2, args["weight"].shape[0])
        assert_budget("stats[0]", stats[0], stats_same[0], stats64[0], dtype)
        assert_budget("stats[1]", stats[1], stats_same[1], stats64[1], dtype)
    else:
        assert stats.numel() == 0
    return y64


def check_backward(args, dtype, grad_stats=True, needs_grad=(True,) * 8, **kw):
    y64, _ = run_fwd(ref.conv_fused, to64(args), True)
    # The ReLU mask comes from y; give the kernel the float64 forward rounded to the dtype, so that a sign flip
    # of a value within rounding of zero cannot make the kernel and the oracle disagree about the mask.
    y = y64.to(dtype)
    grad_y = make_layout(torch.randn(y.shape).to(dtype), "nchw")
    gs = torch.randn(2, args["weight"].shape[0]) * 0.1 if grad_stats else None
    out = run_bwd(conv_bwd, grad_y, gs, args, y, list(needs_grad), **kw)
    same = run_bwd(ref.conv_fused_backward, grad_y, gs, args, y, list(needs_grad))
    r64 = run_bwd(ref.conv_fused_backward, grad_y.double(), None if gs is None else gs.double(), to64(args),
                  y64, list(needs_grad))
    inputs = [args[n] for n in ref.CONV_GRAD_NAMES]
    for name, o, s, r, t, need in zip(ref.CONV_GRAD_NAMES, out, same, r64, inputs, needs_grad):
        if t is None or not need:
            assert o is None, f"{name}: expected None"
            continue
        assert o.dtype == t.dtype, f"{name}: dtype {o.dtype} != {t.dtype}"
        if name in ("x", "residual"):
            assert o.is_contiguous(memory_format=torch.channels_last), name
        else:
            assert o.is_contiguous(), name
        assert_budget(f"d_{name}", o, s, r, dtype)


# ------------------------------------------------------------------------------------------------- forward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_full(case, layout, dtype):
    check_forward(make_inputs(case, dtype, layout, "full"), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_forward_plain(case, dtype):
    check_forward(make_inputs(case, dtype, "nchw", "plain"), dtype, compute_stats=False)


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("flags", ["in_scale", "in_shift", "in_relu", "bias", "out_scale", "out_shift",
                                   "residual", "out_relu"])
def test_forward_single_feature(flags, dtype):
    """Each prologue/epilogue input alone (the others absent), with statistics."""
    case = CASES["3x3_pad1_g2_odd"]
    full = make_inputs(case, dtype, "channels_last", "full")
    args = make_inputs(case, dtype, "channels_last", "plain")
    args[flags] = full[flags]
    check_forward(args, dtype)


def test_forward_padding_stays_zero():
    """in_shift > 0 would make padded pixels positive if the prologue touched them."""
    case = CASES["3x3_pad1_g2_odd"]
    args = make_inputs(case, torch.float32, "channels_last", "plain")
    args["in_shift"] = torch.full((case.C,), 5.0)
    args["in_relu"] = True
    check_forward(args, torch.float32)


def test_forward_public_api_matches_launcher():
    args = make_inputs(CASES["3x3_dil2_g8_odd"], torch.float32)
    y1, s1 = run_fwd(tri.conv_fused, args, True)
    y2, s2 = run_fwd(conv_fwd, args, True)
    assert torch.equal(y1, y2) and torch.equal(s1, s2)


def test_forward_deterministic_stats():
    args = make_inputs(CASES["3x3_s2_pad1_g4_batch1"], torch.float32)
    small = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
    runs = [run_fwd(conv_fwd, args, True, tiles=small) for _ in range(2)]
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("case", [CASES["3x3_pad1_g2_odd"], CASES["3x3_dil2_g8_odd"]], ids=["g2", "g8"])
def test_small_tiles(case, dtype):
    """16x16x16 tiles: several M tiles, a partial last tile, masked channel and reduction columns, split wgrad."""
    tiles = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)
    args = make_inputs(case, dtype, "sliced", "full")
    check_forward(args, dtype, tiles={k: v for k, v in tiles.items() if k != "SPLIT"})
    check_backward(args, dtype, tiles=tiles)


# ------------------------------------------------------------------------------------------------ backward
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_backward_full(case, dtype):
    check_backward(make_inputs(case, dtype, "channels_last", "full"), dtype)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
@pytest.mark.parametrize("case", [CASES["1x1_g1"], CASES["3x3_s2_pad1_g4_batch1"]], ids=["1x1", "3x3_s2"])
def test_backward_layouts(case, layout):
    check_backward(make_inputs(case, torch.float32, layout, "full"), torch.float32)


@pytest.mark.parametrize("dtype", DTYPES[:2])
def test_backward_plain_no_grad_stats(dtype):
    """No prologue/epilogue, no grad_stats: only x and weight gradients."""
    args = make_inputs(CASES["3x3_pad1_g2_odd"], dtype, "nchw", "plain")
    check_backward(args, dtype, grad_stats=False)


@pytest.mark.parametrize("needs_grad", [
    (True, False, False, False, False, False, False, False),
    (False, True, False, False, False, False, False, False),
    (False, False, True, True, False, False, True, False),
    (False, False, False, False, True, True, False, True),
], ids=["x", "weight", "bias_in_scale_out_shift", "in_shift_out_scale_residual"])
def test_backward_needs_grad_subsets(needs_grad):
    args = make_inputs(CASES["3x3_s2_pad1_g4_batch1"], torch.float32, "channels_last", "full")
    check_backward(args, torch.float32, needs_grad=needs_grad)


def test_backward_without_relu_or_grad_stats():
    args = make_inputs(CASES["3x3_dil2_g8_odd"], torch.float32, "channels_last", "full")
    args["in_relu"] = args["out_relu"] = False
    check_backward(args, torch.float32, grad_stats=False)


def test_empty_batch():
    args = make_inputs(Case(0, 6, 10, 5, 5, 3, 3, padding=(1, 1), groups=2), torch.float32)
    y, stats = run_fwd(tri.conv_fused, args, True)
    assert y.shape == (0, 10, 5, 5) and torch.equal(stats, torch.zeros(2, 10))
    grads = run_bwd(tri.conv_fused_backward, torch.zeros_like(y), torch.ones(2, 10), args, y, [True] * 8)
    expected = run_bwd(ref.conv_fused_backward, torch.zeros_like(y), torch.ones(2, 10), args, y, [True] * 8)
    for name, g, e in zip(ref.CONV_GRAD_NAMES, grads, expected):
        assert g.shape == e.shape and torch.equal(g, torch.zeros_like(g)), name


def test_backward_nothing_needed():
    args = make_inputs(CASES["1x1_g1"], torch.float32)
    y, _ = run_fwd(conv_fwd, args, False)
    assert run_bwd(tri.conv_fused_backward, torch.ones_like(y), None, args, y, [False] * 8) == [None] * 8


@settings(max_examples=10, deadline=None)
@given(
    n=st.integers(1, 2), groups=st.sampled_from([1, 2, 4]), c_g=st.integers(1, 5), k_g=st.integers(1, 6),
    h=st.integers(3, 7), w=st.integers(3, 7), r=st.sampled_from([1, 2, 3]), s=st.sampled_from([1, 3]),
    stride=st.integers(1, 2), pad=st.integers(0, 1), dil=st.integers(1, 2),
)
def test_property_shapes(n, groups, c_g, k_g, h, w, r, s, stride, pad, dil):
    case = Case(n, c_g * groups, k_g * groups, h, w, r, s, (stride, stride), (pad, pad), (dil, dil), groups)
    if (h + 2 * pad - dil * (r - 1) - 1) < 0 or (w + 2 * pad - dil * (s - 1) - 1) < 0:
        return  # empty output
    torch.manual_seed(n * 1000 + h * 10 + w)
    args = make_inputs(case, torch.float32, "channels_last", "full")
    check_forward(args, torch.float32)
    check_backward(args, torch.float32)


# ------------------------------------------------------------------------------------------- input errors
def _base_args():
    return make_inputs(CASES["1x1_g1"], torch.float32, "channels_last", "plain")


def test_error_rank():
    args = _base_args()
    args["x"] = args["x"][0]
    with pytest.raises(ValueError, match="x must be 4-D"):
        run_fwd(tri.conv_fused, args)


def test_error_groups_divisibility():
    args = make_inputs(Case(1, 9, 6, 4, 4, 1, 1), torch.float32, "nchw", "plain")
    args["groups"] = 2
    with pytest.raises(ValueError, match="in_channels=9 .* groups=2"):
        run_fwd(tri.conv_fused, args)


def test_error_weight_channels():
    args = _base_args()
    args["weight"] = torch.randn(16, 8, 1, 1)
    with pytest.raises(ValueError, match="8 input channels per group"):
        run_fwd(tri.conv_fused, args)


def test_error_dtypes():
    args = to64(_base_args())
    with pytest.raises(TypeError, match="float64"):
        run_fwd(tri.conv_fused, args)
    args = _base_args()
    args["weight"] = args["weight"].half()
    with pytest.raises(TypeError, match="weight dtype"):
        run_fwd(tri.conv_fused, args)


def test_error_devices_and_shapes():
    args = _base_args()
    args["bias"] = torch.zeros(16, device="meta")
    with pytest.raises(ValueError, match="bias is on meta"):
        run_fwd(tri.conv_fused, args)
    args = _base_args()
    args["out_scale"] = torch.ones(15)
    with pytest.raises(ValueError, match="out_scale must be a 1-D tensor of 16"):
        run_fwd(tri.conv_fused, args)
    args = _base_args()
    args["residual"] = torch.zeros(2, 16, 4, 4)
    with pytest.raises(ValueError, match="residual must have shape"):
        run_fwd(tri.conv_fused, args)
    args = _base_args()
    args["stride"] = (0, 1)
    with pytest.raises(ValueError, match="stride"):
        run_fwd(tri.conv_fused, args)


def test_error_backward_needs_grad_length():
    args = _base_args()
    y, _ = run_fwd(conv_fwd, args, False)
    with pytest.raises(ValueError, match="needs_grad must have 8"):
        run_bwd(tri.conv_fused_backward, y, None, args, y, [True] * 7)


# ------------------------------------------------------------------------------------------------------ GPU
GPU_CASES = {
    "pe_bottleneck_1x1": Case(32, 256, 128, 16, 16, 1, 1, groups=8),
    "pe_bottleneck_3x3": Case(32, 128, 128, 16, 16, 3, 3, padding=(1, 1), groups=8),
    "pe_downsample_3x3_s2": Case(32, 128, 128, 16, 16, 3, 3, stride=(2, 2), padding=(1, 1), groups=4),
    "dense_3x3": Case(16, 64, 64, 32, 32, 3, 3, padding=(1, 1)),
}


def _to_cuda(args):
    return {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in args.items()}


@pytest.mark.gpu
@pytest.mark.parametrize("tf32", [False, True], ids=["ieee", "tf32"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(GPU_CASES.values()), ids=list(GPU_CASES))
def test_gpu_vs_cudnn(case, dtype, tf32):
    """Real sizes on the GPU: the kernels vs cuDNN in the same dtype, both against the float64 CPU reference."""
    if tf32 and dtype != torch.float32:
        pytest.skip("TF32 only concerns fp32")
    old = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = tf32
    try:
        args = make_inputs(case, dtype, "channels_last", "full")
        gargs = _to_cuda(args)
        scale = 4.0 if tf32 else 1.0  # TF32 rounds operands to 10 mantissa bits
        y, stats = run_fwd(tri.conv_fused, gargs, True)
        y_same, stats_same = run_fwd(ref.conv_fused, gargs, True)
        y64, stats64 = run_fwd(ref.conv_fused, to64(args), True)
        assert_budget("y", y.cpu(), y_same.cpu(), y64, dtype, scale)
        assert_budget("stats", stats.cpu(), stats_same.cpu(), stats64, dtype, scale)

        grad_y = torch.randn(y64.shape).to(dtype)
        gs = torch.randn(2, case.K) * 0.01
        ycast = y64.to(dtype)
        out = run_bwd(tri.conv_fused_backward, grad_y.cuda(), gs.cuda(), gargs, ycast.cuda(), [True] * 8)
        same = run_bwd(ref.conv_fused_backward, grad_y.cuda(), gs.cuda(), gargs, ycast.cuda(), [True] * 8)
        r64 = run_bwd(ref.conv_fused_backward, grad_y.double(), gs.double(), to64(args), y64, [True] * 8)
        for name, o, s, r in zip(ref.CONV_GRAD_NAMES, out, same, r64):
            assert_budget(f"d_{name}", o.cpu(), s.cpu(), r, dtype, scale)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old
