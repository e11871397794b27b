"""Two groups per program (PACK = 2, _common.pack_groups): where a GEMM's column tile is exactly two groups' columns
(the forward's 64-column tile over a narrow group's K_g = 32, the dgrad's over C_g = 32), the groups are even and every
reduction step lies in one tap, one program runs groups g and g + 1: a step's rows, bounds and offsets, its barriers
and pipeline bookkeeping serve both groups' loads (the second group's operands C_g channels and K_g filters further)
and two products into two accumulators, joined for the epilogue (group g's columns, then g + 1's, the channels'
own order). Where one group had the 64-column tile, half of it was masked (fp16 sm_90, the 32-channel 3x3 layer: eval
forward 82 -> 53 us modelled, dgrad 152 -> 96; bench/kernel_audit.py). Not the forward with a prologue on 2-byte
operands: its x' is the MMA's B operand (TRANS_ACC), and a group's 32 columns as the product's M made it mma.sync.

Two products, not one block-diagonal product: a non-finite input of one group must not reach the other group's
outputs (0 * inf = NaN), and does not (checked).

Checks: the rule; the plans a GPU launch gets; the packed forward (eval epilogue, statistics, the training finalize)
and the packed dgrad (the prologue's sums, the block tail's epilogue) against the float64 reference, and equal to the
unpacked launch (bit for bit in the interpreter, whose arithmetic per group is the same; within a rounding on a GPU);
the recorded PACK of every launch, so a test cannot pass on the path it did not mean to run.
"""

from __future__ import annotations

import pytest
import torch

from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton import conv_fwd as conv_fwd_mod
from pe_kernels.triton._common import pack_groups
from pe_kernels.triton.conv_fwd import conv_bn_train, conv_fwd

import test_triton_conv as tc
import test_triton_conv_bn_train_bwd as tb
from _launch_flags import recorded_flags

FWD_CASES = {   # 16 channels a group in and out: BLOCK_K = C_g = 16, BLOCK_N = 2 K_g = 32
    "3x3_p1_g4": tc.Case(2, 64, 64, 6, 5, 3, 3, padding=(1, 1), groups=4),
    "3x3_s2_dil2_g2": tc.Case(2, 32, 32, 9, 8, 3, 3, stride=(2, 2), padding=(2, 2), dilation=(2, 2), groups=2),
    "1x1_g2": tc.Case(1, 32, 32, 5, 7, 1, 1, groups=2),
}
BWD_CASES = {
    "3x3_p1_g4": tb.Case(2, 64, 64, 6, 5, 3, padding=1, groups=4),
    "3x3_s2_g2": tb.Case(2, 32, 32, 7, 6, 3, stride=2, padding=1, groups=2),
}


def _flags(name, kwargs):
    if name in ("_conv_fwd_kernel", "_conv_dgrad_kernel"):
        yield name[6:11], kwargs.get("PACK")


def _tiles(c_g, cols, pack, block_m=16):
    """BLOCK_K = c_g (one step a tap); BLOCK_N two groups' `cols` (pack 2) or one group's (pack 1)."""
    return dict(BLOCK_M=block_m, BLOCK_N=pack * cols, BLOCK_K=c_g)


def _same(a, b, device):
    if device.type == "cpu":
        assert torch.equal(a, b)
    else:
        torch.testing.assert_close(a, b, rtol=2 ** -8, atol=2 ** -8 * float(b.abs().max()))


def test_pack_groups_rule():
    assert pack_groups(4, 32, 32, 64, 32) == 2 and pack_groups(2, 16, 16, 32, 16) == 2
    assert pack_groups(4, 32, 64, 64, 32) == 2     # two 32-deep steps a tap
    assert pack_groups(3, 32, 32, 64, 32) == 1     # odd groups
    assert pack_groups(1, 32, 32, 64, 32) == 1
    assert pack_groups(4, 32, 48, 64, 32) == 1     # steps spanning taps (48 channels, 32 a step)
    assert pack_groups(4, 16, 16, 64, 16) == 1     # four groups' columns: not packed
    assert pack_groups(4, 64, 64, 64, 64) == 1     # one group fills the tile


def test_gpu_plans(monkeypatch):
    """On a GPU: the 32-channel 3x3 layer's eval forward, its fp32 training forward and its dgrad on the stored g_acc
    run two groups a program; the 2-byte training forward (TRANS_ACC), an odd group count, 64-channel groups and the
    dgrad forming g_acc on load (y recomputed: 32 columns) do not."""
    monkeypatch.setattr(conv_fwd_mod, "INTERPRET", False)
    monkeypatch.setattr(conv_bwd_mod, "INTERPRET", False)
    h = torch.float16
    for c_g, groups, prologue, dtype, expect in ((32, 4, True, h, (64, 1)), (32, 4, False, h, (64, 2)),
                                                 (32, 4, True, torch.bfloat16, (64, 1)),
                                                 (32, 4, True, torch.float32, (64, 2)),
                                                 (32, 3, False, h, (64, 1)), (64, 4, False, h, (64, 1))):
        x = torch.empty(2, groups * c_g, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(groups * c_g, c_g, 3, 3, dtype=dtype)
        vec = torch.ones(groups * c_g) if prologue else None
        plan = conv_fwd_mod._plan_fwd(x, w, None, vec, vec, prologue, None, None, None, False, (1, 1), (1, 1),
                                      (1, 1), groups, prologue, None, None, None)
        assert (plan.meta["BLOCK_N"], plan.meta["PACK"]) == expect, (c_g, groups, prologue, dtype, plan.meta)
        assert plan.grid({"BLOCK_M": 64})[1] == groups // expect[1]
    for c_g, k_g, r, groups, expect in ((32, 32, 3, 4, (64, 2, False)), (32, 32, 3, 2, (64, 2, False)),
                                        (32, 32, 3, 3, (64, 1, False)), (64, 64, 3, 4, (64, 1, False)),
                                        (32, 128, 1, 4, (32, 1, True))):   # y recomputed, g_acc on load
        x = torch.empty(2, groups * c_g, 8, 8, dtype=h).to(memory_format=torch.channels_last)
        w = torch.empty(groups * k_g, c_g, r, r, dtype=h)
        y = torch.empty(2, groups * k_g, 8, 8, dtype=h).to(memory_format=torch.channels_last)
        vec = torch.ones(groups * c_g)
        plan = conv_bwd_mod._plan_conv_bn_bwd(y, None, None, x, w, None, vec, vec, True, (1, 1), (r // 2,) * 2,
                                              (1, 1), groups, y, torch.zeros(2, groups * k_g), None, 1e-5,
                                              [True, True, False, True, True, False, False], None)
        meta = plan.dgrad.meta
        assert (meta["BLOCK_N"], meta["PACK"], meta["GACC_ON_LOAD"]) == expect, (c_g, k_g, r, groups, meta)


def test_gpu_forward_statistics_take_the_transposed_product(monkeypatch):
    """On a GPU, a 2-byte training forward without a prologue computes acc^T (TRANS_ACC: a column's rows lie in the
    MMA's N, inside a warp, so the statistics' per-tile sums need no shared memory) where its groups are not packed;
    packed narrow groups keep PACK, fp32 and the eval forward keep the plain product."""
    monkeypatch.setattr(conv_fwd_mod, "INTERPRET", False)
    h = torch.float16
    for c_g, groups, stats, dtype, expect in ((128, 4, True, h, (1, True)), (128, 4, True, torch.bfloat16, (1, True)),
                                              (32, 3, True, h, (1, True)), (32, 4, True, h, (2, False)),
                                              (128, 4, True, torch.float32, (1, False)),
                                              (128, 4, False, h, (1, False))):
        x = torch.empty(2, groups * c_g, 8, 8, dtype=dtype).to(memory_format=torch.channels_last)
        w = torch.empty(groups * c_g, c_g, 3, 3, dtype=dtype)
        plan = conv_fwd_mod._plan_fwd(x, w, None, None, None, False, None, None, None, False, (1, 1), (1, 1),
                                      (1, 1), groups, stats, None, None, None)
        assert (plan.meta["PACK"], plan.meta["TRANS_ACC"]) == expect, (c_g, groups, stats, dtype, plan.meta)


@pytest.mark.parametrize("features", ["full", "plain"])
@pytest.mark.parametrize("dtype", tc.DTYPES)
@pytest.mark.parametrize("name", list(FWD_CASES))
def test_forward_against_reference(name, dtype, features, kernel_device):
    """Prologue (ReLU), bias, epilogue, residual and statistics ("full"), or none of them, against float64 (a prologue
    on 2-byte operands: one group a program, TRANS_ACC)."""
    case = FWD_CASES[name]
    args = tc.make_inputs(case, dtype, "channels_last", features, kernel_device)
    c_g, k_g = case.C // case.groups, case.K // case.groups
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, dtype, tiles=_tiles(c_g, k_g, 2))
    pack = 1 if features == "full" and dtype != torch.float32 else 2
    assert dict(seen) == {"fwd_k": {pack}}, dict(seen)


@pytest.mark.parametrize("layout", ["nchw", "sliced"])
def test_forward_layouts(layout, kernel_device):
    """x in any layout, fp16 (no prologue: one group a program beside one, TRANS_ACC)."""
    case = FWD_CASES["3x3_p1_g4"]
    args = dict(tc.make_inputs(case, torch.float16, layout, "full", kernel_device), in_scale=None, in_shift=None,
                in_relu=False)
    with recorded_flags(_flags) as seen:
        tc.check_forward(args, torch.float16, tiles=_tiles(16, 16, 2))
    assert dict(seen) == {"fwd_k": {2}}, dict(seen)


@pytest.mark.parametrize("dtype", tc.DTYPES[:2])
def test_forward_equals_unpacked_and_keeps_groups_apart(dtype, kernel_device):
    """The packed launch gives the unpacked one's results: the eval forward (epilogue, residual, ReLU), and the
    training forward with BN's finalize (scale, shift, running statistics); an inf in group 0's input leaves groups 1
    to 3 finite (and group 0 as unpacked: inf or NaN where the reference has them). A prologue in fp32 (fp16's is
    one group a program, TRANS_ACC, as is fp16's unpacked forward with statistics: equal to rounding there)."""
    case = FWD_CASES["3x3_p1_g4"]
    args = tc.make_inputs(case, dtype, "channels_last", "full", kernel_device)
    if dtype != torch.float32:
        args.update(in_scale=None, in_shift=None)
    x = args["x"].clone()
    x[0, 3, 2, 2] = float("inf")
    geo = (case.stride, case.padding, case.dilation, case.groups)
    results = []
    for pack in (1, 2):
        running = (torch.zeros(case.K, device=kernel_device), torch.ones(case.K, device=kernel_device),
                   torch.zeros((), dtype=torch.long, device=kernel_device))
        with recorded_flags(_flags) as seen:
            y, stats = conv_fwd(x, args["weight"], args["bias"], args["in_scale"], args["in_shift"],
                                args["in_scale"] is not None,
                                args["out_scale"], args["out_shift"], args["residual"], True, *geo, True,
                                tiles=_tiles(16, 16, pack))
            train = conv_bn_train(args["x"], args["weight"], None, args["in_scale"], args["in_shift"],
                                  args["in_scale"] is not None, *geo, None, None, 1e-5, *running, 0.1,
                                  tiles=_tiles(16, 16, pack))
        assert dict(seen) == {"fwd_k": {pack}}, dict(seen)
        results.append((y, stats, *train, *running))
    for a, b in zip(*results):
        if dtype == torch.float32:
            _same(a.float().nan_to_num(), b.float().nan_to_num(), kernel_device)
        else:   # the unpacked 2-byte forward with statistics computes acc^T (TRANS_ACC: its per-tile sums inside a
            # warp), the packed one acc: the same products summed in another order, equal to rounding
            torch.testing.assert_close(a.float().nan_to_num(), b.float().nan_to_num(), rtol=2 ** -8,
                                       atol=2 ** -8 * float(b.float().nan_to_num().abs().max()))
        assert torch.equal(a.isnan(), b.isnan()) and torch.equal(a.isinf(), b.isinf())
    y = results[1][0]
    assert torch.isfinite(y[:, 16:]).all() and not torch.isfinite(y[:, :16]).all()


@pytest.mark.parametrize("prologue", [True, False], ids=["prologue", "no_prologue"])
@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("name", list(BWD_CASES))
def test_dgrad_against_reference(name, dtype, prologue, kernel_device):
    """The conv -> BN training backward with a packed dgrad on the stored g_acc (the prologue's sums: d_in_scale,
    d_in_shift per channel over both groups' columns), every gradient against float64."""
    case = BWD_CASES[name]
    args = tb.make_inputs(case, dtype, kernel_device, prologue=prologue)
    c_g, k_g = case.C // case.groups, case.K // case.groups
    with recorded_flags(_flags) as seen:
        tb.check(args, dtype, needs_grad=tb.ALL_BUT_BIAS, tiles=dict(_tiles(k_g, c_g, 2), SPLIT=2))
    assert seen["dgrad"] == {2}, dict(seen)


@pytest.mark.parametrize("dtype", tb.DTYPES)
def test_dgrad_equals_unpacked(dtype, kernel_device):
    case = BWD_CASES["3x3_p1_g4"]
    results = []
    for pack in (1, 2):
        torch.manual_seed(0)
        args = tb.make_inputs(case, dtype, kernel_device, prologue=True)
        y, stats = tb.forward(conv_fwd_mod, args)
        grads = tb.make_grads(y.shape, y.shape[1], dtype, kernel_device, grad_layout=torch.channels_last)
        with recorded_flags(_flags) as seen:
            results.append(tb.backward(conv_bwd_mod.conv_bn_bwd, grads, args, y, stats, tb.ALL_BUT_BIAS,
                                       tiles=dict(_tiles(16, 16, pack), SPLIT=2)))
        assert seen["dgrad"] == {pack}, dict(seen)
    for a, b in zip(*results):
        assert (a is None) == (b is None)
        if a is not None:
            _same(a, b, kernel_device)


def test_dgrad_tail_epilogue_equals_unpacked(kernel_device):
    """The block tail's epilogue (conv_bn_bwd_ext's TailBwd: g = mask(dx' + side) stored, its sums) on a packed dgrad:
    the unpacked launch's results."""
    from pe_kernels.triton.conv_bwd import TailBwd, conv_bn_bwd_ext
    from test_conv_bn_junction import tail_inputs

    out, weight, y_t, side, res, geo, y_h, stats_h, grad_y, grad_scale, grad_shift, bn_w = tail_inputs(
        kernel_device, 32, 32)
    needs = [True, True, False, False, False, True, True]
    results = []
    for pack in (1, 2):
        with recorded_flags(_flags) as seen:
            fused, sums = conv_bn_bwd_ext(grad_y, grad_scale, grad_shift, out, weight, None, None, None, False,
                                          *geo.values(), y_h, stats_h, bn_w, 1e-5, needs,
                                          dict(_tiles(16, 16, pack), SPLIT=2), tail=TailBwd(y_t, side, res, True))
        assert seen["dgrad"] == {pack}, dict(seen)
        results.append([t for t in (*fused, *sums) if t is not None])
    for a, b in zip(*results):
        _same(a, b, kernel_device)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["fp16", "bf16"])
def test_forward_statistics_of_the_transposed_product_match_float64(dtype, kernel_device):
    """The 2-byte training forward without a prologue and with unpacked groups runs TRANS_ACC with STATS (the flags
    recorded): y and its statistics within the budget of the float64 reference (odd rows: masked tile rows)."""
    case = FWD_CASES["3x3_p1_g4"]
    args = tc.make_inputs(case, dtype, "channels_last", "full", kernel_device)
    args.update(in_scale=None, in_shift=None, in_relu=False, out_scale=None, out_shift=None, residual=None)

    def flags(name, kwargs):
        if name == "_conv_fwd_kernel":
            yield "fwd", (kwargs.get("PACK"), kwargs.get("TRANS_ACC"), kwargs.get("STATS"))

    with recorded_flags(flags) as seen:
        tc.check_forward(args, dtype, compute_stats=True, tiles=_tiles(16, 16, 1))
    assert dict(seen) == {"fwd": {(1, True, True)}}, dict(seen)
