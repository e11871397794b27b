"""Render bench_layers.py's per-case CSVs as % of the H100 roofline per layer class — never typed by hand.

    python bench/layers_report.py bench/results/layers_cuda_*.csv                  # print the markdown tables
    python bench/layers_report.py bench/results/layers_cuda_*.csv --update-readme  # into the README's markers

% of roofline = 100 * floor / median, floor = max(FLOPs / peak, minimal bytes / bandwidth) of the layer (conv +
BatchNorm + ReLU, bench_layers.py's model); the medians are pytest-benchmark wall-clock times with a sync, so host
time is included. A layer class is the kernel size and stride (k3s1: 3x3 stride 1); the cell is the median over
the class's layers of Single and PE-(2,4,1) pooled. `total ms` sums each model's layers weighted by how often the
layer occurs in the network (the CSV's `count`): the conv-BN-ReLU part of one step.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- layers:start -->", "<!-- layers:end -->"
PROVIDERS = ("eager-channels-last", "eager", "pe-triton", "pe-cuda", "pe-auto", "compile")


def layer_class(group: str) -> str:
    """'single-layer1.0.conv2-64to64-k3s1g1-h32-x2-fwd-fp16' -> 'k3s1'."""
    match = re.search(r"-k(\d+)s(\d+)", group)
    if not match:
        raise ValueError(f"cannot read kernel size and stride from the case name {group!r}")
    return f"k{match.group(1)}s{match.group(2)}"


def render(paths: list[Path]) -> str:
    rows = [dict(r, source=p.name) for p in paths for r in csv.DictReader(p.open())]
    if not rows:
        raise ValueError(f"no rows in {', '.join(map(str, paths))}")
    pct = defaultdict(list)
    total = defaultdict(float)
    for r in rows:
        key = (r["pass"], r["dtype"], layer_class(r["group"]))
        pct[key + (r["provider"],)].append(float(r["pct_of_h100_roofline"]))
        total[(r["pass"], r["dtype"], r["model"], r["provider"])] += float(r["median_s"]) * int(r["count"]) * 1e3
    providers = [p for p in PROVIDERS if any(k[-1] == p for k in pct)]
    devices = sorted({r["device"] for r in rows})
    sources = sorted({(r["pass"], r["source"] + (f", commit {r['git_commit'][:12]}" if r.get("git_commit") else ""))
                      for r in rows})
    out = [f"Measured on {', '.join(devices)}; from " + "; ".join(f"`{s}` ({p})" for p, s in sources) + ". "
           "Median % of the H100 roofline per layer class (conv + BN + ReLU; wall-clock medians, host time "
           "included); higher is better.", "",
           "| pass | dtype | class | " + " | ".join(providers) + " |", "|---" * (3 + len(providers)) + "|"]
    for pas, dtype, cls in sorted({k[:3] for k in pct}):
        cells = [f"{statistics.median(pct[(pas, dtype, cls, p)]):.2f} %" if pct.get((pas, dtype, cls, p)) else "-"
                 for p in providers]
        out.append(f"| {pas} | {dtype} | {cls} | " + " | ".join(cells) + " |")
    out += ["", "Sum over a network's conv-BN-ReLU layers (ms, each layer times its count):", "",
            "| pass | dtype | model | " + " | ".join(providers) + " |", "|---" * (3 + len(providers)) + "|"]
    for pas, dtype, model in sorted({k[:3] for k in total}):
        cells = [f"{total[(pas, dtype, model, p)]:.2f}" if (pas, dtype, model, p) in total else "-" for p in providers]
        out.append(f"| {pas} | {dtype} | {model} | " + " | ".join(cells) + " |")
    out += _kernel_tables(rows)
    return "\n".join(out)


def _kernel_tables(rows: list[dict]) -> list[str]:
    """The same two tables by the kernels' device time alone (rows with `kernel_s`: bench_layers.py since
    2026-11-23; the torch profiler's kernels, memsets and copies of one call), host time left out; empty if none."""
    rows = [r for r in rows if r.get("kernel_s")]
    if not rows:
        return []
    pct, total, launches = defaultdict(list), defaultdict(float), defaultdict(list)
    for r in rows:
        key = (r["pass"], r["dtype"], layer_class(r["group"]), r["provider"])
        pct[key].append(float(r["pct_of_h100_roofline_kernel"]))
        launches[key].append(int(float(r["kernels"])))
        total[(r["pass"], r["dtype"], r["model"], r["provider"])] += float(r["kernel_s"]) * int(r["count"]) * 1e3
    providers = [p for p in PROVIDERS if any(k[-1] == p for k in pct)]
    out = ["", "By the kernels' device time alone (torch profiler: the kernels, memsets and copies of one call; host "
           "time left out): median % of the H100 roofline per layer class, and in brackets the median number of "
           "device activities per call:", "",
           "| pass | dtype | class | " + " | ".join(providers) + " |", "|---" * (3 + len(providers)) + "|"]
    for pas, dtype, cls in sorted({k[:3] for k in pct}):
        cells = [f"{statistics.median(pct[k]):.1f} % ({statistics.median(launches[k]):g})" if pct.get(k) else "-"
                 for k in ((pas, dtype, cls, p) for p in providers)]
        out.append(f"| {pas} | {dtype} | {cls} | " + " | ".join(cells) + " |")
    out += ["", "Sum of the kernels' device time over a network's conv-BN-ReLU layers (ms, each layer times its "
            "count):", "", "| pass | dtype | model | " + " | ".join(providers) + " |",
            "|---" * (3 + len(providers)) + "|"]
    for pas, dtype, model in sorted({k[:3] for k in total}):
        cells = [f"{total[(pas, dtype, model, p)]:.2f}" if (pas, dtype, model, p) in total else "-" for p in providers]
        out.append(f"| {pas} | {dtype} | {model} | " + " | ".join(cells) + " |")
    return out


def update_readme(table: str, readme: Path = README) -> None:
    """The tables between the README's layers markers (bench/report.py's writer)."""
    spec = importlib.util.spec_from_file_location("bench_report", Path(__file__).with_name("report.py"))
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    report.update_readme(table, readme, START, END)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", nargs="+", type=Path, help="layers_*.csv files written by bench_layers.py")
    parser.add_argument("--update-readme", action="store_true", help="write the tables into README.md")
    args = parser.parse_args(argv)
    table = render(args.csv)
    print(table)
    devices = {r["device"] for p in args.csv for r in csv.DictReader(p.open())}
    if args.update_readme and any(d.lower().startswith("cpu") for d in devices):
        print("refusing to put CPU timings in the README: they say nothing about the GPU kernels", file=sys.stderr)
        return 2
    if args.update_readme:
        update_readme(table)
        print(f"updated {README}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
