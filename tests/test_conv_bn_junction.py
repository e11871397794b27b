"""ops.conv_bn_junction (a block's tail conv -> BN -> + residual -> act, and the next block's first conv -> BN of its
output, as ONE autograd node) against the two ops it joins, ops.conv_bn_act then ops.conv_bn_train:

* torch backend (float64): the same outputs, running statistics and gradients bit for bit (the composition);
* triton backend (`kernel_device`; fp32 IEEE, fp16, bf16): the fused backward (the tail's backward in the head's
  dgrad epilogue, the tail conv's g scaled on load) within the error budget of tests/_oracle.py against the float64
  composition, `same` being the two ops on the triton backend in the tested dtype; in the launches it promises (no
  apply backward, no d_out, four GEMM launches);
* a gradient of `out` from elsewhere (the next block's residual) or none; identity, affine and no residual; a
  prologue on the tail conv; a 3x3 / stride 2 head (a basic block's conv1); needs of a frozen part;
* the paths without a gradient, double backward (the composition), bad arguments.
"""

from __future__ import annotations

import pytest
import torch

import pe_kernels
from pe_kernels import ops
from pe_kernels.ops.contract import param_dtype

from _devices import ieee_fp32, require_backend
from _oracle import assert_budget, atol_for, check_budget
from test_triton_conv import count_launches

NAMES = ("x", "w", "b", "isc", "ish", "bn_w", "bn_b", "res", "rs", "rb", "hw", "hb", "hbn_w", "hbn_b", "xs", "ws",
         "bs", "sbn_w", "sbn_b")


def _inputs(dtype, *, prologue=False, residual=True, affine=False, bias=False, head_r=1, head_stride=1, c=6, k=8,
            hk=6, seed=0, shortcut=False, relu=True):
    """CPU tensors (drawn once: every device and dtype tests the same values)."""
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g, dtype=torch.float64)  # noqa: E731
    pos = lambda n: rand(n).abs() + 0.5  # noqa: E731
    t = dict(x=rand(3, c, 5, 6).to(memory_format=torch.channels_last), w=rand(k, c // 2, 3, 3) / 3,
             b=rand(k) if bias else None, isc=pos(c) if prologue else None, ish=rand(c) if prologue else None,
             bn_w=pos(k), bn_b=rand(k),
             res=rand(3, k, 5, 6).to(memory_format=torch.channels_last) if residual else None,
             rs=pos(k) if affine else None, rb=rand(k) if affine else None,
             hw=rand(hk, k // 2, head_r, head_r) / head_r, hb=rand(hk) if bias else None, hbn_w=pos(hk),
             hbn_b=rand(hk), xs=None, ws=None, bs=None, sbn_w=None, sbn_b=None)
    if shortcut:  # a stride-2 1x1 shortcut conv -> BN of a (3, 4, 10, 11) block input gives the residual
        t.update(res=None, rs=None, rb=None, xs=rand(3, 4, 10, 11).to(memory_format=torch.channels_last),
                 ws=rand(k, 2, 1, 1), bs=rand(k) if bias else None, sbn_w=pos(k), sbn_b=rand(k))
    vdt = param_dtype(dtype)
    vectors = ("isc", "ish", "bn_w", "bn_b", "rs", "rb", "hbn_w", "hbn_b", "sbn_w", "sbn_b")
    out = {n: None if v is None else v.to(vdt if n in vectors else dtype) for n, v in t.items()}
    out["head"] = dict(head_stride=head_stride, head_padding=head_r // 2, head_groups=2)
    out["relu"] = relu
    return out


def _run(t, device, fused: bool, use_out: bool = True, needs=NAMES, momentum=0.1):
    """(outputs, running statistics, gradients of `needs`) of conv_bn_junction (fused) or conv_bn_act then
    conv_bn_train; the loss weighs every output (and `out` itself when use_out: a gradient of out from elsewhere)."""
    leaves = {n: None if t[n] is None else t[n].detach().clone().to(device).requires_grad_(n in needs)
              for n in NAMES}
    k, hk = leaves["w"].shape[0], leaves["hw"].shape[0]
    vdt = param_dtype(leaves["x"].dtype)
    stats = [torch.zeros(k, dtype=vdt, device=device), torch.ones(k, dtype=vdt, device=device),
             torch.tensor(3, device=device), torch.zeros(hk, dtype=vdt, device=device),
             torch.ones(hk, dtype=vdt, device=device), torch.tensor(5, device=device)]
    tail = dict(in_scale=leaves["isc"], in_shift=leaves["ish"], in_relu=leaves["isc"] is not None, padding=1,
                groups=2, bn_weight=leaves["bn_w"], bn_bias=leaves["bn_b"], eps=1e-5, running_mean=stats[0],
                running_var=stats[1], num_batches_tracked=stats[2], momentum=momentum)
    residual = dict(residual=leaves["res"], residual_scale=leaves["rs"], residual_shift=leaves["rb"],
                    relu=t.get("relu", True))
    hs, hp, hg = t["head"]["head_stride"], t["head"]["head_padding"], t["head"]["head_groups"]
    shortcut = leaves["xs"] is not None
    if shortcut:
        stats += [torch.zeros(k, dtype=vdt, device=device), torch.ones(k, dtype=vdt, device=device),
                  torch.tensor(7, device=device)]
        sc = dict(stride=2, groups=2, bn_weight=leaves["sbn_w"], bn_bias=leaves["sbn_b"], running_mean=stats[6],
                  running_var=stats[7], num_batches_tracked=stats[8], momentum=momentum)
    if fused:
        sc_args = {} if not shortcut else dict(shortcut_x=leaves["xs"], shortcut_weight=leaves["ws"],
                                               shortcut_bias=leaves["bs"],
                                               **{f"shortcut_{n}": v for n, v in sc.items()})
        outs = ops.conv_bn_junction(leaves["x"], leaves["w"], leaves["b"], **tail, **residual,
                                    head_weight=leaves["hw"], head_bias=leaves["hb"], head_stride=hs,
                                    head_padding=hp, head_groups=hg, head_bn_weight=leaves["hbn_w"],
                                    head_bn_bias=leaves["hbn_b"], head_running_mean=stats[3],
                                    head_running_var=stats[4], head_num_batches_tracked=stats[5],
                                    head_momentum=momentum, **sc_args)
    else:
        if shortcut:
            ys, s_scale, s_shift = ops.conv_bn_train(leaves["xs"], leaves["ws"], leaves["bs"], **sc)
            residual.update(residual=ys, residual_scale=s_scale, residual_shift=s_shift)
        out = ops.conv_bn_act(leaves["x"], leaves["w"], leaves["b"], **tail, **residual)
        outs = (out, *ops.conv_bn_train(out, leaves["hw"], leaves["hb"], stride=hs, padding=hp, groups=hg,
                                        bn_weight=leaves["hbn_w"], bn_bias=leaves["hbn_b"], running_mean=stats[3],
                                        running_var=stats[4], num_batches_tracked=stats[5], momentum=momentum))
    gen = torch.Generator().manual_seed(1)
    weights = [torch.randn(o.shape, generator=gen, dtype=torch.float64).to(device, o.dtype) for o in outs]
    loss = sum((o * w).float().sum() for i, (o, w) in enumerate(zip(outs, weights)) if use_out or i > 0)
    loss.backward()
    return outs, stats, {n: v.grad for n, v in leaves.items() if v is not None and v.requires_grad}


CASES = {
    "identity-residual": dict(),
    "affine-residual-bias": dict(affine=True, bias=True),
    "no-residual-prologue": dict(residual=False, prologue=True),
    "3x3-stride2-head": dict(affine=True, head_r=3, head_stride=2),
    "shortcut-conv": dict(shortcut=True),
    "shortcut-conv-bias-prologue": dict(shortcut=True, bias=True, prologue=True),
    "no-relu-wide-head": dict(affine=True, relu=False, hk=12),  # no mask: the head's dgrad reads no x, C <= K: it
    #                                                              recomputes y_h from x (RECOMPUTE_Y with TAIL)
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("use_out", [True, False], ids=["out-used", "out-unused"])
def test_torch_backend_is_the_two_ops_bit_for_bit(case, use_out):
    t = _inputs(torch.float64, **CASES[case])
    with pe_kernels.use_backend("torch"):
        a = _run(t, "cpu", True, use_out)
        b = _run(t, "cpu", False, use_out)
    for x, y in zip(a[0], b[0]):
        assert torch.equal(x, y)
    for x, y in zip(a[1], b[1]):
        assert torch.equal(x, y)
    assert a[2].keys() == b[2].keys() and len(a[2]) == sum(t[n] is not None for n in NAMES)
    for name in a[2]:
        assert a[2][name] is not None and torch.equal(a[2][name], b[2][name]), name


DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.float16, id="fp16"),
          pytest.param(torch.bfloat16, id="bf16")]


def _check_against_composition(kernel_device, dtype, t, use_out=True, needs=NAMES):
    """The junction on the triton backend within the budget against the float64 composition, `same` being the two
    ops on the triton backend in the tested dtype (the same forward, so the same ReLU decisions where a value is
    within rounding of 0: in bf16 the torch backend's may differ and move a gradient by its whole size)."""
    with pe_kernels.use_backend("triton"), ieee_fp32():
        outs, stats, grads = _run(t, kernel_device, True, use_out, needs)
        outs_same, stats_same, grads_same = _run(t, kernel_device, False, use_out, needs)
    t64 = dict({n: None if t[n] is None else t[n].double() for n in NAMES}, head=t["head"], relu=t["relu"])
    with pe_kernels.use_backend("torch"):
        outs64, stats64, grads64 = _run(t64, "cpu", False, use_out, needs)
    for name, o, s, r in zip(("out", "y_h", "scale_h", "shift_h"), outs, outs_same, outs64):
        assert_budget(name, o, s, r, dtype, dot=True)
    for i, (o, s, r) in enumerate(zip(stats, stats_same, stats64)):
        if o.is_floating_point():
            assert_budget(f"running statistic {i}", o, s, r, dtype, dot=True)
        else:
            assert int(o) == int(r)
    assert grads.keys() == grads64.keys()
    for name in grads:
        assert grads[name].dtype == t[name].dtype and grads[name].shape == t[name].shape, name
        bn_bias = {"b": "bn_b", "hb": "hbn_b", "bs": "sbn_b"}.get(name)
        if bn_bias in grads64:
            # a conv bias before a BatchNorm: its gradient is 0 exactly (sum g_acc = 0), what is left is the rounding
            # of a sum of terms of the size of sum g = d bn_bias: the budget's scale is that
            scale = max(1.0, grads64[bn_bias].abs().max().item())
            check_budget(f"d{name}", grads[name], grads_same[name], grads64[name],
                         atol_for(dtype, o.device, True) * scale)
            continue
        assert_budget(f"d{name}", grads[name], grads_same[name], grads64[name], dtype, dot=True)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_fused_backward_against_the_composition(kernel_device, dtype, case):
    require_backend("triton")
    _check_against_composition(kernel_device, dtype, _inputs(dtype, **CASES[case]))


def test_triton_without_a_gradient_of_out_from_elsewhere(kernel_device):
    require_backend("triton")
    _check_against_composition(kernel_device, torch.float32, _inputs(torch.float32, affine=True), use_out=False)


@pytest.mark.parametrize("needs,shortcut", [(("x", "w", "hw"), False), (("res", "rs", "hw", "hbn_w"), False),
                                            (("hw", "hb", "b"), False), (("hbn_w", "hbn_b", "bn_w"), False),
                                            (("ws", "hw"), True), (("xs", "sbn_b", "w", "hw"), True)],
                         ids=["convs-only", "residual-only", "head-and-tail-bias", "frozen-weights", "shortcut-weight",
                              "shortcut-input"])
def test_triton_partial_needs(kernel_device, needs, shortcut):
    """Some inputs frozen: the gradients of the others, None for the frozen (a head without a weight gradient takes
    the composition)."""
    require_backend("triton")
    t = _inputs(torch.float32, affine=not shortcut, bias=True, shortcut=shortcut)
    _check_against_composition(kernel_device, torch.float32, t, needs=needs)


@pytest.mark.parametrize("shortcut", [False, True], ids=["identity", "shortcut-conv"])
def test_triton_backward_launches(kernel_device, shortcut):
    """The fused backward: the head's wgrad and dgrad (its epilogue the tail's backward), the tail conv's wgrad and
    dgrad (and the shortcut conv's); no apply backward, no add, no d_y, no d_residual: two launches per conv."""
    require_backend("triton")
    t = _inputs(torch.float32, shortcut=shortcut)
    leaves = {n: None if t[n] is None else t[n].to(kernel_device).requires_grad_(True) for n in NAMES}
    sc = {} if not shortcut else dict(shortcut_x=leaves["xs"], shortcut_weight=leaves["ws"], shortcut_stride=2,
                                      shortcut_groups=2, shortcut_bn_weight=leaves["sbn_w"])
    with pe_kernels.use_backend("triton"):
        outs = ops.conv_bn_junction(leaves["x"], leaves["w"], padding=1, groups=2, bn_weight=leaves["bn_w"],
                                    bn_bias=leaves["bn_b"], residual=leaves["res"], relu=True,
                                    head_weight=leaves["hw"], head_groups=2, head_bn_weight=leaves["hbn_w"],
                                    head_bn_bias=leaves["hbn_b"], **sc)
        assert type(outs[0].grad_fn).__name__ == "_ConvBnJunctionFunctionBackward"
        loss = sum(o.float().sum() for o in outs)
        with count_launches() as counted:
            loss.backward()
    convs = 3 if shortcut else 2
    assert dict(counted.triton) == {"_conv_wgrad_kernel": convs, "_conv_dgrad_kernel": convs}, counted.triton


def test_without_gradient_is_the_two_ops():
    t = _inputs(torch.float64, affine=True)
    with pe_kernels.use_backend("torch"), torch.no_grad():
        leaves = {n: t[n] for n in NAMES}
        outs = ops.conv_bn_junction(leaves["x"], leaves["w"], padding=1, groups=2, bn_weight=leaves["bn_w"],
                                    residual=leaves["res"], residual_scale=leaves["rs"], relu=True,
                                    head_weight=leaves["hw"], head_groups=2)
        out = ops.conv_bn_act(leaves["x"], leaves["w"], padding=1, groups=2, bn_weight=leaves["bn_w"],
                              residual=leaves["res"], residual_scale=leaves["rs"], relu=True)
        y_h, scale_h, shift_h = ops.conv_bn_train(out, leaves["hw"], groups=2)
    assert all(o.grad_fn is None for o in outs)
    for a, b in zip(outs, (out, y_h, scale_h, shift_h)):
        assert torch.equal(a, b)


def test_double_backward_recomputes_the_composition():
    t = _inputs(torch.float64, affine=True, c=4, k=4, hk=4)

    def fn(x, w, res, rs, hw):
        outs = ops.conv_bn_junction(x, w, padding=1, groups=2, residual=res, residual_scale=rs, relu=False,
                                    head_weight=hw, head_groups=2)
        return outs[0].sum() + outs[1].square().sum() + outs[2].sum()

    with pe_kernels.use_backend("torch"):
        assert torch.autograd.gradgradcheck(
            fn, tuple(t[n].detach().requires_grad_(True) for n in ("x", "w", "res", "rs", "hw")))


@pytest.mark.parametrize("kwargs,match", [
    (dict(head_weight=torch.randn(4, 3, 1, 1)), r"x has 4 channels but weight \(4, 3, 1, 1\)"),
    (dict(residual=torch.randn(2, 4, 2, 3)), r"residual has shape \(2, 4, 2, 3\), y has \(2, 4, 3, 3\)"),
    (dict(x=torch.randn(1, 4, 3, 3), head_weight=torch.randn(4, 4, 3, 3)), "more than 1 value per channel"),
    (dict(shortcut_x=torch.randn(2, 4, 3, 3)), "shortcut_x and shortcut_weight go together"),
    (dict(shortcut_x=torch.randn(2, 4, 3, 3), shortcut_weight=torch.randn(4, 4, 1, 1),
          residual=torch.randn(2, 4, 3, 3)), "must not be given with it"),
    (dict(shortcut_x=torch.randn(2, 4, 6, 6), shortcut_weight=torch.randn(4, 4, 1, 1)),
     r"the shortcut conv gives shape \(2, 4, 6, 6\), the tail conv \(2, 4, 3, 3\)"),
])
def test_bad_arguments_raise(kwargs, match):
    x = kwargs.pop("x", torch.randn(2, 4, 3, 3)).requires_grad_(True)
    kwargs.setdefault("head_weight", torch.randn(4, 4, 1, 1, requires_grad=True))
    kwargs["head_weight"].requires_grad_(True)
    with pe_kernels.use_backend("torch"), pytest.raises(ValueError, match=match):
        ops.conv_bn_junction(x, torch.randn(4, 4, 1, 1, requires_grad=True), **kwargs)


def tail_inputs(device, c: int, k: int, stride: int = 1):
    """A head conv (3x3, two groups, c -> k channels) over a block's output `out` = relu(...) and its tail's tensors
    (y_t, side, residual), with the head's y, stats and BN gradients: (out, weight, y_t, side, res, geo, y_h,
    stats_h, grad_y, grad_scale, grad_shift, bn_w) for conv_bn_bwd_ext(..., tail=TailBwd(y_t, side, res, True))."""
    import pe_kernels.triton as tri

    gen = torch.Generator().manual_seed(3)
    rand = lambda *shape: torch.randn(*shape, generator=gen).to(device)  # noqa: E731
    n, h, w = 2, 9, 8
    out = torch.relu(rand(n, c, h, w)).contiguous(memory_format=torch.channels_last)
    weight = rand(k, c // 2, 3, 3) / 8
    y_t, side, res = rand(n, c, h, w), rand(n, c, h, w), rand(n, c, h, w).contiguous(memory_format=torch.channels_last)
    geo = dict(stride=(stride, stride), padding=(1, 1), dilation=(1, 1), groups=2)
    y_h, stats_h = tri.conv_fused(out, weight, None, None, None, False, None, None, None, False, *geo.values(), True)
    grad_y = rand(*y_h.shape)
    grad_scale, grad_shift, bn_w = rand(k), rand(k), rand(k).abs() + 0.5
    return out, weight, y_t, side, res, geo, y_h, stats_h, grad_y, grad_scale, grad_shift, bn_w


@pytest.mark.parametrize("stride,tiles", [(1, None), (2, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=3)),
                                          (1, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, SPLIT=2))],
                         ids=["one-tile", "3x3-s2-small-tiles", "small-tiles"])
def test_tail_epilogue_is_the_apply_backward_of_the_dgrad(kernel_device, stride, tiles):
    """conv_bn_bwd_ext's tail epilogue (several M tiles per stride phase, several column blocks, the last program's
    sums) against the plain dgrad followed by the apply backward's formulas in float64 (fp32 IEEE: one rounding)."""
    require_backend("triton")
    from pe_kernels.triton.conv_bwd import TailBwd, conv_bn_bwd_ext

    out, weight, y_t, side, res, geo, y_h, stats_h, grad_y, grad_scale, grad_shift, bn_w = tail_inputs(
        kernel_device, 40, 24, stride)
    needs = [True, True, False, False, False, True, True]
    with ieee_fp32():
        plain = conv_bn_bwd_ext(grad_y, grad_scale, grad_shift, out, weight, None, None, None, False, *geo.values(),
                                y_h, stats_h, bn_w, 1e-5, needs, tiles)[0]
        fused, sums = conv_bn_bwd_ext(grad_y, grad_scale, grad_shift, out, weight, None, None, None, False,
                                      *geo.values(), y_h, stats_h, bn_w, 1e-5, needs, tiles,
                                      tail=TailBwd(y_t, side, res, True))
    g = torch.where(out.double() <= 0, 0.0, plain[0].double() + side.double())
    torch.testing.assert_close(fused[0].double(), g, atol=1e-5, rtol=1e-5)
    for got, want in zip(sums, (g * y_t.double(), g, g * res.double())):
        torch.testing.assert_close(got.double(), want.sum(dim=(0, 2, 3)), atol=1e-4, rtol=1e-5)
    for a, b in zip(fused[1:], plain[1:]):  # the head's own gradients are the plain path's
        assert (a is None) == (b is None) and (a is None or torch.equal(a, b))


def _graph_nodes(out: torch.Tensor) -> dict:
    seen, stack, names = set(), [out.grad_fn], {}
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        name = type(node).__name__
        if name.startswith("_Conv") or name.startswith("_Bn"):
            names[name] = names.get(name, 0) + 1
        stack.extend(n for n, _ in node.next_functions)
    return names


@pytest.mark.parametrize("arch,style,junctions", [(50, "cifar", 16), (18, "imagenet", 7)],
                         ids=["resnet50-cifar", "resnet18-imagenet"])
def test_model_chain_is_the_block_by_block_model(kernel_device, arch, style, junctions):
    """A Packed-Ensembles ResNet in training runs its stem and blocks as one chain of junctions (the stem's tail
    joined to the first block where there is no max-pool); with a hook on every block (each block called as a
    module: no chain) it is the block-by-block model: the same output and running statistics bit for bit (the
    forward is the same kernels), the same gradients to fp32 rounding (IEEE fp32)."""
    require_backend("triton")
    import copy
    import importlib

    resnet = importlib.import_module("pe_kernels.models.resnet")
    torch.manual_seed(0)
    chained = resnet.packed_resnet(3, 10, arch, num_estimators=2, alpha=2, gamma=1, style=style,
                                   width_multiplier=0.25).to(kernel_device).train()
    hooked = copy.deepcopy(chained)
    for module in hooked.modules():
        if hasattr(module, "forward_chain"):
            module.register_forward_hook(lambda *args: None)
    x = torch.randn(4, 3, 16, 16, device=kernel_device)
    results = []
    for model in (chained, hooked):
        with pe_kernels.use_backend("triton"), ieee_fp32():
            out = model(x)
            nodes = _graph_nodes(out)
            out.square().mean().backward()
        results.append((out, nodes))
    assert results[0][1].get("_ConvBnJunctionFunctionBackward") == junctions, results[0][1]
    assert "_ConvBnJunctionFunctionBackward" not in results[1][1], results[1][1]
    assert torch.equal(results[0][0], results[1][0])
    for (name, a), (_, b) in zip(chained.named_buffers(), hooked.named_buffers()):
        assert torch.equal(a, b), name
    for (name, p), (_, q) in zip(chained.named_parameters(), hooked.named_parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-5 * q.grad.abs().max().item(),
                                   msg=lambda m: f"{name}: {m}")


def test_model_in_eval_or_on_the_torch_backend_has_no_junction(monkeypatch, kernel_device):
    """No chain on the torch backend (the stock modules run) or in eval (BN folded into the convs: nothing pending):
    forward_chain is not called, and the eval output is the block-by-block model's."""
    import importlib

    import pe_kernels.nn.blocks as blocks

    resnet = importlib.import_module("pe_kernels.models.resnet")
    model = resnet.packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar",
                                 width_multiplier=0.25).to(kernel_device).train()
    x = torch.randn(2, 3, 8, 8, device=kernel_device)
    with pe_kernels.use_backend("torch"):
        assert "_ConvBnJunctionFunctionBackward" not in _graph_nodes(model(x))
    if pe_kernels.backends()["triton"].available:
        with pe_kernels.use_backend("triton"), torch.no_grad():
            reference = torch.nn.Sequential(*[model.get_submodule(f"layer{i}") for i in range(1, 5)])
            monkeypatch.setattr(blocks._FusedResidualBlock, "forward_chain", None)  # would fail if called
            out = model.eval()(x)
            expected = model.linear(model.flatten(model.pool(reference(model._stem(x)))))
        assert torch.equal(out, expected)


@pytest.mark.parametrize("channels", [12, 48, 300])
def test_bn_apply_relu_bits(kernel_device, channels):
    """bn_apply_relu_bits: bn_apply's output bit for bit, and its mask: bit k % 32 of word k // 32 of row
    (n*H + h)*W + w set exactly where out is not <= 0 (a NaN passes, as torch's threshold_backward lets it); channel
    counts below 32, not a multiple of 32, and several column tiles."""
    require_backend("triton")
    import pe_kernels.triton as tri
    from pe_kernels.triton.bn_apply import bn_apply_relu_bits

    gen = torch.Generator().manual_seed(4)
    n, h, w = 2, 3, 5
    y = torch.randn(n, channels, h, w, generator=gen).to(kernel_device, torch.float16)
    y[0, 1, 1, 1] = float("nan")
    res = torch.randn(n, channels, h, w, generator=gen).to(kernel_device, torch.float16)
    scale, shift = torch.rand(channels, generator=gen) + 0.5, torch.randn(channels, generator=gen)
    scale, shift = scale.to(kernel_device), shift.to(kernel_device)
    out, bits = bn_apply_relu_bits(y, scale, shift, res, None, None)
    torch.testing.assert_close(out, tri.bn_apply(y, scale, shift, res, None, None, True), rtol=0, atol=0,
                               equal_nan=True)
    assert bits.shape == (n * h * w, (channels + 31) // 32) and bits.dtype == torch.int32
    rows = out.permute(0, 2, 3, 1).reshape(n * h * w, channels).cpu().float()
    on = ~(rows <= 0)
    words = bits.cpu().long() & 0xFFFFFFFF
    unpacked = torch.stack([(words[:, k // 32] >> (k % 32)) & 1 for k in range(channels)], dim=1).bool()
    assert torch.equal(unpacked, on)
    nan_row = (0 * h + 1) * w + 1
    assert bool(on[nan_row, 1]) and torch.isnan(rows[nan_row, 1])  # the NaN passes


def test_double_backward_reaches_the_head_s_cast_vectors():
    """The head's BN vectors given in another dtype than the node's (fp32 for fp64 activations) are cast where
    autograd sees the cast: with create_graph=True their first-order gradient is the two ops' (not lost)."""
    t = _inputs(torch.float64, c=4, k=4, hk=4)
    x, w, hw = (t[n].detach().clone().requires_grad_(True) for n in ("x", "w", "hw"))
    hbn_w = (torch.rand(4, generator=torch.Generator().manual_seed(5)) + 0.5).requires_grad_(True)  # fp32
    grads = []
    with pe_kernels.use_backend("torch"):
        for fused in (True, False):
            if fused:
                outs = ops.conv_bn_junction(x, w, padding=1, groups=2, relu=True, head_weight=hw, head_groups=2,
                                            head_bn_weight=hbn_w)
            else:
                out = ops.conv_bn_act(x, w, padding=1, groups=2, relu=True)
                outs = (out, *ops.conv_bn_train(out, hw, groups=2, bn_weight=hbn_w))
            loss = outs[1].square().sum() + (outs[2] * outs[3]).sum()
            grads.append(torch.autograd.grad(loss, [hbn_w, hw], create_graph=True))
    for a, b in zip(*grads):
        assert a is not None and a.dtype == b.dtype
        torch.testing.assert_close(a, b)


def test_model_chain_with_a_global_module_hook_calls_every_module(kernel_device):
    """A global module hook (torch.nn.modules.module.register_module_forward_hook, FlopCounterMode's tracker) sees
    every module called: no chain, the stages and blocks are called as modules."""
    require_backend("triton")
    import importlib

    resnet = importlib.import_module("pe_kernels.models.resnet")
    model = resnet.packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar",
                                 width_multiplier=0.25).to(kernel_device).train()
    seen = []
    handle = torch.nn.modules.module.register_module_forward_hook(lambda m, i, o: seen.append(m))
    try:
        with pe_kernels.use_backend("triton"):
            out = model(torch.randn(2, 3, 8, 8, device=kernel_device))
    finally:
        handle.remove()
    assert "_ConvBnJunctionFunctionBackward" not in _graph_nodes(out)
    for name in ("layer1", "layer2", "layer1.0", "layer3.1"):
        assert model.get_submodule(name) in [m for m in seen], name
