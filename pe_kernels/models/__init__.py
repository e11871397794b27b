"""Model builders: torch-uncertainty's ResNets on pe_kernels' fused blocks."""

from .resnet import PackedResNet, ResNet, packed_resnet, resnet

__all__ = ["resnet", "packed_resnet", "ResNet", "PackedResNet"]
