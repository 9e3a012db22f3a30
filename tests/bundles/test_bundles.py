"""Bundle uploads: content addressing, the revision graph, and refused archives."""

import http.client
import io
import json
import tarfile

from tests.helpers import chain_bundle, make_tar, revision, setup_project


def upload(client, project, data, content_type="application/gzip"):
    return client.post(f"/v1/projects/{project}/bundles", raw=data, content_type=content_type)


def test_upload_is_content_addressed_and_immutable(prod):
    c = prod.client
    project, _ = setup_project(c)
    files = chain_bundle(3)
    files["helpers.py"] = "VALUE = 1\n"
    r = upload(c, project, make_tar(files))
    assert r.status == 201, r
    assert len(r.body["id"]) == 64
    assert r.body["revisions"] == ["t001", "t002", "t003"]
    assert r.body["heads"] == ["t003"] and r.body["bases"] == ["t001"]
    again = upload(c, project, make_tar(files))
    assert again.status == 200 and again.body["id"] == r.body["id"]
    # Same files in another order or with other tar metadata: same content, same id.
    reordered = make_tar(dict(reversed(list(files.items()))))
    assert upload(c, project, reordered).body["id"] == r.body["id"]


def test_bundle_graph_describes_each_revision(prod):
    c = prod.client
    files = {
        "alembic/versions/a.py": revision("a", None, message="create users"),
        "alembic/versions/b.py": revision(
            "b", "a", downgrade="op.drop_table('x')", branch_labels="feature"
        ),
        "alembic/versions/c.py": revision("c", "a"),
        "alembic/versions/m.py": revision("m", ("b", "c"), message="merge"),
        "alembic/env.py": "# not used by Retort\n",
    }
    project, bundle = setup_project(c, files)
    r = c.get(f"/v1/projects/{project}/bundles/{bundle['id']}")
    assert r.status == 200
    graph = {rev["id"]: rev for rev in r.body["revisions"]}
    assert set(graph) == {"a", "b", "c", "m"}
    assert graph["a"]["message"] == "create users"
    assert graph["a"]["has_downgrade"] is False
    assert graph["b"]["has_downgrade"] is True
    assert graph["b"]["branch_labels"] == ["feature"]
    assert sorted(graph["m"]["down_revisions"]) == ["b", "c"]
    assert len(graph["m"]["sha256"]) == 64
    assert r.body["heads"] == ["m"]
    assert c.get(f"/v1/projects/{project}/bundles/latest").body["id"] == bundle["id"]
    assert c.get(f"/v1/projects/{project}/bundles/{bundle['id'][:12]}").status == 200


def test_unknown_bundle_and_project_are_404(prod):
    c = prod.client
    project, _ = setup_project(c)
    r = c.get(f"/v1/projects/{project}/bundles/latest")
    assert r.status == 404 and "no bundles yet" in r.body["error"]["message"]
    assert c.get(f"/v1/projects/{project}/bundles/{'0' * 64}").status == 404
    r = upload(c, "no-such-project", make_tar(chain_bundle(1)))
    assert r.status == 404


def _tar_with(member: tarfile.TarInfo, data: bytes = b"") -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        ok = revision("a", None).encode()
        info = tarfile.TarInfo("versions/a.py")
        info.size = len(ok)
        tar.addfile(info, io.BytesIO(ok))
        tar.addfile(member, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _member(name, kind=tarfile.REGTYPE, size=0, link=""):
    info = tarfile.TarInfo(name)
    info.type = kind
    info.size = size
    info.linkname = link
    return info


def test_unsafe_archives_are_refused_naming_the_file(prod):
    c = prod.client
    project, _ = setup_project(c)
    cases = {
        "absolute": (_tar_with(_member("/etc/x.py", size=2), b"x=1"), "/etc/x.py"),
        "dotdot": (_tar_with(_member("../escape.py", size=2), b"x=1"), "../escape.py"),
        "symlink": (
            _tar_with(_member("versions/l.py", tarfile.SYMTYPE, link="/etc/passwd")),
            "versions/l.py",
        ),
        "hardlink": (
            _tar_with(_member("versions/h.py", tarfile.LNKTYPE, link="versions/a.py")),
            "versions/h.py",
        ),
        "device": (_tar_with(_member("versions/dev", tarfile.CHRTYPE)), "versions/dev"),
    }
    for label, (data, name) in cases.items():
        r = upload(c, project, data)
        assert r.status == 422, (label, r)
        assert name in r.body["error"]["message"], (label, r)


def test_broken_scripts_and_graphs_are_refused(prod):
    c = prod.client
    project, _ = setup_project(c)
    cases = {
        "syntax": ({"versions/a.py": "def upgrade(:\n"}, "bundle_syntax_error", "versions/a.py"),
        "missing down": ({"versions/b.py": revision("b", "nope")}, "missing_revision", "nope"),
        "cycle": (
            {"versions/a.py": revision("a", "b"), "versions/b.py": revision("b", "a")},
            "invalid_revision_graph",
            "ycle",
        ),
        "duplicate": (
            {"versions/a.py": revision("a", None), "versions/a2.py": revision("a", None)},
            "duplicate_revision",
            "versions/a2.py",
        ),
        "no versions": ({"x.py": "x = 1\n"}, "invalid_bundle", "versions/"),
        "file and dir": (
            {"versions/a.py": revision("a", None), "lib": "x", "lib/m.py": "y"},
            "invalid_bundle",
            "both a file and a directory",
        ),
        "not a revision": (
            {"versions/a.py": revision("a", None), "versions/util.py": "X = 1\n"},
            "invalid_bundle",
            "versions/util.py",
        ),
    }
    for label, (files, code, text) in cases.items():
        r = upload(c, project, make_tar(files))
        assert r.status == 422, (label, r)
        assert r.body["error"]["code"] == code, (label, r)
        assert text in r.body["error"]["message"], (label, r)


def test_not_gzip_and_wrong_type_and_too_large(prod):
    c = prod.client
    project, _ = setup_project(c)
    r = upload(c, project, b"plain text")
    assert r.status == 422 and "not gzip" in r.body["error"]["message"]
    r = upload(c, project, make_tar(chain_bundle(1)), content_type="application/json")
    assert r.status == 415


def test_oversized_upload_is_413_before_the_body_is_read(prod):
    project, _ = setup_project(prod.client)
    conn = http.client.HTTPConnection("127.0.0.1", prod.port, timeout=30)
    conn.putrequest("POST", f"/v1/projects/{project}/bundles")
    conn.putheader("Authorization", f"Bearer {prod.token}")
    conn.putheader("Content-Type", "application/gzip")
    conn.putheader("Content-Length", str(17 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"\x1f\x8b" + b"0" * 1000)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    assert resp.status == 413
    assert body["error"]["code"] == "payload_too_large"


def _tar(members: list[tuple[str, bytes]], encoding: str = "utf-8") -> bytes:
    buf = io.BytesIO()
    # GNU format writes names as raw bytes in `encoding` (pax would re-encode them as UTF-8).
    with tarfile.open(
        fileobj=buf, mode="w:gz", encoding=encoding, format=tarfile.GNU_FORMAT
    ) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def test_hostile_archives_are_refused_and_nothing_is_written(prod):
    c = prod.client
    project, _ = setup_project(c)
    ok = revision("a", None).encode()
    before = {p for p in prod.log_dir.rglob("*") if not p.name.endswith(".log")}
    cases = {
        # 80 MB of zeros (in files under the per-file limit) gzip to ~80 KB:
        # refused by counting while decompressing.
        "gzip bomb": (
            _tar([("versions/a.py", ok)] + [(f"pad/{i}", b"\0" * 4_000_000) for i in range(20)]),
            "bundle_too_large",
            "expand",
        ),
        "too many files": (
            _tar([("versions/a.py", ok)] + [(f"data/f{i}.txt", b"x") for i in range(2001)]),
            "bundle_too_many_files",
            "2000",
        ),
        "huge file": (
            _tar([("versions/a.py", ok), ("versions/big.txt", b"#" * (5 * 1024 * 1024))]),
            "bundle_file_too_large",
            "versions/big.txt",
        ),
        "non-UTF-8 name": (
            _tar([("versions/a.py", ok), ("versions/caf\xe9.py", b"x = 1\n")], "latin-1"),
            "invalid_bundle",
            "UTF-8",
        ),
        "duplicate name": (
            _tar([("versions/a.py", ok), ("versions/a.py", ok)]),
            "invalid_bundle",
            "versions/a.py",
        ),
    }
    for label, (data, code, text) in cases.items():
        assert len(data) < 1024 * 1024, (label, len(data))  # small uploads, all of them
        r = upload(c, project, data)
        assert r.status in (413, 422), (label, r)
        assert r.body["error"]["code"] == code, (label, r)
        assert text in r.body["error"]["message"], (label, r)
    # The API never unpacks an upload onto disk: not in its data directory, not anywhere.
    after = {p for p in prod.log_dir.rglob("*") if not p.name.endswith(".log")}
    assert after == before
    assert c.get(f"/v1/projects/{project}/bundles/latest").status == 404
