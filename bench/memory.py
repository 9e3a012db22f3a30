"""Memory: RSS of each worker (Celery main process and its pool child) after the
first 10 jobs and after 1,000 jobs across 10 projects (SQLite targets, 3
revisions each, alternately upgraded to head and downgraded to base).
"""

from __future__ import annotations

from typing import Any

from bench import harness as h


def snapshot(cluster: h.Cluster) -> dict[str, dict[str, int]]:
    out = {}
    for name, proc in cluster.procs.items():
        if not name.startswith("worker"):
            continue
        main = proc.popen.pid
        out[f"{name} main ({main})"] = h.proc_status(main)
        kids = h.children(main)
        for kid in kids:
            try:
                out[f"{name} pool child ({kid})"] = h.proc_status(kid)
            except FileNotFoundError:
                pass
    return out


def start(res: h.Resources) -> h.Cluster:
    """Fresh workers: the memory they hold is only this benchmark's."""
    return h.start_production(res, "memory")


def run(
    res: h.Resources, total: int, projects: int = 10, cluster: h.Cluster | None = None
) -> dict[str, Any]:
    cluster = cluster or start(res)
    try:
        api = cluster.api()
        target_dir = res.tmpdir("memory")
        dbs = []
        for p in range(projects):
            project = f"mem{p}-{h.RUN_ID}"
            # Each project its own revision ids and tables.
            h.setup_project(api, project, h.synthetic_chain(3, prefix=f"m{p}x", tables=f"p{p}t"))
            name = f"{project}-db"
            h.register(api, project, name, f"sqlite:///{target_dir}/p{p}.db")
            dbs.append(name)
        samples: dict[int, Any] = {}
        done = 0
        rounds = max(1, total // len(dbs))
        h.log(f"memory: {rounds * len(dbs)} jobs over {len(dbs)} projects, 2 workers")
        marks = {len(dbs), rounds * len(dbs) // 10, rounds * len(dbs) // 2, rounds * len(dbs)}
        for r in range(rounds):
            action, target = ("upgrade", "head") if r % 2 == 0 else ("downgrade", "base")
            posted = []
            for name in dbs:
                resp = api.post("/v1/jobs", {"database": name, "action": action, "target": target})
                if resp.status != 202:
                    raise RuntimeError(f"POST /v1/jobs -> {resp.status}: {resp.body}")
                posted.append((resp.body["id"], resp.headers.get("ETag")))
            for job_id, etag in posted:
                job = api.wait_job(job_id, etag)
                if job["state"] != "succeeded":
                    raise RuntimeError(f"memory job failed: {job}")
            done += len(dbs)
            if done in marks:
                samples[done] = snapshot(cluster)
        api.close()
    finally:
        cluster.stop()
    first, last = samples[min(samples)], samples[max(samples)]
    procs = {}
    for key in first:
        if key not in last:
            continue  # a pool child was replaced: reported below under its own name
        procs[key] = {
            "rss_after_first_kib": first[key]["VmRSS"],
            "hwm_after_first_kib": first[key]["VmHWM"],
            "rss_after_all_kib": last[key]["VmRSS"],
            "hwm_after_all_kib": last[key]["VmHWM"],
            "ratio": last[key]["VmHWM"] / first[key]["VmRSS"],
            "trend_rss_kib": {n: s.get(key, {}).get("VmRSS") for n, s in sorted(samples.items())},
        }
    replaced = sorted(set(first) ^ set(last))
    out = {"jobs": done, "first": min(samples), "processes": procs, "replaced": replaced}
    for key, v in procs.items():
        h.log(
            f"memory: {key}: RSS {v['rss_after_first_kib'] / 1024:.1f} MiB after {min(samples)} "
            f"jobs, peak {v['hwm_after_all_kib'] / 1024:.1f} MiB after {done} "
            f"({v['ratio']:.2f}x)"
        )
    return out
