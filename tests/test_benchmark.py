"""Smoke test of scripts/benchmark.py: it runs end to end and prints its report. No timing
assertions: speed is the benchmark's business, not the tests'."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.e2e
def test_benchmark_quick_runs_and_reports():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--quick"], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert re.fullmatch(r"update speedup vs CleanRL-style at paper size: \d+\.\d\dx \(cpu\)", lines[-1]), lines[-1]
    out = result.stdout
    assert re.search(r"^\s*width\s+batch\s+upd/block\s+CleanRL-style\s+project\s+ratio\s+GFLOP/upd\s+matmul GFLOP/s\s+% matmul\s+warm-up s$", out, re.M), out
    assert len(re.findall(r"^\s+(32|64)\s+(16|64)\s+\d+\s+[\d.]+\s+[\d.]+\s+[\d.]+x", out, re.M)) == 4, out
    assert re.search(r"^dense matmul throughput: [\d.]+ GFLOP/s", out, re.M), out
    assert re.search(r"^matmul fraction at paper size: project [\d.]+ GFLOP/update .* = [\d.]+% of dense matmul", out, re.M), out
    from baselines import METHODS  # every method gets a cost row, sac's own ratio being 1.00x
    rows = dict(re.findall(r"^\s*(\w+)\s+[\d.]+\s+([\d.]+)x$", out, re.M))
    assert set(rows) == set(METHODS) and rows["sac"] == "1.00", out
    assert re.search(r"project \(nbsp_sac_metaworld.main, subprocess\): [\d.]+ env steps/s .* peak RSS \d+ MiB", out), out


def test_cudagraphs_on_cpu_stops_with_one_line():
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--device", "cpu", "--cudagraphs"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == "error: --cudagraphs needs a CUDA device"


def test_unknown_method_stops_before_any_measurement():
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--methods", "sac", "bogus"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip().startswith("error: unknown --methods bogus; valid: nbsp sac ewc")


def test_bad_e2e_batch_stops_before_any_measurement():
    result = subprocess.run([sys.executable, "scripts/benchmark.py", "--e2e-batch", "0"], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.strip() == "error: --e2e-batch must be a positive integer, got 0"
