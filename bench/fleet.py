"""Fleet: N databases from base to head three ways, in the same run.

(a) the `alembic` CLI once per database in a shell loop (what pipelines do today),
(b) Alembic's Python API in one process, serially, one ScriptDirectory (the floor),
(c) Retort: N jobs POSTed to the API, two workers; wall time from the first POST
    to the last job seen succeeded.

Every database is checked at the end: its alembic_version row is the head and
its last table exists.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from bench import harness as h

ALEMBIC_INI = """\
[alembic]
script_location = %(here)s

[loggers]
keys = root,sqlalchemy,alembic

[handlers]
keys = console

[formatters]
keys = generic

[logger_root]
level = WARNING
handlers = console
qualname =

[logger_sqlalchemy]
level = WARNING
handlers =
qualname = sqlalchemy.engine

[logger_alembic]
level = INFO
handlers =
qualname = alembic

[handler_console]
class = StreamHandler
args = (sys.stderr,)
level = NOTSET
formatter = generic

[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
datefmt = %H:%M:%S
"""

# A minimal env.py as `alembic init` writes it, with the URL from `-x url=...`
# and the same target-side behaviour Retort gives a job (SQLite made
# transactional, one transaction per revision), so all three ways do the same
# work on the target.
ENV_PY = """\
from logging.config import fileConfig

import sqlalchemy as sa
from alembic import context

config = context.config
if config.config_file_name is not None:
    fileConfig(config.config_file_name)

url = context.get_x_argument(as_dictionary=True)["url"]
engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
if url.startswith("sqlite"):

    @sa.event.listens_for(engine, "connect")
    def _connect(dbapi_conn, _record):
        dbapi_conn.isolation_level = None

    @sa.event.listens_for(engine, "begin")
    def _begin(conn):
        conn.exec_driver_sql("BEGIN")


with engine.connect() as connection:
    context.configure(connection=connection, transaction_per_migration=True)
    with context.begin_transaction():
        context.run_migrations()
"""


def write_alembic_project(root: Path, files: dict[str, str]) -> None:
    h.write_files(root, files)
    (root / "alembic.ini").write_text(ALEMBIC_INI)
    (root / "env.py").write_text(ENV_PY)


# ---------------------------------------------------------------- targets


class Targets:
    """N empty target databases of one dialect, reset to empty between ways."""

    def __init__(self, res: h.Resources, dialect: str, n: int):
        self.res = res
        self.dialect = dialect
        self.n = n
        self.urls: list[str] = []
        self.round = 0
        if dialect == "postgresql":
            self.urls = [res.new_pg_database("fleet") for _ in range(n)]
        self.dir = res.tmpdir(f"fleet-{dialect}")

    def fresh(self) -> list[str]:
        """Empty databases for the next way."""
        self.round += 1
        if self.dialect == "sqlite":
            d = self.dir / f"round{self.round}"
            d.mkdir()
            return [f"sqlite:///{d}/db{i:04d}.db" for i in range(self.n)]
        for url in self.urls:
            engine = sa.create_engine(url, poolclass=sa.pool.NullPool, isolation_level="AUTOCOMMIT")
            with engine.connect() as c:
                c.exec_driver_sql("DROP SCHEMA public CASCADE")
                c.exec_driver_sql("CREATE SCHEMA public")
            engine.dispose()
        return list(self.urls)


def verify(urls: list[str], head: str, last_table: str) -> list[str]:
    """Return the databases that are NOT at head (empty list: all good)."""
    bad = []
    for url in urls:
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        try:
            with engine.connect() as c:
                versions = [
                    r[0] for r in c.exec_driver_sql("SELECT version_num FROM alembic_version")
                ]
                tables = set(sa.inspect(c).get_table_names())
            if versions != [head] or last_table not in tables:
                bad.append(f"{url}: version {versions}, has {last_table}: {last_table in tables}")
        except Exception as exc:  # noqa: BLE001
            bad.append(f"{url}: {type(exc).__name__}: {exc}")
        finally:
            engine.dispose()
    return bad


# ---------------------------------------------------------------- the three ways


def way_cli(workdir: Path, urls: list[str]) -> float:
    urls_file = workdir / "urls-cli.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    alembic = Path(sys.executable).parent / "alembic"
    script = (
        "while read -r url; do\n"
        f'  "{alembic}" -c "{workdir}/alembic.ini" -x "url=$url" upgrade head || exit 1\n'
        f'done < "{urls_file}"\n'
    )
    started = time.perf_counter()
    out = subprocess.run(["bash", "-c", script], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if out.returncode:
        raise RuntimeError(f"alembic CLI loop failed:\n{out.stderr[-3000:]}")
    return seconds


def way_api(workdir: Path, urls: list[str]) -> dict[str, float]:
    urls_file = workdir / "urls-api.txt"
    urls_file.write_text("\n".join(urls) + "\n")
    out = subprocess.run(
        [
            sys.executable,
            str(Path(__file__).with_name("fleet_api.py")),
            str(workdir),
            str(urls_file),
        ],
        capture_output=True,
        text=True,
        cwd=h.ROOT,
    )
    if out.returncode:
        raise RuntimeError(f"Alembic Python API run failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout)


def way_retort(
    cluster: h.Cluster, urls: list[str], files: dict[str, str], label: str, profiler=None
) -> dict[str, Any]:
    api = cluster.api()
    project = f"fleet-{label}-{h.RUN_ID}"
    h.setup_project(api, project, files)
    names = []
    for i, url in enumerate(urls):
        name = f"{project}-db{i:04d}"
        h.register(api, project, name, url)
        names.append(name)
    if profiler is not None:
        profiler.start(f"fleet-{label}")
        time.sleep(1)  # let py-spy attach
    started = time.perf_counter()
    posted = []
    for name in names:
        r = api.post("/v1/jobs", {"database": name, "action": "upgrade", "target": "head"})
        if r.status != 202:
            raise RuntimeError(f"POST /v1/jobs -> {r.status}: {r.body}")
        posted.append((r.body["id"], r.headers.get("ETag")))
    post_seconds = time.perf_counter() - started
    jobs = [api.wait_job(job_id, etag) for job_id, etag in posted]
    seconds = time.perf_counter() - started
    if profiler is not None:
        profiler.stop()
    api.close()
    failed = [j for j in jobs if j["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} Retort jobs did not succeed, e.g. {failed[0]}")
    return {
        "seconds": seconds,
        "post_seconds": post_seconds,
        "job_ids": [j for j, _ in posted],
        "phases": phase_breakdown(cluster, [j for j, _ in posted]),
    }


PHASES = [
    ("job.requested", "job.claimed", "queued until a worker is free (all N posted at once)"),
    ("job.claimed", "lease.granted", "claim -> lease granted (one transaction if free)"),
    ("lease.granted", "job.started", "lease -> running (scripts, target connection, lock, heads)"),
    ("job.started", "job.succeeded", "running (every step, then the closing write)"),
]


def phase_breakdown(cluster: h.Cluster, job_ids: list[int]) -> dict[str, Any]:
    """Where a job's time goes, from the audit events' timestamps (median over jobs, ms)."""
    engine = cluster.state_engine()
    try:
        with engine.connect() as c:
            rows = c.execute(
                sa.text(
                    "SELECT job_id, action, ts FROM audit_events "
                    "WHERE job_id = ANY(:ids) ORDER BY seq"
                ),
                {"ids": job_ids},
            ).all()
            steps = c.execute(
                sa.text(
                    "SELECT job_id, duration_ms FROM job_steps WHERE job_id = ANY(:ids) ORDER BY id"
                ),
                {"ids": job_ids},
            ).all()
            jobs = c.execute(
                sa.text(
                    "SELECT id, worker, created_at, started_at, finished_at FROM jobs "
                    "WHERE id = ANY(:ids)"
                ),
                {"ids": job_ids},
            ).all()
    finally:
        engine.dispose()
    by_job: dict[int, dict[str, list]] = {}
    for job_id, action, ts in rows:
        by_job.setdefault(job_id, {}).setdefault(action, []).append(ts)
    out: dict[str, Any] = {}
    for a, b, label in PHASES:
        values = [
            (ev[b][0] - ev[a][0]).total_seconds() * 1000
            for ev in by_job.values()
            if a in ev and b in ev
        ]
        out[label] = h.median(values)
    # A job's events are stamped when their transaction commits, so the
    # handover between two jobs of one worker shows as claimed(next) - succeeded.
    by_worker: dict[str, list[dict[str, list]]] = {}
    for j in jobs:
        ev = by_job.get(j.id, {})
        if j.worker and "job.claimed" in ev and "job.succeeded" in ev:
            by_worker.setdefault(j.worker, []).append(ev)
    gaps = []
    for evs in by_worker.values():
        evs.sort(key=lambda ev: ev["job.claimed"][-1])
        gaps += [
            (b["job.claimed"][-1] - a["job.succeeded"][0]).total_seconds() * 1000
            for a, b in zip(evs, evs[1:])
        ]
    out["between two jobs of one worker (Celery hand-off, claim)"] = h.median(gaps)
    out["job_steps.duration_ms"] = h.median([d for _, d in steps])
    out["worker busy per job (claimed -> succeeded)"] = h.median(
        [
            (ev["job.succeeded"][0] - ev["job.claimed"][0]).total_seconds() * 1000
            for ev in by_job.values()
            if "job.succeeded" in ev and "job.claimed" in ev
        ]
    )
    out["events per job"] = h.median([sum(len(v) for v in ev.values()) for ev in by_job.values()])
    first = min(j.created_at for j in jobs)
    last = max(j.finished_at for j in jobs)
    out["first created_at -> last finished_at (s)"] = (last - first).total_seconds()
    return out


# ---------------------------------------------------------------- the section


def run(
    res: h.Resources,
    cluster: h.Cluster,
    dialect: str,
    n: int,
    revisions: int,
    rounds: int = 3,
    profiler=None,
) -> dict:
    """(a) once, then `rounds` rounds of (b) and (c) taking turns.

    This machine's disk speeds up and slows down between runs ((b) took 7.6
    to 10.8 s for the same 200 SQLite databases within an afternoon), so one
    (b) beside one (c) says more about the disk than about Retort. Each round
    measures (b) and (c) one right after the other, the order swapped every
    round; (c)/(b) is the median of the rounds' ratios, and every round is
    reported.
    """
    files = h.synthetic_chain(revisions)
    head = h.chain_head(files)
    last_table = f"t{(revisions - 1) // 3}"
    workdir = res.tmpdir(f"alembic-{dialect}")
    write_alembic_project(workdir, files)
    targets = Targets(res, dialect, n)
    result: dict[str, Any] = {"dialect": dialect, "databases": n, "revisions": revisions}

    h.log(f"fleet {dialect}: (a) alembic CLI x {n}")
    urls = targets.fresh()
    result["cli_s"] = way_cli(workdir, urls)
    bad = verify(urls, head, last_table)
    result["cli_verified"] = not bad
    result["api_verified"] = result["retort_verified"] = True

    def b() -> float:
        h.log(f"fleet {dialect}: (b) Alembic Python API, one process (round {k + 1})")
        urls = targets.fresh()
        api = way_api(workdir, urls)
        result["api_load_ms"] = api["load_ms"]
        api_bad = verify(urls, head, last_table)
        result["api_verified"] &= not api_bad
        bad.extend(api_bad)
        return api["seconds"]

    def c() -> dict[str, Any]:
        h.log(f"fleet {dialect}: (c) Retort, 2 workers (round {k + 1})")
        urls = targets.fresh()
        retort = way_retort(cluster, urls, files, f"{dialect}{k}", profiler if k == 0 else None)
        retort_bad = verify(urls, head, last_table)
        result["retort_verified"] &= not retort_bad
        bad.extend(retort_bad)
        return retort

    measured = []
    for k in range(rounds):
        if k % 2 == 0:
            api_s = b()
            retort = c()
        else:
            retort = c()
            api_s = b()
        measured.append((retort["seconds"] / api_s, api_s, retort))
        h.log(
            f"fleet {dialect} round {k + 1}: (b) {api_s:.2f}s (c) {retort['seconds']:.2f}s "
            f"(c)/(b) {retort['seconds'] / api_s:.3f}"
        )
    result["rounds"] = [
        {"api_s": api_s, "retort_s": r["seconds"], "c_over_b": ratio}
        for ratio, api_s, r in measured
    ]
    # The round whose ratio is the median gives the (b), (c) and phases shown.
    ratio, api_s, retort = sorted(measured, key=lambda m: m[0])[(len(measured) - 1) // 2]
    result["api_s"] = api_s
    result["retort_s"] = retort["seconds"]
    result["retort_post_s"] = retort["post_seconds"]
    result["phases"] = retort["phases"]
    result["verify_errors"] = bad[:10]
    result["c_over_a"] = result["retort_s"] / result["cli_s"]
    result["c_over_b"] = ratio
    h.log(
        f"fleet {dialect}: cli {result['cli_s']:.2f}s; median round: api {api_s:.2f}s "
        f"retort {result['retort_s']:.2f}s; (c)/(a) {result['c_over_a']:.3f} "
        f"(c)/(b) {ratio:.3f}; verified {not bad}"
    )
    return result
