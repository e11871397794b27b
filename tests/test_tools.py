"""The GPU-results tooling: the dispatch-table writer on the layer benchmark's real output (produced here by
running bench/bench_layers.py on CPU), and tools/gpu_lab.sh's stage plan, failure handling and file budget
(with stand-in commands: no GPU needed). Rules and plumbing only, never a timing."""

import csv
import importlib.util
import json
import os
import shlex
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAB = REPO / "tools" / "gpu_lab.sh"
STAND_IN_GPU = "stand-in GPU (CPU run relabelled)"


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    return module


def _tool():
    return _load(REPO / "tools" / "update_dispatch_table.py", "update_dispatch_table")


def _junit(path, cases):
    body = "".join(f'<testcase classname="tests.{cls}" name="t{i}">{inner}</testcase>'
                   for i, (cls, inner) in enumerate(cases))
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


# ------------------------------------------------------------------ the producer's real output

@pytest.fixture(scope="module")
def producer_run(tmp_path_factory):
    """bench_layers.py run for real on CPU: one layer, fwd and fwdbwd, eager and pe-auto, fp32 — its
    pytest-benchmark JSON and the CSV it appends case by case."""
    out = tmp_path_factory.mktemp("layers")
    env = dict(os.environ, PE_BENCH_LAYERS_CSV=str(out / "layers.csv"))
    env.pop("TRITON_INTERPRET", None)
    for name in [n for n in env if n.startswith("PYTEST_XDIST")]:   # (this suite run by pytest-xdist)
        env.pop(name)
    # no xdist in the producer's run: pytest-benchmark disables itself where that plugin is active (an empty JSON)
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", str(REPO / "bench" / "bench_layers.py"), "-q", "-p", "no:cacheprovider",
         "-p", "no:xdist",
         "-k", "single-conv1- and fp32 and (eager or pe-auto) and not channels", "--benchmark-min-rounds=1",
         "--benchmark-max-time=0.001", "--benchmark-warmup=off", "--benchmark-json", str(out / "layers.json")],
        capture_output=True, text=True, timeout=600, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "4 passed" in proc.stdout
    return out / "layers.json", out / "layers.csv"


def _as_gpu_result(records, medians):
    """The producer's records as if timed on a GPU: pe-auto stands for pe-triton, medians injected per
    (pass, provider). Names, groups, pass labels and counts stay exactly as the producer wrote them."""
    out = []
    for rec in records:
        rec = dict(rec, device=STAND_IN_GPU,
                   provider="pe-triton" if rec["provider"] == "pe-auto" else rec["provider"])
        rec["median_s"] = medians[(rec["pass"], rec["provider"])]
        out.append(rec)
    return out


MEDIANS = {("fwd", "eager"): 2.0, ("fwd", "pe-triton"): 3.0,            # forward: slower than stock
           ("fwdbwd", "eager"): 3.0, ("fwdbwd", "pe-triton"): 2.0}      # training pass: 1.5x faster


def _write_json(path, json_path, medians):
    data = json.loads(json_path.read_text())
    for bench in data["benchmarks"]:
        info = bench["extra_info"]
        provider = "pe-triton" if info["provider"] == "pe-auto" else info["provider"]
        info.update(device=STAND_IN_GPU, provider=provider)
        bench["stats"]["median"] = medians[(info["pass"], provider)]
    path.write_text(json.dumps(data))
    return path


@pytest.mark.slow  # runs bench_layers.py once (module fixture, ~20 s)
def test_pass_names_are_the_producers(producer_run):
    tool, layers = _tool(), _load(REPO / "bench" / "bench_layers.py", "bench_layers_for_tools")
    assert set(tool.PASS_OPS) == set(layers.PASSES)
    json_path, _ = producer_run
    records = tool.layer_records(json_path)
    assert {r["pass"] for r in records} == set(layers.PASSES)
    assert {r["group"] for r in records} == {layers.benchmark_group(layers.LAYERS[0], p, "fp32")
                                             for p in layers.PASSES}


@pytest.mark.slow  # runs bench_layers.py once (module fixture, ~20 s)
@pytest.mark.parametrize("source", ["json", "csv"])
def test_backward_ops_listed_from_the_producers_output(producer_run, tmp_path, source):
    """Failed before the fix: the tool looked for '-bwd-' in names the producer writes as '-fwdbwd-', so the
    training pass was filed under fwd and no backward op could ever be listed."""
    tool = _tool()
    json_path, csv_path = producer_run
    if source == "json":
        layers = _write_json(tmp_path / "l.json", json_path, MEDIANS)
    else:
        layers = tmp_path / "l.csv"
        with csv_path.open(newline="") as fh:
            rows = _as_gpu_result(list(csv.DictReader(fh)), MEDIANS)
        with layers.open("w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    tests = _junit(tmp_path / "t.xml", [("test_triton_conv", ""), ("test_ops", "")])
    found = tool.entries(tool.weighted_times(layers), tool.backends_passing(tests), "sm_90", "evidence")
    assert {e["op"] for e in found} == {"conv_fused_backward", "bn_apply", "bn_apply_backward"}
    assert all(e["backend"] == "triton" and e["speedup"] == 1.5 and e["dtypes"] == ["float32"] for e in found)


@pytest.mark.slow  # runs bench_layers.py once (module fixture, ~20 s)
def test_cpu_timings_are_never_evidence(producer_run, tmp_path):
    tool = _tool()
    json_path, csv_path = producer_run
    assert tool.weighted_times(json_path, csv_path) == {}


@pytest.mark.slow  # runs bench_layers.py once (module fixture, ~20 s)
def test_only_correct_and_faster_backends_are_listed(producer_run, tmp_path):
    tool = _tool()
    json_path, _ = producer_run
    medians = {("fwd", "eager"): 2.0, ("fwd", "pe-triton"): 1.0, ("fwdbwd", "eager"): 1.0,
               ("fwdbwd", "pe-triton"): 3.0}
    layers = _write_json(tmp_path / "l.json", json_path, medians)
    tests = _junit(tmp_path / "t.xml", [("test_triton_conv", ""), ("test_cuda_ops", "<failure/>")])
    assert tool.backends_passing(tests) == {"triton"}
    found = tool.entries(tool.weighted_times(layers), tool.backends_passing(tests), "sm_90", "evidence")
    assert [(e["op"], e["backend"], e["speedup"]) for e in found] == [("conv_fused", "triton", 2.0)]
    failing = _junit(tmp_path / "f.xml", [("test_triton_conv", "<failure/>")])
    assert tool.entries(tool.weighted_times(layers), tool.backends_passing(failing), "sm_90", "e") == []


@pytest.mark.slow  # runs bench_layers.py once (module fixture, ~20 s)
def test_unknown_pass_is_a_clear_error(producer_run, tmp_path):
    tool = _tool()
    json_path, _ = producer_run
    data = json.loads(_write_json(tmp_path / "l.json", json_path, MEDIANS).read_text())
    data["benchmarks"][0]["extra_info"]["pass"] = "bwd"
    (tmp_path / "bad.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="pass 'bwd'"):
        tool.weighted_times(tmp_path / "bad.json")


def test_skipped_tests_do_not_count_as_proof(tmp_path):
    tool = _tool()
    tests = _junit(tmp_path / "t.xml", [("test_triton_conv", "<skipped/>")])
    assert tool.backends_passing(tests) == set()


# ------------------------------------------------------------------ tools/gpu_lab.sh

STAND_IN = """#!{python}
# Stand-in for python3 / compute-sanitizer: logs its arguments, creates the files it is asked to write.
import os, subprocess, sys
args = sys.argv[1:]
with open({calls!r}, "a") as fh:
    fh.write(os.path.basename(sys.argv[0]) + " " + " ".join(args) + "\\n")
if args[:1] == ["-c"] and "find_spec" in args[1]:              # a plugin check: ask the real interpreter
    sys.exit(subprocess.call([{python!r}, *args]))
if "pip" in args and {fail_pip!r}:
    print("error: nvcc died", file=sys.stderr)
    sys.exit(1)
targets = [a.split("=", 1)[1] for a in args if a.startswith("--junitxml=")]
targets += [args[i + 1] for i, a in enumerate(args[:-1]) if a in ("--out", "--csv", "--benchmark-json")]
targets += [os.environ["PE_BENCH_LAYERS_CSV"]] if "bench/bench_layers.py" in args else []
for path in targets:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    open(path, "a").close()
print("stand-in output")
"""


def _lab(tmp_path, *stages, fail_pip=False):
    """Run gpu_lab.sh with stand-in python3 and compute-sanitizer that log their arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    calls = tmp_path / "calls.log"
    for name in ("python3", "compute-sanitizer"):
        (bin_dir / name).write_text(STAND_IN.format(python=sys.executable, calls=str(calls), fail_pip=fail_pip))
        (bin_dir / name).chmod((bin_dir / name).stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    out.mkdir(exist_ok=True)
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", OUT=str(out),
               LAB_RESULTS=str(tmp_path / "results"), LAB_STATE=str(tmp_path / "state"))
    proc = subprocess.run(["bash", str(LAB), *stages], capture_output=True, text=True, timeout=120, env=env,
                          cwd=REPO)
    return proc, out, calls.read_text().splitlines() if calls.exists() else []


def test_lab_failed_build_stops_loudly(tmp_path):
    proc, _, calls = _lab(tmp_path, "build", "gpu", fail_pip=True)
    assert proc.returncode != 0
    assert "BUILD FAILED" in proc.stdout + proc.stderr
    assert not any("pytest" in c for c in calls)        # the next stage never ran


def test_lab_unknown_stage_runs_nothing(tmp_path):
    proc, _, calls = _lab(tmp_path, "build", "replay-everything")
    assert proc.returncode == 2 and "replay-everything" in proc.stderr and calls == []


def test_lab_every_stage_keeps_at_most_8_files_and_full_logs(tmp_path):
    stages = ["build", "warmup", "gpu", "suite", "memcheck", "racecheck", "replay1", "layers-fwd"]
    proc, out, calls = _lab(tmp_path, *stages)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = [p for p in out.rglob("*") if p.is_file()]
    assert 0 < len(files) <= 8, sorted(p.name for p in files)
    pytest_calls = [c for c in calls if "-m pytest" in c and "bench_layers" not in c]
    assert len(pytest_calls) == 2 and any("-m gpu" in c for c in pytest_calls)
    assert not any(" -x" in c for c in pytest_calls)    # one failure must not hide the rest
    timeout_plugin = importlib.util.find_spec("pytest_timeout") is not None
    assert all(("--timeout" in c) == timeout_plugin for c in pytest_calls)


def _replay_args(tmp_path):
    proc, _, calls = _lab(tmp_path, "plan")
    assert proc.returncode == 0, proc.stderr
    plan = {}
    for line in proc.stdout.splitlines():
        if line.startswith("replay") and ": " in line:
            stage, command = line.split(": ", 1)
            words = shlex.split(command)
            plan[stage] = words[words.index("bench/throughput.py") + 1:]
    return plan


def test_lab_replay_stages_cover_table8_first_stage_first(tmp_path):
    throughput = _load(REPO / "bench" / "throughput.py", "throughput_for_tools")
    parser = throughput.build_parser()
    plan = _replay_args(tmp_path)
    assert list(plan)[0] == "replay1" and len(plan) >= 4
    cells = {}
    for stage, argv in plan.items():
        args = parser.parse_args(argv)
        assert args.time_budget is not None and args.csv is not None, stage
        models = throughput.MODELS if "all" in args.model else args.model
        dtypes = throughput.DTYPES if args.dtype == "both" else [args.dtype]
        modes = throughput.MODES if args.mode == "both" else [args.mode]
        for cell in ((m, p, mode, d) for m in models for p in args.provider for mode in modes for d in dtypes):
            cells.setdefault(cell, stage)
    first = {c for c, stage in cells.items() if stage == "replay1"}
    assert first == {(m, p, mode, "fp16") for m in ("single", "pe-2-4-1")
                     for p in ("eager-channels-last", "compile", "pe-triton", "pe-cuda")
                     for mode in ("train", "infer")}
    everything = {(m, p, mode, d) for m in throughput.MODELS for p in throughput.PROVIDERS
                  for mode in throughput.MODES for d in throughput.DTYPES}
    assert set(cells) == everything


# ------------------------------------------------------------------ tools/autotune_models.py

def test_lab_autotune_stage_appends_the_csv(tmp_path):
    proc, out, calls = _lab(tmp_path, "autotune")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    call = next(c for c in calls if "tools/autotune_models.py" in c)
    assert "--csv" in call and call.split("--csv ")[1].startswith(str(tmp_path / "results" / "autotune_cuda_"))
    assert [p.name for p in out.iterdir() if p.name.startswith("autotune_cuda_")]


def test_autotune_models_rows_and_csv(tmp_path):
    tool = _load(REPO / "tools" / "autotune_models.py", "autotune_models_for_tools")
    from pe_kernels.tuning import AutotuneReport, Choice

    report = AutotuneReport("H100 (sm_90)", "cache.json", (
        Choice("conv_fused", "x(128, 64, 32, 32)", "float16", "triton", {"triton": 0.05, "torch": 0.08},
               {"cuda": "wrong results: max error 1.0 > 0.01"}),
        Choice("bn_apply", "x(128, 64, 32, 32)", "float16", "torch", {"torch": 0.02}, {})))
    env = dict(device="H100", torch_version="2.11", git_commit="abc")
    rows = tool.report_rows("pe-2-4-1", "infer", "fp16", report, env)
    assert [r["chosen"] for r in rows] == ["triton", "torch"]
    assert rows[0]["triton_ms"] == "0.05" and rows[0]["torch_ms"] == "0.08" and rows[1]["triton_ms"] == ""
    assert rows[0]["refused"] == "cuda: wrong results: max error 1.0 > 0.01" and rows[0]["device"] == "H100"
    path = tmp_path / "a" / "autotune.csv"
    tool.append_rows(path, rows[:1])
    tool.append_rows(path, rows[1:])  # appended: one header
    with path.open() as f:
        read = list(csv.DictReader(f))
    assert [r["op"] for r in read] == ["conv_fused", "bn_apply"] and read[0]["git_commit"] == "abc"


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="checks the message on a machine without CUDA")
def test_autotune_models_needs_cuda(tmp_path, capsys):
    tool = _load(REPO / "tools" / "autotune_models.py", "autotune_models_for_tools")
    assert tool.main(["--csv", str(tmp_path / "a.csv")]) == 2
    assert "needs a CUDA device" in capsys.readouterr().err and not (tmp_path / "a.csv").exists()
