"""The forward's prologue, x' = act(x * in_scale + in_shift), formed in registers at every reduction step (conv_fwd):

- TRANS_ACC (2-byte operands): the conv computes acc^T = w^T x'^T, so that x' is the MMA's B operand, stored to
  shared memory as formed (an asynchronous wgmma with both operands there, instead of a register-A wgmma waited for
  at every step), then transposes the accumulator once before the epilogue (fp16 sm_90, a 32-channel 3x3 layer's
  training forward: 332 -> 300 SASS a step);
- PRO_ONCE: where every tap step reads the same channels (C_g == BLOCK_K), in_scale and in_shift are loaded once
  before the loop (300 -> 276; not beside 256 x 64 tiles, where that spilled);
- deep_steps (not a prologue's, but beside it here): 128-deep tap steps for 2-byte operands over groups of a
  multiple of 128 channels and 128-wide column tiles, in the eval forward;
- _common.prologue_values: with the ReLU on 2-byte operands, the padding (rows out of the image on a tap step, loaded
  as 0) is made 0 by adding -inf before the ReLU rather than by a select after it (366 -> 332: the compiler had moved
  the select onto the packed 16-bit halves).

Checks: the tiles and flags a GPU launch gets; the forward and its statistics against the float64 reference with the
prologue loaded once and per step, with and without the ReLU, padding that a positive shift would make positive if it
were touched, stride, dilation, every dtype and layout; a NaN input propagating exactly where the reference's does.
The flags of every forward launch are recorded, so a test cannot pass on the path it did not mean to run.
"""

from __future__ import annotations

import pytest
import torch

from pe_kernels import reference as ref
from pe_kernels.triton import conv_fwd as conv_fwd_mod

import test_triton_conv as tc
from _launch_flags import recorded_flags

FWD = "_conv_fwd_kernel"
CASES = {   # C_g = 16 or 32: with BLOCK_K = C_g every step of a tap reads the same channels
    "3x3_p1_g2_c16": tc.Case(2, 32, 32, 6, 5, 3, 3, padding=(1, 1), groups=2),
    "3x3_s2_g2_c16": tc.Case(2, 32, 48, 7, 6, 3, 3, stride=(2, 2), padding=(1, 1), groups=2),
    "3x3_dil2_c32": tc.Case(1, 32, 24, 8, 7, 3, 3, padding=(2, 2), dilation=(2, 2)),
}


def _trans(dtype):
    """TRANS_ACC with a prologue: 2-byte operands (fp32's TF32 operands took longer transposed)."""
    return dtype != torch.float32


def _flags(name, kwargs):
    if name == FWD:
        yield "fwd", tuple(kwargs.get(f) for f in ("PROLOGUE", "TAP_STEPS", "PRO_ONCE", "TRANS_ACC"))


def _tiles(case, block_k=None):
    return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=block_k or case.C // case.groups)


def _inputs(case, dtype, layout, device, in_relu=True):
    torch.manual_seed(0)
    args = tc.make_inputs(case, dtype, layout, "full", device)
    args["in_relu"] = in_relu
    return args


def test_gpu_flags(monkeypatch):
    """The tiles and flags of the forward a GPU launches (a prologue with statistics: training; neither: eval):
    TRANS_ACC with a prologue or statistics on 2-byte operands (unpacked groups: test_group_pack); PRO_ONCE where C_g
    is the step's depth; 128-deep steps (deep_steps) for 2-byte operands over 128-wide column tiles of groups a
    multiple of 128 channels, without a prologue or statistics."""
    monkeypatch.setattr(conv_fwd_mod, "INTERPRET", False)
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    h, b, f = torch.float16, torch.bfloat16, torch.float32
    for c_g, k_g, prologue, dtype, expect in (
            (32, 32, True, h, (32, 64, True, True, True)),        # layer1's 3x3: 32-deep steps, one chunk a tap
            (64, 64, True, h, (64, 64, True, True, True)),
            (128, 128, True, h, (64, 128, True, False, True)),    # with a prologue: 64 deep, two chunks a tap
            (128, 128, True, b, (64, 128, True, False, True)),
            (256, 256, True, h, (64, 128, True, False, True)),
            (256, 256, False, h, (128, 128, True, False, False)),  # deep steps without a prologue (eval)
            (256, 256, None, b, (64, 128, True, False, True)),    # statistics without a prologue: 64 deep, acc^T
            (128, 64, False, h, (64, 64, True, False, False)),    # 64 columns: 64 deep
            (128, 128, False, f, (32, 128, True, False, False)),  # TF32: 32 deep
            (32, 32, True, f, (32, 64, True, True, False)),       # fp32: the plain product (TF32 B read transposed)
            (32, 32, False, h, (32, 64, True, False, False))):
        x = torch.empty(2, 4 * c_g, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(4 * k_g, c_g, 3, 3, dtype=dtype)
        vec = torch.ones(4 * c_g) if prologue else None   # (None: no prologue, statistics)
        plan = conv_fwd_mod._plan_fwd(x, w, None, vec, vec, bool(prologue), None, None, None, False, (1, 1), (1, 1),
                                      (1, 1), 4, prologue is not False, None, None, None)
        got = tuple(plan.meta[f] for f in ("BLOCK_K", "BLOCK_N", "TAP_STEPS", "PRO_ONCE", "TRANS_ACC"))
        assert got == expect, (c_g, k_g, prologue, dtype, plan.meta)


@pytest.mark.parametrize("in_relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("dtype", tc.DTYPES)
@pytest.mark.parametrize("name", list(CASES))
def test_prologue_once_against_reference(name, dtype, in_relu, kernel_device):
    case = CASES[name]
    args = _inputs(case, dtype, "channels_last", kernel_device, in_relu)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, dtype, tiles=_tiles(case))
    assert seen["fwd"] == {(True, True, True, _trans(dtype))}, dict(seen)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
@pytest.mark.parametrize("name", ["3x3_p1_g2_c16", "3x3_dil2_c32"])
def test_prologue_once_layouts(name, layout, kernel_device):
    case = CASES[name]
    args = _inputs(case, torch.float16, layout, kernel_device)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, torch.float16, tiles=_tiles(case))
    assert seen["fwd"] == {(True, True, True, True)}, dict(seen)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
@pytest.mark.parametrize("name", ["3x3_s2_g2_c16", "3x3_dil2_c32"])
def test_prologue_per_step_against_reference(name, dtype, kernel_device):
    """32 channels a group in 16-deep steps (two chunks a tap): the channels change from step to step, so the vectors
    are loaded per step; still the transposed product."""
    case = CASES[name]
    if case.C // case.groups == 16:
        case = tc.Case(case.N, 2 * case.C, case.K, case.H, case.W, case.R, case.S, case.stride, case.padding,
                       case.dilation, case.groups)
    args = _inputs(case, dtype, "channels_last", kernel_device)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, dtype, tiles=_tiles(case, 16))
    assert seen["fwd"] == {(True, True, False, _trans(dtype))}, dict(seen)


def test_no_prologue_keeps_the_plain_product(kernel_device):
    case = CASES["3x3_p1_g2_c16"]
    args = _inputs(case, torch.float32, "channels_last", kernel_device)
    args.update(in_scale=None, in_shift=None, in_relu=False)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, torch.float32, tiles=_tiles(case))
    assert seen["fwd"] == {(False, True, False, False)}, dict(seen)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
def test_prologue_once_on_tall_tiles(dtype, kernel_device):
    """256-row tiles with 64-deep steps (TALL_CONFIG over a 64-channel group): the vectors are loaded per step there
    (beside them, loaded once, the tile spilled); 32 output channels a group in a 32-wide column tile."""
    case = tc.Case(1, 128, 64, 6, 5, 3, 3, padding=(1, 1), groups=2)
    args = _inputs(case, dtype, "channels_last", kernel_device)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, dtype, tiles=dict(BLOCK_M=256, BLOCK_N=32, BLOCK_K=64))
    assert seen["fwd"] == {(True, True, True, _trans(dtype))}, dict(seen)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
@pytest.mark.parametrize("in_relu", [True, False], ids=["relu", "no_relu"])
@pytest.mark.parametrize("block_k", [None, 16], ids=["once", "per_step"])
def test_padding_stays_zero(block_k, in_relu, dtype, kernel_device):
    """in_shift = 5 > 0: padded pixels would add 5 * w if the prologue touched them (with the ReLU in fp16, the -inf
    added to them must cancel the shift; fp32 selects)."""
    case = tc.Case(2, 64, 32, 6, 5, 3, 3, padding=(1, 1), groups=2)
    args = tc.make_inputs(case, dtype, "channels_last", "plain", kernel_device)
    args.update(in_scale=torch.full((case.C,), 0.5, device=kernel_device),
                in_shift=torch.full((case.C,), 5.0, device=kernel_device), in_relu=in_relu)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, dtype, tiles=_tiles(case, block_k))
    assert seen["fwd"] == {(True, True, block_k is None, _trans(dtype))}, dict(seen)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
@pytest.mark.parametrize("block_k", [None, 16], ids=["once", "per_step"])
def test_nan_propagates_as_the_reference(block_k, dtype, kernel_device):
    """A NaN input pixel makes NaN exactly the outputs whose window holds it (the ReLU propagates NaN); the others,
    padded windows included, stay finite."""
    case = tc.Case(1, 64, 32, 6, 5, 3, 3, padding=(1, 1), groups=2)
    args = _inputs(case, dtype, "channels_last", kernel_device)
    args.update(residual=None, out_scale=None, out_shift=None)
    x = args["x"].clone()
    x[0, 3, 0, 0] = float("nan")   # a corner pixel of group 0: windows of group 0's outputs at (0..1, 0..1)
    args["x"] = x
    with recorded_flags(_flags) as seen:
        y, _ = tc.run_fwd(conv_fwd_mod.conv_fwd, args, False, tiles=_tiles(case, block_k))
    y64, _ = tc.run_fwd(ref.conv_fused, tc.to64(args), False)
    assert seen["fwd"] == {(True, True, block_k is None, _trans(dtype))}, dict(seen)
    assert torch.equal(torch.isnan(y.cpu()), torch.isnan(y64)), "NaN at other outputs than the reference's"
    assert int(torch.isnan(y64).sum()) == 16 * 4   # 16 output channels of group 0, 2 x 2 positions
