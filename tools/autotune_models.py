"""`pe_kernels.autotune` on the Table 8 models: the per-op backend choices `auto` will make on this GPU.

    python tools/autotune_models.py --model single pe-2-4-1 --dtype fp16 --mode infer train \\
        --csv bench/results/autotune_cuda_DAY.csv

For each model, dtype and mode it builds the model as bench/throughput.py does (CIFAR-100 ResNet-50, channels_last,
batch 128 of 32x32 images), runs `pe_kernels.autotune` on it (eval forward for `infer`; a training forward and
backward, `backward=True`, for `train`; fp16 under autocast) and appends one CSV row per tuned op: the choice, each
backend's median ms, why a backend was refused, and the device, versions and commit. The choices land in the
autotune cache (`--cache-dir`, default pe_kernels' own), which `auto` reads in later runs on this GPU. The report
of each cell is printed as it finishes; a cell that fails is printed and the next one runs. Needs a CUDA device (on
a CPU the interpreter's timings would mean nothing).
"""

from __future__ import annotations

import argparse
import csv
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "bench"))

import pe_kernels  # noqa: E402
from pe_kernels import backend_names  # noqa: E402
from pe_kernels.models.registry import TABLE8_MODELS  # noqa: E402

DTYPES = {"fp16": torch.float16, "fp32": None}
MODES = ("infer", "train")
FIELDS = ("model", "mode", "dtype", "op", "shape", "chosen", "why", *(f"{b}_ms" for b in backend_names()),
          "refused", "device", "torch_version", "triton_version", "cuda_version", "git_commit", "timestamp")


def report_rows(model: str, mode: str, dtype: str, report, env: dict) -> list[dict]:
    """One CSV row per op of an AutotuneReport."""
    rows = []
    for r in report.rows:
        row = dict(model=model, mode=mode, dtype=dtype, op=r.op, shape=r.shape, chosen=r.backend, why=r.why,
                   refused="; ".join(f"{b}: {why}" for b, why in sorted(r.refused.items())))
        row.update({f"{b}_ms": f"{r.median_ms[b]:.5g}" if b in r.median_ms else "" for b in backend_names()})
        row.update({k: env.get(k, "") for k in FIELDS if k not in row})
        rows.append(row)
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def tune_cell(model_name: str, mode: str, dtype: str, batch: int, cache_dir, device: torch.device):
    torch.manual_seed(0)
    model = TABLE8_MODELS[model_name].build(100).to(device).to(memory_format=torch.channels_last)
    model.train(mode == "train")
    x = torch.randn(batch, 3, 32, 32, device=device).to(memory_format=torch.channels_last)
    amp = DTYPES[dtype]
    with torch.autocast("cuda", dtype=amp, enabled=amp is not None):
        return pe_kernels.autotune(model, x, backward=mode == "train", cache_dir=cache_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["single", "pe-2-4-1"], choices=tuple(TABLE8_MODELS))
    parser.add_argument("--dtype", nargs="+", default=["fp16"], choices=tuple(DTYPES))
    parser.add_argument("--mode", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--batch", type=int, default=128, help="images per call (default 128, Table 8's)")
    parser.add_argument("--cache-dir", default=None, help="autotune cache (default: pe_kernels' own)")
    parser.add_argument("--csv", type=Path, required=True, help="CSV the rows are appended to")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    if not torch.cuda.is_available():
        print("tools/autotune_models.py needs a CUDA device (none found): autotune's timings on a CPU would be "
              "the interpreter's", file=sys.stderr)
        return 2
    from throughput import environment  # bench/throughput.py: device, versions, commit

    device = torch.device("cuda")
    env = environment(device)
    failed = 0
    for model_name in args.model:
        for dtype in args.dtype:
            for mode in args.mode:
                start = time.perf_counter()
                print(f"=== autotune {model_name} {mode} {dtype} (batch {args.batch})", flush=True)
                try:
                    report = tune_cell(model_name, mode, dtype, args.batch, args.cache_dir, device)
                except Exception as exc:  # one cell's failure must not hide the others
                    failed += 1
                    print(f"FAILED: {type(exc).__name__}: {exc}", flush=True)
                    continue
                print(report, flush=True)
                append_rows(args.csv, report_rows(model_name, mode, dtype, report, env))
                print(f"({time.perf_counter() - start:.0f} s; {len(report.rows)} ops appended to {args.csv})",
                      flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
