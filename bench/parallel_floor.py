"""How much two processes can gain over one on this machine, with no Retort at all.

    .venv/bin/python bench/parallel_floor.py [N]

Runs fleet way (b) (bench/fleet_api.py: Alembic's Python API, one
ScriptDirectory, the generated 30-revision chain) once serially over N fresh
SQLite databases, then as two processes side by side over N/2 each, and
prints both times and their ratio. Retort's (c) with two workers cannot beat
that ratio of (b): it is the floor the coordinator's own costs come on top of.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h  # noqa: E402
from bench.fleet import write_alembic_project  # noqa: E402

FLEET_API = Path(__file__).with_name("fleet_api.py")


def _start(root: Path, work: Path, tag: str, n: int) -> subprocess.Popen:
    dbs = work / tag
    dbs.mkdir()
    urls = work / f"{tag}.txt"
    urls.write_text("".join(f"sqlite:///{dbs}/db{i:04d}.db\n" for i in range(n)))
    return subprocess.Popen(
        [sys.executable, str(FLEET_API), str(root), str(urls)], stdout=subprocess.PIPE, text=True
    )


def _seconds(proc: subprocess.Popen) -> float:
    out, _ = proc.communicate()
    if proc.returncode:
        raise RuntimeError("bench/fleet_api.py failed")
    return json.loads(out)["seconds"]


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 60
    with tempfile.TemporaryDirectory(prefix="retort-floor-") as tmp:
        work = Path(tmp)
        root = work / "project"
        write_alembic_project(root, h.synthetic_chain(30))
        serial = _seconds(_start(root, work, "serial", n))
        pair = [_start(root, work, tag, n // 2) for tag in ("left", "right")]
        # Each process times itself from its ScriptDirectory load on, imports
        # excluded as in the serial run; the pair took as long as the slower one.
        parallel = max(_seconds(proc) for proc in pair)
    print(
        f"(b) serially over {n} SQLite databases: {serial:.2f} s; two processes over "
        f"{n // 2} each: {parallel:.2f} s; ratio {parallel / serial:.2f}"
    )


if __name__ == "__main__":
    main()
