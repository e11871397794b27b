"""pytest plugin: run the suite as a machine with CUDA would, on a machine without one.

    PYTHONPATH=tests python -m pytest -p _fake_cuda_plugin -m "not gpu"

torch.cuda.is_available() answers True (patched before conftest.py runs), so TRITON_INTERPRET stays unset and
`kernel_device` is cuda: every test takes the path it takes on a GPU machine, and whatever it tries on CUDA fails
for the one honest reason, there is no CUDA here. The terminal summary sorts the failures into those honest
ones and the rest; the rest are the suite's bugs (a kernel handed CPU tensors, an assumption that a backend is
absent...).
"""

from __future__ import annotations

import collections

import torch

torch.cuda.is_available = lambda: True

HONEST = (  # what CPU-only torch and Triton say when CUDA work is attempted without CUDA
    "Torch not compiled with CUDA enabled",
    "0 active drivers",
    "libcuda.so cannot found",
)
_failures: dict[str, list[str]] = collections.defaultdict(list)


def pytest_runtest_logreport(report):
    if not report.failed:
        return
    text = report.longreprtext
    reason = next((h for h in HONEST if h in text), None)
    _failures[f"no real CUDA here: {reason}" if reason else "NOT explained by the missing CUDA"].append(report.nodeid)


def pytest_terminal_summary(terminalreporter):
    tr = terminalreporter
    tr.section("fake CUDA: failures by reason")
    if not _failures:
        tr.write_line("no failures")
    for reason, ids in sorted(_failures.items()):
        tr.write_line(f"{len(ids):5d}  {reason}")
        if reason.startswith("NOT"):
            for nodeid in ids:
                tr.write_line(f"         {nodeid}")
