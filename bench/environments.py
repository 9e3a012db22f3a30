"""A fleet in a project's own environment against the same fleet in the worker's (issue 17).

    .venv/bin/python bench/environments.py [--databases 100] [--rounds 3]

One embedded Retort (`retort serve`, two workers). Two projects with the same
synthetic chain: one with no requirements (the worker's environment), one
with `settings.requirements` (its own virtual environment, built by a warm-up
job first: the build is timed and reported apart). Each round runs N fresh
SQLite databases through each project, the order swapped every round; the
figure is the median of the rounds' (own environment)/(worker's) wall-time
ratios. Prints; writes nothing.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h  # noqa: E402
from bench.fleet import Targets  # noqa: E402

REQUIREMENTS = ["python-dateutil>=2.8"]


def fleet(api: h.Api, project: str, urls: list[str], label: str) -> float:
    names = []
    for i, url in enumerate(urls):
        name = f"{project}-{label}-{i:04d}"
        h.register(api, project, name, url)
        names.append(name)
    started = time.perf_counter()
    posted = [api.post("/v1/jobs", {"database": n}).body["id"] for n in names]
    jobs = [api.wait_job(job_id) for job_id in posted]
    seconds = time.perf_counter() - started
    bad = [j for j in jobs if j["state"] != "succeeded"]
    if bad:
        raise RuntimeError(f"{len(bad)} jobs failed, e.g. {bad[0]}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--databases", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--revisions", type=int, default=30)
    args = parser.parse_args()
    res = h.Resources()
    try:
        cluster = h.start_embedded(res, "envbench")
        api = cluster.api()
        files = h.synthetic_chain(args.revisions)
        plain, own = f"plain-{h.RUN_ID}", f"own-{h.RUN_ID}"
        h.setup_project(api, plain, files)
        api.ok("POST", "/v1/projects", {"name": own, "settings": {"requirements": REQUIREMENTS}})
        api.ok(
            "POST",
            f"/v1/projects/{own}/bundles",
            raw=h.make_tar(files),
            content_type="application/gzip",
        )
        targets = Targets(res, "sqlite", args.databases)
        # Warm-up: build the environment (each worker process then finds it ready).
        started = time.perf_counter()
        warm = fleet(api, own, targets.fresh()[:2], "warm")
        build_s = time.perf_counter() - started
        fleet(api, plain, targets.fresh()[:2], "warm")
        events = api.get(f"/v1/audit?project={own}&limit=1000").body["events"]
        built = [e["data"].get("seconds") for e in events if e["action"] == "environment.built"]
        ratios = []
        for k in range(args.rounds):
            order = [(plain, "a"), (own, "b")] if k % 2 == 0 else [(own, "b"), (plain, "a")]
            took = {}
            for project, key in order:
                took[key] = fleet(api, project, targets.fresh(), f"r{k}{key}")
            ratios.append(took["b"] / took["a"])
            h.log(
                f"round {k + 1}: worker's environment {took['a']:.2f} s, own environment "
                f"{took['b']:.2f} s, ratio {took['b'] / took['a']:.3f}"
            )
        print(f"environment build (pip, first job): {built} s; warm-up jobs {warm:.1f} s "
              f"of {build_s:.1f} s")  # fmt: skip
        print(
            f"fleet SQLite x {args.databases}, {args.revisions} revisions: own environment / "
            f"worker's = {statistics.median(ratios):.3f} (median of {args.rounds} rounds: "
            + ", ".join(f"{r:.3f}" for r in ratios)
            + ")"
        )
    finally:
        res.close()


if __name__ == "__main__":
    main()
