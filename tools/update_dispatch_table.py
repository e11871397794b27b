"""Fill pe_kernels/dispatch_table.json from committed GPU results — the only way `auto` learns a fast path.

    python tools/update_dispatch_table.py --layers bench/results/layers_cuda_<stamp>.json \
        --tests bench/results/gpu_lab/gpu.xml --arch sm_90 [--write]

--layers takes bench/bench_layers.py's pytest-benchmark JSON or the CSV it appends case by case
($PE_BENCH_LAYERS_CSV, kept when a time limit stops the run); several files may be given.

A backend (triton, cuda) is listed for an op, dtype and architecture only when both hold:
* correct: the GPU test run (junit XML from tools/gpu_lab.sh) has no failure or error in that backend's tests
  (tests/test_triton_*.py for triton, tests/test_cuda_*.py for cuda) and ran at least one of them;
* faster: over every layer shape of the layer benchmark, the count-weighted sum of its median times is below the
  stock PyTorch one (the faster of eager and eager-channels-last), for that pass and dtype. The producer's
  passes (its `pass` field) prove these ops: `fwd` (eval forward, BN folded into the conv) -> conv_fused;
  `fwdbwd` (training forward with batch statistics + backward) -> conv_fused_backward, bn_apply (the training
  BN apply pass) and bn_apply_backward.
Without --write it prints the entries it would write.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TABLE = REPO / "pe_kernels" / "dispatch_table.json"
BACKEND_TESTS = {"triton": "test_triton_", "cuda": "test_cuda_"}
PASS_OPS = {"fwd": ("conv_fused",), "fwdbwd": ("conv_fused_backward", "bn_apply", "bn_apply_backward")}
STOCK = ("eager", "eager-channels-last")
TORCH_DTYPE_NAMES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}  # what dispatch looks up


def backends_passing(junit: Path) -> set[str]:
    """Backends whose GPU tests all passed (and that ran at least one test) in a junit XML file."""
    ran, failed = defaultdict(int), set()
    for case in ET.parse(junit).getroot().iter("testcase"):
        for backend, prefix in BACKEND_TESTS.items():
            if prefix in (case.get("classname", "") + case.get("file", "")):
                if case.find("skipped") is not None:
                    continue
                ran[backend] += 1
                if case.find("failure") is not None or case.find("error") is not None:
                    failed.add(backend)
    return {b for b in ran if b not in failed}


def layer_records(path: Path) -> list[dict]:
    """bench_layers.py's cases as dicts {group, pass, dtype, provider, device, count, median_s}, from its
    pytest-benchmark JSON (extra_info + stats) or from the CSV it appends case by case."""
    if path.suffix == ".csv":
        with path.open(newline="") as fh:
            return [dict(r, count=int(r["count"] or 1), median_s=float(r["median_s"])) for r in csv.DictReader(fh)]
    records = []
    for bench in json.loads(path.read_text())["benchmarks"]:
        info = bench.get("extra_info", {})
        records.append(dict(info, group=bench["group"], count=info.get("count", 1),
                            median_s=bench["stats"]["median"]))
    return records


def weighted_times(*layer_files: Path) -> dict[tuple[str, str, str], dict[str, float]]:
    """{(pass, dtype, provider): {layer group: count * median seconds}} of the GPU cases in the given files."""
    out: dict[tuple[str, str, str], dict[str, float]] = defaultdict(dict)
    for path in layer_files:
        for rec in layer_records(path):
            if rec.get("device", "cpu") == "cpu" or not rec.get("provider"):
                continue
            pass_ = rec.get("pass")
            if pass_ not in PASS_OPS:
                raise ValueError(f"{path}: case {rec['group']!r} has pass {pass_!r}; expected one of "
                                 f"{sorted(PASS_OPS)} (bench/bench_layers.py's PASSES)")
            out[(pass_, rec["dtype"], rec["provider"])][rec["group"]] = rec["count"] * rec["median_s"]
    return out


def entries(times, passing: set[str], arch: str, evidence: str) -> list[dict]:
    result = []
    for (pass_, dtype, provider), per_layer in sorted(times.items()):
        backend = provider[3:] if provider in ("pe-triton", "pe-cuda") else None
        if backend is None or backend not in passing:
            continue
        stock = [times.get((pass_, dtype, s), {}) for s in STOCK]
        stock = [s for s in stock if set(per_layer) <= set(s)]
        if not stock:
            continue
        ours = sum(per_layer.values())
        best_stock = min(sum(s[g] for g in per_layer) for s in stock)
        if ours < best_stock:
            for op in PASS_OPS[pass_]:
                result.append({"op": op, "backend": backend, "arch": arch,
                               "dtypes": [TORCH_DTYPE_NAMES.get(dtype, dtype)],
                               "speedup": round(best_stock / ours, 3), "evidence": evidence})
    return result


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=Path, nargs="+", required=True,
                        help="bench/bench_layers.py results: its pytest-benchmark JSON and/or its per-case CSV")
    parser.add_argument("--tests", type=Path, required=True, help="junit XML of the GPU test run")
    parser.add_argument("--arch", required=True, help="e.g. sm_90 (H100, H200)")
    parser.add_argument("--write", action="store_true", help=f"write {TABLE.relative_to(REPO)}")
    args = parser.parse_args(argv)
    passing = backends_passing(args.tests)
    evidence = " + ".join(p.name for p in (*args.layers, args.tests))
    found = entries(weighted_times(*args.layers), passing, args.arch, evidence)
    print(f"backends whose GPU tests passed: {sorted(passing) or 'none'}; entries: {len(found)}")
    print(json.dumps(found, indent=1))
    if args.write:
        table = json.loads(TABLE.read_text())
        kept = [e for e in table.get("entries", []) if e.get("arch") != args.arch]
        table["entries"] = kept + found
        TABLE.write_text(json.dumps(table, indent=1) + "\n")
        print(f"wrote {TABLE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
