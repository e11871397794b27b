"""Every autotune config of every autotuned Triton kernel, each launched on its own and checked.

On a GPU the test session launches each autotuned kernel with its first config only (tests/conftest.py,
PE_KERNELS_TRITON_CONFIG in pe_kernels/triton/_common.py), and the autotuner itself returns only its winner's
output: a config that computes wrong results would go unseen. Here the launchers run config i of each kernel's
list explicitly (i over the longest list), on shapes with masked rows and columns, one and several GPU column
tiles per group (BLOCK_N 64), fp16 and fp32, forward with statistics and backward with every gradient, against the
float64 reference (budget: tests/_oracle.py). `test_the_autotuner_path` runs Triton's autotuner itself once (trials on
the same buffers, then the winner). Under the interpreter there are no configs to choose (the launchers pass one
explicit tile), so those tests need a GPU; the policy plumbing and the list of autotuned kernels are checked
everywhere.
"""

from __future__ import annotations

import importlib
import inspect

import pytest
import torch

import test_triton_conv as tc
from _devices import require_backend

common, conv_fwd_mod, conv_bwd_mod = (importlib.import_module(f"pe_kernels.triton.{name}")
                                      for name in ("_common", "conv_fwd", "conv_bwd"))

# kernel name -> (the launcher module whose `launch` runs it, its autotuned wrapper)
TUNED = {
    "_conv_fwd_kernel": (conv_fwd_mod, conv_fwd_mod._conv_fwd_kernel_tuned),
    "_conv_dgrad_kernel": (conv_bwd_mod, conv_bwd_mod._conv_dgrad_kernel_tuned),
    "_conv_bwd_epilogue_kernel": (conv_bwd_mod, conv_bwd_mod._conv_bwd_epilogue_kernel_tuned),
}
MAX_CONFIGS = max(len(tuned.configs) for _, tuned in TUNED.values())

CASES = {
    # M = 2*9*9 = 162 rows (masked last 128- and 64-row tiles); 16 channels per group: BLOCK_N 64, masked columns
    "3x3_pad1_g2": tc.Case(2, 16, 32, 9, 9, 3, 3, padding=(1, 1), groups=2),
    # 128 channels per group in and out: two 64-column blocks per group in the forward and the dgrad; stride 2
    "1x1_s2_g2_wide": tc.Case(2, 256, 256, 9, 9, 1, 1, stride=(2, 2), groups=2),
}
DTYPES = [pytest.param(torch.float16, id="fp16"), pytest.param(torch.float32, id="fp32")]


def _name(kernel) -> str:
    """The Python function's name under an Autotuner / JITFunction / InterpretedFunction."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel.__name__


def test_every_autotuned_kernel_is_listed():
    """A new @triton.autotune kernel must be added to TUNED (so that its configs are checked here)."""
    from triton.runtime.autotuner import Autotuner

    found = {}
    for module in (importlib.import_module(f"pe_kernels.triton.{m}")
                   for m in ("conv_fwd", "conv_bwd", "bn_apply", "bn_finalize")):
        for value in vars(module).values():
            if isinstance(value, Autotuner):
                found[_name(value)] = value
    assert set(found) == set(TUNED)
    assert all(found[name] is tuned for name, (_, tuned) in TUNED.items())


def test_launch_follows_the_config_policy(monkeypatch):
    """launch(): explicit tiles win; "first" runs the plain kernel with config 0's constexprs, warps and stages (the
    compile of that config's autotune trial); "autotune" runs the autotuned wrapper."""
    calls = []

    class Fake:
        def __init__(self, name, configs=()):
            self.name, self.configs = name, list(configs)

        def __getitem__(self, grid):
            return lambda *args, **kwargs: calls.append((self.name, args, kwargs))

    tuned = Fake("tuned", TUNED["_conv_fwd_kernel"][1].configs)
    kernel = Fake("kernel")
    for policy, tiles, expected in (
            ("first", {"BLOCK_M": 32}, ("kernel", {"A": 1, "BLOCK_M": 32})),
            ("first", None, ("kernel", {"A": 1, **tuned.configs[0].all_kwargs()})),
            ("autotune", None, ("tuned", {"A": 1}))):
        monkeypatch.setattr(common, "CONFIG_POLICY", policy)
        calls.clear()
        common.launch(kernel, tuned, (1,), (7,), {"A": 1}, tiles)
        assert calls == [(expected[0], (7,), expected[1])]
    assert common.config_policy_from_env(None) == "autotune" and common.config_policy_from_env(" First ") == "first"
    with pytest.raises(ValueError, match="PE_KERNELS_TRITON_CONFIG"):
        common.config_policy_from_env("fastest")


def test_forward_offers_256_rows_only_where_they_do_not_spill():
    """The forward's autotuner tries 128 and 256 rows (TALL_CONFIG) on launches of <= 64 columns with full tap steps
    and tensor-core operands, else 128 and 64 (256 rows spilled there, bench/kernel_audit.py), and beside a stored
    x' (STORE_XP) only with steps of <= 32 channels; the prune's inputs are in the autotune key (BLOCK_K follows from
    them), so a cached choice is always one it offered. The dgrad has no prune."""
    tuned = conv_fwd_mod._conv_fwd_kernel_tuned

    def rows(dtype, **kwargs):
        args = [None] * len(tuned.arg_names)
        args[tuned.arg_names.index("x_ptr")] = torch.empty(1, dtype=dtype)
        meta = dict(dict(BLOCK_N=64, BLOCK_K=64, TAP_STEPS=True, PRECISION="ieee", STORE_XP=False), **kwargs)
        return sorted(c.kwargs["BLOCK_M"] for c in common.tried_configs(tuned, tuple(args), meta))

    assert rows(torch.float16) == rows(torch.bfloat16) == [128, 256]
    assert rows(torch.float16, BLOCK_N=32) == [128, 256]
    assert rows(torch.float32, PRECISION="tf32") == [128, 256]
    assert rows(torch.float32) == [64, 128]   # IEEE fp32: tl.dot on FMAs, the tile in registers
    assert rows(torch.float16, BLOCK_N=128) == [64, 128]
    assert rows(torch.float16, TAP_STEPS=False) == [64, 128]
    assert rows(torch.float16, STORE_XP=True, BLOCK_K=32) == [128, 256]
    assert rows(torch.float16, STORE_XP=True, BLOCK_K=64) == [64, 128]
    assert {"BLOCK_N", "TAP_STEPS", "PRECISION", "STORE_XP"} <= set(tuned.keys)
    assert [c.kwargs["BLOCK_M"] for c in tuned.configs] == [128, 64, 256]   # config 0: the "first" policy's
    dgrad = conv_bwd_mod._conv_dgrad_kernel_tuned
    assert common.tried_configs(dgrad, (), {}) == dgrad.configs


@pytest.fixture
def force_config(monkeypatch):
    """force_config(i): the launchers run config i of each autotuned kernel (the last where its list is
    shorter); returns the set of (kernel, config index) that ran."""
    ran = set()

    def set_index(index):
        def launch(kernel, tuned, grid, args, meta, tiles):
            if tiles is not None:  # a caller's explicit tiles: not a config
                kernel[grid](*args, **meta, **tiles)
                return
            i = min(index, len(tuned.configs) - 1)
            ran.add((_name(kernel), i))
            kernel[grid](*args, **meta, **tuned.configs[i].all_kwargs())

        for module in {module for module, _ in TUNED.values()}:
            monkeypatch.setattr(module, "launch", launch)
        return ran

    return set_index


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", list(CASES.values()), ids=list(CASES))
@pytest.mark.parametrize("index", range(MAX_CONFIGS), ids=[f"config{i}" for i in range(MAX_CONFIGS)])
def test_every_config_is_correct(index, case, dtype, kernel_device, force_config):
    require_backend("triton")
    ran = force_config(index)
    args = tc.make_inputs(case, dtype, device=kernel_device)
    tc.check_forward(args, dtype)
    tc.check_forward(args, dtype, compute_stats=False)
    tc.check_backward(args, dtype)  # prologue, epilogue (recomputed acc), residual, grad_stats: every gradient
    plain = tc.make_inputs(case, dtype, features="plain", device=kernel_device)
    tc.check_backward(plain, dtype)  # the saved y as acc
    expected = {(name, min(index, len(tuned.configs) - 1)) for name, (_, tuned) in TUNED.items()}
    assert ran == expected, f"configs that ran: {sorted(ran)}"


@pytest.mark.gpu
def test_the_autotuner_path(kernel_device, triton_autotuner):
    """Triton's autotuner itself (trials of every config on the same buffers, then the winner), once."""
    require_backend("triton")
    assert common.CONFIG_POLICY == "autotune"
    dtype = torch.float16
    args = tc.make_inputs(CASES["3x3_pad1_g2"], dtype, device=kernel_device)
    tc.check_forward(args, dtype)
    tc.check_backward(args, dtype)
    for name, (_, tuned) in TUNED.items():
        if len(tuned.configs) > 1:
            assert tuned.cache, f"{name}: the autotuner never ran"
