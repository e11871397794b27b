"""Fused modules, blocks and ResNets vs the same weights run as plain unfused PyTorch (torch-uncertainty's forward)."""

import copy

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from _bn import randomize_bn as _randomize_bn
import pe_kernels
from pe_kernels.models import packed_resnet, resnet
from pe_kernels.nn import (BasicBlock, Bottleneck, PackedBasicBlock, PackedBottleneck, PackedConv2d,
                           PackedConvBNReLU2d, PackedLinear)
from pe_kernels.nn.blocks import conv2d_of


# ---- the oracle: torch-uncertainty's forward, written with nn.Conv2d / BatchNorm2d / F.relu modules only -----
def plain_block(block, x):
    conv = lambda m, t: conv2d_of(m)._conv_forward(t, conv2d_of(m).weight, conv2d_of(m).bias)
    chain = block._chain()
    out = x
    for i, (c, bn) in enumerate(chain[:-1]):
        out = bn(conv(c, out))
        if i == block._dropout_index:
            out = block.dropout(out)
        out = F.relu(out)
    c, bn = chain[-1]
    if len(block.shortcut):
        residual = block.shortcut[1](conv(block.shortcut[0], x))
    else:
        residual = x
    return F.relu(bn(conv(c, out)) + residual)


def plain_linear(layer, x):
    if isinstance(layer, PackedLinear):
        out = x @ torch.block_diag(*layer.weight).T + layer.bias
        return rearrange(out, "b (m h) -> (m b) h", m=layer.num_estimators) if layer.last else out
    return layer(x)


def plain_model(model, x):
    c = conv2d_of(model.conv1)
    out = F.relu(model.bn1(c._conv_forward(x, c.weight, c.bias)))
    out = model.optional_pool(out)
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in (stage if isinstance(stage, nn.Sequential) else []):
            out = plain_block(block, out)
    out = model.final_dropout(model.flatten(model.pool(out)))
    return plain_linear(model.linear, out)




def _compare(module, x, forward_ref, train, dtype=torch.float64, rtol=1e-7, atol=1e-9):
    """Outputs, every parameter gradient and every buffer (running stats, num_batches_tracked)."""
    ours = _randomize_bn(module).to(dtype).train(train)
    ref = copy.deepcopy(ours)
    xa, xb = x.to(dtype).clone().requires_grad_(), x.to(dtype).clone().requires_grad_()
    out, out_ref = ours(xa), forward_ref(ref, xb)
    torch.testing.assert_close(out, out_ref, rtol=rtol, atol=atol)
    g = torch.randn_like(out_ref)
    (out * g).sum().backward()
    (out_ref * g).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad, rtol=rtol * 10, atol=atol * 10)
    for (name, p), (_, p_ref) in zip(ours.named_parameters(), ref.named_parameters()):
        torch.testing.assert_close(p.grad, p_ref.grad, rtol=rtol * 10, atol=atol * 10, msg=lambda m: f"{name}: {m}")
    for (name, b), (_, b_ref) in zip(ours.named_buffers(), ref.named_buffers()):
        torch.testing.assert_close(b, b_ref, rtol=rtol, atol=atol, msg=lambda m: f"{name}: {m}")


# ---- PackedConvBNReLU2d ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("activation", ["relu", None])
@pytest.mark.parametrize("kwargs", [dict(kernel_size=3, padding=1, gamma=2), dict(kernel_size=1, stride=2, bias=True),
                                    dict(kernel_size=3, padding=1, first=True)])
def test_conv_bn_relu_matches_modules(train, activation, kwargs):
    layer = PackedConvBNReLU2d(8, 8, alpha=2, num_estimators=2, minimum_channels_per_group=2, activation=activation,
                               momentum=0.2, **kwargs)
    cin = 8 if kwargs.get("first") else 16

    def reference(m, x):
        out = m.bn(m.conv.conv(x))
        return F.relu(out) if activation else out

    _compare(layer, torch.randn(3, cin, 6, 5), reference, train)


@pytest.mark.parametrize("momentum", [None, 0.5])
def test_conv_bn_relu_running_stats_over_steps(momentum):
    """Several train steps then eval: buffers (incl. momentum=None averaging) equal BatchNorm2d's."""
    layer = PackedConvBNReLU2d(4, 4, 3, alpha=2, num_estimators=2, padding=1, minimum_channels_per_group=1,
                               momentum=momentum).double()
    ref = copy.deepcopy(layer)
    for step in range(3):
        x = torch.randn(2, 8, 5, 5, dtype=torch.float64) + step
        torch.testing.assert_close(layer(x), F.relu(ref.bn(ref.conv.conv(x))))
    assert int(layer.bn.num_batches_tracked) == 3
    torch.testing.assert_close(layer.bn.running_mean, ref.bn.running_mean)
    torch.testing.assert_close(layer.bn.running_var, ref.bn.running_var)
    layer.eval(), ref.eval()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.relu(ref.bn(ref.conv.conv(x))))


def test_conv_bn_relu_no_running_stats_and_state_dict():
    layer = PackedConvBNReLU2d(4, 4, 3, alpha=2, num_estimators=2, minimum_channels_per_group=1,
                               track_running_stats=False, affine=False).eval().double()
    x = torch.randn(2, 8, 5, 5, dtype=torch.float64)
    torch.testing.assert_close(layer(x), F.relu(layer.bn(layer.conv.conv(x))))
    keys = set(PackedConvBNReLU2d(4, 4, 3, alpha=2, num_estimators=2).state_dict())
    assert keys == {"conv.conv.weight", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var",
                    "bn.num_batches_tracked"}
    with pytest.raises(ValueError, match="activation"):
        PackedConvBNReLU2d(4, 4, 3, alpha=2, num_estimators=2, activation="gelu")
    with pytest.raises(ValueError, match="4-D"):
        layer(torch.randn(8, 5, 5))


# ---- blocks ----------------------------------------------------------------------------------------------------
BLOCKS = [
    lambda: PackedBasicBlock(8, 8, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1),
    lambda: PackedBasicBlock(8, 16, 2, alpha=2, num_estimators=2, gamma=2, conv_bias=True, dropout_rate=0, groups=1),
    lambda: PackedBottleneck(8, 4, 1, alpha=2, num_estimators=2, gamma=2, conv_bias=False, dropout_rate=0, groups=1),
    lambda: PackedBottleneck(16, 4, 1, alpha=2, num_estimators=4, gamma=1, conv_bias=False, dropout_rate=0,
                             groups=1),
    lambda: PackedBottleneck(8, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1),
    lambda: BasicBlock(8, 8, 2, dropout_rate=0, groups=2, conv_bias=False),
    lambda: Bottleneck(8, 2, 1, dropout_rate=0, groups=1, conv_bias=True),
]


@pytest.mark.parametrize("make", BLOCKS)
@pytest.mark.parametrize("train", [True, False])
def test_block_matches_unfused(make, train):
    block = make()
    cin = block.conv1.conv.in_channels if isinstance(block.conv1, PackedConv2d) else block.conv1.in_channels
    _compare(block, torch.randn(2, cin, 6, 6), plain_block, train)


def test_block_dropout_and_other_norm_fall_back():
    block = PackedBottleneck(8, 4, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0.5,
                             groups=1).double().train()
    assert "dropout is active" in block.module_path_reason()
    torch.manual_seed(1)
    out = block(torch.randn(2, 16, 4, 4, dtype=torch.float64))
    assert out.shape == (2, 32, 4, 4)
    dispatch = pe_kernels.last_dispatch()
    assert (dispatch.op, dispatch.backend) == ("PackedBottleneck", "modules")
    block.eval()
    assert block.module_path_reason() is None
    gn = PackedBasicBlock(8, 8, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0, groups=1,
                          normalization_layer=lambda c: nn.GroupNorm(2, c))
    assert gn.module_path_reason() == "bn1 is GroupNorm, not nn.BatchNorm2d"
    assert gn(torch.randn(1, 16, 4, 4)).shape == (1, 16, 4, 4)


# ---- models ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build", [
    lambda: packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=2, style="cifar"),
    lambda: packed_resnet(3, 10, 50, num_estimators=4, alpha=2, gamma=1, style="cifar", width_multiplier=0.25),
    lambda: resnet(3, 10, 18, style="imagenet", width_multiplier=0.25),
    lambda: resnet(3, 10, 20, style="cifar"),
])
@pytest.mark.parametrize("train", [True, False])
def test_model_matches_unfused(build, train):
    _compare(build(), torch.randn(2, 3, 16, 16), plain_model, train, rtol=1e-6, atol=1e-8)


def test_packed_resnet_parameter_counts_and_keys():
    counts = {
        (50, 1): 23_965_200, (50, 2): 14_921_232, (18, 1): 11_282_960, (18, 2): 8_268_304,
    }
    for (arch, gamma), expected in counts.items():
        model = packed_resnet(3, 100, arch, num_estimators=4, alpha=2, gamma=gamma, style="cifar")
        assert sum(p.numel() for p in model.parameters()) == expected
    assert sum(p.numel() for p in resnet(3, 100, 50, style="cifar").parameters()) == 23_705_252
    assert sum(p.numel() for p in resnet(3, 100, 18, style="cifar").parameters()) == 11_220_132
    keys = set(packed_resnet(3, 100, 50, 4, 2, 1, style="cifar").state_dict())
    for key in ["conv1.conv.weight", "bn1.running_var", "layer1.0.conv1.conv.weight", "layer1.0.shortcut.0.conv.weight",
                "layer1.0.shortcut.1.num_batches_tracked", "layer4.2.bn3.weight", "linear.weight", "linear.bias"]:
        assert key in keys
    assert not any(k.startswith("layer1.1.shortcut") for k in keys)


def test_packed_resnet_output_order():
    """out[m*B + b] is estimator m on sample b: swapping estimator m's weights changes only its rows."""
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar").eval()
    x = torch.randn(3, 3, 8, 8)
    out = model(x)
    assert out.shape == (6, 10)
    with torch.no_grad():
        model.linear.bias[10:] += 1.0      # estimator 1's output features
    out2 = model(x)
    torch.testing.assert_close(out2[:3], out[:3])
    torch.testing.assert_close(out2[3:], out[3:] + 1.0)


def test_checkpoint_roundtrip_strict():
    """A state_dict with torch-uncertainty's keys loads with strict=True into a fresh model, same outputs."""
    a = _randomize_bn(packed_resnet(3, 10, 18, 2, 2, 1, style="cifar")).eval()
    b = packed_resnet(3, 10, 18, 2, 2, 1, style="cifar").eval()
    b.load_state_dict(a.state_dict(), strict=True)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(a(x), b(x))
    torch.testing.assert_close(b(x), plain_model(b, x), rtol=1e-4, atol=1e-5)


def test_model_errors():
    with pytest.raises(ValueError, match="architecture"):
        resnet(3, 10, 19)
    with pytest.raises(ValueError, match="style"):
        packed_resnet(3, 10, 18, 2, 2, 1, style="mnist")
    with pytest.raises(ValueError, match="pretrained"):
        packed_resnet(3, 10, 18, 2, 2, 1, pretrained=True)


# ---- channels_last, autocast, compile --------------------------------------------------------------------------
def test_model_channels_last_and_autocast():
    model = packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar", width_multiplier=0.5)
    model = model.to(memory_format=torch.channels_last).train()
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x)
    assert out.dtype == torch.bfloat16
    out.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())
    assert all(b.dtype == torch.float32 for n, b in model.named_buffers() if "running" in n)


@pytest.mark.parametrize("train", [True, False])
def test_compile_fullgraph_block_equals_eager(train):
    block = _randomize_bn(PackedBottleneck(8, 4, 2, alpha=2, num_estimators=2, gamma=1, conv_bias=False,
                                           dropout_rate=0, groups=1)).train(train)
    twin = copy.deepcopy(block)
    compiled = torch.compile(twin, backend="aot_eager", fullgraph=True)
    x = torch.randn(2, 16, 6, 6)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    out, out_c = block(xa), compiled(xb)
    torch.testing.assert_close(out_c, out)
    out.sum().backward()
    out_c.sum().backward()
    torch.testing.assert_close(xb.grad, xa.grad)
    for (n, b), (_, bc) in zip(block.named_buffers(), twin.named_buffers()):
        torch.testing.assert_close(bc, b, msg=lambda m: f"{n}: {m}")


# ---- dispatch --------------------------------------------------------------------------------------------------
def test_backends_report():
    """Availability follows what this machine has (a GPU, pe_kernels._C built); an unavailable backend says why."""
    import pe_kernels.cuda as cuda_backend

    status = pe_kernels.backends()
    assert set(status) == {"torch", "triton", "cuda"}
    assert status["torch"].available
    assert status["cuda"].available == (cuda_backend.is_built() and torch.cuda.is_available()), status["cuda"]
    for s in status.values():
        assert s.available or len(s.reason) > 10


def test_forced_backend_never_falls_back(monkeypatch):
    """CPU tensors: the cuda backend refuses them on every machine (no GPU, no _C, or not CUDA tensors)."""
    x, w = torch.randn(1, 4, 5, 5), torch.randn(4, 4, 1, 1)
    with pe_kernels.use_backend("cuda"):
        with pytest.raises(pe_kernels.BackendUnavailableError, match="cuda"):
            pe_kernels.ops.conv_fused(x, w)
    monkeypatch.setenv("PE_KERNELS_BACKEND", "cuda")
    with pytest.raises(pe_kernels.BackendUnavailableError):
        pe_kernels.ops.conv_fused(x, w)
    with pe_kernels.use_backend("torch"):                    # the context manager wins over the variable
        pe_kernels.ops.conv_fused(x, w)
    monkeypatch.setenv("PE_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="PE_KERNELS_BACKEND"):
        pe_kernels.ops.conv_fused(x, w)
    with pytest.raises(ValueError, match="unknown"):
        with pe_kernels.use_backend("cudnn"):
            pass


def test_forced_triton_fp64_raises():
    with pe_kernels.use_backend("triton"):
        with pytest.raises(pe_kernels.BackendUnavailableError, match="float64"):
            pe_kernels.ops.conv_fused(torch.randn(1, 4, 5, 5, dtype=torch.float64),
                                      torch.randn(4, 4, 1, 1, dtype=torch.float64))


def test_auto_follows_the_dispatch_table(monkeypatch):
    """auto picks a listed backend only for its op, arch and dtype, and only when that backend can run."""
    from pe_kernels import _backend

    entry = {"op": "conv_fused", "backend": "triton", "arch": "sm_90", "dtypes": ["float16"], "evidence": "x.json"}
    monkeypatch.setattr(_backend, "dispatch_table", lambda: (entry,))
    monkeypatch.setattr(_backend, "_cuda_arch", lambda index: "sm_90")
    monkeypatch.setattr(_backend._autotune_module(), "lookup", lambda *args: None)  # no measured choice
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(_backend, "_call_reason", lambda name, device, dtype: None)
    assert _backend._auto_choice("conv_fused", cuda, torch.float16).backend == "triton"
    for op, dtype in (("bn_apply", torch.float16), ("conv_fused", torch.float32)):
        choice = _backend._auto_choice(op, cuda, dtype)
        assert choice.backend == "torch" and "no validated fast path" in choice.reason
    monkeypatch.setattr(_backend, "_call_reason", lambda name, device, dtype: "triton is not installed")
    choice = _backend._auto_choice("conv_fused", cuda, torch.float16)
    assert choice.backend == "torch" and "not installed" in choice.reason
    monkeypatch.setattr(_backend, "_cuda_arch", lambda index: "sm_80")
    assert _backend._auto_choice("conv_fused", cuda, torch.float16).backend == "torch"


@pytest.mark.parametrize("case", ["plain", "bias", "reflect", "no-running-stats", "momentum-none", "no-affine",
                                  "eps", "plain-attributes", "block"])
def test_stock_path_is_the_stock_modules_bit_for_bit(case, monkeypatch):
    """The torch backend's stock path (PF.stock_conv_bn: in eval the stock forwards' own ATen calls, F.conv2d and
    F.batch_norm, without their Python wrappers) gives the module-by-module forward exactly, in eval and in
    training, running statistics included; in eval with running statistics and zero padding without calling the
    stock forwards (the ATen calls directly), elsewhere through them."""
    torch.manual_seed(0)
    if case == "block":
        module = PackedBottleneck(16, 8, 1, alpha=2, num_estimators=2, gamma=1, conv_bias=False, dropout_rate=0,
                                  groups=1)
    else:
        module = PackedConvBNReLU2d(8, 8, 3, alpha=2, num_estimators=2, padding=1, bias=case == "bias",
                                    padding_mode="reflect" if case == "reflect" else "zeros",
                                    track_running_stats=case != "no-running-stats",
                                    momentum=None if case == "momentum-none" else 0.1, affine=case != "no-affine",
                                    eps=0.3 if case == "eps" else 1e-5)
    if case not in ("no-running-stats", "no-affine"):  # (it draws running statistics and affine parameters)
        _randomize_bn(module)
    if case == "plain-attributes":  # parameters replaced by plain tensors: still exact nn.Conv2d / BatchNorm2d
        for owner, name in ((module.conv.conv, "weight"), (module.bn, "weight"), (module.bn, "bias")):
            value = getattr(owner, name).detach().clone()
            delattr(owner, name)
            setattr(owner, name, value)
    module = module.to(memory_format=torch.channels_last)
    x = torch.randn(2, module_in_channels(module), 6, 6).to(memory_format=torch.channels_last)
    direct = case not in ("reflect", "no-running-stats")  # eval: the ATen calls themselves
    calls = []
    stock_forward = nn.BatchNorm2d.forward
    monkeypatch.setattr(nn.BatchNorm2d, "forward", lambda self, y: calls.append(1) or stock_forward(self, y))
    for training in (False, True):
        stock, twin = copy.deepcopy(module).train(training), copy.deepcopy(module).train(training)
        with pe_kernels.use_backend("torch"), torch.no_grad():
            calls.clear()
            out = stock(x)
            assert (len(calls) == 0) == (direct and not training), (case, training, calls)
            expected = twin.forward_modules(x)
        assert pe_kernels.last_dispatch().backend == "torch"
        assert torch.equal(out, expected), (case, training)
        for a, b in zip(stock.state_dict().values(), twin.state_dict().values()):
            assert torch.equal(a, b)


def module_in_channels(module: nn.Module) -> int:
    return next(m for m in module.modules() if isinstance(m, nn.Conv2d)).in_channels
