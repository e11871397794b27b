"""The backend registry (pe_kernels.register_backend): a backend is found by name through it — use_backend,
PE_KERNELS_BACKEND, backends(), autotune's candidates — not through names written into the dispatcher."""

import pytest
import torch

import pe_kernels
from pe_kernels import _backend, ops


class _Calls:
    """A backend module: the reference's functions, counting the calls (a stand-in for a new kernel backend)."""

    def __init__(self):
        import pe_kernels.reference as reference

        self.calls = []
        for name in dir(reference):
            value = getattr(reference, name)
            if callable(value) and not name.startswith("_"):
                setattr(self, name, self._counted(name, value))

    def _counted(self, name, fn):
        def call(*args, **kwargs):
            self.calls.append(name)
            return fn(*args, **kwargs)
        return call


@pytest.fixture
def toy(monkeypatch):
    import sys
    import types

    calls = _Calls()
    module = types.ModuleType("pe_kernels_toy_backend")
    module.__dict__.update({k: v for k, v in vars(calls).items() if k != "calls"})
    monkeypatch.setitem(sys.modules, "pe_kernels_toy_backend", module)
    pe_kernels.register_backend(pe_kernels.BackendSpec(
        "toy", "pe_kernels_toy_backend", unavailable=lambda: None,
        call_reason=lambda device, dtype: None if dtype == torch.float32 else f"toy handles float32, not {dtype}",
        runs_on=lambda: "the test's toy"))
    yield calls
    _backend.unregister_backend("toy")


def test_a_registered_backend_is_selectable_and_listed(toy):
    assert "toy" in pe_kernels.backend_names()
    assert pe_kernels.backends()["toy"] == _backend.BackendStatus("toy", True, "the test's toy")
    x, w = torch.randn(2, 4, 5, 5), torch.randn(4, 4, 3, 3)
    with pe_kernels.use_backend("TOY"):
        y, _ = ops.conv_fused(x, w, padding=1)
        assert pe_kernels.last_dispatch().backend == "toy"
    assert toy.calls == ["conv_fused"]
    torch.testing.assert_close(y, torch.nn.functional.conv2d(x, w, padding=1))


def test_a_registered_backend_refuses_with_its_reason(toy):
    x, w = torch.randn(2, 4, 5, 5, dtype=torch.float16), torch.randn(4, 4, 3, 3, dtype=torch.float16)
    with pe_kernels.use_backend("toy"), pytest.raises(pe_kernels.BackendUnavailableError,
                                                      match="toy handles float32, not torch.float16"):
        ops.conv_fused(x, w)


def test_the_environment_variable_sees_registered_backends(toy, monkeypatch):
    monkeypatch.setenv("PE_KERNELS_BACKEND", "toy")
    assert _backend.requested_backend() == "toy"
    _backend.unregister_backend("toy")
    with pytest.raises(ValueError, match=r"PE_KERNELS_BACKEND='toy'.*torch, triton, cuda, auto"):
        _backend.requested_backend()
    pe_kernels.register_backend(_backend.BackendSpec("toy", "pe_kernels_toy_backend", lambda: None,
                                                     lambda d, t: None, lambda: ""))


@pytest.mark.parametrize("name", ["auto", "Bad", "9x", ""])
def test_bad_names_are_refused(name):
    with pytest.raises(ValueError, match="backend name must be"):
        pe_kernels.register_backend(_backend.BackendSpec(name, "m", lambda: None, lambda d, t: None, lambda: ""))


def test_built_in_backends_cannot_be_removed_and_specs_are_checked():
    with pytest.raises(ValueError, match="built-in"):
        _backend.unregister_backend("triton")
    with pytest.raises(TypeError, match="BackendSpec"):
        pe_kernels.register_backend(("toy", "module"))
