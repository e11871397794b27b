"""Functional API: the only entry the modules call. Layouts NCHW or channels_last in; the kernels' path gives
channels_last out, the stock path what the stock modules give.

* packed_conv2d(x, weight, bias, ...)              plain grouped conv (PackedConv2d)
* conv_bn(x, weight, bn, ...)                       conv -> BatchNorm (train: batch stats; eval: folded) -> act
  (conv_bn_fused: its kernels' path, once the caller has asked stock_layer)
* batch_norm_act(y, bn, residual, residual_bn)      BN apply (+ BN'd residual) + act, one pass
* packed_linear(x, weight, bias, implementation)     block-diagonal linear of PackedLinear (einsum, conv1d, full,
                                                    sparse: torch-uncertainty's four ways)

BatchNorm semantics are BatchNorm2d's, edge cases included: one value per channel in training raises its
ValueError; an empty batch gives an empty output, bumps num_batches_tracked and leaves the running statistics.

Stock path: where the layer's backend is `torch` (requested, or `auto` without a measured or validated kernel:
_backend.stock_path), a layer runs the stock modules' ATen ops — F.conv2d, BatchNorm2d's own forward, relu — so
it costs what the stock modules cost (launches and host time). Kernel path: eval conv -> BN -> act is one
conv_fused launch; the folded BN (scale, shift) and, under autocast, the weight's cast are cached per parameter
version (tensor version counters: recomputed when a parameter or buffer changes in place) and per cache
generation, except while torch.compile traces, while a CUDA graph captures (the graph then recomputes them in its
own kernels) or when they need a gradient. A torch.optim optimizer's step drops what was cached from its
parameters (fused optimizers write without bumping versions); the generation moves on (every cached value is
dropped) when a pe_kernels module changes mode (train() / eval()) and on clear_caches(): the call for writes no
version counter sees — through `.data`, a CUDA graph's replays, another library's kernels — into a model kept in
eval mode. Training: conv with statistics, one bn_train_finalize (BatchNorm2d's bookkeeping, no host sync), then
the apply or the next conv's prologue.

Prologue fusion: conv_bn(..., defer=True) in training returns a `Deferred` — the conv output with its BN
affine and activation not applied — and the next conv_bn/packed_conv2d applies it while loading its input, so
the normalised tensor never touches memory (the MLPerf-ResNet pattern). `materialize()` applies it explicitly.

Junctions: a residual block in training may leave its tail (last conv -> BN -> + residual -> act) pending
(`PendingTail`); the next block's first conv -> BN then joins it in one autograd node (conv_bn_junction_fused:
ops.conv_bn_junction, whose kernels run the tail's backward in that conv's dgrad epilogue). `materialize()` runs
a pending tail alone (conv_bn_fused with the residual), as the block would have.
"""

from __future__ import annotations

import dataclasses
import weakref
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook
from torch.utils.weak import WeakTensorKeyDictionary

from . import _backend, ops
from .ops import _transforms
from .ops.contract import param_dtype

Tensor = torch.Tensor

ACTIVATIONS = (None, "relu")


@dataclasses.dataclass
class Deferred:
    """act(y * scale[c] + shift[c]) with the affine map and activation still to apply."""

    y: Tensor
    scale: Tensor
    shift: Tensor
    relu: bool

    def materialize(self) -> Tensor:
        return ops.bn_apply(self.y, self.scale, self.shift, relu=self.relu)


@dataclasses.dataclass
class PendingTail:
    """A block's training tail not run yet: act(BN(conv(x)) + residual * rs + rb) with BN from the batch statistics
    (conv_bn_fused's arguments): the next block's first conv -> BN may join it (conv_bn_junction_fused)."""

    x: "Activation"                   # the tail conv's input
    conv: dict                        # the tail conv's weight, bias, stride, padding, dilation, groups, padding_mode
    bn: nn.BatchNorm2d                # training, batch statistics, N*P*Q >= 2 (checked by the block)
    residual: Optional[Tensor]
    residual_affine: Optional[tuple[Tensor, Tensor]]
    relu: bool
    shortcut: Optional[tuple] = None  # (its input, its conv's arguments as `conv`, its training BN): the residual is
    #                                   that conv -> BN (then residual and residual_affine are None)

    @property
    def tensor(self) -> Tensor:
        """The tensor the tail reads first (its device and dtype are the layer's)."""
        return self.x.y if isinstance(self.x, Deferred) else self.x

    def materialize(self) -> Tensor:
        residual, affine = self.residual, self.residual_affine
        if self.shortcut is not None:  # the shortcut's conv -> BN first, as the block runs it
            x_s, conv_s, bn_s = self.shortcut
            residual, s_scale, s_shift = conv_bn_pending(x_s, bn=bn_s, **conv_s)
            affine = (s_scale, s_shift)
        return conv_bn_fused(self.x, bn=self.bn, activation="relu" if self.relu else None, residual=residual,
                             residual_affine=affine, **self.conv)


Activation = Union[Tensor, Deferred, PendingTail]


def materialize(x: Activation) -> Tensor:
    return x.materialize() if isinstance(x, (Deferred, PendingTail)) else x


def _check_activation(activation: Optional[str]) -> bool:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return activation == "relu"


def resolve_padding(padding, kernel_size, dilation):
    """Numeric (symmetric) padding for the op, plus explicit F.pad amounts when 'same' is asymmetric."""
    if isinstance(padding, str):
        if padding == "valid":
            return (0, 0), None
        if padding == "same":
            sym, extra = [], []
            for k, d in zip(kernel_size, dilation):
                total = d * (k - 1)
                sym.append(total // 2)
                extra.append(total - 2 * (total // 2))
            if any(extra):  # as ATen: the extra row/column goes at the end
                return (0, 0), (sym[1], sym[1] + extra[1], sym[0], sym[0] + extra[0])
            return tuple(sym), None
        raise ValueError(f"padding must be 'same', 'valid' or numbers, got {padding!r}")
    return padding, None


def _prepare_input(x: Activation, padding_mode: str, padding, kernel_size, dilation):
    """Resolve 'same'/'valid' and non-zero padding modes; returns (tensor or Deferred, numeric padding)."""
    padding, explicit = resolve_padding(padding, kernel_size, dilation)
    if padding_mode != "zeros":
        if explicit is None:
            ph, pw = ops._common.pair(padding, "padding")
            explicit = (pw, pw, ph, ph)
        return F.pad(materialize(x), explicit, mode=padding_mode), (0, 0)
    if explicit is not None:
        return F.pad(materialize(x), explicit), (0, 0)
    return x, padding


def _conv(x: Activation, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
          padding_mode: str = "zeros", **epilogue) -> tuple[Tensor, Tensor]:
    if padding_mode == "zeros" and not isinstance(padding, str) and not isinstance(x, Deferred):
        # numeric zero padding and a plain input: nothing to resolve, straight to the op (which checks them)
        return ops.conv_fused(x, _cast_weight(weight, x), bias, stride=stride, padding=padding, dilation=dilation,
                              groups=groups, **epilogue)
    kernel_size = tuple(weight.shape[2:])
    x, padding = _prepare_input(x, padding_mode, padding, kernel_size, ops._common.pair(dilation, "dilation"))
    prologue = {}
    if isinstance(x, Deferred):
        prologue = dict(in_scale=x.scale, in_shift=x.shift, in_relu=x.relu)
        x = x.y
    return ops.conv_fused(x, _cast_weight(weight, x), bias, stride=stride, padding=padding, dilation=dilation,
                          groups=groups, **prologue, **epilogue)


def stock_layer(x: Activation, weight: Optional[Tensor] = None) -> Optional[_backend.Dispatch]:
    """The stock-path decision of a layer whose first op reads `x` (see the module docstring; `weight`, its conv's
    weight, is not consulted yet: modules leave it out, sparing a parameter lookup per call): a Dispatch recorded as
    last_dispatch() when the layer runs the stock modules' ATen ops, else None (the kernels' ops). Under a
    torch.func transform or forward-mode AD the ops' composite path decides instead (None)."""
    if _transforms.transforms_active():
        return None
    t = x.y if isinstance(x, Deferred) else x
    if torch.compiler.is_compiling():
        reason = _traced_stock_reason(t.device, t.dtype)
        return None if reason is None else _backend.Dispatch("conv_fused", "torch", reason)
    choice = _backend.stock_path("conv_fused", t.device, t.dtype)
    if choice is not None:
        _backend.record_dispatch(choice)
    return choice


@torch.compiler.assume_constant_result
def _traced_stock_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """stock_path's reason, read once when torch.compile traces (the request as the graph is traced: the
    backend request lives in a contextvar, which dynamo does not trace)."""
    choice = _backend.stock_path("conv_fused", device, dtype)
    return None if choice is None else choice.reason


def stock_conv_bn(x: Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> Tensor:
    """bn.forward(conv.forward(x)) for an exact, unhooked nn.Conv2d and nn.BatchNorm2d (the caller checked: a
    module's stock path): in eval with running statistics and zero padding, the very ATen calls of their forwards
    (F.conv2d, F.batch_norm with the same arguments), without their attribute lookups and bookkeeping, none of which
    applies there; otherwise their forwards."""
    if conv.padding_mode == "zeros" and not bn.training:
        params = conv._parameters
        try:
            weight, bias = params["weight"], params["bias"]
        except KeyError:  # replaced by a plain attribute (del conv.weight; conv.weight = t)
            weight, bias = conv.weight, conv.bias
        bn_weight, bn_bias, running_mean, running_var, _ = _bn_tensors(bn)
        if running_mean is not None and running_var is not None:  # (else BatchNorm2d uses the batch statistics)
            y = F.conv2d(x, weight, bias, conv.stride, conv.padding, conv.dilation, conv.groups)
            momentum = 0.0 if bn.momentum is None else bn.momentum
            return F.batch_norm(y, running_mean, running_var, bn_weight, bn_bias, False, momentum, bn.eps)
    return bn.forward(conv.forward(x))


def _stock_conv(x: Activation, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation, groups: int,
                padding_mode: str) -> Tensor:
    """F.conv2d, the stock module's op (autocast casts as it does for nn.Conv2d; the output's memory format is
    the one ATen gives, as for the stock modules)."""
    x, padding = _prepare_input(materialize(x), padding_mode, padding, tuple(weight.shape[2:]),
                                ops._common.pair(dilation, "dilation"))
    return F.conv2d(x, weight, bias, stride, padding, dilation, groups)


def _stock_tail(y: Tensor, bn: nn.BatchNorm2d, relu: bool, residual: Optional[Tensor] = None,
                residual_affine: Optional[tuple[Tensor, Tensor]] = None) -> Tensor:
    """act(bn(y) + residual * rs + rb) with BatchNorm2d's own forward (its running statistics, num_batches_tracked
    and errors) and ATen ops."""
    out = bn.forward(y)
    if residual is not None:
        if residual_affine is not None:
            residual = residual * residual_affine[0].view(1, -1, 1, 1) + residual_affine[1].view(1, -1, 1, 1)
        out = out + residual
    return torch.relu(out) if relu else out


def packed_conv2d(x: Activation, weight: Tensor, bias: Optional[Tensor] = None, stride=1, padding=0, dilation=1,
                  groups: int = 1, padding_mode: str = "zeros") -> Tensor:
    """y = conv2d(x, weight, bias) with `groups` groups (a Deferred input is normalised on load)."""
    ops._common.check_4d(x.y if isinstance(x, Deferred) else x, "x")
    if stock_layer(x, weight) is not None:
        return _stock_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)
    return _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)[0]


def _is_batch_norm_2d(bn: nn.Module) -> bool:
    return isinstance(bn, nn.BatchNorm2d) and not isinstance(bn, nn.SyncBatchNorm)


def _uses_batch_stats(bn: nn.BatchNorm2d) -> bool:
    if bn.training:
        return True
    _, _, running_mean, running_var, _ = _bn_tensors(bn)
    return running_mean is None and running_var is None


def _version(t: Optional[Tensor]) -> tuple:
    return (None,) if t is None else (t.data_ptr(), t._version)


def _same_sources(refs: tuple, tensors: tuple) -> bool:
    """The cached entry was made from these very tensor objects (a new tensor at a freed one's address, with the
    same version count, must not hit)."""
    for r, t in zip(refs, tensors):  # (a loop: no generator on this hot path)
        if (t is not None) if r is None else (r() is not t):
            return False
    return True


def _refs(tensors: tuple) -> tuple:
    return tuple(None if t is None else weakref.ref(t) for t in tensors)


def _cacheable(*tensors: Optional[Tensor]) -> bool:
    """Whether values derived from `tensors` may be reused across calls: not while torch.compile traces or a
    TorchDispatchMode is active, not while a CUDA graph captures (its replays must recompute them from the live
    parameters), not when autograd must see them, not for tensor subclasses or inference tensors whose version
    counter cannot be read. (A hot path: plain attribute reads, no torch.device objects.)"""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return False
    grad = torch.is_grad_enabled()
    cuda = False
    for t in tensors:
        if t is None:
            continue
        if type(t) not in ops._common.PLAIN_TENSORS or (grad and t.requires_grad) or t.is_inference():
            return False
        cuda = cuda or t.is_cuda
    return not (cuda and torch.cuda.is_current_stream_capturing())


# module -> (key, weak refs to the sources, derived tensors); parameter -> (key, derived); entries die with their owner
_FOLDED: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()
_CAST = WeakTensorKeyDictionary()  # (tensor keys compare by identity)
_GENERATION = [0]  # part of every cache key: clear_caches() moves it on


def clear_caches() -> None:
    """Drop every value derived from parameters and buffers (eval BatchNorm folds, cast weights): the next call
    recomputes them. Called when a pe_kernels module changes mode (an optimizer step drops what was cached from
    its own parameters); call it yourself after writing a model's parameters or buffers in a way no version counter
    sees (`p.data.copy_(...)`, CUDA-graph replays of a training step, another library's kernels) while the model
    stays in eval mode."""
    _GENERATION[0] += 1
    _FOLDED.clear()
    _CAST.clear()


def _after_optimizer_step(optimizer, args, kwargs) -> None:
    """torch.optim's global step post-hook: fused optimizers (SGD/Adam/AdamW fused=True) write parameters without
    bumping their version counters, so no value cached from the optimizer's parameters may outlive its step (the
    caches of models it does not train, e.g. a teacher in eval, stay)."""
    if not (_FOLDED or _CAST):
        return
    stepped = {id(p) for group in optimizer.param_groups for p in group["params"]}
    for weight in [t for t in _CAST.keys() if id(t) in stepped]:
        del _CAST[weight]
    for bn in [m for m, hit in _FOLDED.items()
               if any(ref is not None and id(ref()) in stepped for ref in hit[1])]:
        del _FOLDED[bn]


register_optimizer_step_post_hook(_after_optimizer_step)


def _bn_tensors(bn: nn.BatchNorm2d) -> tuple:
    """(weight, bias, running_mean, running_var, num_batches_tracked) of a BatchNorm2d: from its _parameters and
    _buffers for an exact nn.BatchNorm2d (nn.Module.__getattr__ costs ~0.8 us a name on this hot path), through the
    attributes for a subclass (a parametrized BatchNorm computes its weight on access)."""
    if type(bn) is nn.BatchNorm2d:
        params, buffers = bn._parameters, bn._buffers
        try:
            return (params["weight"], params["bias"], buffers["running_mean"], buffers["running_var"],
                    buffers["num_batches_tracked"])
        except KeyError:  # one of them replaced by a plain attribute (del bn.weight; bn.weight = t)
            pass
    return bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked


def _folded_affine(bn: nn.BatchNorm2d, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Eval-mode BN as scale/shift: scale = w / sqrt(running_var + eps), shift = b - running_mean * scale;
    cached per version of the four tensors (see _cacheable)."""
    w, b, rm, rv, _ = _bn_tensors(bn)
    if not _cacheable(w, b, rm, rv):
        return _fold(w, b, rm, rv, bn.eps, dtype)
    key = (_GENERATION[0], dtype, bn.eps, *_version(w), *_version(b), *_version(rm), *_version(rv))
    hit = _FOLDED.get(bn)
    if hit is not None and hit[0] == key and _same_sources(hit[1], (w, b, rm, rv)):
        return hit[2]
    with torch.no_grad():
        folded = _fold(w, b, rm, rv, bn.eps, dtype)
    _FOLDED[bn] = (key, _refs((w, b, rm, rv)), folded)
    return folded


def _fold(weight, bias, running_mean, running_var, eps: float, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    invstd = torch.rsqrt(running_var.to(dtype) + eps)
    scale = invstd if weight is None else weight.to(dtype) * invstd
    shift = -running_mean.to(dtype) * scale
    if bias is not None:
        shift = shift + bias.to(dtype)
    return scale, shift


def _cast_weight(weight: Tensor, x: Activation) -> Tensor:
    """The conv weight as the kernels read it: in the dtype the op runs in (autocast's). Where that is cacheable
    (eval) also channels_last (KRSC), made once per weight version and cache generation. Otherwise (training) only
    cast, differentiably, in its own layout: the weight gradient then comes back in the parameter's layout (no
    AccumulateGrad copy), and the launchers copy a KCRS weight to KRSC per launch (triton/_common.krsc)."""
    x_t = x.y if isinstance(x, Deferred) else x
    amp = ops._common.autocast_dtype(x_t)
    dtype = weight.dtype if amp is None else amp
    krsc = weight.is_contiguous(memory_format=torch.channels_last)
    if dtype == weight.dtype and krsc:
        return weight
    if not _cacheable(weight):
        return weight if dtype == weight.dtype else weight.to(dtype)
    key = (_GENERATION[0], dtype, *_version(weight))
    hit = _CAST.get(weight)  # keyed by the tensor object itself
    if hit is not None and hit[0] == key:
        return hit[1]
    with torch.no_grad():
        cast = weight.to(dtype, memory_format=torch.channels_last)
    _CAST[weight] = (key, cast)
    return cast


def _batch_affine(bn: nn.BatchNorm2d, stats: Optional[Tensor], y: Tensor) -> tuple[Tensor, Tensor]:
    """Training-mode BN of `y` (the BN input) as scale/shift from its batch statistics `stats`; updates the
    running statistics (ops.bn_train_finalize: one kernel, no host sync). As BatchNorm2d: num_batches_tracked is
    bumped (also for an empty batch); one value per channel raises ValueError; an empty batch (stats None) leaves
    the running statistics alone and gives scale = weight, shift = bias, so that the empty output stays connected
    to them (zero gradients, not None)."""
    count = y.shape[0] * y.shape[2] * y.shape[3]
    tracked = bn.training and bn.track_running_stats
    nbt = bn.num_batches_tracked if tracked else None
    if count == 1:  # BatchNorm2d bumps num_batches_tracked before F.batch_norm raises
        if nbt is not None:
            nbt.add_(1)
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {y.shape}")
    dtype = param_dtype(y.dtype) if stats is None else stats.dtype
    weight = None if bn.weight is None else bn.weight.to(dtype)
    bias = None if bn.bias is None else bn.bias.to(dtype)
    if count == 0:
        if nbt is not None:
            nbt.add_(1)
        scale = torch.ones(y.shape[1], dtype=dtype, device=y.device) if weight is None else weight
        return scale, (torch.zeros_like(scale) if bias is None else bias)
    running = tracked and bn.running_mean is not None
    return ops.bn_train_finalize(stats, count, weight, bias, bn.eps, bn.running_mean if running else None,
                                 bn.running_var if running else None, nbt, bn.momentum)


def _conv_with_stats(x: Activation, weight: Tensor, bias: Optional[Tensor], stride, padding, dilation,
                     groups: int, padding_mode: str) -> tuple[Tensor, Optional[Tensor]]:
    """(y, per-channel statistics of y) for batch-statistics BN; None for an empty batch (nothing to count)."""
    batch = (x.y if isinstance(x, Deferred) else x).shape[0]
    y, stats = _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode, compute_stats=batch > 0)
    return y, (stats if batch > 0 else None)


def batch_norm_count(x: Activation, weight: Tensor, stride=1, padding=0, dilation=1, padding_mode: str = "zeros",
                     **_) -> int:
    """N*P*Q: the values per channel that a BatchNorm after this conv normalises (padding 'same' / 'valid' and the
    padding modes as the conv resolves them; nothing computed)."""
    t = x.y if isinstance(x, Deferred) else x
    dilation, stride = ops._common.pair(dilation, "dilation"), ops._common.pair(stride, "stride")
    r, s = weight.shape[2], weight.shape[3]
    pad, explicit = resolve_padding(padding, (r, s), dilation)
    pad = ops._common.pair(pad, "padding")
    h, w = t.shape[2], t.shape[3]
    if explicit is not None:  # F.pad first (asymmetric 'same'), then no padding
        h, w, pad = h + explicit[2] + explicit[3], w + explicit[0] + explicit[1], (0, 0)
    elif padding_mode != "zeros":  # F.pad with the mode, then no padding
        h, w, pad = h + 2 * pad[0], w + 2 * pad[1], (0, 0)
    return (t.shape[0] * ops.conv_output_size(h, r, stride[0], pad[0], dilation[0])
            * ops.conv_output_size(w, s, stride[1], pad[1], dilation[1]))


def _conv_bn_batch(x: Activation, weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d, stride, padding,
                   dilation, groups: int, padding_mode: str, tail: Optional[tuple] = None):
    """(y, scale, shift) with BN(conv(x)) = y * scale + shift from the batch statistics: ops.conv_bn_train (one
    autograd node; one launch forward and two backward on the triton backend), BatchNorm2d's bookkeeping included.
    With tail = (residual, residual_scale, residual_shift, relu): the applied output act(y * scale + shift +
    residual * residual_scale + residual_shift) instead, from ops.conv_bn_act (still one autograd node).
    An empty batch or one value per channel takes conv + _batch_affine (BatchNorm2d's own behaviour for them)."""
    count = batch_norm_count(x, weight, stride, padding, dilation, padding_mode)
    dilation = ops._common.pair(dilation, "dilation")
    x, padding = _prepare_input(x, padding_mode, padding, tuple(weight.shape[2:]), dilation)
    t = x.y if isinstance(x, Deferred) else x
    if count < 2:
        y, stats = _conv_with_stats(x, weight, bias, stride, padding, dilation, groups, "zeros")
        scale, shift = _batch_affine(bn, stats, y)
        return (y, scale, shift) if tail is None else ops.bn_apply(y, scale, shift, *tail)
    prologue = dict(in_scale=x.scale, in_shift=x.shift, in_relu=x.relu) if isinstance(x, Deferred) else {}
    bn_args = dict(stride=stride, padding=padding, dilation=dilation, groups=groups, **_bn_args(bn))
    if tail is None:
        return ops.conv_bn_train(t, _cast_weight(weight, t), bias, **prologue, **bn_args)
    residual, residual_scale, residual_shift, relu = tail
    return ops.conv_bn_act(t, _cast_weight(weight, t), bias, **prologue, **bn_args, residual=residual,
                           residual_scale=residual_scale, residual_shift=residual_shift, relu=relu)


def _check_bn(bn: nn.Module, channels: int) -> None:
    if not _is_batch_norm_2d(bn):
        raise TypeError(f"expected an nn.BatchNorm2d, got {type(bn).__name__}")
    if bn.num_features != channels:
        raise ValueError(f"BatchNorm2d has {bn.num_features} features but the conv gives {channels} channels")


def conv_bn(x: Activation, weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d, stride=1, padding=0,
            dilation=1, groups: int = 1, activation: Optional[str] = "relu", residual: Optional[Tensor] = None,
            padding_mode: str = "zeros", defer: bool = False) -> Activation:
    """act(BN(conv(x)) + residual) with BatchNorm2d semantics (running statistics included).

    Eval: BN folded into the conv epilogue — one kernel. Train: conv with statistics, finalize, then
    one apply pass — or, with defer=True and no residual, a Deferred for the next conv's prologue.
    """
    ops._common.check_4d(x.y if isinstance(x, Deferred) else x, "x")
    if stock_layer(x, weight) is None:
        return conv_bn_fused(x, weight, bias, bn, stride, padding, dilation, groups, activation, residual,
                             padding_mode, defer)
    relu = _check_activation(activation)
    _check_bn(bn, weight.shape[0])
    y = _stock_conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)
    return _stock_tail(y, bn, relu, residual)


def conv_bn_fused(x: Activation, weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d, stride=1, padding=0,
                  dilation=1, groups: int = 1, activation: Optional[str] = "relu", residual: Optional[Tensor] = None,
                  padding_mode: str = "zeros", defer: bool = False,
                  residual_affine: Optional[tuple[Tensor, Tensor]] = None) -> Activation:
    """conv_bn's kernels' path, for a caller that found stock_layer(x, weight) None (a module asks once per
    forward, not once per conv). `residual_affine` = (rs, rb): the residual enters as residual * rs + rb (a
    block's shortcut BatchNorm, conv_bn_pending's scale and shift). Training: one autograd node (ops.conv_bn_act),
    or, with defer=True and no residual, a Deferred (ops.conv_bn_train)."""
    relu = _check_activation(activation)
    _check_bn(bn, weight.shape[0])
    if residual_affine is not None and residual is None:
        raise ValueError("residual_affine given without a residual")
    rs, rb = residual_affine if residual_affine is not None else (None, None)
    if not _uses_batch_stats(bn):
        scale, shift = _folded_affine(bn, param_dtype(weight.dtype))
        if residual_affine is not None:  # one pass over y and the residual, both affine (fp32 arithmetic)
            y = _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)[0]
            return ops.bn_apply(y, scale, shift, residual, rs, rb, relu)
        return _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode, out_scale=scale,
                     out_shift=shift, residual=residual, out_relu=relu)[0]
    if defer and residual is None:
        return Deferred(*_conv_bn_batch(x, weight, bias, bn, stride, padding, dilation, groups, padding_mode), relu)
    return _conv_bn_batch(x, weight, bias, bn, stride, padding, dilation, groups, padding_mode,
                          (residual, rs, rb, relu))


def conv_bn_pending(x: Activation, weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d, stride=1, padding=0,
                    dilation=1, groups: int = 1, padding_mode: str = "zeros") -> tuple[Tensor, Tensor, Tensor]:
    """(y, scale, shift) so that BN(conv(x)) = y * scale + shift, in train (batch stats) and eval (folded).
    The kernels' path only (a block asks stock_layer() first)."""
    _check_bn(bn, weight.shape[0])
    if not _uses_batch_stats(bn):
        y = _conv(x, weight, bias, stride, padding, dilation, groups, padding_mode)[0]
        return (y, *_folded_affine(bn, param_dtype(y.dtype)))
    return _conv_bn_batch(x, weight, bias, bn, stride, padding, dilation, groups, padding_mode)


def conv_bn_junction_fused(tail: PendingTail, weight: Tensor, bias: Optional[Tensor], bn: nn.BatchNorm2d, stride=1,
                           padding=0, dilation=1, groups: int = 1, padding_mode: str = "zeros",
                           activation: Optional[str] = "relu") -> tuple[Tensor, Activation]:
    """(out, h): out = tail.materialize() and h = conv_bn_fused(out, weight, bias, bn, ..., activation, defer=True),
    the tail and this conv -> BN (training, batch statistics, no residual) as one autograd node where they can be
    (ops.conv_bn_junction); otherwise the two calls. The kernels' path only (a block asks stock_layer() first)."""
    relu = _check_activation(activation)
    _check_bn(bn, weight.shape[0])
    t_conv = tail.conv
    out_shape = _tail_out_shape(tail)
    convs = (t_conv, tail.shortcut[1]) if tail.shortcut is not None else (t_conv,)
    joined = (_uses_batch_stats(bn) and padding_mode == "zeros" and not isinstance(padding, str)
              and all(c["padding_mode"] == "zeros" and not isinstance(c["padding"], str) for c in convs)
              and _count_of(out_shape, weight, stride, padding, dilation) >= 2)
    if not joined:
        out = tail.materialize()
        return out, conv_bn_fused(out, weight, bias, bn, stride, padding, dilation, groups, activation,
                                  padding_mode=padding_mode, defer=True)
    x = tail.x
    t = x.y if isinstance(x, Deferred) else x
    prologue = dict(in_scale=x.scale, in_shift=x.shift, in_relu=x.relu) if isinstance(x, Deferred) else {}
    rs, rb = tail.residual_affine if tail.residual_affine is not None else (None, None)
    shortcut = {}
    if tail.shortcut is not None:
        x_s, conv_s, bn_s = tail.shortcut
        shortcut = dict(shortcut_x=x_s, shortcut_weight=_cast_weight(conv_s["weight"], t),
                        shortcut_bias=conv_s["bias"], shortcut_stride=conv_s["stride"],
                        shortcut_padding=conv_s["padding"], shortcut_dilation=conv_s["dilation"],
                        shortcut_groups=conv_s["groups"], **{f"shortcut_{k}": v for k, v in _bn_args(bn_s).items()})
    out, y_h, scale_h, shift_h = ops.conv_bn_junction(
        t, _cast_weight(t_conv["weight"], t), t_conv["bias"], **prologue, stride=t_conv["stride"],
        padding=t_conv["padding"], dilation=t_conv["dilation"], groups=t_conv["groups"],
        **_bn_args(tail.bn), residual=tail.residual, residual_scale=rs, residual_shift=rb, relu=tail.relu,
        head_weight=_cast_weight(weight, t), head_bias=bias, head_stride=stride, head_padding=padding,
        head_dilation=dilation, head_groups=groups, **{f"head_{k}": v for k, v in _bn_args(bn).items()}, **shortcut)
    return out, Deferred(y_h, scale_h, shift_h, relu)


def _bn_args(bn: nn.BatchNorm2d) -> dict:
    """The BatchNorm arguments of ops.conv_bn_train for a training BN (batch statistics): its vectors, eps, the
    running statistics it tracks and momentum."""
    bn_weight, bn_bias, running_mean, running_var, nbt = _bn_tensors(bn)
    tracked = bn.training and bn.track_running_stats
    running = tracked and running_mean is not None
    return dict(bn_weight=bn_weight, bn_bias=bn_bias, eps=bn.eps, running_mean=running_mean if running else None,
                running_var=running_var if running else None, num_batches_tracked=nbt if tracked else None,
                momentum=bn.momentum)


def _tail_out_shape(tail: PendingTail) -> tuple[int, int, int, int]:
    """(N, K, P, Q) of a pending tail's output (nothing computed)."""
    c = tail.conv
    t = tail.tensor
    dilation, stride = ops._common.pair(c["dilation"], "dilation"), ops._common.pair(c["stride"], "stride")
    pad = ops._common.pair(c["padding"], "padding")
    weight = c["weight"]
    return (t.shape[0], weight.shape[0],
            ops.conv_output_size(t.shape[2], weight.shape[2], stride[0], pad[0], dilation[0]),
            ops.conv_output_size(t.shape[3], weight.shape[3], stride[1], pad[1], dilation[1]))


def _count_of(shape: tuple, weight: Tensor, stride, padding, dilation) -> int:
    """N*P*Q of a conv with zero numeric padding on an input of `shape`."""
    dilation, stride = ops._common.pair(dilation, "dilation"), ops._common.pair(stride, "stride")
    pad = ops._common.pair(padding, "padding")
    return (shape[0] * ops.conv_output_size(shape[2], weight.shape[2], stride[0], pad[0], dilation[0])
            * ops.conv_output_size(shape[3], weight.shape[3], stride[1], pad[1], dilation[1]))


def batch_norm_act(y: Tensor, bn: nn.BatchNorm2d, activation: Optional[str] = None,
                   residual: Optional[Tensor] = None, residual_affine: Optional[tuple[Tensor, Tensor]] = None
                   ) -> Tensor:
    """act(BN(y) + residual*rs + rb) in one pass (BatchNorm2d semantics; y's statistics computed here)."""
    relu = _check_activation(activation)
    _check_bn(bn, y.shape[1])
    ops._common.check_4d(y, "y")
    if stock_layer(y, None) is not None:
        return _stock_tail(y, bn, relu, residual, residual_affine)
    if _uses_batch_stats(bn):
        stats = _stats_of(y) if y.shape[0] * y.shape[2] * y.shape[3] > 0 else None
        scale, shift = _batch_affine(bn, stats, y)
    else:
        scale, shift = _folded_affine(bn, param_dtype(y.dtype))
    rs, rb = residual_affine if residual_affine is not None else (None, None)
    return ops.bn_apply(y, scale, shift, residual, rs, rb, relu)


def _stats_of(y: Tensor) -> Tensor:
    """Per-channel [mean, m2] (m2 = sum of squared deviations, the conv_fused contract) of a tensor not produced
    by conv_fused: two passes in fp32 (fp64 for fp64 y), stable when the mean is large against the spread."""
    acc = y.to(param_dtype(y.dtype))
    dims = (0, 2, 3)
    mean = acc.sum(dim=dims) / max(y.shape[0] * y.shape[2] * y.shape[3], 1)
    m2 = (acc - mean.view(1, -1, 1, 1)).square().sum(dim=dims)
    return torch.stack([mean, m2])


LINEAR_IMPLEMENTATIONS = ("einsum", "conv1d", "full", "sparse")


def _block_diagonal_sparse(weight: Tensor) -> Tensor:
    """The (G*O, G*I) block-diagonal matrix of weight (G, O, I) as a sparse COO tensor (differentiable in weight)."""
    groups, out_per_group, in_per_group = weight.shape
    g, o, i = torch.meshgrid(*(torch.arange(n, device=weight.device) for n in weight.shape), indexing="ij")
    indices = torch.stack([(g * out_per_group + o).reshape(-1), (g * in_per_group + i).reshape(-1)])
    return torch.sparse_coo_tensor(indices, weight.reshape(-1), (groups * out_per_group, groups * in_per_group),
                                   is_coalesced=True, check_invariants=False)  # valid by construction


def packed_linear(x: Tensor, weight: Tensor, bias: Optional[Tensor], implementation: str = "einsum") -> Tensor:
    """Block-diagonal linear: x (..., G*I) with weight (G, O, I) -> (..., G*O), + bias (G*O,).

    `implementation` (torch-uncertainty's PackedLinear choices, one map computed four ways):
    "einsum" torch.einsum per group; "conv1d" a grouped F.conv1d of kernel size 1; "full" F.linear with the
    dense block-diagonal weight (torch.block_diag); "sparse" a sparse block-diagonal matrix (torch.sparse.mm)."""
    if implementation not in LINEAR_IMPLEMENTATIONS:
        raise ValueError(f"Unknown implementation: {implementation!r} for packed_linear; choose one of "
                         f"{', '.join(map(repr, LINEAR_IMPLEMENTATIONS))}")
    groups, out_per_group, in_per_group = weight.shape
    if x.shape[-1] != groups * in_per_group:
        raise ValueError(f"input has {x.shape[-1]} features, weight {tuple(weight.shape)} expects "
                         f"{groups * in_per_group}")
    lead = x.shape[:-1]
    amp = ops._common.autocast_dtype(x)                               # a linear layer runs in autocast's dtype
    if amp is not None:
        x, weight, bias = x.to(amp), weight.to(amp), None if bias is None else bias.to(amp)
    if implementation == "full":
        return F.linear(x, torch.block_diag(*weight.unbind(0)), bias)
    x2 = x.reshape(-1, groups * in_per_group)                         # (B, G*I)
    if implementation == "einsum":
        out = torch.einsum("bgi,goi->bgo", x2.reshape(-1, groups, in_per_group), weight)
    elif implementation == "conv1d":
        out = F.conv1d(x2.unsqueeze(-1), weight.reshape(groups * out_per_group, in_per_group, 1), groups=groups)
    else:
        out = torch.sparse.mm(_block_diagonal_sparse(weight), x2.t()).t()
    out = out.reshape(*lead, groups * out_per_group)
    return out if bias is None else out + bias
