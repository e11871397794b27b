"""Property fuzz (issue 10): pe_kernels' modules against stock PyTorch twins of the same weights.

What is drawn. A module — PackedConv2d (last=True included), PackedConvBNReLU2d (ReLU or no activation), the
four fused residual blocks, a small ResNet (packed or standard, 3 or 4 stages) — with odd geometry (M in
{1, 2, 4}, alpha incl. 1.5, gamma, groups, first, minimum_channels_per_group, kernel 1-5 incl. even and
non-square, stride 1-3, padding 0/int/pair/'same'/'valid', zeros/reflect/replicate/circular padding, dilation
1-2, spatial down to 1x1, batch 1), BatchNorm variants (eps, momentum incl. None, affine, track_running_stats;
GroupNorm and non-ReLU activations: the module path), a dtype (fp32, fp16, bf16), an input layout (NCHW,
channels_last, channel slices of NCHW and NHWC tensors, x[:, :, ::1, 1:], every other column, a batch expanded
from one sample), off-centre inputs, and one or two steps in train or eval mode.

What is checked, each step, forward + backward against a stock twin built here from the module's public
submodules (nn.Conv2d -> BatchNorm2d -> ReLU module by module, torch-uncertainty's forward): the output, the
input gradient, every parameter gradient (None where stock gives None), every buffer (running_mean, running_var,
num_batches_tracked exactly), the backend that ran (the forced one, or the module path), or the same exception
type where the twin raises one (one value per channel in training). Between steps the parameters are moved and
the running statistics changed in place (as optimizer.step() and load_state_dict() do): a cache of weights or
folded BatchNorm that ignores tensor versions shows in the next step.

The oracle is the error budget of DESIGN.md (tests/_oracle.py), elementwise:

    |ours - ref64| <= 2 ruler + atol + kink + accumulation,   ruler >= |same - ref64|

ref64 = the twin in float64 on CPU on the same dtype-rounded values; same = the twin in the tested dtype on the
tested device; atol = atol_for(dtype) * max(1, max|ref64|). At module level the same-dtype twin is one sample
of many correct roundings, so the ruler also takes, pooled over a channel (outputs, input gradient) or a tensor
(parameter gradients, buffers): same's own error, and PROBE_MARGIN times the spread of float64 twins that round
where a correct implementation may (RoundingProbe). `kink`: a ReLU input within the dtype's rounding of zero
cannot be decided; the float64 twin is rerun with each such decision flipped and |flipped - ref64| is added
where it lands. `accumulation`: the fp32 accumulation bound n u32 sum|x||g| of conv weight and bias gradients
(ConvMagnitudes). Every allowance is computed in float64 from the example itself.
A step's gradients are not judged (outputs and buffers still are; counted in the statistics) where stock PyTorch
in the dtype gives a non-finite gradient, where one rounding of a BatchNorm input — or the rounding probes —
moves its normalised output by more than BN_ROUNDING_LIMIT, or where more than MAX_FLIPS ReLUs are undecidable.
What the oracle does not allow: BatchNorm statistics taken from the unrounded fp32 accumulator but applied to the
dtype-rounded y (at a channel of small variance that multiplies the rounding by 1/sqrt(eps)). Examples it once
misjudged (a correct rounding it did not allow for) are explicit on their tests: ORACLE_ANCHORS.

Findings (fixed; their focused tests are in tests/test_bn_stability.py and ANCHORS below): (1) a constant
channel in fp16/bf16: the statistics came from the unrounded fp32 accumulator while the BN apply used the rounded
y, so (y - mean) * invstd was rounding noise x 316 (stock: exactly the BN bias); now the statistics are those of
acc rounded to the stored dtype, and the conv backward's acc - mean uses the same rounded acc
(.lab/CONTRACT.md). (2) test_blocks_triton, a PackedBottleneck on constant images in fp16: bn1's weight gradient
(exactly 0: x_hat = 0) was 1.2e-2, the fp32 rounding of the prologue's d_in_scale = sum g*x left by bn_finalize's
backward sum g*x - mean * sum g and multiplied by invstd = 316 — finding (3), the BN scale gradient formed as
sum g*y - mean * sum g, at a zero-variance channel. (3) The scale sums (bn_apply's d_scale and d_residual_scale,
the prologue's d_in_scale, the epilogue's d_out_scale) are now formed centred on the tile's / channel's mean
(reference.sum_centred, triton bn_apply.sum_centred), leaving one rounding of mean * sum g (times invstd: at
|mean|/std 30-300 still a few times stock's two-pass error; removing it takes a centred apply, (y - mean) * scale
+ beta, in every backend — the roofline issue). The derandomized draws pass with it.

Size and reproduction. The CI default takes about two minutes on 2 CPU cores when everything passes (Triton under
TRITON_INTERPRET=1: fewer examples and smaller shapes; a failure adds its shrinking); PE_KERNELS_FUZZ_EXAMPLES=k
runs k times as many examples. Draws are derandomized, without a database: a CI failure reproduces with the
same command. A failure prints `replay: check_case(Case(...), backend)`, runnable from a Python shell in tests/
(import conftest first, so that TRITON_INTERPRET is set).
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import os
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from einops import rearrange
from hypothesis import HealthCheck, Phase, assume, event as _event, example, given, note as _note, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context
from torch import nn

import pe_kernels
from pe_kernels.models import PackedResNet, ResNet
from pe_kernels.nn import (BasicBlock, Bottleneck, PackedBasicBlock, PackedBottleneck, PackedConv2d,
                           PackedConvBNReLU2d, PackedLinear)

from _devices import ieee_fp32, require_backend
from _oracle import atol_for, check_budget

Tensor = torch.Tensor

FUZZ_SCALE = max(1, int(os.environ.get("PE_KERNELS_FUZZ_EXAMPLES", "1")))   # k: k times the CI examples
FUZZ_SHRINK = os.environ.get("PE_KERNELS_FUZZ_SHRINK", "1") != "0"         # 0: report failures unshrunk
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
LAYOUTS = ("nchw", "channels_last", "sliced_c", "sliced_c_cl", "sliced_w", "strided", "expand")
MAX_FLIPS = 48  # more undecidable ReLUs than this in a step: its gradients are not judged (counted)
PROBES = 4  # rounding probes per step (RoundingProbe)
PROBE_MARGIN = 1.5  # the largest of PROBES draws underestimates the spread of the rounding it samples
BN_ROUNDING_LIMIT = 0.05  # gradients unjudged past a BatchNorm one rounding moves more (_unjudged_gradients)
CPU = torch.device("cpu")


def event(text: str) -> None:
    """hypothesis.event inside a test (--hypothesis-show-statistics), nothing in a replay."""
    if currently_in_test_context():
        _event(text)


def note(text: str) -> None:
    """hypothesis.note inside a test (printed with a failing example), print() in a replay."""
    _note(text) if currently_in_test_context() else print(text)


def fuzz_settings(examples: int) -> settings:
    """Reproducible in CI: derandomized, no database, no deadline (the interpreter is slow), the blob printed.
    Shrinking a failure costs minutes under the interpreter; PE_KERNELS_FUZZ_SHRINK=0 skips it."""
    phases = [Phase.explicit, Phase.generate] + ([Phase.shrink] if FUZZ_SHRINK else [])
    return settings(max_examples=examples * FUZZ_SCALE, derandomize=True, database=None, deadline=None,
                    print_blob=True, phases=phases,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much,
                                           HealthCheck.data_too_large])


# ------------------------------------------------------------------------------------------------- the case
@dataclasses.dataclass(frozen=True)
class Case:
    """One drawn example; its repr is valid Python (`check_case(Case(...), 'triton')` replays it)."""

    kind: str              # "conv", "conv_bn", "PackedBasicBlock", ..., "packed_resnet", "resnet"
    kwargs: dict           # constructor arguments (norm / activation by name, see build())
    shape: tuple           # input (N, C, H, W)
    dtype: str = "float32"
    layout: str = "nchw"
    modes: tuple = (True,)  # train flag of each step
    seed: int = 0
    x_shift: float = 0.0   # inputs are randn * x_scale + x_shift (off-centre: BN statistics see a mean)
    x_scale: float = 1.0


ACTIVATIONS = {"relu": F.relu, "torch.relu": torch.relu, "silu": F.silu}
BLOCKS = {"PackedBasicBlock": PackedBasicBlock, "PackedBottleneck": PackedBottleneck, "BasicBlock": BasicBlock,
          "Bottleneck": Bottleneck}


def _norm_layer(spec: Optional[dict]) -> Callable[[int], nn.Module]:
    """normalization_layer of a block or ResNet: BatchNorm2d with spec's arguments, or GroupNorm(1, c)."""
    if spec is None:
        return nn.BatchNorm2d
    if spec.get("group"):
        return lambda c: nn.GroupNorm(1, c)
    return lambda c: nn.BatchNorm2d(c, **spec)


def build(case: Case) -> nn.Module:
    """The module of `case` in float64, its BatchNorms given random affine parameters and buffers."""
    torch.manual_seed(case.seed)
    kw = dict(case.kwargs)
    if case.kind == "conv":
        module = PackedConv2d(**kw)
    elif case.kind == "conv_bn":
        module = PackedConvBNReLU2d(**kw)
    elif case.kind in BLOCKS:
        norm = _norm_layer(kw.pop("norm", None))
        if "activation_fn" in kw:
            kw["activation_fn"] = ACTIVATIONS[kw["activation_fn"]]
        module = BLOCKS[case.kind](**kw, normalization_layer=norm)
    elif case.kind in ("packed_resnet", "resnet"):
        block = BLOCKS[kw.pop("block")]
        norm = _norm_layer(kw.pop("norm", None))
        cls = PackedResNet if case.kind == "packed_resnet" else ResNet
        module = cls(block, **kw, normalization_layer=norm)
    else:
        raise ValueError(f"unknown kind {case.kind!r}")
    module = module.double()
    gen = torch.Generator().manual_seed(case.seed + 1)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                k = m.num_features
                if m.weight is not None:
                    m.weight.copy_(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)
                    m.bias.copy_(torch.randn(k, generator=gen, dtype=torch.float64) * 0.2)
                if m.running_mean is not None:
                    m.running_mean.copy_(torch.randn(k, generator=gen, dtype=torch.float64) * 0.3)
                    m.running_var.copy_(torch.rand(k, generator=gen, dtype=torch.float64) + 0.5)
                    m.num_batches_tracked.fill_(int(torch.randint(0, 5, (), generator=gen)))
    return module


# ------------------------------------------------------------------------------ the stock twins (the oracle)
class Relu:
    """The twins' ReLU. Records its inputs; `masks` (one per call) replace its decisions; `flip` = (call, flat
    index) inverts one decision."""

    def __init__(self, flip: Optional[tuple[int, int]] = None, masks: Optional[list[Tensor]] = None) -> None:
        self.inputs: list[Tensor] = []
        self.flip, self.masks = flip, masks

    def __call__(self, t: Tensor) -> Tensor:
        j = len(self.inputs)
        self.inputs.append(t.detach().clone())
        if self.masks is not None:
            return t * self.masks[j].to(t.dtype)
        if self.flip is None or self.flip[0] != j:
            return torch.relu(t)
        mask = (t > 0).contiguous()
        mask.view(-1)[self.flip[1]] ^= True
        return t * mask.to(t.dtype)


UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}
# One rounding a probe stands for: two roundings to the dtype (an fp16 conv rounded, then its fp32 bias added and
# rounded again, as the torch backend does) and the fp32 arithmetic around them (scale, shift, the statistics
# terms of the backward: about four fp32 operations per element).
PROBE_ROUNDING = {dtype: 2 * u + 4 * UNIT_ROUNDOFF[torch.float32] for dtype, u in UNIT_ROUNDOFF.items()}


class RoundingProbe:
    """Where a dtype implementation may round, a float64 twin rounds too. The spread of such twins around ref64
    is the sensitivity of each result to roundings a correct implementation makes; the same-dtype twin samples
    it at one point only. Rounded here:

    * the input of every norm layer (the conv output y, stored in the dtype) onto the dtype's grid, shifted by
      a fraction of a unit in the last place (probe 0 and 1: +-0.49; then uniform), before the layer takes its
      statistics, as stock BatchNorm does: a consistent rounding, which leaves a constant channel constant;
      and the batch mean, once per channel, at fp32 (the contract's statistics are fp32: the mean of n equal
      values may be off by an ulp, which a zero-variance channel multiplies by 1/sqrt(eps)).
      (Statistics taken from the unrounded fp32 accumulator and applied to the rounded y are not a rounding of
      this kind: at a channel whose variance is small against eps they multiply the rounding by 1/sqrt(eps);
      the fuzz reports that, it does not allow it);
    * the input of every conv but the module's own (a norm, ReLU or block output: an activation stored in the
      dtype, by stock as by the fused prologues), the same way. The gradient a batch-statistics BatchNorm passes
      back is its eps leak where a channel has two values (w invstd (1 - x_hat^2) (g1 - g2) / 2, 1 - x_hat^2 =
      eps / (var + eps)): proportional to 1 / var, so one rounding of the activations that make var moves it
      by their relative rounding times |y| / std — fp16 storage alone, in float64 otherwise, moves a ResNet's
      gradients by 15 % (resnet, fp16, seed 0);
    * arithmetic, x * (1 + u r) with r in [-1, 1] (uniform, or +1 / -1 everywhere: roundings that add up),
      u = PROBE_ROUNDING[dtype]: the gradient arriving at every conv and norm output (stored or accumulated in
      the dtype, fp32 inside);
    * the output of a conv with a bias before its bias, onto the dtype's grid as above: ATen's cuDNN path
      (torch/…/Convolution.cpp, ConvBackend::Cudnn) stores the conv in the dtype and then adds the bias
      (output.add_(bias)), and so does the torch backend (conv in the dtype, fp32 bias, stored again): two
      roundings where stock on CPU makes one, and a BatchNorm with |mean| >> std multiplies the first by its
      invstd (PackedBasicBlock, fp16, seed 4729: stock fp16 with cuDNN's bias add lands 0.041 from ref64,
      ours 0.040, stock on CPU 0.009);
    * the fp32 accumulation of every conv output, at the size of its terms (conv of |x| and |w|), element by
      element: the order of a sum may differ from element to element (the Triton interpreter's numpy matmul
      rounds a row by its place in the block), so two equal samples need not give equal outputs, and a
      BatchNorm channel with zero variance multiplies that difference by 1/sqrt(eps);
    * the gradient a batch-statistics BatchNorm passes to its input, w invstd (g - mean g - x_hat mean(g x_hat)),
      at the size of each term, element by element; and, once per channel, the rounding of the fp32 mean the
      last term centres y on (the same for every element of the channel: a sum over the channel gathers it n
      times). A gradient that an invariance makes small — the conv weight and bias before such a BatchNorm
      (scale and shift invariance) — is a cancellation of those terms, set by these roundings.

    Correct implementations round at different places (ours adds an fp32 bias after an fp16 conv; CPU ATen
    accumulates fp32 statistics in double), so at such points ours and `same` differ by chance, element by
    element. The probe twin runs with the ReLU decisions of ref64 frozen, so it never includes a ReLU flip (those
    are handled one by one, elementwise)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype, seed: int, sign: Optional[float] = None) -> None:
        self.u, self.gen, self.sign = PROBE_ROUNDING[dtype], torch.Generator().manual_seed(seed), sign
        self.dtype = dtype
        self.unit = UNIT_ROUNDOFF[dtype]
        self._inputs: dict[int, Tensor] = {}
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(self._before_statistics)
                m.register_forward_hook(self._after_statistics)
            elif isinstance(m, nn.GroupNorm):
                m.register_forward_pre_hook(self._before)
            if isinstance(m, nn.Conv2d):
                m.register_forward_pre_hook(self._conv_input)
                m.register_forward_hook(self._accumulate)
            if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.GroupNorm)):
                m.register_forward_hook(self._round_gradient)

    def _r(self, shape, dtype: torch.dtype) -> Tensor:
        """r in [-1, 1]: uniform, or `sign` everywhere (roundings that add up instead of averaging out)."""
        if self.sign is not None:
            return torch.full(shape, self.sign, dtype=dtype)
        return torch.rand(shape, generator=self.gen, dtype=dtype) * 2 - 1

    def _noise(self, y: Tensor) -> Tensor:
        """An arithmetic rounding error of each element of y, independent from element to element."""
        return self.u * self._r(y.shape, y.dtype) * y.abs()

    def _stored(self, y: Tensor) -> Tensor:
        """y rounded to the dtype's grid shifted by a fraction of a unit in the last place: equal values stay
        equal (a constant channel stays constant), close values may merge, as real storage rounding does."""
        d = y.detach()
        ulp = torch.exp2(torch.floor(torch.log2(d.abs().clamp_min(1e-300)))) * 2 * self.unit
        offset = {1.0: 0.49, -1.0: -0.49}.get(self.sign, float(torch.rand((), generator=self.gen, dtype=d.dtype)) - 0.5)
        rounded = (torch.round(d / ulp - offset) + offset) * ulp
        return y + (rounded - d)

    def _conv_input(self, conv: nn.Conv2d, args: tuple) -> Optional[tuple]:
        """The activation a conv reads (a norm / ReLU / block output), stored in the dtype by every implementation:
        rounded as `_stored` does. Not the module's input: already on the dtype's grid, no implementation rounds it."""
        x = args[0].detach()
        if torch.equal(x.to(self.dtype).double(), x.double()):
            return None
        return (self._stored(args[0]),)

    def _before(self, norm: nn.Module, args: tuple) -> tuple:
        return (self._stored(args[0]),)

    def _before_statistics(self, bn: nn.BatchNorm2d, args: tuple) -> tuple:
        y = self._stored(args[0])
        if (bn.training or bn.running_mean is None) and y.requires_grad:
            self._inputs[id(bn)] = y
        return (y,)

    def _after_statistics(self, bn: nn.BatchNorm2d, args: tuple, out: Tensor) -> Optional[Tensor]:
        """A batch-statistics BatchNorm: its fp32 mean rounded once (per channel), and the gradient it passes to
        its input rounded at the size of its terms."""
        y = self._inputs.pop(id(bn), None)
        if y is None:
            return None
        dims = (0, 2, 3)
        mean = y.mean(dim=dims, keepdim=True).detach()
        invstd = torch.rsqrt(y.var(dim=dims, unbiased=False, keepdim=True) + bn.eps).detach()
        scale = invstd if bn.weight is None else invstd * bn.weight.detach().abs().view(1, -1, 1, 1)
        mean_rounding = PROBE_ROUNDING[torch.float32] * self._r(mean.shape, mean.dtype) * mean.abs()
        x_hat = (y.detach() - mean) * invstd
        seen: dict[str, Tensor] = {}

        def keep(g: Tensor) -> None:
            seen["g"] = g

        def round_terms(g_in: Tensor) -> Tensor:
            g = seen.pop("g", None)
            if g is None:
                return g_in
            variance_term = (g * x_hat).mean(dim=dims, keepdim=True).abs()
            terms = g.abs() + g.mean(dim=dims, keepdim=True).abs() + x_hat.abs() * variance_term
            centring = mean.abs() * invstd * variance_term          # per channel: the fp32 mean's rounding
            r = self._r(centring.shape, g.dtype)
            return g_in + (self._noise(terms) + PROBE_ROUNDING[torch.float32] * r * centring) * scale

        out.register_hook(keep)
        y.register_hook(round_terms)
        weight = 1.0 if bn.weight is None else bn.weight.view(1, -1, 1, 1)  # the rounding reaches d(weight) too
        return out - mean_rounding * invstd * weight

    def _accumulate(self, conv: nn.Conv2d, args: tuple, out: Tensor) -> Tensor:
        """The conv's fp32 accumulation, rounded independently for each output element (the order of a sum
        may differ from element to element: two equal samples need not give equal outputs)."""
        terms = conv._conv_forward(args[0].detach().abs(), conv.weight.detach().abs(), None)
        out = out + PROBE_ROUNDING[torch.float32] * self._r(terms.shape, terms.dtype) * terms
        if conv.bias is not None:  # the sum before the bias stored in the dtype first (ATen's cuDNN path)
            before = (out - conv.bias.view(1, -1, 1, 1)).detach()
            out = out + (self._stored(before) - before)
        return out

    def _round_gradient(self, module: nn.Module, args: tuple, out: Tensor) -> None:
        if out.requires_grad:
            out.register_hook(lambda g: g + self._noise(g))


def _stock_conv(module: nn.Module, x: Tensor) -> Tensor:
    """nn.Conv2d's own forward (ATen) with the weights of `module` (a PackedConv2d holds an nn.Conv2d)."""
    conv = module.conv if isinstance(module, PackedConv2d) else module
    assert type(conv) is nn.Conv2d
    return conv(x)


def _stock_packed_conv(m: PackedConv2d, x: Tensor) -> Tensor:
    out = _stock_conv(m, x)
    return rearrange(out, "b (m c) ... -> (m b) c ...", m=m.num_estimators) if m.last else out


def _stock_conv_bn(m: PackedConvBNReLU2d, x: Tensor, relu: Relu) -> Tensor:
    out = m.bn(_stock_conv(m.conv, x))
    return relu(out) if m.activation == "relu" else out


def _stock_block(b: nn.Module, x: Tensor, relu: Relu) -> Tensor:
    """torch-uncertainty's block forward, from the block's public submodules (conv1, bn1, ..., shortcut)."""
    act = relu if b.activation_fn in (F.relu, torch.relu) else b.activation_fn
    bottleneck = isinstance(b, (Bottleneck, PackedBottleneck))
    pairs = [(b.conv1, b.bn1), (b.conv2, b.bn2)] + ([(b.conv3, b.bn3)] if bottleneck else [])
    out = x
    for i, (conv, norm) in enumerate(pairs[:-1]):
        out = norm(_stock_conv(conv, out))
        if i == (1 if bottleneck else 0):
            out = b.dropout(out)
        out = act(out)
    conv, norm = pairs[-1]
    residual = b.shortcut[1](_stock_conv(b.shortcut[0], x)) if len(b.shortcut) else x
    return act(norm(_stock_conv(conv, out)) + residual)


def _stock_linear(layer: nn.Module, x: Tensor) -> Tensor:
    if not isinstance(layer, PackedLinear):
        return layer(x)
    out = x @ torch.block_diag(*layer.weight).T
    out = out if layer.bias is None else out + layer.bias
    return rearrange(out, "b (m h) -> (m b) h", m=layer.num_estimators) if layer.last else out


def _stock_resnet(model: nn.Module, x: Tensor, relu: Relu) -> Tensor:
    out = model.optional_pool(relu(model.bn1(_stock_conv(model.conv1, x))))
    for stage in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in (stage if isinstance(stage, nn.Sequential) else []):
            out = _stock_block(block, out, relu)
    return _stock_linear(model.linear, model.final_dropout(model.flatten(model.pool(out))))


def stock_forward(kind: str) -> Callable[[nn.Module, Tensor, Relu], Tensor]:
    if kind == "conv":
        return lambda m, x, relu: _stock_packed_conv(m, x)
    if kind == "conv_bn":
        return _stock_conv_bn
    if kind in BLOCKS:
        return _stock_block
    return _stock_resnet


def ours_forward(m: nn.Module, x: Tensor, relu: Relu) -> Tensor:
    return m(x)


# ---------------------------------------------------------------------------------------- inputs and layouts
def make_input(values: Tensor, layout: str) -> tuple[Tensor, Callable[[Tensor], Tensor]]:
    """(base, view): `view(base)` holds `values` (N, C, H, W) in `layout`; the gradient lands on `base`."""
    n, c, h, w = values.shape
    if layout == "nchw":
        return values.contiguous(), lambda b: b
    if layout == "channels_last":
        return values.contiguous(memory_format=torch.channels_last), lambda b: b
    if layout == "expand":  # stride 0 over the batch: every sample is the first one
        return values[:1].contiguous(), lambda b: b.expand(n, c, h, w)
    if layout in ("sliced_c", "sliced_c_cl"):  # a channel slice (NHWC with channel stride > C when _cl)
        base = torch.zeros(n, c + 3, h, w, dtype=values.dtype)
        if layout == "sliced_c_cl":
            base = base.contiguous(memory_format=torch.channels_last)
        base[:, 1:1 + c] = values
        return base, lambda b: b[:, 1:1 + c]
    if layout == "sliced_w":  # x[:, :, ::1, 1:] of a wider tensor
        base = torch.zeros(n, c, h, w + 1, dtype=values.dtype)
        base[..., 1:] = values
        return base, lambda b: b[:, :, ::1, 1:]
    if layout == "strided":  # every other column
        base = torch.zeros(n, c, h, 2 * w, dtype=values.dtype)
        base[..., ::2] = values
        return base, lambda b: b[..., ::2]
    raise ValueError(layout)


def _tensors(module: nn.Module) -> dict[str, Tensor]:
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def load_state(module: nn.Module, state: dict[str, Tensor]) -> None:
    """Copy `state` into the module's own tensors, in place (versions move, as after optimizer.step())."""
    with torch.no_grad():
        for name, t in _tensors(module).items():
            t.copy_(state[name].to(t.dtype))


def _rounded(t: Tensor, dtype: torch.dtype) -> Tensor:
    """Float64 copy of `t` rounded to `dtype` (integer buffers unchanged)."""
    t = t.detach().cpu()
    return t.to(dtype).double() if t.is_floating_point() else t.clone()


@dataclasses.dataclass
class Step:
    """One step's observations (float64 / int64 on CPU) or the exception it raised."""

    obs: dict[str, Optional[Tensor]]
    error: Optional[BaseException] = None
    relu: Optional[Relu] = None


def _x_hat(t: Tensor, eps: float) -> Tensor:
    """A BatchNorm's normalised output of t with its batch statistics."""
    mean, var = t.mean(dim=(0, 2, 3), keepdim=True), t.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    return (t - mean) / (var + eps).sqrt()


class BNConditioning:
    """Hooks the BatchNorm2d layers of the float64 twin. `worst` is the largest change of a normalised output
    x_hat (over the batches normalised with batch statistics since the last reset) when the BatchNorm input y is
    rounded to `dtype` first, statistics taken from the rounded y as stock BatchNorm does. Tiny batches (2-4
    values per channel) with |mean| >> std make it large; a constant channel leaves it at zero.

    `x_hat` keeps the twin's normalised outputs (one per batch-statistics call since the last reset) and
    `moved(probe)` gives the largest change of them in a rounding-probe twin (watched with `watch`): the roundings
    a correct implementation makes, carried through the layers before. A consistent rounding leaves a constant
    channel constant; a rounding that differs from element to element (the order of a conv's sum: the Triton
    interpreter's numpy matmul rounds identical samples differently) gives a zero-variance channel a variance,
    and every zero-variance BatchNorm after it multiplies the difference by up to 1/sqrt(eps) (resnet, fp32,
    constant images, seed 65536: a 1-ulp difference between two identical samples at the stem becomes 0.09 at
    layer3's input). `worst` misses that; `moved` sees it."""

    def __init__(self, module: nn.Module, dtype: torch.dtype) -> None:
        self.worst, self.dtype = 0.0, dtype
        self.x_hat: list[Tensor] = []
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(self._hook)

    def reset(self) -> None:
        self.worst, self.x_hat = 0.0, []

    @staticmethod
    def _batch_statistics(bn: nn.BatchNorm2d, y: Tensor) -> bool:
        return (bn.training or bn.running_mean is None) and y.numel() > y.shape[1]

    def _hook(self, bn: nn.BatchNorm2d, args: tuple) -> None:
        y = args[0].detach().double()
        if self._batch_statistics(bn, y):
            x_hat = _x_hat(y, bn.eps)
            self.x_hat.append(x_hat)
            moved = (_x_hat(y.to(self.dtype).double(), bn.eps) - x_hat).abs().max().item()
            self.worst = max(self.worst, moved)

    @classmethod
    def watch(cls, module: nn.Module) -> list[Tensor]:
        """Hooks (after those already registered: a probe's rounding) that collect a twin's normalised outputs."""
        seen: list[Tensor] = []

        def hook(bn: nn.BatchNorm2d, args: tuple) -> None:
            y = args[0].detach().double()
            if cls._batch_statistics(bn, y):
                seen.append(_x_hat(y, bn.eps))
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.register_forward_pre_hook(hook)
        return seen

    def moved(self, seen: list[Tensor]) -> float:
        """The largest change of a normalised output in `seen` (from `watch`) against this twin's."""
        if len(seen) != len(self.x_hat):  # another sequence of calls: nothing to compare
            return 0.0
        return max([(a - b).abs().max().item() for a, b in zip(seen, self.x_hat) if a.shape == b.shape and a.numel()]
                   + [0.0])


class ConvMagnitudes:
    """Hooks the nn.Conv2d layers of the float64 twin; after a backward, `bounds()` gives, per parameter
    gradient name, the fp32 accumulation bound of its sums (DESIGN.md: fp32 accumulation, in every dtype):
    |error| <= n u32 sum |x| |g| for the weight (n = N P Q terms per element, Higham's gamma_n) and n u32 sum |g|
    for the bias, x the conv input and g the gradient at its output. Where the terms cancel (the conv weight
    before a batch-statistics BatchNorm) this, not the result, sets the error."""

    def __init__(self, module: nn.Module) -> None:
        self.seen: dict[str, tuple] = {}
        for name, m in module.named_modules():
            if type(m) is nn.Conv2d:
                m.register_forward_hook(self._hook(name))

    def _hook(self, name: str):
        def hook(conv: nn.Conv2d, args: tuple, out: Tensor) -> None:
            if out.requires_grad:
                x = args[0].detach()
                out.register_hook(lambda g: self.seen.__setitem__(name, (conv, x, g.detach())))
        return hook

    def bounds(self) -> dict[str, Tensor]:
        out = {}
        for name, (conv, x, g) in self.seen.items():
            x = F.pad(x.abs(), conv._reversed_padding_repeated_twice, mode=conv.padding_mode) \
                if conv.padding_mode != "zeros" else x.abs()
            padding = 0 if conv.padding_mode != "zeros" else conv.padding
            if isinstance(padding, str):  # 'same' / 'valid': the output size fixes it; pad as ATen does
                x = F.pad(x, conv._reversed_padding_repeated_twice)
                padding = 0
            n = g.shape[0] * g.shape[2] * g.shape[3]
            gamma = n * UNIT_ROUNDOFF[torch.float32]
            prefix = f"grad {name}." if name else "grad "
            out[prefix + "weight"] = gamma * torch.nn.grad.conv2d_weight(
                x, conv.weight.shape, g.abs(), conv.stride, padding, conv.dilation, conv.groups)
            if conv.bias is not None:
                out[prefix + "bias"] = gamma * g.abs().sum(dim=(0, 2, 3))
        self.seen.clear()
        return out


def run_step(module: nn.Module, forward, values: Tensor, layout: str, grad_seed: int, grad_dtype: torch.dtype,
             train: bool, device: torch.device, relu: Optional[Relu] = None) -> Step:
    """Forward + backward of `module` on `values` in `layout`, with an upstream gradient drawn from `grad_seed`
    and rounded to `grad_dtype` (the tested dtype, for every twin); the output, every gradient and buffer."""
    relu = relu if relu is not None else Relu()
    dtype = next(iter(_tensors(module).values())).dtype
    module.train(train)
    base, view = make_input(values.to(dtype), layout)
    base = base.detach().to(device).clone(memory_format=torch.preserve_format).requires_grad_()
    try:
        out = forward(module, view(base), relu)
    except (ValueError, RuntimeError, TypeError) as exc:
        return Step({}, exc, relu)
    gen = torch.Generator().manual_seed(grad_seed)
    grad = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(grad_dtype).to(out.dtype).to(device)
    out.backward(grad)
    obs = {"out": out, "grad x": base.grad}
    obs.update({f"grad {n}": p.grad for n, p in module.named_parameters()})
    obs.update(dict(module.named_buffers()))
    for p in module.parameters():
        p.grad = None
    return Step({k: None if v is None else v.detach().cpu() for k, v in obs.items()}, None, relu)


def channel_max(err: Tensor) -> Tensor:
    """err (N, C, ...) with every element replaced by the largest of its channel (dim 1)."""
    if err.dim() < 2 or err.numel() == 0:
        return err.max().expand_as(err) if err.numel() else err
    other = [d for d in range(err.dim()) if d != 1]
    return err.amax(dim=other, keepdim=True).expand_as(err)


def _undecided_relus(ref: Relu, others: list[Relu], dtype: torch.dtype) -> list[tuple[int, int]]:
    """(call, flat index) of the float64 twin's ReLU inputs that the dtype cannot put on one side of zero:
    within 2 * (the largest error on that ReLU input of the same-dtype twin, or PROBE_MARGIN times the largest
    deviation of a rounding probe) + atol of zero. `others`: the same-dtype twin's ReLU, then the probes'."""
    found = []
    same, probes = others[0], others[1:]
    for j, r in enumerate(ref.inputs):
        r = r.double().reshape(-1)
        err = (same.inputs[j].double().cpu().reshape(-1) - r).abs().max().item()
        for p in probes:
            err = max(err, PROBE_MARGIN * (p.inputs[j].double().reshape(-1) - r).abs().max().item())
        tol = 2 * err + atol_for(dtype, CPU) * max(1.0, r.abs().max().item())
        found += [(j, int(k)) for k in torch.nonzero(r.abs() <= tol).flatten()]
    return found


def _spread(r: Step, runs: list[Step], combine) -> dict[str, Tensor]:
    """Per observed float tensor, combine (sum or max) over `runs` of |run - r|, elementwise."""
    out: dict[str, Tensor] = {}
    for run in runs:
        for name, t in run.obs.items():
            if t is not None and t.is_floating_point():
                d = (t - r.obs[name]).abs()
                out[name] = d if name not in out else (out[name] + d if combine is sum else torch.maximum(out[name], d))
    return out


def check_case(case: Case, backend: str, device: Optional[torch.device] = None) -> None:
    """Run `case`'s schedule on ours (`backend`, on `device`), on the stock twin in the dtype (`same`, on
    `device`) and in float64 (ref64, CPU); check every observation of every step (module docstring)."""
    device = CPU if device is None else device
    dtype = DTYPES[case.dtype]
    try:
        module64 = build(case)
    except ValueError:  # the constructor refuses this geometry (and says why): nothing to compare
        assume(False)
    stock = stock_forward(case.kind)
    ours, same = copy.deepcopy(module64).to(device, dtype), copy.deepcopy(module64).to(device, dtype)
    ref64 = copy.deepcopy(module64)
    conditioning = BNConditioning(ref64, dtype)
    magnitudes = ConvMagnitudes(ref64)
    state = {k: _rounded(v, dtype) for k, v in _tensors(module64).items()}
    gen = torch.Generator().manual_seed(case.seed + 2)
    for i, train in enumerate(case.modes):
        step = f"step {i} ({'train' if train else 'eval'})"
        values = (torch.randn(case.shape, generator=gen, dtype=torch.float64) * case.x_scale + case.x_shift)
        values = values.to(dtype).double()
        for m in (ours, same, ref64):
            load_state(m, state)
        grad_seed = case.seed * 7 + i
        conditioning.reset()
        r = run_step(ref64, stock, values, case.layout, grad_seed, dtype, train, CPU)
        accumulation = magnitudes.bounds()
        with pe_kernels.use_backend(backend):
            o = run_step(ours, ours_forward, values, case.layout, grad_seed, dtype, train, device)
        dispatch = pe_kernels.last_dispatch()
        if dispatch is not None and o.error is None:  # the forced backend ran, or the module path (with a reason)
            assert dispatch.backend in (backend, "modules"), f"{step}: ran on {dispatch}, not {backend!r}"
            event(f"path: {dispatch.backend}")
        if r.error is not None:  # stock PyTorch refuses (e.g. one value per channel in training): so must we
            note(f"{step}: the stock twin raises {type(r.error).__name__}: {r.error}")
            assert o.error is not None, f"{step}: stock raises {type(r.error).__name__} ({r.error}), ours does not"
            assert isinstance(o.error, type(r.error)), \
                f"{step}: ours raises {type(o.error).__name__} ({o.error}), stock {type(r.error).__name__}"
            event("both raise")
            return
        if o.error is not None:
            raise o.error
        s = run_step(same, stock, values, case.layout, grad_seed, dtype, train, device)
        assert s.error is None, s.error

        def rerun64(relu: Relu, probe: Optional[int] = None) -> Step:
            """The float64 twin's step again, from this step's state, with `relu` and rounding probe number
            `probe` (0 and 1: every rounding up, every rounding down; then uniform draws)."""
            twin = copy.deepcopy(module64)
            load_state(twin, state)
            if probe is not None:
                RoundingProbe(twin, dtype, case.seed * 13 + i * 7 + probe, {0: 1.0, 1: -1.0}.get(probe))
                moved.append(BNConditioning.watch(twin))
            return run_step(twin, stock, values, case.layout, grad_seed, dtype, train, CPU, relu)

        masks = [(t > 0).contiguous() for t in r.relu.inputs]
        moved: list[list[Tensor]] = []
        probes = [rerun64(Relu(masks=masks), k) for k in range(PROBES)]
        sensitivity = _spread(r, probes, max)
        probe_moved = max([conditioning.moved(seen) for seen in moved] + [0.0])
        unjudged = _unjudged_gradients(case.dtype, r, s, conditioning.worst, probe_moved)
        flips = _undecided_relus(r.relu, [s.relu] + [p.relu for p in probes], dtype)  # outputs need them too
        if len(flips) > MAX_FLIPS:
            unjudged, flips = unjudged or ("too many undecidable ReLUs", f"{len(flips)} > MAX_FLIPS"), []
        if unjudged:
            note(f"{step}: gradients not judged: {unjudged[0]}: {unjudged[1]}")
            event(f"gradients not judged: {unjudged[0]}")
        else:
            event(f"undecidable ReLUs: {'0' if not flips else '1-4' if len(flips) <= 4 else '5+'}")
        note(f"{step}: one rounding moves a BatchNorm output by {conditioning.worst:.3g}, the rounding probes by "
             f"{probe_moved:.3g}; {len(flips)} undecidable ReLUs flipped")
        kink = _spread(r, [rerun64(Relu(flip=flip)) for flip in flips], sum)
        for name, t64 in r.obs.items():
            check_observation(f"{step}: {name}", o.obs.get(name), s.obs[name], t64, dtype, device,
                              kink.get(name), sensitivity.get(name), accumulation.get(name),
                              judged=not (unjudged and name.startswith("grad ")))
        state = _moved({k: _rounded(v, dtype) for k, v in _tensors(ref64).items()}, dtype, case.seed + 100 + i)
    event(f"{case.kind} {case.dtype} {case.layout}")


def _unjudged_gradients(dtype_name: str, r: Step, s: Step, bn_amplification: float, probe_moved: float = 0.0
                        ) -> Optional[tuple[str, str]]:
    """Why (category, detail) this step's gradients have no same-dtype ruler (None: they have one): where stock
    PyTorch in the dtype breaks down (a non-finite gradient where float64 is finite: an fp16 BatchNorm backward
    through a zero-variance channel overflows), and where the dtype carries no significant digit through a
    batch-statistics BatchNorm (one rounding of its input moves its normalised output by more than
    BN_ROUNDING_LIMIT: tiny batches with |mean| >> std in fp16/bf16; the gradients of two correct
    implementations then differ by O(1)), or where the rounding probes move one by more (`probe_moved`: roundings
    that differ from element to element, carried through zero-variance BatchNorms; BNConditioning). Outputs and
    buffers are checked all the same."""
    broken = [n for n, v in s.obs.items() if n.startswith("grad ") and v is not None and r.obs[n] is not None
              and bool((~torch.isfinite(v.double()) & torch.isfinite(r.obs[n])).any())]
    if broken:
        return "non-finite stock gradient", f"stock {dtype_name}: {', '.join(broken[:3])}"
    if bn_amplification > BN_ROUNDING_LIMIT:
        return "no significant digit", f"one {dtype_name} rounding moves a BatchNorm output by {bn_amplification:.2g}"
    if probe_moved > BN_ROUNDING_LIMIT:
        return "no significant digit", (f"the {dtype_name} rounding probes move a BatchNorm output by "
                                        f"{probe_moved:.2g}")
    return None


def check_observation(label: str, t: Optional[Tensor], t_same: Optional[Tensor], t64: Optional[Tensor],
                      dtype: torch.dtype, device: torch.device, kink: Optional[Tensor],
                      sensitivity: Optional[Tensor], accumulation: Optional[Tensor], judged: bool = True) -> None:
    """One observed tensor: present where stock's is, of stock's dtype, integers equal, floats in the budget

        |t - t64| <= 2 ruler + atol + kink + accumulation,
        ruler = max(|same - t64|, pool(|same - t64| - kink), PROBE_MARGIN pool(probes))

    pool = the largest over the channel (outputs, input gradient) or over the tensor (parameter gradients,
    buffers: sums over the batch): at module level one rounding reaches a whole channel through the BatchNorm
    statistics, so a same-dtype error that landed on one element is the scale for its neighbours; errors that
    an undecidable ReLU explains (kink) are not pooled."""
    if t64 is None:
        assert t is None, f"{label}: ours gives a value where stock PyTorch gives None"
        return
    assert t is not None, f"{label}: ours gives None where stock PyTorch gives a value"
    if not t64.is_floating_point():
        assert torch.equal(t, t64), f"{label}: {t.tolist()} != {t64.tolist()}"
        return
    assert t.dtype == t_same.dtype, f"{label}: dtype {t.dtype}, stock {t_same.dtype}"
    if not judged:
        return
    atol = atol_for(dtype, device) * max(1.0, t64.abs().max().item() if t64.numel() else 0.0)
    err_same = (t_same.double().cpu() - t64).abs()
    kink = torch.zeros_like(t64) if kink is None else kink
    pool = channel_max if label.endswith((": out", ": grad x")) else (lambda e: e.max().expand_as(e))
    ruler = torch.maximum(err_same, pool((err_same - kink).clamp_min(0)))
    if sensitivity is not None:
        ruler = torch.maximum(ruler, PROBE_MARGIN * pool(sensitivity))
    slack = 2 * (ruler - err_same) + kink
    if accumulation is not None:
        slack = slack + accumulation
    check_budget(label, t, t_same, t64, atol, slack=slack)


def _moved(state: dict[str, Tensor], dtype: torch.dtype, seed: int) -> dict[str, Tensor]:
    """The state for the next step: every parameter moved a little (as optimizer.step() does) and the running
    statistics too (as load_state_dict() of another checkpoint does), rounded to the dtype; integers kept."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, t in state.items():
        if t.is_floating_point():
            r = torch.randn(t.shape, generator=gen, dtype=torch.float64)
            if name.endswith("running_var"):
                t = t * torch.exp(0.2 * r)
            else:
                t = t + 0.1 * r * (t.abs().mean() + 1e-3)
            t = t.to(dtype).double()
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------- strategies
@st.composite
def run_params(draw, max_steps: int = 2, dtypes=tuple(DTYPES)) -> dict:
    return dict(dtype=draw(st.sampled_from(dtypes)), layout=draw(st.sampled_from(LAYOUTS)),
                modes=tuple(draw(st.lists(st.booleans(), min_size=1, max_size=max_steps))),
                seed=draw(st.integers(0, 2 ** 16)), x_shift=draw(st.sampled_from([0.0, 1.0, 4.0, -2.0])),
                x_scale=draw(st.sampled_from([1.0, 0.25, 3.0, 0.0])))  # 0: constant images


def _pair_or_int(elements):
    return st.one_of(elements, st.tuples(elements, elements))


def _pair(v) -> tuple[int, int]:
    return (v, v) if isinstance(v, int) else tuple(v)


def _channels(draw, alpha, multiple: int, max_ext: int) -> int:
    """A channel count c with int(c * alpha) a multiple of `multiple` and at most max_ext (else rejects)."""
    ok = [c for c in range(1, max_ext + 1) if int(c * alpha) % multiple == 0 and 0 < int(c * alpha) <= max_ext]
    assume(ok)
    return draw(st.sampled_from(ok))


@st.composite
def conv_geometry(draw, max_hw: int) -> tuple[dict, int, int]:
    """(kwargs of the conv, H, W): padding 'same' (stride 1) / 'valid' / int / pair, kernel 1-5 (even and
    non-square included), stride 1-3, dilation 1-2, padding_mode; H and W at least what the geometry needs."""
    kind = draw(st.sampled_from(["same", "int", "valid", "pair"]))
    k = _pair(draw(_pair_or_int(st.sampled_from([1, 3, 5, 2, 4]))))
    stride = 1 if kind == "same" else draw(st.one_of(st.just(1), _pair_or_int(st.integers(1, 3))))
    dilation = draw(st.one_of(st.just(1), _pair_or_int(st.integers(1, 2))))
    padding = {"same": "same", "valid": "valid", "int": draw(st.integers(0, 2)),
               "pair": draw(st.tuples(st.integers(0, 2), st.integers(0, 2)))}[kind]
    mode = draw(st.sampled_from(["zeros", "zeros", "reflect", "replicate", "circular"]))
    d = _pair(dilation)
    sizes = []
    for axis in (0, 1):
        span = d[axis] * (k[axis] - 1)
        if padding == "same":
            lo, hi = span // 2, span - span // 2
        elif padding == "valid":
            lo = hi = 0
        else:
            lo = hi = _pair(padding)[axis]
        need = max(1, span + 1 - lo - hi)
        if mode == "reflect":
            need = max(need, hi + 1)
        elif mode == "circular":
            need = max(need, hi)
        assume(need <= max_hw)
        sizes.append(draw(st.integers(need, max_hw)))
    kwargs = dict(kernel_size=k if k[0] != k[1] else k[0], stride=stride, padding=padding, dilation=dilation,
                  padding_mode=mode)
    return kwargs, sizes[0], sizes[1]


@st.composite
def packed_conv_cases(draw, conv_bn: bool, max_ext: int, max_hw: int, max_n: int, max_steps: int) -> Case:
    """PackedConv2d / PackedConvBNReLU2d with channel counts its constructor accepts (M, alpha incl. 1.5,
    gamma, groups, first, last, minimum_channels_per_group incl. the default 64 that reduces gamma)."""
    m = draw(st.sampled_from([1, 2, 4]))
    groups, gamma = draw(st.sampled_from([1, 2])), draw(st.sampled_from([1, 2]))
    alpha = draw(st.sampled_from([1, 2, 3, 1.5]))
    first = draw(st.booleans())
    last = False if conv_bn else draw(st.booleans())
    conv_groups = 1 if first else gamma * groups * m
    in_channels = draw(st.integers(1, max_ext)) if first else _channels(draw, alpha, conv_groups, max_ext)
    out_channels = _channels(draw, m if last else alpha, gamma * groups * m, max_ext)
    geometry, h, w = draw(conv_geometry(max_hw))
    kwargs = dict(in_channels=in_channels, out_channels=out_channels, alpha=alpha, num_estimators=m, gamma=gamma,
                  groups=groups, minimum_channels_per_group=draw(st.sampled_from([1, 2, 64])), first=first,
                  bias=draw(st.booleans()), **geometry)
    if conv_bn:
        kwargs.update(activation=draw(st.sampled_from(["relu", None])), eps=draw(st.sampled_from([1e-5, 1e-3, 0.1])),
                      momentum=draw(st.sampled_from([0.1, 0.7, None])), affine=draw(st.booleans()),
                      track_running_stats=draw(st.booleans()))
    else:
        kwargs["last"] = last
    ext_in = in_channels if first else int(in_channels * alpha)
    n = draw(st.integers(1, max_n))
    return Case("conv_bn" if conv_bn else "conv", kwargs, (n, ext_in, h, w), **draw(run_params(max_steps)))


def _norm_spec(draw) -> Optional[dict]:
    return draw(st.sampled_from([None, None, None, {"group": True}])) or (
        None if draw(st.booleans()) else dict(eps=draw(st.sampled_from([1e-5, 0.1])),
                                              momentum=draw(st.sampled_from([0.1, None])),
                                              affine=draw(st.booleans()), track_running_stats=draw(st.booleans())))


@st.composite
def block_cases(draw, max_ext: int, max_hw: int, max_n: int, max_steps: int, kinds=tuple(BLOCKS)) -> Case:
    """One of the four fused blocks: identity or conv shortcut, stride 1-3, BN variants (and GroupNorm: the
    module path), dropout (eval only: inactive), activation_fn for the standard blocks. Channels <= max_ext
    before the bottleneck's expansion (x4 after it)."""
    kind = draw(st.sampled_from(kinds))
    expansion = BLOCKS[kind].expansion
    params = draw(run_params(max_steps))
    identity = draw(st.booleans())
    dropout = 0.0 if any(params["modes"]) else draw(st.sampled_from([0.0, 0.5]))
    kwargs = dict(stride=1 if identity else draw(st.integers(1, 3)), conv_bias=draw(st.booleans()),
                  norm=_norm_spec(draw), dropout_rate=dropout)
    if kind.startswith("Packed"):
        m, alpha = draw(st.sampled_from([1, 2, 4])), draw(st.sampled_from([1, 2]))
        groups = draw(st.sampled_from([1, 2]))
        unit = groups * m  # ext = planes * alpha must be a multiple of groups * M
        planes = draw(st.sampled_from([p for p in range(1, max_ext + 1) if (p * alpha) % unit == 0
                                       and p * alpha <= max_ext] or [unit]))
        in_planes = expansion * planes if identity else draw(st.sampled_from(
            [p for p in range(1, max_ext + 1) if (p * alpha) % unit == 0 and p * alpha <= max_ext] or [unit]))
        kwargs.update(alpha=alpha, num_estimators=m, gamma=draw(st.sampled_from([1, 2])), groups=groups)
        channels = in_planes * alpha
    else:
        groups = draw(st.sampled_from([1, 2, 4]))
        planes = draw(st.sampled_from([p for p in range(groups, max_ext + 1, groups)]))
        in_planes = expansion * planes if identity else draw(st.sampled_from(range(groups, max_ext + 1, groups)))
        kwargs.update(groups=groups, activation_fn=draw(st.sampled_from(["relu", "relu", "torch.relu", "silu"])))
        channels = in_planes
    kwargs.update(in_planes=in_planes, planes=planes)
    shape = (draw(st.integers(1, max_n)), channels, draw(st.integers(1, max_hw)), draw(st.integers(1, max_hw)))
    return Case(kind, kwargs, shape, **params)


@st.composite
def resnet_cases(draw, max_planes: int, max_hw: int, max_n: int, num_blocks) -> Case:
    """A three-stage ResNet (one block per stage, or `num_blocks`), packed or standard, cifar or imagenet
    stem (imagenet only in fp32: its max-pool's argmax is as undecidable in fp16 as a ReLU near zero)."""
    packed = draw(st.booleans())
    block = draw(st.sampled_from(["Basic", "Bottleneck"]))
    params = draw(run_params(2))
    style = "imagenet" if params["dtype"] == "float32" and draw(st.booleans()) else "cifar"
    in_channels = draw(st.integers(1, 3))
    kwargs = dict(block=("Packed" if packed else "") + (block + "Block" if block == "Basic" else block),
                  num_blocks=list(draw(st.sampled_from(num_blocks))), in_channels=in_channels,
                  num_classes=draw(st.integers(2, 3)), conv_bias=draw(st.booleans()), dropout_rate=0.0,
                  style=style, in_planes=draw(st.integers(1, max_planes)))
    if packed:
        kwargs.update(num_estimators=draw(st.sampled_from([1, 2, 4])), alpha=draw(st.sampled_from([1, 2])),
                      gamma=draw(st.sampled_from([1, 2])), groups=1)
    else:
        kwargs.update(groups=1)
    lo = 4 if style == "imagenet" else 2
    shape = (draw(st.integers(2, max_n)), in_channels, draw(st.integers(lo, max_hw)), draw(st.integers(lo, max_hw)))
    return Case("packed_resnet" if packed else "resnet", kwargs, shape, **params)


# ------------------------------------------------------------------------------------------------- the tests
def _conv(**kw) -> dict:
    base = dict(alpha=1, num_estimators=1, gamma=1, groups=1, minimum_channels_per_group=1, first=False, bias=True,
                kernel_size=3, stride=1, padding=0, dilation=1, padding_mode="zeros")
    return {**base, **kw}


def _bn(**kw) -> dict:
    return {**dict(activation="relu", eps=1e-5, momentum=0.1, affine=True, track_running_stats=True), **kw}


# Cases every run checks first (explicit examples), whatever the derandomized draws cover.
ANCHORS = {
    "conv": [
        Case("conv", _conv(in_channels=4, out_channels=4, alpha=2, num_estimators=2, kernel_size=(2, 4),
                           padding="same", dilation=(2, 1), last=True), (2, 8, 5, 6), "float32", "sliced_c_cl"),
        Case("conv", _conv(in_channels=6, out_channels=8, num_estimators=2, minimum_channels_per_group=64, stride=2,
                           padding=1, padding_mode="reflect", last=False), (3, 6, 5, 7), "float16", "channels_last",
             (True, False), 2),
    ],
    "conv_bn": [
        Case("conv_bn", {**_conv(in_channels=4, out_channels=4, bias=False, padding="valid"), **_bn()},
             (1, 4, 3, 3), "float32", "nchw", (True,), 3),            # one value per channel: raises, as stock
        Case("conv_bn", {**_conv(in_channels=4, out_channels=8, alpha=2, num_estimators=2, gamma=2, padding=1),
                         **_bn(eps=1e-3, momentum=None)}, (2, 8, 4, 5), "float32", "sliced_w", (True, True), 4),
    ],
    "blocks": [
        Case("PackedBottleneck", dict(stride=2, conv_bias=False, norm=None, dropout_rate=0.0, alpha=2,
                                      num_estimators=2, gamma=1, groups=1, in_planes=4, planes=2),
             (2, 8, 5, 5), "float16", "channels_last", (True, False), 5),
        Case("PackedBasicBlock", dict(stride=1, conv_bias=True, norm=None, dropout_rate=0.0, alpha=2,
                                      num_estimators=4, gamma=2, groups=1, in_planes=4, planes=4),
             (2, 8, 3, 4), "bfloat16", "strided", (True,), 6),
        Case("BasicBlock", dict(stride=2, conv_bias=False, norm={"group": True}, dropout_rate=0.0, groups=2,
                                activation_fn="relu", in_planes=4, planes=6), (2, 4, 5, 4), "float32", "expand",
             (True,), 7),
        # Findings (1) and (2): constant images, fp16; bn1 (after a 1x1 conv1) has one value a channel. Seed 346:
        # the forward (statistics of the unrounded accumulator); seed 4: bn1's weight gradient (the prologue's
        # d_in_scale formed plainly).
        Case("PackedBottleneck", dict(stride=1, conv_bias=False, norm=dict(eps=1e-05, momentum=None, affine=True,
                                      track_running_stats=False), dropout_rate=0.0, alpha=2, num_estimators=4,
                                      gamma=2, groups=1, in_planes=16, planes=4),
             (1, 32, 4, 4), "float16", "sliced_c", (True, False), 346, 1.0, 0.0),
        Case("PackedBottleneck", dict(stride=1, conv_bias=False, norm=dict(eps=1e-05, momentum=None, affine=True,
                                      track_running_stats=False), dropout_rate=0.0, alpha=2, num_estimators=4,
                                      gamma=2, groups=1, in_planes=16, planes=4),
             (1, 32, 4, 4), "float16", "sliced_c", (True, False), 4, 1.0, 0.0),
    ],
    "resnet": [
        Case("packed_resnet", dict(block="PackedBasicBlock", num_blocks=[1, 1, 1], in_channels=3, num_classes=3,
                                   conv_bias=False, dropout_rate=0.0, style="cifar", in_planes=2, num_estimators=2,
                                   alpha=2, gamma=1, groups=1), (2, 3, 6, 6), "float32", "nchw", (True, False), 8),
    ],
}


# Examples the oracle misjudged, explicit on one test each (the oracle's regression cases: each is a correct
# implementation's rounding that the budget must allow; RoundingProbe, BNConditioning).
ORACLE_ANCHORS = {
    # fp16, eval with batch statistics: conv1's bias added after its fp16 rounding (ATen's cuDNN path, the torch
    # backend) ahead of bn1 channels with |mean|/std up to 14 (RoundingProbe: the conv before its bias).
    "blocks_torch": Case("PackedBasicBlock", dict(stride=1, conv_bias=True, norm=dict(eps=1e-05, momentum=None,
                         affine=False, track_running_stats=False), dropout_rate=0.0, alpha=2, num_estimators=4,
                         gamma=1, groups=1, in_planes=8, planes=8), (2, 16, 2, 1), "float16", "sliced_w",
                         (False, True), 4729, 1.0, 0.25),
    # fp16, 1x1 stages with two samples: layer4's BatchNorms pass back their eps leak (1 / var), moved 15 % by the
    # fp16 storage of the activations alone (RoundingProbe: the input of every conv).
    "resnet_torch": Case("resnet", dict(block="Bottleneck", num_blocks=[1, 1, 1, 1], in_channels=1, num_classes=2,
                         conv_bias=False, dropout_rate=0.0, style="cifar", in_planes=1, groups=1), (2, 1, 2, 2),
                         "float16", "sliced_c", (True, True), 0),
    # fp32, constant images: the interpreter's conv rounds the two identical samples 1 ulp apart and the
    # zero-variance BatchNorms of the 1x1 stages blow that up to O(1) (BNConditioning.moved: not judged).
    "resnet_triton": Case("resnet", dict(block="BasicBlock", num_blocks=[1, 1, 1], in_channels=2, num_classes=3,
                          conv_bias=False, dropout_rate=0.0, style="imagenet", in_planes=2, groups=1), (2, 2, 4, 5),
                          "float32", "channels_last", (True, False), 65536, 1.0, 0.0),
}


def anchored(family: str):
    """The explicit examples of `family` on a test."""
    def decorate(test):
        for case in reversed(ANCHORS[family]):
            test = example(case=case)(test)
        return test
    return decorate


@contextlib.contextmanager
def one_aten_thread() -> Iterator[None]:
    """ATen on one CPU thread inside the block. The fuzz's tensors are tiny: intra-op threads only add barriers,
    and on a 2-core machine shared with other work they made the fuzz 2-4x slower (wall and CPU time)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _run(case: Case, backend: str, device: torch.device) -> None:
    note(f"replay: check_case({case!r}, {backend!r})")
    with ieee_fp32(), one_aten_thread():
        check_case(case, backend, device)


@fuzz_settings(120)
@anchored("conv")
@given(case=packed_conv_cases(conv_bn=False, max_ext=16, max_hw=9, max_n=4, max_steps=2))
def test_packed_conv2d_torch(case):
    _run(case, "torch", CPU)


@fuzz_settings(40)
@anchored("conv")
@given(case=packed_conv_cases(conv_bn=False, max_ext=8, max_hw=6, max_n=2, max_steps=1))
def test_packed_conv2d_triton(case, kernel_device):
    require_backend("triton")
    _run(case, "triton", kernel_device)


@fuzz_settings(150)
@anchored("conv_bn")
@given(case=packed_conv_cases(conv_bn=True, max_ext=16, max_hw=9, max_n=4, max_steps=2))
def test_conv_bn_relu_torch(case):
    _run(case, "torch", CPU)


@fuzz_settings(50)
@anchored("conv_bn")
@given(case=packed_conv_cases(conv_bn=True, max_ext=8, max_hw=6, max_n=2, max_steps=2))
def test_conv_bn_relu_triton(case, kernel_device):
    require_backend("triton")
    _run(case, "triton", kernel_device)


@fuzz_settings(120)
@anchored("blocks")
@example(case=ORACLE_ANCHORS["blocks_torch"])
@given(case=block_cases(max_ext=16, max_hw=7, max_n=4, max_steps=2))
def test_blocks_torch(case):
    _run(case, "torch", CPU)


@fuzz_settings(30)
@anchored("blocks")
@given(case=block_cases(max_ext=8, max_hw=4, max_n=2, max_steps=2))
def test_blocks_triton(case, kernel_device):
    require_backend("triton")
    _run(case, "triton", kernel_device)


@fuzz_settings(30)
@anchored("resnet")
@example(case=ORACLE_ANCHORS["resnet_torch"])
@given(case=resnet_cases(max_planes=4, max_hw=9, max_n=4, num_blocks=[(1, 1, 1), (2, 1, 1), (1, 1, 1, 1)]))
def test_resnet_torch(case):
    _run(case, "torch", CPU)


@fuzz_settings(8)
@anchored("resnet")
@example(case=ORACLE_ANCHORS["resnet_triton"])
@given(case=resnet_cases(max_planes=2, max_hw=5, max_n=2, num_blocks=[(1, 1, 1)]))
def test_resnet_triton(case, kernel_device):
    require_backend("triton")
    _run(case, "triton", kernel_device)
