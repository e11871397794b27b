"""One bench_layers case under Nsight Compute: the profiled region is one call after warm-up calls.

    ncu --profile-from-start off --section SpeedOfLight python tools/ncu_layer.py \\
        --layer pe-2-4-1-layer1.0.conv2 --pass fwd --provider pe-triton

`--layer` is the start of a case id of bench/bench_layers.py (e.g. 'pe-2-4-1-layer1.0.conv2' or the whole id
'pe-2-4-1-layer1.0.conv2-128to128-k3s1g4-h32-x3'); the case runs as bench_layers times it (batch 128, 32x32
model input, channels_last for the pe providers). Warm-up calls compile and autotune outside the profiled
region (cudaProfilerStart / cudaProfilerStop around the last call), so ncu replays only the steady-state kernels.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import bench_layers  # noqa: E402


def find_layer(prefix: str) -> bench_layers.ConvLayer:
    """The one bench_layers case whose id starts with `prefix` (ValueError naming the candidates otherwise)."""
    matches = [layer for layer in bench_layers.LAYERS if layer.id.startswith(prefix)]
    if len(matches) != 1:
        ids = ", ".join(layer.id for layer in (matches or bench_layers.LAYERS))
        raise ValueError(f"--layer {prefix!r} matches {len(matches)} cases; pick one of: {ids}")
    return matches[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layer", required=True, help="start of a bench_layers case id")
    parser.add_argument("--pass", dest="pass_", choices=bench_layers.PASSES, default="fwd")
    parser.add_argument("--provider", choices=bench_layers.PROVIDERS, default="pe-triton")
    parser.add_argument("--dtype", choices=tuple(bench_layers.DTYPES), default="fp16")
    parser.add_argument("--warmup", type=int, default=3, help="calls before the profiled one (default 3)")
    args = parser.parse_args(argv)
    if args.warmup < 1:
        parser.error(f"--warmup must be at least 1 (compilation stays out of the profile), got {args.warmup}")
    layer = find_layer(args.layer)
    if not torch.cuda.is_available():
        print("tools/ncu_layer.py needs a CUDA device (none found)", file=sys.stderr)
        return 2
    dtype = bench_layers.DTYPES[args.dtype]
    reason = bench_layers._skip_reason(args.provider, torch.device("cuda"), dtype)
    if reason:
        print(f"{args.provider} cannot run here: {reason}", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    x = torch.randn(bench_layers.GPU_BATCH, layer.in_channels, layer.size, layer.size, device="cuda", dtype=dtype)
    run = bench_layers.layer_fn(layer, args.provider, args.pass_, x, dtype)
    for _ in range(args.warmup):
        run()
    torch.cuda.cudart().cudaProfilerStart()
    run()
    torch.cuda.cudart().cudaProfilerStop()
    flops, nbytes = bench_layers.flops_and_bytes(layer, bench_layers.GPU_BATCH, layer.size, args.pass_,
                                                 x.element_size())
    floor_ms = 1e3 * max(flops / bench_layers.peak_flops(dtype), nbytes / bench_layers.H100_HBM_BYTES_PER_S)
    print(f"profiled {layer.id} {args.pass_} {args.dtype} {args.provider}: {flops / 1e9:.2f} GFLOP, "
          f"{nbytes / 1e6:.1f} MB minimal traffic, H100 floor {floor_ms * 1e3:.1f} us")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
