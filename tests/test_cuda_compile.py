"""Compile-only check of the CUDA sources (no GPU needed): every csrc/*.cu for sm_80 and sm_90 with nvcc, and
csrc/binding.cpp against the torch headers (tools/cuda_compile_check.py). ~20 s on 2 cores."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))

import cuda_compile_check  # noqa: E402


def _need_nvcc():
    if cuda_compile_check.find_nvcc() is None:
        pytest.skip("nvcc not found (CUDA_HOME or PATH): CUDA sources cannot be compile-checked here")


def test_cuda_sources_and_binding_compile(tmp_path):
    _need_nvcc()
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no host C++ compiler for the binding check")
    out = tmp_path / "cc.json"
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "cuda_compile_check.py"), "--json", str(out)],
                          capture_output=True, text=True, timeout=900)
    print(proc.stdout[-6000:])
    assert proc.returncode == 0, proc.stdout[-8000:] + proc.stderr[-4000:]
    result = json.loads(out.read_text())
    sources = {r["source"] for r in result["results"]}
    assert {"conv_fwd.cu", "conv_bwd.cu", "bn.cu", "binding.cpp"} <= sources
    kernels = {k["name"] for r in result["results"] for k in r["kernels"]}
    archs = {k["arch"] for r in result["results"] for k in r["kernels"]}
    assert {"sm_80", "sm_90"} <= archs
    for family in ("conv_fwd_kernel", "conv_dgrad_kernel", "conv_wgrad_kernel", "conv_epilogue_bwd_kernel",
                   "bn_apply_kernel", "bn_apply_bwd_kernel", "bn_finalize_kernel", "reduce_partials_kernel",
                   "merge_stats_kernel"):
        assert any(family in k for k in kernels), family


def test_resource_usage_parser():
    text = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 4 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]"""
    (k,) = cuda_compile_check.parse_resource_usage(text)
    assert (k.kernel, k.arch, k.registers, k.spill_stores, k.spill_loads, k.smem) == ("_Z3fooPf", "sm_90", 40, 4, 4,
                                                                                      2048)
