"""What per-job process isolation costs: fork + exit + wait in a loaded worker,
against loading a bundle's ScriptDirectory (the cache a forked child cannot keep).

    .venv/bin/python bench/isolation.py
"""

from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from alembic.script import ScriptDirectory  # noqa: E402

import worker.tasks  # noqa: E402,F401 - load what a worker process holds


def fork_once() -> float:
    start = time.perf_counter()
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)
    return (time.perf_counter() - start) * 1000


def write_chain(root: Path, n: int) -> Path:
    versions = root / "versions"
    versions.mkdir(parents=True)
    prev = None
    for i in range(n):
        rev = f"r{i:03d}"
        (versions / f"{rev}.py").write_text(
            "from alembic import op\nimport sqlalchemy as sa\n"
            f"revision = {rev!r}\ndown_revision = {prev!r}\n"
            "def upgrade():\n    op.create_table('t%d', sa.Column('id', sa.Integer))\n"
            % i
            + "def downgrade():\n    pass\n"
        )
        prev = rev
    return versions


def load_once(root: Path, versions: Path) -> float:
    start = time.perf_counter()
    ScriptDirectory(str(root), version_locations=[str(versions)]).revision_map.heads  # noqa: B018
    return (time.perf_counter() - start) * 1000


def main() -> None:
    forks = [fork_once() for _ in range(200)]
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        versions = write_chain(root, 30)
        loads = [load_once(root, versions) for _ in range(50)]
    print(
        f"fork+exit+wait in a worker process: median {statistics.median(forks):.2f} ms, "
        f"p95 {sorted(forks)[int(len(forks) * 0.95)]:.2f} ms (200 runs)"
    )
    print(
        f"ScriptDirectory load, 30 revisions:  median {statistics.median(loads):.2f} ms (50 runs)"
    )


if __name__ == "__main__":
    main()
