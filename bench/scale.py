"""Scale: API operations on an empty PostgreSQL store, then on one holding 100,000 jobs
(300,000 steps) and 1,000,000 audit events, filled with INSERT ... SELECT generate_series.

The bulk audit events carry dummy hashes (md5(seq) twice): the chain does not
verify across them (GET /v1/audit/verify reports the first bulk event), which
none of the measured paths reads. The API runs without workers, so the jobs
the benchmark creates stay queued and nothing else runs during a measurement;
between the two phases they are marked cancelled so later requests do not
coalesce into them.
"""

from __future__ import annotations

import time
from typing import Any

import sqlalchemy as sa

from bench import harness as h

# The "empty" store: 120 jobs and 300 events on two databases fill a first and a
# deep page of every list measured (50 jobs, 100 events), also per database.
EMPTY_JOBS = 120
EMPTY_EVENTS = 300


FILL_JOBS = """
WITH dbs AS (
    SELECT id, project_id, row_number() OVER (ORDER BY id) - 1 AS k
    FROM databases WHERE project_id = :pid
)
INSERT INTO jobs (database_id, project_id, bundle_pk, action, target, state, from_heads,
                  to_heads, error, fencing_token, lock_waited_ms, dispatched_at, worker,
                  requested_by, created_at, started_at, finished_at)
SELECT d.id, d.project_id, :bundle, 'upgrade', CAST(:head AS text),
       CASE WHEN g % 50 = 0 THEN 'failed' ELSE 'succeeded' END,
       '[]'::json, json_build_array(CAST(:head AS text)),
       CASE WHEN g % 50 = 0
            THEN '{"code": "revision_failed", "message": "bulk", "revision": null,
                   "statement": null}'::json END,
       g, 0, ts, 'bench-fill:1', 'bench-fill', ts, ts + interval '50 ms', ts + interval '400 ms'
FROM generate_series(1, :n) AS g
CROSS JOIN LATERAL (SELECT now() - make_interval(secs => (:n - g) * 5.0) AS ts) AS t
JOIN dbs d ON d.k = g % :ndb
"""

FILL_STEPS = """
INSERT INTO job_steps (job_id, revisions, direction, state, message, sql, sha256,
                       fencing_token, started_at, finished_at, duration_ms)
SELECT j.id, json_build_array('rev' || k), 'up', 'applied', 'bulk step ' || k,
       json_build_array('CREATE TABLE bulk_' || k || ' (id INTEGER NOT NULL PRIMARY KEY)',
                        'UPDATE alembic_version SET version_num=''rev' || k || ''''),
       md5(j.id::text || '-' || k) || md5(k::text), j.fencing_token,
       j.started_at, j.finished_at, 12.5
FROM jobs j CROSS JOIN generate_series(1, 3) AS k
WHERE j.id > :after AND j.requested_by = 'bench-fill'
"""

FILL_EVENTS = """
WITH dbs AS (
    SELECT name, row_number() OVER (ORDER BY id) - 1 AS k
    FROM databases WHERE project_id = :pid
)
INSERT INTO audit_events (seq, ts, actor, action, project, database, job_id, fencing_token,
                          data, prev_hash, hash)
SELECT :base + g, now() - make_interval(secs => (:m - g) * 0.5), 'bench-fill',
       (ARRAY['job.requested', 'job.claimed', 'lease.granted', 'job.started', 'step.applied',
              'job.succeeded', 'lease.released'])[1 + g % 7],
       CAST(:project AS text), d.name, :first_job + (g / 7) % :njobs, g / 7, '{"bulk": true}'::json,
       md5((:base + g - 1)::text) || md5((:base + g - 1)::text),
       md5((:base + g)::text) || md5((:base + g)::text)
FROM generate_series(1, :m) AS g
JOIN dbs d ON d.k = (g / 7) % :ndb
"""


def fill(
    engine, pid: int, bundle: int, head: str, project: str, jobs: int, events: int, ndb: int
) -> float:
    started = time.perf_counter()
    with engine.begin() as c:
        after = c.execute(sa.text("SELECT coalesce(max(id), 0) FROM jobs")).scalar()
        params = {"pid": pid, "bundle": bundle, "head": head, "n": jobs, "ndb": ndb}
        c.execute(sa.text(FILL_JOBS), params)
        c.execute(sa.text(FILL_STEPS), {"after": after})
        first_job = c.execute(sa.text("SELECT min(id) FROM jobs WHERE id > :a"), {"a": after})
        first_job = first_job.scalar()
        base = c.execute(sa.text("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE")).scalar()
        c.execute(
            sa.text(FILL_EVENTS),
            {
                "pid": pid,
                "base": base,
                "m": events,
                "project": project,
                "first_job": first_job,
                "njobs": jobs,
                "ndb": ndb,
            },
        )
        last = base + events
        c.execute(
            sa.text("UPDATE audit_head SET seq = :s, hash = md5(:t) || md5(:t) WHERE id = 1"),
            {"s": last, "t": str(last)},
        )
    with engine.connect().execution_options(isolation_level="AUTOCOMMIT") as c:
        for table in ("jobs", "job_steps", "audit_events"):
            c.exec_driver_sql(f"VACUUM ANALYZE {table}")
    return time.perf_counter() - started


def counts(engine) -> dict[str, int]:
    with engine.connect() as c:
        return {
            t: c.execute(sa.text(f"SELECT count(*) FROM {t}")).scalar()
            for t in ("jobs", "job_steps", "audit_events")
        }


def measure(api: h.Api, engine, project: str, dbs: list[str], reps: int) -> dict[str, Any]:
    from service.jobs.ops import encode_cursor

    with engine.connect() as c:
        ids = [
            r[0]
            for r in c.execute(
                sa.text("SELECT id FROM jobs WHERE requested_by = 'bench-fill' ORDER BY id")
            )
        ]
        nseq = c.execute(sa.text("SELECT seq FROM audit_head")).scalar()
    read_id = ids[len(ids) // 2]
    job_cursor = encode_cursor(ids[len(ids) // 2])
    audit_cursor = encode_cursor(max(2, nseq // 2))
    some_db = dbs[0]  # one of the two databases the empty store's rows are on
    ops: dict[str, Any] = {
        "POST /v1/jobs (create)": None,
        "GET /v1/jobs/{id} (3 steps)": f"/v1/jobs/{read_id}",
        # Finished jobs are served from the API's per-process cache after their first
        # read; a job just created (queued: no worker) is read from the store every time.
        "GET /v1/jobs/{id} (queued, read fresh)": "/v1/jobs/{created}",
        "GET /v1/jobs (first page, 50)": "/v1/jobs",
        "GET /v1/jobs?cursor= (deep page)": f"/v1/jobs?cursor={job_cursor}",
        "GET /v1/jobs?database= (first page)": f"/v1/jobs?database={some_db}",
        "GET /v1/audit (first page, 100)": "/v1/audit",
        "GET /v1/audit?cursor= (deep page)": f"/v1/audit?cursor={audit_cursor}",
        "GET /v1/audit?database= (first page)": f"/v1/audit?database={some_db}",
    }
    out: dict[str, Any] = {}
    created = None
    for label, path in ops.items():
        samples = []
        for i in range(reps + 3):
            started = time.perf_counter()
            if path is None:
                db = dbs[i % len(dbs)]
                r = api.post("/v1/jobs", {"database": db, "action": "upgrade", "target": "head"})
                ok = r.status == 202 and not r.body.get("coalesced_into")
                created = r.body.get("id")
            else:
                r = api.get(path.format(created=created))
                ok = r.status == 200
            elapsed = (time.perf_counter() - started) * 1000
            if not ok:
                raise RuntimeError(f"{label}: {r.status} {str(r.body)[:500]}")
            if i >= 3:
                samples.append(elapsed)
        body = r.body if isinstance(r.body, dict) else {}
        items = len(body.get("jobs") or body.get("events") or body.get("steps") or [])
        out[label] = {
            "median_ms": h.median(samples),
            "p90_ms": h.percentile(samples, 90),
            "items": items,
        }
    with engine.begin() as c:  # let the next phase's requests create jobs, not coalesce
        c.execute(
            sa.text(
                "UPDATE jobs SET state = 'cancelled', finished_at = now() WHERE state = 'queued'"
            )
        )
    return out


def start(res: h.Resources) -> h.Cluster:
    """The API alone (PostgreSQL state, Redis): no worker runs the jobs created here."""
    return h.start_production(res, "scale", workers=0, beat=False)


def run(
    res: h.Resources,
    jobs: int,
    events: int,
    reps: int,
    n_databases: int = 100,
    cluster: h.Cluster | None = None,
) -> dict:
    cluster = cluster or start(res)
    try:
        api = cluster.api()
        project = f"scale-{h.RUN_ID}"
        files = h.synthetic_chain(3, prefix="s")
        bundle = h.setup_project(api, project, files)
        target_dir = res.tmpdir("scale")
        dbs = [f"{project}-db{i:03d}" for i in range(n_databases)]
        for i, name in enumerate(dbs):
            h.register(api, project, name, f"sqlite:///{target_dir}/db{i:03d}.db")
        engine = sa.create_engine(cluster.state_url, poolclass=sa.pool.NullPool)
        with engine.connect() as c:
            pid, bundle_pk = c.execute(
                sa.text(
                    "SELECT p.id, b.pk FROM projects p JOIN bundles b ON b.project_id = p.id "
                    "WHERE p.name = :n"
                ),
                {"n": project},
            ).one()
        head = bundle["heads"][0]
        # "Empty": just enough rows, on two databases, for every measured page to be
        # full, so both phases serialize the same number of items.
        fill(engine, pid, bundle_pk, head, project, EMPTY_JOBS, EMPTY_EVENTS, 2)
        empty_counts = counts(engine)
        h.log(f"scale: empty store {empty_counts}, {reps} repetitions per operation")
        empty = measure(api, engine, project, dbs, reps)
        h.log(f"scale: filling {jobs} jobs, {jobs * 3} steps, {events} audit events")
        fill_s = fill(
            engine,
            pid,
            bundle_pk,
            head,
            project,
            jobs - EMPTY_JOBS,
            events - EMPTY_EVENTS,
            n_databases,
        )
        full_counts = counts(engine)
        h.log(f"scale: filled in {fill_s:.1f} s: {full_counts}")
        full = measure(api, engine, project, dbs, reps)
        api.close()
        engine.dispose()
    finally:
        cluster.stop()
    ops = {
        k: {
            "empty_ms": empty[k]["median_ms"],
            "full_ms": full[k]["median_ms"],
            "ratio": full[k]["median_ms"] / empty[k]["median_ms"],
            "full_p90_ms": full[k]["p90_ms"],
            "items": (empty[k]["items"], full[k]["items"]),
        }
        for k in empty
    }
    for k, v in ops.items():
        h.log(f"scale: {k}: {v['empty_ms']:.1f} ms -> {v['full_ms']:.1f} ms ({v['ratio']:.2f}x)")
    return {
        "reps": reps,
        "empty_counts": empty_counts,
        "full_counts": full_counts,
        "fill_s": fill_s,
        "ops": ops,
    }
