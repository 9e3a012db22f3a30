"""Signed checkpoints of the audit chain's head, written by the sweeper.

Only the sweeper holds the Ed25519 signing key (RETORT_AUDIT_SIGNING_KEY_FILE,
by default <data>/audit-signing-key, created 0600 on first use; its public key
beside it, + ".pub"). A checkpoint goes to four places: the state database
(audit_checkpoints), the chain itself (an `audit.checkpoint` event), a JSON
lines file outside the database (<data>/audit-checkpoints.jsonl) and the log.
A writer of the state database who truncates the chain's tail cannot reach
the copies outside it; an auditor with the public key checks them offline.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.audit.chain import iso_ts, load_public_keys, sign_checkpoint
from service.audit.models import AuditCheckpoint, AuditHead
from service.audit.ops import record_event
from service.db import utcnow

log = logging.getLogger("retort.audit")

CHECKPOINTS_FILE = "audit-checkpoints.jsonl"


def load_signing_key(path: Path) -> Ed25519PrivateKey:
    """Read the signing key, creating it (0600, its public key beside it) if it is missing."""
    try:
        key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    except FileNotFoundError:
        key = None
    if key is None:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        new = Ed25519PrivateKey.generate()
        pem = new.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:  # another sweeper won the race
            return load_signing_key(path)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        key = new
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} is not an Ed25519 private key")
    public = Path(f"{path}.pub")
    pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    known = public.read_bytes() if public.exists() else b""
    if pem not in known:  # a new key: keep the old ones, so old checkpoints still verify
        public.write_bytes(known + pem)
    return key


def trusted_public_keys(signing_key_path: Path) -> list | None:
    """The public key(s) beside the signing key, or None where this machine has none."""
    try:
        return load_public_keys(Path(f"{signing_key_path}.pub").read_bytes())
    except (FileNotFoundError, ValueError):
        return None


def read_outside_checkpoints(data_dir: Path) -> list[dict[str, Any]]:
    """The checkpoints of the file outside the database (those this machine wrote)."""
    out = []
    try:
        lines = (data_dir / CHECKPOINTS_FILE).read_text().splitlines()
    except (FileNotFoundError, PermissionError):
        return out
    for line in lines:
        try:
            cp = json.loads(line)
        except ValueError:
            continue
        if isinstance(cp, dict) and cp.get("type") == "checkpoint":
            out.append(cp)
    return out


def make_checkpoint(session: Session, key: Ed25519PrivateKey) -> dict[str, Any] | None:
    """Sign the head if the chain grew since the last checkpoint, beyond its own event."""
    head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one_or_none()
    if head is None or head.seq == 0:
        return None
    last = session.scalar(select(func.max(AuditCheckpoint.seq))) or 0
    if head.seq <= last + 1:  # nothing new but the last checkpoint's own event
        return None
    cp = sign_checkpoint(key, head.seq, head.hash, iso_ts(utcnow()))
    session.add(
        AuditCheckpoint(
            seq=cp["seq"],
            hash=cp["hash"],
            ts=cp["ts"],
            public_key_id=cp["public_key_id"],
            signature=cp["signature"],
        )
    )
    record_event(session, AuditAction.AUDIT_CHECKPOINT, actor="sweeper", data=cp)
    return {"type": "checkpoint", **cp}


def write_outside(data_dir: Path, cp: dict[str, Any]) -> None:
    """Append a checkpoint to the file outside the database (0600) and to the log."""
    line = json.dumps(cp, sort_keys=True, separators=(",", ":"))
    path = data_dir / CHECKPOINTS_FILE
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as f:
        f.write(line + "\n")
    log.warning("audit checkpoint %s", line)
