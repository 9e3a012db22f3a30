"""What the lint of an upgrade costs in the runner: a runner's first job, then each later one.

    .venv/bin/python bench/lint_cost.py [--revisions 30] [--jobs 50]

One process, one SQLite database at base, the synthetic chain of the fleet
benchmarks: `Preflight.lint_upgrade` renders the upgrade offline and lints it
(a runner's first job), then lints it again from the kept rendering (what every
later database of a fleet pays: the live tables' query and the lint).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench.harness import synthetic_chain  # noqa: E402
from service import targets  # noqa: E402
from service.jobs.run.migrate import load_scripts  # noqa: E402
from service.jobs.run.preflight import Preflight  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--revisions", type=int, default=30)
    parser.add_argument("--jobs", type=int, default=50)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lint-cost-"))
    for name, text in synthetic_chain(args.revisions).items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    script = load_scripts(root, "versions", [])
    url = sa.engine.make_url(f"sqlite:///{root}/target.db")
    engine = targets.make_target_engine(url, 5, pooled=True)
    job = {
        "bundle": {"digest": "bench", "dir": str(root)},
        "target": "head",
        "settings": {"version_table": "alembic_version"},
        "lint_render_timeout_s": 60,
    }
    preflight = Preflight()
    with engine.connect() as conn:
        started = time.perf_counter()
        report = preflight.lint_upgrade(job, conn, url, script, [])
        first = time.perf_counter() - started
        started = time.perf_counter()
        for _ in range(args.jobs):
            preflight.lint_upgrade(job, conn, url, script, [])
        later = (time.perf_counter() - started) / args.jobs
    engine.dispose()
    print(
        f"{args.revisions} revisions: first job {first * 1000:.1f} ms (render and lint), "
        f"each later job {later * 1000:.2f} ms; {len(report['findings'])} findings, "
        f"mode {report['mode']}"
    )


if __name__ == "__main__":
    main()
