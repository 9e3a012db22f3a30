"""The SQLite files a sandboxed runner binds: its project's, a group at a time.

Under bwrap a runner sees only the files bound when it starts, so a runner
for a project's SQLite targets binds them ahead (each with its journal). bwrap
pays for every bind at start, more the more there are (100 file binds: 0.04 s,
500: 0.42 s, 2,000: 6.6 s on the benchmark machine), so a project's files are
cut into groups of `runner_sqlite_group` in the order of its databases' names
(a rollout's order), and a runner binds one group: a thousand tenants take a
few runners of a fraction of a second each, not one of seconds.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from sqlalchemy import select

from service import targets
from service.databases.models import Database
from service.db import transaction
from service.jobs.run.target_files import prepare_for_sandbox, sqlite_path

log = logging.getLogger("retort.worker")


@dataclass(frozen=True)
class ProjectFiles:
    """A project's SQLite targets (real paths), and the groups runners bind."""

    files: frozenset[str]
    groups: tuple[frozenset[str], ...] = ()
    group_of: dict[str, int] = field(default_factory=dict)

    def group(self, path: str) -> tuple[int, frozenset[str]]:
        index = self.group_of.get(path)
        if index is None:
            return -1, frozenset((path,))
        return index, self.groups[index]

    def after(self, index: int) -> tuple[int, frozenset[str]] | None:
        """The group after `index` (a rollout's next), if there is one."""
        if 0 <= index < len(self.groups) - 1:
            return index + 1, self.groups[index + 1]
        return None


def cut(paths: list[str], size: int) -> ProjectFiles:
    """Groups of `size` in the given order (0 or less: one group)."""
    size = size if size > 0 else max(1, len(paths))
    groups = tuple(frozenset(paths[i : i + size]) for i in range(0, len(paths), size))
    group_of = {p: i for i, g in enumerate(groups) for p in g}
    return ProjectFiles(frozenset(paths), groups, group_of)


def project_files(ctx, mine: str) -> ProjectFiles:
    """The job's project's SQLite files, made ready for binding; read again when the
    job's own file is not among them (a database registered since)."""
    cache = ctx.process.sqlite_files
    found = cache.get(ctx.project_id)
    if found is not None and mine in found.files:
        return found
    with transaction(ctx.sessions) as s:
        rows = s.execute(
            select(Database.name, Database.url_encrypted)
            .where(
                Database.project_id == ctx.project_id,
                Database.dialect == "sqlite",
                Database.removed_at.is_(None),
            )
            .order_by(Database.name)
        ).all()
    ordered: list[str] = []
    for _name, encrypted in rows:
        try:
            url = targets.normalize_url(ctx.process.box.decrypt(encrypted))
        except Exception:  # noqa: BLE001 - a registration that cannot be a target
            continue
        ordered.append(sqlite_path(url.database))
    if mine not in ordered:
        ordered.append(mine)
    seen: set[str] = set()
    paths = []
    for path in ordered:
        if path in seen:
            continue
        seen.add(path)
        try:
            prepare_for_sandbox(path)
        except OSError as exc:
            log.warning("cannot prepare SQLite target %s for the sandbox: %s", path, exc)
        if os.path.exists(path):
            paths.append(path)
    found = cut(paths, ctx.config.runner_sqlite_group)
    cache[ctx.project_id] = found
    return found
