"""The six models of the paper's Table 8 (CIFAR-100 ResNet-50s), as data: name -> builder, batch format, paper row.

    TABLE8_MODELS["pe-2-4-1"].build(num_classes=100)            the model (pe_kernels fused path)
    TABLE8_MODELS["pe-2-4-1"].format_batch(inputs, targets)      one training batch as the model trains on it
    TABLE8_MODELS["pe-2-4-1"].paper                              the paper's figures (RTX 3090, torch 1.12)
    eager_twin(model)                                            the same model as stock PyTorch modules

Every model maps (B, 3, 32, 32) to (M*B, classes) in eval, row m*B + b = estimator m on sample b (M = 1 for
Single). Training batches follow torch-uncertainty's CIFAR-100 ResNet-50 configs: targets repeated "b -> (m b)"
(Packed-Ensembles, Deep Ensembles, BatchEnsemble), M shuffled copies of the batch (MIMO, rho=1, batch_repeat=1),
nothing (Single). Parameter counts are those of torch-uncertainty 0.13.0 (shared/PEER.md).
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from typing import Callable, Optional

import torch
from einops import rearrange, repeat
from torch import nn

from ..nn import PackedConv2d
from .batch_ensemble import batched_resnet
from .deep_ensembles import deep_ensembles_resnet
from .mimo import mimo_batch_format, mimo_resnet
from .resnet import packed_resnet, resnet

Tensor = torch.Tensor

PAPER_SOURCE = ("Laurent et al., Packed-Ensembles, ICLR 2023, Table 8: RTX 3090, torch 1.12, CIFAR-100, "
                "batch 128, eager cuDNN with separate BatchNorm/ReLU")
TRAIN_IMAGES = 50_000  # CIFAR-100 training set: one epoch
EVAL_IMAGES = 10_000   # CIFAR-100 test set


@dataclasses.dataclass(frozen=True)
class PaperRow:
    """One row of the paper's Table 8 (figures copied from shared/DESIGN.md)."""

    f32_train_s_per_epoch: float
    f32_infer_images_per_s: float
    f16_train_s_per_epoch: float
    f16_infer_images_per_s: float
    source: str = PAPER_SOURCE

    def value(self, mode: str, precision: str) -> float:
        """The figure for mode 'train' (s/epoch) or 'infer' (images/s), precision 'f32' or 'f16'."""
        if mode not in ("train", "infer") or precision not in ("f32", "f16"):
            raise ValueError(f"mode must be train|infer and precision f32|f16, got {mode!r}, {precision!r}")
        return getattr(self, f"{precision}_{'train_s_per_epoch' if mode == 'train' else 'infer_images_per_s'}")


def repeat_targets(inputs: Tensor, targets: Tensor, num_estimators: int) -> tuple[Tensor, Tensor]:
    """torch-uncertainty's RepeatTarget: inputs unchanged, targets "b -> (m b)"."""
    return inputs, repeat(targets, "b ... -> (m b) ...", m=num_estimators)


def _identity(inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    return inputs, targets


@dataclasses.dataclass(frozen=True)
class Table8Model:
    """A Table 8 model: how to build it, how its training batch is formed, and the paper's figures."""

    name: str
    label: str
    num_estimators: int
    builder: Callable[[int], nn.Module]
    target_format: str  # how training targets are formed, in words
    format_batch_fn: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]
    paper: PaperRow
    num_parameters: int  # torch-uncertainty 0.13.0, shared/PEER.md

    def build(self, num_classes: int = 100) -> nn.Module:
        return self.builder(num_classes)

    def format_batch(self, inputs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
        return self.format_batch_fn(inputs, targets)


def _entry(name, label, m, builder, target_format, format_batch_fn, paper, params) -> Table8Model:
    return Table8Model(name, label, m, builder, target_format, format_batch_fn, PaperRow(*paper), params)


_REPEAT4 = functools.partial(repeat_targets, num_estimators=4)

TABLE8_MODELS: dict[str, Table8Model] = {e.name: e for e in (
    _entry("single", "Single ResNet-50", 1,
           lambda c: resnet(3, c, 50, style="cifar"),
           "unchanged", _identity, (37.06, 3709, 22.42, 5718), 23_705_252),
    _entry("pe-2-4-1", "PE-(2,4,1) ResNet-50", 4,
           lambda c: packed_resnet(3, c, 50, num_estimators=4, alpha=2, gamma=1, style="cifar"),
           "repeated b -> (m b)", _REPEAT4, (179.50, 1381, 51.20, 3406), 23_965_200),
    _entry("pe-2-4-2", "PE-(2,4,2) ResNet-50", 4,
           lambda c: packed_resnet(3, c, 50, num_estimators=4, alpha=2, gamma=2, style="cifar"),
           "repeated b -> (m b)", _REPEAT4, (175.10, 1501, 52.11, 3440), 14_921_232),
    _entry("de", "Deep Ensembles (4x ResNet-50)", 4,
           lambda c: deep_ensembles_resnet(3, c, 50, num_estimators=4, style="cifar"),
           "repeated b -> (m b)", _REPEAT4, (145.30, 1001, 84.86, 1609), 94_821_008),
    _entry("mimo", "MIMO ResNet-50 (M=4)", 4,
           lambda c: mimo_resnet(3, c, 50, num_estimators=4, style="cifar"),
           "M shuffled copies of the batch, (m b) (MIMOBatchFormat rho=1)",
           functools.partial(mimo_batch_format, num_estimators=4, rho=1.0, batch_repeat=1),
           (37.90, 3574, 24.44, 5649), 24_351_696),
    _entry("batchensemble", "BatchEnsemble ResNet-50 (M=4)", 4,
           lambda c: batched_resnet(3, c, 50, num_estimators=4, style="cifar"),
           "repeated b -> (m b) (the model repeats the inputs)", _REPEAT4, (58.78, 1809, 53.97, 1916),
           24_016_492),
)}


def get_model(name: str) -> Table8Model:
    if name not in TABLE8_MODELS:
        raise ValueError(f"unknown Table 8 model {name!r}; choose one of {', '.join(TABLE8_MODELS)}")
    return TABLE8_MODELS[name]


# ---- eager twin: the same modules and weights, run as stock PyTorch (nn.Conv2d -> BatchNorm2d -> ReLU) ----

def _resnet_stem_eager(self, x: Tensor) -> Tensor:
    return self.optional_pool(self.stem_modules(x))


def _packed_conv_eager(self, x: Tensor) -> Tensor:
    out = self.conv(x)
    return rearrange(out, "b (m c) ... -> (m b) c ...", m=self.num_estimators) if self.last else out


def _eager_overrides(cls: type) -> Optional[dict]:
    """Methods that make instances of `cls` run stock PyTorch, or None when `cls` already does.

    Duck-typed on the modules' own public module paths: `forward_eager` (BatchEnsemble modules),
    `forward_modules` (pe_kernels.nn's fused residual blocks and PackedConvBNReLU2d), `stem_modules` (the
    ResNets' stem), and PackedConv2d.
    """
    if hasattr(cls, "forward_eager"):
        return {"forward": cls.forward_eager}
    if hasattr(cls, "forward_modules"):
        return {"forward": cls.forward_modules}
    if issubclass(cls, PackedConv2d):
        return {"forward": _packed_conv_eager}
    if hasattr(cls, "stem_modules"):
        return {"_stem": _resnet_stem_eager}
    return None


@functools.lru_cache(maxsize=None)
def _eager_class(cls: type) -> Optional[type]:
    overrides = _eager_overrides(cls)
    if overrides is None:
        return None
    return type(f"Eager{cls.__name__}", (cls,), {**overrides, "__module__": __name__,
                                                  "__doc__": f"{cls.__name__} run as stock PyTorch."})


def eager_twin(model: nn.Module) -> nn.Module:
    """A deep copy of `model` whose modules run the unfused stock PyTorch path (no pe_kernels op is called).

    Same submodules, parameter values and state_dict keys; classes become subclasses ("EagerBottleneck", ...)
    whose forward is torch-uncertainty's module-by-module forward. This is the "eager cuDNN" baseline.
    """
    twin = copy.deepcopy(model)
    for module in twin.modules():
        eager_cls = _eager_class(type(module))
        if eager_cls is not None:
            module.__class__ = eager_cls
    return twin
