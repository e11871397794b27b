"""Model builders: torch-uncertainty's ResNets on pe_kernels' fused blocks, and the other Table 8 rows."""

from .batch_ensemble import BatchedResNet, batched_resnet
from .deep_ensembles import DeepEnsembles, deep_ensembles, deep_ensembles_resnet
from .mimo import MIMOResNet, mimo_batch_format, mimo_resnet
from .registry import TABLE8_MODELS, Table8Model, eager_twin, get_model
from .resnet import PackedResNet, ResNet, packed_resnet, resnet

__all__ = ["resnet", "packed_resnet", "ResNet", "PackedResNet", "batched_resnet", "BatchedResNet", "deep_ensembles",
           "deep_ensembles_resnet", "DeepEnsembles", "mimo_resnet", "mimo_batch_format", "MIMOResNet",
           "TABLE8_MODELS", "Table8Model", "get_model", "eager_twin"]
