"""Count the Triton compiles (and autotune benchmarking rounds) a pytest run triggers, with and without one config.

    python tools/count_suite_compiles.py [--json PATH] [pytest arguments...]     # e.g. tests/ -q -m "not slow"

Runs pytest in this process with a plugin that records every Triton launch's compile key (what Triton specialises
a kernel on: constexprs, warps, stages, pointer dtypes and alignment, int specialisation; the key function of
tools/count_triton_compiles.py) and prints a table per kernel:

  autotune    distinct compile keys when autotuned kernels compile every config of their list at each new
              autotune key (PE_KERNELS_TRITON_CONFIG=autotune, the default);
  first       distinct compile keys when they run their first config only (PE_KERNELS_TRITON_CONFIG=first, what
              tests/conftest.py selects on a GPU);
  autotune keys  distinct autotune keys (each one a benchmarking round of every config, autotuned only);
and, per test file, the compiles of the policy "first" that the file is the first to need (to balance a split of
the suite over several GPU calls: tests/conftest.py's PE_KERNELS_TEST_SHARD, tools/gpu_lab.sh's SUITE_SHARD).

On a GPU the kernels run compiled and the keys are the real ones (the autotuner's trials included) under the
session's policy; the other policy's column is derived from the same launches. Under the Triton interpreter
(no GPU) the launchers pass the interpreter's own tiles (BLOCK_N/BLOCK_K sized to the tiny test shapes, one
BLOCK_M) instead of the GPU's (BLOCK_N 64, BLOCK_K 64, 32 in fp32): the counts are then an estimate of the GPU's, with
each autotuned launch's configs substituted for its tile and warps. GPU-only tests are skipped there. The columns
`gpu autotune` / `gpu first` count the same launches with the tiles the launchers choose on a GPU (GPU_TILE_RULES,
the launchers' rules, through their helpers where they have one: conv BLOCK_N 64, BLOCK_K 64 (32 in fp32), the
wgrad's 64 (32 for the stem) x 64 x BLOCK_K, bn_apply's BLOCK_K <= 128, the merge's fixed blocks; no bf16
upcast): the closer estimate of what a GPU compiles.
A compile costs ~1 s or more on an H100 (tests/test_triton_compile_count.py); a benchmarking round ~0.1-0.3 s
per config (triton.testing.do_bench: 25 ms warm-up + 100 ms of repeats).
"""

from __future__ import annotations

import argparse
import collections
import importlib
import importlib.util
import inspect
import json
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def _tool():
    spec = importlib.util.spec_from_file_location("count_triton_compiles_for_suite",
                                                  REPO / "tools" / "count_triton_compiles.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _common():
    """pe_kernels.triton._common, imported when first needed: after tests/conftest.py has set TRITON_INTERPRET,
    which the package reads at import."""
    return importlib.import_module("pe_kernels.triton._common")


def _bn_apply_tiles(a: dict, backward: bool) -> dict:
    """bn_apply._tiles' GPU branch (the forward) or bn_apply.bwd_tiles' (the backward: BWD_TILE_ELEMS a step; its ROWS
    is a runtime argument); their interpreter branches differ."""
    block_k = _common().pow2_tile(a["K"], 16, 128)
    if backward:
        return dict(BLOCK_K=block_k, BLOCK_M=max(1, 2048 // block_k))
    return dict(BLOCK_K=block_k, BLOCK_M=max(16, 4096 // block_k))


def _gemm_tiles(n: int, dtype, length: int) -> dict:
    """The conv GEMMs' BLOCK_N (from the group width) and BLOCK_K (from the activations' dtype and the length it
    tiles) on a GPU."""
    return dict(BLOCK_N=_common().gpu_tile_n(n), BLOCK_K=_common().gpu_tile_k(dtype, length))


def _dgrad_tiles(a: dict) -> dict:
    """conv_bwd._dgrad_launch's GPU tiles: a recomputing dgrad (RECOMPUTE_Y) halves BLOCK_K and steps its recompute
    over BLOCK_C channels (32 in fp32, BLOCK_N otherwise; 16, unused, elsewhere)."""
    dtype = a["x_ptr"].dtype
    tiles = _gemm_tiles(a["C_g"], dtype, a["RSK"])
    if a.get("RECOMPUTE_Y"):
        return dict(tiles, BLOCK_K=max(16, tiles["BLOCK_K"] // 2),
                    BLOCK_C=32 if dtype == torch.float32 else tiles["BLOCK_N"], PART_M=64)
    return dict(tiles, BLOCK_C=16, PART_M=64)


def _wgrad_tiles(a: dict) -> dict:
    """conv_bwd's wgrad plan on a GPU: 64 rows a step (32 for the stem's 27-long reduction and for a recomputing
    wgrad)."""
    dtype = a["x_ptr"].dtype
    small = a["RSC"] < 32 or a.get("RECOMPUTE_Y")
    return dict(BLOCK_M=32 if small else 64, BLOCK_N=64, BLOCK_K=_common().gpu_tile_k(dtype, a["RSC"]))


# kernel -> constexprs the launchers choose on a GPU, from the bound arguments (pe_kernels/triton/*.py, 2026-11)
GPU_TILE_RULES = {
    "_conv_fwd_kernel": lambda a: dict(_gemm_tiles(a["K_g"], a["x_ptr"].dtype, a["RSC"]), PART_M=64),
    "_conv_dgrad_kernel": _dgrad_tiles,
    "_conv_bwd_epilogue_kernel": lambda a: dict(BLOCK_N=64, PART_M=64),
    "_conv_wgrad_kernel": _wgrad_tiles,
    "_bn_apply_kernel": lambda a: _bn_apply_tiles(a, False),
    "_bn_apply_bwd_kernel": lambda a: _bn_apply_tiles(a, True),
    "_stats_merge_kernel": lambda a: dict(BLOCK_S=128, BLOCK_K=32),
}


def _function(kernel):
    """The Python function under an Autotuner / JITFunction / InterpretedFunction."""
    while not inspect.isfunction(kernel):
        kernel = kernel.fn
    return kernel


class CompileCounter:
    """A pytest plugin: records the compile keys of every Triton launch of the session."""

    def __init__(self):
        self.tool = _tool()
        # (variant, kernel) -> keys; variant "raw" (as launched) or "gpu" (GPU_TILE_RULES, interpreter only)
        self.plain = collections.defaultdict(set)      # launches outside the autotuned path
        self.tuned_all = collections.defaultdict(set)  # every config of each autotuned launch
        self.tuned_first = collections.defaultdict(set)  # config 0 of each autotuned launch
        self.autotune_keys = collections.defaultdict(set)
        self.launches = collections.Counter()
        self.current_file = "?"                 # the test file running now
        self.first_seen: dict = {}              # key of the policy "first" (GPU tiles under the interpreter) -> file
        self._in_launch = 0
        self._saved = []

    # ---- keys
    def key(self, kernel, args: tuple, kwargs: dict, gpu_tiles: bool = False) -> tuple:
        if hasattr(kernel, "params"):  # a JITFunction (GPU): the tool's own key function
            return self.tool.compile_key(kernel, args, kwargs)
        fn = _function(kernel)  # an InterpretedFunction: constexprs from the annotations
        signature = inspect.signature(fn)
        bound = signature.bind(*args, **{k: v for k, v in kwargs.items() if k in signature.parameters})
        bound.apply_defaults()
        if gpu_tiles:
            rule = GPU_TILE_RULES.get(fn.__name__)
            if rule is not None:
                bound.arguments.update(rule(bound.arguments))
            if "UPCAST" in bound.arguments:
                bound.arguments["UPCAST"] = False
        no_spec = set(getattr(kernel, "kwargs", {}).get("do_not_specialize") or ())
        spec = []
        for name, param in signature.parameters.items():
            value = bound.arguments[name]
            if "constexpr" in str(param.annotation):
                spec.append(("constexpr", value))
            else:
                try:
                    spec.append(self.tool.specialize(value, name not in no_spec))
                except (TypeError, KeyError):
                    spec.append(("?", repr(value)))
        options = {k: v for k, v in kwargs.items() if k not in signature.parameters and v is not None}
        options.setdefault("num_warps", self.tool.DEFAULT_NUM_WARPS)
        options.setdefault("num_stages", self.tool.DEFAULT_NUM_STAGES)
        if options.get("num_ctas") == 1:
            del options["num_ctas"]
        return tuple(spec), tuple(sorted(options.items()))

    # ---- patches
    def install(self):
        from triton.runtime import jit

        common = importlib.import_module("pe_kernels.triton._common")
        modules = [importlib.import_module(f"pe_kernels.triton.{m}") for m in ("conv_fwd", "conv_bwd")]
        counter = self

        def counting_launch(original, interpret_block_m):
            def launch(kernel, tuned, grid, args, meta, tiles):
                # A caller's own tiles (a small-tile test; on a GPU any tiles) launch the plain kernel once: that
                # compile is recorded by the run hook. The interpreter's default tile stands for the GPU's configs.
                explicit = tiles is not None and (not common.INTERPRET or tiles != {"BLOCK_M": interpret_block_m})
                if explicit:
                    return original(kernel, tuned, grid, args, meta, tiles)
                name = _function(kernel).__name__
                configs = common.tried_configs(tuned, args, meta)
                for variant in counter.variants():
                    gpu = variant == "gpu"
                    counter.tuned_all[variant, name].update(
                        counter.key(kernel, args, {**meta, **c.all_kwargs()}, gpu) for c in configs)
                    first = counter.key(kernel, args, {**meta, **configs[0].all_kwargs()}, gpu)
                    counter.tuned_first[variant, name].add(first)
                    if variant == counter.variants()[-1]:
                        counter.first_seen.setdefault((name, first), counter.current_file)
                if len(configs) > 1:
                    counter.autotune_keys[name].add(counter.tool.autotune_key(tuned, args, meta))
                counter._in_launch += 1
                try:
                    return original(kernel, tuned, grid, args, meta, tiles)
                finally:
                    counter._in_launch -= 1
            return launch

        for module in modules:
            original = module.launch
            self._saved.append((module, "launch", original))
            module.launch = counting_launch(original, getattr(module, "_INTERPRET_BLOCK_M", 128))

        def wrap_run(cls):
            original = cls.run

            def run(kernel_self, *args, **kwargs):
                name = _function(kernel_self).__name__
                counter.launches[name] += 1
                if not counter._in_launch:
                    call = {k: v for k, v in kwargs.items() if k not in ("grid", "warmup")}
                    for variant in counter.variants():
                        key = counter.key(kernel_self, args, call, variant == "gpu")
                        counter.plain[variant, name].add(key)
                        if variant == counter.variants()[-1]:
                            counter.first_seen.setdefault((name, key), counter.current_file)
                return original(kernel_self, *args, **kwargs)

            self._saved.append((cls, "run", original))
            cls.run = run

        if common.INTERPRET:
            from triton.runtime.interpreter import InterpretedFunction
            wrap_run(InterpretedFunction)
        else:
            wrap_run(jit.JITFunction)
        # (on a GPU the Autotuner calls JITFunction.run once per trial: those run inside the launch wrapper)

    def variants(self) -> tuple:
        common = sys.modules.get("pe_kernels.triton._common")
        return ("raw", "gpu") if common is not None and common.INTERPRET else ("raw",)

    def uninstall(self):
        for owner, attr, value in reversed(self._saved):
            setattr(owner, attr, value)
        self._saved.clear()

    def pytest_collection_finish(self, session):
        try:
            self.install()
        except ImportError as exc:
            print(f"count_suite_compiles: pe_kernels.triton does not import ({exc}); nothing counted")

    def pytest_runtest_logstart(self, nodeid, location):
        self.current_file = nodeid.split("::")[0]

    def pytest_unconfigure(self, config):
        self.uninstall()

    # ---- report
    def summary(self) -> dict:
        common = importlib.import_module("pe_kernels.triton._common")
        names = sorted(set(self.launches) | {n for _, n in self.plain} | {n for _, n in self.tuned_all})
        rows = {}
        for n in names:
            row = {}
            for variant in self.variants():
                prefix = "" if variant == "raw" else "gpu_"
                row[prefix + "autotune"] = len(self.plain[variant, n] | self.tuned_all[variant, n])
                row[prefix + "first"] = len(self.plain[variant, n] | self.tuned_first[variant, n])
            row.update(autotune_keys=len(self.autotune_keys[n]), launches=self.launches[n])
            rows[n] = row
        columns = list(next(iter(rows.values()))) if rows else []
        total = {k: sum(r[k] for r in rows.values()) for k in columns}
        by_file = collections.Counter(self.first_seen.values())
        return dict(interpreter=bool(common.INTERPRET), kernels=rows, total=total,
                    new_compiles_by_file=dict(by_file.most_common()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], add_help=True)
    parser.add_argument("--json", help="also write the summary as JSON to this path")
    args, pytest_args = parser.parse_known_args(argv)
    import pytest

    counter = CompileCounter()
    rc = pytest.main(["-p", "no:cacheprovider", *pytest_args], plugins=[counter])
    summary = counter.summary()
    where = "under the interpreter (estimate of a GPU's)" if summary["interpreter"] else "compiled (GPU)"
    print(f"\nTriton compiles of this pytest run, {where}:")
    columns = list(summary["total"])
    print(f"{'kernel':30s} " + " ".join(f"{c.replace('_', ' '):>13s}" for c in columns))
    for name, r in list(summary["kernels"].items()) + [("total", summary["total"])]:
        print(f"{name:30s} " + " ".join(f"{r[c]:13d}" for c in columns))
    print("compiles first met in each test file (policy first" + (", GPU tiles" if summary["interpreter"] else "")
          + "; in run order):")
    for name, n in summary["new_compiles_by_file"].items():
        print(f"  {n:6d}  {name}")
    if args.json:
        Path(args.json).write_text(json.dumps(summary, indent=1))
    return int(rc)


if __name__ == "__main__":
    sys.exit(main())
