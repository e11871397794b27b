"""How many Triton kernels a model's first step compiles, counted offline (tools/count_triton_compiles.py).

Each distinct specialisation x autotune config costs ~1 s of compilation on the GPU before the first step runs;
each distinct autotune key a benchmarking round. The count is deterministic (launch metadata only), so a change
that multiplies constexpr flags, specialised integers or configs fails here. Measured 2026-11 for PE-(2,4,1)
fp16, train step + eval forward at batch 128, 32x32: 320 compiles and 96 autotune keys before the cut, 40 and
42 after; 41 and 42 since the stable statistics (issue 10) added one kernel, the Chan merge of the per-tile
[count, mean, M2] partials (one compile for every layer; it replaces a torch sum); 43 since issue 11 (launch-lean)
added two more, one compile each for every layer: `_bn_finalize_bwd_kernel` (the BN finalize backward in one launch,
replacing ATen ops) and `_sum_slots_kernel` (the fixed-order reduction of the bn_apply backward's partial sums,
replacing a torch sum); 42 since the Chan merge runs inside `_conv_fwd_kernel` (its last program per column block),
so `_stats_merge_kernel` is no longer compiled for a step (autotune keys unchanged: 42); 38 since the training
conv + BatchNorm became one forward launch and two backward ones (ops.conv_bn_train: the finalize runs in the conv's
last programs, the wgrad and dgrad form g_acc on load, the apply backward sums in-kernel), so a step no longer
compiles `_bn_finalize_kernel`, `_bn_finalize_bwd_kernel`, `_conv_bwd_epilogue_kernel` or `_sum_slots_kernel`
(autotune keys: 42); 28 after the spill-free configs (issue 12: one GEMM column tile, two autotune configs); 33 and
46 keys since the junctions (issue 12: a block head's dgrad runs the previous tail's backward in its epilogue, TAIL,
a variant of its own for the 16 heads and the stem's, whose extra tensor arguments' dtypes are in the autotune key);
42 compiles since the 1x1 convs' backward recomputes y (RECOMPUTE_Y: a variant of the dgrad and the wgrad for them)
and a shortcut conv joins its block's junction (TAIL_RES_SUM); 77 since the GEMMs specialise on their group widths
(issue 12: full tap steps when the channels divide the reduction tile, TAP_STEPS; 128-column tiles for groups of
128 and more; no column masks where the tiles divide the widths, EVEN_N, and the wgrad's EVEN_M / EVEN_K with
128-deep j tiles): the loops issue 10-40 % fewer SASS instructions per MMA (bench/kernel_audit.py), for ~35 more
compiles on a first step (cached on disk after it; autotune keys unchanged: 46); 81 since the 32-channel 3x3 layers
step 32 channels deep, one tap a step (gpu_tap_tile_k: their forward and dgrad compile their own); 86 since the wgrad
addresses rows dense over (n, p, q) as m times one stride (FLAT_G, FLAT_X: x's too in a 1x1 stride-1 conv, whose
wgrad compiles apart from the strided 1x1 and the 3x3 layers' it shared; loop SASS 470 -> 252) and splits only
each step's first row where the steps align with the image rows (ALIGNED_ROWS, TAP_ROWS: 3x3 428 -> 335); 84 since
the wgrad's steps of whole images (WHOLE_IMAGES: the 8 x 8 and 4 x 4 layers' wgrads, which compiled apart, one
aligned and one split per row, now share their kernels; 3x3 335 / 428 -> 243); the narrow groups' 1x1 reductions
stepping 32 deep in one tap (gpu_tile_k) left the count as it was; 92 since the forward's and the dgrad's tap steps
go 128 deep over groups of a multiple of 128 channels (conv_fwd.deep_steps: the eval forward of those layers, and
the dgrads reading a stored g_acc, compile apart from the 64-deep ones they shared; a 3x3 layer's eval forward 21.5
-> 16.6 us modelled) and the forward's prologue is read once where every step reads the same channels (PRO_ONCE:
those launches compile apart from the per-step ones); 97 (50 autotune keys) since two narrow groups share a program
in the eval forward and the dgrad (PACK: those launches compile apart from the one-group ones of the other layers)
and the 3x3 training forwards store x' for their wgrads (STORE_XP: the forward and the prologue-free wgrad compile
apart, the forward's autotune key holds the flag). Skip with `-m "not slow"` (a dry run of a ResNet-50 at batch
128 on CPU, ~15 s).
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TOOL = REPO / "tools" / "count_triton_compiles.py"

COMPILE_BUDGET = 97        # PE-(2,4,1) fp16, train step + eval forward
AUTOTUNE_KEY_BUDGET = 50


def _tool():
    spec = importlib.util.spec_from_file_location("count_triton_compiles_under_test", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


def _run(*args: str) -> str:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(TOOL), *args], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.slow
def test_pe_2_4_1_first_step_compiles_within_budget():
    summary = json.loads(_run("--model", "pe-2-4-1", "--dtype", "fp16", "--json"))
    assert summary["batch"] == 128 and summary["image"] == 32
    per_kernel = summary["compiles"]
    assert summary["total_compiles"] <= COMPILE_BUDGET, per_kernel
    assert summary["total_autotune_keys"] <= AUTOTUNE_KEY_BUDGET, summary["autotune_keys"]
    # every kernel family of a training step was reached (a dry run that launched nothing would pass the budget)
    assert set(per_kernel) == {"_conv_fwd_kernel", "_conv_dgrad_kernel", "_conv_wgrad_kernel", "_bn_apply_kernel",
                               "_bn_apply_bwd_kernel"}
    assert summary["total_launches"] > 200


@pytest.mark.slow
def test_launch_sequence_does_not_depend_on_data():
    out = _run("--verify")
    assert "identical" in out, out


def test_specialisation_mirrors_triton():
    """The tool's key function against the installed Triton's own specialisation, where it can be called."""
    tool = _tool()
    values = [1, 0, 16, 17, 48, 2**31, -1, True, 1.5, None, torch.empty(8, dtype=torch.float16),
              torch.empty(9, dtype=torch.float32)[1:]]
    expected = [("constexpr", 1), ("i32", "D"), ("i32", "D"), ("i32", ""), ("i32", "D"), ("i64", "D"),
                ("i32", ""), ("u1", None), ("fp32", None), ("constexpr", None), ("*fp16", "D"), ("*fp32", "")]
    assert [tool.specialize(v) for v in values] == expected
    assert tool.specialize(1, specialize_value=False) == ("i32", None)
    assert tool.specialize(32, specialize_value=False) == ("i32", None)
    try:
        from triton._C.libtriton import native_specialize_impl
        from triton.backends.compiler import BaseBackend
        native_specialize_impl(BaseBackend, 16, False, True, True)
    except (ImportError, TypeError) as exc:
        pytest.skip(f"this Triton has no native_specialize_impl(backend, arg, is_const, specialize, align): {exc}")
    for value, mine in zip(values, expected):
        assert tuple(native_specialize_impl(BaseBackend, value, False, True, True)) == mine, value


def test_compile_key_counts_flags_configs_and_specialised_ints():
    """Distinct constexprs, num_warps, int divisibility and pointer dtypes give distinct keys; do_not_specialize
    ints and tensor values do not."""
    import triton
    import triton.language as tl

    def body(x_ptr, n, m, FLAG: tl.constexpr):
        pass

    kernel = triton.JITFunction(body, do_not_specialize=["m"])
    tool = _tool()
    x = torch.zeros(16)

    def key(*args, **kwargs):
        return tool.compile_key(kernel, args, kwargs)

    assert key(x, 32, 5, FLAG=True) == key(torch.ones(16), 48, 7, FLAG=True)       # values, m unspecialised
    assert key(x, 32, 5, FLAG=True) != key(x, 33, 5, FLAG=True)                     # n % 16
    assert key(x, 32, 5, FLAG=True) != key(x, 1, 5, FLAG=True)                      # n == 1
    assert key(x, 32, 5, FLAG=True) != key(x, 32, 5, FLAG=False)                    # constexpr
    assert key(x, 32, 5, FLAG=True) != key(x.half(), 32, 5, FLAG=True)              # pointer dtype
    assert key(x, 32, 5, FLAG=True) == key(x, 32, 5, FLAG=True, num_warps=4, num_stages=3)  # defaults
    assert key(x, 32, 5, FLAG=True) != key(x, 32, 5, FLAG=True, num_warps=8)        # config
