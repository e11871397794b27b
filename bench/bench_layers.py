"""Per-layer benchmark: every conv shape of Single and PE-(2,4,1) ResNet-50 as conv -> BatchNorm -> ReLU.

    pytest bench/bench_layers.py --benchmark-json bench/results/layers.json
    pytest bench/bench_layers.py -k "pe-2-4-1 and fp16 and fwd and not fwdbwd"     # one slice

Not part of the default test run (the file is not named test_*.py; give its path to collect it).
Passes: `fwd` = eval forward (BN folded; the inference kernel), `fwdbwd` = training forward (batch statistics)
+ backward of the output, input and weights. Providers as in throughput.py: eager / eager-channels-last
(nn.Conv2d + nn.BatchNorm2d + ReLU), compile (torch.compile of those), pe-triton / pe-cuda / pe-auto
(pe_kernels.functional.conv_bn under use_backend, on a channels_last input as eager-channels-last's: the layout a
fused model's layers receive; before 2026-11-23 the pe cases fed NCHW). Shapes: batch 128 at CIFAR resolution on GPU; on CPU a tiny
stand-in (batch 2, a quarter of the resolution) that only keeps the file running. The timed function
synchronises on GPU.

Each case that finishes is also appended (and flushed) as a row to the CSV named by $PE_BENCH_LAYERS_CSV when it
is set (tools/gpu_lab.sh sets it), so a run stopped by a time limit keeps what it measured; pytest-benchmark's
--benchmark-json is written only when the session ends. tools/update_dispatch_table.py reads either.

extra_info: FLOPs, bytes of a minimal-traffic model, the roofline floor max(FLOPs / peak, bytes / bandwidth)
on an H100 SXM5 and, when timed on a GPU, the achieved % of that floor (meaningful on an H100 only); on a GPU
also the device time of the case's kernels alone (`kernel_s`: the median over KERNEL_REPS calls of the summed
durations of the kernels, memsets and copies the torch profiler records in one call; `kernels`: how many) and the
% of the floor by that time: the wall-clock median less the host's share.
Traffic model (elements x dtype size):
  fwd:    x + w + y                       (one fused kernel reads x, w and writes y)
  fwdbwd: 3x + 3w + 9y                    (fwd with stats x+w+y, BN apply y+y, BN-grad reductions dy+y,
                                           dgrad dy+y+w+dx, wgrad dy+y+x+dw)
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import pe_kernels  # noqa: E402
from pe_kernels import functional as PF  # noqa: E402
from pe_kernels.models.registry import TABLE8_MODELS  # noqa: E402
from pe_kernels.nn.blocks import conv2d_of  # noqa: E402

# NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5 column, dense (without sparsity).
H100_SOURCE = "NVIDIA H100 Tensor Core GPU datasheet, H100 SXM5, dense"
H100_HBM_BYTES_PER_S = 3.35e12
H100_FP16_TENSOR_FLOPS = 989.4e12
H100_TF32_TENSOR_FLOPS = 494.7e12
H100_FP32_FLOPS = 66.9e12

GPU_BATCH, GPU_SIZE = 128, 32
CPU_BATCH, CPU_SCALE = 2, 4
MODELS = ("single", "pe-2-4-1")
PASSES = ("fwd", "fwdbwd")
DTYPES = {"fp16": torch.float16, "fp32": torch.float32}
PROVIDERS = ("eager", "eager-channels-last", "compile", "pe-triton", "pe-cuda", "pe-auto")
CSV_ENV = "PE_BENCH_LAYERS_CSV"
CSV_FIELDS = ("group", "model", "layer", "count", "pass", "dtype", "provider", "batch", "size", "device",
              "median_s", "flops", "bytes", "h100_roofline_floor_ms", "pct_of_h100_roofline", "git_commit",
              "torch_version", "triton_version", "kernel_s", "kernels", "pct_of_h100_roofline_kernel")
KERNEL_REPS = 5


@dataclasses.dataclass(frozen=True)
class ConvLayer:
    """A conv shape of a CIFAR ResNet-50 at 32x32 input; `count` = how many layers of the model share it."""

    model: str
    name: str
    in_channels: int
    out_channels: int
    kernel: int
    stride: int
    padding: int
    groups: int
    size: int  # input height = width at 32x32 model input
    count: int = 1

    @property
    def id(self) -> str:
        return (f"{self.model}-{self.name}-{self.in_channels}to{self.out_channels}-k{self.kernel}s{self.stride}"
                f"g{self.groups}-h{self.size}-x{self.count}")


def benchmark_group(layer: ConvLayer, pass_: str, dtype_name: str) -> str:
    """The pytest-benchmark group of one (layer, pass, dtype): the providers compared side by side."""
    return f"{layer.id}-{pass_}-{dtype_name}"


@functools.lru_cache(maxsize=None)
def _provenance() -> tuple:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = ""
    head = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "rev-parse", "HEAD"],
                          capture_output=True, text=True, timeout=10)
    # (the result files a run rewrites do not make the code dirty: bench/results/ is left out)
    dirty = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[1]), "status", "--porcelain",
                            "--untracked-files=no", "--", ".", ":(exclude)bench/results"],
                           capture_output=True, text=True, timeout=10)
    commit = head.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "") if head.returncode == 0 else "unknown"
    return (("git_commit", commit), ("torch_version", torch.__version__), ("triton_version", triton_version))


def provenance() -> dict:
    """The commit (with -dirty when tracked files outside bench/results/ differ from it), torch and triton versions
    each row records."""
    return dict(_provenance())


def append_csv_row(path: Path, row: dict) -> None:
    """Append one finished case to the CSV at `path` (header written when the file is new), flushed."""
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    fields = CSV_FIELDS
    if not new:  # a file written before a column was added keeps its own columns
        with path.open(newline="") as fh:
            fields = tuple(next(csv.reader(fh), CSV_FIELDS))
    with path.open("a", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields, extrasaction="ignore")
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def _out_size(size: int, conv: nn.Conv2d) -> int:
    k, s, p, d = conv.kernel_size[0], conv.stride[0], conv.padding[0], conv.dilation[0]
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def conv_layers(model_name: str, size: int = GPU_SIZE) -> list[ConvLayer]:
    """The distinct conv shapes of a Table 8 ResNet-50 (stem, block convs, shortcuts), in model order."""
    model = TABLE8_MODELS[model_name].build()
    found: dict[tuple, list] = {}

    def add(name: str, module: nn.Module, h: int) -> int:
        c = conv2d_of(module)
        key = (c.in_channels, c.out_channels, c.kernel_size[0], c.stride[0], c.padding[0], c.groups, h)
        found.setdefault(key, [name, 0])[1] += 1
        return _out_size(h, c)

    h = add("conv1", model.conv1, size)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        for i, block in enumerate(getattr(model, stage)):
            h_in = h
            for name, child in block.named_children():  # conv1, conv2(, conv3) in order of registration
                if name.startswith("conv"):
                    h = add(f"{stage}.{i}.{name}", child, h)
            if len(block.shortcut) > 0:
                add(f"{stage}.{i}.shortcut", block.shortcut[0], h_in)
    return [ConvLayer(model_name, name, *key, count=count) for key, (name, count) in found.items()]


LAYERS = [layer for m in MODELS for layer in conv_layers(m)]


def flops_and_bytes(layer: ConvLayer, batch: int, size: int, pass_: str, elem: int) -> tuple[float, float]:
    out = (size + 2 * layer.padding - layer.kernel) // layer.stride + 1
    x = batch * layer.in_channels * size * size
    w = layer.out_channels * (layer.in_channels // layer.groups) * layer.kernel ** 2
    y = batch * layer.out_channels * out * out
    flops = 2.0 * y * (layer.in_channels // layer.groups) * layer.kernel ** 2
    if pass_ == "fwd":
        return flops, float(elem * (x + w + y))
    return 3 * flops, float(elem * (3 * x + 3 * w + 9 * y))


def peak_flops(dtype: torch.dtype) -> float:
    if dtype in (torch.float16, torch.bfloat16):
        return H100_FP16_TENSOR_FLOPS
    return H100_TF32_TENSOR_FLOPS if torch.backends.cudnn.allow_tf32 else H100_FP32_FLOPS


def _skip_reason(provider: str, device: torch.device, dtype: torch.dtype):
    if device.type == "cpu" and dtype == torch.float16:
        return "fp16 layer timings need a GPU"
    if provider in ("pe-triton", "pe-cuda"):
        status = pe_kernels.backends()[provider[3:]]
        if not status.available:
            return status.reason
    return None


def layer_fn(layer: ConvLayer, provider: str, pass_: str, x: torch.Tensor, dtype: torch.dtype):
    """The timed function of one case: conv -> BatchNorm -> ReLU of `layer` by `provider`, the eval forward ("fwd")
    or the training forward + backward of the output, input and weights ("fwdbwd"), on `x` (also
    bench/kernel_audit.py's layers)."""
    conv = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel, layer.stride, layer.padding,
                     groups=layer.groups, bias=False).to(x.device, dtype)
    bn = nn.BatchNorm2d(layer.out_channels).to(x.device)
    train = pass_ == "fwdbwd"
    bn.train(train)
    params = [conv.weight, bn.weight, bn.bias]
    if provider.startswith("pe-"):
        backend = provider[3:]
        # the layout the package's layers work in (and a fused model's layers receive), as eager-channels-last's
        # input: an NCHW input reads its channels with a stride, element by element (bench/kernel_audit.py)
        x = x.contiguous(memory_format=torch.channels_last)

        def forward(inp):
            with pe_kernels.use_backend(backend):
                return PF.conv_bn(inp, conv.weight, None, bn, conv.stride, conv.padding, 1, conv.groups,
                                  activation="relu")
    else:
        module = nn.Sequential(conv, bn, nn.ReLU())
        if provider == "eager-channels-last":
            module = module.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        forward = torch.compile(module) if provider == "compile" else module
    sync = torch.cuda.synchronize if x.device.type == "cuda" else (lambda: None)
    if not train:
        def run():
            with torch.no_grad():
                forward(x)
            sync()
        return run
    x.requires_grad_(True)

    def run():
        for t in [x, *params]:
            t.grad = None
        out = forward(x)
        out.backward(torch.ones_like(out))
        sync()
    return run


def device_kernel_seconds(run, reps: int = KERNEL_REPS) -> tuple[float, int]:
    """(median over `reps` calls of run()'s summed device-activity time in seconds, device activities per call),
    from the torch profiler's CUDA events (kernels, memsets, copies)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    sums, counts = [], []
    for _ in range(reps):
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        events = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
        sums.append(sum(e.time_range.elapsed_us() for e in events) * 1e-6)
        counts.append(len(events))
    sums.sort()
    return sums[len(sums) // 2], max(set(counts), key=counts.count)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype_name", tuple(DTYPES))
@pytest.mark.parametrize("pass_", PASSES)
@pytest.mark.parametrize("layer", LAYERS, ids=lambda layer: layer.id)
def test_conv_bn_relu(benchmark, layer: ConvLayer, pass_: str, dtype_name: str, provider: str):
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = DTYPES[dtype_name]
    reason = _skip_reason(provider, device, dtype)
    if reason:
        pytest.skip(reason)
    gpu = device.type == "cuda"
    batch = GPU_BATCH if gpu else CPU_BATCH
    size = layer.size if gpu else max(2, layer.size // CPU_SCALE)
    torch.manual_seed(0)
    x = torch.randn(batch, layer.in_channels, size, size, device=device, dtype=dtype)
    run = layer_fn(layer, provider, pass_, x, dtype)
    run()  # warm-up (and compilation for `compile`)
    flops, nbytes = flops_and_bytes(layer, batch, size, pass_, x.element_size())
    floor_s = max(flops / peak_flops(dtype), nbytes / H100_HBM_BYTES_PER_S)
    benchmark.group = benchmark_group(layer, pass_, dtype_name)
    benchmark.extra_info.update(model=layer.model, layer=layer.name, count=layer.count, dtype=dtype_name,
                                provider=provider, batch=batch, size=size,
                                device=torch.cuda.get_device_name(device) if gpu else "cpu",
                                flops=flops, bytes=nbytes, h100_roofline_floor_ms=1e3 * floor_s,
                                peak_source=H100_SOURCE, **provenance(), **{"pass": pass_})
    benchmark(run)
    stats = getattr(benchmark, "stats", None)
    median = stats.stats.median if stats is not None and getattr(stats, "stats", None) is not None else None
    if gpu and median:
        benchmark.extra_info.update(median_ms=1e3 * median, tflops=flops / median / 1e12,
                                    gbps=nbytes / median / 1e9, pct_of_h100_roofline=100 * floor_s / median)
        kernel_s, kernels = device_kernel_seconds(run)
        if kernel_s > 0:
            benchmark.extra_info.update(kernel_s=kernel_s, kernels=kernels,
                                        pct_of_h100_roofline_kernel=100 * floor_s / kernel_s)
    if os.environ.get(CSV_ENV) and median is not None:
        append_csv_row(Path(os.environ[CSV_ENV]), dict(benchmark.extra_info, group=benchmark.group, median_s=median))
