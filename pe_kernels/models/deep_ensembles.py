"""Deep Ensembles (torch-uncertainty's `deep_ensembles` wrapper for classification).

M independent models; forward = cat([model(x) for model in core_models], 0): input (B, ...) -> (M*B, classes),
row m*B + b being estimator m on sample b. Training repeats the targets "b -> (m b)".
`deep_ensembles_resnet` builds M independently initialised pe_kernels ResNets (fused blocks).
"""

from __future__ import annotations

import copy
from typing import Literal, Optional, Union

import torch
from torch import nn

from .resnet import resnet

Tensor = torch.Tensor


class DeepEnsembles(nn.Module):
    """torch-uncertainty's _DeepEnsembles: `core_models` (an nn.ModuleList) run one after the other."""

    def __init__(self, core_models: list[nn.Module]) -> None:
        super().__init__()
        self.core_models = nn.ModuleList(core_models)
        self.num_estimators = len(core_models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([model(x) for model in self.core_models], dim=0)


def deep_ensembles(core_models: Union[list[nn.Module], nn.Module], num_estimators: Optional[int] = None,
                   reset_model_parameters: bool = True) -> DeepEnsembles:
    """Ensemble a list of models, or `num_estimators` deep copies of one model (re-initialised by default).

    Same argument rules as torch-uncertainty's `deep_ensembles` (classification task only).
    """
    if isinstance(core_models, list) and len(core_models) == 0:
        raise ValueError("Models must not be an empty list.")
    if isinstance(core_models, nn.Module) or len(core_models) == 1:
        if num_estimators is None:
            raise ValueError("if models is a module, num_estimators must be specified.")
        if num_estimators < 2:
            raise ValueError(f"num_estimators must be at least 2. Got {num_estimators}.")
        model = core_models[0] if isinstance(core_models, list) else core_models
        core_models = [copy.deepcopy(model) for _ in range(num_estimators)]
        if reset_model_parameters:
            for member in core_models:
                for layer in member.modules():
                    if hasattr(layer, "reset_parameters"):
                        layer.reset_parameters()
    elif num_estimators is not None:
        raise ValueError("num_estimators must be None if you provided a non-singleton list.")
    return DeepEnsembles(core_models)


def deep_ensembles_resnet(in_channels: int, num_classes: int, arch: int, num_estimators: int,
                          conv_bias: bool = False, dropout_rate: float = 0.0, width_multiplier: float = 1.0,
                          groups: int = 1, style: Literal["imagenet", "cifar"] = "imagenet") -> DeepEnsembles:
    """Deep Ensembles of `num_estimators` ResNet-`arch`s, each built (and so initialised) independently."""
    if num_estimators < 1:
        raise ValueError(f"num_estimators must be >= 1, got {num_estimators}")
    return DeepEnsembles([resnet(in_channels, num_classes, arch, conv_bias=conv_bias, dropout_rate=dropout_rate,
                                 width_multiplier=width_multiplier, groups=groups, style=style)
                          for _ in range(num_estimators)])
