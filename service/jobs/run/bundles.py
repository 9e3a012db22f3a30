"""A job's bundle on disk: unpacked once per project, verified before every use.

The cache keeps one folder per project (`bundle-cache/p<project id>/<digest>/`):
a runner gets only its own project's folder, read-only. Before a job runs,
every file is checked against the sha256 stored at upload; a copy that
differs (or has a file too many) is discarded and unpacked again, never run.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.engine import Connection
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.bundles.models import Bundle, BundleFile
from service.jobs.run.checksums import differences
from service.jobs.run.context import JobContext, WorkerProcess

log = logging.getLogger("retort.worker")
_MAX_BUNDLES = 256


@dataclass(frozen=True)
class BundleInfo:
    pk: int
    project_id: int
    digest: str
    versions_path: str
    revisions: list[dict[str, Any]]
    files: dict[str, str]  # path -> sha256, as stored at upload
    # Python files that are not revisions (helpers the revisions may import):
    # such a bundle gets a runner of its own (its modules stay in it).
    helpers: bool
    # Bundle-relative folders the runner puts first on sys.path (empty: the
    # folder holding versions/, when the bundle has helpers).
    python_path: tuple[str, ...] = ()

    @property
    def sha_by_revision(self) -> dict[str, str]:
        return {r["id"]: r["sha256"] for r in self.revisions}


def bundle_info(process: WorkerProcess, conn: Session | Connection, pk: int) -> BundleInfo:
    """What a job needs of a bundle, read once per process (bundles are immutable)."""
    info = process.bundles.get(pk)
    if info is None:
        row = conn.execute(
            select(
                Bundle.project_id,
                Bundle.digest,
                Bundle.versions_path,
                Bundle.revisions,
                Bundle.python_path,
            ).where(Bundle.pk == pk)
        ).one()
        files = dict(
            conn.execute(
                select(BundleFile.path, BundleFile.sha256).where(BundleFile.bundle_pk == pk)
            )
            .tuples()
            .all()
        )
        scripts = {r["path"] for r in row.revisions}
        helpers = any(
            path.endswith(".py")
            and path not in scripts
            and path.rpartition("/")[2] not in ("env.py", "__init__.py")
            for path in files
        )
        python_path = tuple(row.python_path or ())
        info = BundleInfo(
            pk,
            row.project_id,
            row.digest,
            row.versions_path,
            row.revisions,
            files,
            helpers or bool(python_path),
            python_path,
        )
        if len(process.bundles) >= _MAX_BUNDLES:
            process.bundles.pop(next(iter(process.bundles)))
        process.bundles[pk] = info
    return info


def project_dir(cache_dir: Path, project_id: int) -> Path:
    return cache_dir / f"p{project_id}"


def verified_dir(ctx: JobContext, info: BundleInfo) -> Path:
    """The bundle's folder, its every file checked against the stored sha256."""
    root = project_dir(ctx.config.bundle_cache_dir, info.project_id)
    final = root / info.digest
    if final.is_dir():
        problem = differences(final, info.files)
        if problem is None:
            return final
        discarded(ctx, info, problem)
        aside = root / f".bad-{info.digest}-{os.getpid()}"
        try:
            os.rename(final, aside)
        except OSError:
            pass
        shutil.rmtree(aside, ignore_errors=True)
        shutil.rmtree(final, ignore_errors=True)
    contents = ctx.run(lambda s: _contents(s, info.pk))
    root.mkdir(mode=0o700, parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=root))
    try:
        for path, content in contents.items():
            dest = tmp / path
            dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(content)
        problem = differences(tmp, info.files)
        if problem is not None:
            raise RuntimeError(f"bundle {info.digest[:12]} does not match its checksums: {problem}")
        os.rename(tmp, final)
    except OSError:
        if final.is_dir() and differences(final, info.files) is None:
            shutil.rmtree(tmp, ignore_errors=True)
            return final  # another process won the race; its copy is verified
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def discarded(ctx: JobContext, info: BundleInfo, problem: str) -> None:
    """Say (log and audit) that a copy of a bundle on disk differed and was thrown away."""
    log.error(
        "job %s: a copy of bundle %s on disk differs from what was uploaded (%s); "
        "discarding it and unpacking it again",
        ctx.job_id,
        info.digest[:12],
        problem,
    )
    ctx.run(
        lambda s: ctx.audit(
            s, AuditAction.BUNDLE_CACHE_DISCARDED, {"bundle": info.digest, "problem": problem}
        )
    )


def _contents(s: Session, pk: int) -> dict[str, bytes]:
    rows = s.execute(select(BundleFile.path, BundleFile.content).where(BundleFile.bundle_pk == pk))
    return {path: content for path, content in rows}
