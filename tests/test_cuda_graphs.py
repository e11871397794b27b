"""CUDA graphs and torch.compile(mode="reduce-overhead") run pe_kernels models as eager does (issue 11).

GPU tests (marker `gpu`), for the triton and cuda backends (each skipped with its reason where it cannot run),
fp32 and fp16 autocast, on a PackedBottleneck and a tiny packed ResNet-18:
(a) inference: model(x) captured with torch.cuda.CUDAGraph by bench/throughput.py's `capture` (3 warm-up calls on
    a side stream, then torch.cuda.graph), replayed on new data copied into the static input, equals an eager
    forward on that data;
(b) a whole training step (forward, loss, backward, the bench's `graph_sgd` step: fused SGD with zeroed momentum
    buffers, and in fp16 a GradScaler) captured and replayed 3 times on new batches equals eager steps on the same
    batches from an identical deepcopy (the capture's warm-up steps included): parameters, gradients, BatchNorm
    running statistics and num_batches_tracked, the last loss, the GradScaler's scale;
(c) torch.compile(mode="reduce-overhead") of the block: inference outputs, and training outputs, gradients and
    running statistics, equal eager over 3 calls (warm-up, record, replay), and inductor skipped no CUDA graph.
(a) and (b) run the same kernels on both sides, so they are compared nearly exactly (the kernels are deterministic:
no atomics); (c) lets inductor compile the code around the ops, so its budget is the dtype's (fp32 without TF32).
CPU tests: the bench's graph providers exist and are skipped without CUDA, and a failed capture is an error row.
No timing is asserted.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import importlib.util
import sys
import threading
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pe_kernels
from _devices import ieee_fp32, require_backend
from pe_kernels.models import packed_resnet
from pe_kernels.nn import PackedBottleneck

REPO = Path(__file__).resolve().parents[1]
BACKENDS = ("triton", "cuda")
GRAPH_PROVIDERS = ("eager-graph", "pe-triton-graph", "pe-cuda-graph", "pe-auto-graph")
REPLAYS = 3
SGD = dict(lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)  # bench/throughput.py's
AMP = [pytest.param(None, id="fp32"), pytest.param(torch.float16, id="fp16")]
# Graph replay vs eager, same kernels: equal up to rounding noise (margin for cuBLAS in a ResNet's head).
SAME_KERNELS = {None: dict(rtol=1e-5, atol=1e-5), torch.float16: dict(rtol=1e-3, atol=1e-4)}
# torch.compile vs eager: inductor computes the code between the ops in its own order.
COMPILED = {None: dict(rtol=1e-4, atol=1e-4), torch.float16: dict(rtol=1e-2, atol=1e-2)}


@dataclasses.dataclass(frozen=True)
class Case:
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    target: Callable[[torch.device], torch.Tensor]  # a random training target
    loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


CASES = {
    "bottleneck": Case(lambda: PackedBottleneck(64, 16, 1, alpha=2, num_estimators=4, gamma=1, conv_bias=False,
                                                dropout_rate=0, groups=1),
                       (4, 128, 8, 8), lambda device: torch.randn(4, 128, 8, 8, device=device),
                       lambda out, target: F.mse_loss(out.float(), target)),
    "packed_resnet18": Case(lambda: packed_resnet(3, 10, 18, num_estimators=2, alpha=2, gamma=1, style="cifar",
                                                  width_multiplier=0.125),
                            (4, 3, 16, 16), lambda device: torch.randint(0, 10, (2 * 4,), device=device),
                            F.cross_entropy),  # targets "b -> (m b)", as the Table 8 models train
}


def _throughput():
    """bench/throughput.py as a module: its capture recipe and graph SGD are what the bench's graph rows run."""
    name = "bench_throughput_for_graphs"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / "bench" / "throughput.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module  # dataclasses look their module up while the file executes
        spec.loader.exec_module(module)
    return sys.modules[name]


def _autocast(amp: Optional[torch.dtype]):
    return contextlib.nullcontext() if amp is None else torch.autocast("cuda", dtype=amp)


def _trainer(module: nn.Module, case: Case, backend: str, amp: Optional[torch.dtype]):
    """(optimizer, scaler, step): step(x, target) runs forward, loss, backward and the optimizer (GradScaler in
    fp16) under use_backend(backend) and returns the loss; it leaves zero_grad to the caller."""
    optimizer = _throughput().graph_sgd(module.parameters(), **SGD)
    scaler = torch.amp.GradScaler("cuda") if amp is not None else None

    def step(x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        with pe_kernels.use_backend(backend):
            with _autocast(amp):
                loss = case.loss(module(x), target)
            if scaler is None:
                loss.backward()
                optimizer.step()
            else:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
        return loss

    return optimizer, scaler, step


def _state(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers (running_mean, running_var, num_batches_tracked) by name."""
    return {**dict(module.named_parameters()), **dict(module.named_buffers())}


def _grads(module: nn.Module) -> dict[str, Optional[torch.Tensor]]:
    return {name: p.grad for name, p in module.named_parameters()}


# ------------------------------------------------------------------ (a) inference replay

@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_replay_of_inference_equals_eager(backend, case, amp):
    require_backend(backend)
    device, c = torch.device("cuda"), CASES[case]
    model = c.build().to(device).eval()
    static_x = torch.randn(c.input_shape, device=device)

    def forward(x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), pe_kernels.use_backend(backend), _autocast(amp):
            return model(x)

    graph, static_out = _throughput().capture(lambda: forward(static_x), device)
    for _ in range(2):  # new data each time, copied into the static input as a data loop does
        x = torch.randn(c.input_shape, device=device)
        static_x.copy_(x)
        graph.replay()
        expected = forward(x)
        assert static_out.dtype == expected.dtype
        torch.testing.assert_close(static_out, expected, **SAME_KERNELS[amp])


# ------------------------------------------------------------------ (b) whole training step replay

@pytest.mark.gpu
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", BACKENDS)
def test_graph_replay_of_a_training_step_equals_eager_steps(backend, case, amp):
    require_backend(backend)
    throughput = _throughput()
    device, c = torch.device("cuda"), CASES[case]
    model = c.build().to(device).train()
    eager_model = copy.deepcopy(model)
    batches = [(torch.randn(c.input_shape, device=device), c.target(device)) for _ in range(1 + REPLAYS)]

    optimizer, scaler, step = _trainer(model, c, backend, amp)
    static_x, static_target = (t.clone() for t in batches[0])  # the capture's warm-up steps train on batch 0
    graph, static_loss = throughput.capture(lambda: step(static_x, static_target), device,
                                            before=lambda: optimizer.zero_grad(set_to_none=True))
    for x, target in batches[1:]:
        static_x.copy_(x)
        static_target.copy_(target)
        graph.replay()

    eager_optimizer, eager_scaler, eager_step = _trainer(eager_model, c, backend, amp)
    for x, target in [batches[0]] * throughput.GRAPH_WARMUP + batches[1:]:
        eager_optimizer.zero_grad(set_to_none=True)
        eager_loss = eager_step(x, target)
    torch.cuda.synchronize()

    steps = throughput.GRAPH_WARMUP + REPLAYS
    tracked = {n: int(b) for n, b in model.named_buffers() if n.endswith("num_batches_tracked")}
    assert tracked and set(tracked.values()) == {steps}, tracked  # every replay ran the BatchNorm updates
    assert torch.isfinite(eager_loss) and all(torch.isfinite(t).all() for t in _state(eager_model).values())
    torch.testing.assert_close(static_loss, eager_loss, **SAME_KERNELS[amp])
    torch.testing.assert_close(_state(model), _state(eager_model), **SAME_KERNELS[amp])
    # fp16: a step GradScaler skips leaves inf/NaN gradients, the same on both sides
    torch.testing.assert_close(_grads(model), _grads(eager_model), equal_nan=True, **SAME_KERNELS[amp])
    if scaler is not None:
        assert scaler.get_scale() == eager_scaler.get_scale()


# ------------------------------------------------------------------ (c) torch.compile(mode="reduce-overhead")

@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["infer", "train"])
@pytest.mark.parametrize("amp", AMP)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compile_reduce_overhead_equals_eager(backend, amp, mode):
    require_backend(backend)
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # the backend is read when a graph is traced: no graph traced by another test
    counters.clear()
    device, c = torch.device("cuda"), CASES["bottleneck"]
    model = c.build().to(device).train(mode == "train")
    eager_model = copy.deepcopy(model)
    compiled = torch.compile(model, mode="reduce-overhead")
    tol = COMPILED[amp]

    def forward_backward(fn, module, x, target):
        """(output, {name: grad}) of one training forward/backward, copied out of any CUDA graph's memory."""
        module.zero_grad(set_to_none=True)
        with _autocast(amp):
            out = fn(x)
            loss = c.loss(out, target)
        loss.backward()
        return out.detach().clone(), {n: p.grad.clone() for n, p in module.named_parameters()}

    with pe_kernels.use_backend(backend), ieee_fp32():
        for _ in range(3):  # cudagraph trees: warm-up, record, replay
            x = torch.randn(c.input_shape, device=device)
            torch.compiler.cudagraph_mark_step_begin()
            if mode == "infer":
                with torch.no_grad(), _autocast(amp):
                    out = compiled(x).clone()
                    expected = eager_model(x)
                torch.testing.assert_close(out, expected, **tol)
            else:
                target = c.target(device)
                out, grads = forward_backward(compiled, model, x, target)
                expected, expected_grads = forward_backward(eager_model, eager_model, x, target)
                torch.testing.assert_close(out, expected, **tol)
                torch.testing.assert_close(grads, expected_grads, **tol)
    torch.cuda.synchronize()
    torch.testing.assert_close(dict(model.named_buffers()), dict(eager_model.named_buffers()), **tol)
    skips = counters["inductor"]["cudagraph_skips"]
    assert skips == 0, f"inductor ran {skips} graph(s) without CUDA graphs (TORCH_LOGS=perf_hints says why)"


def _in_pool(pool, t: torch.Tensor) -> bool:
    ptr = t.data_ptr()
    return any(seg["address"] <= ptr < seg["address"] + seg["total_size"] for seg in pool.snapshot())


@pytest.mark.gpu
def test_cached_buffers_are_not_claimed_by_a_thread_routed_pool():
    """What reduce-overhead's warm-up does to a cache miss (every allocation of the thread routed to the graph
    tree's private pool, on the tree's own stream): the counters, identity vectors and dummies the Triton launchers
    keep come from the ordinary allocator (a control tensor made beside them lands in the pool), filled."""
    require_backend("triton")
    from pe_kernels.triton import _common

    device = torch.device("cuda", torch.cuda.current_device())
    pool, side = torch.cuda.MemPool(), torch.cuda.Stream()  # a new stream: a counters miss
    before = len(_common._ALLOCATOR_THREAD)
    with torch.cuda.stream(side), torch.cuda.use_mem_pool(pool):
        control = torch.zeros(64, device=device)
        counters = _common.stream_counters(64, device)
        ones = _common.identity_vector(1.0, 4 * _common._IDENTITIES.get((device, 1.0), control).numel(), device)
        unused = _common.dummy(device, torch.int16)  # a dtype no launcher uses: a miss
    torch.cuda.synchronize()
    assert _in_pool(pool, control), "the control allocation should be in the thread-routed pool"
    for name, t in dict(counters=counters, ones=ones, dummy=unused).items():
        assert not _in_pool(pool, t), f"{name} was allocated in the private pool"
    assert int(counters.count_nonzero()) == 0 and bool((ones == 1).all())
    assert len(_common._ALLOCATOR_THREAD) == 1 and before <= 1


def test_persistent_runs_the_factory_here_on_cpu():
    from pe_kernels.triton import _common

    made_on = []
    t = _common.persistent(torch.device("cpu"), lambda: made_on.append(threading.get_ident()) or torch.ones(3))
    assert made_on == [threading.get_ident()] and t.tolist() == [1.0, 1.0, 1.0]


# ------------------------------------------------------------------ the bench's graph providers (CPU)

def _cpu_config(throughput, *argv):
    parser = throughput.build_parser()
    return throughput.make_config(parser.parse_args(["--device", "cpu", *argv]), parser)


def test_bench_graph_providers_are_skipped_without_cuda(tmp_path, capsys):
    throughput = _throughput()
    graph = {name for name, p in throughput.PROVIDERS.items() if p.graph}
    assert graph == set(GRAPH_PROVIDERS)
    assert throughput.PROVIDERS["eager-graph"].kind == "eager" and throughput.PROVIDERS["eager-graph"].channels_last
    assert [throughput.PROVIDERS[f"pe-{b}-graph"].backend for b in ("triton", "cuda", "auto")] == \
        ["triton", "cuda", "auto"]
    cfg = _cpu_config(throughput, "--provider", "all")
    for name in GRAPH_PROVIDERS:
        assert throughput.skip_reason(throughput.PROVIDERS[name], cfg) == "CUDA graphs need a CUDA device"
    argv = ["--device", "cpu", "--model", "single", "--provider", *GRAPH_PROVIDERS, "--csv", str(tmp_path / "r.csv")]
    assert throughput.main(argv) == 0
    out = capsys.readouterr().out
    assert all(f"skipping {name}: CUDA graphs need a CUDA device" in out for name in GRAPH_PROVIDERS)


def test_graph_sgd_steps_as_stock_sgd():
    """The graph SGD (fused, momentum buffers zeroed up front) takes stock SGD's steps, the first one included."""
    throughput = _throughput()
    stock = nn.Linear(5, 3)
    fused = copy.deepcopy(stock)
    optimizers = torch.optim.SGD(stock.parameters(), **SGD), throughput.graph_sgd(fused.parameters(), **SGD)
    for _ in range(3):
        x = torch.randn(7, 5)
        for module, optimizer in zip((stock, fused), optimizers):
            optimizer.zero_grad(set_to_none=True)
            module(x).square().sum().backward()
            optimizer.step()
    torch.testing.assert_close(dict(fused.named_parameters()), dict(stock.named_parameters()))


def test_bench_failed_capture_is_an_error_row(monkeypatch):
    """A capture that raises gives the cell an error row with the exception's text; the run goes on."""
    throughput = _throughput()

    def capture(fn, device, warmup=throughput.GRAPH_WARMUP, before=lambda: None):
        raise RuntimeError("CUDA graph capture failed: RuntimeError: operation not permitted when stream is capturing")

    monkeypatch.setattr(throughput, "capture", capture)
    cfg = _cpu_config(throughput, "--model", "single", "--provider", "eager-graph", "eager", "--mode", "infer",
                      "--batch-size", "1", "--image-size", "8", "--warmup", "0", "--infer-images", "1")
    rows = throughput.run(cfg, {"eager-graph": None, "eager": None})  # as if CUDA were here
    status = {r.provider: r for r in rows}
    assert status["eager-graph"].status == "error"
    assert "CUDA graph capture failed" in status["eager-graph"].reason
    assert status["eager"].status == "ok"
