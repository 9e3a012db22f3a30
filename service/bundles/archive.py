"""Read an uploaded bundle: a gzip'ed tar of an Alembic versions/ directory.

Nothing in an upload is executed here: files are compiled (not run) and the
revision identifiers are read from the syntax tree, so the API never runs a
project's code. The worker loads the scripts with Alembic in its own process.
"""

from __future__ import annotations

import ast
import dataclasses
import gzip
import hashlib
import io
import posixpath
import tarfile
import warnings
import zlib
from typing import Any

from alembic.script.revision import Revision, RevisionError, RevisionMap

from service.errors import BundleError, PayloadTooLargeError

REVISION_FIELDS = ("revision", "down_revision", "branch_labels", "depends_on")


@dataclasses.dataclass
class Limits:
    max_bytes: int
    max_expanded_bytes: int
    max_files: int
    max_file_bytes: int


@dataclasses.dataclass
class ParsedBundle:
    digest: str
    files: dict[str, bytes]
    versions_path: str
    revisions: list[dict[str, Any]]
    heads: list[str]
    bases: list[str]

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


def parse_bundle(data: bytes, limits: Limits) -> ParsedBundle:
    """Validate an upload completely and describe its revision graph."""
    files = read_archive(data, limits)
    versions_path = _find_versions_dir(files)
    prefix = versions_path + "/" if versions_path else ""
    revisions: list[dict[str, Any]] = []
    for path in sorted(files):
        if not path.endswith(".py"):
            continue
        source = files[path]
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
        raise BundleError(f"{versions_path or '.'}/ holds no revision scripts")
    heads, bases, ordered = _check_graph(revisions)
    digest = hashlib.sha256(
        "".join(f"{p}\0{hashlib.sha256(files[p]).hexdigest()}\n" for p in sorted(files)).encode()
    ).hexdigest()
    return ParsedBundle(digest, files, versions_path, ordered, heads, bases)


def _find_versions_dir(files: dict[str, bytes]) -> str:
    candidates = set()
    for path in files:
        parts = path.split("/")
        for i, part in enumerate(parts[:-1]):
            if part == "versions" and i == len(parts) - 2 and parts[-1].endswith(".py"):
                candidates.add("/".join(parts[: i + 1]))
    if not candidates:
        raise BundleError(
            "no versions/ directory with revision scripts in the archive",
            {"files": sorted(files)[:20]},
        )
    depth = min(c.count("/") for c in candidates)
    top = sorted(c for c in candidates if c.count("/") == depth)
    if len(top) > 1:
        raise BundleError(
            "the archive holds several versions/ directories at the same depth: " + ", ".join(top),
            {"versions_dirs": top},
        )
    return top[0]


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
            "must be a revision script (put helpers beside versions/)",
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
