"""Retort's own schema: the migrations build exactly what the models describe."""

import pytest
from alembic import command

from service.schema import alembic_config, check_schema, upgrade_schema


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_migrations_match_models_and_run_both_ways(new_db, dialect):
    url = new_db(dialect)
    upgrade_schema(url)
    check_schema(url)  # raises if a model changed without a migration
    command.downgrade(alembic_config(url), "base")
    upgrade_schema(url)
    upgrade_schema(url)  # idempotent
    check_schema(url)


def test_alembic_private_api_retort_relies_on(tmp_path):
    """Contract test: the runtime drives these ScriptDirectory methods directly."""
    from alembic.script import ScriptDirectory

    versions = tmp_path / "versions"
    versions.mkdir()
    (versions / "a.py").write_text(
        "revision = 'a'\ndown_revision = None\ndef upgrade(): pass\ndef downgrade(): pass\n"
    )
    (versions / "b.py").write_text(
        "revision = 'b'\ndown_revision = 'a'\ndef upgrade(): pass\ndef downgrade(): pass\n"
    )
    script = ScriptDirectory(str(tmp_path), version_locations=[str(versions)])
    up = script._upgrade_revs("head", ())
    assert [s.revision.revision for s in up] == ["a", "b"]
    down = script._downgrade_revs("base", ("b",))
    assert [s.revision.revision for s in down] == ["b", "a"]
    stamp = script._stamp_revs(("b",), ())
    assert len(stamp) == 1
