"""Issue 16, item 6: the embedded default's files are readable only by Retort's user."""

from __future__ import annotations

import os
import stat

from tests.helpers import chain_bundle, register_db, run_job, setup_project


def test_embedded_state_cache_and_keys_are_private(embedded, new_db):
    c = embedded.client
    project, _ = setup_project(c, chain_bundle(2))
    assert run_job(c, register_db(c, project, new_db("sqlite")))["state"] == "succeeded"
    data = embedded.log_dir  # the data directory (the harness writes its *.log there)
    wide = []
    for root, dirs, files in os.walk(data):
        for name in dirs + files:
            path = os.path.join(root, name)
            mode = os.lstat(path).st_mode
            if stat.S_ISSOCK(mode) or stat.S_ISLNK(mode) or name.endswith(".log"):
                continue
            if mode & 0o077:
                wide.append((path, oct(mode & 0o777)))
    assert os.stat(data).st_mode & 0o077 == 0
    for name in ("retort.db", "admin-token", "secret-key", "bundle-cache", "audit-signing-key"):
        assert (data / name).exists(), name
    assert not wide, wide
