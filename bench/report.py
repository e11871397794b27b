"""Render a throughput run (bench/throughput.py's CSV) as the README's results table — never typed by hand.

    python bench/report.py RUN.csv [MORE.csv]          # print the markdown table
    python bench/report.py RUN.csv --update-readme     # replace the table between the README's markers

Several CSVs (or one CSV that several tools/gpu_lab.sh replay stages appended to) are read as one run: a row
whose ratio to Single is empty because Single was measured in another stage gets it here, from the Single row
of the same device, mode, dtype (and provider).

Rows: model x provider x mode x dtype with our figure (s/epoch extrapolated, or images/s), our ratio to Single
with the eager provider (lower is better), and the paper's figure and ratio (Table 8, RTX 3090). The caption names
the device, versions and commit that the CSV records.
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- results:start -->", "<!-- results:end -->"
MODEL_ORDER = ("single", "pe-2-4-1", "pe-2-4-2", "de", "mimo", "batchensemble")


def _cost(row: dict) -> float | None:
    """A figure proportional to time: s/epoch (train) or 1 / images/s (infer)."""
    value = row.get("s_per_epoch") if row["mode"] == "train" else row.get("images_per_s")
    if row.get("status") != "ok" or value in ("", None):
        return None
    return float(value) if row["mode"] == "train" else 1.0 / float(value)


def eager_baseline(rows: list[dict]) -> str:
    """The provider Single's eager cuDNN time is read from: `eager` (NCHW) if the run has it, else channels_last."""
    providers = {r["provider"] for r in rows if r["model"] == "single" and _cost(r)}
    return "eager" if "eager" in providers or "eager-channels-last" not in providers else "eager-channels-last"


def fill_ratios(rows: list[dict]) -> list[dict]:
    """Fill empty ratio_to_single (same provider) and ratio_to_single_eager from the rows' own Single rows."""
    single = {(r.get("device"), r["provider"], r["mode"], r["dtype"]): _cost(r)
              for r in rows if r["model"] == "single" and _cost(r)}
    eager = eager_baseline(rows)
    for r in rows:
        cost = _cost(r)
        if cost is None:
            continue
        for column, provider in (("ratio_to_single", r["provider"]), ("ratio_to_single_eager", eager)):
            ref = single.get((r.get("device"), provider, r["mode"], r["dtype"]))
            if r.get(column) in ("", None) and ref:
                r[column] = repr(cost / ref)
    return rows


def read_rows(paths: list[Path]) -> list[dict]:
    rows = []
    for path in paths:
        with path.open(newline="") as fh:
            rows.extend(csv.DictReader(fh))
    return fill_ratios(rows)


def _fmt(text: str, digits: int = 2) -> str:
    return "–" if text in ("", None) else f"{float(text):.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ValueError("the CSV holds no row with status ok")
    ok.sort(key=lambda r: (MODEL_ORDER.index(r["model"]) if r["model"] in MODEL_ORDER else 99, r["mode"],
                           r["dtype"], r["provider"]))
    first = ok[0]
    train_steps = sorted({r["steps"] for r in ok if r["mode"] == "train"})
    lines = [f"Measured on {first['device']} (torch {first['torch_version']}, triton {first['triton_version']}, "
             f"CUDA {first['cuda_version']}), commit `{first['git_commit'][:12]}{'-dirty' if first['git_commit'].endswith('-dirty') else ''}`, {first['timestamp']}, "
             f"batch {first['batch']}. Train: s/epoch extrapolated from {'/'.join(train_steps) or '–'} timed steps. "
             "×Single: time relative to Single ResNet-50 in the same run (lower is better), with the same provider "
             f"(the paper's ratio) and with eager cuDNN (`{eager_baseline(rows)}`).", "",
             "| model | provider | mode | dtype | ours | ×Single same provider | ×Single eager | paper (RTX 3090) | "
             "paper ×Single |",
             "|---|---|---|---|---|---|---|---|---|"]
    notes = sorted({r["reason"] for r in ok if r.get("reason")})
    for r in ok:
        ours = _fmt(r["s_per_epoch"]) + " s/epoch" if r["mode"] == "train" else _fmt(r["images_per_s"], 0) + " im/s"
        lines.append(f"| {r['model']} | {r['provider']} | {r['mode']} | {r['dtype']} | {ours} | "
                     f"{_fmt(r['ratio_to_single'])} | {_fmt(r['ratio_to_single_eager'])} | {_fmt(r['paper_value'])} | "
                     f"{_fmt(r['paper_ratio_to_single'])} |")
    lines += [""] + [f"Note: {n}" for n in notes] if notes else []
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README, start: str = START, end: str = END) -> None:
    """Replace what stands between the `start` and `end` markers of `readme` with `table`."""
    text = readme.read_text()
    if start not in text or end not in text:
        raise ValueError(f"{readme} has no {start} ... {end} markers")
    head, rest = text.split(start, 1)
    _, tail = rest.split(end, 1)
    readme.write_text(f"{head}{start}\n{table}\n{end}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, nargs="+", help="throughput_*.csv file(s) written by bench/throughput.py")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    rows = read_rows(args.csv)
    if any(r.get("device", "").startswith("CPU") for r in rows) and args.update_readme:
        print("refusing to put CPU timings in the README: they say nothing about the GPU kernels", file=sys.stderr)
        return 2
    table = markdown_table(rows)
    if args.update_readme:
        update_readme(table)
        print(f"updated {README}")
    else:
        print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
