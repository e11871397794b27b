"""What every pe_kernels module shares: when a fused kernel may stand in for its submodules, and no TorchScript.

Fused path or module path. A fused module (PackedConv2d over its `conv`, PackedConvBNReLU2d, the residual blocks)
calls kernels with its submodules' parameters instead of calling the submodules. That is exactly equivalent only
when calling them would do nothing more than their stock forward, so — as PyTorch's own fast paths (e.g.
nn.MultiheadAttention's) — the kernels run only when every bypassed submodule

* is exactly the stock class (`type(m) is nn.Conv2d`, nn.BatchNorm2d, ...): a subclass may override forward,
  and torch.nn.utils.parametrize swaps in a subclass whose weight is computed on access;
* has no forward/backward (pre-)hooks — torch.nn.utils.prune recomputes `weight` in a forward pre-hook —
  and no global module hook (torch.nn.modules.module.register_module_*_hook) is registered.

Otherwise the module runs its submodules one by one (their hooks fire, their forwards run) and records why in
pe_kernels.last_dispatch(): (module class, "modules", reason). The check is a few attribute reads per submodule;
the reason string is built only when the module path is taken.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn
from torch.nn.modules import module as _torch_module
from torch.nn.utils import parametrize, prune

from .. import _backend, functional

MODULE_PATH = "modules"  # the `backend` of a module-by-module forward in last_dispatch()


def global_hook_reason() -> Optional[str]:
    """Why no submodule call may be skipped while a global module hook is registered (None when none is)."""
    t = _torch_module
    if not (t._global_forward_pre_hooks or t._global_forward_hooks or t._global_backward_pre_hooks
            or t._global_backward_hooks):
        return None
    return "a global module hook is registered (torch.nn.modules.module.register_module_*_hook)"


def weight_and_bias(conv: nn.Module) -> tuple:
    """conv.weight, conv.bias of an exact nn.Conv2d (module_reason None): read from its _parameters (nn.Module's
    __getattr__ costs ~0.8 us a name on this hot path), through the attributes where they are not parameters."""
    params = conv._parameters
    if "weight" in params and "bias" in params:
        return params["weight"], params["bias"]
    return conv.weight, conv.bias


def module_reason(name: str, module: nn.Module, cls: type) -> Optional[str]:
    """None when `module` is exactly `cls` with no hooks, so that a kernel may replace calling it; else why not.
    `name` is its attribute path in the fused module ("conv.conv", "bn1", "shortcut.0")."""
    if type(module) is cls and not (module._forward_pre_hooks or module._forward_hooks
                                    or module._backward_pre_hooks or module._backward_hooks):
        return None
    if type(module) is not cls:
        if parametrize.is_parametrized(module):
            return (f"{name} is parametrized (torch.nn.utils.parametrize): its "
                    f"{', '.join(module.parametrizations.keys())} is computed on access")
        expected = f"nn.{cls.__name__}" if cls.__module__.startswith("torch.nn.") else cls.__name__
        return f"{name} is {type(module).__name__}, not {expected}"
    if any(isinstance(h, prune.BasePruningMethod) for h in module._forward_pre_hooks.values()):
        return f"{name} is pruned (torch.nn.utils.prune recomputes its weight in a forward pre-hook)"
    kinds = [kind for kind, hooks in (("forward pre-hook", module._forward_pre_hooks),
                                      ("forward hook", module._forward_hooks),
                                      ("backward pre-hook", module._backward_pre_hooks),
                                      ("backward hook", module._backward_hooks)) if hooks]
    return f"{' and '.join(kinds)} on {name}"


def activation_reason(activation_fn) -> Optional[str]:
    """None when `activation_fn` is ReLU (the kernels' only fused activation); else why the module path runs."""
    if activation_fn is torch.nn.functional.relu or activation_fn is torch.relu:
        return None
    return f"activation_fn is {getattr(activation_fn, '__name__', activation_fn)!r}, not relu"


def dropout_shortcut_reason(dropout: nn.Module, shortcut: nn.Module) -> tuple[Optional[str], tuple]:
    """(why not, shortcut's members): a residual block's dropout must be an unhooked, inactive nn.Dropout2d and
    its shortcut an unhooked nn.Sequential, empty or of two members (returned for the caller's own check)."""
    reason = module_reason("dropout", dropout, nn.Dropout2d)
    if reason is None and dropout.training and dropout.p > 0:
        reason = f"dropout is active (training, p={dropout.p})"
    reason = reason or module_reason("shortcut", shortcut, nn.Sequential)
    parts = tuple(shortcut._modules.values())
    if reason is None and parts and len(parts) != 2:
        reason = f"shortcut has {len(parts)} modules, not a conv and a norm"
    return reason, parts


def check_batched_4d(module: nn.Module, x: torch.Tensor) -> None:
    """BatchNorm2d's input rule for the modules that end in one: a 4-D batch, else its ValueError."""
    if x.dim() != 4:
        raise ValueError(f"{type(module).__name__}: expected 4D input (got {x.dim()}D input); it normalises "
                         f"a 4-D batch (N, C, H, W) as BatchNorm2d does, got shape {tuple(x.shape)}")


def record_module_path(owner: nn.Module, reason: str) -> None:
    """last_dispatch() = (owner's class, "modules", reason) — skipped while torch.compile traces."""
    if not torch.compiler.is_compiling():
        _backend.record(type(owner).__name__, MODULE_PATH, reason)


class NoTorchScript:
    """Mixin of every pe_kernels module: torch.jit.script raises a clear error instead of a TorchScript one, and a
    change of mode (train() / eval()) drops the values functional.py caches from parameters (clear_caches: writes
    that bypass version counters during training — CUDA-graph replays, `.data` — cannot leave a stale eval cache).

    torch.jit.script calls `__prepare_scriptable__()` on the module and, recursively, on its submodules, so a
    model built of pe_kernels modules raises it too."""

    def train(self, mode: bool = True):
        if self.training != bool(mode):
            functional.clear_caches()
        return super().train(mode)

    def __prepare_scriptable__(self):
        raise RuntimeError(
            f"{type(self).__name__} (pe_kernels) cannot be compiled by torch.jit.script: its forward picks a "
            "backend and a fused path in Python and calls pe_kernels' custom ops, which TorchScript does not "
            "support. Use torch.compile(model) (fullgraph=True works) or torch.export.export(model, (x,)) "
            "instead; both trace the custom ops.")
