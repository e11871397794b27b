"""Modules: drop-in Packed-Ensembles layers, the fused conv-BN-ReLU module, fused residual blocks, and
BatchEnsemble layers."""

from .batch_ensemble import BatchConv2d, BatchLinear
from .blocks import BasicBlock, Bottleneck, PackedBasicBlock, PackedBottleneck
from .fused import PackedConvBNReLU2d
from .packed import PackedConv1d, PackedConv2d, PackedConv3d, PackedLinear

__all__ = ["PackedConv1d", "PackedConv2d", "PackedConv3d", "PackedLinear", "PackedConvBNReLU2d", "BasicBlock",
           "Bottleneck", "PackedBasicBlock", "PackedBottleneck", "BatchConv2d", "BatchLinear"]
