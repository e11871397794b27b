"""Render a throughput run (bench/throughput.py's CSV) as the README's results table — never typed by hand.

    python bench/report.py RUN.csv                     # print the markdown table
    python bench/report.py RUN.csv --update-readme     # replace the table between the README's markers

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


def _fmt(text: str, digits: int = 2) -> str:
    return "–" if text in ("", None) else f"{float(text):.{digits}f}"


def markdown_table(rows: list[dict]) -> str:
    ok = [r for r in rows if r.get("status") == "ok"]
    if not ok:
        raise ValueError("the CSV holds no row with status ok")
    ok.sort(key=lambda r: (MODEL_ORDER.index(r["model"]) if r["model"] in MODEL_ORDER else 99, r["mode"],
                           r["dtype"], r["provider"]))
    first = ok[0]
    lines = [f"Measured on {first['device']} (torch {first['torch_version']}, triton {first['triton_version']}, "
             f"CUDA {first['cuda_version']}), commit `{first['git_commit'][:12]}`, {first['timestamp']}, "
             f"batch {first['batch']}. Train: s/epoch extrapolated from {first['steps']} timed steps. "
             "×Single: time relative to Single ResNet-50 with eager cuDNN in the same run (lower is better).", "",
             "| model | provider | mode | dtype | ours | ×Single | paper (RTX 3090) | paper ×Single |",
             "|---|---|---|---|---|---|---|---|"]
    for r in ok:
        ours = _fmt(r["s_per_epoch"]) + " s/epoch" if r["mode"] == "train" else _fmt(r["images_per_s"], 0) + " im/s"
        lines.append(f"| {r['model']} | {r['provider']} | {r['mode']} | {r['dtype']} | {ours} | "
                     f"{_fmt(r['ratio_to_single_eager'])} | {_fmt(r['paper_value'])} | "
                     f"{_fmt(r['paper_ratio_to_single'])} |")
    return "\n".join(lines)


def update_readme(table: str, readme: Path = README) -> None:
    text = readme.read_text()
    if START not in text or END not in text:
        raise ValueError(f"{readme} has no {START} ... {END} markers")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    readme.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv", type=Path, help="a throughput_*.csv written by bench/throughput.py")
    parser.add_argument("--update-readme", action="store_true", help="write the table into README.md")
    args = parser.parse_args(argv)
    with args.csv.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
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
