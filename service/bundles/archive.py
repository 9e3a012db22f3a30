"""Read an uploaded bundle: a gzip'ed tar of an Alembic versions/ directory.

A bundle may be shaped like its repository: the versions directory named by the
upload (`versions_path`) or found in it, and the folders its revisions import
from (`python_path`, put on the runner's import path). Nothing in an upload is
executed here: files are compiled (not run) and the revision identifiers are
read from the syntax tree, so the API never runs a project's code. The worker
loads the scripts with Alembic in its sandboxed runner. `alembic.ini` files are
read only to be scanned (docs/bundles.md) and never stored: they often hold a
database URL with its password, and Retort never reads them.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import io
import json
import posixpath
import tarfile
import warnings
import zlib
from typing import Any

from alembic.script.revision import Revision, RevisionError, RevisionMap

from service.errors import BundleError, PayloadTooLargeError

REVISION_FIELDS = ("revision", "down_revision", "branch_labels", "depends_on")
# Scanned for notices, never stored: Retort does not read it, and it often
# carries `sqlalchemy.url` with a password.
SCAN_ONLY = ("alembic.ini",)
MAX_PYTHON_PATH = 32


@dataclasses.dataclass
class Limits:
    max_bytes: int
    max_expanded_bytes: int
    max_files: int
    max_file_bytes: int


@dataclasses.dataclass
class ParsedBundle:
    digest: str
    files: dict[str, bytes]  # what is stored and given to the runner
    versions_path: str
    revisions: list[dict[str, Any]]
    heads: list[str]
    bases: list[str]
    # Bundle-relative folders put first on the runner's import path ("." is the root).
    python_path: list[str] = dataclasses.field(default_factory=list)
    # Files of the upload read only to be scanned (alembic.ini): not stored.
    scanned: dict[str, bytes] = dataclasses.field(default_factory=dict)

    @property
    def size(self) -> int:
        return sum(len(c) for c in self.files.values())


class _CountingReader(io.RawIOBase):
    """Stop decompression once more than `limit` bytes came out (gzip bombs)."""

    def __init__(self, raw, limit: int):
        self.raw = raw
        self.limit = limit
        self.count = 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        data = self.raw.read(len(b))
        self.count += len(data)
        if self.count > self.limit:
            raise PayloadTooLargeError(
                f"bundle expands to more than {self.limit} bytes",
                {"limit": self.limit},
                code="bundle_too_large",
            )
        b[: len(data)] = data
        return len(data)


def _skip(name: str) -> bool:
    parts = name.split("/")
    return "__pycache__" in parts or name.endswith((".pyc", ".pyo")) or parts[-1] == ".DS_Store"


def read_archive(data: bytes, limits: Limits) -> dict[str, bytes]:
    """Return {path: content} of the regular files in a .tar.gz, refusing anything unsafe."""
    if len(data) > limits.max_bytes:
        raise PayloadTooLargeError(
            f"bundle is {len(data)} bytes; the limit is {limits.max_bytes}",
            {"limit": limits.max_bytes},
            code="bundle_too_large",
        )
    if data[:2] != b"\x1f\x8b":
        raise BundleError("the upload is not gzip data: send a .tar.gz of your versions/ directory")
    reader = _CountingReader(gzip.GzipFile(fileobj=io.BytesIO(data)), limits.max_expanded_bytes)
    files: dict[str, bytes] = {}
    seen: set[str] = set()
    try:
        with tarfile.open(fileobj=io.BufferedReader(reader), mode="r|") as tar:
            for member in tar:
                name = _safe_name(member.name)
                if member.isdir():
                    continue
                if not name:
                    raise BundleError(
                        f"{member.name!r}: a file entry needs a name", {"file": member.name}
                    )
                if member.issym() or member.islnk():
                    raise BundleError(f"{name}: links are not allowed in a bundle", {"file": name})
                if not member.isfile():
                    raise BundleError(
                        f"{name}: only regular files and directories are allowed "
                        "(no devices, fifos or other special entries)",
                        {"file": name},
                    )
                if name in seen:
                    raise BundleError(f"{name}: the archive holds this path twice", {"file": name})
                seen.add(name)
                if len(seen) > limits.max_files:
                    raise BundleError(
                        f"the bundle has more than {limits.max_files} files",
                        {"limit": limits.max_files},
                        code="bundle_too_many_files",
                    )
                if member.size > limits.max_file_bytes:
                    raise BundleError(
                        f"{name}: {member.size} bytes; a file may have at most "
                        f"{limits.max_file_bytes}",
                        {"file": name, "limit": limits.max_file_bytes},
                        code="bundle_file_too_large",
                    )
                content = tar.extractfile(member).read()
                if not _skip(name):
                    files[name] = content
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise BundleError(f"the archive cannot be read: {exc}") from None
    if not files:
        raise BundleError("the archive holds no files")
    _check_tree(files)
    return files


def _safe_name(raw: str) -> str:
    try:
        raw.encode("utf-8")
    except UnicodeEncodeError:
        shown = raw.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
        raise BundleError(f"{shown}: file names must be UTF-8", {"file": shown}) from None
    if raw.startswith("/") or (len(raw) > 1 and raw[1] == ":"):
        raise BundleError(f"{raw}: absolute paths are not allowed", {"file": raw})
    if "\\" in raw or "\x00" in raw:
        raise BundleError(f"{raw}: backslashes and NUL are not allowed in names", {"file": raw})
    parts = [p for p in raw.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{raw}: '..' is not allowed in a path", {"file": raw})
    return "/".join(parts)


def _check_tree(files: dict[str, bytes]) -> None:
    """Refuse a path that is both a file and a directory (`a` and `a/b`)."""
    for name in files:
        parts = name.split("/")
        for i in range(1, len(parts)):
            prefix = "/".join(parts[:i])
            if prefix in files:
                raise BundleError(
                    f"{prefix}: is both a file and a directory in the archive", {"file": prefix}
                )


def parse_bundle(
    data: bytes,
    limits: Limits,
    versions_path: str | None = None,
    python_path: list[str] | tuple[str, ...] = (),
) -> ParsedBundle:
    """Validate an upload completely and describe its revision graph.

    `versions_path` names the folder of revision scripts (else the one folder
    named `versions` that holds .py files); `python_path` lists the folders the
    runner puts on its import path, each a folder of the archive holding .py files.
    """
    uploaded = read_archive(data, limits)
    found = _auto_versions_dir(uploaded)
    if versions_path is None:
        chosen = _versions_dir(uploaded, found)
    else:
        chosen = _asked_versions_dir(uploaded, versions_path)
    python_path = _check_python_path(uploaded, python_path)
    _check_requirements_file(uploaded)
    prefix = chosen + "/" if chosen else ""
    revisions: list[dict[str, Any]] = []
    for path in sorted(uploaded):
        if not path.endswith(".py"):
            continue
        source = uploaded[path]
        try:
            tree = ast.parse(source, filename=path)
            compile(tree, path, "exec", dont_inherit=True)
        except (SyntaxError, ValueError) as exc:
            line = getattr(exc, "lineno", None)
            raise BundleError(
                f"{path}: does not compile: {exc.msg if isinstance(exc, SyntaxError) else exc}"
                + (f" (line {line})" if line else ""),
                {"file": path, "line": line},
                code="bundle_syntax_error",
            ) from None
        in_versions = path.startswith(prefix) and "/" not in path[len(prefix) :]
        name = posixpath.basename(path)
        if in_versions and name != "__init__.py" and not name.startswith(".#"):
            revisions.append(_describe_revision(path, tree, source))
    if not revisions:
        raise BundleError(f"{chosen or '.'}/ holds no revision scripts")
    heads, bases, ordered = _check_graph(revisions)
    # The digest covers every uploaded file, as it always has (a bundle uploaded
    # before keeps its id), and the bundle's shape when it is not the default one.
    text = "".join(f"{p}\0{hashlib.sha256(uploaded[p]).hexdigest()}\n" for p in sorted(uploaded))
    if python_path or chosen != found:
        shape = {"versions_path": chosen, "python_path": python_path}
        text += "\0shape\0" + json.dumps(shape, sort_keys=True) + "\n"
    digest = hashlib.sha256(text.encode()).hexdigest()
    files = {p: c for p, c in uploaded.items() if posixpath.basename(p) not in SCAN_ONLY}
    scanned = {p: c for p, c in uploaded.items() if p not in files}
    return ParsedBundle(
        digest, files, chosen, ordered, heads, bases, python_path=python_path, scanned=scanned
    )


def _check_requirements_file(files: dict[str, bytes]) -> None:
    """The bundle's requirements.txt (its root), used when the project names none."""
    raw = files.get("requirements.txt")
    if raw is None:
        return
    from service.projects.requirements import RequirementError, check_requirements

    try:
        check_requirements(raw.decode("utf-8").splitlines())
    except UnicodeDecodeError:
        raise BundleError(
            "requirements.txt: not UTF-8 text", {"file": "requirements.txt"}
        ) from None
    except RequirementError as exc:
        raise BundleError(
            f"requirements.txt: {exc}",
            {"file": "requirements.txt", "line": exc.line},
            code="invalid_requirements",
        ) from None


def _versions_candidates(files: dict[str, bytes]) -> list[str]:
    """Folders named `versions` holding .py files of their own (not only __init__.py)."""
    candidates = set()
    for path in files:
        folder, _, name = path.rpartition("/")
        if (
            posixpath.basename(folder) == "versions"
            and name.endswith(".py")
            and name != "__init__.py"
        ):
            candidates.add(folder)
    return sorted(candidates, key=lambda c: (c.count("/"), c))


def _auto_versions_dir(files: dict[str, bytes]) -> str | None:
    """The versions folder an upload names none would get: the only candidate, else None."""
    candidates = _versions_candidates(files)
    return candidates[0] if len(candidates) == 1 else None


def _versions_dir(files: dict[str, bytes], found: str | None) -> str:
    if found is not None:
        return found
    candidates = _versions_candidates(files)
    if not candidates:
        raise BundleError(
            "no versions/ directory with revision scripts in the archive: send the folder "
            "of revision scripts, or name it with the versions_path parameter "
            "(retort push --versions)",
            {"files": sorted(files)[:20], "field": "versions_path"},
        )
    shown = ", ".join(candidates[:10]) + (", …" if len(candidates) > 10 else "")
    raise BundleError(
        f"the archive holds {len(candidates)} folders named versions/ with .py files "
        f"({shown}): name the one with the revision scripts with the versions_path "
        f"parameter (?versions_path={candidates[0]}, or retort push --versions)",
        {"versions_dirs": candidates[:100], "field": "versions_path"},
        code="ambiguous_versions_path",
    )


def _folder(raw: str, field: str) -> str:
    """A bundle-relative folder as given by an upload parameter, normalized ("" is the root)."""
    if not isinstance(raw, str) or len(raw) > 500:
        raise BundleError(f"{field}: a folder path of at most 500 characters", {"field": field})
    text = raw.strip()
    if text.startswith("/") or "\\" in text or "\x00" in text or (len(text) > 1 and text[1] == ":"):
        raise BundleError(
            f"{field} {raw!r}: a folder relative to the archive's root, with / between names",
            {"field": field, "value": raw},
        )
    parts = [p for p in text.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise BundleError(f"{field} {raw!r}: '..' is not allowed", {"field": field, "value": raw})
    return "/".join(parts)


def _asked_versions_dir(files: dict[str, bytes], raw: str) -> str:
    folder = _folder(raw, "versions_path")
    prefix = folder + "/" if folder else ""
    inside = [p for p in files if p.startswith(prefix)]
    if not inside:
        raise BundleError(
            f"versions_path {raw!r}: no such folder in the archive",
            {"field": "versions_path", "value": raw, "versions_dirs": _versions_candidates(files)},
        )
    names = [p[len(prefix) :] for p in inside]
    if not any("/" not in n and n.endswith(".py") and n != "__init__.py" for n in names):
        raise BundleError(
            f"versions_path {raw!r} holds no revision scripts (.py files directly in it)",
            {"field": "versions_path", "value": raw, "versions_dirs": _versions_candidates(files)},
        )
    return folder


def _check_python_path(files: dict[str, bytes], entries: list[str] | tuple[str, ...]) -> list[str]:
    """Each entry an existing folder of the archive with .py files in it; "." is the root."""
    if len(entries) > MAX_PYTHON_PATH:
        raise BundleError(
            f"python_path has {len(entries)} folders; at most {MAX_PYTHON_PATH}",
            {"field": "python_path", "limit": MAX_PYTHON_PATH},
        )
    out: list[str] = []
    for raw in entries:
        folder = _folder(raw, "python_path")
        entry = folder or "."
        if entry in out:
            continue
        prefix = folder + "/" if folder else ""
        inside = [p for p in files if p.startswith(prefix)]
        if not inside:
            raise BundleError(
                f"python_path {raw!r}: no such folder in the archive (each python_path entry "
                "is a folder of the bundle, relative to its root)",
                {"field": "python_path", "value": raw},
            )
        if not any(p.endswith(".py") for p in inside):
            raise BundleError(
                f"python_path {raw!r} holds no .py files: nothing in it could be imported",
                {"field": "python_path", "value": raw},
            )
        out.append(entry)
    return out


def _describe_revision(path: str, tree: ast.Module, source: bytes) -> dict[str, Any]:
    values: dict[str, Any] = {}
    funcs: dict[str, ast.FunctionDef] = {}
    for node in tree.body:
        targets: list[ast.expr] = []
        if isinstance(node, ast.Assign):
            targets, value = node.targets, node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            targets, value = [node.target], node.value
        elif isinstance(node, ast.FunctionDef):
            funcs[node.name] = node
        for target in targets:
            if isinstance(target, ast.Name) and target.id in REVISION_FIELDS:
                try:
                    values[target.id] = ast.literal_eval(value)
                except ValueError:
                    raise BundleError(
                        f"{path}: `{target.id}` must be a literal (a string, a tuple of "
                        "strings or None)",
                        {"file": path, "field": target.id},
                    ) from None
    if "revision" not in values:
        raise BundleError(
            f"{path}: no `revision = '...'` in this file; every .py file in versions/ "
            "must be a revision script (put helpers beside versions/, or in a folder "
            "named with python_path)",
            {"file": path},
        )
    norm = {}
    for field in REVISION_FIELDS:
        value = values.get(field)
        if field == "revision":
            if not isinstance(value, str) or not value:
                raise BundleError(f"{path}: `revision` must be a non-empty string", {"file": path})
            norm[field] = value
            continue
        if value is None or value == "":
            norm[field] = []
        elif isinstance(value, str):
            norm[field] = [value]
        elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            norm[field] = list(value)
        else:
            raise BundleError(
                f"{path}: `{field}` must be None, a string or a tuple of strings",
                {"file": path, "field": field},
            )
    doc = ast.get_docstring(tree) or ""
    message = doc.split("\n\n")[0].strip() if doc else ""
    if message.startswith("Revision ID:"):
        message = ""
    downgrade = funcs.get("downgrade")
    return {
        "id": norm["revision"],
        "down_revisions": norm["down_revision"],
        "branch_labels": norm["branch_labels"],
        "depends_on": norm["depends_on"],
        "message": message,
        "path": path,
        "sha256": hashlib.sha256(source).hexdigest(),
        "has_downgrade": downgrade is not None and not _is_empty(downgrade),
    }


def _is_empty(func: ast.FunctionDef) -> bool:
    body = [
        n for n in func.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))
    ]
    return all(isinstance(n, ast.Pass) for n in body)


def revision_map(revisions: list[dict[str, Any]]) -> RevisionMap:
    """Build Alembic's own RevisionMap from stored revision descriptions."""

    def gen():
        for r in revisions:
            yield Revision(
                r["id"],
                _tuple(r["down_revisions"]),
                dependencies=_tuple(r["depends_on"]),
                branch_labels=_tuple(r["branch_labels"]),
            )

    return RevisionMap(gen)


def _tuple(values: list[str]) -> str | tuple[str, ...] | None:
    if not values:
        return None
    return values[0] if len(values) == 1 else tuple(values)


def _check_graph(revisions: list[dict[str, Any]]):
    by_id: dict[str, dict[str, Any]] = {}
    labels: set[str] = set()
    for r in revisions:
        if r["id"] in by_id:
            raise BundleError(
                f"revision {r['id']} is defined twice: {by_id[r['id']]['path']} and {r['path']}",
                {"revision": r["id"], "files": [by_id[r["id"]]["path"], r["path"]]},
                code="duplicate_revision",
            )
        by_id[r["id"]] = r
        labels.update(r["branch_labels"])
    for r in revisions:
        for down in r["down_revisions"]:
            if down not in by_id:
                raise BundleError(
                    f"{r['path']}: down_revision {down!r} of revision {r['id']} is not in "
                    "the bundle",
                    {"file": r["path"], "revision": r["id"], "missing": down},
                    code="missing_revision",
                )
        for dep in r["depends_on"]:
            if dep not in by_id and dep not in labels:
                raise BundleError(
                    f"{r['path']}: depends_on {dep!r} of revision {r['id']} is not in the bundle",
                    {"file": r["path"], "revision": r["id"], "missing": dep},
                    code="missing_revision",
                )
    rmap = revision_map(revisions)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            heads = list(rmap.heads)
            bases = list(rmap.bases)
            order = [
                rev.revision
                for rev in rmap.iterate_revisions("heads", "base", select_for_downgrade=True)
            ]
    except (RevisionError, Warning) as exc:
        raise BundleError(
            f"the revision graph does not load: {exc}", code="invalid_revision_graph"
        ) from None
    order.reverse()
    return sorted(heads), sorted(bases), [by_id[i] for i in order]
