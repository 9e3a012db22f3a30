"""Write bench/run.py's results into BENCHMARKS.md, between `<!-- bench:NAME -->` markers.

Everything outside the markers (the runner section, hand-written
analysis) is kept; a section that was not run keeps its previous block.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

ORDER = ("summary", "fleet", "latency", "api", "scale", "memory")
HEADINGS = {
    "summary": "## Issue 6: goals at a glance",
    "fleet": "## Fleet: N databases from base to head",
    "latency": "## Latency: a no-op upgrade, POST to `succeeded`",
    "api": "## API load: `GET /v1/jobs/{id}`, 16 connections",
    "scale": "## Scale: 100,000 jobs and 1,000,000 audit events",
    "memory": "## Memory: a worker after 1,000 jobs",
}


def _ms(v: float) -> str:
    return f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def _s(v: float) -> str:
    return f"{v:.1f} s" if v < 100 else f"{v:.0f} s"


def _mark(met: bool | None) -> str:
    return {True: "met", False: "**missed**", None: "—"}[met]


def _footer(results: dict[str, Any], section: str) -> str:
    m = results["machine"]
    when = time.strftime("%Y-%m-%d")
    return (
        f"\nReproduce: `{_section_command(results['command'], section)}` "
        f"(measured {when}, commit {m.get('commit', '?')}, load average before the run "
        f"{m.get('load_before', '?')}).\n"
    )


def _section_command(command: str, section: str) -> str:
    if "--only" in command or section == "summary":
        return command
    return f"{command} --only {section}".replace("  ", " ")


def summary(results: dict[str, Any], goals: list[dict[str, Any]]) -> str:
    m = results["machine"]
    lines = [
        HEADINGS["summary"],
        "",
        f"One run of `{results['command']}` ({results['seconds'] / 60:.0f} min) on "
        f"{m['cpu']}, {m['memory']} RAM, Linux {m['kernel']}; Python {m['python']}, "
        f"PostgreSQL {m['postgresql']}, Redis {m['redis']}, SQLite {m['sqlite']}, "
        f"Alembic {m.get('alembic')}, SQLAlchemy {m.get('sqlalchemy')}, Celery {m.get('celery')}, "
        f"gunicorn {m.get('gunicorn')}, wrk {m.get('wrk', '?')}. Figures vary by a few "
        "percent from run to run, more when other work shares the machine (the load average "
        "before the run is given below).",
        "",
        "| goal | measured | target | |",
        "| --- | ---: | ---: | --- |",
    ]
    for g in goals:
        lines.append(f"| {g['what']} | {g['shown']} | {g['goal']} | {_mark(g['met'])} |")
    return "\n".join(lines) + "\n" + _footer(results, "summary")


def fleet(results: dict[str, Any]) -> str:
    lines = [
        HEADINGS["fleet"],
        "",
        "A generated chain of 30 revisions (ten times: create a table, add a column, index it)."
        " Three ways, in the same run, from empty databases to head:",
        "",
        "- **(a)** the `alembic` CLI once per database in a shell loop (`while read url; do "
        "alembic -x url=$url upgrade head; done`), with a minimal `alembic.ini` and `env.py`;",
        "- **(b)** Alembic's Python API in one process, serially, one `ScriptDirectory` loaded "
        "once (`bench/fleet_api.py`): the floor for one process;",
        "- **(c)** Retort in the production layout (PostgreSQL state, Redis, `retort api` under "
        "gunicorn, two `retort worker --concurrency 1`, `retort beat`): N jobs POSTed one after "
        "another, wall time from the first POST to the last job seen `succeeded` (long poll).",
        "",
        "(a) and (b) do on the target what a Retort job does: SQLite made transactional "
        "(SQLAlchemy's pysqlite recipe) and one transaction per revision. Afterwards every "
        "database of every way is read back: `alembic_version` is the head and the last table "
        "exists.",
        "",
        "(a) runs once. (b) and (c) run in rounds, one right after the other, the order "
        "swapped every round: this machine's disk speeds up and slows down between runs, so "
        "only a (b) measured beside its (c) compares them fairly. (c)/(b) is the median of the "
        "rounds' ratios; the (b) and (c) shown are that round's, and every round is listed "
        "below the table.",
        "",
        "| targets | (a) alembic CLI | (b) Python API | (c) Retort | (c)/(a) (goal ≤ 0.15) "
        "| (c)/(b) (goal ≤ 1.0) | all at head |",
        "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for f in results["fleet"]:
        name = "SQLite" if f["dialect"] == "sqlite" else "PostgreSQL"
        ok = f["cli_verified"] and f["api_verified"] and f["retort_verified"]
        lines.append(
            f"| {f['databases']} {name} | {_s(f['cli_s'])} | {_s(f['api_s'])} | "
            f"{_s(f['retort_s'])} | {f['c_over_a']:.3f} | {f['c_over_b']:.2f} | "
            f"{'yes' if ok else '**no**'} |"
        )
    lines.append("")
    for f in results["fleet"]:
        name = "SQLite" if f["dialect"] == "sqlite" else "PostgreSQL"
        shown = "; ".join(
            f"{_s(r['api_s'])} / {_s(r['retort_s'])} = {r['c_over_b']:.2f}"
            for r in f.get("rounds", [])
        )
        if shown:
            lines.append(f"- {f['databases']} {name}, each round's (b) / (c) = (c)/(b): {shown}")
    lines += [
        "",
        "Per database:",
        "",
        "| targets | (a) | (b) | (c) | (c), one worker's time |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for f in results["fleet"]:
        name = "SQLite" if f["dialect"] == "sqlite" else "PostgreSQL"
        n = f["databases"]
        busy = f["phases"]["worker busy per job (claimed -> succeeded)"]
        lines.append(
            f"| {name} | {_ms(f['cli_s'] * 1000 / n)} | {_ms(f['api_s'] * 1000 / n)} | "
            f"{_ms(f['retort_s'] * 1000 / n)} | {_ms(busy)} |"
        )
    lines += [
        "",
        "Where a Retort job's time goes (medians over the run's jobs, from the timestamps of "
        "their audit events and `job_steps`):",
        "",
        "| phase | "
        + " | ".join(
            "SQLite" if f["dialect"] == "sqlite" else "PostgreSQL" for f in results["fleet"]
        )
        + " |",
        "| --- |" + " ---: |" * len(results["fleet"]),
    ]
    keys = list(results["fleet"][0]["phases"])
    for key in keys:
        cells = []
        for f in results["fleet"]:
            v = f["phases"].get(key)
            if v is None:
                cells.append("—")
            elif "(s)" in key:
                cells.append(_s(v))
            elif key == "events per job":
                cells.append(f"{v:.0f}")
            else:
                cells.append(_ms(v))
        lines.append(f"| {key} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        f"(b) loads the `ScriptDirectory` once: {results['fleet'][0]['api_load_ms']:.0f} ms. "
        f"POSTing the jobs took {results['fleet'][0]['retort_post_s']:.1f} s of (c) on SQLite."
    )
    return "\n".join(lines) + "\n" + _footer(results, "fleet")


def latency(results: dict[str, Any]) -> str:
    lines = [
        HEADINGS["latency"],
        "",
        "The database is already at head (a SQLite target, 3-revision bundle). A client POSTs "
        "`upgrade head`, then long-polls `GET /v1/jobs/{id}?wait=30` with the last `ETag` in "
        "`If-None-Match` until the job is final; one job after the other (identical pending "
        "requests would coalesce). Time from sending the POST to reading `succeeded`.",
        "",
        "| layout | jobs | p50 (goal ≤ 30 ms) | p90 | p99 (goal ≤ 100 ms) | max | server: "
        "created_at → finished_at, p50 | requests per job, p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    names = {
        "production": "production (PostgreSQL state, Redis, gunicorn, 2 workers)",
        "embedded": "embedded default (`retort serve`: SQLite state, bundled Redis)",
    }
    for lat in results["latency"]:
        lines.append(
            f"| {names[lat['layout']]} | {lat['reps']} | {_ms(lat['p50_ms'])} | "
            f"{_ms(lat['p90_ms'])} | {_ms(lat['p99_ms'])} | {_ms(lat['max_ms'])} | "
            f"{_ms(lat['server_p50_ms'])} | {lat['round_trips_p50']} |"
        )
    prod = next((x for x in results["latency"] if x.get("phases")), None)
    if prod:
        lines += [
            "",
            "Inside a no-op job (production layout; median gap between consecutive audit "
            "events of a job):",
            "",
            "| from → to | median |",
            "| --- | ---: |",
        ]
        for k, v in prod["phases"].items():
            lines.append(f"| {k} | {_ms(v)} |")
    return "\n".join(lines) + "\n" + _footer(results, "latency")


def api(results: dict[str, Any]) -> str:
    a = results["api"]
    unfinished = a.get("unfinished")  # absent from runs before it was measured
    lines = [
        HEADINGS["api"],
        "",
        f"`wrk -t2 -c{a['connections']} -d{a['seconds']:.0f}s` against `retort api` as "
        f"production starts it (`gunicorn {a['gunicorn_flags']} service.wsgi:app`: PostgreSQL "
        "state, admin token) reading a finished job with "
        f"{a['steps']} steps ({a['body_bytes']} bytes of JSON)"
        + (
            f" and an unfinished one (`queued`: the workers are stopped first, so nothing runs "
            f"it; no steps, {a['unfinished_body_bytes']} bytes)"
            if unfinished
            else ""
        )
        + ", and against a bare Flask route (`bench/constapp.py`) answering the same bytes as a "
        "constant, under the same gunicorn flags, in the same run.",
        "",
        "| app | requests/s | p50 | p99 | CPU per request: gunicorn | PostgreSQL | wrk |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    rows = [
        ("Retort `GET /v1/jobs/{id}`, finished job", a["retort"]),
        ("bare Flask, the finished job's JSON", a["bare"]),
    ]
    if unfinished:
        rows += [
            ("Retort `GET /v1/jobs/{id}`, unfinished job", unfinished["retort"]),
            ("bare Flask, the unfinished job's JSON", unfinished["bare"]),
        ]
    for label, r in rows:
        cpu = r.get("cpu_ms_per_request", {})
        cells = " | ".join(
            f"{cpu.get(k, float('nan')):.2f} ms" for k in ("gunicorn", "postgresql", "wrk")
        )
        lines.append(
            f"| {label} | {r['rps']:.0f} | {_ms(r['p50_ms'])} | {_ms(r['p99_ms'])} | {cells} |"
        )
    lines += ["", f"Ratio Retort / bare, finished job: **{a['ratio']:.2f}** (goal ≥ 0.6)."]
    if unfinished:
        lines[-1] += f" Unfinished job: **{unfinished['ratio']:.2f}**."
    return "\n".join(lines) + "\n" + _footer(results, "api")


def scale(results: dict[str, Any]) -> str:
    s = results["scale"]
    fc = s["full_counts"]
    lines = [
        HEADINGS["scale"],
        "",
        f"The same API operations (median of {s['reps']} through HTTP, keep-alive) on a nearly "
        f"empty PostgreSQL store ({s['empty_counts']['jobs']} jobs, "
        f"{s['empty_counts']['audit_events']} audit events: just enough, on two databases, for "
        "every measured page to be full, so both sides serialize as many items) and on one "
        "filled with "
        "`INSERT … SELECT generate_series` "
        f"to {fc['jobs']:,} jobs, {fc['job_steps']:,} steps "
        f"and {fc['audit_events']:,} audit events over 100 databases (in {s['fill_s']:.0f} s, "
        "then `VACUUM ANALYZE`). The bulk audit events carry dummy hashes, so "
        "`/v1/audit/verify` fails on them; no measured path reads hashes. The API runs without "
        "workers, so created jobs stay queued and nothing else runs meanwhile; a deep page is "
        "the one behind a cursor in the middle of the table. A finished job is served from the "
        "API's per-process cache after its first read, so the store is measured by the queued "
        "job (one just created), read fresh each time.",
        "",
        "| operation | items (empty / full) | empty | full | full / empty (goal ≤ 2) | full, p90 |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for k, v in s["ops"].items():
        bold = "**" if v["ratio"] > 2 else ""
        items = v.get("items") or ("?", "?")
        lines.append(
            f"| `{k}` | {items[0]} / {items[1]} | {_ms(v['empty_ms'])} | {_ms(v['full_ms'])} | "
            f"{bold}{v['ratio']:.2f}×{bold} | {_ms(v['full_p90_ms'])} |"
        )
    return "\n".join(lines) + "\n" + _footer(results, "scale")


def memory(results: dict[str, Any]) -> str:
    m = results["memory"]
    lines = [
        HEADINGS["memory"],
        "",
        f"Production layout, {m['jobs']} jobs over 10 projects (one SQLite database each, "
        "3 revisions; rounds of 10 jobs alternately `upgrade head` and `downgrade base`). "
        "`VmRSS`/`VmHWM` from `/proc/<pid>/status` of each worker's Celery main process and "
        "its prefork pool child, which runs these bundles' migrations itself (no helper "
        "modules) and keeps their loaded scripts and target engines.",
        "",
        f"| process | RSS after the first {m['first']} jobs | RSS after {m['jobs']} | peak (VmHWM) "
        f"after {m['jobs']} | peak / first (goal ≤ 1.5) |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for k, v in m["processes"].items():
        name = re.sub(r" \(\d+\)", "", k)
        lines.append(
            f"| {name} | {v['rss_after_first_kib'] / 1024:.1f} MiB | "
            f"{v['rss_after_all_kib'] / 1024:.1f} MiB | {v['hwm_after_all_kib'] / 1024:.1f} MiB | "
            f"{v['ratio']:.2f}× |"
        )
    if m.get("replaced"):
        lines += ["", f"Processes replaced during the run: {', '.join(m['replaced'])}."]
    trend = []
    for k, v in m["processes"].items():
        name = re.sub(r" \(\d+\)", "", k)
        points = ", ".join(f"{n}: {rss / 1024:.1f}" for n, rss in v["trend_rss_kib"].items() if rss)
        trend.append(f"- {name}: {points} MiB")
    lines += ["", "RSS after N jobs:", "", *trend]
    return "\n".join(lines) + "\n" + _footer(results, "memory")


def update_benchmarks_md(path: Path, results: dict[str, Any], goals: list[dict[str, Any]]) -> None:
    text = path.read_text() if path.exists() else "# Benchmarks\n"
    blocks: dict[str, str] = {}
    if all(k in results for k in ("fleet", "latency", "api", "scale", "memory")):
        blocks["summary"] = summary(results, goals)
    for name, fn in (
        ("fleet", fleet),
        ("latency", latency),
        ("api", api),
        ("scale", scale),
        ("memory", memory),
    ):
        if results.get(name):
            blocks[name] = fn(results)
    for name in ORDER:
        if name not in blocks:
            continue
        begin, end = f"<!-- bench:{name}:begin -->", f"<!-- bench:{name}:end -->"
        block = f"{begin}\n{blocks[name].rstrip()}\n{end}"
        pattern = re.compile(re.escape(begin) + r".*?" + re.escape(end), re.S)
        if pattern.search(text):
            text = pattern.sub(lambda _m, b=block: b, text)
        else:
            text = text.rstrip() + "\n\n" + block + "\n"
    path.write_text(text.rstrip() + "\n")
