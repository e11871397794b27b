"""Host time per layer: pe_kernels modules vs the stock PyTorch modules they replace (issue 11).

    python bench/host_time.py                          # every layer x mode x backend that runs here
    python bench/host_time.py --device cuda --reps 1000
    python bench/host_time.py --smoke --json           # CI: a few reps, JSON on stdout
    python bench/host_time.py --csv host_time.csv      # append tidy rows to a CSV

Host time is the time for the Python call to return, measured with time.perf_counter around it. On a GPU the
timed window holds no synchronisation: it is the CPU-side cost of launching (dispatch, checks, launches); the
device is synchronised after each repetition, outside the window, so every repetition starts with an empty
queue. A call that synchronises internally shows up as host time, as it would in a training loop. On a CPU the
kernels run on the calling thread, so the time includes their arithmetic: the tensors are tiny (batch 2, 4x4,
channels_last, one intra-op thread by default) so that it is mostly overhead.

Layers (fp32, the same weights and BatchNorm state on both sides):
  conv3x3  PackedConvBNReLU2d(16, 16, 3, alpha=2, num_estimators=2, padding=1) vs nn.Sequential(nn.Conv2d(32, 32,
           3, padding=1, groups=<the packed conv's groups>, bias=False), nn.BatchNorm2d(32), nn.ReLU())
  conv1x1  the same with kernel_size=1, padding=0
  bottleneck  PackedBottleneck(64, 16, 1, alpha=2, num_estimators=4, gamma=1, conv_bias=False, dropout_rate=0,
           groups=1) vs pe_kernels.models.registry.eager_twin of it (the block's `forward_modules`: the stock
           submodules one by one, as torch-uncertainty runs them)
Modes: eval = model.eval(), forward under torch.no_grad(); train = model.train(), forward + out.sum().backward()
with an input that requires grad (a layer inside a network). zero_grad(set_to_none=True) and x.grad = None run
before each repetition, outside the timed window, for both sides.
Each repetition times pe and stock back to back (alternating which goes first) with the garbage collector off;
figures are the median, p20 and p80 of --reps repetitions after --warmup. Issue 11's targets: pe/stock median
<= 1.0 in eval, <= 1.5 in train. This is a benchmark: it reports whether a target is met, it never fails on it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import importlib.util
import copy
import csv
import dataclasses
import gc
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch  # noqa: E402
from torch import nn  # noqa: E402

import pe_kernels  # noqa: E402
from pe_kernels.models.registry import eager_twin  # noqa: E402
from pe_kernels.nn import PackedBottleneck, PackedConvBNReLU2d  # noqa: E402
from throughput import _int_at_least, _quantile, environment  # noqa: E402  (bench/throughput.py)

MODES = ("eval", "train")
TARGETS = {"eval": 1.0, "train": 1.5}  # issue 11: pe host time <= target x stock
BACKENDS = pe_kernels.backend_names()
# The triton backend's own host cost on a CPU: its launchers run (argument checks, caches, allocations, grids) but
# every Triton launch returns at once (tools/count_triton_compiles.py: no_launches, triton_on_cpu_tensors).
DRY = "triton-dry"


@dataclasses.dataclass(frozen=True)
class Layer:
    name: str
    description: str
    in_channels: int  # channels of the layer's input tensor (after the packing)
    build: Callable[[], tuple[nn.Module, nn.Module]]  # (pe module, stock twin with the same state)


def _randomise_bn(module: nn.Module, gen: torch.Generator) -> None:
    """Non-trivial BatchNorm affine parameters and running statistics, so the output check means something."""
    for bn in module.modules():
        if isinstance(bn, nn.BatchNorm2d):
            with torch.no_grad():
                bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
                bn.bias.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen) * 0.1)
                bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)


def _conv_bn_relu_pair(kernel_size: int, padding: int) -> tuple[nn.Module, nn.Module]:
    pe = PackedConvBNReLU2d(16, 16, kernel_size=kernel_size, alpha=2, num_estimators=2, padding=padding)
    _randomise_bn(pe, torch.Generator().manual_seed(kernel_size))
    c = pe.conv.conv
    stock = nn.Sequential(
        nn.Conv2d(c.in_channels, c.out_channels, kernel_size, padding=padding, groups=c.groups, bias=False),
        nn.BatchNorm2d(pe.bn.num_features), nn.ReLU())
    stock[0].load_state_dict(c.state_dict())
    stock[1].load_state_dict(pe.bn.state_dict())
    return pe, stock


def _bottleneck_pair() -> tuple[nn.Module, nn.Module]:
    pe = PackedBottleneck(64, 16, 1, alpha=2, num_estimators=4, gamma=1, conv_bias=False, dropout_rate=0, groups=1)
    _randomise_bn(pe, torch.Generator().manual_seed(0))
    return pe, eager_twin(pe)


LAYERS = {layer.name: layer for layer in (
    Layer("conv3x3", "PackedConvBNReLU2d 16->16 k3 alpha2 M2 vs Conv2d(32,32,3)+BN+ReLU", 32,
          lambda: _conv_bn_relu_pair(3, 1)),
    Layer("conv1x1", "PackedConvBNReLU2d 16->16 k1 alpha2 M2 vs Conv2d(32,32,1)+BN+ReLU", 32,
          lambda: _conv_bn_relu_pair(1, 0)),
    Layer("bottleneck", "PackedBottleneck(64,16) alpha2 M4 vs its eager twin (forward_modules)", 128,
          _bottleneck_pair),
)}


@dataclasses.dataclass
class Config:
    layers: list[str]
    modes: list[str]
    backends: list[str]
    device: torch.device
    batch: int
    size: int
    channels_last: bool
    threads: int
    warmup: int
    reps: int
    smoke: bool


@dataclasses.dataclass
class Row:
    """One (layer, mode, backend) measurement; times in microseconds, ratio = pe median / stock median."""

    layer: str
    mode: str
    backend: str
    status: str  # ok | error
    reason: str = ""
    pe_median_us: Optional[float] = None
    pe_p20_us: Optional[float] = None
    pe_p80_us: Optional[float] = None
    stock_median_us: Optional[float] = None
    stock_p20_us: Optional[float] = None
    stock_p80_us: Optional[float] = None
    ratio: Optional[float] = None
    target: float = 0.0
    meets_target: Optional[bool] = None
    pe_path: str = ""  # last_dispatch() after a pe forward: the backend that ran, or "modules: <reason>"
    max_abs_diff: Optional[float] = None  # |pe - stock| of one forward's outputs (the same computation?)
    batch: int = 0
    size: int = 0
    memory_format: str = ""
    threads: int = 0
    warmup: int = 0
    reps: int = 0
    device: str = ""
    torch_version: str = ""
    triton_version: str = ""
    cuda_version: str = ""
    git_commit: str = ""
    timestamp: str = ""
    smoke: bool = False


# ---------------------------------------------------------------- backends

def skip_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why `backend` is not timed on `device` (None when it is)."""
    if backend == DRY:
        if device.type != "cpu":
            return f"{DRY} times the triton launchers on CPU tensors (on a GPU, time `triton` itself)"
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return f"{DRY} needs the launchers' GPU code path: unset TRITON_INTERPRET"
        try:
            importlib.import_module("triton")
        except ImportError:
            return "triton is not installed"
        return None
    if backend == "cuda" and device.type != "cuda":
        return "pe_kernels' cuda backend runs CUDA tensors only"
    if backend == "triton" and (device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"):
        return ("triton kernels run on CUDA tensors; on the CPU only under TRITON_INTERPRET=1, whose emulation is "
                "not host time")
    status = pe_kernels.backends()[backend]
    return None if status.available else status.reason


# ---------------------------------------------------------------- timing

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _summary(seconds: list[float]) -> tuple[float, float, float]:
    us = [s * 1e6 for s in seconds]
    return statistics.median(us), _quantile(us, 0.2), _quantile(us, 0.8)


def time_pair(steps: tuple[Callable[[], object], Callable[[], object]], reset: Callable[[], None],
              device: torch.device, warmup: int, reps: int) -> tuple[list[float], list[float]]:
    """perf_counter seconds of each of the two steps, `reps` each, interleaved (first one first, then the other
    first, ...). `reset` and the device synchronisation run outside the timed window."""
    times: tuple[list[float], list[float]] = ([], [])
    for _ in range(warmup):
        for step in steps:
            reset()
            step()
            _sync(device)
    gc_was_enabled = gc.isenabled()
    gc.disable()
    try:
        for i in range(reps):
            for side in ((0, 1) if i % 2 == 0 else (1, 0)):
                reset()
                _sync(device)
                start = time.perf_counter()
                out = steps[side]()
                stop = time.perf_counter()
                del out
                _sync(device)
                times[side].append(stop - start)
    finally:
        if gc_was_enabled:
            gc.enable()
    return times


def _prepare(module: nn.Module, cfg: Config, mode: str) -> nn.Module:
    module = module.to(cfg.device)
    if cfg.channels_last:
        module = module.to(memory_format=torch.channels_last)
    return module.train(mode == "train")


def _pe_path() -> str:
    d = pe_kernels.last_dispatch()
    if d is None:
        return "none recorded"
    return f"modules: {d.reason}" if d.backend == "modules" else d.backend


def _load_tool(name: str):
    spec = importlib.util.spec_from_file_location(f"pe_kernels_tool_{name}", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # (dataclasses look their module up)
    spec.loader.exec_module(module)
    return module


@contextlib.contextmanager
def _backend_context(backend: str):
    """use_backend(backend); for triton-dry, the triton backend on CPU tensors with every launch a no-op."""
    if backend != DRY:
        with pe_kernels.use_backend(backend):
            yield
        return
    tool = _load_tool("count_triton_compiles")
    with tool.triton_on_cpu_tensors(), tool.no_launches():
        yield


def measure(layer: Layer, mode: str, backend: str, cfg: Config) -> Row:
    row = Row(layer=layer.name, mode=mode, backend=backend, status="ok", target=TARGETS[mode], batch=cfg.batch,
              size=cfg.size, memory_format="channels_last" if cfg.channels_last else "contiguous",
              threads=cfg.threads, warmup=cfg.warmup, reps=cfg.reps, smoke=cfg.smoke)
    pe, stock = layer.build()
    pe, stock = _prepare(pe, cfg, mode), _prepare(stock, cfg, mode)
    x = torch.randn(cfg.batch, layer.in_channels, cfg.size, cfg.size, device=cfg.device,
                    generator=torch.Generator(cfg.device).manual_seed(0))
    if cfg.channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    train = mode == "train"
    x.requires_grad_(train)

    if train:
        def run(module: nn.Module) -> Callable[[], object]:
            return lambda: module(x).sum().backward()

        def reset() -> None:
            pe.zero_grad(set_to_none=True)
            stock.zero_grad(set_to_none=True)
            x.grad = None
        grad_mode = contextlib.nullcontext()
    else:
        def run(module: nn.Module) -> Callable[[], object]:
            return lambda: module(x)

        def reset() -> None:
            pass
        grad_mode = torch.no_grad()

    try:
        with _backend_context(backend), grad_mode:
            # One forward of copies (the running statistics of the timed modules are left as built): which path
            # pe_kernels took, and whether both sides compute the same thing (not in a dry run: nothing computed).
            pe_out = copy.deepcopy(pe)(x)
            row.pe_path = _pe_path() + (" (launches no-op)" if backend == DRY else "")
            if backend != DRY:
                row.max_abs_diff = (pe_out - copy.deepcopy(stock)(x)).abs().max().item()
            del pe_out
            pe_times, stock_times = time_pair((run(pe), run(stock)), reset, cfg.device, cfg.warmup, cfg.reps)
    except Exception as exc:  # a backend that cannot run this case: reported, the other cases still run
        row.status, row.reason = "error", f"{type(exc).__name__}: {exc}"
        return row
    row.pe_median_us, row.pe_p20_us, row.pe_p80_us = _summary(pe_times)
    row.stock_median_us, row.stock_p20_us, row.stock_p80_us = _summary(stock_times)
    row.ratio = row.pe_median_us / row.stock_median_us
    row.meets_target = row.ratio <= row.target
    return row


# ---------------------------------------------------------------- output

def format_table(rows: list[Row]) -> str:
    lines = ["| layer | mode | backend | pe median us (p20-p80) | stock median us (p20-p80) | pe/stock | target "
             "| meets target | pe path | max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if r.status != "ok":
            lines.append(f"| {r.layer} | {r.mode} | {r.backend} | {r.status}: {r.reason} | | | {r.target:.1f} "
                         "| | | |")
            continue
        lines.append(
            f"| {r.layer} | {r.mode} | {r.backend} "
            f"| {r.pe_median_us:.1f} ({r.pe_p20_us:.1f}-{r.pe_p80_us:.1f}) "
            f"| {r.stock_median_us:.1f} ({r.stock_p20_us:.1f}-{r.stock_p80_us:.1f}) "
            f"| {r.ratio:.2f} | {r.target:.1f} | {'yes' if r.meets_target else 'no'} | {r.pe_path} "
            f"| {'-' if r.max_abs_diff is None else f'{r.max_abs_diff:.1e}'} |")
    return "\n".join(lines)


def append_csv(path: Path, rows: list[Row]) -> None:
    fields = [f.name for f in dataclasses.fields(Row)]
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        if new:
            writer.writeheader()
        for r in rows:
            writer.writerow({k: ("" if v is None else v) for k, v in dataclasses.asdict(r).items()})


# ---------------------------------------------------------------- command line

_positive, _non_negative = _int_at_least(1), _int_at_least(0)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default=None, choices=("cpu", "cuda"), help="default: cuda if available")
    p.add_argument("--layer", nargs="+", default=list(LAYERS), choices=tuple(LAYERS))
    p.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--backend", nargs="+", default=None, choices=BACKENDS + ("auto", DRY),
                   help="pe_kernels backends to time (default: the registered ones that run on the device, and "
                        f"{DRY} on a CPU; one that cannot is listed with the reason). {DRY}: the triton backend's "
                        "host cost on CPU tensors, every Triton launch a no-op (Triton's own launch cost excluded)")
    p.add_argument("--batch", type=_positive, default=2)
    p.add_argument("--size", type=_positive, default=4, help="height = width of the input (default 4)")
    p.add_argument("--contiguous", action="store_true", help="NCHW tensors and weights (default channels_last)")
    p.add_argument("--threads", type=_positive, default=1, help="torch.set_num_threads (default 1)")
    p.add_argument("--warmup", type=_non_negative, default=None, help="default 30 (2 with --smoke)")
    p.add_argument("--reps", type=_positive, default=None, help="timed repetitions per side (default 300, 5 with "
                                                                   "--smoke)")
    p.add_argument("--smoke", action="store_true", help="a few repetitions (CI: the figures mean nothing)")
    p.add_argument("--json", nargs="?", const="-", default=None, metavar="PATH",
                   help="write the rows and the environment as JSON to PATH, or to stdout without PATH (the table "
                        "then goes to stderr)")
    p.add_argument("--csv", type=Path, default=None, metavar="PATH", help="append the rows to this CSV")
    return p


def make_config(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Config:
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch.cuda.is_available() is False on this machine")
    default = list(BACKENDS) + ([DRY] if device.type == "cpu" else [])
    return Config(layers=args.layer, modes=args.mode, backends=args.backend or default, device=device,
                  batch=args.batch, size=args.size, channels_last=not args.contiguous, threads=args.threads,
                  warmup=args.warmup if args.warmup is not None else (2 if args.smoke else 30),
                  reps=args.reps or (5 if args.smoke else 300), smoke=args.smoke)


def main(argv: Optional[list[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = make_config(args, parser)
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.threads)
    try:
        return _run(cfg, args)
    finally:
        torch.set_num_threads(threads)  # main() may be called in a process that goes on (the tests)


def _run(cfg: Config, args: argparse.Namespace) -> int:
    out = sys.stderr if args.json == "-" else sys.stdout
    env = environment(cfg.device)
    skipped = {b: r for b in cfg.backends if (r := skip_reason(b, cfg.device)) is not None}
    backends = [b for b in cfg.backends if b not in skipped]
    print(f"host time on {env['device']}, torch {env['torch_version']}, triton {env['triton_version']}, "
          f"commit {env['git_commit']}; batch {cfg.batch}, {cfg.size}x{cfg.size}, "
          f"{'channels_last' if cfg.channels_last else 'contiguous'}, fp32, {cfg.threads} thread(s), "
          f"{cfg.warmup} warm-up + {cfg.reps} reps" + (" (--smoke: figures mean nothing)" if cfg.smoke else ""),
          file=out, flush=True)
    if cfg.device.type == "cpu":
        print("CPU: the kernels run on the calling thread, so host time includes their (tiny) arithmetic.",
              file=out)
    for b, reason in skipped.items():
        print(f"skipped backend {b}: {reason}", file=out)

    rows = []
    for name in cfg.layers:
        for mode in cfg.modes:
            for backend in backends:
                row = measure(LAYERS[name], mode, backend, cfg)
                for key in ("device", "torch_version", "triton_version", "cuda_version", "git_commit", "timestamp"):
                    setattr(row, key, env[key])
                rows.append(row)
    print("\n" + format_table(rows), file=out)
    print("\npe/stock = pe median / stock median; targets (issue 11): eval <= 1.0, train <= 1.5 (a benchmark, "
          "not a test). train = forward + .sum().backward(); zero_grad outside the timed window.", file=out)

    if args.csv is not None:
        append_csv(args.csv, rows)
        print(f"appended {len(rows)} rows to {args.csv}", file=out)
    if args.json is not None:
        doc = dict(environment=env, config=dict(dataclasses.asdict(cfg), device=str(cfg.device)),
                   layers={n: LAYERS[n].description for n in cfg.layers},
                   skipped=[dict(backend=b, reason=r) for b, r in skipped.items()],
                   rows=[dataclasses.asdict(r) for r in rows])
        text = json.dumps(doc, indent=2, default=str)
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text + "\n")
            print(f"wrote {args.json}", file=out)
    return 0 if all(r.status == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
