"""Drop-in layers vs torch-uncertainty's contract (shared/PEER.md): arithmetic, errors, keys, outputs."""

import math

import pytest
import torch
import torch.nn.functional as F
from einops import rearrange

from pe_kernels.nn import PackedConv1d, PackedConv2d, PackedConv3d, PackedLinear
from pe_kernels.nn.packed import packed_conv_channels


# (in, out, alpha, M, gamma, groups, min_per_group, first, last) -> (ext_in, ext_out, conv groups)
CHANNEL_CASES = [
    ((64, 64, 2, 4, 1, 1, 64, False, False), (128, 128, 4)),
    ((64, 64, 2, 4, 2, 1, 64, False, False), (128, 128, 4)),    # 128/8 = 16 < 64: gamma 2 -> 1
    ((256, 64, 2, 4, 2, 1, 64, False, False), (512, 128, 8)),   # 512/8 = 64: gamma 2 kept
    ((256, 64, 2, 4, 4, 1, 64, False, False), (512, 128, 8)),   # gamma 4 -> 2
    ((64, 64, 2, 4, 2, 1, 8, False, False), (128, 128, 8)),     # small minimum: gamma kept
    ((3, 64, 2, 4, 1, 1, 64, True, False), (3, 128, 1)),        # first: one group, in not widened
    ((512, 10, 2, 4, 1, 1, 64, False, True), (1024, 40, 4)),    # last: out * M
    ((64, 64, 3, 2, 1, 2, 8, False, False), (192, 192, 4)),    # groups multiply
    ((100, 100, 1.5, 2, 1, 1, 1, False, False), (150, 150, 2)),  # float alpha, int() truncation
]


@pytest.mark.parametrize("args,expected", CHANNEL_CASES)
def test_channel_arithmetic(args, expected):
    assert packed_conv_channels(*args) == expected
    cin, cout, alpha, m, gamma, groups, minimum, first, last = args
    layer = PackedConv2d(cin, cout, 3, alpha, m, gamma=gamma, groups=groups, minimum_channels_per_group=minimum,
                         first=first, last=last)
    assert (layer.conv.in_channels, layer.conv.out_channels, layer.conv.groups) == expected


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(alpha=None), ValueError, "alpha"),
    (dict(alpha=0), ValueError, "alpha"),
    (dict(alpha=-1), ValueError, "alpha"),
    (dict(gamma=1.5), TypeError, "gamma"),
    (dict(gamma=0), ValueError, "gamma"),
    (dict(num_estimators=None), ValueError, "num_estimators"),
    (dict(num_estimators=2.0), TypeError, "num_estimators"),
    (dict(num_estimators=0), ValueError, "num_estimators"),
])
@pytest.mark.parametrize("cls", [PackedConv2d, PackedLinear])
def test_parameter_checks(cls, kwargs, exc, match):
    base = dict(alpha=2, num_estimators=4, gamma=1)
    base.update(kwargs)
    args = (64, 64, 3) if cls is PackedConv2d else (64, 64)
    with pytest.raises(exc, match=match):
        cls(*args, **base)


def test_non_divisible_channels_raise():
    with pytest.raises(ValueError, match="input channels"):
        PackedConv2d(30, 64, 3, alpha=1, num_estimators=4)        # 30 % 4
    with pytest.raises(ValueError, match="output channels"):
        PackedConv2d(64, 30, 3, alpha=1, num_estimators=4)        # 30 % 4
    with pytest.raises(ValueError, match="output channels"):
        PackedConv2d(3, 30, 3, alpha=1, num_estimators=4, first=True)
    with pytest.raises(ValueError, match="input features"):
        PackedLinear(30, 64, alpha=1, num_estimators=4)
    with pytest.raises(ValueError, match="output features"):
        PackedLinear(64, 30, alpha=1, num_estimators=4)
    with pytest.raises(ValueError, match="implementation"):
        PackedLinear(64, 64, alpha=2, num_estimators=4, implementation="dense")


def test_conv_state_dict_and_properties():
    layer = PackedConv2d(16, 32, 3, alpha=2, num_estimators=2, minimum_channels_per_group=1, bias=True)
    sd = layer.state_dict()
    assert list(sd) == ["conv.weight", "conv.bias"]
    assert sd["conv.weight"].shape == (64, 32 // 2, 3, 3)
    assert layer.weight is layer.conv.weight and layer.bias is layer.conv.bias
    with pytest.raises((AttributeError, KeyError)):   # read-only property, as in torch-uncertainty
        layer.weight = torch.nn.Parameter(torch.zeros(1))
    assert PackedConv2d(16, 32, 3, alpha=2, num_estimators=2, bias=False).bias is None


@pytest.mark.parametrize("last", [False, True])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_conv2d_forward_matches_conv(last, memory_format):
    layer = PackedConv2d(8, 6, 3, alpha=2, num_estimators=2, gamma=2, padding=1, stride=2,
                         minimum_channels_per_group=1, last=last)
    x = torch.randn(3, 16, 7, 9).to(memory_format=memory_format)
    expected = F.conv2d(x, layer.conv.weight, layer.conv.bias, 2, 1, 1, layer.conv.groups)
    if last:
        expected = rearrange(expected, "b (m c) h w -> (m b) c h w", m=2)
    out = layer(x)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    out.sum().backward()
    assert layer.conv.weight.grad is not None


@pytest.mark.parametrize("padding,padding_mode", [("same", "zeros"), ("valid", "zeros"), (1, "reflect"),
                                                  (1, "circular"), ("same", "replicate")])
def test_conv2d_padding_modes(padding, padding_mode):
    layer = PackedConv2d(4, 4, (2, 3), alpha=2, num_estimators=2, minimum_channels_per_group=1,
                         padding=padding, padding_mode=padding_mode)
    x = torch.randn(2, 8, 6, 5)
    torch.testing.assert_close(layer(x), layer.conv(x), rtol=1e-5, atol=1e-5)


def test_conv1d_conv3d():
    c1 = PackedConv1d(8, 8, 3, alpha=2, num_estimators=2, minimum_channels_per_group=1, last=True)
    x1 = torch.randn(3, 16, 10)
    torch.testing.assert_close(c1(x1), rearrange(c1.conv(x1), "b (m c) l -> (m b) c l", m=2))
    c3 = PackedConv3d(4, 4, 3, alpha=2, num_estimators=2, minimum_channels_per_group=1, padding=1)
    assert c3(torch.randn(1, 8, 4, 4, 4)).shape == (1, 8, 4, 4, 4)
    assert list(c3.state_dict()) == ["conv.weight", "conv.bias"]


@pytest.mark.parametrize("first,last", [(False, False), (True, False), (False, True)])
def test_linear_block_diagonal(first, last):
    layer = PackedLinear(12, 6, alpha=2, num_estimators=3, first=first, last=last)
    groups = 1 if first else 3
    assert layer.weight.shape == (groups, layer.out_features, layer.in_features)
    assert list(layer.state_dict()) == ["weight", "bias"]
    x = torch.randn(5, layer.in_features * groups)
    dense = torch.block_diag(*layer.weight)
    expected = x @ dense.T + layer.bias
    if last:
        expected = rearrange(expected, "b (m h) -> (m b) h", m=3)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)


def test_linear_init_bounds():
    torch.manual_seed(0)
    layer = PackedLinear(64, 64, alpha=2, num_estimators=4)
    fan_in = layer.weight.shape[2]
    bound = 1 / math.sqrt(fan_in)          # kaiming_uniform_(a=sqrt 5) gives the same bound
    assert layer.weight.abs().max() <= bound + 1e-6 and layer.weight.abs().max() > 0.9 * bound
    assert layer.bias.abs().max() <= bound + 1e-6
