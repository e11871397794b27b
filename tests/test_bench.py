"""The benchmark scripts keep running: throughput.py --smoke end to end, plot.py on its CSV, the CLI's errors,
and one tiny case of bench_layers.py. No timing is asserted."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
METADATA = ("model", "provider", "mode", "dtype", "status", "batch", "steps", "median_ms", "p20_ms", "p80_ms",
            "s_per_epoch", "s_per_epoch_extrapolated", "images_per_s", "peak_memory_mb", "device",
            "torch_version", "triton_version", "cuda_version", "git_commit", "timestamp")


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _env():
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # as a user runs it: no interpreter
    return env


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("smoke")
    proc = subprocess.run([sys.executable, str(BENCH / "throughput.py"), "--smoke", "--out", str(out)],
                          capture_output=True, text=True, timeout=900, env=_env(), cwd=REPO)
    return proc, out


def test_smoke_runs_end_to_end_and_writes_rows(smoke_run):
    proc, out = smoke_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "No CUDA GPU" in proc.stdout or "GPU:" in proc.stdout
    (csv_path,) = out.glob("throughput_smoke_*.csv")
    (json_path,) = out.glob("throughput_smoke_*.json")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert set(METADATA) <= set(rows[0])
    assert {r["status"] for r in rows} <= {"ok", "skipped"}
    ok = {(r["model"], r["provider"], r["mode"]) for r in rows if r["status"] == "ok"}
    models = ("single", "pe-2-4-1", "pe-2-4-2", "de", "mimo", "batchensemble")
    assert {(m, p, mode) for m in models for p in ("eager", "pe-auto") for mode in ("train", "infer")} <= ok
    for r in rows:
        assert r["device"] and r["torch_version"] and r["git_commit"] and r["timestamp"]
        if r["status"] == "skipped":
            assert r["reason"]
        elif r["mode"] == "train":
            assert float(r["s_per_epoch"]) > 0 and r["s_per_epoch_extrapolated"] == "True"
        else:
            assert float(r["images_per_s"]) > 0
    data = json.loads(json_path.read_text())
    assert len(data["rows"]) == len(rows) and data["environment"]["timestamp"]


def test_plot_writes_a_png_from_the_smoke_csv(smoke_run, tmp_path):
    _, out = smoke_run
    (csv_path,) = out.glob("throughput_smoke_*.csv")
    png = tmp_path / "ratios.png"
    proc = subprocess.run([sys.executable, str(BENCH / "plot.py"), str(csv_path), "--out", str(png)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_renders_the_readme_table(smoke_run, tmp_path):
    """report.py turns a run into the README table between markers; CPU runs never reach the README."""
    _, out = smoke_run
    (csv_path,) = out.glob("throughput_smoke_*.csv")
    report = _load("report")
    with csv_path.open(newline="") as fh:
        rows = list(csv.DictReader(fh))
    table = report.markdown_table(rows)
    ok = [r for r in rows if r["status"] == "ok"]
    assert table.count("\n| ") == len(ok) + 1          # header + one line per measured row
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{report.START}\nold\n{report.END}\noutro\n")
    report.update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text and table in text and text.startswith("intro") and text.endswith("outro\n")
    assert report.main([str(csv_path), "--update-readme"]) == 2     # CPU timings refused


def test_plot_without_single_is_a_clear_error(tmp_path, capsys):
    plot = _load("plot")
    csv_path = tmp_path / "run.csv"
    csv_path.write_text("model,provider,mode,dtype,status,ratio_to_single,ratio_to_single_eager,"
                        "paper_ratio_to_single\npe-2-4-1,eager,train,fp32,ok,,,4.8\n")
    with pytest.raises(SystemExit) as exc:
        plot.main([str(csv_path), "--out", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    assert "single" in capsys.readouterr().err


@pytest.mark.parametrize("argv,message", [
    (["--model", "resnet18"], "invalid choice"),
    (["--provider", "cudnn"], "invalid choice"),
    (["--mode", "fit"], "invalid choice"),
    (["--batch-size", "0"], "positive integer"),
    (["--steps", "many"], "positive integer"),
    (["--warmup", "-1"], "integer >= 0"),
])
def test_bad_arguments_are_clear_errors(argv, message, capsys):
    throughput = _load("throughput")
    with pytest.raises(SystemExit) as exc:
        throughput.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_cpu_defaults_and_ratios():
    throughput = _load("throughput")
    parser = throughput.build_parser()
    cfg = throughput.make_config(parser.parse_args(["--device", "cpu"]), parser)
    assert cfg.models == ["pe-2-4-1"] and cfg.dtypes == ["fp32"] and cfg.providers == ["eager", "pe-auto"]
    assert cfg.batch_size <= 16 and cfg.steps <= 2
    row = throughput.Row("pe-2-4-1", "eager", "train", "fp32", "skipped", "why")
    throughput.add_ratios([row])
    assert row.paper_value == 179.50
    assert row.paper_ratio_to_single == pytest.approx(179.50 / 37.06)
    infer = throughput.Row("de", "eager", "infer", "fp16", "skipped", "why")
    throughput.add_ratios([infer])
    assert infer.paper_ratio_to_single == pytest.approx(5718 / 1609)


def test_bench_layers_collects_and_runs_one_case():
    node = f"{BENCH / 'bench_layers.py'}::test_conv_bn_relu[single-conv1-3to64-k3s1g1-h32-x1-fwd-fp32-eager]"
    proc = subprocess.run([sys.executable, "-m", "pytest", node, "-q", "-p", "no:cacheprovider",
                           "--benchmark-disable"], capture_output=True, text=True, timeout=300, env=_env(), cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "1 passed" in proc.stdout
