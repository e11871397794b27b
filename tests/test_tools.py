"""The GPU-results tooling (dispatch-table writer), on synthetic result files: its rules, not any figure."""

import importlib.util
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _load():
    spec = importlib.util.spec_from_file_location("update_dispatch_table", REPO / "tools" / "update_dispatch_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _junit(path, cases):
    body = "".join(f'<testcase classname="tests.{cls}" name="t{i}">{inner}</testcase>'
                   for i, (cls, inner) in enumerate(cases))
    path.write_text(f'<testsuites><testsuite name="pytest">{body}</testsuite></testsuites>')
    return path


def _layers(path, rows):
    benches = [{"group": f"{layer}-{pass_}-fp16", "stats": {"median": median},
                "extra_info": {"provider": provider, "dtype": "fp16", "count": count, "device": "GPU"}}
               for layer, pass_, provider, median, count in rows]
    path.write_text(json.dumps({"benchmarks": benches}))
    return path


def test_only_correct_and_faster_backends_are_listed(tmp_path):
    tool = _load()
    tests = _junit(tmp_path / "t.xml", [("test_triton_conv", ""), ("test_cuda_ops", "<failure/>"),
                                        ("test_ops", "")])
    assert tool.backends_passing(tests) == {"triton"}
    rows = []
    for layer, count in (("a", 3), ("b", 1)):
        rows += [(layer, "fwd", "eager", 2.0, count), (layer, "fwd", "eager-channels-last", 1.5, count),
                 (layer, "fwd", "pe-triton", 1.0, count), (layer, "fwd", "pe-cuda", 0.5, count),
                 (layer, "bwd", "eager", 1.0, count), (layer, "bwd", "pe-triton", 3.0, count)]
    found = tool.entries(tool.weighted_times(_layers(tmp_path / "l.json", rows)), tool.backends_passing(tests),
                         "sm_90", "evidence")
    assert {(e["op"], e["backend"]) for e in found} == {("conv_fused", "triton"), ("bn_apply", "triton")}
    assert all(e["speedup"] == 1.5 and e["dtypes"] == ["float16"] and e["arch"] == "sm_90" for e in found)


def test_skipped_tests_do_not_count_as_proof(tmp_path):
    tool = _load()
    tests = _junit(tmp_path / "t.xml", [("test_triton_conv", "<skipped/>")])
    assert tool.backends_passing(tests) == set()
