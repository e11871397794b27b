"""The README's two commands are the ones CI and users run."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands():
    text = (ROOT / "README.md").read_text()
    return re.findall(r"```bash\n(.+?)\n```", text)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    ci_command = re.search(r"TEST_COMMAND='(.+)'", ci).group(1)
    assert ci_command in _readme_commands()


def test_readme_main_job_command():
    commands = _readme_commands()
    main = [c for c in commands if "bench/throughput.py --model pe-2-4-1" in c]
    assert main, "README must show the set-up + main job command"
    for command in commands[:2]:
        assert command.startswith("pip install torch==2.13.0 && ")   # never a bare torch: no CUDA wheels on CPU


def test_readme_usage_example_runs():
    (code,) = re.findall(r"```python\n(.+?)\n```", (ROOT / "README.md").read_text(), re.S)
    scope = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["out"].shape == (4 * 8, 100)
