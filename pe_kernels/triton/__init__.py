"""The `triton` backend: Triton kernels with the same functions, arguments and results as
pe_kernels.reference (the contract). GPU in production; on CPU only under TRITON_INTERPRET=1, for tests.

Activations in fp16, bf16 or fp32 (fp64 raises TypeError: the dispatcher sends it to the torch backend);
per-channel vectors and statistics in fp32; every 4-D output is channels_last. All reductions are
deterministic (per-tile partial sums reduced in a fixed order, no atomics); the BN statistics [mean, m2] are
per-tile [count, mean, M2] merged with Chan's formula (conv_fwd.py), stable when the mean dwarfs the spread.

Files: conv_fwd.py (fused grouped conv forward + statistics; conv_bn_train: + the BatchNorm finalize by the
conv's last programs, one launch), conv_bwd.py (its backward: epilogue backward, dgrad with the prologue backward,
split-M wgrad; conv_bn_train_backward: wgrad and dgrad forming g_acc on load, two launches), bn_finalize.py
(statistics -> scale/shift, running stats, num_batches_tracked, and the finalize's backward: one launch each),
bn_apply.py (BN apply + residual tail, and its one-pass backward), conv_bn_junction.py (the backward of a block's
tail and the next block's first conv as two GEMM pairs: the tail's backward in the head's dgrad epilogue).
"""

from .bn_apply import bn_apply, bn_apply_backward, bn_apply_keyed, bn_apply_relu_bits
from .bn_finalize import bn_finalize, bn_finalize_backward, bn_running_update, bn_train_finalize
from .conv_bn_junction import conv_bn_junction_backward
from .conv_bwd import conv_bn_train_backward, conv_fused_backward
from .conv_fwd import conv_bn_train, conv_bn_train_keyed, conv_fused, conv_fused_keyed

# conv_bn_train(x_prime=True) returns the x' its launch stored (conv_fwd.stores_x_prime), conv_bn_train_backward
# reads it (ops/contract.X_PRIME)
X_PRIME = True

__all__ = [
    "conv_fused",
    "conv_fused_backward",
    "bn_finalize",
    "bn_running_update",
    "bn_train_finalize",
    "bn_finalize_backward",
    "conv_bn_train",
    "conv_bn_train_backward",
    "bn_apply",
    "bn_apply_backward",
    # optional (ops/contract.OPTIONAL_BACKEND_FUNCTIONS): launch plans keyed on the op's key
    "conv_fused_keyed",
    "conv_bn_train_keyed",
    "bn_apply_keyed",
    # optional (ops/contract.OPTIONAL_FUSED_BACKWARDS, OPTIONAL_FORWARD_EXTRAS): a fused backward of its own
    "conv_bn_junction_backward",
    "bn_apply_relu_bits",
]
