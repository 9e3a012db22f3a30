"""Fleet (c) for two versions of Retort, side by side in one run, against (b).

    .venv/bin/python bench/ab.py REF [--databases 200] [--rounds 4] [--dialect sqlite|postgresql]

REF is a git commit (or branch, tag) of this repository, checked out in a
temporary worktree. Both versions run the production layout (PostgreSQL state,
Redis, gunicorn, two workers) at once, on the same machine, and take turns:
each round runs (b) once, then (c) on one version and then the other, the
order swapped every round. On a machine whose disk speeds up and slows down
between runs (this one: (b) took 7.6 to 10.4 s for the same 200 databases
within an hour), only figures measured this way compare two versions fairly.
Prints each round and the median (c)/(b) of each version; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet  # noqa: E402
from bench import harness as h  # noqa: E402


def cluster_at(res: h.Resources, root: Path, label: str) -> h.Cluster:
    """The production layout, its processes run from the tree at `root`."""
    here, spawn_defaults = h.ROOT, h.Resources.spawn.__defaults__
    h.ROOT, h.Resources.spawn.__defaults__ = root, (root,)
    try:
        return h.start_production(res, label, beat=False)
    finally:
        h.ROOT, h.Resources.spawn.__defaults__ = here, spawn_defaults


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("ref", help="the other version: a commit, branch or tag")
    parser.add_argument("--databases", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--revisions", type=int, default=30)
    parser.add_argument("--dialect", choices=["sqlite", "postgresql"], default="sqlite")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="rtbench-ab-") as tmp:
        other = Path(tmp) / "tree"
        subprocess.run(
            ["git", "worktree", "add", "--detach", "-q", str(other), args.ref],
            cwd=h.ROOT,
            check=True,
        )
        res = h.Resources()
        try:
            versions = {
                args.ref: cluster_at(res, other, "ab-other"),
                "this tree": cluster_at(res, h.ROOT, "ab-this"),
            }
            files = h.synthetic_chain(args.revisions)
            workdir = res.tmpdir("ab-alembic")
            fleet.write_alembic_project(workdir, files)
            targets = fleet.Targets(res, args.dialect, args.databases)
            ratios: dict[str, list[float]] = {name: [] for name in versions}
            for k in range(args.rounds):
                b = fleet.way_api(workdir, targets.fresh())["seconds"]
                line = f"round {k + 1}: (b) {b:.2f} s"
                order = list(versions.items())
                for name, cluster in order if k % 2 == 0 else reversed(order):
                    c = fleet.way_retort(cluster, targets.fresh(), files, f"ab{k}")
                    ratios[name].append(c["seconds"] / b)
                    line += f" | {name}: (c) {c['seconds']:.2f} s, (c)/(b) {c['seconds'] / b:.3f}"
                print(line, flush=True)
            for name, values in ratios.items():
                shown = ", ".join(f"{v:.3f}" for v in values)
                print(f"{name}: median (c)/(b) {statistics.median(values):.3f} ({shown})")
        finally:
            res.close()
            subprocess.run(
                ["git", "worktree", "remove", "--force", str(other)], cwd=h.ROOT, check=False
            )


if __name__ == "__main__":
    main()
