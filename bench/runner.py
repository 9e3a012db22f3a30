"""What starting a sandboxed runner costs, in each sandbox mode, against a bare interpreter.

    .venv/bin/python bench/runner.py [--runs 10]

A runner is a fresh interpreter (exec, never a fork of the worker) that imports
SQLAlchemy, Alembic and the drivers before it says it is ready; under bwrap it
also gets its namespaces and binds. The floor beside it: `python -c "import
sqlalchemy, alembic.runtime.environment"`. Warm runners are kept per project,
so this is paid once per project and pool process (or not at all: a spare is
started while the worker is idle). Prints medians; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from service.config import Config  # noqa: E402
from service.jobs.run.sandbox import RunnerProcess, RunnerSpec, probe  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    data = Path(tempfile.mkdtemp(prefix="rtbench-runner-"))
    config = Config(
        database_url="sqlite://", broker_url="redis://", data_dir=data, admin_token="x",
        secret_keys=("k",),
    )  # fmt: skip
    floor = []
    for _ in range(args.runs):
        start = time.perf_counter()
        subprocess.run(
            [sys.executable, "-I", "-c", "import sqlalchemy, alembic.runtime.environment"],
            check=True,
        )
        floor.append((time.perf_counter() - start) * 1000)
    print(f"bare interpreter importing SQLAlchemy and Alembic: {statistics.median(floor):.0f} ms")
    for mode in ("process", "auto"):
        sandbox = probe(mode)
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            runner = RunnerProcess(RunnerSpec(None), sandbox, config)
            times.append((time.perf_counter() - start) * 1000)
            runner.close()
        median = statistics.median(times)
        print(
            f"runner ready, sandbox {sandbox.mode}: {median:.0f} ms "
            f"({median / statistics.median(floor):.2f}x the bare interpreter)"
        )


if __name__ == "__main__":
    main()
