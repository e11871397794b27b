"""Table 8 replay: training s/epoch and inference images/s of the six CIFAR-100 ResNet-50 ensembles.

    python bench/throughput.py --model pe-2-4-1                 # the default: PE-(2,4,1), every provider
    python bench/throughput.py --model all --dtype both         # the whole table
    python bench/throughput.py --smoke                          # every model x mode x provider, one tiny step
    python bench/throughput.py --csv run.csv --time-budget 500  # append to run.csv; start no cell after 500 s

Training: SGD (momentum 0.9, weight decay 5e-4, nesterov, as torch-uncertainty's configs), cross-entropy on
synthetic CIFAR-shaped data, the batch formed as torch-uncertainty trains each model (registry.format_batch).
s/epoch = mean step time x ceil(50 000 / batch), measured over --steps after --warmup and marked extrapolated
(unless --steps covers a whole epoch). Inference: eval mode, no_grad, images/s over --infer-images (10 000 on
GPU). fp16 = autocast fp16 + GradScaler (CUDA); on CPU fp16 autocast is not meaningful, bf16 autocast runs
instead and the row says so. GPU timing uses CUDA events and synchronises; peak memory is
torch.cuda.max_memory_allocated.

Providers: eager / eager-channels-last (the stock PyTorch twin: nn.Conv2d -> BatchNorm2d -> ReLU modules, the
"eager cuDNN" of the paper), compile (torch.compile of that twin), pe-triton / pe-cuda / pe-auto (pe_kernels'
fused model under use_backend(...)). A provider that cannot run is reported as skipped with the reason.
Graph replay, so that host cost is compared without it on both sides (CUDA only): eager-graph (the stock twin,
channels_last) and pe-triton-graph / pe-cuda-graph / pe-auto-graph, each captured with torch.cuda.CUDAGraph after
3 warm-up calls on a side stream (PyTorch's recipe) and replayed; each replay first copies the batch into the
static inputs. Inference captures model(x) (eval, no_grad, autocast). Training captures the whole step: forward,
loss, backward, SGD step and, for fp16, GradScaler's scale/step/update. The graph SGD is fused (its step takes
GradScaler's scale and inf flag as tensors: no .item()) with momentum buffers zeroed up front; gradients are set
to None before warm-up and capture, and the captured backward writes them in place. The training batch is formed
(registry.format_batch, MIMO's random shuffle included) once, before capture. A failed capture is an error row.

Output: a table on stdout (ours beside the paper's RTX 3090 row, and the time ratio to Single within each
source), and CSV + JSON rows under --out with the run's metadata. Each row is appended to the CSV (and flushed)
as soon as its cell finishes, so a run stopped by a time limit keeps what it measured; at the end the CSV is
rewritten with the final ratios and the JSON is written. Figures are whatever this machine measured.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import csv
import dataclasses
import datetime
import json
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import pe_kernels  # noqa: E402
from pe_kernels.models.registry import TABLE8_MODELS, TRAIN_IMAGES, Table8Model, eager_twin  # noqa: E402

MODELS = tuple(TABLE8_MODELS)
MODES = ("train", "infer")
DTYPES = ("fp32", "fp16")
NUM_CLASSES = 100


@dataclasses.dataclass(frozen=True)
class Provider:
    name: str
    kind: str  # "eager" | "compile" | "pe"
    backend: Optional[str] = None  # pe_kernels backend for kind "pe"
    channels_last: bool = False
    description: str = ""
    graph: bool = False  # captured once with torch.cuda.CUDAGraph, then replayed (CUDA only)


PROVIDERS = {p.name: p for p in (
    Provider("eager", "eager", description="stock PyTorch twin (cuDNN on GPU), NCHW"),
    Provider("eager-channels-last", "eager", channels_last=True, description="stock PyTorch twin, channels_last"),
    Provider("compile", "compile", description="torch.compile (inductor) of the stock twin"),
    Provider("pe-triton", "pe", "triton", channels_last=True, description="pe_kernels fused model, triton backend"),
    Provider("pe-cuda", "pe", "cuda", channels_last=True,
             description="pe_kernels fused model, cuda backend (pe_kernels._C)"),
    Provider("pe-auto", "pe", "auto", channels_last=True, description="pe_kernels fused model, auto dispatch"),
    Provider("eager-graph", "eager", channels_last=True, graph=True,
             description="stock PyTorch twin, channels_last, CUDA graph replay"),
    Provider("pe-triton-graph", "pe", "triton", channels_last=True, graph=True,
             description="pe_kernels, triton, CUDA graph replay"),
    Provider("pe-cuda-graph", "pe", "cuda", channels_last=True, graph=True,
             description="pe_kernels, cuda, CUDA graph replay"),
    Provider("pe-auto-graph", "pe", "auto", channels_last=True, graph=True,
             description="pe_kernels, auto, CUDA graph replay"),
)}
GRAPH_WARMUP = 3  # eager calls on a side stream before a capture (PyTorch's CUDA-graph recipe)
CPU_DEFAULT_PROVIDERS = ("eager", "pe-auto")


@dataclasses.dataclass
class Config:
    models: list[str]
    modes: list[str]
    dtypes: list[str]
    providers: list[str]
    device: torch.device
    batch_size: int
    image_size: int
    warmup: int
    steps: int
    infer_images: int
    out: Path
    smoke: bool
    threads: Optional[int] = None
    csv: Optional[Path] = None  # append to this CSV (default: a new throughput_<kind>_<stamp>.csv under out)
    time_budget: Optional[float] = None  # seconds: no cell starts after this much of the run has passed


@dataclasses.dataclass
class Row:
    """One measured (or skipped) cell; every CSV/JSON row carries the run's metadata."""

    model: str
    provider: str
    mode: str
    dtype: str
    status: str  # ok | skipped | error
    reason: str = ""
    batch: int = 0
    image_size: int = 0
    warmup: int = 0
    steps: int = 0
    median_ms: Optional[float] = None
    p20_ms: Optional[float] = None
    p80_ms: Optional[float] = None
    mean_ms: Optional[float] = None
    steps_per_epoch: Optional[int] = None
    s_per_epoch: Optional[float] = None
    s_per_epoch_extrapolated: Optional[bool] = None
    images: Optional[int] = None
    images_per_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    warmup_s: Optional[float] = None
    ratio_to_single: Optional[float] = None  # time ratio to Single, same provider
    ratio_to_single_eager: Optional[float] = None  # time ratio to Single with the eager provider
    paper_value: Optional[float] = None
    paper_ratio_to_single: Optional[float] = None
    device: str = ""
    torch_version: str = ""
    triton_version: str = ""
    cuda_version: str = ""
    cudnn_version: str = ""
    git_commit: str = ""
    timestamp: str = ""
    smoke: bool = False


# ---------------------------------------------------------------- environment

def _git_commit() -> str:
    try:
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{head}{'-dirty' if dirty else ''}"


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
    else:
        cpu = f"CPU {platform.machine()} {platform.processor() or ''}".strip()
        name = f"{cpu} ({torch.get_num_threads()} threads)"
    try:
        import triton
        triton_version = triton.__version__
    except Exception:  # triton is optional
        triton_version = "not installed"
    cudnn = torch.backends.cudnn.version() if device.type == "cuda" else None
    return dict(device=name, torch_version=torch.__version__, triton_version=triton_version,
                cuda_version=torch.version.cuda or "none", cudnn_version=str(cudnn or "none"),
                git_commit=_git_commit(),
                timestamp=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))


def amp_dtype(dtype: str, device: torch.device) -> tuple[Optional[torch.dtype], str, str]:
    """(autocast dtype or None, row label, note) for the requested precision on this device."""
    if dtype == "fp32":
        return None, "fp32", ""
    if device.type == "cuda":
        return torch.float16, "fp16", ""
    return torch.bfloat16, "bf16", "fp16 autocast is not meaningful on CPU: ran bf16 autocast instead"


def skip_reason(provider: Provider, cfg: Config) -> Optional[str]:
    """Why `provider` cannot (or will not) run here; None when it runs."""
    on_cpu = cfg.device.type == "cpu"
    if provider.graph and cfg.device.type != "cuda":
        return "CUDA graphs need a CUDA device"
    if provider.kind == "pe" and provider.backend != "auto":
        status = pe_kernels.backends()[provider.backend]
        if not status.available:
            return status.reason
        if on_cpu and provider.backend == "cuda":
            return "pe_kernels' cuda backend runs CUDA tensors only, and this run is on the CPU"
        if on_cpu and not _interpreted(provider, cfg):
            return ("pe_kernels' triton backend runs on the CPU only under the Triton interpreter: set "
                    "TRITON_INTERPRET=1 (slow: minutes per step)")
        if on_cpu and cfg.smoke:
            return (f"{provider.backend} runs on CPU only under the Triton interpreter (TRITON_INTERPRET=1), too slow "
                    "for every model x mode in --smoke: time it with --provider pe-triton")
    if provider.kind == "compile" and cfg.smoke:
        return ("torch.compile of a ResNet-50 takes minutes per model and mode: skipped in --smoke "
                "(run --provider compile)")
    return None


# ---------------------------------------------------------------- timing

class Progress:
    """Progress of one cell on stderr: rewritten in place on a terminal; in a log (no terminal), a line per
    finished step once `every` seconds have passed since the last line. While one step runs longer than
    `every` seconds (a first step that compiles, a step under the Triton interpreter), a heartbeat line says
    so, so that a slow run never looks hung."""

    def __init__(self, label: str, total: int, every: float = 15.0) -> None:
        self.label, self.total, self.every, self.tty = label, total, every, sys.stderr.isatty()
        self.start = self.last_line = self.step_start = time.perf_counter()
        self.done = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._heartbeat, daemon=True)
        self._thread.start()

    def _write(self, text: str) -> None:
        self.last_line = time.perf_counter()
        sys.stderr.write(f"\r  {text}" if self.tty else f"  {text}\n")
        sys.stderr.flush()

    def _heartbeat(self) -> None:
        while not self._stop.wait(min(1.0, self.every)):
            now = time.perf_counter()
            if now - self.last_line >= self.every and now - self.step_start >= self.every:
                self._write(f"{self.label}: step {self.done + 1}/{self.total} running for "
                            f"{now - self.step_start:.0f}s ({now - self.start:.0f}s in this cell)")
                if self.tty:
                    sys.stderr.write("\n")

    def update(self, done: int) -> None:
        now = time.perf_counter()
        step_s, self.done, self.step_start = now - self.step_start, done, now
        if self.tty or now - self.last_line >= self.every or (done == 1 and step_s >= self.every):
            self._write(f"{self.label}: {done}/{self.total} steps, {now - self.start:.1f}s"
                        + (f" (step {done}: {step_s:.1f}s)" if not self.tty else ""))

    def close(self) -> None:
        """Stop the heartbeat (the caller prints the cell's summary line); clear the in-place line."""
        self._stop.set()
        self._thread.join()
        if self.tty:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step: Callable[[], None], warmup: int, steps: int, device: torch.device,
               progress: Progress) -> tuple[list[float], float]:
    """(seconds per timed step, warm-up seconds). CUDA events on GPU, perf_counter on CPU."""
    try:
        t0 = time.perf_counter()
        for i in range(warmup):
            step()
            _sync(device)  # the warm-up steps' cost (compiles, autotuning) shows per step
            progress.update(i + 1)
        warmup_s = time.perf_counter() - t0
        times = []
        if device.type == "cuda":
            events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                      for _ in range(steps)]
            for i, (start, end) in enumerate(events):
                start.record()
                step()
                end.record()
                progress.update(warmup + i + 1)
            torch.cuda.synchronize(device)
            times = [start.elapsed_time(end) / 1e3 for start, end in events]
        else:
            for i in range(steps):
                t = time.perf_counter()
                step()
                times.append(time.perf_counter() - t)
                progress.update(warmup + i + 1)
    finally:
        progress.close()
    return times, warmup_s


def _quantile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(round(q * 100)) - 1]


def prepare_model(base: torch.nn.Module, provider: Provider, device: torch.device) -> torch.nn.Module:
    """The model `provider` runs: the fused pe_kernels model, or its stock twin (channels_last / compiled)."""
    model = copy.deepcopy(base) if provider.kind == "pe" else eager_twin(base)
    model = model.to(device)
    if provider.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if provider.kind == "compile":
        model = torch.compile(model)
    return model


def graph_sgd(params, **kwargs) -> torch.optim.SGD:
    """SGD as a captured training step runs it: fused (one kernel; its step takes GradScaler's scale and inf flag as
    tensors, so scaler.step needs no .item()), momentum buffers made zeros up front. With dampening 0 a zero buffer
    gives stock SGD's first step (buf = g); it also keeps a first step that GradScaler skips from leaving the
    buffers uninitialised (torch's fused SGD allocates them with empty_like and its kernel returns on inf)."""
    optimizer = torch.optim.SGD(params, fused=True, **kwargs)
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p)
    return optimizer


def capture(fn: Callable[[], object], device: torch.device, warmup: int = GRAPH_WARMUP,
            before: Callable[[], None] = lambda: None) -> tuple["torch.cuda.CUDAGraph", object]:
    """(graph, its static output): `fn` called `warmup` times on a side stream (compiles, autotuning, lazy state
    such as GradScaler's scale), then captured once with torch.cuda.graph. `before` runs ahead of each warm-up call
    and of the capture, outside it (a training step's zero_grad(set_to_none=True)). An exception in the warm-up
    propagates as it is; one during capture as a RuntimeError that says so and names the first error."""
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(warmup):
            before()
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    before()
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            out = fn()
    except Exception as exc:
        root = exc  # torch.cuda.graph's exit ends the capture even after an error, and may raise its own
        while root.__context__ is not None:
            root = root.__context__
        then = f" (then {type(exc).__name__}: {exc})" if root is not exc else ""
        raise RuntimeError(f"CUDA graph capture failed: {type(root).__name__}: {root}{then}") from exc
    return graph, out


def measure(entry: Table8Model, base: torch.nn.Module, provider: Provider, mode: str, dtype: str,
            cfg: Config, label: str) -> Row:
    """Time one (model, provider, mode, dtype) cell."""
    device = cfg.device
    amp, dtype_label, note = amp_dtype(dtype, device)
    row = Row(entry.name, provider.name, mode, dtype_label, "ok", note, cfg.batch_size, cfg.image_size,
              cfg.warmup, cfg.steps)
    model = prepare_model(base, provider, device)
    memory_format = torch.channels_last if provider.channels_last else torch.contiguous_format
    x = torch.randn(cfg.batch_size, 3, cfg.image_size, cfg.image_size, device=device)
    x = x.contiguous(memory_format=memory_format)
    y = torch.randint(0, NUM_CLASSES, (cfg.batch_size,), device=device)

    def backend_ctx():
        return pe_kernels.use_backend(provider.backend) if provider.kind == "pe" else contextlib.nullcontext()

    def autocast():
        return contextlib.nullcontext() if amp is None else torch.autocast(device.type, dtype=amp)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    capture_s = 0.0
    if mode == "train":
        model.train()
        sgd = graph_sgd if provider.graph else torch.optim.SGD
        optimizer = sgd(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, nesterov=True)
        scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 and device.type == "cuda" else None

        def update(loss: torch.Tensor) -> None:
            with backend_ctx():
                if scaler is None:
                    loss.backward()
                    optimizer.step()
                else:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()

        if provider.graph:
            inputs, targets = entry.format_batch(x, y)  # once, before capture
            static = inputs.clone(), targets.clone()

            def captured_step() -> None:
                with backend_ctx(), autocast():
                    loss = F.cross_entropy(model(static[0]), static[1])
                update(loss)

            t0 = time.perf_counter()
            graph, _ = capture(captured_step, device, before=lambda: optimizer.zero_grad(set_to_none=True))
            capture_s = time.perf_counter() - t0

            def step() -> None:
                static[0].copy_(inputs)
                static[1].copy_(targets)
                graph.replay()
            row.reason = _join(row.reason, f"CUDA graph of the whole step (forward, loss, backward, fused SGD"
                               f"{', GradScaler' if scaler is not None else ''}); the batch formed once before "
                               "capture, copied into the static inputs per replay")
        else:
            def step() -> None:
                inputs, targets = entry.format_batch(x, y)
                with backend_ctx(), autocast():
                    loss = F.cross_entropy(model(inputs), targets)
                optimizer.zero_grad(set_to_none=True)
                update(loss)
        steps = cfg.steps
    else:
        model.eval()
        steps = max(1, math.ceil(cfg.infer_images / cfg.batch_size))

        def forward(inputs: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), backend_ctx(), autocast():
                return model(inputs)

        if provider.graph:
            static_x = x.clone()
            t0 = time.perf_counter()
            graph, _ = capture(lambda: forward(static_x), device)
            capture_s = time.perf_counter() - t0

            def step() -> None:
                static_x.copy_(x)
                graph.replay()
            row.reason = _join(row.reason, "CUDA graph of model(x); the batch copied into the static input per replay")
        else:
            def step() -> None:
                forward(x)

    times, row.warmup_s = time_steps(step, cfg.warmup, steps, device, Progress(label, cfg.warmup + steps))
    row.warmup_s += capture_s  # a graph's warm-up calls and capture count as warm-up
    row.steps = steps
    row.median_ms = 1e3 * statistics.median(times)
    row.p20_ms = 1e3 * _quantile(times, 0.2)
    row.p80_ms = 1e3 * _quantile(times, 0.8)
    row.mean_ms = 1e3 * statistics.fmean(times)
    if mode == "train":
        row.steps_per_epoch = math.ceil(TRAIN_IMAGES / cfg.batch_size)
        row.s_per_epoch_extrapolated = steps < row.steps_per_epoch
        row.s_per_epoch = (statistics.fmean(times) * row.steps_per_epoch if row.s_per_epoch_extrapolated
                           else sum(times[:row.steps_per_epoch]))
    else:
        row.images = steps * cfg.batch_size
        row.images_per_s = row.images / sum(times)
    if device.type == "cuda":
        row.peak_memory_mb = torch.cuda.max_memory_allocated(device) / 2**20
    return row


def _join(*notes: str) -> str:
    return "; ".join(n for n in notes if n)


# ---------------------------------------------------------------- ratios, table, files

def _time_cost(row: Row) -> Optional[float]:
    """A figure proportional to time: s/epoch (train) or 1 / images/s (infer)."""
    if row.status != "ok":
        return None
    return row.s_per_epoch if row.mode == "train" else 1.0 / row.images_per_s


def _paper_precision(dtype: str) -> str:
    return "f32" if dtype == "fp32" else "f16"


def add_ratios(rows: list[Row], earlier: tuple[Row, ...] = ()) -> None:
    """Time ratio to Single within each source: ours (same provider; eager) and the paper's. `earlier`: rows of
    former runs on the same device (e.g. a previous stage's Single), used when this run has no Single row."""
    ok = {(r.model, r.provider, r.mode, r.dtype): r for r in (*earlier, *rows) if r.status == "ok"}
    single_paper = TABLE8_MODELS["single"].paper
    for r in rows:
        paper = TABLE8_MODELS[r.model].paper
        precision = _paper_precision(r.dtype)
        r.paper_value = paper.value(r.mode, precision)
        ref = single_paper.value(r.mode, precision)
        r.paper_ratio_to_single = (r.paper_value / ref) if r.mode == "train" else (ref / r.paper_value)
        cost = _time_cost(r)
        if cost is None:
            continue
        for attr, provider in (("ratio_to_single", r.provider), ("ratio_to_single_eager", "eager")):
            single = ok.get(("single", provider, r.mode, r.dtype))
            if single is not None:
                setattr(r, attr, cost / _time_cost(single))


def _fmt(value: Optional[float], spec: str) -> str:
    width = int(spec.split(".")[0])
    return "-".rjust(width) if value is None else format(value, spec)


def print_table(rows: list[Row]) -> None:
    ok = [r for r in rows if r.status == "ok"]
    if ok:
        header = (f"{'model':<14}{'provider':<21}{'mode':<6}{'dtype':<6}{'ours':>11} {'unit':<8}"
                  f"{'xSingle':>8}{'xS-eager':>9}{'paper':>9}{'paper xS':>9}")
        print("\nxSingle = time relative to Single ResNet-50 in the same source (train: s/epoch ratio; infer: "
              "inverse images/s ratio;\nlower is better). xS-eager: relative to Single with the eager provider. "
              "paper = Laurent et al. Table 8, RTX 3090.")
        print(header)
        print("-" * len(header))
        for r in ok:
            value = r.s_per_epoch if r.mode == "train" else r.images_per_s
            unit = ("s/epoch" + ("*" if r.s_per_epoch_extrapolated else "")) if r.mode == "train" else "im/s"
            print(f"{r.model:<14}{r.provider:<21}{r.mode:<6}{r.dtype:<6}{_fmt(value, '11.2f')} {unit:<8}"
                  f"{_fmt(r.ratio_to_single, '8.2f')}{_fmt(r.ratio_to_single_eager, '9.2f')}"
                  f"{_fmt(r.paper_value, '9.1f')}{_fmt(r.paper_ratio_to_single, '9.2f')}")
        if not any(r.model == "single" for r in ok) and not any(r.ratio_to_single is not None for r in ok):
            print("(Single was not measured in this run: add --model single for measured ratios)")
        if any(r.s_per_epoch_extrapolated for r in ok):
            print("* extrapolated: mean step time x ceil(50 000 / batch) steps")
        for note in sorted({r.reason for r in ok if r.reason}):
            print(f"note: {note}")
    else:
        print("\nNothing was measured in this run: every cell asked for was skipped or failed (reasons below).")
    not_run = [r for r in rows if r.status != "ok"]
    if not_run:
        print("\nNot measured (asked for, but skipped or failed):")
        seen = set()
        for r in not_run:
            key = (r.provider, r.status, r.reason) if r.status == "skipped" else (r.model, r.provider, r.mode,
                                                                                  r.dtype, r.reason)
            if key in seen:
                continue
            seen.add(key)
            cells = [c for c in not_run if (c.provider, c.status, c.reason) == key] if r.status == "skipped" else [r]
            what = (f"{r.provider} ({len(cells)} cell{'s' if len(cells) > 1 else ''})" if r.status == "skipped"
                    else f"{r.model} {r.provider} {r.mode} {r.dtype}")
            print(f"  {r.status:<8}{what}: {r.reason}")


_FIELDS = [f.name for f in dataclasses.fields(Row)]


def _csv_value(value) -> object:
    return "" if value is None else value


class CsvRows:
    """The run's CSV: each row appended and flushed as its cell finishes (a run stopped by a time limit keeps
    what it measured); `finish` rewrites the file whole with the final ratios. Appending to an existing CSV
    keeps its rows, and its ok rows of the same device serve as Single for the ratios."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.kept: list[dict] = []
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as fh:
                reader = csv.DictReader(fh)
                if reader.fieldnames != _FIELDS:
                    raise ValueError(f"{path} has columns {reader.fieldnames}, not this script's {_FIELDS}: "
                                     "append to a CSV written by this version, or give a new --csv path")
                self.kept = list(reader)
        path.parent.mkdir(parents=True, exist_ok=True)
        self._fh = path.open("w", newline="")
        self._writer = csv.DictWriter(self._fh, fieldnames=_FIELDS)
        self._writer.writeheader()
        self._writer.writerows(self.kept)
        self._fh.flush()

    def earlier(self, device: str) -> tuple[Row, ...]:
        """The kept ok rows of `device`, as much of a Row as the ratios need."""
        def num(text: str) -> Optional[float]:
            return float(text) if text else None
        return tuple(Row(d["model"], d["provider"], d["mode"], d["dtype"], d["status"],
                         s_per_epoch=num(d["s_per_epoch"]), images_per_s=num(d["images_per_s"]))
                     for d in self.kept if d["status"] == "ok" and d["device"] == device)

    def append(self, row: Row) -> None:
        self._writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(row).items()})
        self._fh.flush()

    def finish(self, rows: list[Row]) -> None:
        self._fh.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=_FIELDS)
            writer.writeheader()
            writer.writerows(self.kept)
            for r in rows:
                writer.writerow({k: _csv_value(v) for k, v in dataclasses.asdict(r).items()})
        tmp.replace(self.path)


def result_paths(cfg: Config, env: dict) -> tuple[Path, Path]:
    """(CSV, JSON) of this run: --csv (JSON beside it, stamped) or throughput_<kind>_<stamp>.csv/.json."""
    stamp = env["timestamp"].replace(":", "").replace("-", "").replace("+0000", "Z")
    kind = "smoke" if cfg.smoke else cfg.device.type
    stem = cfg.out / f"throughput_{kind}_{stamp}"
    if cfg.csv is not None:
        return cfg.csv, cfg.csv.with_name(f"{cfg.csv.stem}_{stamp}.json")
    return stem.with_suffix(".csv"), stem.with_suffix(".json")


def write_json(path: Path, rows: list[Row], cfg: Config, env: dict) -> None:
    config = {k: (str(v) if isinstance(v, (Path, torch.device)) else v) for k, v in dataclasses.asdict(cfg).items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"environment": env, "config": config,
                                "rows": [dataclasses.asdict(r) for r in rows]}, indent=1))


# ---------------------------------------------------------------- command line

def _int_at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an integer >= minimum, with a clear message otherwise."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = None
        if value is None or value < minimum:
            what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", nargs="+", default=["pe-2-4-1"], choices=MODELS + ("all",),
                   help="Table 8 model(s) (default pe-2-4-1); add 'single' to get measured ratios")
    p.add_argument("--mode", default="both", choices=MODES + ("both",))
    p.add_argument("--dtype", default=None, choices=DTYPES + ("both",),
                   help="fp32, fp16 (autocast + GradScaler; bf16 autocast on CPU) or both "
                        "(default: both on GPU, fp32 on CPU)")
    p.add_argument("--provider", nargs="+", default=None, choices=tuple(PROVIDERS) + ("all",),
                   help=f"default: all on GPU; {' '.join(CPU_DEFAULT_PROVIDERS)} on CPU")
    p.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    p.add_argument("--batch-size", type=_positive, default=None, help="default 128 on GPU, 8 on CPU")
    p.add_argument("--image-size", type=_positive, default=None, help="default 32 (CIFAR), 16 with --smoke")
    p.add_argument("--warmup", type=_non_negative, default=None, help="default 10 on GPU, 1 on CPU")
    p.add_argument("--steps", type=_positive, default=None, help="timed training steps (default 30 on GPU, 2 on CPU)")
    p.add_argument("--infer-images", type=_positive, default=None,
                   help="images timed in inference (default 10000 on GPU, 2 batches on CPU)")
    p.add_argument("--threads", type=_positive, default=None,
                   help="CPU intra-op threads (torch.set_num_threads); default 1 on CPU")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    p.add_argument("--csv", type=Path, default=None,
                   help="append rows to this CSV (created if absent; its rows of the same device give Single for "
                        "the ratios); the run's JSON goes beside it. Default: a new CSV under --out")
    p.add_argument("--time-budget", type=_positive, default=None, metavar="SECONDS",
                   help="start no cell after SECONDS of the run (those are recorded as skipped): keeps a run "
                        "inside a time limit with its rows written")
    p.add_argument("--smoke", action="store_true",
                   help="every model x mode x provider that can run here, one tiny step (CI)")
    return p


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    gpu = device.type == "cuda"
    # Table order (Single first), so each model's ratio to Single is known when its row is appended.
    models = list(MODELS) if "all" in args.model or args.smoke else [m for m in MODELS if m in args.model]
    modes = list(MODES) if args.mode == "both" or args.smoke else [args.mode]
    dtype = args.dtype or ("both" if gpu or args.smoke else "fp32")
    dtypes = list(DTYPES) if dtype == "both" else [dtype]
    if args.provider is None:
        providers = list(PROVIDERS) if gpu or args.smoke else list(CPU_DEFAULT_PROVIDERS)
    else:
        providers = list(PROVIDERS) if "all" in args.provider else list(dict.fromkeys(args.provider))
    if args.smoke:  # one tiny step per cell
        batch, size = args.batch_size or 2, args.image_size or 16
        warmup = args.warmup if args.warmup is not None else 0
        steps = args.steps or 1
        infer_images = args.infer_images or batch
    else:
        batch, size = args.batch_size or (128 if gpu else 8), args.image_size or 32
        warmup = args.warmup if args.warmup is not None else (10 if gpu else 1)
        steps = args.steps or (30 if gpu else 2)
        infer_images = args.infer_images or (10_000 if gpu else 2 * batch)
    # One CPU thread by default: the CPU run is a functional check, and on a shared 2-core machine two threads
    # oversubscribe and run up to 8x slower (measured); --threads N to change.
    threads = args.threads or (None if gpu else 1)
    return Config(models, modes, dtypes, providers, device, batch, size, warmup, steps, infer_images, args.out,
                  args.smoke, threads, args.csv, args.time_budget)


def _interpreted(provider: Provider, cfg: Config) -> bool:
    """True when `provider` will run Triton kernels under the interpreter (CPU, TRITON_INTERPRET=1)."""
    return (cfg.device.type == "cpu" and provider.kind == "pe" and provider.backend == "triton"
            and os.environ.get("TRITON_INTERPRET", "0") == "1")


CPU_WHAT = {"eager": "the stock twin (nn.Conv2d -> BatchNorm2d -> ReLU), NCHW",
            "eager-channels-last": "the stock twin, channels_last",
            "compile": "torch.compile of the stock twin (the first step of each cell compiles: a minute or more)",
            "pe-auto": "pe_kernels' fused model, where auto picks the reference (torch) ops on CPU",
            "pe-cuda": "pe_kernels' cuda backend", "pe-triton": "pe_kernels' triton backend"}


def announce(cfg: Config, reasons: dict[str, Optional[str]]) -> None:
    """What this run will time, how much, and what it skips — before any minute is spent."""
    batches = max(1, math.ceil(cfg.infer_images / cfg.batch_size))
    work = []
    if "train" in cfg.modes:
        work.append(f"{cfg.warmup} warm-up + {cfg.steps} timed training step(s)")
    if "infer" in cfg.modes:
        work.append(f"inference over {batches * cfg.batch_size} images ({batches} batch(es) after {cfg.warmup} "
                    "warm-up batch(es))")
    if cfg.device.type == "cpu":
        interpreted = any(reasons[n] is None and _interpreted(PROVIDERS[n], cfg) for n in cfg.providers)
        print("No CUDA GPU here: this times the reference path on the CPU"
              + (" (and Triton kernels under the interpreter, as asked)" if interpreted else "")
              + ". CPU timings say nothing about the GPU kernels.")
        for name in cfg.providers:
            if reasons[name] is None:
                print(f"  {name}: {CPU_WHAT[name]}")
        print(f"CPU run: batch {cfg.batch_size}, {cfg.image_size}x{cfg.image_size} images, "
              f"{'; '.join(work)}, {torch.get_num_threads()} thread(s).")
        if "fp16" in cfg.dtypes:
            print("fp16 asked: fp16 autocast is not meaningful on CPU, so bf16 autocast runs and the rows say bf16.")
    else:
        print(f"GPU: {torch.cuda.get_device_name(cfg.device)}; batch {cfg.batch_size}, {'; '.join(work)}. "
              "The first step of a cell compiles (Triton, torch.compile): its time is in the row's warmup_s.")
    for name in cfg.providers:
        if reasons[name] is not None:
            print(f"skipping {name}: {reasons[name]}")
        elif _interpreted(PROVIDERS[name], cfg):
            print(f"{name} runs the Triton kernels under the Triton interpreter (TRITON_INTERPRET=1): slow, "
                  "minutes per step at this size; a progress line is printed at least every 15 s.")
    if cfg.time_budget is not None:
        print(f"time budget: no cell starts after {cfg.time_budget} s.")
    if cfg.smoke:
        print("--smoke: one tiny step per cell to keep the suite running; the figures mean nothing.")


def run(cfg: Config, reasons: dict[str, Optional[str]], sink: Optional[CsvRows] = None,
        env: Optional[dict] = None, rows: Optional[list[Row]] = None) -> list[Row]:
    """Measure every cell, appending each row to `rows` and `sink` as it finishes (so an interrupted run keeps
    them); ratios to Single computed as rows arrive and again at the end."""
    env = env or environment(cfg.device)
    earlier = sink.earlier(env["device"]) if sink is not None else ()
    rows = [] if rows is None else rows
    providers = [PROVIDERS[name] for name in cfg.providers]
    cells = [(m, p, mode, d) for m in cfg.models for p in providers for mode in cfg.modes for d in cfg.dtypes]
    runnable = [c for c in cells if reasons[c[1].name] is None]
    start, done = time.perf_counter(), 0

    def record(row: Row) -> None:
        row.smoke = cfg.smoke
        for key, value in env.items():
            setattr(row, key, value)
        rows.append(row)
        add_ratios([row], (*earlier, *rows))
        if sink is not None:
            sink.append(row)

    for model_name in cfg.models:
        entry = TABLE8_MODELS[model_name]
        torch.manual_seed(0)
        base = None
        for provider in providers:
            for mode in cfg.modes:
                for dtype in cfg.dtypes:
                    label_dtype = amp_dtype(dtype, cfg.device)[1]
                    if reasons[provider.name] is not None:
                        record(Row(model_name, provider.name, mode, label_dtype, "skipped", reasons[provider.name]))
                        continue
                    done += 1
                    label = f"[{done}/{len(runnable)}] {model_name} {provider.name} {mode} {label_dtype}"
                    elapsed = time.perf_counter() - start
                    if cfg.time_budget is not None and elapsed > cfg.time_budget:
                        record(Row(model_name, provider.name, mode, label_dtype, "skipped",
                                   f"not started: the run's --time-budget of {cfg.time_budget} s was spent"))
                        continue
                    base = base if base is not None else entry.build(NUM_CLASSES)
                    cell_start = time.perf_counter()
                    try:
                        row = measure(entry, base, provider, mode, dtype, cfg, label)
                    except pe_kernels.BackendUnavailableError as exc:  # the forced backend cannot run a call
                        sys.stderr.write(f"\n  {label}: skipped: {exc}\n")
                        row = Row(model_name, provider.name, mode, label_dtype, "skipped",
                                  str(exc).splitlines()[0][:300])
                    except Exception as exc:  # recorded and reported; the run goes on
                        sys.stderr.write(f"\n  {label}: {type(exc).__name__}: {exc}\n")
                        row = Row(model_name, provider.name, mode, label_dtype, "error",
                                  f"{type(exc).__name__}: {exc}".splitlines()[0][:300])
                    record(row)
                    print(f"  {label}: {row.status} in {time.perf_counter() - cell_start:.1f}s"
                          + (f" (warm-up {row.warmup_s:.1f}s)" if row.warmup_s is not None else "")
                          + f", {time.perf_counter() - start:.0f}s into the run", flush=True)
                    if cfg.device.type == "cuda":
                        torch.cuda.empty_cache()
    add_ratios(rows, earlier)
    return rows


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = make_config(args, parser)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    reasons = {name: skip_reason(PROVIDERS[name], cfg) for name in cfg.providers}
    announce(cfg, reasons)
    start = time.perf_counter()
    env = environment(cfg.device)
    csv_path, json_path = result_paths(cfg, env)
    try:
        sink = CsvRows(csv_path)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"rows are appended to {csv_path} as each cell finishes", flush=True)
    rows: list[Row] = []
    # `timeout` (TERM or INT, even where a background job ignores INT): keep what was measured.
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        run(cfg, reasons, sink, env, rows)
    except KeyboardInterrupt:
        print(f"\ninterrupted: keeping the {len(rows)} row(s) finished so far", file=sys.stderr)
        add_ratios(rows, sink.earlier(env["device"]))
        interrupted = True
    else:
        interrupted = False
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        sink.finish(rows)
        write_json(json_path, rows, cfg, env)
    print_table(rows)
    print(f"\nwrote {csv_path}\n      {json_path}\n({time.perf_counter() - start:.1f}s on {env['device']})")
    errors = [r for r in rows if r.status == "error"]
    if errors:
        print(f"{len(errors)} cell(s) failed (see 'Not measured' above)", file=sys.stderr)
    return 130 if interrupted else 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
