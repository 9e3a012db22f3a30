"""A worker's own CPU per job, against Alembic's floor, with the disk taken out.

    .venv/bin/python bench/workercpu.py [--jobs 100] [--dir /dev/shm] [--profile FILE]

One process, no Celery, no second worker: N jobs of the fleet's 30-revision
chain are created through the API (Flask's test client, PostgreSQL state) and
run one after another by `run_job` (service/jobs/run/claim.py), as a pool process runs them; then
way (b) of the fleet (`bench/fleet_api.py`) runs the same chain on as many
fresh databases. The SQLite targets live in `--dir` (tmpfs by default), so
fsync does not decide the figures and what is left is CPU: the difference is
what Retort's coordination costs a worker per job (claim, lease, state writes,
audit, the target's session lock), measured to a fraction of a millisecond
where the fleet's wall times move by several percent from run to run.

Like a pool process, this one freezes its start-up heap before the first job
(worker/tasks.py:_settle_heap; `--no-freeze` does not). Prints per-job wall and CPU times; writes
nothing.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import logging
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import fleet  # noqa: E402
from bench import harness as h  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=100)
    parser.add_argument("--dir", default="/dev/shm", help="where the SQLite targets go")
    parser.add_argument(
        "--no-freeze",
        action="store_true",
        help="leave the heap unfrozen, as pool processes did before commit 34a06b3",
    )
    parser.add_argument(
        "--profile",
        metavar="FILE",
        help="cProfile the timed jobs (the main thread) into FILE; the times then include it",
    )
    args = parser.parse_args()
    from cryptography.fernet import Fernet

    res = h.Resources()
    targets_dir = Path(tempfile.mkdtemp(prefix="rtbench-cpu-", dir=args.dir))
    try:
        env = {
            "RETORT_DATABASE_URL": res.new_pg_database("cpu_state"),
            "RETORT_BROKER_URL": h.REDIS,
            "RETORT_QUEUE": res.new_queue(),
            "RETORT_DATA_DIR": str(res.tmpdir("cpu-data")),
            "RETORT_SQLITE_ROOTS": str(targets_dir),
            "RETORT_ADMIN_TOKEN": f"rtbench-admin-{h.RUN_ID}",
            "RETORT_SECRET_KEY": Fernet.generate_key().decode(),
        }
        subprocess.run(h.cli("db", "upgrade"), env={**h.clean_env(), **env}, cwd=h.ROOT, check=True)
        os.environ.update(env)
        from service.app import create_app
        from service.config import Config
        from service.db import PING_IDLE_AFTER_S, make_engine
        from service.jobs.run.claim import run_job
        from service.jobs.run.context import WorkerProcess
        from service.sessions import make_state_sessions
        from service.webhooks import outbox

        logging.getLogger("alembic.runtime.migration").setLevel(logging.WARNING)
        config = Config.from_env()
        client = create_app(config).test_client()
        auth = {"Authorization": f"Bearer {env['RETORT_ADMIN_TOKEN']}"}
        files = h.synthetic_chain(30)

        def ok(method: str, path: str, **kw):
            r = client.open(path, method=method, headers={**auth, **kw.pop("headers", {})}, **kw)
            if r.status_code >= 300:
                raise RuntimeError(f"{method} {path} -> {r.status_code}: {r.get_data(True)}")
            return r.get_json()

        ok("POST", "/v1/projects", json={"name": "cpu", "settings": {}})
        ok(
            "POST",
            "/v1/projects/cpu/bundles",
            data=h.make_tar(files),
            headers={"Content-Type": "application/gzip"},
        )
        n = args.jobs + 1  # the first job warms the process up and is not counted
        job_ids = []
        for i in range(n):
            url = f"sqlite:///{targets_dir}/retort{i:04d}.db"
            ok("POST", "/v1/databases", json={"name": f"d{i}", "project": "cpu", "url": url})
            body = {"database": f"d{i}", "action": "upgrade", "target": "head"}
            job_ids.append(ok("POST", "/v1/jobs", json=body)["id"])
        sessions = make_state_sessions(
            make_engine(config.database_url, ping_idle_after_s=PING_IDLE_AFTER_S),
            config.audit_keys,
        )
        outbox.attach(sessions, config)
        if not args.no_freeze:
            gc.collect()
            gc.freeze()
        process = WorkerProcess(config, sessions)
        run_job(process, job_ids[0])  # also starts the project's runner (kept warm)
        profile = cProfile.Profile() if args.profile else None
        runner_cpu = _runners_cpu(process)
        wall, cpu = time.perf_counter(), time.process_time()
        if profile:
            profile.enable()
        for job_id in job_ids[1:]:
            run_job(process, job_id)
        if profile:
            profile.disable()
            profile.dump_stats(args.profile)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        runner_cpu = _runners_cpu(process) - runner_cpu
        states = [ok("GET", f"/v1/jobs/{j}")["state"] for j in job_ids]
        if set(states) != {"succeeded"}:
            raise RuntimeError(f"not every job succeeded: {sorted(set(states))}")

        workdir = res.tmpdir("cpu-alembic")
        fleet.write_alembic_project(workdir, files)
        urls = workdir / "urls.txt"
        urls.write_text(
            "\n".join(f"sqlite:///{targets_dir}/alembic{i:04d}.db" for i in range(args.jobs))
        )
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        out = subprocess.run(
            [sys.executable, str(Path(__file__).with_name("fleet_api.py")), str(workdir), urls],
            capture_output=True,
            text=True,
            check=True,
        )
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        floor = json.loads(out.stdout)["seconds"]
        floor_cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
        per = 1000 / args.jobs
        print(f"{args.jobs} jobs of 30 revisions, SQLite targets in {args.dir}")
        print(
            f"  Retort, run_job one after another: {wall * per:.2f} ms wall, {cpu * per:.2f} ms CPU"
            f" in the worker + {runner_cpu * per:.2f} ms in its runner"
        )
        print(
            f"  way (b), Alembic's API:            {floor * per:.2f} ms wall, "
            f"{floor_cpu * per:.2f} ms CPU (with its process's start-up)"
        )
        print(f"  Retort's coordination, wall:       {(wall - floor) * per:.2f} ms per job")
    finally:
        res.close()
        subprocess.run(["rm", "-rf", str(targets_dir)], check=False)


def _runners_cpu(process) -> float:
    """CPU seconds used so far by the worker's warm runners and every process under them."""
    stats = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            stats[int(entry)] = (int(fields[1]), int(fields[11]) + int(fields[12]))  # ppid, cpu
    roots = {r.proc.pid for r in process.pool.idle.values()}
    total = 0
    for pid, (_ppid, cpu) in stats.items():
        p = pid
        while p in stats and p not in roots:
            p = stats[p][0]
        if p in roots:
            total += cpu
    return total / os.sysconf("SC_CLK_TCK")


if __name__ == "__main__":
    main()
