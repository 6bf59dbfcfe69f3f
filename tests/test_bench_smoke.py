"""The README's main job and the benchmark scripts run end to end on the CPU at tiny sizes.

CI installs with the README's first command but skips its benchmark run (minutes on a 2-core machine), so
these smoke runs are what keeps `python -m streamkl bench` and bench/*.py working there. Each runs in a
subprocess (as a user would) and must exit 0 and print its result table; timings are not checked.
"""

import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNS = [
    pytest.param([sys.executable, "-m", "streamkl", "bench", "--device", "cpu", "--seqlen", "256", "--heads", "2",
                  "--repeats", "1", "--quiet"], "eager", id="streamkl-bench"),
    pytest.param([sys.executable, "bench/attention.py", "--device", "cpu", "--quick", "--no-compile", "--repeats", "1",
                  "--quiet"], "ours", id="attention-sweep"),
    pytest.param([sys.executable, "bench/attention.py", "--device", "cpu", "--scenario", "all", "--quick",
                  "--repeats", "1", "--quiet"], "GQA", id="attention-scenarios"),
    pytest.param([sys.executable, "bench/long_context.py", "--device", "cpu", "--seqlens", "256", "--baseline-seqlens",
                  "128", "--heads", "2", "--d", "32", "--repeats", "1", "--no-compile"], "ours", id="long-context"),
    pytest.param([sys.executable, "bench/linear.py", "--device", "cpu", "--quick", "--no-compile", "--repeats", "1",
                  "--quiet"], "ours", id="linear"),
    # GPU-only measurement: on the CPU it must still import and explain itself.
    pytest.param([sys.executable, "bench/linear_floor.py", "--tokens", "256"], "no GPU", id="linear-floor"),
]


@pytest.mark.parametrize("command,expected", RUNS)
def test_benchmark_runs(command, expected):
    proc = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    assert expected in proc.stdout, proc.stdout[-2000:]
