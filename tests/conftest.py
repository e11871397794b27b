"""Test set-up: Triton kernels run on CPU under the interpreter unless a GPU is present.

TRITON_INTERPRET must be set before any Triton kernel module is imported, so it is set here, at collection.
A test of the kernels (or of the `triton` backend) takes the `kernel_device` argument: it is parametrised with
the one device the kernels run on in this session, CUDA on a GPU machine, CPU under the interpreter elsewhere
(tests/_devices.py); the test id ends in [cuda] or [cpu]. GPU-only tests carry the `gpu` marker and are skipped
with a reason on a machine without CUDA.
Check that the suite is honest on a GPU machine without one: tests/_fake_cuda_plugin.py.

One Triton config per kernel on a GPU: unless PE_KERNELS_TRITON_CONFIG is set in the environment, the session runs
with pe_kernels.triton._common.CONFIG_POLICY = "first" (pe_kernels/triton/_common.py): an autotuned kernel is
launched with the first of its configs instead of compiling and benchmarking every config at each new autotune key
(autotuned, an H100 ran 39 tests in 565 s on 2026-11-22, ~115 s each for the bottleneck and tiny-ResNet
equivalence tests; tools/count_suite_compiles.py counts the compiles saved). The module attribute is set, not the
environment, so that subprocesses (tools/count_triton_compiles.py's dry runs) see the user's setting. Every config
is checked for correctness by tests/test_triton_configs.py, and the autotuner path by its test_the_autotuner_path,
which asks for the `triton_autotuner` fixture below. `PE_KERNELS_TRITON_CONFIG=autotune pytest ...` runs the whole
suite autotuned.

Split the suite over several calls (a GPU call lasts 10 minutes): PE_KERNELS_TEST_SHARD=i/n (1 <= i <= n) keeps the
i-th of n parts of the collected tests, whole test files in collection order, parts balanced by number of tests
(tools/gpu_lab.sh's `suite` stage: SUITE_SHARD).
"""

import importlib
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


def _session_config_policy() -> str:
    """The Triton config policy of this session (see the module docstring)."""
    if os.environ.get("PE_KERNELS_TRITON_CONFIG"):
        return os.environ["PE_KERNELS_TRITON_CONFIG"].strip().lower()
    return "first" if torch.cuda.is_available() else "autotune"


def pytest_report_header(config):
    device = kernel_device()
    if device.type == "cuda":
        how = f"compiled Triton, PE_KERNELS_TRITON_CONFIG policy {_session_config_policy()}"
    else:
        how = f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET')}"
    shard = os.environ.get("PE_KERNELS_TEST_SHARD")
    return f"pe_kernels tests: kernels run on {device.type} ({how})" + (f"; shard {shard}" if shard else "")


def _triton_common():
    try:
        return importlib.import_module("pe_kernels.triton._common")
    except Exception:  # no triton here: the tests that need it skip with the backend's reason
        return None


@pytest.fixture(scope="session", autouse=True)
def _triton_config_policy():
    """CONFIG_POLICY for the session: "first" on a GPU unless the environment chose (module docstring)."""
    common = _triton_common()
    if common is None:
        yield
        return
    old = common.CONFIG_POLICY
    common.CONFIG_POLICY = common.config_policy_from_env(_session_config_policy())
    try:
        yield
    finally:
        common.CONFIG_POLICY = old


@pytest.fixture
def triton_autotuner(monkeypatch):
    """For a test of the autotuned launch itself: Triton's autotuner for the duration of the test."""
    common = _triton_common()
    if common is None:
        pytest.skip("pe_kernels.triton does not import here")
    monkeypatch.setattr(common, "CONFIG_POLICY", "autotune")
    return common


def _shard(items, spec: str):
    """The items of part i of n (spec 'i/n'): whole files in collection order, parts balanced by test count."""
    try:
        index, count = (int(v) for v in spec.split("/"))
    except ValueError:
        raise pytest.UsageError(f"PE_KERNELS_TEST_SHARD={spec!r}: expected i/n, e.g. 1/2") from None
    if not 1 <= index <= count:
        raise pytest.UsageError(f"PE_KERNELS_TEST_SHARD={spec!r}: need 1 <= i <= n")
    files: dict = {}
    for item in items:
        files.setdefault(item.nodeid.split("::")[0], []).append(item)
    total, done, part, keep = len(items), 0, 1, []
    for group in files.values():
        # a file goes to the part its first test falls in when the tests are cut in n equal runs
        part = min(count, 1 + done * count // max(total, 1))
        if part == index:
            keep.extend(group)
        done += len(group)
    return keep


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
    shard = os.environ.get("PE_KERNELS_TEST_SHARD")
    if shard:
        keep = _shard(items, shard)
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[item for item in items if id(item) not in kept])
        items[:] = keep
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
