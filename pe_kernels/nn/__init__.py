"""Modules: drop-in Packed-Ensembles layers, the fused conv-BN-ReLU module and fused residual blocks."""

from .blocks import BasicBlock, Bottleneck, PackedBasicBlock, PackedBottleneck
from .fused import PackedConvBNReLU2d
from .packed import PackedConv1d, PackedConv2d, PackedConv3d, PackedLinear

__all__ = ["PackedConv1d", "PackedConv2d", "PackedConv3d", "PackedLinear", "PackedConvBNReLU2d", "BasicBlock",
           "Bottleneck", "PackedBasicBlock", "PackedBottleneck"]

from .batch_ensemble import BatchConv2d, BatchLinear  # noqa: E402

__all__ += ["BatchConv2d", "BatchLinear"]
