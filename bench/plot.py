"""Plot a throughput run: each model's time relative to Single ResNet-50, ours per provider beside the paper's.

    python bench/plot.py                                   # the newest bench/results/throughput_*.csv
    python bench/plot.py RUN.csv [MORE.csv] --out fig.png --baseline eager|same

One panel per (mode, dtype). Bars: the paper's ratio (Table 8, RTX 3090, eager cuDNN) and, per provider, ours:
s/epoch (train) or 1 / images/s (infer) divided by Single's — with the eager provider (--baseline eager, the
paper's baseline) or with the same provider (--baseline same). Lower is better; the line at 1 is Single.
Ratios travel across hardware, absolute numbers do not.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
import report  # noqa: E402  (bench/report.py)

RESULTS = REPO / "bench" / "results"
MODEL_ORDER = ("single", "pe-2-4-1", "pe-2-4-2", "de", "mimo", "batchensemble")
RATIO_COLUMN = {"eager": "ratio_to_single_eager", "same": "ratio_to_single"}


def _float(text: str) -> Optional[float]:
    return float(text) if text not in ("", None) else None


def read_rows(paths: list[Path]) -> list[dict]:
    """The ok rows of the CSVs, ratios to Single filled across files and stages (report.fill_ratios)."""
    return [r for r in report.read_rows(paths) if r.get("status") == "ok"]


def plot(rows: list[dict], out: Path, baseline: str = "eager") -> Path:
    """Write the PNG; raises ValueError when the rows hold no ratio to plot."""
    column = RATIO_COLUMN[baseline]
    panels = sorted({(r["mode"], r["dtype"]) for r in rows if _float(r[column]) is not None})
    if not panels:
        raise ValueError(f"no row has {column}: the run must measure 'single' (with the eager provider for "
                         "--baseline eager) beside the other models")
    providers = sorted({r["provider"] for r in rows})
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(6.0 * ncols, 4.2 * nrows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax, (mode, dtype) in zip(axes.flat, panels):
        cell = [r for r in rows if r["mode"] == mode and r["dtype"] == dtype]
        models = [m for m in MODEL_ORDER if any(r["model"] == m for r in cell)]
        series = {"paper (RTX 3090)": {r["model"]: _float(r["paper_ratio_to_single"]) for r in cell}}
        for p in providers:
            values = {r["model"]: _float(r[column]) for r in cell if r["provider"] == p}
            if any(v is not None for v in values.values()):
                series[p] = values
        width = 0.8 / len(series)
        for i, (name, values) in enumerate(series.items()):
            xs = [j + (i - (len(series) - 1) / 2) * width for j in range(len(models))]
            ys = [values.get(m) or 0.0 for m in models]
            ax.bar(xs, ys, width, label=name, color="0.6" if name.startswith("paper") else None)
        ax.axhline(1.0, color="k", linewidth=0.8)
        ax.set_xticks(range(len(models)), models, rotation=30, ha="right")
        ax.set_title(f"{mode}, {dtype}")
        ax.set_ylabel("time / Single's time")
        ax.legend(fontsize=7)
    device = rows[0].get("device", "")
    fig.suptitle(f"Table 8 replay, relative to Single ({baseline} baseline) — {device}", fontsize=9)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("csv", nargs="*", type=Path, help="throughput CSV file(s) (default: the newest in "
                                                          "bench/results)")
    parser.add_argument("--out", type=Path, default=None, help="PNG path (default: beside the first CSV)")
    parser.add_argument("--baseline", choices=tuple(RATIO_COLUMN), default="eager")
    args = parser.parse_args(argv)
    paths = args.csv
    if not paths:
        found = sorted(RESULTS.glob("throughput_*.csv"), key=lambda p: p.stat().st_mtime)
        if not found:
            parser.error(f"no CSV given and none found in {RESULTS}")
        paths = [found[-1]]
    for path in paths:
        if not path.is_file():
            parser.error(f"no such CSV: {path}")
    try:
        out = plot(read_rows(paths), args.out or paths[0].with_suffix(".png"), args.baseline)
    except ValueError as exc:
        parser.error(str(exc))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
