"""How the wgrad addresses the rows it reduces over, m = (n P + p) Q + q (of g_acc, of grad_y and y where it forms
g_acc on load, and of x'):

- FLAT_G, FLAT_X: where a tensor's strides put row m at m * stride_w for every (n, p, q) (_common.dense_rows:
  channels_last and its likes), the row is m times one stride, no (n, p, q); x too in a 1x1 conv with stride 1 and no
  padding, whose input rows are its output rows (fp16 sm_90, 64 x 64 x 128 on 8 warps: loop 470 -> 252 SASS).
- ALIGNED_ROWS: where the steps' rows lie in one image at (p0 + i // Q, q0 + i % Q) (conv_bwd.aligned_rows), only
  each step's first row is split, as scalars, the rows' offsets being loop-invariant; TAP_ROWS then, where a j tile
  lies in one filter tap (C_g a multiple of it): x's offsets are the step's scalar plus loop-invariant row and column
  ones, bounded per row (a 3x3 loop 428 -> 335 SASS).
- WHOLE_IMAGES: where a step's rows are whole images (the step a multiple of P*Q: conv_bwd.whole_images), row i of
  the step at (n0 + i // PQ, i % PQ // Q, i % Q): each row's (p, q), offsets and bounds are loop-invariant, the step's
  first image n0 a scalar; TAP_ROWS with it likewise (a 3x3 loop on 8 x 8 or 4 x 4 images 335 / 428 -> 243 SASS).
  Without TAP_ROWS (j tiles spanning taps) the tile's positions relative to the step's first row are loop-invariant
  per (row, column), for whole images and for aligned steps, with a prologue or without.
- Otherwise each row is split with two fast_div per step.

The same tiles in the same order, so the same bits. Checks: dense_rows and aligned_rows against the offsets and rows
themselves; the selection per layout and conv; the wgrad (the generic conv backward and the conv -> BN training
backward, which forms g_acc on load) against the float64 reference on every path; and equality, bit for bit, with
each row split per step instead. Every wgrad launch's flags are recorded, so a test cannot pass on the path it did
not mean to run.
"""

from __future__ import annotations

import collections
import itertools

import pytest
import torch

from pe_kernels.triton import conv_bwd as conv_bwd_mod
from pe_kernels.triton._common import dense_rows
from pe_kernels.triton.conv_bwd import conv_bn_bwd, conv_bwd
from pe_kernels.triton.conv_fwd import conv_fwd, forward_tiles

import test_triton_conv as tc
import test_triton_conv_bn_train_bwd as tb

from _launch_flags import recorded_flags

WGRAD = "_conv_wgrad_kernel"
TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)   # several row steps per split, three splits
CL = torch.channels_last

# (conv case, whether x's rows are the output rows: FLAT_X with a dense x, how 16-row steps sit in the output's
# rows where they are split into (n, p, q): "aligned" in one image (ALIGNED_ROWS), "whole" images (WHOLE_IMAGES), or
# None; TAP_ROWS with either: C_g a multiple of the 16-wide j tile)
CASES = {
    "1x1_s1_g2": (tc.Case(2, 32, 32, 5, 7, 1, 1, groups=2), True, None),
    "1x1_s2": (tc.Case(2, 16, 32, 9, 7, 1, 1, stride=(2, 2)), False, None),
    "3x3_p1_g2": (tc.Case(2, 32, 32, 6, 5, 3, 3, padding=(1, 1), groups=2), False, None),
    "1x1_s2_whole": (tc.Case(2, 16, 32, 8, 8, 1, 1, stride=(2, 2)), False, "whole"),   # P = Q = 4: an image a step
    "3x3_p1_g2_aligned": (tc.Case(2, 32, 32, 8, 8, 3, 3, padding=(1, 1), groups=2), False, "aligned"),   # Q = 8
    "3x3_p1_wide_aligned": (tc.Case(2, 16, 16, 2, 32, 3, 3, padding=(1, 1)), False, "aligned"),   # Q = 32: half a row
    "3x3_s2_c8_whole": (tc.Case(2, 16, 16, 8, 8, 3, 3, stride=(2, 2), padding=(1, 1), groups=2), False, "whole"),
    # 2 x 2 images: four a step, the last split's step three quarters masked (9 images, 36 rows); C_g = 16: TAP_ROWS
    "3x3_p1_g2_whole_4": (tc.Case(9, 32, 32, 2, 2, 3, 3, padding=(1, 1), groups=2), False, "whole"),
    # C_g = 24: no TAP_ROWS (the j tiles span taps), the tile's positions relative to the step's first row
    "3x3_s2_c24_aligned": (tc.Case(2, 48, 16, 16, 16, 3, 3, stride=(2, 2), padding=(1, 1), groups=2), False,
                           "aligned"),   # P = Q = 8
    "3x3_p1_wide_c24_aligned": (tc.Case(2, 24, 16, 2, 32, 3, 3, padding=(1, 1)), False, "aligned"),   # half a row
    # 4 x 2 images: two a step; C_g = 24 (no TAP_ROWS: the j tiles span taps)
    "3x3_p1_c24_whole_2": (tc.Case(4, 48, 16, 4, 2, 3, 3, padding=(1, 1), groups=2), False, "whole"),
}


def expected_flags(name: str, flat_g: bool, x_dense: bool = True) -> tuple:
    """(FLAT_G, FLAT_X, ALIGNED_ROWS, WHOLE_IMAGES, TAP_ROWS) of the case's wgrad."""
    case, flat_x, rows = CASES[name]
    flat_x = flat_x and x_dense
    rows = rows if not (flat_g and flat_x) else None
    return (flat_g, flat_x, rows == "aligned", rows == "whole",
            rows is not None and not flat_x and (case.C // case.groups) % TILES["BLOCK_K"] == 0)


def recorded_wgrad_flags():
    """{"wgrad": the set of (FLAT_G, FLAT_X, ALIGNED_ROWS, WHOLE_IMAGES, TAP_ROWS) of the wgrad launches in the
    block}."""
    return recorded_flags(lambda name, kw: [("wgrad", tuple(kw.get(f) for f in (
        "FLAT_G", "FLAT_X", "ALIGNED_ROWS", "WHOLE_IMAGES", "TAP_ROWS")))] if name == WGRAD else [])


def _offsets_are_rows(t: torch.Tensor) -> bool:
    """Whether t's element (i, 0, y, x) sits at m * stride_w, m = (i h + y) w + x, for every (i, y, x)."""
    n, _, h, w = t.shape
    sn, _, sh, sw = t.stride()
    return all(i * sn + y * sh + x * sw == ((i * h + y) * w + x) * sw
               for i, y, x in itertools.product(range(n), range(h), range(w)))


def test_dense_rows_matches_the_offsets():
    shapes = [(2, 3, 4, 5), (1, 3, 4, 5), (2, 3, 1, 5), (2, 3, 4, 1), (3, 1, 1, 1), (1, 1, 1, 1), (2, 5, 3, 3)]
    checked = collections.Counter()
    for shape in shapes:
        base = torch.zeros(shape)
        big = torch.zeros(shape[:3] + (2 * shape[3],))
        views = {
            "nchw": base, "channels_last": base.contiguous(memory_format=CL),
            "sliced_w": big[..., ::2], "sliced_cl_c": torch.zeros(shape[0], 2 * shape[1], *shape[2:])
            .contiguous(memory_format=CL)[:, : shape[1]],
            "expanded": torch.zeros(1, 1, 1, 1).expand(shape),
            "nhcw": torch.zeros(shape[0], shape[2], shape[1], shape[3]).permute(0, 2, 1, 3),
            "hwnc": torch.zeros(shape[2], shape[3], shape[0], shape[1]).permute(2, 3, 0, 1),
        }
        for name, t in views.items():
            assert t.shape == shape
            n, _, h, w = shape
            expect = _offsets_are_rows(t)
            assert dense_rows(t.stride(), n, h, w) == expect, (name, shape, t.stride())
            checked[expect] += 1
    assert checked[True] > 5 and checked[False] > 5, checked   # both answers exercised


@pytest.mark.parametrize("layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_backward_against_reference(name, layout, kernel_device):
    """The generic conv backward (its g_acc made by the epilogue kernel, channels_last) with x and grad_y in
    `layout`."""
    case = CASES[name][0]
    dtype = torch.float32
    args = tc.make_inputs(case, dtype, layout, "full", kernel_device)
    with recorded_wgrad_flags() as seen:
        tc.check_backward(args, dtype, grad_layout=layout, tiles=TILES)
    x_dense = dense_rows(args["x"].stride(), *(args["x"].shape[i] for i in (0, 2, 3)))
    assert x_dense == (layout == "channels_last")
    assert seen["wgrad"] == {expected_flags(name, True, x_dense)}, seen


@pytest.mark.parametrize("dtype", tb.DTYPES)
@pytest.mark.parametrize("grad_layout", ["channels_last", "nchw"])
@pytest.mark.parametrize("name", list(CASES))
def test_conv_bn_train_backward_against_reference(name, grad_layout, dtype, kernel_device):
    """g_acc formed on load from grad_y (in `grad_layout`) and y (channels_last), x channels_last."""
    case = CASES[name][0]
    bn_case = tb.Case(case.N, case.C, case.K, case.H, case.W, case.R, case.stride[0], case.padding[0], case.groups)
    args = tb.make_inputs(bn_case, dtype, kernel_device, prologue=True, bias=True)
    layout = CL if grad_layout == "channels_last" else torch.contiguous_format
    with recorded_wgrad_flags() as seen:
        tb.check(args, dtype, needs_grad=tb.ALL, grad_layout=layout, tiles=TILES)
    assert seen["wgrad"] == {expected_flags(name, grad_layout == "channels_last")}, seen


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("name", ["3x3_s2_c24_aligned", "3x3_p1_wide_c24_aligned", "3x3_p1_c24_whole_2",
                                  "3x3_p1_g2_aligned"])
def test_without_prologue(name, dtype, kernel_device):
    """x read as is (every other test here has a prologue): the same paths, the loop-invariant positions relative to
    the step's first row without the prologue's x' beside them. The conv -> BN training backward, forming g_acc on
    load."""
    case = CASES[name][0]
    bn_case = tb.Case(case.N, case.C, case.K, case.H, case.W, case.R, case.stride[0], case.padding[0], case.groups)
    args = tb.make_inputs(bn_case, dtype, kernel_device, prologue=False, bias=True)
    with recorded_flags(lambda kernel, kw: [("wgrad", (kw.get("PROLOGUE"),) + tuple(kw.get(f) for f in (
            "FLAT_G", "FLAT_X", "ALIGNED_ROWS", "WHOLE_IMAGES", "TAP_ROWS")))] if kernel == WGRAD else []) as seen:
        tb.check(args, dtype, needs_grad=(True, True, True, False, False, True, True), grad_layout=CL, tiles=TILES)
    assert seen["wgrad"] == {(False,) + expected_flags(name, True)}, seen


def test_aligned_rows_matches_the_rows():
    """aligned_rows(P, Q, block) exactly when every block of rows starting at a multiple of the block (in an image of
    P x Q and the next) is (p0 + i // Q, q0 + i % Q) from its first row (p0, q0), in one image."""
    checked = collections.Counter()
    for P, Q, block in itertools.product((1, 2, 3, 4, 8), (1, 2, 3, 4, 5, 8, 16, 32), (4, 16)):
        rows = [((m // (P * Q)), (m % (P * Q)) // Q, m % Q) for m in range(2 * P * Q)]
        expect = all(rows[m0 + i] == (rows[m0][0], rows[m0][1] + i // Q, rows[m0][2] + i % Q)
                     for m0 in range(0, 2 * P * Q - block + 1, block) for i in range(block)) and (P * Q) % block == 0
        assert conv_bwd_mod.aligned_rows(P, Q, block) == expect, (P, Q, block)
        checked[expect] += 1
    assert checked[True] > 5 and checked[False] > 5, checked


def test_whole_images_matches_the_rows():
    """whole_images(P, Q, block) exactly when every block of rows starting at a multiple of the block is whole images:
    row i at (n0 + i // (P Q), i % (P Q) // Q, i % Q) from the block's first image n0, its first row at (n0, 0, 0)."""
    checked = collections.Counter()
    for P, Q, block in itertools.product((1, 2, 3, 4, 8), (1, 2, 3, 4, 5, 8, 16), (4, 16, 64)):
        rows = [((m // (P * Q)), (m % (P * Q)) // Q, m % Q) for m in range(3 * block)]
        expect = all(rows[m0][1:] == (0, 0) and rows[m0 + i] == (rows[m0][0] + i // (P * Q), i % (P * Q) // Q, i % Q)
                     for m0 in range(0, 2 * block + 1, block) for i in range(block))
        assert conv_bwd_mod.whole_images(P, Q, block) == expect, (P, Q, block)
        checked[expect] += 1
    assert checked[True] > 5 and checked[False] > 5, checked


def _runs(name, dtype, device):
    """Every output of a generic conv forward + backward and of a conv -> BN training backward, all channels_last."""
    case = CASES[name][0]
    torch.manual_seed(0)
    conv_args = tc.make_inputs(case, dtype, "channels_last", "full", device)
    y, stats = tc.run_fwd(conv_fwd, conv_args, True, tiles=forward_tiles(TILES))
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    gs = (torch.randn(2, y.shape[1], generator=torch.Generator().manual_seed(2)) * 0.1).to(device)
    out = list(tc.run_bwd(conv_bwd, grad_y.contiguous(memory_format=CL), gs, conv_args, y, [True] * 8, stats,
                          tiles=TILES))
    bn_case = tb.Case(case.N, case.C, case.K, case.H, case.W, case.R, case.stride[0], case.padding[0], case.groups)
    torch.manual_seed(3)
    a = tb.make_inputs(bn_case, dtype, device, bias=True)
    y, stats = conv_fwd(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], None, None, None,
                        False, a["stride"], a["padding"], a["dilation"], a["groups"], True)
    grads = tb.make_grads(y.shape, y.shape[1], dtype, device, grad_layout=CL)
    return out + list(tb.backward(conv_bn_bwd, grads, a, y, stats, tb.ALL, tiles=TILES))


@pytest.mark.parametrize("dtype", [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16")])
@pytest.mark.parametrize("name", ["1x1_s1_g2", "3x3_p1_g2", "3x3_p1_g2_aligned", "1x1_s2_whole",
                                  "3x3_s2_c8_whole", "3x3_p1_g2_whole_4", "3x3_p1_c24_whole_2",
                                  "3x3_s2_c24_aligned"])
def test_same_bits_as_the_strided_rows(name, dtype, kernel_device, monkeypatch):
    results = {}
    for mode in ("flat", "strided"):
        with monkeypatch.context() as m, recorded_wgrad_flags() as seen:
            if mode == "strided":
                m.setattr(conv_bwd_mod, "dense_rows", lambda *a: False)
                m.setattr(conv_bwd_mod, "aligned_rows", lambda *a: False)
                m.setattr(conv_bwd_mod, "whole_images", lambda *a: False)
            results[mode] = _runs(name, dtype, kernel_device)
        expect = {expected_flags(name, True)} if mode == "flat" else {(False, False, False, False, False)}
        assert seen["wgrad"] == expect, (mode, seen)
    for i, (a, b) in enumerate(zip(results["flat"], results["strided"])):
        assert (a is None) == (b is None), i
        if a is not None:
            assert torch.equal(a, b), f"output {i} differs between the flat and the strided rows"
