"""Pure: whether a folder holds exactly a bundle's files, as their sha256s say."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path


def differences(folder: Path, files: dict[str, str]) -> str | None:
    """None if `folder` holds exactly `files` with those sha256s; else what differs."""
    seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if d != "__pycache__"]
        for name in filenames:
            path = os.path.relpath(os.path.join(dirpath, name), folder)
            if path not in files:
                return f"{path}: not in the bundle"
            full = os.path.join(dirpath, name)
            if os.path.islink(full):
                return f"{path}: a link"
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read()).hexdigest()
            if digest != files[path]:
                return f"{path}: sha256 {digest[:12]}, uploaded {files[path][:12]}"
            seen.add(path)
    missing = set(files) - seen
    if missing:
        return f"{sorted(missing)[0]}: missing"
    return None
