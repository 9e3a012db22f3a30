"""Fleet rollouts (issue 19) against plain Alembic, side by side in one run.

    .venv/bin/python bench/rollout.py                        # 1,000 SQLite + 100 PostgreSQL
    .venv/bin/python bench/rollout.py --sqlite 50 --postgresql 10 --baseline-sample 10

The generated 30-revision chain (bench/harness.py:synthetic_chain), from empty
databases to head, for N SQLite tenant databases and M PostgreSQL databases on
one server, five ways:

(a) a shell loop of the `alembic` CLI, one process per database
    (bench/fleet.py:way_cli; by default over a sample of 100, extrapolated);
(b) `xargs -P 2` over the same `alembic` command (by default every database);
(c) a two-process multiprocessing pool over Alembic's Python API, one
    ScriptDirectory per process, each database as bench/fleet_api.py does it:
    the floor for this machine's two cores;
(r) Retort in the production layout (PostgreSQL state, Redis, gunicorn, two
    `retort worker --concurrency 1`, beat): the databases registered with
    tags tier=tenant (timed apart), the bundle pushed, `POST /v1/rollouts`
    (canary 5, waves of 200, max_parallel 4, max_parallel_per_server K on
    PostgreSQL); wall time from the POST to the rollout seen final;
(n) a rollout over the same SQLite databases once all are at head (a no-op);
(h) a rollout whose canary holds a bad SQLite database (its first table
    already exists there): the time from that job's end to the rollout's halt.

(c) and (r) run in `--rounds` rounds, one right after the other, the order
swapped each round; (r)/(c) is the median of the rounds' ratios. Every
database of every way is read back at the end of its way (alembic_version
is the head, the last table exists). Everything created (processes, the
`rtbench_*` PostgreSQL databases, dropped WITH (FORCE), Redis keys,
temporary folders) is removed at the end, also on an error or Ctrl-C.
Writes nothing; `--json FILE` keeps the raw figures.
"""

from __future__ import annotations

import argparse
import bisect
import datetime as dt
import json
import multiprocessing
import os
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet  # noqa: E402
from bench import harness as h  # noqa: E402

GOAL_RATIO = 1.2  # (r) / (c)
GOAL_NOOP_S = 10.0  # a no-op rollout of the SQLite tenants
ROLLOUT_DONE = ("succeeded", "failed", "aborted", "halted")
SLOTS = 2  # Retort's two workers of concurrency 1; (b) and (c) run two processes


# ---------------------------------------------------------------- (c): a pool of two

_script = None


def _pool_init(root: str, barrier) -> None:
    """Load the ScriptDirectory once per process, as bench/fleet_api.py does."""
    global _script
    from alembic.script import ScriptDirectory

    _script = ScriptDirectory(root, version_locations=[f"{root}/versions"])
    _script.revision_map.heads  # noqa: B018 - load every revision file once
    barrier.wait(60)  # the timed map starts once both processes are ready


def _pool_noop(_: int) -> int:
    return os.getpid()


def _pool_upgrade(url: str) -> float:
    """One database to head, exactly as bench/fleet_api.py's loop does it; its seconds."""
    from bench.fleet_api import upgrade

    started = time.perf_counter()
    upgrade(_script, url)
    return time.perf_counter() - started


def way_pool(workdir: Path, urls: list[str]) -> dict[str, float]:
    """(c): a multiprocessing pool of two over the URLs (start-up and imports not timed)."""
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(SLOTS)
    with ctx.Pool(SLOTS, initializer=_pool_init, initargs=(str(workdir), barrier)) as pool:
        pool.map(_pool_noop, range(SLOTS), chunksize=1)
        started = time.perf_counter()
        each = pool.map(_pool_upgrade, urls, chunksize=1)
        seconds = time.perf_counter() - started
    return {"seconds": seconds, "job_median_s": statistics.median(each), "job_sum_s": sum(each)}


# ---------------------------------------------------------------- (b): xargs -P 2


def way_xargs(workdir: Path, urls: list[str]) -> float:
    urls_file = workdir / "urls-xargs.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    alembic = Path(sys.executable).parent / "alembic"
    started = time.perf_counter()
    with open(urls_file) as stdin:
        out = subprocess.run(
            [
                "xargs", "-P", str(SLOTS), "-I{}",
                str(alembic), "-c", str(workdir / "alembic.ini"), "-x", "url={}",
                "upgrade", "head",
            ],
            stdin=stdin,
            capture_output=True,
            text=True,
        )  # fmt: skip
    seconds = time.perf_counter() - started
    if out.returncode:
        raise RuntimeError(f"xargs -P {SLOTS} alembic failed:\n{out.stderr[-3000:]}")
    return seconds


# ---------------------------------------------------------------- Retort


def ts(value: str | None) -> float | None:
    """An ISO timestamp of the API as epoch seconds."""
    if not value:
        return None
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def register_fleet(api: h.Api, project: str, urls: list[str], files: dict[str, str]):
    """A project with the bundle and its databases tagged tier=tenant; (names, seconds)."""
    h.setup_project(api, project, files)
    names = []
    started = time.perf_counter()
    for i, url in enumerate(urls):
        name = f"{project}-{i:04d}"
        api.ok(
            "POST",
            "/v1/databases",
            {"name": name, "project": project, "url": url, "tags": {"tier": "tenant"}},
        )
        names.append(name)
    return names, time.perf_counter() - started


class RolloutStuck(RuntimeError):
    def __init__(self, message: str, doc: dict | None):
        super().__init__(message)
        self.doc = doc


def wait_rollout(
    api: h.Api,
    rid: int,
    *,
    interval: float,
    timeout: float,
    stall_s: float = 180,
    until: tuple[str, ...] = ROLLOUT_DONE,
) -> tuple[dict, float]:
    """Poll the rollout until its state is in `until`; (document, time.time() it was seen).

    RolloutStuck when it is not there by `timeout`, or its counts stop moving for `stall_s`.
    """
    deadline = time.monotonic() + timeout
    last_counts, moved = None, time.monotonic()
    doc: dict | None = None
    while True:
        r = api.get(f"/v1/rollouts/{rid}")
        seen = time.time()
        if r.status != 200:
            raise RuntimeError(f"GET /v1/rollouts/{rid} -> {r.status}: {r.body}")
        doc = r.body
        if doc.get("state") in until:
            return doc, seen
        counts = json.dumps(doc.get("counts"), sort_keys=True)
        if counts != last_counts:
            last_counts, moved = counts, time.monotonic()
        now = time.monotonic()
        if now > deadline or now - moved > stall_s:
            why = "timed out" if now > deadline else f"no progress for {stall_s:.0f} s"
            raise RolloutStuck(
                f"rollout {rid} {why}: state {doc.get('state')}, counts {doc.get('counts')}", doc
            )
        time.sleep(interval)


def rollout_entries(api: h.Api, rid: int) -> list[dict]:
    """Every database of the rollout (GET /v1/rollouts/{id}/databases, all pages)."""
    out: list[dict] = []
    cursor = None
    while True:
        path = f"/v1/rollouts/{rid}/databases?limit=500"
        if cursor:
            path += f"&cursor={cursor}"
        page = api.ok("GET", path, expect=(200,))
        out += page.get("databases") or []
        cursor = page.get("next_cursor")
        if not cursor:
            return out


def job_id_of(entry: dict) -> int | None:
    job = entry.get("job")
    if isinstance(job, dict):
        return job.get("id")
    return job if job is not None else entry.get("job_id")


def job_documents(api: h.Api, rid: int) -> list[dict]:
    """The documents of the rollout's jobs, each with its rollout entry's `server`."""
    out = []
    for e in rollout_entries(api, rid):
        j = job_id_of(e)
        if j is not None:
            out.append({**api.ok("GET", f"/v1/jobs/{j}", expect=(200,)), "server": e.get("server")})
    return out


def max_overlap(intervals: list[tuple[float, float]]) -> int:
    """The most intervals open at once (an end and a start at one instant: end first)."""
    points = sorted([(a, 1) for a, _ in intervals] + [(b, -1) for _, b in intervals])
    best = now = 0
    for _, d in points:
        now += d
        best = max(best, now)
    return best


def where_it_goes(jobs: list[dict], posted: float, seen: float, slots: int = SLOTS) -> dict:
    """Where a rollout's time went, from its jobs' documents.

    Per job: queue wait (created -> started, less the lock wait), lock wait
    (`lock.waited_ms`), running (started -> finished), of which the steps'
    `duration_ms`. For the rollout: its wall time times the two worker slots,
    split into the jobs' running time and the slots' idle time, the idle time
    by what was going on (nothing started yet; a job waiting for a worker;
    no job of the rollout created and waiting; everything finished).
    """
    rows = []
    for j in jobs:
        c, s, f = ts(j.get("created_at")), ts(j.get("started_at")), ts(j.get("finished_at"))
        if c is None or f is None:
            continue
        s = s if s is not None else f  # settled without running
        lock_s = ((j.get("lock") or {}).get("waited_ms") or 0) / 1000
        steps_s = sum((st.get("duration_ms") or 0) for st in (j.get("steps") or [])) / 1000
        rows.append(
            {
                "c": c, "s": s, "f": f,
                "queue": max(0.0, s - c - lock_s), "lock": lock_s, "run": f - s,
                "steps": steps_s, "server": j.get("server"), "worker": j.get("worker"),
            }
        )  # fmt: skip
    if not rows:
        return {}
    n = len(rows)
    wall = seen - posted
    events = sorted(
        [(r["c"], 2, "create") for r in rows]
        + [(r["s"], 1, "start") for r in rows]
        + [(r["f"], 0, "finish") for r in rows]
    )
    idle = {"start": 0.0, "handoff": 0.0, "nothing_queued": 0.0, "end": 0.0}
    running = queued = 0
    started_any = False
    finished = 0
    t = posted
    for when, _, kind in events:
        when = min(max(when, posted), seen)
        gap = max(0.0, when - t) * max(0, slots - running)
        if not started_any:
            idle["start"] += gap
        elif finished == n:
            idle["end"] += gap
        elif queued > 0:
            idle["handoff"] += gap
        else:
            idle["nothing_queued"] += gap
        t = max(t, when)
        if kind == "create":
            queued += 1
        elif kind == "start":
            queued -= 1
            running += 1
            started_any = True
        else:
            running -= 1
            finished += 1
    idle["end"] += max(0.0, seen - t) * max(0, slots - running)
    # A rollout's next job is created by the worker whose job just ended (its
    # advance transaction): the time from the latest end before a job's creation.
    ends = sorted(r["f"] for r in rows)
    created_after_end = []
    for r in rows:
        k = bisect.bisect_right(ends, r["c"])
        if k:
            created_after_end.append(r["c"] - ends[k - 1])
    # The gaps between one worker's jobs (its end of one to its start of the next).
    by_worker: dict[str, list[dict]] = {}
    for r in rows:
        by_worker.setdefault(r["worker"] or "?", []).append(r)
    gaps = []
    for mine in by_worker.values():
        mine.sort(key=lambda r: r["s"])
        gaps += [max(0.0, b["s"] - a["f"]) for a, b in zip(mine, mine[1:])]
    total = wall * slots
    run_sum = sum(r["run"] for r in rows)
    steps_sum = sum(r["steps"] for r in rows)
    ms = 1000 / n
    out = {
        "jobs": n,
        "wall_s": wall,
        "per_database_ms": wall * 1000 / n,
        "slot_ms_per_database": total * ms,
        "running_ms": run_sum * ms,
        "steps_ms": steps_sum * ms,
        "running_outside_steps_ms": (run_sum - steps_sum) * ms,
        "idle_start_ms": idle["start"] * ms,
        "idle_handoff_ms": idle["handoff"] * ms,
        "idle_nothing_queued_ms": idle["nothing_queued"] * ms,
        "idle_end_ms": idle["end"] * ms,
        "unaccounted_ms": (total - run_sum - sum(idle.values())) * ms,
        "job_running_median_ms": h.median([r["run"] for r in rows]) * 1000,
        "job_queue_wait_median_ms": h.median([r["queue"] for r in rows]) * 1000,
        "job_queue_wait_mean_ms": statistics.fmean(r["queue"] for r in rows) * 1000,
        "job_lock_wait_median_ms": h.median([r["lock"] for r in rows]) * 1000,
        "job_lock_wait_max_ms": max(r["lock"] for r in rows) * 1000,
        "worker_gap_ms": {
            "median": h.median(gaps) * 1000,
            "p90": h.percentile(gaps, 90) * 1000,
            "max": max(gaps, default=float("nan")) * 1000,
            "over_1s": sum(1 for g in gaps if g > 1),
            "over_1s_total_s": sum(g for g in gaps if g > 1),
        },
        "end_to_next_created_median_ms": h.median(created_after_end) * 1000,
        "post_to_first_created_ms": (min(r["c"] for r in rows) - posted) * 1000,
        "last_finished_to_seen_ms": (seen - max(r["f"] for r in rows)) * 1000,
        "max_active": max_overlap([(r["c"], r["f"]) for r in rows]),
        "max_running": max_overlap([(r["s"], r["f"]) for r in rows]),
        "max_active_per_server": max(
            max_overlap([(r["c"], r["f"]) for r in rows if r["server"] == server])
            for server in {r["server"] for r in rows}
        ),
        "servers": len({r["server"] for r in rows}),
    }
    return out


def process_trees() -> dict[int, list[int]]:
    """Every process's children, by parent pid, from /proc/*/stat (harness.children reads
    only the main thread's children and misses runners that another thread started)."""
    kids: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(kids: dict[int, list[int]], pid: int) -> list[int]:
    out = [pid]
    for kid in kids.get(pid, []):
        out += _tree(kids, kid)
    return out


def cpu_snapshot(cluster: h.Cluster) -> dict[str, dict[int, float]]:
    """CPU seconds so far of every process of the cluster, its runners and its PostgreSQL
    backends (Retort's state; the tenant databases), by group."""
    groups: dict[str, list[int]] = {}
    kids = process_trees()
    for proc in cluster.procs.values():
        for pid in _tree(kids, proc.popen.pid):
            try:
                cmd = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if b"runner_main" in cmd or b"bwrap" in cmd:
                group = "runners (bwrap, the revision code)"
            elif proc.name.startswith("worker"):
                group = "workers (Celery main and pool processes)"
            elif proc.name == "api":
                group = "API (gunicorn)"
            else:
                group = proc.name
            groups.setdefault(group, []).append(pid)
    try:
        groups["PostgreSQL, Retort's state"] = h.pg_backends(cluster.state_url)
        import sqlalchemy as sa

        with cluster.res.pg.connect() as c:
            groups["PostgreSQL, the tenant databases"] = [
                r[0]
                for r in c.execute(
                    sa.text("SELECT pid FROM pg_stat_activity WHERE datname LIKE :p"),
                    {"p": f"rtbench_{h.RUN_ID}_fleet_%"},
                )
            ]
    except Exception as exc:  # noqa: BLE001 - the figures are extra
        h.log(f"no PostgreSQL backends' CPU: {exc}")
    out = {g: h.cpu_times(pids) for g, pids in groups.items()}
    out["this benchmark (its polling)"] = {os.getpid(): time.process_time()}
    return out


def cpu_between(before: dict, after: dict) -> dict[str, float]:
    return {g: h.cpu_delta(before.get(g, {}), after[g]) for g in after}


def run_rollout(
    cluster: h.Cluster,
    project: str,
    args: argparse.Namespace,
    n: int,
    *,
    per_server: int | None,
    label: str,
    interval: float = 0.1,
    until: tuple[str, ...] = ROLLOUT_DONE,
) -> dict[str, Any]:
    """POST a rollout over the project's tier=tenant databases and wait for it."""
    api = cluster.api()
    body: dict[str, Any] = {
        "project": project,
        "selector": {"tags": {"tier": "tenant"}},
        "canary": min(args.canary, n),
        "wave_size": args.wave_size,
        "max_parallel": args.max_parallel,
    }
    if per_server:
        body["max_parallel_per_server"] = per_server
    h.log(f"{label}: POST /v1/rollouts {json.dumps(body)}")
    cpu0 = cpu_snapshot(cluster)
    posted = time.time()
    r = api.post("/v1/rollouts", body, headers={"Idempotency-Key": str(uuid.uuid4())})
    if r.status != 202:
        raise RuntimeError(f"POST /v1/rollouts -> {r.status}: {r.body}")
    rid = r.body["id"]
    timeout = 600.0 + 3.0 * n
    try:
        doc, seen = wait_rollout(api, rid, interval=interval, timeout=timeout, until=until)
    except RolloutStuck as exc:
        h.log(f"{label}: {exc}; aborting it")
        api.post(f"/v1/rollouts/{rid}/abort", {})
        raise
    cpu = cpu_between(cpu0, cpu_snapshot(cluster))
    out = {
        "cpu_s": cpu,
        "id": rid,
        "state": doc.get("state"),
        "seconds": seen - posted,
        "posted": posted,
        "seen": seen,
        "server_seconds": (
            ts(doc.get("finished_at")) - ts(doc.get("created_at"))
            if doc.get("finished_at") and doc.get("created_at")
            else None
        ),
        "counts": doc.get("counts"),
        "document": doc,
    }
    api.close()
    return out


def analyse(cluster: h.Cluster, run: dict[str, Any]) -> dict[str, Any]:
    """Fetch the rollout's job documents (after the timing) and break its time down."""
    api = cluster.api()
    jobs = job_documents(api, run["id"])
    api.close()
    run["breakdown"] = where_it_goes(jobs, run["posted"], run["seen"])
    try:  # the audit events' view of the same jobs (bench/fleet.py), from the state store
        run["phases"] = fleet.phase_breakdown(cluster, [j["id"] for j in jobs])
    except Exception as exc:  # noqa: BLE001 - the figures are extra
        run["phases"] = {"error": str(exc)}
    run["sandbox"] = sorted({str(j.get("sandbox")) for j in jobs})
    # Settled at the target in a batch, no run (service/rollouts/settle.py): no sandbox.
    run["settled"] = sum(1 for j in jobs if (j.get("result") or {}).get("settled"))
    run["job_states"] = dict(
        sorted((s, sum(1 for j in jobs if j["state"] == s)) for s in {j["state"] for j in jobs})
    )
    failed = [j for j in jobs if j["state"] != "succeeded"]
    run["failed_jobs"] = [
        {"id": j["id"], "database": j["database"], "state": j["state"], "error": j.get("error")}
        for j in failed[:5]
    ]
    run.pop("document", None)
    return run


# ---------------------------------------------------------------- (h): a bad canary


def halt_after_bad_canary(
    res: h.Resources, cluster: h.Cluster, files: dict[str, str], args, n: int
) -> dict[str, Any]:
    """A fresh SQLite fleet whose first database already has table t0: its canary job fails."""
    targets = fleet.Targets(res, "sqlite", n)
    urls = targets.fresh()
    bad = urls[0].removeprefix("sqlite:///")
    with sqlite3.connect(bad) as conn:
        conn.execute("CREATE TABLE t0 (id INTEGER PRIMARY KEY)")
    project = f"halt-{h.RUN_ID}"
    api = cluster.api()
    names, reg_s = register_fleet(api, project, urls, files)
    run = run_rollout(
        cluster,
        project,
        args,
        n,
        per_server=None,
        label="(h) bad canary",
        interval=0.02,
        until=("halted", "failed", "succeeded", "aborted"),
    )
    halted_seen = run["seen"]
    doc = run.pop("document")
    time.sleep(2)  # anything the halt let through would have started by now
    after = api.ok("GET", f"/v1/rollouts/{run['id']}", expect=(200,))
    entries = rollout_entries(api, run["id"])
    jobs = [
        api.ok("GET", f"/v1/jobs/{j}", expect=(200,))
        for j in (job_id_of(e) for e in entries)
        if j is not None
    ]
    failed = [j for j in jobs if j["state"] == "failed"]
    out: dict[str, Any] = {
        "databases": n,
        "register_s": reg_s,
        "state": run["state"],
        "halted": doc.get("halted"),
        "post_to_halt_s": run["seconds"],
        "jobs_created": len(jobs),
        "jobs_by_state_2s_later": dict(
            sorted((s, sum(1 for j in jobs if j["state"] == s)) for s in {j["state"] for j in jobs})
        ),
        "waves_with_jobs": sorted(
            {e.get("wave") for e in entries if job_id_of(e) is not None}, key=str
        ),
        "state_2s_later": after.get("state"),
        "counts_2s_later": after.get("counts"),
        "sandbox": sorted({str(j.get("sandbox")) for j in jobs}),
    }
    if failed:
        first = min(failed, key=lambda j: ts(j["finished_at"]))
        out["failed_job"] = {
            "id": first["id"],
            "database": first["database"],
            "error": (first.get("error") or {}).get("code"),
            "message": ((first.get("error") or {}).get("message") or "")[:200],
            "running_ms": (
                ts(first["finished_at"]) - ts(first["started_at"] or first["created_at"])
            )
            * 1000,
        }
        ended = ts(first["finished_at"])
        out["canary_end_to_halt_seen_ms"] = (halted_seen - ended) * 1000
        halt_ts = halt_event_time(cluster, run["posted"])
        if halt_ts is not None:
            out["canary_end_to_halt_event_ms"] = (halt_ts - ended) * 1000
    if after.get("state") not in ("aborted", "succeeded", "failed"):
        api.post(f"/v1/rollouts/{run['id']}/abort", {})
        try:
            wait_rollout(api, run["id"], interval=0.2, timeout=120, until=("aborted",))
        except RolloutStuck as exc:
            out["abort"] = str(exc)
    api.close()
    return out


def halt_event_time(cluster: h.Cluster, since: float) -> float | None:
    """The time of the state store's `rollout.halted` audit event after `since`, if any."""
    import sqlalchemy as sa

    engine = cluster.state_engine()
    try:
        with engine.connect() as c:
            rows = c.execute(
                sa.text("SELECT ts FROM audit_events WHERE action = 'rollout.halted' ORDER BY seq")
            ).all()
    except Exception as exc:  # noqa: BLE001 - the figure is optional
        h.log(f"(h): no rollout.halted audit event read: {exc}")
        return None
    finally:
        engine.dispose()
    times = [r[0].timestamp() for r in rows if r[0].timestamp() >= since - 1]
    return times[-1] if times else None


# ---------------------------------------------------------------- the run


def baseline(
    workdir: Path, targets: fleet.Targets, head: str, last: str, sample: int | None, way: str
) -> dict:
    """(a) or (b) over every database or the first `sample`; per-database time."""
    urls = targets.fresh()
    n = len(urls)
    used = urls if not sample or sample >= n else urls[:sample]
    h.log(f"{targets.dialect}: ({way}) over {len(used)} of {n} databases")
    seconds = fleet.way_cli(workdir, used) if way == "a" else way_xargs(workdir, used)
    bad = fleet.verify(used, head, last)
    return {
        "databases": len(used),
        "of": n,
        "sample": len(used) < n,
        "seconds": seconds,
        "per_database_ms": seconds * 1000 / len(used),
        "extrapolated_s": seconds * n / len(used),
        "verified": not bad,
        "verify_errors": bad[:5],
    }


def run_baselines(
    targets: fleet.Targets, args: argparse.Namespace, files: dict[str, str], workdir: Path
) -> dict[str, Any]:
    """(a) and (b) over one dialect's databases."""
    head, last = h.chain_head(files), f"t{(len(files) - 1) // 3}"
    out: dict[str, Any] = {}
    sample_a = args.baseline_sample if args.baseline_sample is not None else 100
    for way, sample in (("a", sample_a), ("b", args.baseline_sample)):
        if way in args.ways:
            out[way] = baseline(workdir, targets, head, last, sample, way)
            h.log(f"{targets.dialect} ({way}): {out[way]['per_database_ms']:.0f} ms per database")
    return out


def run_rounds(
    cluster: h.Cluster | None,
    targets: fleet.Targets,
    args: argparse.Namespace,
    files: dict[str, str],
    workdir: Path,
) -> dict[str, Any]:
    """`--rounds` rounds of (c) and (r), taking turns; (n) after each SQLite (r)."""
    dialect, n = targets.dialect, targets.n
    head, last = h.chain_head(files), f"t{(len(files) - 1) // 3}"
    out: dict[str, Any] = {"rounds": []}
    per_server = args.per_server if dialect == "postgresql" else None

    def c(k: int) -> dict:
        urls = targets.fresh()
        h.log(f"{dialect} (c) pool of {SLOTS} over {n} (round {k + 1})")
        r = way_pool(workdir, urls)
        bad = fleet.verify(urls, head, last)
        r.update(verified=not bad, verify_errors=bad[:5])
        h.log(f"{dialect} (c): {r['seconds']:.2f} s")
        return r

    def r(k: int) -> dict:
        urls = targets.fresh()
        project = f"ro-{dialect[:2]}{k}-{h.RUN_ID}"
        api = cluster.api()
        h.log(f"{dialect} (r): registering {n} databases in {project}")
        _, reg_s = register_fleet(api, project, urls, files)
        api.close()
        run = run_rollout(cluster, project, args, n, per_server=per_server, label=f"{dialect} (r)")
        run["register_s"] = reg_s
        run["project"] = project
        run = analyse(cluster, run)
        bad = fleet.verify(urls, head, last)
        run.update(verified=not bad and run["state"] == "succeeded", verify_errors=bad[:5])
        h.log(
            f"{dialect} (r): {run['state']} in {run['seconds']:.2f} s "
            f"(server {run['server_seconds']}); sandbox {run['sandbox']}"
        )
        return run

    for k in range(args.rounds):
        rnd: dict[str, Any] = {}
        order = ("c", "r") if k % 2 == 0 else ("r", "c")
        for way in order:
            if way not in args.ways:
                continue
            try:
                rnd[way] = c(k) if way == "c" else r(k)
            except RolloutStuck as exc:
                rnd[way] = {"stuck": str(exc), "counts": (exc.doc or {}).get("counts")}
                h.log(f"{dialect} ({way}) round {k + 1}: STUCK: {exc}")
        if "c" in rnd and "seconds" in rnd.get("r", {}):
            rnd["r_over_c"] = rnd["r"]["seconds"] / rnd["c"]["seconds"]
            h.log(
                f"{dialect} round {k + 1}: (c) {rnd['c']['seconds']:.2f} s, "
                f"(r) {rnd['r']['seconds']:.2f} s, (r)/(c) {rnd['r_over_c']:.3f}"
            )
        if dialect == "sqlite" and "n" in args.ways and rnd.get("r", {}).get("verified"):
            try:
                noop = run_rollout(
                    cluster, rnd["r"]["project"], args, n, per_server=None, label="sqlite (n) no-op"
                )
                rnd["n"] = analyse(cluster, noop)
                h.log(f"sqlite (n): {noop['state']} in {noop['seconds']:.2f} s")
            except RolloutStuck as exc:
                rnd["n"] = {"stuck": str(exc), "counts": (exc.doc or {}).get("counts")}
        out["rounds"].append(rnd)
    ratios = [x["r_over_c"] for x in out["rounds"] if "r_over_c" in x]
    if ratios:
        out["r_over_c"] = statistics.median(ratios)
        # The round whose ratio is the median gives the (c) and (r) shown.
        out["median_round"] = sorted(
            (x for x in out["rounds"] if "r_over_c" in x), key=lambda x: x["r_over_c"]
        )[(len(ratios) - 1) // 2]
    return out


# ---------------------------------------------------------------- the summary


def goal_line(label: str, value: float, goal: float, fmt: str, unit: str = "") -> str:
    met = "met" if value <= goal else "MISSED"
    return f"{label} {value:{fmt}}{unit} goal ≤ {goal:{fmt}}{unit} {met}"


def summary(results: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    one_job_ms = None
    for d in results["dialects"]:
        name, n = d["dialect"], d["databases"]
        if "r_over_c" in d:
            lines.append(
                goal_line(f"rollout/(c) {name}×{n} floor", d["r_over_c"], GOAL_RATIO, ".2f")
            )
        for rnd in d["rounds"]:
            for way in ("r", "n"):
                if "stuck" in rnd.get(way, {}):
                    lines.append(f"({way}) {name}×{n}: STUCK: {rnd[way]['stuck']}")
        noops = [rnd["n"]["seconds"] for rnd in d["rounds"] if "seconds" in rnd.get("n", {})]
        if noops:
            lines.append(
                goal_line(
                    f"no-op rollout {name}×{n}", statistics.median(noops), GOAL_NOOP_S, ".1f", " s"
                )
            )
        if name == "sqlite" and "median_round" in d:
            one_job_ms = d["median_round"]["r"]["breakdown"].get("job_running_median_ms")
    hr = results.get("halt")
    if hr and "canary_end_to_halt_seen_ms" in hr:
        delay = hr.get("canary_end_to_halt_event_ms", hr["canary_end_to_halt_seen_ms"])
        goal = one_job_ms if one_job_ms else hr["failed_job"]["running_ms"]
        lines.append(
            goal_line(
                f"halt after bad canary (canary job end → halted; {hr['state']}, "
                f"{hr['jobs_created']} jobs created)",
                delay,
                goal,
                ".0f",
                " ms",
            )
            + (
                " (goal: one (r) job's median running time)"
                if one_job_ms
                else " (goal: the failed job's own time)"
            )
        )
    elif hr:
        lines.append(f"halt after bad canary: no failed job seen; state {hr.get('state')}: MISSED")
    lines.append("")
    for d in results["dialects"]:
        name, n = d["dialect"], d["databases"]
        parts = []
        for way in ("a", "b"):
            if way in d:
                w = d[way]
                note = (
                    f" (a SAMPLE of {w['databases']} of {w['of']}, "
                    f"extrapolated: {w['extrapolated_s']:.0f} s)"
                    if w["sample"]
                    else f" ({w['seconds']:.1f} s)"
                )
                parts.append(f"({way}) {w['per_database_ms']:.1f} ms{note}")
        mr = d.get("median_round") or (d["rounds"][0] if d["rounds"] else {})
        if "c" in mr:
            parts.append(f"(c) {mr['c']['seconds'] * 1000 / n:.1f} ms ({mr['c']['seconds']:.2f} s)")
        if "seconds" in mr.get("r", {}):
            parts.append(f"(r) {mr['r']['seconds'] * 1000 / n:.1f} ms ({mr['r']['seconds']:.2f} s)")
        lines.append(f"per database, {name}×{n}: " + "; ".join(parts))
        for i, rnd in enumerate(d["rounds"]):
            bits = [
                f"{w} {rnd[w]['seconds']:.2f} s"
                for w in ("c", "r", "n")
                if "seconds" in rnd.get(w, {})
            ]
            if "r_over_c" in rnd:
                bits.append(f"(r)/(c) {rnd['r_over_c']:.3f}")
            lines.append(f"  round {i + 1}: " + ", ".join(bits))
        if "seconds" in mr.get("r", {}):
            r = mr["r"]
            b = r["breakdown"]
            lines.append(
                f"  Retort (r) {name}: {r['state']}, sandbox {'/'.join(r['sandbox'])}, "
                f"registering {n}: {r['register_s']:.1f} s "
                f"({r['register_s'] * 1000 / n:.1f} ms each, "
                "not counted), server created→finished "
                + (f"{r['server_seconds']:.2f} s" if r["server_seconds"] else "n/a")
            )
            lines += [f"    {x}" for x in breakdown_lines(b, mr.get("c"), n, r.get("phases"))]
            lines += [f"    {x}" for x in cpu_lines(r.get("cpu_s"), r["seconds"], n)]
            limit = results["args"]["max_parallel"]
            per = results["args"]["per_server"] if name == "postgresql" else None
            for rnd in d["rounds"]:
                bb = (rnd.get("r") or {}).get("breakdown") or {}
                if bb and bb["max_active"] > limit:
                    lines.append(f"    max_parallel {limit} EXCEEDED: {bb['max_active']} active")
                if bb and per and bb["max_active_per_server"] > per:
                    lines.append(
                        f"    max_parallel_per_server {per} EXCEEDED: "
                        f"{bb['max_active_per_server']} active on one server"
                    )
        noop = mr.get("n")
        if noop and "breakdown" in noop:
            lines.append(
                f"  no-op (n) {name}: {noop['seconds']:.2f} s, "
                f"{noop.get('settled', 0)} of {n} settled without a run, "
                f"sandbox {'/'.join(noop['sandbox'])}"
            )
            lines += [
                f"    {x}" for x in breakdown_lines(noop["breakdown"], None, n, noop.get("phases"))
            ]
            lines += [f"    {x}" for x in cpu_lines(noop.get("cpu_s"), noop["seconds"], n)]
    if hr:
        lines += halt_lines(hr)
    return lines


def halt_lines(hr: dict) -> list[str]:
    halted = hr.get("halted") or {}
    out = [
        f"(h) bad canary, sqlite×{hr['databases']}: {hr['state']} "
        f"({halted.get('reason')}: {halted.get('message')}); POST → halted seen "
        f"{hr['post_to_halt_s']:.2f} s; {hr['jobs_created']} jobs created, in waves "
        f"{hr['waves_with_jobs']}; 2 s later: {hr['state_2s_later']}, jobs "
        f"{hr['jobs_by_state_2s_later']}, sandbox {'/'.join(hr['sandbox'])}"
    ]
    fj = hr.get("failed_job")
    if fj:
        event = hr.get("canary_end_to_halt_event_ms")
        out.append(
            f"  failed job {fj['id']} ({fj['database']}): {fj['error']}, "
            f"ran {fj['running_ms']:.0f} ms; "
            f"its end → rollout.halted audit event "
            + (f"{event:.0f} ms" if event is not None else "n/a")
            + f", → halted seen by the client (polling every 20 ms) "
            f"{hr['canary_end_to_halt_seen_ms']:.0f} ms"
        )
    if hr.get("abort"):
        out.append(f"  abort after the halt: {hr['abort']}")
    return out


def cpu_lines(cpu: dict[str, float] | None, wall: float, n: int) -> list[str]:
    if not cpu:
        return []
    total = sum(cpu.values())
    parts = ", ".join(
        f"{g} {v:.1f} s ({v * 1000 / n:.1f} ms/db)"
        for g, v in sorted(cpu.items(), key=lambda kv: -kv[1])
        if v >= 0.05
    )
    return [
        f"CPU from POST to final: {total:.1f} s of the {SLOTS * wall:.1f} s two cores had "
        f"({total / (SLOTS * wall):.0%}; other programs on the machine not counted): {parts}"
    ]


def breakdown_lines(b: dict, c: dict | None, n: int, phases: dict | None = None) -> list[str]:
    if not b:
        return ["no job documents"]
    out = [
        f"per database {b['per_database_ms']:.1f} ms of wall; × {SLOTS} worker slots = "
        f"{b['slot_ms_per_database']:.1f} ms of slot time, of which:",
        f"  running (started → finished) {b['running_ms']:.1f} ms "
        f"(steps' duration_ms {b['steps_ms']:.1f}, "
        f"the rest of running {b['running_outside_steps_ms']:.1f})",
        f"  slot idle, a job queued for it (hand-off, claim, lease) {b['idle_handoff_ms']:.1f} ms",
        f"  slot idle, no job of the rollout queued (canary, wave ends, creation) "
        f"{b['idle_nothing_queued_ms']:.1f} ms",
        f"  slot idle before the first job ran {b['idle_start_ms']:.1f} ms, "
        f"after the last ended {b['idle_end_ms']:.1f} ms",
        f"  total minus the sum {b['unaccounted_ms']:.1f} ms",
        f"per job (median): queue wait {b['job_queue_wait_median_ms']:.1f} ms "
        f"(mean {b['job_queue_wait_mean_ms']:.1f}), "
        f"lock wait {b['job_lock_wait_median_ms']:.1f} ms "
        f"(max {b['job_lock_wait_max_ms']:.1f}), running {b['job_running_median_ms']:.1f} ms",
        f"POST → first job created {b['post_to_first_created_ms']:.0f} ms; last job finished → "
        f"rollout seen final {b['last_finished_to_seen_ms']:.0f} ms; most jobs active at once "
        f"{b['max_active']}, running at once {b['max_running']}, active at once on one server "
        f"{b['max_active_per_server']} ({b['servers']} servers)",
    ]
    g = b.get("worker_gap_ms")
    if g:
        out.append(
            f"one worker's end of a job → its start of the next: median {g['median']:.1f} ms, "
            f"p90 {g['p90']:.1f}, max {g['max']:.0f} ms; {g['over_1s']} gaps over 1 s "
            f"({g['over_1s_total_s']:.1f} s together)"
        )
    out.append(
        f"a job's end → the next job created (the ending worker advances the rollout): "
        f"median {b['end_to_next_created_median_ms']:.1f} ms"
    )
    if phases:
        out.append(
            "from the audit events (bench/fleet.py:phase_breakdown, medians): "
            + "; ".join(
                f"{k} {v:.1f}" + ("" if k.endswith("(s)") or k.startswith("events") else " ms")
                for k, v in phases.items()
                if isinstance(v, (int, float)) and not k.startswith("queued until")
            )
        )
    if c:
        out.append(
            f"(c) for comparison: {c['seconds'] * 1000 / n:.1f} ms of wall per database, "
            f"{c['seconds'] * SLOTS * 1000 / n:.1f} ms of process time; one database's "
            f"upgrade in the pool: median {c['job_median_s'] * 1000:.1f} ms"
        )
    return out


def log_problems(cluster: h.Cluster) -> dict[str, list[str]]:
    """Lines of the cluster's logs that say ERROR, CRITICAL or Traceback (the first 5 each)."""
    out = {}
    for p in list(cluster.procs.values()):
        try:
            lines = p.log_path.read_text(errors="replace").splitlines()
        except OSError:
            continue
        bad = [x for x in lines if "ERROR" in x or "CRITICAL" in x or "Traceback" in x]
        if bad:
            out[p.name] = [f"{len(bad)} lines"] + [x[:300] for x in bad[:5]]
    return out


def machine() -> dict[str, Any]:
    import alembic
    import sqlalchemy

    return {
        "cpus": os.cpu_count(),
        "load_before": os.getloadavg(),
        "python": sys.version.split()[0],
        "alembic": alembic.__version__,
        "sqlalchemy": sqlalchemy.__version__,
    }


def _terminate(signum, _frame):
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sqlite", type=int, default=1000, help="SQLite tenant databases")
    parser.add_argument("--postgresql", type=int, default=100, help="PostgreSQL databases")
    parser.add_argument(
        "--per-server", type=int, default=2, help="max_parallel_per_server for the PG server"
    )
    parser.add_argument("--rounds", type=int, default=1, help="rounds of (c) and (r)")
    parser.add_argument(
        "--baseline-sample",
        type=int,
        default=None,
        metavar="S",
        help="run (a) and (b) over S databases each and extrapolate (0: all); "
        "default: (a) over 100, (b) over all",
    )
    parser.add_argument("--canary", type=int, default=5)
    parser.add_argument("--wave-size", type=int, default=200)
    parser.add_argument("--max-parallel", type=int, default=4)
    parser.add_argument("--revisions", type=int, default=30)
    parser.add_argument(
        "--ways", default="a,b,c,r,n,h", help="comma-separated subset of a,b,c,r,n,h"
    )
    parser.add_argument("--json", help="write the raw results to this file")
    parser.add_argument("--keep", action="store_true", help="keep temporary dirs and logs")
    args = parser.parse_args(argv)
    args.ways = {w.strip() for w in args.ways.split(",") if w.strip()}
    if args.ways - set("abcrnh"):
        parser.error(f"unknown ways {sorted(args.ways - set('abcrnh'))}")

    import service

    if Path(service.__file__).resolve().parent.parent != h.ROOT:
        parser.error(f"service resolves to {service.__file__}, not this checkout: use its .venv")
    needs_retort = bool(args.ways & set("rnh"))
    if needs_retort and not (h.ROOT / ".rollouts-ready").exists():
        h.log("note: .rollouts-ready does not exist: the server side may not be finished")

    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGHUP, _terminate)
    started = time.monotonic()
    results: dict[str, Any] = {
        "args": {**vars(args), "ways": sorted(args.ways)},
        "machine": machine(),
    }
    res = h.Resources(keep=args.keep)
    code = 0
    cluster = None
    try:
        files = h.synthetic_chain(args.revisions)
        workdir = res.tmpdir("rollout-alembic")
        fleet.write_alembic_project(workdir, files)
        results["dialects"] = []
        all_targets = []
        for dialect, n in (("sqlite", args.sqlite), ("postgresql", args.postgresql)):
            if n:
                all_targets.append(fleet.Targets(res, dialect, n))
                results["dialects"].append({"dialect": dialect, "databases": n, "rounds": []})
        # The baselines first, before any Retort process is up.
        for targets, d in zip(all_targets, results["dialects"]):
            d.update(run_baselines(targets, args, files, workdir))
        if needs_retort:
            h.log("starting the production layout (PostgreSQL state, Redis, gunicorn, 2 workers)")
            cluster = h.start_production(res, "rollout")
            ready = cluster.api().get("/readyz").body
            results["readyz_sandbox"] = (ready or {}).get("sandbox")
            h.log(f"/readyz sandbox: {results['readyz_sandbox']}")
        if args.ways & set("crn"):
            for targets, d in zip(all_targets, results["dialects"]):
                d.update(run_rounds(cluster, targets, args, files, workdir))
        if "h" in args.ways and cluster is not None:
            h.log(f"(h): a rollout over {args.sqlite} fresh SQLite databases, the first one bad")
            results["halt"] = halt_after_bad_canary(res, cluster, files, args, args.sqlite)
    except BaseException as exc:
        code = 1
        results["error"] = f"{type(exc).__name__}: {exc}"
        h.log(f"ERROR: {results['error']}")
        if not isinstance(exc, Exception):
            raise
        import traceback

        traceback.print_exc()
    finally:
        results["machine"]["load_after"] = os.getloadavg()
        results["minutes"] = (time.monotonic() - started) / 60
        if cluster is not None:
            results["server_log_problems"] = log_problems(cluster)
        h.log("cleaning up (processes, PostgreSQL databases WITH (FORCE), Redis keys, folders)")
        res.close()
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    for d in results.get("dialects", []):
        for way in ("a", "b"):
            if way in d and not d[way]["verified"]:
                code = 1
        for rnd in d["rounds"]:
            for way in ("c", "r"):
                if way in rnd and not rnd[way].get("verified", False):
                    code = 1
    m = results["machine"]
    print()
    print(
        f"bench/rollout.py: {os.cpu_count()} cores, load average before "
        f"{' '.join(f'{x:.2f}' for x in m['load_before'])}, after "
        f"{' '.join(f'{x:.2f}' for x in m['load_after'])}; {results['minutes']:.1f} min; "
        f"Python {m['python']}, Alembic {m['alembic']}, SQLAlchemy {m['sqlalchemy']}"
    )
    if "readyz_sandbox" in results:
        print(f"sandbox (/readyz): {json.dumps(results['readyz_sandbox'])}")
    if results.get("dialects") or results.get("halt"):
        for line in summary(results):
            print(line)
    for name, lines in (results.get("server_log_problems") or {}).items():
        print(f"server log {name}: " + " | ".join(lines))
    if "error" in results:
        print(f"ERROR: {results['error']}")
    return code


if __name__ == "__main__":
    sys.exit(main())
