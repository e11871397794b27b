"""Drop-in parity with torch / torch-uncertainty, and fused paths taken only when exactly equivalent (issue 10).

The oracle is the same module run as stock PyTorch (pe_kernels.models.eager_twin: nn.Conv2d -> BatchNorm2d ->
ReLU, module by module), in fp32, running statistics included. Kernel tests run on the `torch` and `triton`
backends (Triton on CPU under the interpreter, on CUDA on a GPU machine).
"""

import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules import module as torch_module
from torch.nn.utils import parametrize, prune

from _bn import randomize_bn as _randomize_bn
import pe_kernels
from _devices import ieee_fp32, kernel_device, require_backend
from pe_kernels import _backend
from pe_kernels import functional as PF
from pe_kernels.models import batched_resnet, eager_twin, mimo_resnet, packed_resnet, resnet
from pe_kernels.nn import (BasicBlock, BatchConv2d, BatchLinear, Bottleneck, PackedBasicBlock, PackedBottleneck,
                           PackedConv1d, PackedConv2d, PackedConv3d, PackedConvBNReLU2d, PackedLinear)
from pe_kernels.ops._common import pair

KERNEL_OPS = {"conv_fused", "bn_apply", "bn_finalize", "bn_running_update"}


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """(name, device) with use_backend(name) in force; triton on kernel_device() (CPU under the interpreter)."""
    name = request.param
    if name == "triton":
        require_backend("triton")
    device = kernel_device() if name == "triton" else torch.device("cpu")
    with pe_kernels.use_backend(name), ieee_fp32():
        yield name, device


# ---- the modules under test, tiny: (factory, input channels) --------------------------------------------------
def packed_conv():
    return PackedConv2d(4, 8, 3, alpha=2, num_estimators=2, padding=1, minimum_channels_per_group=1)


def conv_bn_relu():
    return PackedConvBNReLU2d(4, 4, 3, alpha=2, num_estimators=2, padding=1, minimum_channels_per_group=1)


def packed_bottleneck():  # 8 -> 16 channels, with a shortcut (PackedConv2d + BN)
    return PackedBottleneck(4, 2, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1)


def packed_basic():  # no shortcut
    return PackedBasicBlock(4, 4, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1)


def basic():  # stride 2, shortcut nn.Conv2d + BN
    return BasicBlock(4, 8, 2, dropout_rate=0, groups=1, conv_bias=False)


MODULES = {"PackedConv2d": (packed_conv, 8), "PackedConvBNReLU2d": (conv_bn_relu, 8),
           "PackedBottleneck": (packed_bottleneck, 8), "PackedBasicBlock": (packed_basic, 8),
           "BasicBlock": (basic, 4)}

# (module, path of a bypassed submodule)
BYPASSED = [("PackedConv2d", "conv"),
            ("PackedConvBNReLU2d", "conv"), ("PackedConvBNReLU2d", "conv.conv"), ("PackedConvBNReLU2d", "bn"),
            ("PackedBottleneck", "conv1"), ("PackedBottleneck", "conv2.conv"), ("PackedBottleneck", "bn3"),
            ("PackedBottleneck", "dropout"), ("PackedBottleneck", "shortcut"), ("PackedBottleneck", "shortcut.0.conv"),
            ("PackedBottleneck", "shortcut.1"), ("PackedBasicBlock", "bn1"),
            ("BasicBlock", "conv1"), ("BasicBlock", "bn2"), ("BasicBlock", "shortcut.0")]




def _pair(name, device, train=True):
    """(ours, stock-PyTorch twin with the same weights, input channels)."""
    factory, cin = MODULES[name]
    ours = _randomize_bn(factory()).to(device).train(train)
    return ours, eager_twin(ours), cin


def _input(cin, device, batch=2, size=5):
    return torch.randn(batch, cin, size, size, device=device)


def _assert_same_step(ours, twin, x, atol=1e-5):
    """Outputs, input/parameter gradients and buffers of one forward + backward agree."""
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, ref = ours(xa), twin(xb)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=atol)
    g = torch.randn_like(ref)
    (out * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=atol * 10)
    for (name, p), (_, q) in zip(ours.named_parameters(), twin.named_parameters()):
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=atol * 10, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, c) in zip(ours.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(b, c, rtol=1e-5, atol=atol, msg=lambda m: f"{name}: {m}")
    return out


def _dispatch_of_forward(module, cin, device):
    """last_dispatch() after a forward alone (a backward on this thread records its own ops)."""
    module(_input(cin, device))
    return pe_kernels.last_dispatch()


def _hook(module, kind, calls):
    def count(*args):
        calls.append(kind)

    register = {"forward_pre": module.register_forward_pre_hook, "forward": module.register_forward_hook,
                "backward": module.register_full_backward_hook}[kind]
    return register(count)


# ---- 1. PackedLinear ---------------------------------------------------------------------------------------------
def test_packed_linear_bias_false_state_dict():
    """bias=False builds (it raised KeyError) and has torch-uncertainty's state_dict: 'weight' only."""
    layer = PackedLinear(8, 6, alpha=2, num_estimators=2, bias=False)
    assert layer.bias is None
    assert list(layer.state_dict()) == ["weight"]
    assert list(PackedLinear(8, 6, alpha=2, num_estimators=2).state_dict()) == ["weight", "bias"]
    x = torch.randn(3, 16)
    torch.testing.assert_close(layer(x), x @ torch.block_diag(*layer.weight).T)


def _calls_during(fn):
    """Names of the torch functions that `fn()` called (a TorchFunctionMode spy)."""
    names = []

    class Spy(torch.overrides.TorchFunctionMode):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            names.append(getattr(func, "__name__", str(func)))
            return func(*args, **(kwargs or {}))

    with Spy():
        out = fn()
    return out, names


@pytest.mark.parametrize("implementation, marker", [("einsum", "einsum"), ("conv1d", "conv1d"),
                                                    ("full", "block_diag"), ("sparse", "_sparse_mm")])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("first, last", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("lead", [(3,), (2, 3)], ids=["2d", "3d"])
def test_packed_linear_implementations(implementation, marker, bias, first, last, lead):
    """Each implementation runs its own way and computes the same block-diagonal map, gradients included."""
    layer = PackedLinear(8, 6, alpha=2, num_estimators=2, gamma=2, bias=bias, first=first, last=last,
                         implementation=implementation)
    x = torch.randn(*lead, 8 if first else 16, requires_grad=True)
    out, called = _calls_during(lambda: layer(x))
    assert marker in called, called
    others = {"einsum", "conv1d", "block_diag", "_sparse_mm"} - {marker}
    assert not others & set(called), called
    # oracle: the dense block-diagonal matrix, written out
    xr = x.detach().clone().requires_grad_()
    w = layer.weight.detach().clone().requires_grad_()
    b = None if layer.bias is None else layer.bias.detach().clone().requires_grad_()
    dense = torch.zeros(w.shape[0] * w.shape[1], w.shape[0] * w.shape[2])
    for g in range(w.shape[0]):
        dense = dense.index_put((torch.arange(w.shape[1])[:, None] + g * w.shape[1],
                                 torch.arange(w.shape[2])[None, :] + g * w.shape[2]), w[g])
    ref = xr @ dense.T + (0 if b is None else b)
    if last:
        m = layer.num_estimators
        ref = ref.reshape(lead[0], *lead[1:], m, -1).movedim(-2, 0).reshape(m * lead[0], *lead[1:], -1)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(ref)
    (out * grad).sum().backward()
    (ref * grad).sum().backward()
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(layer.weight.grad, w.grad)
    if bias:
        torch.testing.assert_close(layer.bias.grad, b.grad)


def test_packed_linear_unknown_implementation():
    with pytest.raises(ValueError, match="conv1d"):
        PackedLinear(8, 6, alpha=2, num_estimators=2, implementation="dense")
    with pytest.raises(ValueError, match="einsum"):
        PF.packed_linear(torch.randn(2, 4), torch.randn(2, 3, 2), None, implementation="dense")


# ---- 2. fused paths only when exactly equivalent -----------------------------------------------------------------
@pytest.mark.parametrize("name", list(MODULES))
@pytest.mark.parametrize("train", [True, False])
def test_no_hooks_takes_the_fused_path(backend, name, train):
    ours, twin, cin = _pair(name, backend[1], train)
    _assert_same_step(ours, twin, _input(cin, backend[1]))
    dispatch = _dispatch_of_forward(ours, cin, backend[1])
    assert dispatch.op in KERNEL_OPS and dispatch.backend == backend[0], dispatch


@pytest.mark.parametrize("name, path", BYPASSED, ids=[f"{n}.{p}" for n, p in BYPASSED])
@pytest.mark.parametrize("backend, kind", [("torch", "forward_pre"), ("torch", "forward"), ("torch", "backward"),
                                           ("triton", "forward_pre")],  # the interpreter is slow: one kind
                         indirect=["backend"])
def test_hooks_on_bypassed_submodules_fire(backend, name, path, kind):
    """A hooked submodule is called (its hook fires) and the result is the module chain's; unhooked, fused again."""
    train = kind != "forward"  # eval for one kind: the folded-BN fused path is bypassed too
    ours, twin, cin = _pair(name, backend[1], train)
    calls = []
    handle = _hook(ours.get_submodule(path), kind, calls)
    _assert_same_step(ours, twin, _input(cin, backend[1]))
    assert calls == [kind], calls
    dispatch = _dispatch_of_forward(ours, cin, backend[1])
    assert (dispatch.op, dispatch.backend) == (name, "modules") and path in dispatch.reason, dispatch
    assert kind.replace("_", " ") in dispatch.reason
    handle.remove()
    assert _dispatch_of_forward(ours, cin, backend[1]).op in KERNEL_OPS


def test_global_module_hooks_fire(backend):
    ours, twin, cin = _pair("PackedConvBNReLU2d", backend[1])
    calls = []
    handles = [torch_module.register_module_forward_hook(lambda m, i, o: calls.append(type(m).__name__))]
    try:
        ours(_input(cin, backend[1]))
        assert "global module hook" in pe_kernels.last_dispatch().reason
    finally:
        for h in handles:
            h.remove()
    assert sorted(calls) == sorted(["PackedConvBNReLU2d", "PackedConv2d", "Conv2d", "BatchNorm2d"])


@pytest.mark.parametrize("name, path", [("PackedConv2d", "conv"), ("PackedConvBNReLU2d", "conv.conv"),
                                        ("PackedBottleneck", "conv1.conv"), ("PackedBottleneck", "shortcut.0.conv"),
                                        ("BasicBlock", "conv1")])
def test_pruned_weights_are_used_and_train(backend, name, path):
    """prune.l1_unstructured recomputes `weight` in a forward pre-hook: two SGD steps equal the pruned twin's."""
    ours, twin, cin = _pair(name, backend[1])
    for module in (ours, twin):
        prune.l1_unstructured(module.get_submodule(path), "weight", amount=0.5)
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (ours, twin)]
    for step in range(2):
        for opt in opts:
            opt.zero_grad()
        _assert_same_step(ours, twin, _input(cin, backend[1]))
        for opt in opts:
            opt.step()
    assert "pruned" in _dispatch_of_forward(ours, cin, backend[1]).reason
    pruned = ours.get_submodule(path)
    assert (pruned.weight == 0).float().mean() >= 0.5
    torch.testing.assert_close(pruned.weight_orig, twin.get_submodule(path).weight_orig)


class Doubled(nn.Module):
    def forward(self, weight):
        return 2 * weight


@pytest.mark.parametrize("name, path", [("PackedConv2d", "conv"), ("PackedConvBNReLU2d", "conv.conv"),
                                        ("PackedBasicBlock", "conv2.conv")])
def test_parametrized_weights_are_used(backend, name, path):
    ours, twin, cin = _pair(name, backend[1])
    for module in (ours, twin):
        parametrize.register_parametrization(module.get_submodule(path), "weight", Doubled())
    _assert_same_step(ours, twin, _input(cin, backend[1]))
    assert "parametrized" in _dispatch_of_forward(ours, cin, backend[1]).reason


class ScaledBN(nn.BatchNorm2d):
    """A BatchNorm2d subclass with a forward of its own."""

    def forward(self, x):
        return super().forward(x) * 0.5 + 1.0


class ShiftedConv(nn.Conv2d):
    def forward(self, x):
        return super().forward(x) + 1.0


def _replace(module, path, cls):
    """Swap the submodule at `path` for an instance of `cls` with the same state."""
    old = module.get_submodule(path)
    new = copy.deepcopy(old)
    new.__class__ = cls
    parent, _, leaf = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, leaf, new)


@pytest.mark.parametrize("name, path, cls", [
    ("PackedConvBNReLU2d", "bn", ScaledBN), ("PackedBottleneck", "bn2", ScaledBN),
    ("PackedBottleneck", "shortcut.1", ScaledBN), ("BasicBlock", "bn1", ScaledBN),
    ("PackedConv2d", "conv", ShiftedConv), ("PackedConvBNReLU2d", "conv.conv", ShiftedConv),
    ("BasicBlock", "conv2", ShiftedConv)])
@pytest.mark.parametrize("train", [True, False])
def test_subclasses_with_their_own_forward_are_honoured(backend, name, path, cls, train):
    ours, _, cin = _pair(name, backend[1], train)
    _replace(ours, path, cls)
    twin = eager_twin(ours)
    _assert_same_step(ours, twin, _input(cin, backend[1]))
    assert f"is {cls.__name__}, not nn." in _dispatch_of_forward(ours, cin, backend[1]).reason


def test_batch_conv2d_hooks_fire():
    layer = BatchConv2d(4, 6, 3, num_estimators=2, padding=1)
    calls = []
    layer.conv.register_forward_pre_hook(lambda m, i: calls.append(1))
    x = torch.randn(4, 4, 5, 5)
    torch.testing.assert_close(layer(x), layer.forward_eager(x))
    assert calls == [1, 1]
    assert pe_kernels.last_dispatch().backend == "modules"


# ---- 3. backend names --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["Torch", " TORCH ", "torch\n", "Auto"])
def test_backend_names_are_case_insensitive(name, monkeypatch):
    with pe_kernels.use_backend(name):
        assert _backend.requested_backend() == name.strip().lower()
    monkeypatch.setenv("PE_KERNELS_BACKEND", name)
    assert _backend.requested_backend() == name.strip().lower()


def test_unknown_backend_names_list_the_choices(monkeypatch):
    with pytest.raises(ValueError, match="torch, triton, cuda, auto"):
        with pe_kernels.use_backend("cudnn"):
            pass
    monkeypatch.setenv("PE_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="PE_KERNELS_BACKEND='fast'.*torch, triton, cuda, auto"):
        _backend.requested_backend()


# ---- 4. TorchScript ----------------------------------------------------------------------------------------------
SCRIPTED = {
    "PackedConv1d": lambda: PackedConv1d(4, 4, 3, alpha=2, num_estimators=2),
    "PackedConv2d": packed_conv,
    "PackedConv3d": lambda: PackedConv3d(4, 4, 3, alpha=2, num_estimators=2),
    "PackedLinear": lambda: PackedLinear(4, 4, alpha=2, num_estimators=2),
    "PackedConvBNReLU2d": conv_bn_relu,
    "PackedBasicBlock": packed_basic,
    "PackedBottleneck": packed_bottleneck,
    "BasicBlock": basic,
    "Bottleneck": lambda: Bottleneck(8, 2, 1, dropout_rate=0, groups=1, conv_bias=False),
    "BatchConv2d": lambda: BatchConv2d(4, 4, 3, num_estimators=2),
    "BatchLinear": lambda: BatchLinear(4, 4, num_estimators=2),
    "packed_resnet": lambda: packed_resnet(3, 10, 18, 2, 2, 1, style="cifar", width_multiplier=0.125),
    "resnet": lambda: resnet(3, 10, 20, style="cifar"),
    "batched_resnet": lambda: batched_resnet(3, 10, 18, 2, style="cifar", width_multiplier=0.125),
    "mimo_resnet": lambda: mimo_resnet(3, 10, 18, 2, style="cifar", width_multiplier=0.125),
}


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
@pytest.mark.parametrize("name", list(SCRIPTED))
def test_jit_script_raises_a_clear_error(name):
    module = SCRIPTED[name]()
    with pytest.raises(RuntimeError, match=r"torch\.jit\.script.*torch\.compile.*torch\.export"):
        torch.jit.script(module)
    if not name.endswith("resnet"):
        with pytest.raises(RuntimeError, match=name):
            torch.jit.script(module)


# ---- 5a. unbatched input -----------------------------------------------------------------------------------------
@ieee_fp32()
def test_packed_conv2d_unbatched_input(backend):
    device = backend[1]
    layer = packed_conv().to(device)
    x = torch.randn(8, 5, 5, device=device)
    out = layer(x)
    torch.testing.assert_close(out, layer.conv(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out, layer(x.unsqueeze(0))[0])
    last = PackedConv2d(4, 4, 3, alpha=2, num_estimators=2, last=True, minimum_channels_per_group=1).to(device)
    with pytest.raises(ValueError, match="unbatched"):
        last(torch.randn(8, 5, 5, device=device))
    assert last(torch.randn(1, 8, 5, 5, device=device)).shape == (2, 4, 3, 3)


def test_packed_conv1d_unbatched_last_raises():
    layer = PackedConv1d(4, 4, 3, alpha=2, num_estimators=2, last=True, minimum_channels_per_group=1)
    with pytest.raises(ValueError, match="unbatched"):
        layer(torch.randn(8, 5))


@pytest.mark.parametrize("name", ["PackedConvBNReLU2d", "PackedBottleneck", "BasicBlock"])
def test_fused_modules_refuse_3d_as_batch_norm_does(name):
    ours, twin, cin = _pair(name, "cpu")
    x = torch.randn(cin, 5, 5)
    with pytest.raises(ValueError) as expected:
        twin(x)
    with pytest.raises(ValueError, match=re.escape(str(expected.value))):
        ours(x)


# ---- 5b. one-element padding / stride / dilation ----------------------------------------------------------------
def test_pair_accepts_one_element_sequences():
    assert pair((1,), "padding") == [1, 1] and pair([2], "stride") == [2, 2] and pair((1, 2), "x") == [1, 2]
    with pytest.raises(ValueError, match="padding"):
        pair((1, 2, 3), "padding")
    assert PF.resolve_padding((1,), (3, 3), (1, 1)) == ((1,), None)


@pytest.mark.parametrize("cls", [PackedConv2d, PackedConvBNReLU2d])
def test_one_element_geometry_matches_conv2d(backend, cls):
    layer = _randomize_bn(cls(4, 4, 3, alpha=2, num_estimators=2, padding=(1,), stride=(2,), dilation=(1,),
                              minimum_channels_per_group=1)).to(backend[1])
    _assert_same_step(layer, eager_twin(layer), _input(8, backend[1], size=6))


# ---- 5c. empty batch ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["PackedConvBNReLU2d", "PackedBottleneck", "PackedBasicBlock", "BasicBlock"])
@pytest.mark.parametrize("train", [True, False])
def test_empty_batch_as_batch_norm(backend, name, train):
    """Empty output; in training num_batches_tracked + 1 and running statistics unchanged; zero gradients."""
    ours, twin, cin = _pair(name, backend[1], train)
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    out = _assert_same_step(ours, twin, _input(cin, backend[1], batch=0))
    assert out.shape[0] == 0
    for key, value in ours.state_dict().items():
        expected = before[key] + 1 if key.endswith("num_batches_tracked") and train else before[key]
        torch.testing.assert_close(value, expected, msg=lambda m: f"{key}: {m}")
    assert all(p.grad is not None and not p.grad.any() for p in ours.parameters())


@pytest.mark.parametrize("track_running_stats", [True, False])
def test_empty_batch_functional(backend, track_running_stats):
    bn = nn.BatchNorm2d(4, track_running_stats=track_running_stats).to(backend[1])
    ref = copy.deepcopy(bn)
    y = torch.randn(0, 4, 3, 3, device=backend[1])
    torch.testing.assert_close(PF.batch_norm_act(y, bn, "relu"), F.relu(ref(y)))
    w = torch.randn(4, 4, 3, 3, device=backend[1])
    out, scale, shift = PF.conv_bn_pending(y, w, None, bn, padding=1)
    assert out.shape == (0, 4, 3, 3) and scale.shape == shift.shape == (4,)
    ref(y)
    for b, c in zip(bn.buffers(), ref.buffers()):
        torch.testing.assert_close(b, c)


# ---- 5d. one value per channel -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["PackedConvBNReLU2d", "PackedBottleneck"])
@pytest.mark.parametrize("track_running_stats, train", [(True, True), (False, True), (False, False)])
def test_one_value_per_channel_raises_as_batch_norm(backend, name, track_running_stats, train):
    ours, _, cin = _pair(name, backend[1], train)
    for m in ours.modules():
        if isinstance(m, nn.BatchNorm2d) and not track_running_stats:
            m.track_running_stats, m.running_mean, m.running_var, m.num_batches_tracked = False, None, None, None
    twin = eager_twin(ours)
    x = _input(cin, backend[1], batch=1, size=1)
    with pytest.raises(ValueError) as expected:
        twin(x)
    assert str(expected.value).startswith("Expected more than 1 value per channel when training")
    with pytest.raises(ValueError) as got:
        ours(x)
    assert str(got.value) == str(expected.value)
    for b, c in zip(ours.buffers(), twin.buffers()):
        torch.testing.assert_close(b, c)
