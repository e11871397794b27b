"""Readable reasons for a triton backend that cannot run, where Triton itself says something cryptic:

* TRITON_INTERPRET=1 set after triton / pe_kernels.triton was imported (Triton: "0 active drivers");
* numpy missing under the interpreter (was reported as "triton is not installed");
* triton < 3.7's interpreter with numpy >= 2.4 ("only 0-dimensional arrays can be converted to Python scalars").

Each reason shows in backends() and in the BackendUnavailableError of a forced call. Versions and imports are
monkeypatched, so every case runs on CPU; two subprocess tests reproduce the real situations.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import pe_kernels
from pe_kernels import _backend, ops

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _require_triton_import():
    reason = _backend._import_error("triton")
    if reason is not None:
        pytest.skip(f"triton does not import: {reason}")


def _forced_triton_conv():
    with pe_kernels.use_backend("triton"):
        ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1))


def _run(code: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(autouse=True)
def _fresh_dispatch_answers():
    """These tests change by hand what the dispatcher's per-process answers depend on (module flags, versions,
    import state): forget them before and after each."""
    _backend.clear_choice_caches()
    yield
    _backend.clear_choice_caches()


@pytest.fixture
def versions(monkeypatch):
    """Set the versions _backend sees: versions(triton='3.6.0', numpy='2.5.2'); None = not installed."""
    def set_versions(**found):
        real = _backend._package_version
        monkeypatch.setattr(_backend, "_package_version", lambda name: found[name] if name in found else real(name))
    return set_versions


# --- the interpreter switched on after import -------------------------------------------------------------------

def test_interpreter_switched_on_after_import(monkeypatch):
    _require_triton_import()
    import pe_kernels.triton._common as common

    monkeypatch.setattr(common, "INTERPRET", False)  # as if pe_kernels.triton was imported without it
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    reason = pe_kernels.backends()["triton"].reason
    assert not pe_kernels.backends()["triton"].available
    assert "TRITON_INTERPRET=1 was set after" in reason and "pe_kernels.triton was imported" in reason
    assert "before importing triton or pe_kernels.triton" in reason
    with pytest.raises(pe_kernels.BackendUnavailableError, match="set TRITON_INTERPRET=1 before importing"):
        _forced_triton_conv()


def test_interpreter_switched_off_after_import(monkeypatch):
    _require_triton_import()
    import pe_kernels.triton._common as common

    monkeypatch.setattr(common, "INTERPRET", True)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # else "needs a CUDA device" comes first
    reason = _backend._static_reason("triton")
    assert reason is not None and "was 1 when" in reason and "now off" in reason


def test_interpreter_switched_on_after_import_subprocess():
    """The real sequence: import without the interpreter, then switch it on. Triton said '0 active drivers'."""
    _require_triton_import()
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "PE_KERNELS_BACKEND")}
    proc = _run("""
        import os, torch, pe_kernels, pe_kernels.triton
        from pe_kernels import ops
        os.environ["TRITON_INTERPRET"] = "1"
        try:
            with pe_kernels.use_backend("triton"):
                ops.conv_fused(torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1))
        except pe_kernels.BackendUnavailableError as exc:
            print("REASON:", exc)
        """, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON:" in proc.stdout and "before importing triton or pe_kernels.triton" in proc.stdout, proc.stdout


# --- numpy missing ----------------------------------------------------------------------------------------------

def test_numpy_missing_under_the_interpreter(monkeypatch, versions):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    versions(numpy=None)
    reason = pe_kernels.backends()["triton"].reason
    assert reason.startswith("numpy is missing") and "not installed" not in reason
    with pytest.raises(pe_kernels.BackendUnavailableError, match="numpy is missing"):
        _forced_triton_conv()


@pytest.mark.parametrize("missing,expected", [("numpy", "numpy is missing"),
                                              ("triton", "triton is not installed"),
                                              ("triton._C.libtriton", "failed to import")])
def test_import_failures_are_named(monkeypatch, missing, expected):
    exc = ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    monkeypatch.setattr(_backend, "_import_exception", lambda module: exc if module == "triton" else None)
    monkeypatch.setattr(_backend, "_package_version", lambda name: "2.3.5" if name == "numpy" else None)
    assert expected in _backend._static_reason("triton")


def test_numpy_missing_subprocess():
    """numpy made unimportable, interpreter on: the reason names numpy (it said 'triton is not installed')."""
    env = dict(os.environ, TRITON_INTERPRET="1")
    proc = _run("""
        import sys
        sys.modules["numpy"] = None  # import numpy now raises ModuleNotFoundError
        import pe_kernels
        print("REASON:", pe_kernels.backends()["triton"].reason)
        """, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "REASON: numpy is missing" in proc.stdout, proc.stdout


# --- triton < 3.7's interpreter with numpy >= 2.4 ---------------------------------------------------------------

def test_old_triton_interpreter_with_new_numpy(monkeypatch, versions):
    _require_triton_import()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(_backend, "_interpreter_import_mismatch", lambda: None)  # e.g. triton imported on a GPU
    versions(triton="3.6.0", numpy="2.5.2")
    reason = pe_kernels.backends()["triton"].reason
    for part in ("triton 3.6.0", "numpy 2.5.2", "only 0-dimensional arrays", "numpy < 2.4", "triton >= 3.8"):
        assert part in reason
    with pytest.raises(pe_kernels.BackendUnavailableError, match=r"numpy < 2\.4"):
        _forced_triton_conv()


@pytest.mark.parametrize("triton_version,numpy_version,conflict", [
    ("3.6.0", "2.4.0", True), ("3.6.0", "2.5.2", True), ("3.5.1", "2.4.0rc1", True),
    ("3.6.0", "2.3.5", False), ("3.8.0", "2.5.2", False), ("3.9.0", "2.4.6", False), ("3.6.0", None, False)])
def test_interpreter_numpy_conflict_versions(versions, triton_version, numpy_version, conflict):
    versions(triton=triton_version, numpy=numpy_version)
    assert (_backend._interpreter_numpy_conflict() is not None) == conflict


def test_old_triton_with_new_numpy_is_fine_without_the_interpreter(monkeypatch, versions):
    """The GPU image (triton 3.6, numpy 2.5.2) compiles kernels: only the interpreter has the numpy problem."""
    _require_triton_import()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_backend, "_interpreter_import_mismatch", lambda: None)  # this process did import it on
    versions(triton="3.6.0", numpy="2.5.2")
    assert _backend._static_reason("triton") is None
