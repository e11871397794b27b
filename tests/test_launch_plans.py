"""Memoised launch plans (triton/_common.LaunchPlans) and argument checks (ops/_common.CheckMemo): the host-time
cut of issue 11. A hit must be exactly the miss it memoises: the same launch, the same results bit for bit, the same
errors for arguments whose metadata differ; a plan holds no tensor; the memo stays bounded."""

from __future__ import annotations

import copy
import gc
import importlib
import weakref

import pytest
import torch

import pe_kernels
from _devices import ieee_fp32
from pe_kernels.ops import _common as ops_common
from pe_kernels.triton import _common as common

conv_fwd_mod = importlib.import_module("pe_kernels.triton.conv_fwd")
conv_bwd_mod = importlib.import_module("pe_kernels.triton.conv_bwd")
bn_apply_mod = importlib.import_module("pe_kernels.triton.bn_apply")


def _conv_args(device, dtype=torch.float32, layout="channels_last", k=8, c=6, epilogue=True):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, c, 5, 4, generator=g, dtype=dtype)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    w = torch.randn(k, c // 2, 3, 3, generator=g, dtype=dtype)
    scale = torch.rand(k, generator=g) + 0.5 if epilogue else None
    shift = torch.randn(k, generator=g) if epilogue else None
    return [None if t is None else t.to(device) for t in (x, w, scale, shift)]


def _fwd(x, w, scale, shift, compute_stats=True):
    return conv_fwd_mod.conv_fwd(x, w, None, None, None, False, scale, shift, None, True, [1, 1], [1, 1], [1, 1], 2,
                                 compute_stats)


def test_a_hit_is_the_miss_bit_for_bit(kernel_device):
    common.clear_launch_plans()
    args = _conv_args(kernel_device)
    y0, s0 = _fwd(*args)
    y1, s1 = _fwd(*args)
    memo = conv_fwd_mod._FWD_PLANS
    assert (memo.misses, memo.hits) == (1, 1)
    assert torch.equal(y0, y1) and torch.equal(s0, s1)
    common.clear_launch_plans()
    y2, s2 = _fwd(*args)  # planned afresh
    assert memo.misses == 1 and torch.equal(y0, y2) and torch.equal(s0, s2)


@pytest.mark.parametrize("change", ["layout", "dtype", "no-epilogue", "no-stats", "channels", "tf32"])
def test_other_metadata_is_another_plan(kernel_device, change, monkeypatch):
    common.clear_launch_plans()
    _fwd(*_conv_args(kernel_device))
    kwargs = {"layout": dict(layout="nchw"), "dtype": dict(dtype=torch.float16), "no-epilogue": dict(epilogue=False),
              "channels": dict(k=10)}.get(change, {})
    args = _conv_args(kernel_device, **kwargs)
    if change == "tf32":  # dot_precision reads torch's flag at every call: part of the key
        monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", not torch.backends.cudnn.allow_tf32)
    y, stats = _fwd(*args, compute_stats=change != "no-stats")
    assert conv_fwd_mod._FWD_PLANS.misses == 2 and conv_fwd_mod._FWD_PLANS.hits == 0
    assert y.dtype == args[0].dtype and y.shape[1] == args[1].shape[0]
    assert stats.shape == ((0,) if change == "no-stats" else (2, args[1].shape[0]))


def test_bad_arguments_still_raise_after_a_good_call(kernel_device):
    x, w, scale, shift = _conv_args(kernel_device)
    _fwd(x, w, scale, shift)
    with pytest.raises(ValueError, match="out_scale must be a 1-D tensor of 8 elements"):
        _fwd(x, w, scale[:5], shift)
    with pytest.raises(TypeError, match="weight dtype torch.float16 must equal the input dtype torch.float32"):
        _fwd(x, w.half(), scale, shift)
    with pytest.raises(ValueError, match="in_channels=6 and out_channels=8 must both be divisible by groups=4"):
        conv_fwd_mod.conv_fwd(x, w, None, None, None, False, scale, shift, None, True, [1, 1], [1, 1], [1, 1], 4,
                              False)


def test_plans_hold_no_tensor(kernel_device):
    common.clear_launch_plans()
    x, w, scale, shift = _conv_args(kernel_device)
    ref = weakref.ref(x)
    y, _ = _fwd(x, w, scale, shift)
    y_ref = weakref.ref(y)
    del x, y
    gc.collect()
    assert ref() is None and y_ref() is None


def test_training_launchers_hit_and_match(kernel_device):
    """conv_bn_train forward (FINALIZE), conv_bn_bwd and bn_apply forward / backward: the second identical call is
    a hit everywhere and gives the first call's results."""
    common.clear_launch_plans()
    tri = importlib.import_module("pe_kernels.triton")
    x, w, _, _ = _conv_args(kernel_device)
    k = w.shape[0]

    def step():
        rm, rv, nbt = (torch.zeros(k, device=kernel_device), torch.ones(k, device=kernel_device),
                       torch.tensor(0, device=kernel_device))
        y, stats, scale, shift = tri.conv_bn_train(x, w, None, None, None, False, [1, 1], [1, 1], [1, 1], 2, None,
                                                   None, 1e-5, rm, rv, nbt, 0.1)
        out = tri.bn_apply(y, scale, shift, None, None, None, True)
        g = torch.ones_like(out)
        d_y, d_scale, d_shift = tri.bn_apply_backward(g, y, scale, shift, None, None, None, True, out,
                                                      [True, True, True, False, False, False])[:3]
        grads = tri.conv_bn_train_backward(d_y, d_scale, d_shift, x, w, None, None, None, False, [1, 1], [1, 1],
                                           [1, 1], 2, y, stats, None, 1e-5, [True, True, False, False, False, True,
                                                                             True])
        return [out, rm, rv, nbt, d_y, *[gr for gr in grads if gr is not None]]

    first, second = step(), step()
    for memo in (conv_fwd_mod._TRAIN_PLANS, conv_bwd_mod._CONV_BN_BWD_PLANS, bn_apply_mod._APPLY_PLANS,
                 bn_apply_mod._APPLY_BWD_PLANS):
        assert (memo.misses, memo.hits) == (1, 1), memo.name
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_launch_plans_stay_bounded(monkeypatch):
    memo = common.LaunchPlans("test")
    monkeypatch.setattr(common.LaunchPlans, "LIMIT", 3)
    for i in range(7):
        memo.put(i, object())
        assert len(memo.plans) <= 3
    common.LaunchPlans.ALL.remove(memo)


def test_check_memo_runs_a_check_once_per_metadata():
    calls = []

    def check(t, n):
        calls.append(n)
        if n < 0:
            raise ValueError(f"n = {n}")
        return n * 2

    memo = ops_common.CheckMemo()
    t = torch.zeros(3)
    assert memo.run(check, t, 2) == 4 and memo.run(check, t, 2) == 4 and calls == [2]
    assert memo.run(check, torch.zeros(4), 2) == 4 and calls == [2, 2]  # another shape: checked
    for _ in range(2):
        with pytest.raises(ValueError, match="n = -1"):  # a raise stores nothing: it raises every time
            memo.run(check, t, -1)
    assert calls == [2, 2, -1, -1]
    key = ops_common.metadata_key
    assert key(t, [1, 2]) is not None and key(t, [1, 2]) != key(t, (1, 2))  # int sequences are keys, by type
    assert key(torch.zeros(3, dtype=torch.int64), 1) != key(t, 1)  # dtype in the key
    assert key(t.view(3, 1).expand(3, 2), 1) != key(torch.zeros(3, 2), 1)  # strides in the key
    assert key(t, "bn_") is not None and key(t, "bn_") != key(t, "")  # strings (a name prefix) too
    assert key(t, object()) is None and key(t, [1, "a"]) is None  # anything else: no key, checked every call


def test_op_checks_memoised_but_errors_kept():
    """ops.conv_fused's checks run once per metadata, and arguments of other metadata still get their errors."""
    x, w = torch.randn(2, 4, 3, 3), torch.randn(4, 2, 1, 1)
    with pe_kernels.use_backend("torch"):
        pe_kernels.ops.conv_fused(x, w, groups=2)
        pe_kernels.ops.conv_fused(x, w, groups=2)
        with pytest.raises(ValueError, match="x has 4 channels but weight"):
            pe_kernels.ops.conv_fused(x, w, groups=1)
        with pytest.raises(ValueError, match=r"bias must have shape \(4,\)"):
            pe_kernels.ops.conv_fused(x, w, torch.zeros(3), groups=2)
        with pytest.raises(ValueError, match="stride must be an int or a sequence"):
            pe_kernels.ops.conv_fused(x, w, groups=2, stride="2")


def test_op_memos_hit_in_a_training_layer():
    """Every CheckMemo on a training layer's path (conv_fused's checks, conv_bn_train's BatchNorm checks, the
    residual's, bn_apply's) stores its one entry for the layer: no argument makes a key fall through to a check per
    call (a None key stores nothing)."""
    memos = [importlib.import_module(f"pe_kernels.ops.{name}")._CHECKS
             for name in ("conv_fused", "conv_bn_train", "conv_bn_act", "bn_apply")]
    for memo in memos:
        memo.results.clear()
    x, w = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(4, 2, 1, 1, requires_grad=True)
    res = torch.randn(2, 4, 3, 3)
    with pe_kernels.use_backend("torch"):
        for _ in range(3):
            pe_kernels.ops.conv_bn_act(x, w, groups=2, bn_weight=torch.ones(4), residual=res,
                                       running_mean=torch.zeros(4), running_var=torch.ones(4),
                                       num_batches_tracked=torch.tensor(0), relu=True).sum().backward()
        with torch.no_grad():  # (without a gradient: conv_bn_train, then the public bn_apply)
            pe_kernels.ops.conv_bn_act(x, w, groups=2, residual=res, relu=True)
    assert [len(memo.results) for memo in memos] == [1, 2, 1, 1]  # conv_bn_train: with and without BN vectors


def test_check_memo_is_off_while_torch_compile_traces():
    """The op-check memo never becomes a guard: a compiled op compiles once, with eager calls of other shapes in
    between, and once for every batch size with dynamic shapes; export with a dynamic batch works."""
    from torch._dynamo.utils import counters

    w = torch.randn(8, 4, 3, 3)
    fn = lambda x: pe_kernels.ops.conv_fused(x, w, padding=1, compute_stats=True)[0]  # noqa: E731
    with pe_kernels.use_backend("torch"):
        for dynamic, sizes in ((False, (2, 2, 2)), (True, (2, 3, 4, 5))):
            torch._dynamo.reset()
            counters.clear()
            compiled = torch.compile(fn, backend="eager", fullgraph=True, dynamic=dynamic)
            for n in sizes:
                compiled(torch.randn(n, 4, 6, 6))
                fn(torch.randn(n + 7, 4, 5, 5))  # eager, a shape the compiled graph has not seen: a new memo entry
            assert counters["stats"]["unique_graphs"] == 1, (dynamic, dict(counters["stats"]))

        class Conv(torch.nn.Module):
            def forward(self, x):
                return fn(x)

        exported = torch.export.export(Conv(), (torch.randn(2, 4, 6, 6),),
                                       dynamic_shapes={"x": {0: torch.export.Dim("batch", min=2, max=64)}},
                                       strict=False)
        x = torch.randn(5, 4, 6, 6)
        torch.testing.assert_close(exported.module()(x), fn(x))
    torch._dynamo.reset()


def test_scalar_types_keep_their_errors_after_a_hit():
    """1, 1.0 and True are different keys: a float groups or stride is refused after an int one passed."""
    x, w = torch.randn(2, 4, 3, 3), torch.randn(4, 2, 1, 1)
    with pe_kernels.use_backend("torch"):
        pe_kernels.ops.conv_fused(x, w, groups=2, stride=1)
        with pytest.raises(ValueError, match="groups must be a positive int, got 2.0"):
            pe_kernels.ops.conv_fused(x, w, groups=2.0, stride=1)
        with pytest.raises(ValueError, match="stride must be an int or a sequence of one or two ints, got 1.0"):
            pe_kernels.ops.conv_fused(x, w, groups=2, stride=1.0)
        xb, wb = torch.randn(2, 4, 3, 3, requires_grad=True), torch.randn(4, 4, 1, 1, requires_grad=True)
        pe_kernels.ops.conv_bn_train(xb, wb, eps=1e-5)
        with pytest.raises(ValueError, match="eps must be > 0"):  # eps as a 0-dim tensor: its value is checked
            pe_kernels.ops.conv_bn_train(xb, wb, eps=torch.tensor(0.0))


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_batch_norm_subclasses_take_their_attributes(train):
    """The kernels' path reads an exact BatchNorm2d's tensors from its _parameters / _buffers, a subclass's (here a
    parametrized one, whose weight is computed on access) through its attributes: both as the stock modules."""
    from torch.nn.utils import parametrize

    class Positive(torch.nn.Module):
        def forward(self, w):
            return w.abs() + 0.5

    x, w = torch.randn(2, 4, 5, 5), torch.randn(6, 4, 3, 3)
    bn = torch.nn.BatchNorm2d(6)
    bn.running_mean.uniform_(-1, 1)
    parametrize.register_parametrization(bn, "weight", Positive())
    bn.train(train)
    stock = copy.deepcopy(bn)
    with pe_kernels.use_backend("torch"):
        out = pe_kernels.functional.conv_bn_fused(x, w, None, bn, padding=1)
    ref = torch.relu(stock(torch.nn.functional.conv2d(x, w, padding=1)))
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(bn.running_mean, stock.running_mean)
    assert int(bn.num_batches_tracked) == int(stock.num_batches_tracked)


def _op_keyed_memos() -> dict:
    return {"conv_fused": conv_fwd_mod._FWD_PLANS, "conv_bn_train": conv_fwd_mod._TRAIN_PLANS,
            "bn_apply": bn_apply_mod._APPLY_PLANS, "bn_apply_backward": bn_apply_mod._APPLY_BWD_PLANS,
            "conv_bn_train_backward": conv_bwd_mod._CONV_BN_BWD_PLANS}


def _op_keys(memo) -> list:
    return [key for key in memo.plans if key[0] == "op"]


def _conv_bn_act_case(device):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 6, 5, 4, generator=g).to(device, memory_format=torch.channels_last)
    w = torch.randn(8, 3, 3, 3, generator=g).to(device)
    bn_w, bn_b = (torch.rand(8, generator=g) + 0.5).to(device), torch.randn(8, generator=g).to(device)
    res = torch.randn(2, 8, 5, 4, generator=g).to(device, memory_format=torch.channels_last)
    rs = (torch.rand(16, generator=g) + 0.5).to(device)[::2]  # not contiguous: the apply's plan casts it
    rb = torch.randn(8, generator=g).to(device)
    grad = torch.randn(2, 8, 5, 4, generator=g).to(device)  # contiguous (NCHW): autograd's own layout
    return x, w, bn_w, bn_b, res, rs, rb, grad


def _fresh_stats(device):
    return torch.zeros(8, device=device), torch.ones(8, device=device), torch.tensor(0, device=device)


def _through_ops(case, device, backend="triton"):
    x, w, bn_w, bn_b, res, rs, rb, grad = case
    xl, wl, bwl, bbl = (t.detach().clone().requires_grad_(True) for t in (x, w, bn_w, bn_b))
    rm, rv, nbt = _fresh_stats(device)
    with pe_kernels.use_backend(backend):
        out = pe_kernels.ops.conv_bn_act(xl, wl, padding=1, groups=2, bn_weight=bwl, bn_bias=bbl, eps=1e-5,
                                         running_mean=rm, running_var=rv, num_batches_tracked=nbt, momentum=0.1,
                                         residual=res, residual_scale=rs, residual_shift=rb, relu=True)
        out.backward(grad)
    return [out, rm, rv, nbt, xl.grad, wl.grad, bwl.grad, bbl.grad]


def test_op_keyed_plans_are_the_plain_launches(kernel_device):
    """A training conv -> BN -> (+ affine residual) -> ReLU through ops.conv_bn_act on the triton backend keys its
    forward launch plans on the op's own check keys (conv_bn_train_keyed, bn_apply_keyed: one plan each, hit by the
    second step; the backward keys its launchers on their arguments), and gives, bit for bit, what the plain
    launchers give on the same inputs (whose plans key themselves)."""
    common.clear_launch_plans()
    tri = importlib.import_module("pe_kernels.triton")
    case = _conv_bn_act_case(kernel_device)
    x, w, bn_w, bn_b, res, rs, rb, grad = case

    def plain():
        rm, rv, nbt = _fresh_stats(kernel_device)
        y, stats, scale, shift = tri.conv_bn_train(x, w, None, None, None, False, [1, 1], [1, 1], [1, 1], 2, bn_w,
                                                   bn_b, 1e-5, rm, rv, nbt, 0.1)
        out = tri.bn_apply(y, scale, shift, res, rs, rb, True)
        d_y, d_scale, d_shift = tri.bn_apply_backward(grad, y, scale, shift, res, rs, rb, True, out,
                                                      [True, True, True, False, False, False])[:3]
        dx, dw, _, _, _, dbw, dbb = tri.conv_bn_train_backward(
            d_y, d_scale, d_shift, x, w, None, None, None, False, [1, 1], [1, 1], [1, 1], 2, y, stats, bn_w, 1e-5,
            [True, True, False, False, False, True, True])
        return [out, rm, rv, nbt, dx, dw, dbw, dbb]

    first = _through_ops(case, kernel_device)
    memos = _op_keyed_memos()
    keyed = {name: len(_op_keys(memo)) for name, memo in memos.items()}
    assert keyed == {"conv_fused": 0, "conv_bn_train": 1, "bn_apply": 1, "bn_apply_backward": 0,
                     "conv_bn_train_backward": 0}
    hits = {name: memo.hits for name, memo in memos.items()}
    second = _through_ops(case, kernel_device)
    assert {name: memo.hits - hits[name] for name, memo in memos.items()} == {
        "conv_fused": 0, "conv_bn_train": 1, "bn_apply": 1, "bn_apply_backward": 1, "conv_bn_train_backward": 1}
    assert {name: len(_op_keys(memo)) for name, memo in memos.items()} == keyed
    for a, b, c in zip(first, second, plain()):
        assert torch.equal(a, b) and torch.equal(a, c)


@ieee_fp32()  # torch's and triton's fp32 compared at 1e-4: no TF32 on a GPU
def test_backward_plans_follow_saved_tensor_hooks(kernel_device):
    """A saved-tensor hook may hand the backward its tensors in another layout (save_on_cpu packs them contiguous):
    the backward's plans key the tensors it gets, so a step under such a hook after a plain one (same forward keys)
    gets its own plans and the torch backend's gradients."""
    common.clear_launch_plans()
    case = _conv_bn_act_case(kernel_device)
    _through_ops(case, kernel_device)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t.contiguous(), lambda t: t):
        got = _through_ops(case, kernel_device)
        want = _through_ops(case, kernel_device, backend="torch")
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert len(bn_apply_mod._APPLY_BWD_PLANS.plans) == 2 and len(conv_bwd_mod._CONV_BN_BWD_PLANS.plans) == 2


def test_op_keyed_conv_plan_follows_autocast_and_flags(kernel_device):
    """ops.conv_fused (an eval conv: no gradient) keys its triton plan on its check key with the autocast dtype
    and the ReLU flags: each is another plan, a repeat is a hit, and the output is the plain launcher's."""
    common.clear_launch_plans()
    x, w, scale, shift = _conv_args(kernel_device)
    memo = conv_fwd_mod._FWD_PLANS

    def run(relu):
        with pe_kernels.use_backend("triton"), torch.no_grad():
            return pe_kernels.ops.conv_fused(x, w, out_scale=scale, out_shift=shift, out_relu=relu, padding=1,
                                             groups=2)[0]

    y = run(True)
    assert torch.equal(y, run(True)) and memo.hits == 1 and len(_op_keys(memo)) == 1
    assert torch.equal(y, _fwd(x, w, scale, shift, compute_stats=False)[0])
    run(False)
    assert len(_op_keys(memo)) == 2
    with torch.autocast(kernel_device.type, dtype=torch.bfloat16):
        y_amp = run(True)
    assert y_amp.dtype == torch.bfloat16 and len(_op_keys(memo)) == 3
    assert torch.equal(y_amp, _fwd(x.bfloat16(), w.bfloat16(), scale, shift, compute_stats=False)[0])


@ieee_fp32()  # torch's and triton's fp32 compared at 1e-4: no TF32 on a GPU
def test_op_keys_name_the_backend_that_made_an_input(kernel_device, monkeypatch):
    """y, scale and shift are the outputs of whichever backend ran the conv: the apply's keyed plan names that
    backend (a conv moving to another backend, by autotune or a request, gets the apply another plan: no plan made
    for one backend's outputs is used for another's), with the same results."""
    from pe_kernels import _backend

    common.clear_launch_plans()
    real_select = _backend.select
    conv_on = {"name": "torch"}

    def select(op, device, dtype, requested=None, args=()):
        if op in ("conv_fused", "conv_fused_backward"):
            return real_select(op, device, dtype, requested=conv_on["name"], args=args)
        return real_select(op, device, dtype, requested=requested, args=args)

    monkeypatch.setattr(_backend, "select", select)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 4, 3, 3, generator=g).to(kernel_device)
    w = torch.randn(4, 2, 1, 1, generator=g).to(kernel_device)
    outs = []
    for name in ("torch", "triton", "torch"):
        conv_on["name"] = name
        xl, wl = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        with pe_kernels.use_backend("triton"):
            out = pe_kernels.ops.conv_bn_act(xl, wl, groups=2, relu=True)
            out.sum().backward()
        outs.append((out, xl.grad, wl.grad))
    keys = _op_keys(bn_apply_mod._APPLY_PLANS)
    assert len(keys) == 2 and {key[1][1] for key in keys} == {"torch", "triton"}  # one per backend that made y
    for a, b in zip(outs[0], outs[1]):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    for a, b in zip(outs[0], outs[2]):
        assert torch.equal(a, b)
