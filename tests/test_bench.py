"""The benchmark scripts keep running: throughput.py --smoke end to end, plot.py on its CSV, the CLI's errors,
and one tiny case of bench_layers.py. No timing is asserted."""

import csv
import importlib.util
import json
import os
import subprocess
import sys
import time
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


# ------------------------------------------------------------------ what a user sees (issue 9, item 8)

def _tiny(tmp_path, *argv):
    """argv for one quick CPU cell: a Single ResNet-50 at batch 1, 8x8, no warm-up."""
    return ["--device", "cpu", "--model", "single", "--batch-size", "1", "--image-size", "8", "--warmup", "0",
            "--steps", "1", "--infer-images", "1", "--csv", str(tmp_path / "run.csv"), *argv]


def _csv_rows(path):
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


def test_cpu_fp16_request_says_bf16_everywhere(tmp_path, capsys):
    throughput = _load("throughput")
    assert throughput.main(_tiny(tmp_path, "--mode", "infer", "--dtype", "fp16", "--provider", "eager")) == 0
    out = capsys.readouterr()
    (row,) = _csv_rows(tmp_path / "run.csv")
    assert row["status"] == "ok" and row["dtype"] == "bf16" and "bf16" in row["reason"]
    cell_lines = [line for line in (out.out + out.err).splitlines() if "single eager infer" in line]
    assert cell_lines and all("bf16" in line and "fp16" not in line for line in cell_lines)
    assert "bf16 autocast runs" in out.out


@pytest.mark.parametrize("mode,absent", [("infer", "training"), ("train", "inference")])
def test_announce_counts_only_the_modes_that_run(mode, absent, tmp_path, capsys):
    throughput = _load("throughput")
    parser = throughput.build_parser()
    cfg = throughput.make_config(parser.parse_args(["--device", "cpu", "--mode", mode]), parser)
    throughput.announce(cfg, {name: None for name in cfg.providers})
    out = capsys.readouterr().out
    assert "times the reference path on the CPU" in out
    assert absent not in out


def test_skipped_provider_says_so_and_prints_no_empty_table(tmp_path, capsys):
    throughput = _load("throughput")
    assert throughput.main(_tiny(tmp_path, "--provider", "pe-cuda")) == 0
    out = capsys.readouterr().out
    before_run = out.split("rows are appended")[0]
    assert "skipping pe-cuda:" in before_run                      # said before any minute is spent
    assert "Nothing was measured" in out and "skipped pe-cuda (2 cells):" in out
    assert "xSingle" not in out and "eager" not in out             # no table header naming other providers
    rows = _csv_rows(tmp_path / "run.csv")
    assert len(rows) == 2 and all(r["status"] == "skipped" and r["reason"] for r in rows)


def test_interpreter_run_is_announced_as_slow(monkeypatch, capsys):
    throughput = _load("throughput")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    parser = throughput.build_parser()
    cfg = throughput.make_config(parser.parse_args(["--device", "cpu", "--provider", "pe-triton"]), parser)
    throughput.announce(cfg, {"pe-triton": None})
    out = capsys.readouterr().out
    assert "Triton interpreter" in out and "slow" in out and "progress line" in out


def test_progress_speaks_during_a_slow_step(capsys):
    throughput = _load("throughput")
    progress = throughput.Progress("cell", 2, every=0.05)
    time.sleep(0.5)                    # one step that takes long (a compile, the interpreter)
    progress.update(1)
    progress.update(2)
    progress.close()
    err = capsys.readouterr().err
    assert "cell: step 1/2 running for" in err
    assert "cell: 1/2 steps" in err    # a finished slow step is reported too


def _fake_measure(throughput, seen, stop_after=None, sleep=0.0):
    """measure() without a model: records what the CSV holds when each cell starts."""
    def measure(entry, base, provider, mode, dtype, cfg, label):
        seen.append(len(_csv_rows(cfg.csv)))
        if stop_after is not None and len(seen) > stop_after:
            raise KeyboardInterrupt("time limit")
        time.sleep(sleep)
        label_dtype = throughput.amp_dtype(dtype, cfg.device)[1]
        value = 2.0 if entry.name == "single" else 5.0
        return throughput.Row(entry.name, provider.name, mode, label_dtype, "ok", batch=1, steps=1,
                              s_per_epoch=value if mode == "train" else None,
                              images_per_s=1 / value if mode == "infer" else None, warmup_s=0.0)
    return measure


def test_rows_are_appended_as_cells_finish_and_survive_an_interrupt(tmp_path, monkeypatch):
    throughput = _load("throughput")
    seen = []
    monkeypatch.setattr(throughput, "measure", _fake_measure(throughput, seen, stop_after=2))
    argv = ["--device", "cpu", "--model", "single", "--provider", "eager", "--dtype", "both",
            "--csv", str(tmp_path / "run.csv")]
    assert throughput.main(argv) == 130            # stopped in its third of four cells
    assert seen == [0, 1, 2]                       # each cell found the previous rows already on disk
    rows = _csv_rows(tmp_path / "run.csv")
    assert [(r["mode"], r["dtype"]) for r in rows] == [("train", "fp32"), ("train", "bf16")]
    assert list(tmp_path.glob("run_*.json"))


def test_a_later_stage_takes_single_from_the_csv_it_appends_to(tmp_path, monkeypatch):
    throughput = _load("throughput")
    monkeypatch.setattr(throughput, "measure", _fake_measure(throughput, []))
    base = ["--device", "cpu", "--provider", "eager", "--csv", str(tmp_path / "run.csv")]
    assert throughput.main(base + ["--model", "single"]) == 0
    assert throughput.main(base + ["--model", "pe-2-4-1"]) == 0
    rows = {(r["model"], r["mode"]): r for r in _csv_rows(tmp_path / "run.csv")}
    assert len(rows) == 4
    assert float(rows[("pe-2-4-1", "train")]["ratio_to_single_eager"]) == pytest.approx(2.5)
    assert float(rows[("pe-2-4-1", "infer")]["ratio_to_single"]) == pytest.approx(2.5)


def test_time_budget_skips_cells_it_cannot_start(tmp_path, monkeypatch):
    throughput = _load("throughput")
    monkeypatch.setattr(throughput, "measure", _fake_measure(throughput, [], sleep=1.2))
    argv = ["--device", "cpu", "--model", "single", "--provider", "eager", "--time-budget", "1",
            "--csv", str(tmp_path / "run.csv")]
    assert throughput.main(argv) == 0
    rows = _csv_rows(tmp_path / "run.csv")
    assert [r["status"] for r in rows] == ["ok", "skipped"] and "--time-budget" in rows[1]["reason"]


def test_report_fills_ratios_across_stages(tmp_path, monkeypatch):
    throughput, report = _load("throughput"), _load("report")
    monkeypatch.setattr(throughput, "measure", _fake_measure(throughput, []))
    for model in ("single", "pe-2-4-1"):               # two stages, two files: no ratio in the second
        assert throughput.main(["--device", "cpu", "--provider", "eager", "--model", model, "--mode", "train",
                                "--csv", str(tmp_path / f"{model}.csv")]) == 0
    assert _csv_rows(tmp_path / "pe-2-4-1.csv")[0]["ratio_to_single_eager"] == ""
    rows = report.read_rows([tmp_path / "single.csv", tmp_path / "pe-2-4-1.csv"])
    pe = next(r for r in rows if r["model"] == "pe-2-4-1")
    assert float(pe["ratio_to_single_eager"]) == pytest.approx(2.5)


def test_smoke_and_cpu_results_are_git_ignored():
    if subprocess.run(["git", "-C", str(REPO), "rev-parse"], capture_output=True).returncode != 0:
        pytest.skip("not a git checkout")
    for name in ("throughput_smoke_20260101T000000Z.csv", "throughput_smoke_20260101T000000Z.json",
                 "throughput_cpu_20260101T000000Z.csv"):
        proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", f"bench/results/{name}"])
        assert proc.returncode == 0, f"bench/results/{name} is not git-ignored"
    proc = subprocess.run(["git", "-C", str(REPO), "check-ignore", "-q", "bench/results/throughput_cuda_x.csv"])
    assert proc.returncode == 1                          # GPU results are committed


def _write_csv(path, fields, rows):
    with path.open("w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(fields)
        writer.writerows(rows)
    return path


def test_layers_report_medians_per_class_and_readme_markers(tmp_path):
    """layers_report.py: % of roofline per layer class is the median over the class's rows; totals weight by count;
    the README gets the tables between its markers; CPU rows never reach the README."""
    layers_report = _load("layers_report")
    fields = ("group", "model", "layer", "count", "pass", "dtype", "provider", "device", "median_s",
              "pct_of_h100_roofline")
    rows = [("single-l.a-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "a", 2, "fwd", "fp16", "pe-triton", "GPU", 0.001, 1.0),
            ("single-l.b-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "b", 1, "fwd", "fp16", "pe-triton", "GPU", 0.002, 3.0),
            ("single-l.c-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "c", 1, "fwd", "fp16", "pe-triton", "GPU", 0.004, 8.0),
            ("single-l.d-8to8-k1s2g1-h4-x1-fwd-fp16", "single", "d", 3, "fwd", "fp16", "eager", "GPU", 0.001, 5.0)]
    path = _write_csv(tmp_path / "layers.csv", fields, rows)
    table = layers_report.render([path])
    assert "| fwd | fp16 | k3s1 | - | 3.00 % |" in table            # median of 1, 3, 8; eager has no k3s1 row
    assert "| fwd | fp16 | k1s2 | 5.00 % | - |" in table
    assert "| fwd | fp16 | single | 3.00 | 8.00 |" in table            # eager 3 x 1 ms; triton 2x1 + 2 + 4 ms
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{layers_report.START}\nold\n{layers_report.END}\noutro\n")
    layers_report.update_readme(table, readme)
    text = readme.read_text()
    assert "old" not in text and table in text and text.endswith("outro\n")
    cpu = tmp_path / "cpu.csv"
    cpu.write_text(path.read_text().replace(",GPU,", ",cpu,"))
    assert layers_report.main([str(cpu), "--update-readme"]) == 2
    with pytest.raises(ValueError, match="kernel size"):
        layers_report.layer_class("no-geometry-here")
    assert "device time" not in table                                 # no kernel_s column: no kernel tables


def test_layers_report_kernel_time_tables(tmp_path):
    """Rows with the kernels' device time (bench_layers.py's kernel_s, kernels, pct_of_h100_roofline_kernel) add
    the same two tables by device time: per class the median % and the median number of device activities; the
    totals weight kernel_s by count. Rows without it (older CSVs) are left out of those tables."""
    layers_report = _load("layers_report")
    fields = ("group", "model", "layer", "count", "pass", "dtype", "provider", "device", "median_s",
              "pct_of_h100_roofline", "kernel_s", "kernels", "pct_of_h100_roofline_kernel")
    rows = [("single-l.a-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "a", 2, "fwd", "fp16", "pe-triton", "GPU", 0.004,
             1.0, 0.001, 1, 40.0),
            ("single-l.b-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "b", 1, "fwd", "fp16", "pe-triton", "GPU", 0.004,
             1.0, 0.003, 3, 10.0),
            ("single-l.c-8to8-k3s1g1-h4-x1-fwd-fp16", "single", "c", 1, "fwd", "fp16", "eager", "GPU", 0.004,
             1.0, "", "", "")]
    table = layers_report.render([_write_csv(tmp_path / "layers.csv", fields, rows)])
    kernel_part = table[table.index("device time"):]
    assert "| fwd | fp16 | k3s1 | 25.0 % (2) |" in kernel_part          # median of 40 and 10 %, of 1 and 3 launches
    assert "| fwd | fp16 | single | 5.00 |" in kernel_part              # 2 x 1 ms + 3 ms; eager has no kernel time
    assert "| pass | dtype | class | pe-triton |" in kernel_part      # eager has no kernel time: no column
