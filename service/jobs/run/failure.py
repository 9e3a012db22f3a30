"""Pure: what a failed job says (code, message, and where in the tenant's code it failed).

Used by the runner (to describe an error it caught) and the worker (to describe
a runner that died); no Retort state imports, no I/O.
"""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

_DDL = re.compile(r"^\s*(CREATE|ALTER|DROP|RENAME|TRUNCATE)\b", re.IGNORECASE)


class JobFailure(Exception):
    """A job ends as failed with this error document."""

    def __init__(self, code: str, message: str, **extra: Any):
        super().__init__(message)
        self.error: dict[str, Any] = {
            "code": code,
            "message": message,
            "revision": None,
            "statement": None,
        }
        self.error.update(extra)


def db_message(exc: BaseException) -> str:
    """The database's own words for an error (the DBAPI error under SQLAlchemy's)."""
    orig = getattr(exc, "orig", None)
    text = str(orig if orig is not None else exc).strip()
    return text or type(exc).__name__


# A failure's traceback keeps this many of its innermost frames in the bundle.
TRACEBACK_FRAMES = 8


def describe(exc: BaseException) -> str:
    """What went wrong, in a line: the database's words for a database error, else the
    exception's type and message (`AssertionError` alone says nothing of where)."""
    if getattr(exc, "orig", None) is not None:
        return db_message(exc)
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def locate(exc: BaseException, bundle_dir: Path | str) -> dict[str, Any]:
    """Where in the bundle `exc` was raised: {file, line, source, traceback} (empty if none).

    The innermost frame inside the bundle wins: that is the tenant's line, even
    when the error itself came from SQLAlchemy or a database driver below it.
    `source` is that line's text; `traceback` the bundle's frames that led
    there ("file:line in function: source", outermost first). A SyntaxError
    names its own file and line.
    """
    root = str(Path(bundle_dir)) + "/"
    if isinstance(exc, SyntaxError) and exc.filename and exc.filename.startswith(root):
        found: dict[str, Any] = {"file": exc.filename[len(root) :], "line": exc.lineno}
        if exc.text:
            found["source"] = exc.text.strip()
        return found
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if f.filename.startswith(root)]
    if not frames:
        return {}
    inner = frames[-1]
    found = {"file": inner.filename[len(root) :], "line": inner.lineno}
    if inner.line:
        found["source"] = inner.line.strip()
    found["traceback"] = [
        f"{f.filename[len(root) :]}:{f.lineno} in {f.name}"
        + (f": {f.line.strip()}" if f.line else "")
        for f in frames[-TRACEBACK_FRAMES:]
    ]
    return found


def bundle_frames(exc: BaseException, bundle_dir: Path | str) -> list[dict[str, Any]]:
    """Every frame of `exc`'s traceback in a bundle file, outermost first, as {file, line}."""
    root = str(Path(bundle_dir)) + "/"
    return [
        {"file": frame.filename[len(root) :], "line": frame.lineno}
        for frame in traceback.extract_tb(exc.__traceback__)
        if frame.filename.startswith(root)
    ]


IMPORT_FIXES = (
    "add it to the project's requirements (settings.requirements or the bundle's "
    "requirements.txt), or include the folder that holds it with --python-path"
)


def load_failure(
    exc: BaseException,
    bundle_dir: Path | str,
    versions_path: str,
    import_path: list[str],
    revision_of: Callable[[str], str | None],
) -> JobFailure:
    """`bundle_load_failed` for an error raised while Alembic loaded the revision files.

    Names the revision whose file raised (`revision_of` reads a bundle file's
    revision id) and its line; for a module that cannot be found, the module,
    where it was imported, and the two ways to provide it. `import_path` is the
    bundle's folders on the runner's sys.path (bundle-relative).
    """
    frames = bundle_frames(exc, bundle_dir)
    prefix = versions_path + "/" if versions_path else ""

    def is_revision(file: str) -> bool:
        return file.startswith(prefix) and "/" not in file[len(prefix) :]

    # The revision file that was being loaded (the outermost bundle frame in
    # versions/), else where it was raised (a SyntaxError names its own file).
    top = next((f for f in frames if is_revision(f["file"])), None)
    where = top or (frames[-1] if frames else locate(exc, bundle_dir)) or {}
    revision = revision_of(where["file"]) if where and is_revision(where["file"]) else None
    inner = frames[-1] if frames else None
    extra: dict[str, Any] = {
        "revision": revision,
        "file": where.get("file"),
        "line": where.get("line"),
    }
    if where:
        named = (
            f"revision {revision} ({where['file']}, line {where['line']})"
            if revision
            else f"{where['file']}, line {where['line']},"
        )
    else:
        named = "a revision script"
    via = (
        f", through {inner['file']} line {inner['line']}"
        if inner is not None and where and inner != where
        else ""
    )
    if isinstance(exc, ModuleNotFoundError):
        module = exc.name or str(exc)
        extra["module"] = module
        shown = ", ".join(import_path) if import_path else "none"
        message = (
            f"the revision scripts do not load: {named} imports {module!r}{via}, which cannot "
            f"be found (ModuleNotFoundError: {exc}). To fix it: {IMPORT_FIXES} (the upload's "
            f"python_path; this bundle's folders on the import path: {shown})."
        )
    else:
        message = (
            f"the revision scripts do not load: {named} raised {type(exc).__name__}: {exc}{via}"
        )
    return JobFailure("bundle_load_failed", message, **extra)


def partial_ddl(statements: list[str], version_table: str) -> bool:
    """Whether a MySQL/MariaDB step ran DDL of its own (DDL commits implicitly there)."""
    return any(_DDL.match(q) and version_table not in q for q in statements)


def exit_description(returncode: int | None) -> str:
    """How a runner process ended, in words."""
    if returncode is None:
        return "it stopped answering"
    import signal

    # bwrap ends with 128 + N when the runner inside was killed by signal N.
    number = -returncode if returncode < 0 else returncode - 128 if 128 < returncode < 193 else 0
    if number:
        try:
            name = signal.Signals(number).name
        except ValueError:
            name = f"signal {number}"
        return f"it was killed by {name}"
    return f"it exited with code {returncode}"


def killed_by(returncode: int | None) -> int | None:
    """The signal that ended a runner (directly or inside bwrap), if one did."""
    if returncode is None:
        return None
    if returncode < 0:
        return -returncode
    return returncode - 128 if 128 < returncode < 193 else None
