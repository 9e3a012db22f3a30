"""Latency: a no-op upgrade (the database is already at head), POST to `succeeded`
as a waiting client sees it (long poll with If-None-Match), one after another.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Any

from bench import harness as h


def _ts(value: str) -> dt.datetime:
    return dt.datetime.fromisoformat(value.replace("Z", "+00:00"))


def run(res: h.Resources, cluster: h.Cluster, layout: str, reps: int, warmup: int = 5) -> dict:
    api = cluster.api()
    project = f"lat-{layout}-{h.RUN_ID}"
    h.setup_project(api, project, h.synthetic_chain(3, prefix="l"))
    target_dir = res.tmpdir(f"lat-{layout}")
    name = f"{project}-db"
    h.register(api, project, name, f"sqlite:///{target_dir}/target.db")
    first = api.post("/v1/jobs", {"database": name, "action": "upgrade", "target": "head"})
    job = api.wait_job(first.body["id"], first.headers.get("ETag"))
    if job["state"] != "succeeded":
        raise RuntimeError(f"the first upgrade failed: {job}")

    h.log(f"latency {layout}: {reps} no-op upgrades in sequence")
    samples: list[float] = []
    server: list[float] = []
    round_trips: list[int] = []
    for i in range(warmup + reps):
        started = time.perf_counter()
        r = api.post("/v1/jobs", {"database": name, "action": "upgrade", "target": "head"})
        if r.status != 202 or r.body.get("coalesced_into"):
            raise RuntimeError(f"POST /v1/jobs -> {r.status}: {r.body}")
        job_id, etag, state, trips = r.body["id"], r.headers.get("ETag"), r.body["state"], 1
        body: dict[str, Any] = r.body
        while state not in h.FINAL:
            g = api.get(f"/v1/jobs/{job_id}?wait=30", headers={"If-None-Match": etag})
            trips += 1
            body, etag, state = g.body, g.headers.get("ETag"), g.body["state"]
        elapsed = (time.perf_counter() - started) * 1000
        if state != "succeeded" or body.get("steps"):
            raise RuntimeError(f"a no-op upgrade did not succeed without steps: {body}")
        if i >= warmup:
            samples.append(elapsed)
            server.append(
                (_ts(body["finished_at"]) - _ts(body["created_at"])).total_seconds() * 1000
            )
            round_trips.append(trips)
    api.close()
    out = {
        "layout": layout,
        "reps": reps,
        "p50_ms": h.percentile(samples, 50),
        "p90_ms": h.percentile(samples, 90),
        "p99_ms": h.percentile(samples, 99),
        "max_ms": max(samples),
        "server_p50_ms": h.percentile(server, 50),
        "server_p99_ms": h.percentile(server, 99),
        "round_trips_p50": h.percentile(round_trips, 50),
    }
    if cluster.state_url and cluster.state_url.startswith("postgresql"):
        out["phases"] = phases(cluster, project)
    h.log(
        f"latency {layout}: p50 {out['p50_ms']:.1f} ms p99 {out['p99_ms']:.1f} ms "
        f"(server created->finished p50 {out['server_p50_ms']:.1f} ms)"
    )
    return out


def phases(cluster: h.Cluster, project: str) -> dict[str, float]:
    """Median gap between consecutive audit events of a no-op job, by event pair (ms)."""
    import sqlalchemy as sa

    engine = cluster.state_engine()
    try:
        with engine.connect() as c:
            rows = c.execute(
                sa.text(
                    "SELECT job_id, action, ts FROM audit_events WHERE project = :p "
                    "AND job_id IS NOT NULL ORDER BY seq"
                ),
                {"p": project},
            ).all()
    finally:
        engine.dispose()
    by_job: dict[int, list] = {}
    for job_id, action, ts in rows:
        by_job.setdefault(job_id, []).append((action, ts))
    gaps: dict[str, list[float]] = {}
    for events in list(by_job.values())[1:]:  # the first job did the real upgrade
        for (a, ta), (b, tb) in zip(events, events[1:]):
            gaps.setdefault(f"{a} -> {b}", []).append((tb - ta).total_seconds() * 1000)
    return {k: h.median(v) for k, v in gaps.items() if v}
