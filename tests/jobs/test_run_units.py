"""Fast unit tests of the runner's pure parts: plans, failures, the protocol, the probe."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from alembic.script import ScriptDirectory

from service.config import Config
from service.jobs.run import plan
from service.jobs.run.failure import JobFailure, exit_description, killed_by, locate, partial_ddl
from service.jobs.run.protocol import Channel, ChannelClosed, ProtocolError
from service.jobs.run.sandbox import SandboxUnavailable, probe, resolve
from tests.helpers import chain_bundle


@pytest.fixture
def script(tmp_path: Path) -> ScriptDirectory:
    for path, text in chain_bundle(3).items():
        (tmp_path / path).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / path).write_text(text)
    return ScriptDirectory(str(tmp_path), version_locations=[str(tmp_path / "versions")])


def test_plans_follow_alembics_graph(script):
    assert [s.revision.revision for s in plan.steps_for(script, "upgrade", "head", ())] == [
        "t001", "t002", "t003"
    ]  # fmt: skip
    assert plan.nothing_to_do(script, "upgrade", "head", ["t003"])
    assert not plan.nothing_to_do(script, "upgrade", "head", ["t002"])
    assert not plan.nothing_to_do(script, "upgrade", "+1", ["t003"])  # relative: never settled
    assert plan.destination("upgrade", plan.steps_for(script, "upgrade", "+2", ("t001",))) == "t003"
    assert plan.destination("downgrade", plan.steps_for(script, "downgrade", "-1", ("t001",))) == (
        "base"
    )
    lost = plan.applied_between(script, ["t001"], ["t003"])
    assert [e["revision"] for e in lost] == ["t002", "t003"]
    assert plan.is_relative("+1") and plan.is_relative("b@-2") and not plan.is_relative("t001")


def test_checksums_refuse_changed_and_unknown_revisions():
    with pytest.raises(JobFailure) as exc:
        plan.check_checksums({"a": "1"}, {"a": "2"}, ["a"])
    assert exc.value.error["code"] == "revision_changed"
    with pytest.raises(JobFailure) as exc:
        plan.check_checksums({"a": "1"}, {}, ["zz"])
    assert exc.value.error["code"] == "unknown_current_revision"
    plan.check_checksums({"a": "1"}, {"a": "1"}, ["a"])


def test_failures_point_at_the_tenants_line(tmp_path):
    bundle = tmp_path / "bundle"
    (bundle / "versions").mkdir(parents=True)
    source = bundle / "versions" / "r1.py"
    source.write_text("def upgrade():\n    x = 1\n    raise ValueError('no')\n")
    namespace: dict = {}
    exec(compile(source.read_text(), str(source), "exec"), namespace)
    with pytest.raises(ValueError) as exc:
        namespace["upgrade"]()
    assert locate(exc.value, bundle) == {
        "file": "versions/r1.py",
        "line": 3,
        "source": "raise ValueError('no')",
        "traceback": ["versions/r1.py:3 in upgrade: raise ValueError('no')"],
    }
    try:
        compile("def broken(:\n", str(bundle / "versions" / "r2.py"), "exec")
    except SyntaxError as err:
        assert locate(err, bundle) == {
            "file": "versions/r2.py",
            "line": 1,
            "source": "def broken(:",
        }
    assert locate(RuntimeError("elsewhere"), bundle) == {}
    assert partial_ddl(["CREATE TABLE x (id int)"], "alembic_version")
    assert not partial_ddl(["UPDATE alembic_version SET version_num='b'"], "alembic_version")
    assert exit_description(-9) == "it was killed by SIGKILL"
    assert exit_description(137) == "it was killed by SIGKILL"  # as bwrap reports it
    assert exit_description(3) == "it exited with code 3"
    assert killed_by(137) == 9 and killed_by(0) is None


def test_the_channel_frames_messages_and_refuses_garbage():
    r, w = os.pipe()
    chan = Channel(r, w)
    chan.send({"type": "step", "sql": ["SELECT 1"] * 3})
    assert chan.recv(1) == {"type": "step", "sql": ["SELECT 1"] * 3}
    assert chan.recv(0.01) is None
    os.write(w, b"\x00\x00\x00\x02[]")
    with pytest.raises(ProtocolError):
        chan.recv(1)
    os.write(w, b"\xff\xff\xff\xff")
    with pytest.raises(ProtocolError):
        chan.recv(1)
    os.close(w)
    fresh = Channel(r, -1)
    with pytest.raises(ChannelClosed):
        fresh.recv(1)
    os.close(r)


def test_the_probe_says_why_not_and_a_required_sandbox_refuses(tmp_path):
    missing = str(tmp_path / "no-bwrap")
    found = probe("auto", missing)
    assert found.mode == "process" and "bwrap" in found.reason
    assert "NOT isolated" in found.describe()
    assert probe("process").mode == "process"
    config = Config(
        database_url="sqlite://", broker_url="redis://", data_dir=tmp_path, admin_token="x",
        secret_keys=("k",), sandbox="bwrap", bwrap_path=missing,
    )  # fmt: skip
    with pytest.raises(SandboxUnavailable):
        resolve(config)
    assert probe().mode == "bwrap", "this machine runs bubblewrap (scripts/test checks it)"
