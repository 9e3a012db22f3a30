"""Retort's benchmarks (issue 6), side by side in one run; writes BENCHMARKS.md.

    .venv/bin/python bench/run.py                      # everything, full size (~15 min)
    .venv/bin/python bench/run.py --quick              # everything, tiny sizes (< 1 min)
    .venv/bin/python bench/run.py --only fleet,latency # some sections
    .venv/bin/python bench/run.py --profile bench/out/profile --only fleet

Sections: fleet, latency, api, scale, memory. Needs PostgreSQL on 127.0.0.1:5432
(user postgres; RETORT_BENCH_PG to change), Redis on 127.0.0.1:6379
(RETORT_BENCH_REDIS) and `wrk` for the API section (apt-get install -y wrk).
Everything it creates (processes, `rtbench_*` databases, its Redis queue's
keys, temporary directories) is removed at the end, also on Ctrl-C.

A full run rewrites its sections of BENCHMARKS.md (between the
`<!-- bench:NAME -->` markers; the rest of the file is kept); `--quick` and
`--profile` runs write nothing unless --write is given. Exit status: 0 when
every benchmark ran and verified its result, 1 otherwise; with --strict, also
1 when a goal is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import harness as h  # noqa: E402

SECTIONS = ("fleet", "latency", "api", "scale", "memory")

FULL = {
    "fleet_sqlite": 200,
    "fleet_pg": 50,
    "fleet_rounds": 3,
    "revisions": 30,
    "latency_reps": 200,
    "latency_warmup": 5,
    "api_seconds": 10,
    "scale_jobs": 100_000,
    "scale_events": 1_000_000,
    "scale_reps": 50,
    "memory_jobs": 1000,
}
QUICK = {
    "fleet_sqlite": 3,
    "fleet_pg": 2,
    "fleet_rounds": 2,
    "revisions": 30,
    "latency_reps": 5,
    "latency_warmup": 1,
    "api_seconds": 2,
    "scale_jobs": 1000,
    "scale_events": 10_000,
    "scale_reps": 5,
    "memory_jobs": 20,
}

GOALS = {
    "fleet_c_over_a": 0.15,
    "fleet_c_over_b": 1.0,
    "latency_p50_ms": 30.0,
    "latency_p99_ms": 100.0,
    "api_ratio": 0.6,
    "scale_ratio": 2.0,
    "memory_ratio": 1.5,
}


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes, well under a minute")
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--write", action="store_true", help="write BENCHMARKS.md even if quick")
    parser.add_argument("--no-write", action="store_true", help="never write BENCHMARKS.md")
    parser.add_argument("--json", help="also write the raw results to this file")
    parser.add_argument("--profile", help="py-spy the workers and the API during fleet (c)")
    parser.add_argument("--keep", action="store_true", help="keep temporary dirs and logs")
    parser.add_argument("--strict", action="store_true", help="exit 1 when a goal is missed")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="SIZE=N",
        help=f"override one size ({', '.join(FULL)}); such a run writes nothing unless --write",
    )
    parser.add_argument("--render", metavar="JSON", help="only rewrite BENCHMARKS.md from --json")
    args = parser.parse_args(argv)
    if args.render:
        from bench.report import update_benchmarks_md

        saved = json.loads(Path(args.render).read_text())
        update_benchmarks_md(h.ROOT / "BENCHMARKS.md", saved, saved["goals"])
        return 0
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = set(only) - set(SECTIONS)
    if unknown:
        parser.error(f"unknown sections {sorted(unknown)}; choose from {', '.join(SECTIONS)}")
    sizes = dict(QUICK if args.quick else FULL)
    for item in args.set:
        key, _, value = item.partition("=")
        if key not in sizes or not value:
            parser.error(f"--set {item}: use SIZE=N with SIZE one of {', '.join(sizes)}")
        sizes[key] = type(sizes[key])(float(value))
    if "api" in only:
        from bench.apiload import INSTALL_WRK, wrk_path

        if wrk_path() is None:
            parser.error(f"the api section needs wrk: {INSTALL_WRK}")
    if args.profile and not (Path(sys.executable).parent / "py-spy").exists():
        parser.error("--profile needs py-spy in this venv: .venv/bin/pip install py-spy")

    import service

    if Path(service.__file__).resolve().parent.parent != h.ROOT:
        parser.error(f"service resolves to {service.__file__}, not this checkout: use its .venv")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    res = h.Resources(keep=args.keep)
    results: dict[str, Any] = {"sizes": sizes, "quick": args.quick, "machine": machine()}
    failures: list[str] = []
    pool = None
    try:
        shared: h.Cluster | None = None
        early: dict[str, Any] = {}
        if args.quick:
            # Quick runs start the other layouts while the first benchmarks run.
            from concurrent.futures import ThreadPoolExecutor

            from bench import memory, scale

            pool = ThreadPoolExecutor(3)
            if "latency" in only:
                early["embedded"] = pool.submit(h.start_embedded, res, "embedded")
            if "scale" in only:
                early["scale"] = pool.submit(scale.start, res)
            if "memory" in only:
                early["memory"] = pool.submit(memory.start, res)

        def cluster_for(name: str, start):
            return early.pop(name).result() if name in early else start()

        def production() -> h.Cluster:
            nonlocal shared
            if shared is None:
                h.log(
                    "starting the production layout (PostgreSQL state, Redis, gunicorn, 2 workers)"
                )
                shared = h.start_production(res, "prod")
            return shared

        if "fleet" in only:
            from bench import fleet

            cluster = production()
            prof = Profiler(args.profile, cluster) if args.profile else None
            results["fleet"] = []
            for dialect, n in (
                ("sqlite", sizes["fleet_sqlite"]),
                ("postgresql", sizes["fleet_pg"]),
            ):
                r = _guard(
                    failures,
                    f"fleet {dialect}",
                    lambda d=dialect, n=n: fleet.run(
                        res,
                        cluster,
                        d,
                        n,
                        sizes["revisions"],
                        rounds=sizes["fleet_rounds"],
                        profiler=prof,
                    ),
                )
                if r:
                    results["fleet"].append(r)
                    if not (r["cli_verified"] and r["api_verified"] and r["retort_verified"]):
                        failures.append(
                            f"fleet {dialect}: databases not at head: {r['verify_errors']}"
                        )
            if prof:
                results.setdefault("profile", {}).update(prof.summary())
        if "latency" in only:
            from bench import latency

            results["latency"] = []
            r = _guard(
                failures,
                "latency (production)",
                lambda: latency.run(
                    res, production(), "production", sizes["latency_reps"], sizes["latency_warmup"]
                ),
            )
            if r:
                results["latency"].append(r)

            def embedded():
                h.log("the embedded default (retort serve)")
                emb = cluster_for("embedded", lambda: h.start_embedded(res, "embedded"))
                try:
                    return latency.run(
                        res, emb, "embedded", sizes["latency_reps"], sizes["latency_warmup"]
                    )
                finally:
                    emb.stop(background=args.quick)

            r = _guard(failures, "latency (embedded)", embedded)
            if r:
                results["latency"].append(r)
        if "api" in only:
            from bench import apiload

            cluster = production()
            prof = Profiler(args.profile, cluster) if args.profile else None
            r = _guard(
                failures,
                "api",
                lambda: apiload.run(res, cluster, sizes["api_seconds"], profiler=prof),
            )
            if prof:
                results.setdefault("profile", {}).update(prof.summary())
            if r:
                results["api"] = r
        if shared is not None:
            shared.stop(background=args.quick)
        if "scale" in only:
            from bench import scale

            r = _guard(
                failures,
                "scale",
                lambda: scale.run(
                    res,
                    sizes["scale_jobs"],
                    sizes["scale_events"],
                    sizes["scale_reps"],
                    n_databases=10 if args.quick else 100,
                    cluster=cluster_for("scale", lambda: scale.start(res)),
                ),
            )
            if r:
                results["scale"] = r
        if "memory" in only:
            from bench import memory

            r = _guard(
                failures,
                "memory",
                lambda: memory.run(
                    res,
                    sizes["memory_jobs"],
                    cluster=cluster_for("memory", lambda: memory.start(res)),
                ),
            )
            if r:
                results["memory"] = r
    except KeyboardInterrupt:
        failures.append("interrupted")
        h.log("interrupted; cleaning up")
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        res.close()
    results["seconds"] = time.monotonic() - started
    results["failures"] = failures
    results["command"] = command_line(argv)
    goals = goal_table(results)
    results["goals"] = goals
    print(render_console(results, goals))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    write = not (args.quick or args.profile or args.set or args.no_write) or args.write
    if write and not failures:
        from bench.report import update_benchmarks_md

        update_benchmarks_md(h.ROOT / "BENCHMARKS.md", results, goals)
        h.log("BENCHMARKS.md updated")
    elif write:
        h.log("BENCHMARKS.md not updated: some benchmark failed")
    if failures:
        for f in failures:
            h.log(f"FAILED: {f}")
        return 1
    if args.strict and any(g["met"] is False for g in goals):
        return 1
    return 0


def _guard(failures: list[str], name: str, fn):
    """Run one benchmark; a failure is reported and the others still run."""
    try:
        return fn()
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # noqa: BLE001
        import traceback

        traceback.print_exc()
        failures.append(f"{name}: {type(exc).__name__}: {exc}")
        return None


class Profiler:
    """py-spy (sampling, --subprocesses) on each worker and on the gunicorn master."""

    def __init__(self, out_dir: str, cluster: h.Cluster):
        self.dir = Path(out_dir).resolve()
        self.dir.mkdir(parents=True, exist_ok=True)
        self.cluster = cluster
        self.procs: list[subprocess.Popen] = []
        self.files: list[Path] = []

    def start(self, label: str, only: tuple[str, ...] = ("worker", "api")) -> None:
        py_spy = Path(sys.executable).parent / "py-spy"
        for name, proc in self.cluster.procs.items():
            if not name.startswith(only):
                continue
            out = self.dir / f"{label}-{name}.txt"
            self.files.append(out)
            self.procs.append(
                subprocess.Popen(
                    [
                        str(py_spy),
                        "record",
                        "--subprocesses",
                        "--format",
                        "raw",
                        "--rate",
                        "200",
                        "--nonblocking",
                        "--output",
                        str(out),
                        "--pid",
                        str(proc.popen.pid),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                    start_new_session=True,
                )
            )

    def stop(self) -> None:
        for p in self.procs:
            p.send_signal(signal.SIGINT)
        for p in self.procs:
            try:
                p.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
        self.procs.clear()

    def summary(self) -> dict[str, Any]:
        from bench.profile_summary import summarize

        return {str(f): summarize(f) for f in self.files if f.exists()}


def machine() -> dict[str, str]:
    import importlib.metadata as md
    import sqlite3

    def first(path: str, key: str) -> str:
        try:
            for line in open(path):
                if line.startswith(key):
                    return line.split(":", 1)[1].strip()
        except OSError:
            pass
        return "?"

    info = {
        "cpu": f"{os.cpu_count()} x {first('/proc/cpuinfo', 'model name')}",
        "memory": first("/proc/meminfo", "MemTotal"),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    for pkg in ("alembic", "sqlalchemy", "celery", "gunicorn", "flask", "psycopg"):
        try:
            info[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    try:
        import sqlalchemy as sa

        engine = sa.create_engine(h.PG_ADMIN, poolclass=sa.pool.NullPool)
        with engine.connect() as c:
            info["postgresql"] = c.exec_driver_sql("SHOW server_version").scalar()
        engine.dispose()
    except Exception:  # noqa: BLE001
        info["postgresql"] = "?"
    try:
        import redis

        with redis.Redis.from_url(h.REDIS) as r:
            info["redis"] = r.info("server")["redis_version"]
    except Exception:  # noqa: BLE001
        info["redis"] = "?"
    try:
        info["wrk"] = subprocess.run(
            ["wrk", "--version"], capture_output=True, text=True
        ).stdout.split()[1]
    except (OSError, IndexError):
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(h.ROOT), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(h.ROOT), "status", "--porcelain", "service", "worker", "migrations"],
            capture_output=True,
            text=True,
        ).stdout.strip()
        info["commit"] = commit + (" (service/worker modified)" if dirty else "")
    except OSError:
        pass
    try:
        info["load_before"] = " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:
        pass
    return info


def command_line(argv: list[str] | None) -> str:
    """The command that reproduces the figures (without where the raw results went)."""
    args = list(sys.argv[1:] if argv is None else argv)
    shown = []
    skip = False
    for a in args:
        if skip:
            skip = False
            continue
        if a in ("--json", "--render"):
            skip = True
            continue
        if a.startswith(("--json=", "--render=")) or a in ("--write", "--keep"):
            continue
        shown.append(a)
    return " ".join([".venv/bin/python bench/run.py", *shown]).strip()


def goal_table(results: dict[str, Any]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []

    def add(what: str, value: float | None, goal: float, lower_is_better: bool, fmt: str):
        met = None if value is None else (value <= goal if lower_is_better else value >= goal)
        sign = "≤" if lower_is_better else "≥"
        rows.append(
            {
                "what": what,
                "value": value,
                "shown": "—" if value is None else fmt.format(value),
                "goal": f"{sign} {fmt.format(goal)}",
                "met": met,
            }
        )

    for f in results.get("fleet", []):
        name = "SQLite" if f["dialect"] == "sqlite" else "PostgreSQL"
        add(
            f"Fleet {name} ×{f['databases']}: (c)/(a)",
            f["c_over_a"],
            GOALS["fleet_c_over_a"],
            True,
            "{:.3f}",
        )
        add(
            f"Fleet {name} ×{f['databases']}: (c)/(b)",
            f["c_over_b"],
            GOALS["fleet_c_over_b"],
            True,
            "{:.2f}",
        )
    for lat in results.get("latency", []):
        if lat["layout"] == "production":
            add("Latency (Redis) p50", lat["p50_ms"], GOALS["latency_p50_ms"], True, "{:.0f} ms")
            add("Latency (Redis) p99", lat["p99_ms"], GOALS["latency_p99_ms"], True, "{:.0f} ms")
    if "api" in results:
        add(
            "API load: Retort / bare Flask req/s (finished job)",
            results["api"]["ratio"],
            GOALS["api_ratio"],
            False,
            "{:.2f}",
        )
        if "unfinished" in results["api"]:
            add(
                "API load: the same, unfinished job (read fresh)",
                results["api"]["unfinished"]["ratio"],
                GOALS["api_ratio"],
                False,
                "{:.2f}",
            )
    if "scale" in results:
        worst = max(results["scale"]["ops"].items(), key=lambda kv: kv[1]["ratio"])
        add(
            f"Scale: worst full/empty ({worst[0]})",
            worst[1]["ratio"],
            GOALS["scale_ratio"],
            True,
            "{:.2f}×",
        )
    if "memory" in results:
        worst = max(results["memory"]["processes"].items(), key=lambda kv: kv[1]["ratio"])
        add(
            f"Memory: worst peak/first ({worst[0].split(' (')[0]})",
            worst[1]["ratio"],
            GOALS["memory_ratio"],
            True,
            "{:.2f}×",
        )
    return rows


def render_console(results: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    lines = [
        f"\nRetort benchmarks ({'quick' if results['quick'] else 'full'}) "
        f"in {results['seconds']:.0f} s"
    ]
    for g in goals:
        mark = {True: "met", False: "MISSED", None: "?"}[g["met"]]
        lines.append(f"  {g['what']:<60} {g['shown']:>10}  goal {g['goal']:<10} {mark}")
    if results["failures"]:
        lines.append("  failures: " + "; ".join(results["failures"]))
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
