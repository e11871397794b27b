"""pe_kernels.triton conv_bn_train (conv with statistics + BatchNorm's training finalize in ONE launch) against
pe_kernels.reference.conv_bn_train, and against the triton backend's own two-launch composition.

Error budget (tests/_oracle.py): |kernel - ref64| <= 2 |torch_same_dtype - ref64| + atol for y, stats, scale, shift
and the running statistics after the call; num_batches_tracked exactly. The kernels run on `kernel_device`: CUDA on
a GPU machine, CPU under TRITON_INTERPRET=1 elsewhere (conftest.py). Small tiles (BLOCK_N = 16, K = 48) give three
column blocks per launch, each finalizing its own channels: num_batches_tracked must still be bumped once.
"""

from __future__ import annotations

import importlib

import pytest
import torch

import pe_kernels.reference as ref
import pe_kernels.triton as tri
from pe_kernels.ops.contract import composed_conv_bn_train
from pe_kernels.triton.conv_fwd import conv_bn_train

from _oracle import assert_budget
from test_triton_conv import DTYPES, Case, krsc_inputs, launches_per_call, make_inputs

common, conv_fwd_mod = (importlib.import_module(f"pe_kernels.triton.{name}") for name in ("_common", "conv_fwd"))

CASES = {
    "1x1_g1": Case(2, 16, 16, 4, 4, 1, 1),
    "3x3_s2_g4_batch1": Case(1, 12, 20, 8, 7, 3, 3, stride=(2, 2), padding=(1, 1), groups=4),
}
THREE_BLOCKS = Case(2, 8, 48, 6, 6, 3, 3, stride=(2, 2), padding=(1, 1))      # K = 48: three 16-column blocks
TWO_GROUPS = Case(2, 8, 48, 5, 5, 1, 1, groups=2)                               # 24 per group: four column blocks
SMALL_TILES = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16)
LAYOUTS = ["channels_last", "nchw", "sliced"]

# BN variants: (bn affine, running statistics, num_batches_tracked, momentum)
BN_VARIANTS = {
    "momentum": (True, True, True, 0.1),
    "cumulative": (True, True, True, None),
    "no_affine": (False, True, True, 0.1),
    "no_running": (True, False, True, 0.1),
    "no_nbt": (True, True, False, 0.1),
    "no_nbt_cumulative": (True, True, False, None),      # f = 0: the running statistics stay
    "nothing": (False, False, False, None),
}


def make_bn(K: int, variant: str, device, running_dtype=torch.float32) -> dict:
    """BatchNorm arguments for `variant` (BN_VARIANTS), drawn on CPU; nbt starts at 3 (a model mid-training)."""
    affine, running, has_nbt, momentum = BN_VARIANTS[variant]
    out = dict(bn_weight=None, bn_bias=None, eps=1e-5, running_mean=None, running_var=None,
               num_batches_tracked=None, momentum=momentum)
    if affine:
        out.update(bn_weight=(torch.rand(K) + 0.5).to(device), bn_bias=torch.randn(K).to(device))
    if running:
        out.update(running_mean=(torch.randn(K) * 0.1).to(device, running_dtype),
                   running_var=(torch.rand(K) + 0.5).to(device, running_dtype))
    if has_nbt:
        out["num_batches_tracked"] = torch.tensor(3, dtype=torch.int64, device=device)
    return out


def clone_args(args: dict, device=None, dtype=None) -> dict:
    """Copies of every tensor (the in-place running statistics of each run are their own), optionally moved."""
    def copy(k, v):
        if not isinstance(v, torch.Tensor):
            return v
        v = v.detach().clone()
        if device is not None:
            v = v.to(device)
        if dtype is not None and v.is_floating_point():
            v = v.to(dtype)
        return v
    return {k: copy(k, v) for k, v in args.items()}


def call(fn, a: dict, **kw):
    return fn(a["x"], a["weight"], a["bias"], a["in_scale"], a["in_shift"], a["in_relu"], a["stride"], a["padding"],
              a["dilation"], a["groups"], a["bn_weight"], a["bn_bias"], a["eps"], a["running_mean"], a["running_var"],
              a["num_batches_tracked"], a["momentum"], **kw)


def conv_bn_inputs(case: Case, dtype, layout="channels_last", features="full", variant="momentum", device=None,
                   running_dtype=torch.float32) -> dict:
    device = device or torch.device("cpu")
    args = make_inputs(case, dtype, layout, features, device)
    for k in ("out_scale", "out_shift", "residual", "out_relu"):
        args.pop(k)
    return dict(args, **make_bn(case.K, variant, device, running_dtype))


def check(args: dict, dtype, calls: int = 1, **kw) -> None:
    """`calls` successive calls of the kernel, of the same-dtype reference and of the float64 reference, each on
    its own copies of the running statistics; every output and the in-place state checked after each call."""
    kern, same, r64 = args, clone_args(args), clone_args(args, torch.device("cpu"), torch.float64)
    for i in range(calls):
        out = call(conv_bn_train, kern, **kw)
        out_same = call(ref.conv_bn_train, same)
        out64 = call(ref.conv_bn_train, r64)
        y, stats, scale, shift = out
        K = args["weight"].shape[0]
        assert y.dtype == dtype and y.is_contiguous(memory_format=torch.channels_last) and y.device == args["x"].device
        assert stats.dtype == torch.float32 and stats.shape == (2, K)
        for t in (scale, shift):
            assert t.dtype == torch.float32 and t.shape == (K,) and t.is_contiguous()
        for name, o, s, r in zip(("y", "stats", "scale", "shift"), out, out_same, out64):
            assert_budget(f"{name} (call {i})", o, s, r, dtype, dot=True)
        for name in ("running_mean", "running_var"):
            if kern[name] is not None:
                assert kern[name].dtype == same[name].dtype
                assert_budget(f"{name} (call {i})", kern[name], same[name], r64[name], dtype, dot=True)
        if kern["num_batches_tracked"] is not None:
            assert kern["num_batches_tracked"].dtype == torch.int64 and kern["num_batches_tracked"].dim() == 0
            assert kern["num_batches_tracked"].item() == r64["num_batches_tracked"].item() == 3 + i + 1


# ---------------------------------------------------------------------------------------------------- values
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
def test_conv_bn_train(case, layout, dtype, kernel_device):
    """Prologue (in_scale, in_shift, ReLU) and bias, momentum 0.1, every layout and dtype."""
    check(conv_bn_inputs(case, dtype, layout, "full", "momentum", kernel_device), dtype)


@pytest.mark.parametrize("variant", list(BN_VARIANTS))
@pytest.mark.parametrize("features", ["full", "plain"], ids=["prologue_bias", "no_prologue_no_bias"])
def test_bn_variants(features, variant, kernel_device):
    """Absent BN weight/bias, running statistics, num_batches_tracked; momentum None; two successive calls (the
    cumulative factor uses the bumped count: 1/4, then 1/5 from nbt = 3)."""
    check(conv_bn_inputs(CASES["3x3_s2_g4_batch1"], torch.float32, "channels_last", features, variant,
                         kernel_device), torch.float32, calls=2)


@pytest.mark.parametrize("variant", ["momentum", "cumulative", "no_nbt"])
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("case", [THREE_BLOCKS, TWO_GROUPS], ids=["3_blocks_g1", "4_blocks_g2"])
def test_column_blocks_race_for_nbt(case, dtype, variant, kernel_device):
    """Small tiles: several M tiles per column block and several column blocks, each finalizing its channels; the
    count is bumped once per call, and every counter is back at 0 after the launch."""
    check(conv_bn_inputs(case, dtype, "sliced", "full", variant, kernel_device), dtype, calls=2, tiles=SMALL_TILES)
    assert not common.stream_counters(8, kernel_device)[:8].any()


def test_cumulative_average_from_zero(kernel_device):
    """nbt 0 -> 1 (f = 1: the running statistics become the batch's) -> 2 (f = 1/2), as BatchNorm2d(momentum=None)."""
    args = conv_bn_inputs(THREE_BLOCKS, torch.float32, "channels_last", "plain", "cumulative", kernel_device)
    args["num_batches_tracked"].zero_()
    _, stats1, _, _ = call(conv_bn_train, args, tiles=SMALL_TILES)
    count = 2 * 3 * 3
    assert args["num_batches_tracked"].item() == 1
    torch.testing.assert_close(args["running_mean"], stats1[0], rtol=0, atol=0)
    torch.testing.assert_close(args["running_var"], stats1[1] / (count - 1), rtol=1e-6, atol=0)
    rm1, rv1 = args["running_mean"].clone(), args["running_var"].clone()
    args["x"] = args["x"] * 2 + 1
    _, stats2, _, _ = call(conv_bn_train, args, tiles=SMALL_TILES)
    assert args["num_batches_tracked"].item() == 2
    torch.testing.assert_close(args["running_mean"], (rm1 + stats2[0]) / 2, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(args["running_var"], (rv1 + stats2[1] / (count - 1)) / 2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("running_dtype", [torch.float16, torch.float64], ids=["fp16", "fp64"])
def test_running_stats_keep_dtype_and_strides(running_dtype, kernel_device):
    """Running statistics in another dtype and strided (views of a wider buffer), updated in place."""
    args = conv_bn_inputs(TWO_GROUPS, torch.float32, "channels_last", "full", "momentum", kernel_device,
                          running_dtype)
    for name in ("running_mean", "running_var"):
        wide = torch.zeros(2 * args[name].numel(), dtype=running_dtype, device=kernel_device)
        wide[::2] = args[name]
        args[name] = wide[::2]
    check(args, torch.float32, tiles=SMALL_TILES)


@pytest.mark.parametrize("variant", ["momentum", "cumulative"])
def test_equals_the_two_launch_composition(variant, kernel_device):
    """The contract's meaning: the triton backend's conv_fused (statistics) then bn_train_finalize. y and stats are
    the same launch's bit for bit; scale, shift and the running update are the same fp32 formulas."""
    args = conv_bn_inputs(THREE_BLOCKS, torch.float16, "nchw", "full", variant, kernel_device)
    composed = clone_args(args)
    out = call(conv_bn_train, args)
    expected = composed_conv_bn_train(tri, *call(lambda *a: a, composed))
    exact = kernel_device.type == "cpu"  # a GPU compiler may contract the formulas into FMAs differently
    for name, o, e in zip(("y", "stats", "scale", "shift"), out, expected):
        torch.testing.assert_close(o, e, rtol=0 if exact or name in ("y", "stats") else 1e-6, atol=0, msg=name)
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(args[name], composed[name], rtol=0 if exact else 1e-6, atol=0, msg=name)


# --------------------------------------------------------------------------------------------------- launches
@pytest.mark.parametrize("variant", ["momentum", "cumulative", "nothing"])
def test_one_launch(variant, kernel_device):
    """One Triton launch and no ATen kernel (weights KRSC as a caller caches them; identities and counters cached)."""
    args = krsc_inputs(conv_bn_inputs(CASES["3x3_s2_g4_batch1"], torch.float16, "channels_last", "full", variant,
                                      kernel_device))
    counted = launches_per_call(lambda: call(conv_bn_train, args))
    assert counted.totals() == (1, 0), (counted.triton, counted.aten)
    assert counted.triton == {"_conv_fwd_kernel": 1}


# --------------------------------------------------------------------------------------------------- autotune
def test_autotuner_restores_the_running_state():
    """The autotuner copies the in-place BN state before each trial and puts it back after (restore_value)."""
    tuned = conv_fwd_mod._conv_fwd_kernel_tuned
    assert list(tuned.restore_value) == conv_fwd_mod.RESTORED_ON_TRIALS
    assert set(conv_fwd_mod.RESTORED_ON_TRIALS) <= set(conv_fwd_mod._conv_fwd_kernel.arg_names)


@pytest.mark.parametrize("hooks", [True, False], ids=["restored", "not_restored"])
def test_autotune_trials_update_once(monkeypatch, hooks, kernel_device):
    """Triton's autotuner protocol replayed with the tuned kernel's own hooks (Autotuner._bench: pre_hook, run,
    post_hook per trial; then the winner's run): the running statistics and num_batches_tracked are updated once.
    Without the hooks (the control) each trial would update them again."""
    trials = (64, 128, 64)

    def replay(kernel, tuned_kernel, grid, args, meta, tiles):
        nargs = dict(zip(tuned_kernel.arg_names, args))
        for block_m in trials:
            if hooks:
                tuned_kernel.pre_hook(nargs)
            kernel[grid](*args, **meta, BLOCK_M=block_m)
            if hooks:
                tuned_kernel.post_hook(nargs, exception=None)
        kernel[grid](*args, **meta, BLOCK_M=128)   # the winner

    monkeypatch.setattr(conv_fwd_mod, "launch", replay)
    args = conv_bn_inputs(THREE_BLOCKS, torch.float32, "channels_last", "full", "cumulative", kernel_device)
    expected = clone_args(args)
    call(conv_bn_train, args, tiles={"BLOCK_M": 64})
    call(ref.conv_bn_train, expected)
    runs = 1 if hooks else 1 + len(trials)
    assert args["num_batches_tracked"].item() == 3 + runs
    if hooks:
        torch.testing.assert_close(args["running_mean"], expected["running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(args["running_var"], expected["running_var"], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_autotuned_launch_updates_once(triton_autotuner, kernel_device):
    """On a GPU, Triton's autotuner itself, at a key no other test tunes (K_g = 40, RSC = 7*7*3)."""
    case = Case(2, 3, 40, 9, 9, 7, 7, padding=(3, 3))
    args = conv_bn_inputs(case, torch.float16, "channels_last", "full", "cumulative", kernel_device)
    check(args, torch.float16, calls=2)


# ----------------------------------------------------------------------------------------------------- errors
def test_count_one_raises_after_the_bump(kernel_device):
    """N*P*Q = 1 with running statistics: ValueError, num_batches_tracked bumped, as bn_train_finalize."""
    args = conv_bn_inputs(Case(1, 4, 8, 1, 1, 1, 1), torch.float32, "channels_last", "full", "momentum",
                          kernel_device)
    expected = clone_args(args)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(ref.conv_bn_train, expected)
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        call(conv_bn_train, args)
    assert args["num_batches_tracked"].item() == expected["num_batches_tracked"].item() == 4
    assert torch.equal(args["running_mean"], expected["running_mean"])


def test_count_one_without_running_stats(kernel_device):
    check(conv_bn_inputs(Case(1, 4, 8, 1, 1, 1, 1), torch.float32, "channels_last", "full", "no_running",
                         kernel_device), torch.float32)


def test_empty_batch_raises(kernel_device):
    args = conv_bn_inputs(Case(0, 4, 8, 3, 3, 1, 1), torch.float32, "channels_last", "full", "momentum",
                          kernel_device)
    with pytest.raises(ValueError, match="empty"):
        call(conv_bn_train, args)
    assert args["num_batches_tracked"].item() == 3


BAD = {
    "bn_weight_length": (lambda a: dict(a, bn_weight=a["bn_weight"][:-1]), ValueError, "bn_weight"),
    "bn_bias_2d": (lambda a: dict(a, bn_bias=a["bn_bias"].view(1, -1)), ValueError, "bn_bias"),
    "bn_weight_int": (lambda a: dict(a, bn_weight=a["bn_weight"].long()), TypeError, "bn_weight"),
    "running_mean_alone": (lambda a: dict(a, running_var=None), ValueError, "running_mean and running_var"),
    "running_var_length": (lambda a: dict(a, running_var=a["running_var"][:3]), ValueError, "running_var"),
    "nbt_float": (lambda a: dict(a, num_batches_tracked=a["num_batches_tracked"].float()), ValueError,
                  "num_batches_tracked"),
    "weight_channels": (lambda a: dict(a, weight=a["weight"][:, :-1]), ValueError, "input channels per group"),
    "x_rank": (lambda a: dict(a, x=a["x"][0]), ValueError, "x must be 4-D"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_arguments(name, kernel_device):
    edit, error, match = BAD[name]
    args = edit(conv_bn_inputs(CASES["3x3_s2_g4_batch1"], torch.float32, "channels_last", "full", "momentum",
                               kernel_device))
    nbt = args["num_batches_tracked"]
    with pytest.raises(error, match=match):
        call(conv_bn_train, args)
    if nbt is not None and not nbt.is_floating_point():
        assert nbt.item() == 3  # nothing launched
