"""API load: GET /v1/jobs/{id} under 16 connections against `retort api` as production
starts it, beside a bare Flask route under identical gunicorn flags, with wrk: once for a
finished job and once for an unfinished (queued) one.
"""

from __future__ import annotations

import dataclasses
import json
import re
import resource
import shutil
import subprocess
import time

from bench import harness as h

INSTALL_WRK = "apt-get install -y wrk   (Debian/Ubuntu; brew install wrk on macOS)"


def wrk_path() -> str | None:
    return shutil.which("wrk")


def _seconds(value: str) -> float:
    m = re.match(r"([\d.]+)(us|ms|s|m)", value)
    if not m:
        return float("nan")
    return float(m.group(1)) * {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0}[m.group(2)]


def wrk(
    url: str,
    token: str,
    seconds: float,
    connections: int,
    threads: int = 2,
    server_pids=None,
    db_pids=None,
) -> dict:
    """Run wrk; with server_pids/db_pids (callables), also account CPU time per request."""
    before_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_server = h.cpu_times(server_pids() if server_pids else [])
    cpu_db = h.cpu_times(db_pids() if db_pids else [])
    out = subprocess.run(
        [
            wrk_path() or "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, round(seconds))}s",
            "--latency",
            "-H",
            f"Authorization: Bearer {token}",
            url,
        ],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    cpu_server = h.cpu_delta(cpu_server, h.cpu_times(server_pids() if server_pids else []))
    cpu_db = h.cpu_delta(cpu_db, h.cpu_times(db_pids() if db_pids else []))
    after_children = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_wrk = (after_children.ru_utime + after_children.ru_stime) - (
        before_children.ru_utime + before_children.ru_stime
    )
    if out.returncode:
        raise RuntimeError(f"wrk failed: {out.stderr}")
    text = out.stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))
    total = int(re.search(r"(\d+) requests in", text).group(1))
    bad = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    errors = re.search(r"Socket errors: (.*)", text)
    lat = dict(re.findall(r"^\s+(50|90|99)%\s+(\S+)", text, re.M))
    return {
        "rps": rps,
        "requests": total,
        "non_2xx": int(bad.group(1)) if bad else 0,
        "socket_errors": errors.group(1) if errors else "",
        "p50_ms": _seconds(lat.get("50", "nan")) * 1000,
        "p99_ms": _seconds(lat.get("99", "nan")) * 1000,
        "cpu_ms_per_request": {
            "gunicorn": cpu_server * 1000 / max(1, total),
            "postgresql": cpu_db * 1000 / max(1, total),
            "wrk": cpu_wrk * 1000 / max(1, total),
        },
        "raw": text,
    }


def run(
    res: h.Resources, cluster: h.Cluster, seconds: float, connections: int = 16, profiler=None
) -> dict:
    """Measure a finished job and an unfinished one, each beside the bare route.

    Stops the cluster's workers once the finished job is done, so that a second
    job stays `queued` (nothing will run it) and is read fresh from the state
    database on every request. The API section is the last to use the shared
    production cluster (bench/run.py stops it right after).
    """
    if wrk_path() is None:
        raise RuntimeError(f"wrk is not installed: {INSTALL_WRK}")
    from service.cli import api_command
    from service.config import Config

    api = cluster.api()
    project = f"load-{h.RUN_ID}"
    h.setup_project(api, project, h.synthetic_chain(3, prefix="w"))
    target_dir = res.tmpdir("load")
    h.register(api, project, f"{project}-db", f"sqlite:///{target_dir}/target.db")
    r = api.post("/v1/jobs", {"database": f"{project}-db", "action": "upgrade", "target": "head"})
    job = api.wait_job(r.body["id"], r.headers.get("ETag"))
    if job["state"] != "succeeded":
        raise RuntimeError(f"setup job failed: {job}")
    res.stop([cluster.procs.pop(name) for name in list(cluster.procs) if name.startswith("worker")])
    r = api.post(
        "/v1/jobs",
        {"database": f"{project}-db", "action": "downgrade", "target": "base", "coalesce": False},
    )
    if r.status != 202:
        raise RuntimeError(f"could not queue the unfinished job: {r.status} {r.body}")
    docs = {}
    for key, job_id in (("finished", job["id"]), ("unfinished", r.body["id"])):
        docs[key] = api.get(f"/v1/jobs/{job_id}").body
    if docs["unfinished"]["state"] != "queued":
        raise RuntimeError(f"the unfinished job did not stay queued: {docs['unfinished']}")
    bodies = {str(d["id"]): json.dumps(d, separators=(",", ":")) for d in docs.values()}
    api.close()

    # The baseline: the same gunicorn command line `retort api` builds, another app.
    config = Config.from_env(cluster.env)
    port = h.free_port()
    cmd = api_command(dataclasses.replace(config, port=port))
    retort_cmd = api_command(config)
    assert cmd[-1] == "service.wsgi:app", cmd
    cmd[-1] = "bench.constapp:app"
    doc_path = cluster.data_dir / "const.json"
    doc_path.write_text(json.dumps(bodies))
    env = {**h.clean_env(), "RETORT_BENCH_CONST_JSON": str(doc_path)}
    const = h.Cluster(res, port, cluster.token, env, cluster.data_dir)
    const.procs["const"] = res.spawn("constapp", cmd, env, cluster.data_dir)
    deadline = time.monotonic() + 30
    probe = h.Api(port, cluster.token)
    while True:
        try:
            if probe.get(f"/v1/jobs/{job['id']}").status == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the constant app did not start")
        time.sleep(0.1)
    probe.close()

    h.log(
        f"api load: wrk {connections} connections, {seconds:.0f} s each, a finished and an "
        "unfinished job, Retort then bare Flask"
    )
    warm = seconds >= 5  # warm up pools and threads (not in --quick runs)
    runs = {}
    for key in ("finished", "unfinished"):
        path = f"/v1/jobs/{docs[key]['id']}"
        for app, app_port, pids, db_pids in (
            (
                "retort",
                cluster.port,
                lambda: h.process_tree(cluster.procs["api"].popen.pid),
                lambda: h.pg_backends(cluster.state_url),
            ),
            ("bare", port, lambda: h.process_tree(const.procs["const"].popen.pid), None),
        ):
            url = f"http://127.0.0.1:{app_port}{path}"
            if warm:
                wrk(url, cluster.token, 1, connections)
            if profiler is not None and app == "retort":
                profiler.start(f"api-load-{key}", only=("api",))
            runs[app, key] = wrk(
                url, cluster.token, seconds, connections, server_pids=pids, db_pids=db_pids
            )
            if profiler is not None and app == "retort":
                profiler.stop()
    const.stop()

    def figures(result: dict) -> dict:
        return {k: v for k, v in result.items() if k != "raw"}

    out = {
        "seconds": seconds,
        "connections": connections,
        "body_bytes": len(bodies[str(job["id"])]),
        "steps": len(job["steps"]),
        "unfinished_body_bytes": len(bodies[str(docs["unfinished"]["id"])]),
        "gunicorn_flags": " ".join(retort_cmd[3:-1]).replace(
            f"127.0.0.1:{cluster.port}", "127.0.0.1:PORT"
        ),
        # The goal's figures: the finished job (these keys predate the unfinished one).
        "retort": figures(runs["retort", "finished"]),
        "bare": figures(runs["bare", "finished"]),
        "ratio": runs["retort", "finished"]["rps"] / runs["bare", "finished"]["rps"],
        "unfinished": {
            "retort": figures(runs["retort", "unfinished"]),
            "bare": figures(runs["bare", "unfinished"]),
            "ratio": runs["retort", "unfinished"]["rps"] / runs["bare", "unfinished"]["rps"],
        },
    }
    for (app, key), result in runs.items():
        if result["non_2xx"]:
            raise RuntimeError(f"{app} ({key} job): errors under load:\n{result['raw']}")
    h.log(
        f"api load: finished job: Retort {out['retort']['rps']:.0f} req/s, bare Flask "
        f"{out['bare']['rps']:.0f} req/s, ratio {out['ratio']:.2f}; unfinished job: Retort "
        f"{out['unfinished']['retort']['rps']:.0f} req/s, bare Flask "
        f"{out['unfinished']['bare']['rps']:.0f} req/s, ratio {out['unfinished']['ratio']:.2f}"
    )
    return out
