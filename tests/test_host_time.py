"""bench/host_time.py keeps running and its output keeps its shape. No timing is asserted: it is a benchmark."""

import csv
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "bench" / "host_time.py"
LAYERS = ("conv3x3", "conv1x1", "bottleneck")
MODES = ("eval", "train")
TIMES = ("pe_median_us", "pe_p20_us", "pe_p80_us", "stock_median_us", "stock_p20_us", "stock_p80_us")


def _load():
    spec = importlib.util.spec_from_file_location("bench_host_time", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def smoke_json():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it (conftest sets it on CPU for the kernel tests)
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json"], capture_output=True, text=True,
                          timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return json.loads(proc.stdout), proc.stderr  # --json alone: JSON on stdout, the table on stderr


def test_smoke_json_has_every_layer_and_mode_for_torch(smoke_json):
    doc, table = smoke_json
    env = doc["environment"]
    assert env["device"] and env["torch_version"] and env["triton_version"] and env["git_commit"]
    rows = doc["rows"]
    assert {(r["layer"], r["mode"]) for r in rows if r["backend"] == "torch"} == {(l, m) for l in LAYERS
                                                                                 for m in MODES}
    for r in rows:
        assert r["status"] == "ok", r
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in TIMES), r
        assert r["pe_p20_us"] <= r["pe_median_us"] <= r["pe_p80_us"]
        assert r["stock_p20_us"] <= r["stock_median_us"] <= r["stock_p80_us"]
        assert r["ratio"] == pytest.approx(r["pe_median_us"] / r["stock_median_us"])
        assert r["target"] == {"eval": 1.0, "train": 1.5}[r["mode"]]
        assert r["meets_target"] == (r["ratio"] <= r["target"])
        if r["backend"] == "triton-dry":                    # the triton launchers, every launch a no-op
            assert r["pe_path"] == "triton (launches no-op)" and r["max_abs_diff"] is None, r
        else:
            assert r["pe_path"] == r["backend"]              # the fused path ran, not the module fallback
            # pe and stock computed the same thing (on a GPU both convolve in TF32, in different orders)
            assert r["max_abs_diff"] < (1e-4 if env["device"].startswith("CPU") else 5e-2)
        assert r["device"] == env["device"] and r["git_commit"] == env["git_commit"] and r["smoke"]
    for s in doc["skipped"]:
        assert s["backend"] in ("triton", "cuda", "triton-dry") and s["reason"]
    assert table.count("\n| ") == len(rows) + 1              # header + one line per row


def test_triton_dry_rows_on_cpu(smoke_json):
    """On a CPU the default run also times the triton backend's own host cost (launches no-op) for every layer and
    mode: the kernel path's Python, which the torch rows (the stock path) do not show."""
    doc, _ = smoke_json
    if not doc["environment"]["device"].startswith("CPU"):
        pytest.skip("triton-dry runs on CPU tensors")
    skipped = {s["backend"]: s["reason"] for s in doc["skipped"]}
    if "triton-dry" in skipped:
        pytest.skip(f"triton-dry skipped here: {skipped['triton-dry']}")
    assert {(r["layer"], r["mode"]) for r in doc["rows"] if r["backend"] == "triton-dry"} == {
        (l, m) for l in LAYERS for m in MODES}


def test_csv_appends_rows_under_one_header(tmp_path):
    host_time = _load()
    path = tmp_path / "host.csv"
    argv = ["--device", "cpu", "--backend", "torch", "--layer", "conv1x1", "--warmup", "0", "--reps", "2",
            "--csv", str(path)]
    assert host_time.main([*argv, "--mode", "eval"]) == 0
    assert host_time.main([*argv, "--mode", "train"]) == 0
    with path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert [(r["layer"], r["mode"], r["backend"]) for r in rows] == [("conv1x1", "eval", "torch"),
                                                                      ("conv1x1", "train", "torch")]
    assert all(float(r["ratio"]) == pytest.approx(float(r["pe_median_us"]) / float(r["stock_median_us"]))
               for r in rows)


def test_triton_on_cpu_is_skipped_with_a_reason(monkeypatch):
    host_time = _load()
    import torch
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    for backend in ("triton", "cuda"):
        assert host_time.skip_reason(backend, torch.device("cpu"))
    assert host_time.skip_reason("torch", torch.device("cpu")) is None


@pytest.mark.parametrize("argv,message", [
    (["--reps", "0"], "positive integer"),
    (["--warmup", "-1"], "integer >= 0"),
    (["--layer", "resnet"], "invalid choice"),
    (["--mode", "fit"], "invalid choice"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    host_time = _load()
    with pytest.raises(SystemExit) as exc:
        host_time.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err
