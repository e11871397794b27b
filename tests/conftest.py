"""Test set-up: Triton kernels run on CPU under the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at collection.
A test of the kernels (or of the `triton` backend) takes the `kernel_device` argument: it is parametrised with
the one device the kernels run on in this session, CUDA on a GPU machine, CPU under the interpreter elsewhere
(tests/_devices.py); the test id ends in [cuda] or [cpu]. GPU-only tests carry the `gpu` marker and are skipped
with a reason on a machine without CUDA.
Check that the suite is honest on a GPU machine without one: tests/_fake_cuda_plugin.py.
"""

import os
import tempfile

import pytest
import torch

from _devices import kernel_device

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# `auto` reads pe_kernels.autotune's on-disk choices: tests must not see a developer's own cache, nor tune on first
# call because the developer's shell asked for it.
os.environ["PE_KERNELS_CACHE_DIR"] = tempfile.mkdtemp(prefix="pe_kernels_test_cache_")
os.environ.pop("PE_KERNELS_AUTOTUNE", None)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped on CPU-only machines)")
    config.addinivalue_line("markers", "slow: long CPU test")


def pytest_report_header(config):
    device = kernel_device()
    how = "compiled Triton" if device.type == "cuda" else f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    return f"pe_kernels tests: kernels run on {device.type} ({how})"


def pytest_generate_tests(metafunc):
    if "kernel_device" not in metafunc.fixturenames:
        return
    for mark in metafunc.definition.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if "kernel_device" in names:
            return  # the test chose its devices itself
    device = kernel_device()
    metafunc.parametrize("kernel_device", [device], ids=[device.type])


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
