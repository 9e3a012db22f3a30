"""What an upload should know: Retort does not run env.py, and what env.py or alembic.ini set.

Pure (no I/O, no Retort state): the API scans an upload's files with it, and
`retort push` a checkout's env.py and alembic.ini, which it does not upload.
Nothing is imported or run: env.py is read as a syntax tree (a line scan if it
does not parse), alembic.ini line by line.

A notice is {"code", "level" ("info" | "warning"), "message", "file", "line",
"setting"}.
"""

from __future__ import annotations

import ast
import json
import posixpath
import re
import sys
from typing import Any

# The project settings that stand in for env.py (service/projects/schemas.py).
STAND_INS = (
    "version_table",
    "version_table_schema",
    "naming_convention",
    "lock_timeout_ms",
    "statement_timeout_ms",
    "requirements",
    "env",
)
_SCANNED_KEYWORDS = (
    "version_table",
    "version_table_schema",
    "naming_convention",
    "transaction_per_migration",
    "compare_type",
)
# Top-level names a runner has imported before any revision runs: a python_path
# module of that name is never the one `import` finds.
_RUNNER_OWN = frozenset(
    {"service", "alembic", "sqlalchemy", "mako", "psycopg", "pymysql", "greenlet", "markupsafe"}
)
_SQL_TIMEOUT = re.compile(
    r"\bSET\s+(?:LOCAL\s+|SESSION\s+)?(lock_timeout|statement_timeout)\b", re.I
)
_INI_KEY = re.compile(r"^\s*([A-Za-z0-9_.]+)\s*[=:]\s*(.*?)\s*$")
_PASSWORD = re.compile(r"://[^/@:\s]*:[^/@\s]+@")


def notice(
    code: str,
    message: str,
    level: str = "warning",
    file: str | None = None,
    line: int | None = None,
    setting: str | None = None,
) -> dict[str, Any]:
    return {
        "code": code,
        "level": level,
        "message": message,
        "file": file,
        "line": line,
        "setting": setting,
    }


def env_py_path(versions_path: str) -> str:
    """Where Alembic keeps env.py: beside the versions folder."""
    parent = versions_path.rpartition("/")[0] if "/" in versions_path else ""
    return posixpath.join(parent, "env.py") if parent else "env.py"


def scan(
    files: dict[str, bytes],
    versions_path: str,
    settings: dict[str, Any],
    python_path: list[str] | tuple[str, ...] = (),
    env_py_fate: str = "stored with the bundle as uploaded and never executed",
) -> list[dict[str, Any]]:
    """The notices of a bundle's files (or of a checkout's env.py and alembic.ini).

    `files` maps bundle-relative paths to contents; `env_py_fate` says what
    became of env.py (stored and never executed, or not uploaded at all).
    """
    out: list[dict[str, Any]] = []
    env_py = env_py_path(versions_path)
    if env_py in files:
        out.append(
            notice(
                "env_py_ignored",
                f"{env_py}: Retort does not run env.py (it is {env_py_fate}); it runs the "
                "revisions in its own Alembic environment. What env.py would set comes from "
                "the project's settings: " + ", ".join(STAND_INS) + " (PATCH /v1/projects/"
                '{name} {"settings": {...}}).',
                level="info",
                file=env_py,
            )
        )
        out += _scan_env_py(env_py, files[env_py], settings)
    for path in sorted(p for p in files if posixpath.basename(p) == "alembic.ini"):
        out += _scan_alembic_ini(path, files[path], python_path)
    out += _shadowing(files, python_path)
    return out


# ---------------------------------------------------------------- env.py


def _scan_env_py(path: str, source: bytes, settings: dict[str, Any]) -> list[dict[str, Any]]:
    text = source.decode("utf-8", "replace")
    found: list[tuple[str, int, Any, bool]] = []  # (setting, line, value, readable)
    try:
        tree = ast.parse(text, filename=path)
    except (SyntaxError, ValueError):
        tree = None
    if tree is not None:
        names = _module_literals(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                for kw in node.keywords:
                    if kw.arg in _SCANNED_KEYWORDS:
                        value, readable = _literal(kw.value, names)
                        found.append((kw.arg, kw.value.lineno, value, readable))
    else:  # a line scan: `version_table='x'` and the like
        for number, line in enumerate(text.splitlines(), 1):
            for key in _SCANNED_KEYWORDS:
                match = re.search(rf"\b{key}\s*=\s*(.+?)\s*[,)]?\s*$", line)
                if match:
                    try:
                        found.append((key, number, ast.literal_eval(match.group(1)), True))
                    except (ValueError, SyntaxError):
                        found.append((key, number, None, False))
    out = []
    for key, line, value, readable in found:
        item = _judge(path, key, line, value, readable, settings)
        if item is not None:
            out.append(item)
    for number, line in enumerate(text.splitlines(), 1):
        match = _SQL_TIMEOUT.search(line)
        if match:
            name = match.group(1).lower()
            setting = f"{name}_ms"
            current = settings.get(setting)
            now = f"{current} ms" if current is not None else "not set"
            out.append(
                notice(
                    "setting_differs",
                    f"{path} line {number} sets {name} in SQL: Retort sets it from the "
                    f"project's {setting} (now {now}) on each job's session, not from env.py.",
                    file=path,
                    line=number,
                    setting=setting,
                )
            )
    return out


def _module_literals(tree: ast.Module) -> dict[str, Any]:
    """Module-level `NAME = <literal>` of env.py (a naming convention is often one)."""
    names: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target = node.targets[0]
            if isinstance(target, ast.Name):
                try:
                    names[target.id] = ast.literal_eval(node.value)
                except ValueError:
                    pass
    return names


def _literal(node: ast.expr, names: dict[str, Any]) -> tuple[Any, bool]:
    if isinstance(node, ast.Name) and node.id in names:
        return names[node.id], True
    try:
        return ast.literal_eval(node), True
    except ValueError:
        return None, False


def _judge(
    path: str, key: str, line: int, value: Any, readable: bool, settings: dict[str, Any]
) -> dict[str, Any] | None:
    where = f"{path} line {line}"
    if key == "transaction_per_migration":
        if readable and value is True:
            return None  # what Retort does anyway
        return notice(
            "setting_unsupported",
            f"{where} sets transaction_per_migration: Retort always runs each revision in a "
            "transaction of its own (transaction_per_migration=True) and has no setting for it.",
            file=path,
            line=line,
            setting=key,
        )
    if key == "compare_type":
        return notice(
            "setting_unsupported",
            f"{where} sets compare_type: it only matters to autogenerate, which Retort does "
            "not run; it has no equivalent here and no effect on applying revisions.",
            file=path,
            line=line,
            setting=key,
        )
    default = "alembic_version" if key == "version_table" else None
    current = settings.get(key) or default
    if not readable:
        return notice(
            "setting_unreadable",
            f"{where} sets {key} from an expression Retort cannot read without running "
            f"env.py: check that the project's {key} ({current!r}) is the value your "
            "databases use.",
            file=path,
            line=line,
            setting=key,
        )
    if (value or default) == current:
        return None
    try:
        patch = json.dumps({"settings": {key: value}})
    except (TypeError, ValueError):
        patch = f'{{"settings": {{"{key}": ...}}}}'
    return notice(
        "setting_differs",
        f"{where} sets {key}={value!r}, but the project's {key} is {current!r}: Retort uses "
        f"the project's. If your databases use {value!r}, set it: "
        f"PATCH /v1/projects/{{name}} {patch}.",
        file=path,
        line=line,
        setting=key,
    )


# ---------------------------------------------------------------- alembic.ini


def _scan_alembic_ini(
    path: str, source: bytes, python_path: list[str] | tuple[str, ...]
) -> list[dict[str, Any]]:
    out = []
    for number, line in enumerate(source.decode("utf-8", "replace").splitlines(), 1):
        if line.lstrip().startswith(("#", ";")):
            continue
        match = _INI_KEY.match(line)
        if not match:
            continue
        key, value = match.group(1), match.group(2)
        if key == "sqlalchemy.url" and value:
            secret = (
                " It holds a password: keep alembic.ini out of what you upload "
                "(`retort push --versions` leaves it out)."
                if _PASSWORD.search(value)
                else ""
            )
            out.append(
                notice(
                    "sqlalchemy_url_ignored",
                    f"{path} line {number} sets sqlalchemy.url: Retort never connects there; it "
                    "migrates the databases registered with POST /v1/databases. alembic.ini is "
                    f"read only for these notices and not stored with the bundle.{secret}",
                    file=path,
                    line=number,
                    setting="sqlalchemy.url",
                )
            )
        elif key == "prepend_sys_path" and value and not python_path:
            out.append(
                notice(
                    "python_path_suggested",
                    f"{path} line {number} sets prepend_sys_path = {value}: Retort's equivalent "
                    "is the bundle's python_path (retort push --python-path), folders relative "
                    "to the bundle's root.",
                    level="info",
                    file=path,
                    line=number,
                    setting="python_path",
                )
            )
    return out


# ---------------------------------------------------------------- python_path


def _shadowing(
    files: dict[str, bytes], python_path: list[str] | tuple[str, ...]
) -> list[dict[str, Any]]:
    """python_path modules named like one the runner has imported (or the standard library's)."""
    out = []
    stdlib = getattr(sys, "stdlib_module_names", frozenset())
    for entry in python_path:
        prefix = "" if entry == "." else entry + "/"
        tops: dict[str, str] = {}  # module name -> its file or folder
        for path in files:
            if not path.startswith(prefix) or not path.endswith(".py"):
                continue
            first = path[len(prefix) :].split("/")[0]
            tops.setdefault(first[:-3] if first.endswith(".py") else first, prefix + first)
        for name in sorted(set(tops) & (_RUNNER_OWN | set(stdlib))):
            whose = "the standard library's" if name in stdlib else "one the runner has loaded"
            out.append(
                notice(
                    "python_path_shadowed",
                    f"python_path {entry}: its module {name!r} has the name of {whose}: "
                    f"`import {name}` may not find yours. Rename it, or put its parent folder "
                    "on python_path and import it as a subpackage.",
                    file=tops[name],
                    setting="python_path",
                )
            )
    return out
