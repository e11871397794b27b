"""ResNets of torch-uncertainty (same builders, arguments, structure and state_dict), on the fused blocks.

resnet(...)         standard ResNet (the Single row of Table 8)
packed_resnet(...)  Packed-Ensembles ResNet: input (B, C, H, W) -> output (M*B, classes), row m*B + b being
                    estimator m on sample b.
style="cifar": 3x3 stem, stride 1, no max-pool; style="imagenet": 7x7/2 stem + 3x3/2 max-pool.
The stem conv1 -> bn1 -> ReLU is one fused conv-BN-ReLU kernel under the rule of pe_kernels.nn's fused modules
(exact nn.Conv2d / PackedConv2d and nn.BatchNorm2d, no hooks: nn/_common.py); otherwise `stem_modules` calls the
three one by one and pe_kernels.last_dispatch() says why. In training the stem and the blocks run as one chain:
each tail (the stem's BN + ReLU, a block's last BN + residual + ReLU) is joined to the next block's first conv -> BN
in one autograd node (nn/blocks.py, forward_chain; ops.conv_bn_junction).
"""

from __future__ import annotations

from typing import Callable, Literal, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .. import functional as PF
from ..nn import BasicBlock, Bottleneck, PackedBasicBlock, PackedBottleneck, PackedConv2d, PackedLinear
from ..nn._common import activation_reason, global_hook_reason, record_module_path
from ..nn.blocks import _FusedResidualBlock, conv2d_of
from ..nn.fused import conv_bn_reason

Tensor = torch.Tensor

RESNET_BLOCKS = {18: [2, 2, 2, 2], 20: [3, 3, 3], 34: [3, 4, 6, 3], 44: [7, 7, 7], 50: [3, 4, 6, 3],
                 56: [9, 9, 9], 101: [3, 4, 23, 3], 110: [18, 18, 18], 152: [3, 8, 36, 3], 1202: [200, 200, 200]}
BASIC_ARCHS = (18, 20, 34, 44, 56, 110, 1202)
NARROW_ARCHS = (20, 44, 56, 110, 1202)  # in_planes 16


def _has_hooks(module: nn.Module) -> bool:
    return bool(module._forward_hooks or module._forward_pre_hooks or module._backward_hooks
                or module._backward_pre_hooks)


def resnet_num_blocks(arch: int) -> list[int]:
    if arch not in RESNET_BLOCKS:
        raise ValueError(f"Unknown ResNet architecture. Got {arch}; choose from {sorted(RESNET_BLOCKS)}.")
    return RESNET_BLOCKS[arch]


def _check_style(style: str) -> None:
    if style not in ("imagenet", "cifar"):
        raise ValueError(f"Unknown style. Got {style}; choose 'imagenet' or 'cifar'.")


class _ResNetBase(nn.Module):
    """Stem (conv1, bn1, relu, optional_pool), layer1..4, pool, flatten, final_dropout, linear."""

    activation_fn = staticmethod(F.relu)

    def stem_reason(self) -> Optional[str]:
        """Why one conv-BN-ReLU kernel cannot stand in for conv1 -> bn1 -> activation_fn now (None: it can).
        The rule of pe_kernels.nn's fused modules (pe_kernels/nn/_common.py)."""
        mods = self._modules  # not self.conv1: nn.Module.__getattr__ costs ~1 µs a lookup
        return (global_hook_reason() or conv_bn_reason("conv1", mods["conv1"], "bn1", mods["bn1"])
                or activation_reason(self.activation_fn))

    def stem_modules(self, x: Tensor) -> Tensor:
        """activation_fn(bn1(conv1(x))), each submodule called (their hooks fire): the stem's module path."""
        return self.activation_fn(self.bn1(self.conv1(x)))

    def _stem(self, x: Tensor) -> Tensor:
        reason = self.stem_reason()
        if reason is not None:
            out = self.stem_modules(x)
            record_module_path(self, reason)
        else:
            mods = self._modules
            c = conv2d_of(mods["conv1"])
            out = PF.conv_bn(x, c.weight, c.bias, mods["bn1"], c.stride, c.padding, c.dilation, c.groups,
                             activation="relu", padding_mode=c.padding_mode)
        return self.optional_pool(out)

    def _stem_chain(self, x: Tensor) -> PF.Activation:
        """_stem(x), or in training with the fused stem and no pool its conv1 -> bn1 -> ReLU left pending
        (PF.PendingTail) for the first block to join (nn/blocks.py, forward_chain)."""
        mods = self._modules
        pool, bn = mods["optional_pool"], mods["bn1"]
        if (type(self)._stem is not _ResNetBase._stem or type(pool) is not nn.Identity or _has_hooks(pool)
                or not bn.training or not PF._uses_batch_stats(bn) or self.stem_reason() is not None
                or x.dim() != 4 or PF.stock_layer(x) is not None):
            return self._stem(x)
        c = conv2d_of(mods["conv1"])
        kwargs = dict(weight=c.weight, bias=c.bias, stride=c.stride, padding=c.padding, dilation=c.dilation,
                      groups=c.groups, padding_mode=c.padding_mode)
        if isinstance(c.padding, str) or c.padding_mode != "zeros" or PF.batch_norm_count(x, **kwargs) < 2:
            return self._stem(x)
        return PF.PendingTail(x, kwargs, bn, None, None, True)

    def _stages(self, h: PF.Activation) -> Tensor:
        """layer1 .. layer4 on h. In training, with no global module hook, the blocks of exact, unhooked
        nn.Sequential stages run as one chain (forward_chain: a block's tail joined to the next block's first
        conv -> BN); other stages, and every stage otherwise, are called."""
        mods = self._modules
        if not self.training or global_hook_reason() is not None:
            out = PF.materialize(h)
            for name in ("layer1", "layer2", "layer3", "layer4"):
                out = mods[name](out)
            return out
        for name in ("layer1", "layer2", "layer3", "layer4"):
            stage = mods[name]
            if type(stage) is nn.Sequential and not _has_hooks(stage):
                for block in stage._modules.values():
                    h = block.forward_chain(h) if isinstance(block, _FusedResidualBlock) else block(PF.materialize(h))
            else:
                h = stage(PF.materialize(h))
        return PF.materialize(h)

    def feats_forward(self, x: Tensor) -> Tensor:
        out = self._stages(self._stem_chain(x))
        return self.final_dropout(self.flatten(self.pool(out)))

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(self.feats_forward(x))

    def _make_stage(self, make_block, planes: int, num_blocks: int, stride: int, expansion: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(make_block(self.in_planes, planes, s))
            self.in_planes = planes * expansion
        return nn.Sequential(*layers)

    def _build_stages(self, make_block, block_planes: int, num_blocks: list[int], expansion: int) -> int:
        self.layer1 = self._make_stage(make_block, block_planes, num_blocks[0], 1, expansion)
        self.layer2 = self._make_stage(make_block, block_planes * 2, num_blocks[1], 2, expansion)
        self.layer3 = self._make_stage(make_block, block_planes * 4, num_blocks[2], 2, expansion)
        if len(num_blocks) == 4:
            self.layer4 = self._make_stage(make_block, block_planes * 8, num_blocks[3], 2, expansion)
            return 8
        self.layer4 = nn.Identity()
        return 4


class ResNet(_ResNetBase):
    """torch-uncertainty's _ResNet."""

    def __init__(self, block, num_blocks: list[int], in_channels: int, num_classes: int, conv_bias: bool,
                 dropout_rate: float, groups: int, style: Literal["imagenet", "cifar"] = "imagenet",
                 in_planes: int = 64, activation_fn: Callable = F.relu,
                 normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> None:
        super().__init__()
        _check_style(style)
        self.in_planes = in_planes
        self.dropout_rate = dropout_rate
        self.activation_fn = activation_fn
        block_planes = in_planes
        if style == "imagenet":
            self.conv1 = nn.Conv2d(in_channels, block_planes, kernel_size=7, stride=2, padding=3, bias=conv_bias)
        else:
            self.conv1 = nn.Conv2d(in_channels, block_planes, kernel_size=3, stride=1, padding=1, bias=conv_bias)
        self.bn1 = normalization_layer(block_planes)
        self.optional_pool = nn.MaxPool2d(3, 2, 1) if style == "imagenet" else nn.Identity()

        def make_block(in_planes, planes, stride):
            return block(in_planes=in_planes, planes=planes, stride=stride, dropout_rate=dropout_rate, groups=groups,
                         conv_bias=conv_bias, activation_fn=activation_fn, normalization_layer=normalization_layer)

        multiplier = self._build_stages(make_block, block_planes, num_blocks, block.expansion)
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = nn.Linear(block_planes * multiplier * block.expansion, num_classes)


class PackedResNet(_ResNetBase):
    """torch-uncertainty's _PackedResNet."""

    def __init__(self, block, num_blocks: list[int], in_channels: int, num_classes: int, conv_bias: bool,
                 num_estimators: int, dropout_rate: float, alpha: int = 2, gamma: int = 1, groups: int = 1,
                 style: Literal["imagenet", "cifar"] = "imagenet", in_planes: int = 64,
                 normalization_layer: type[nn.Module] = nn.BatchNorm2d,
                 linear_implementation: str = "conv1d") -> None:
        super().__init__()
        _check_style(style)
        self.in_channels = in_channels
        self.alpha, self.gamma, self.groups, self.num_estimators = alpha, gamma, groups, num_estimators
        self.in_planes = in_planes
        block_planes = in_planes
        kernel, stride, padding = (7, 2, 3) if style == "imagenet" else (3, 1, 1)
        self.conv1 = PackedConv2d(in_channels, block_planes, kernel_size=kernel, stride=stride, padding=padding,
                                  alpha=alpha, num_estimators=num_estimators, gamma=1, groups=groups,
                                  bias=conv_bias, first=True)
        self.bn1 = normalization_layer(block_planes * alpha)
        self.optional_pool = nn.MaxPool2d(3, 2, 1) if style == "imagenet" else nn.Identity()

        def make_block(in_planes, planes, stride):
            return block(in_planes=in_planes, planes=planes, stride=stride, alpha=alpha,
                         num_estimators=num_estimators, gamma=gamma, conv_bias=conv_bias, dropout_rate=dropout_rate,
                         groups=groups, normalization_layer=normalization_layer)

        multiplier = self._build_stages(make_block, block_planes, num_blocks, block.expansion)
        self.final_dropout = nn.Dropout(p=dropout_rate)
        self.pool = nn.AdaptiveAvgPool2d(output_size=1)
        self.flatten = nn.Flatten(1)
        self.linear = PackedLinear(block_planes * multiplier * block.expansion, num_classes, alpha=alpha,
                                   num_estimators=num_estimators, last=True, implementation=linear_implementation)


def resnet(in_channels: int, num_classes: int, arch: int, conv_bias: bool = False, dropout_rate: float = 0.0,
           width_multiplier: float = 1.0, groups: int = 1, style: Literal["imagenet", "cifar"] = "imagenet",
           activation_fn: Callable = F.relu, normalization_layer: type[nn.Module] = nn.BatchNorm2d) -> ResNet:
    """Standard ResNet-`arch` (torch-uncertainty's `resnet`)."""
    num_blocks = resnet_num_blocks(arch)
    block = BasicBlock if arch in BASIC_ARCHS else Bottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return ResNet(block, num_blocks, in_channels, num_classes, conv_bias, dropout_rate, groups, style,
                  int(in_planes * width_multiplier), activation_fn, normalization_layer)


def packed_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int, alpha: int, gamma: int,
                  conv_bias: bool = False, width_multiplier: float = 1.0, groups: int = 1, dropout_rate: float = 0,
                  style: Literal["imagenet", "cifar"] = "imagenet",
                  normalization_layer: type[nn.Module] = nn.BatchNorm2d, pretrained: bool = False,
                  linear_implementation: str = "conv1d") -> PackedResNet:
    """Packed-Ensembles ResNet-`arch` (torch-uncertainty's `packed_resnet`). Output (M*B, num_classes)."""
    if pretrained:
        raise ValueError("pretrained weights are not downloaded by pe_kernels: build the model, then "
                         "load_state_dict() a torch-uncertainty checkpoint (the keys are the same)")
    num_blocks = resnet_num_blocks(arch)
    block = PackedBasicBlock if arch in BASIC_ARCHS else PackedBottleneck
    in_planes = 16 if arch in NARROW_ARCHS else 64
    return PackedResNet(block, num_blocks, in_channels, num_classes, conv_bias, num_estimators, dropout_rate,
                        alpha, gamma, groups, style, int(in_planes * width_multiplier), normalization_layer,
                        linear_implementation)
