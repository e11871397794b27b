"""torch.library custom ops of the kernel family (namespace `pe_kernels`), each dispatching to a backend.

The contract the backends implement (functions, gradient orders, per-channel dtype): ops/contract.py.

Public entries (checked, autocast-aware): conv_fused, conv_bn_train, conv_bn_act and conv_bn_junction (eager
autograd.Functions; composed of the registered ops when traced), bn_finalize, bn_train_finalize, bn_running_update,
bn_apply.
Registered ops: torch.ops.pe_kernels.{conv_fused, conv_fused_backward, bn_finalize, bn_finalize_backward,
bn_running_update, bn_apply, bn_apply_backward}. In eager mode the public entries call the backends through
autograd.Functions (ops/_common.eager_dispatch); tracing sees the registered ops.
"""

from .bn_apply import bn_apply
from .bn_finalize import bn_finalize, bn_running_update, bn_train_finalize
from .conv_bn_act import conv_bn_act
from .conv_bn_junction import conv_bn_junction
from .conv_bn_train import conv_bn_train
from .conv_fused import conv_fused, conv_output_size

__all__ = ["conv_fused", "conv_bn_train", "conv_bn_act", "conv_bn_junction", "conv_output_size", "bn_finalize",
           "bn_running_update", "bn_train_finalize", "bn_apply"]
