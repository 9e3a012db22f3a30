"""What recording one applied step costs in the state database, with Retort's own code.

    .venv/bin/python bench/stepcost.py [N]

Replays, N times, the transaction a migration child writes per revision
(service.jobs.runner: JobContext.write -> check_fence, a JobStep, a merged
AppliedRevision, the `step.applied` audit event) against a throwaway
PostgreSQL state database, once with the child's engine (NullPool: a new
connection per transaction) and once with a pooled engine, and splits the
time into connecting, statements, COMMIT and the rest (Python).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import sqlalchemy as sa  # noqa: E402

from bench import harness as h  # noqa: E402


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 200
    res = h.Resources()
    try:
        cluster = h.start_production(res, "stepcost", workers=0, beat=False)
        api = cluster.api()
        h.setup_project(api, "p", h.synthetic_chain(3, prefix="c"))
        h.register(api, "p", "d", f"sqlite:///{res.tmpdir('stepcost')}/d.db")
        job = api.ok("POST", "/v1/jobs", {"database": "d", "action": "upgrade", "target": "head"})
        api.close()
        cluster.stop()
        for label, pooled in (("child engine (NullPool)", False), ("pooled engine", True)):
            print(f"{label}: {measure(cluster.state_url, job['id'], n, pooled)}")
    finally:
        res.close()


def measure(state_url: str, job_id: int, n: int, pooled: bool) -> dict:
    from service.config import Config
    from service.databases.models import AppliedRevision
    from service.db import make_engine, make_sessionmaker, transaction, utcnow
    from service.jobs.models import Job, JobStep
    from service.jobs.runner import JobContext, LeaseClock
    from service.locks import ops as leases

    engine = make_engine(state_url, pooled=pooled)
    sessions = make_sessionmaker(engine)
    timing = {"connect": 0.0, "sql": 0.0, "commit": 0.0, "statements": 0}
    marks: dict[str, float] = {}

    @sa.event.listens_for(engine, "do_connect")
    def _before_connect(*_a):
        marks["connect"] = time.perf_counter()

    @sa.event.listens_for(engine, "connect")
    def _after_connect(*_a):
        timing["connect"] += time.perf_counter() - marks.pop("connect", time.perf_counter())

    @sa.event.listens_for(engine, "before_cursor_execute")
    def _before(*_a):
        marks["sql"] = time.perf_counter()

    @sa.event.listens_for(engine, "after_cursor_execute")
    def _after(*_a):
        timing["sql"] += time.perf_counter() - marks.pop("sql")
        timing["statements"] += 1

    @sa.event.listens_for(engine, "commit")
    def _commit(*_a):
        marks["commit"] = time.perf_counter()

    @sa.event.listens_for(sessions, "after_commit")
    def _committed(*_a):
        timing["commit"] += time.perf_counter() - marks.pop("commit", time.perf_counter())

    with transaction(sessions) as s:
        s.execute(sa.update(Job).where(Job.id == job_id).values(state="running"))
        db_id = s.get(Job, job_id).database_id
        leases.release(
            s, db_id, s.scalar(sa.text(f"SELECT token FROM leases WHERE database_id={db_id}"))
        )
        token, _ = leases.try_acquire(s, db_id, job_id, "stepcost", 600)
    ctx = JobContext(
        job_id,
        db_id,
        "d",
        "p",
        {},
        token,
        sessions,
        Config.from_env(
            {
                "RETORT_DATABASE_URL": state_url,
                "RETORT_ADMIN_TOKEN": "x",
                "RETORT_SECRET_KEY": "x",
                "RETORT_DATA_DIR": "/tmp",
            }
        ),
        LeaseClock(),
    )

    def record(s, i):
        s.add(
            JobStep(
                job_id=job_id,
                revisions=[f"r{i}"],
                direction="up",
                state="applied",
                message="m",
                sql=["CREATE TABLE x (id INTEGER)"],
                sha256="0" * 64,
                fencing_token=token,
                started_at=utcnow(),
                finished_at=utcnow(),
                duration_ms=1.0,
            )
        )
        s.merge(
            AppliedRevision(
                database_id=db_id,
                revision=f"r{i}",
                sha256="0" * 64,
                job_id=job_id,
                applied_at=utcnow(),
            )
        )

    samples = []
    for i in range(n + 5):
        if i == 5:
            for k in timing:
                timing[k] = 0
        started = time.perf_counter()
        ctx.write(lambda s, i=i: record(s, i), event="step.applied", data={"revisions": [f"r{i}"]})
        if i >= 5:
            samples.append((time.perf_counter() - started) * 1000)
    engine.dispose()
    return {
        "per step (median)": f"{h.median(samples):.2f} ms",
        "connect": f"{timing['connect'] * 1000 / n:.2f} ms",
        "statements": f"{timing['statements'] / n:.0f} taking {timing['sql'] * 1000 / n:.2f} ms",
        "COMMIT": f"{timing['commit'] * 1000 / n:.2f} ms",
    }


if __name__ == "__main__":
    main()
