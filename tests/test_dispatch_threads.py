"""The backend of the backward: the request in force when the forward ran governs its backward, on any thread.

use_backend() lives in a contextvar; autograd runs a CUDA backward on its own device thread, which does not see
it. Here the backward runs on another thread with an empty context (what that device thread sees), with
PE_KERNELS_BACKEND naming another backend, and spies on the backend modules record which backward kernels ran.
Tensors live on `kernel_device` (conftest.py): CPU under the Triton interpreter, CUDA on a GPU machine, where one
more test lets autograd's own device thread run the backward.
"""

import contextvars
import threading

import pytest
import torch

import pe_kernels
from _devices import require_backend
from pe_kernels import ops

BACKWARD_OPS = ("conv_fused_backward", "bn_apply_backward")


class Calls(list):
    """[(op, backend)] of the backward kernels called; `dispatches`: pe_kernels.last_dispatch() as each was called,
    on the thread that ran it (autograd's CUDA device thread, not the one that called backward())."""

    def __init__(self):
        super().__init__()
        self.dispatches = []


@pytest.fixture
def backward_calls(monkeypatch):
    """Calls for every backward kernel called, through spies on the backend modules."""
    require_backend("triton")
    import pe_kernels.reference as reference
    import pe_kernels.triton as triton_backend

    calls = Calls()
    for module, backend in ((reference, "torch"), (triton_backend, "triton")):
        for op in BACKWARD_OPS:
            def spy(*args, _real=getattr(module, op), _op=op, _backend=backend, **kwargs):
                calls.append((_op, _backend))
                calls.dispatches.append(pe_kernels.last_dispatch())
                return _real(*args, **kwargs)

            monkeypatch.setattr(module, op, spy)
    return calls


def _loss(device, fn=None):
    """A conv -> BN apply + ReLU chain on tiny inputs (`fn` wraps it, e.g. torch.compile): (loss, (x, w))."""
    x = torch.randn(2, 4, 5, 5, device=device, requires_grad=True)
    w = torch.randn(4, 2, 3, 3, device=device, requires_grad=True)
    scale, shift = torch.rand(4, device=device) + 0.5, torch.randn(4, device=device)

    def chain(x, w):
        y, _ = ops.conv_fused(x, w, out_scale=scale, out_shift=shift, padding=1, groups=2)
        return ops.bn_apply(y, scale, shift, relu=True).sum()

    run = chain if fn is None else fn(chain)
    return run(x, w), (x, w)


def _backward_on_fresh_thread(loss):
    """loss.backward() on another thread in an empty contextvars context (on CUDA autograd's device thread runs
    the backward ops: their dispatches are read by the spies, Calls.dispatches)."""
    result = {}

    def target():
        try:
            contextvars.Context().run(loss.backward)
        except BaseException as exc:  # re-raised on the test's thread
            result["error"] = exc

    thread = threading.Thread(target=target)
    thread.start()
    thread.join()
    if "error" in result:
        raise result["error"]


@pytest.mark.parametrize("forward,env", [("triton", "torch"), ("torch", "triton")])
def test_backward_on_another_thread_runs_the_forward_backend(forward, env, kernel_device, backward_calls,
                                                             monkeypatch):
    monkeypatch.setenv("PE_KERNELS_BACKEND", env)  # what a thread without the use_backend() context would pick
    with pe_kernels.use_backend(forward):
        loss, leaves = _loss(kernel_device)
    _backward_on_fresh_thread(loss)
    assert sorted(backward_calls) == sorted((op, forward) for op in BACKWARD_OPS)
    assert len(backward_calls.dispatches) == len(BACKWARD_OPS)
    for dispatch in backward_calls.dispatches:
        assert dispatch.op in BACKWARD_OPS and dispatch.backend == forward
        assert dispatch.reason == "requested when its forward ran"
    assert all(t.grad is not None for t in leaves)


def test_auto_forward_gives_auto_backward(kernel_device, backward_calls, monkeypatch):
    """An `auto` forward: its backward ops get auto's choice for themselves, not the other thread's request."""
    monkeypatch.setenv("PE_KERNELS_BACKEND", "triton")
    with pe_kernels.use_backend("auto"):
        loss, _ = _loss(kernel_device)
    _backward_on_fresh_thread(loss)
    assert len(backward_calls.dispatches) == len(BACKWARD_OPS)
    for (op, backend), dispatch in zip(backward_calls, backward_calls.dispatches):
        assert dispatch.op == op and dispatch.reason.startswith("auto") and dispatch.backend == backend
    if kernel_device.type == "cpu":
        assert {backend for _, backend in backward_calls} == {"torch"}  # auto runs CPU tensors on the reference path


def test_compiled_backward_on_another_thread(kernel_device, backward_calls, monkeypatch):
    """torch.compile(fullgraph=True): the request recorded when the graph was traced reaches the backward op."""
    monkeypatch.setenv("PE_KERNELS_BACKEND", "torch")
    with pe_kernels.use_backend("triton"):
        loss, leaves = _loss(kernel_device, lambda chain: torch.compile(chain, backend="aot_eager", fullgraph=True))
    _backward_on_fresh_thread(loss)
    assert backward_calls and {backend for _, backend in backward_calls} == {"triton"}
    assert all(t.grad is not None for t in leaves)


@pytest.mark.gpu
def test_backward_on_autograd_device_thread(kernel_device, backward_calls, monkeypatch):
    """On CUDA, autograd's own device thread runs the backward: it must still use the forward's backend."""
    monkeypatch.setenv("PE_KERNELS_BACKEND", "torch")
    with pe_kernels.use_backend("triton"):
        loss, _ = _loss(kernel_device)
        loss.backward()
    assert sorted(backward_calls) == sorted((op, "triton") for op in BACKWARD_OPS)


def test_forced_backward_that_cannot_run_raises(kernel_device, backward_calls, monkeypatch):
    """A recorded forced request never falls back: the backward op raises BackendUnavailableError."""
    from pe_kernels import _backend

    with pe_kernels.use_backend("triton"):
        loss, _ = _loss(kernel_device)
    real = _backend._call_reason
    monkeypatch.setattr(_backend, "_call_reason", lambda name, device, dtype: "it was switched off for this test"
                        if name == "triton" else real(name, device, dtype))
    with pytest.raises(pe_kernels.BackendUnavailableError, match="'triton' was requested for .*_backward"):
        _backward_on_fresh_thread(loss)
