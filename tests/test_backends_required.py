"""A missing backend fails the run with a clear message; it never skips."""

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_missing_redis_fails_the_run_instead_of_skipping():
    env = {**os.environ, "RETORT_TEST_REDIS": "redis://127.0.0.1:1/0"}
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/projects/test_projects.py::test_unknown_project_is_404",
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode != 0
    assert "Redis at redis://127.0.0.1:1/0 is not reachable" in out.stdout
    assert "skipped" not in out.stdout
