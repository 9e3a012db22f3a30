"""Two workers, ten databases, fifty jobs: per database never two at once, every job ends."""

from __future__ import annotations

import datetime as dt

import sqlalchemy as sa

from tests.helpers import register_db, revision, setup_project


def spans_chain(n: int) -> dict[str, str]:
    """Each revision writes when it started and ended, from inside its transaction."""
    files = {}
    prev = None
    for i in range(1, n + 1):
        rev = f"s{i}"
        body = []
        if i == 1:
            body.append(
                "op.create_table('spans', sa.Column('rev', sa.String(10)), "
                "sa.Column('started', sa.Float), sa.Column('ended', sa.Float))"
            )
        body += [
            f"op.execute(\"INSERT INTO spans (rev, started) VALUES ('{rev}', %r)\" % time.time())",
            "time.sleep(0.05)",
            f"op.execute(\"UPDATE spans SET ended = %r WHERE rev = '{rev}'\" % time.time())",
        ]
        files[f"versions/{rev}.py"] = revision(rev, prev, "\n".join(body), head="import time\n")
        prev = rev
    return files


def _never_overlap(spans: list[tuple[float, float]], what: str) -> None:
    spans = sorted(spans)
    for (_, end), (start, _) in zip(spans, spans[1:], strict=False):
        assert end <= start, f"{what}: two at once ({spans})"


def test_fifty_jobs_over_ten_databases_from_two_workers(prod, new_db):
    c = prod.client
    project, _ = setup_project(c, spans_chain(5))
    urls = {}
    for i in range(10):
        url = new_db("postgresql" if i % 2 else "sqlite")
        urls[register_db(c, project, url)] = url
    # Five one-step upgrades per database, all requested at once, interleaved.
    jobs = []
    for _ in range(5):
        for db in urls:
            r = c.post("/v1/jobs", {"database": db, "target": "+1"})
            assert r.status == 202, r
            jobs.append(r.body["id"])
    done = [c.wait_job(j, timeout=240) for j in jobs]
    assert [j["state"] for j in done] == ["succeeded"] * 50, [
        (j["id"], j["state"], j["error"]) for j in done if j["state"] != "succeeded"
    ]
    workers = {j["worker"] for j in done}
    assert len(workers) == 2, workers  # both workers took part

    for db, url in urls.items():
        mine = [j for j in done if j["database"] == db]
        assert len(mine) == 5
        # The revisions' own clocks: one at a time on this database, each applied once.
        engine = sa.create_engine(url, poolclass=sa.pool.NullPool)
        with engine.connect() as conn:
            rows = conn.exec_driver_sql("SELECT rev, started, ended FROM spans").all()
        engine.dispose()
        assert sorted(r[0] for r in rows) == ["s1", "s2", "s3", "s4", "s5"]
        _never_overlap([(r[1], r[2]) for r in rows], f"revisions on {db}")
        # The jobs' spans as Retort recorded them, and their fencing tokens.
        when = dt.datetime.fromisoformat
        spans = [(when(j["started_at"]), when(j["finished_at"])) for j in mine]
        _never_overlap(spans, f"jobs on {db}")
        by_start = sorted(mine, key=lambda j: j["started_at"])
        tokens = [j["lock"]["fencing_token"] for j in by_start]
        assert tokens == sorted(set(tokens)), tokens  # strictly increasing
        assert [j["to_heads"] for j in by_start] == [[f"s{i}"] for i in range(1, 6)]
