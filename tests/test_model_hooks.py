"""The models' fused paths honour what a user attaches to the submodules they bypass.

A model fuses a stem (conv1 -> bn1 -> ReLU) or a BatchEnsemble block's norms, dropout and shortcut only when
calling those submodules would do nothing more than their stock forward (pe_kernels/nn/_common.py). A forward
hook, a forward pre-hook, torch.nn.utils.prune, torch.nn.utils.parametrize, a global module hook or a
BatchNorm2d subclass with its own forward sends it down the module path: the submodules are called one by one and
pe_kernels.last_dispatch() records (the model or block class, "modules", why).

Oracle: eager_twin(model), the same modules and weights run as stock PyTorch, given the same hooks; float64
on the torch backend, so the two agree to rounding. The hooks change the values they see, so a bypassed hook
shows in the output as well as in its call count.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize, prune

from _bn import randomize_bn as _randomize_bn
from _devices import ieee_fp32
import pe_kernels
from pe_kernels.models import batched_resnet, eager_twin, packed_resnet, resnet

# The smallest models the builders make: ResNet-18 (8 basic blocks) at 1/8 width, CIFAR stem, 8x8 inputs.
BUILDERS = {
    "packed": lambda: packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar",
                                    width_multiplier=0.125),
    "resnet": lambda: resnet(3, 10, 18, style="cifar", width_multiplier=0.125),
    "batched": lambda: batched_resnet(3, 10, 18, num_estimators=2, style="cifar", width_multiplier=0.125),
}
# (model, submodule a fused path bypasses, the module whose forward records the choice for it)
TARGETS = [
    ("packed", "conv1", ""), ("packed", "bn1", ""),
    ("resnet", "conv1", ""), ("resnet", "bn1", ""),
    ("batched", "bn1", ""), ("batched", "layer1.0.bn1", "layer1.0"), ("batched", "layer1.0.bn2", "layer1.0"),
    ("batched", "layer1.0.dropout", "layer1.0"), ("batched", "layer2.0.shortcut", "layer2.0"),
    ("batched", "layer2.0.shortcut.1", "layer2.0"),
]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny shapes gain nothing from threads; on a busy 2-core machine one thread runs these ~20x faster."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class ShiftedBatchNorm2d(nn.BatchNorm2d):
    """A BatchNorm2d subclass with its own forward: a fused path must call it, not read its parameters."""

    def forward(self, x):
        return super().forward(x) + 0.5




def _model_and_twin(name, train, dtype=torch.float64):
    model = _randomize_bn(BUILDERS[name]()).to(dtype).train(train)
    return model, eager_twin(model)


def _x(dtype=torch.float64, device="cpu"):
    return torch.randn(2, 3, 8, 8, dtype=dtype, device=device)


def _witness(model, owner):
    """The last_dispatch() seen right after `owner` ("" = the model's stem) chose its path, filled by forward."""
    seen = []
    if owner:  # a block records its choice before its forward returns: its own forward hook sees it
        model.get_submodule(owner).register_forward_hook(lambda *_: seen.append(pe_kernels.last_dispatch()))
    else:      # the stem records before it calls optional_pool
        model.optional_pool.register_forward_pre_hook(lambda *_: seen.append(pe_kernels.last_dispatch()))
    return seen


def _add_hook(module, kind, calls):
    """A hook that changes what it sees (so that a bypass changes the output) and counts its calls."""
    if kind == "forward":
        def hook(mod, args, out):
            calls.append(kind)
            return out * 0.5 + 0.25
        return module.register_forward_hook(hook)

    def pre_hook(mod, args):
        calls.append(kind)
        return (args[0] * 2.0,)
    return module.register_forward_pre_hook(pre_hook)


def _owner_class(model, owner):
    return type(model.get_submodule(owner)).__name__


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("kind", ["forward", "pre"])
@pytest.mark.parametrize("name,target,owner", TARGETS)
def test_hooks_on_bypassed_submodules_fire(name, target, owner, kind, train):
    model, twin = _model_and_twin(name, train)
    calls, twin_calls = [], []
    _add_hook(model.get_submodule(target), kind, calls)
    _add_hook(twin.get_submodule(target), kind, twin_calls)
    seen = _witness(model, owner)
    x = _x()
    with pe_kernels.use_backend("torch"):
        out = model(x)
    expected = twin(x)
    assert calls == twin_calls == [kind]
    torch.testing.assert_close(out, expected)
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{key}: {m}")  # running statistics too
    dispatch = seen[0]
    assert (dispatch.op, dispatch.backend) == (_owner_class(model, owner), "modules")
    hook = "forward hook" if kind == "forward" else "forward pre-hook"
    assert dispatch.reason == f"{hook} on {target[len(owner) + 1:] if owner else target}", dispatch.reason


def _prune(conv):
    prune.l1_unstructured(conv, "weight", amount=0.5)


class _Halve(nn.Module):
    def forward(self, w):
        return w * 0.5


def _parametrize(conv):
    parametrize.register_parametrization(conv, "weight", _Halve())


@pytest.mark.parametrize("transform", [_prune, _parametrize], ids=["prune", "parametrize"])
@pytest.mark.parametrize("name,path", [("packed", "conv1.conv"), ("resnet", "conv1")])
def test_weight_transforms_on_the_stem_conv_are_honoured_in_training(name, path, transform):
    """The stem reads the pruned (parametrised) weight the module computes; two SGD steps match the twin's."""
    model, twin = _model_and_twin(name, train=True)
    transform(model.get_submodule(path))
    transform(twin.get_submodule(path))
    seen = _witness(model, "")
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (model, twin)]
    target = torch.randint(0, 10, (model.num_estimators * 2 if name == "packed" else 2,))
    for step in range(2):
        x = _x()
        losses = []
        for m, opt in zip((model, twin), opts):
            opt.zero_grad()
            with pe_kernels.use_backend("torch"):
                loss = F.cross_entropy(m(x), target)
            loss.backward()
            opt.step()
            losses.append(loss)
        torch.testing.assert_close(losses[0], losses[1], msg=lambda m: f"step {step}: {m}")
    for (key, a), b in zip(model.state_dict().items(), twin.state_dict().values()):
        torch.testing.assert_close(a, b, msg=lambda m: f"{key}: {m}")
    assert [(d.op, d.backend) for d in seen] == [(type(model).__name__, "modules")] * 2
    if transform is _prune:
        conv = model.get_submodule(path)
        assert conv.weight_mask.sum() < conv.weight_mask.numel()
        assert torch.all(conv.weight[conv.weight_mask == 0] == 0)
        assert "pruned" in seen[-1].reason
    else:
        assert "parametrized" in seen[-1].reason


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name,target,owner", [t for t in TARGETS if t[1].split(".")[-1].startswith("bn")
                                               or t[1].endswith("shortcut.1")])
def test_batchnorm_subclass_is_called(name, target, owner, train):
    model = _randomize_bn(BUILDERS[name]())
    parent, _, attr = target.rpartition(".")
    old = model.get_submodule(target)
    new = ShiftedBatchNorm2d(old.num_features)
    new.load_state_dict(old.state_dict())
    setattr(model.get_submodule(parent), attr, new)
    model = model.double().train(train)
    twin = eager_twin(model)
    seen = _witness(model, owner)
    x = _x()
    with pe_kernels.use_backend("torch"):
        out = model(x)
    torch.testing.assert_close(out, twin(x))
    assert (seen[0].op, seen[0].backend) == (_owner_class(model, owner), "modules")
    assert "is ShiftedBatchNorm2d, not nn.BatchNorm2d" in seen[0].reason


@pytest.mark.parametrize("name", list(BUILDERS))
def test_global_module_hook_sends_every_model_down_the_module_path(name):
    model, twin = _model_and_twin(name, train=True)
    calls = []
    handle = nn.modules.module.register_module_forward_hook(lambda mod, args, out: calls.append(mod))
    try:
        seen = _witness(model, "")
        x = _x()
        with pe_kernels.use_backend("torch"):
            out = model(x)
        stock = len(calls)
        expected = twin(x)
        assert stock == len(calls) - stock  # every submodule the twin calls was called by the model too
    finally:
        handle.remove()
    torch.testing.assert_close(out, expected)
    assert seen[0].backend == "modules" and "global module hook" in seen[0].reason


@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize("name", list(BUILDERS))
def test_no_hooks_keeps_the_fused_paths(name, train):
    model, twin = _model_and_twin(name, train)
    stem, block = _witness(model, ""), _witness(model, "layer2.0")
    x = _x()
    with pe_kernels.use_backend("torch"):
        out = model(x)
    torch.testing.assert_close(out, twin(x))
    assert stem[0].backend != "modules", stem[0]
    assert block[0].backend != "modules", block[0]


@ieee_fp32()  # the twin's cuDNN and the kernels in IEEE fp32 on a GPU (TF32 is not this budget)
def test_triton_stem_hook_fires_and_matches_twin(kernel_device):
    """One model on the triton backend (compiled on a GPU, interpreted on CPU): bn1's hook fires, the rest fuses."""
    model = _randomize_bn(BUILDERS["packed"]()).eval().to(kernel_device)
    twin = eager_twin(model)
    calls, twin_calls = [], []
    _add_hook(model.bn1, "forward", calls)
    _add_hook(twin.bn1, "forward", twin_calls)
    stem, block = _witness(model, ""), _witness(model, "layer2.0")
    x = _x(torch.float32, kernel_device)
    with torch.no_grad():
        with pe_kernels.use_backend("triton"):
            out = model(x)
        expected = twin(x)
    assert calls == twin_calls == ["forward"]
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert (stem[0].op, stem[0].backend) == ("PackedResNet", "modules") and "bn1" in stem[0].reason
    assert block[0].backend == "triton", block[0]
