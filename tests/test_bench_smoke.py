"""Every benchmark of bench/run.py runs end to end at a tiny size (no timing asserted)."""

import json
import subprocess
import sys

from tests.helpers import ROOT


def test_every_benchmark_runs_at_a_tiny_size(backends, tmp_path):
    out = tmp_path / "bench.json"
    run = subprocess.run(
        [sys.executable, "bench/run.py", "--quick", "--no-write", "--json", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    results = json.loads(out.read_text())
    assert results["failures"] == [], results["failures"]
    for section in ("fleet", "latency", "api", "scale", "memory"):
        assert results.get(section), f"{section} did not run: {sorted(results)}"
    for fleet in results["fleet"]:  # every database of every way read back at head
        assert fleet["cli_verified"] and fleet["api_verified"] and fleet["retort_verified"], fleet


def test_the_comparison_tools_run_at_a_tiny_size(backends, tmp_path):
    # bench/workercpu.py (a worker's CPU per job) and bench/ab.py (two versions'
    # fleets side by side; here this tree's HEAD against itself).
    for args in (
        ["bench/workercpu.py", "--jobs", "3", "--dir", str(tmp_path)],
        ["bench/ab.py", "HEAD", "--databases", "3", "--rounds", "1"],
    ):
        run = subprocess.run(
            [sys.executable, *args], cwd=ROOT, capture_output=True, text=True, timeout=300
        )
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
        assert "(b)" in run.stdout, run.stdout
