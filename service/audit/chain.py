"""The audit chain's arithmetic, with no database: shared by Retort and an offline verifier.

Each event carries two values:

- `hash`: SHA-256 of the event's canonical JSON, which includes the previous
  event's hash. Anyone can recompute it, so an export can be checked offline.
- `mac`: "<key id>:<HMAC-SHA256(audit key, hash)>". Only a holder of the audit
  key (RETORT_AUDIT_KEY, kept outside the state database) can write one, so a
  writer of the state database cannot edit, insert or delete an event and
  re-hash the rest, nor pass off a chain from another installation.

Events written before the chain was keyed have no mac; the chain carries on
from an `audit.rekeyed` event, and every event after the first one must carry
the mac of the key the latest `audit.rekeyed` names. Checkpoints (`seq`,
`hash`, `ts`) are signed with an Ed25519 key; copies kept outside the
database catch a truncated tail, and pin the chain for a verifier that holds
only the public key.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
from collections.abc import Iterable
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from service.audit.actions import AuditAction

GENESIS = "0" * 64
HASHED = (
    "seq",
    "ts",
    "actor",
    "action",
    "project",
    "database",
    "job_id",
    "fencing_token",
    "data",
    "prev_hash",
)


def canonical(fields: dict[str, Any]) -> bytes:
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), default=str).encode()


def iso_ts(ts: dt.datetime | str) -> str:
    if isinstance(ts, str):
        return ts
    ts = ts if ts.tzinfo else ts.replace(tzinfo=dt.UTC)
    return ts.astimezone(dt.UTC).isoformat(timespec="microseconds")


def hashed_fields(get) -> dict[str, Any]:
    """The fields `hash` covers, from a getter of the event's attributes."""
    out = {name: get(name) for name in HASHED}
    out["ts"] = iso_ts(out["ts"])
    return out


def event_hash(fields: dict[str, Any]) -> str:
    return hashlib.sha256(canonical(fields)).hexdigest()


def key_id(key: str) -> str:
    """A short public name for an audit key (never the key)."""
    return hashlib.sha256(b"retort-audit-key\x00" + key.encode()).hexdigest()[:12]


class Keyring:
    """The audit keys: the first extends the chain, every one verifies."""

    def __init__(self, keys: Iterable[str]):
        self._keys = {key_id(k): k for k in keys}
        self.current = key_id(next(iter(keys))) if self._keys else None

    def __bool__(self) -> bool:
        return bool(self._keys)

    def mac(self, hash_: str, kid: str | None = None) -> str:
        kid = kid or self.current
        if kid is None or kid not in self._keys:
            raise RuntimeError("no audit key (RETORT_AUDIT_KEY) is configured")
        digest = hmac.new(self._keys[kid].encode(), hash_.encode(), hashlib.sha256).hexdigest()
        return f"{kid}:{digest}"

    def check(self, hash_: str, mac: str | None) -> bool:
        kid = (mac or "").split(":", 1)[0]
        return kid in self._keys and hmac.compare_digest(self.mac(hash_, kid), mac)


# ------------------------------------------------------------------ checkpoints


def public_key_id(public: Ed25519PublicKey) -> str:
    raw = public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:12]


def load_public_keys(pem: bytes) -> list[Ed25519PublicKey]:
    """Every Ed25519 public key in a PEM file (several after a rotation)."""
    keys = []
    for block in pem.split(b"-----END PUBLIC KEY-----"):
        if b"-----BEGIN PUBLIC KEY-----" in block:
            key = serialization.load_pem_public_key(block + b"-----END PUBLIC KEY-----\n")
            if not isinstance(key, Ed25519PublicKey):
                raise ValueError("not an Ed25519 public key")
            keys.append(key)
    if not keys:
        raise ValueError("no PEM public key found")
    return keys


def _signed_bytes(seq: int, hash_: str, ts: str, pkid: str) -> bytes:
    return canonical({"seq": seq, "hash": hash_, "ts": ts, "public_key_id": pkid})


def sign_checkpoint(private: Ed25519PrivateKey, seq: int, hash_: str, ts: str) -> dict[str, Any]:
    pkid = public_key_id(private.public_key())
    signature = private.sign(_signed_bytes(seq, hash_, ts, pkid))
    return {
        "seq": seq,
        "hash": hash_,
        "ts": ts,
        "public_key_id": pkid,
        "signature": base64.b64encode(signature).decode(),
    }


def checkpoint_valid(cp: dict[str, Any], public_keys: Iterable[Ed25519PublicKey]) -> bool:
    try:
        signature = base64.b64decode(cp["signature"], validate=True)
        message = _signed_bytes(int(cp["seq"]), str(cp["hash"]), str(cp["ts"]), cp["public_key_id"])
    except (KeyError, TypeError, ValueError):
        return False
    for key in public_keys:
        if public_key_id(key) != cp.get("public_key_id"):
            continue
        try:
            key.verify(signature, message)
            return True
        except InvalidSignature:
            return False
    return False


# ------------------------------------------------------------------ verifying


class ChainCheck:
    """Walk the events in order; `feed` each; `result` at the end.

    `keyring`: check every mac (Retort's own verify). None: an offline check
    that recomputes the hashes and checks the links, and leans on the signed
    checkpoints for what only the key could prove.
    """

    def __init__(self, keyring: Keyring | None):
        self.keyring = keyring
        self.prev = GENESIS
        self.count = 0
        self.expected_seq = 1
        self.keyed_by: str | None = None  # the key id the latest audit.rekeyed names
        self.hashes: dict[int, str] = {}
        self.first_bad: int | None = None
        self.reason: str | None = None

    def _bad(self, seq: int, reason: str) -> bool:
        self.first_bad, self.reason = seq, reason
        return False

    def feed(self, event: dict[str, Any]) -> bool:
        """Check one event (a dict with the hashed fields, `hash` and `mac`)."""
        seq = event.get("seq")
        self.count += 1
        if seq != self.expected_seq:
            return self._bad(self.expected_seq, f"event {self.expected_seq} is missing")
        if event.get("prev_hash") != self.prev:
            return self._bad(seq, "its prev_hash is not the previous event's hash")
        if event.get("hash") != event_hash(hashed_fields(event.get)):
            return self._bad(seq, "its content does not match its hash (edited)")
        mac = event.get("mac")
        if event.get("action") == AuditAction.AUDIT_REKEYED:
            named = (event.get("data") or {}).get("key_id")
            if not mac or mac.split(":", 1)[0] != named:
                return self._bad(seq, "an audit.rekeyed event not keyed with the key it names")
            self.keyed_by = named
        if self.keyed_by is None:
            if mac is not None:
                return self._bad(seq, "a keyed event before the chain's first audit.rekeyed")
        else:
            if not mac or mac.split(":", 1)[0] != self.keyed_by:
                return self._bad(seq, "not keyed with the chain's current audit key")
            if self.keyring is not None and not self.keyring.check(event["hash"], mac):
                return self._bad(
                    seq,
                    "its HMAC does not verify with Retort's audit key (re-hashed, forged, "
                    "or from another installation)",
                )
        self.prev = event["hash"]
        self.hashes[seq] = event["hash"]
        self.expected_seq += 1
        return True

    def result(
        self,
        checkpoints: Iterable[dict[str, Any]] = (),
        public_keys: Iterable[Ed25519PublicKey] | None = None,
        head: tuple[int, str] | None = None,
    ) -> dict[str, Any]:
        """The verdict: `ok`, `events`, `first_bad`, `reason`, and the checkpoints' story."""
        last_seq = self.expected_seq - 1
        out: dict[str, Any] = {"ok": self.first_bad is None, "events": self.count}
        if self.first_bad is None and self.count and self.keyed_by is None:
            self.first_bad, self.reason = 1, "the chain carries no audit key (no audit.rekeyed)"
        if self.first_bad is None and head is not None and head != (last_seq, self.prev):
            self.first_bad = last_seq + 1
            self.reason = f"the head says event {head[0]}: events were removed from the end"
        keys = list(public_keys) if public_keys is not None else None
        checked = 0
        latest = None
        for cp in sorted(checkpoints, key=lambda c: int(c.get("seq", 0))):
            if keys is not None and not checkpoint_valid(cp, keys):
                self._note_bad(int(cp.get("seq", 0)), "a checkpoint whose signature is not valid")
                continue
            seq = int(cp["seq"])
            if seq > last_seq and self.first_bad is None:
                self.first_bad = last_seq + 1
                self.reason = (
                    f"a signed checkpoint at event {seq} is past the chain's end ({last_seq}): "
                    "its tail was truncated"
                )
            elif seq in self.hashes and self.hashes[seq] != cp["hash"]:
                self._note_bad(seq, "the chain differs from a signed checkpoint")
            checked += 1
            latest = max(latest or 0, seq)
        if self.keyring is None and latest is None and self.count and self.first_bad is None:
            # Offline, the hashes alone prove nothing anyone could not recompute.
            self.first_bad, self.reason = 1, "no checkpoint signed with this public key"
        out.update(
            ok=self.first_bad is None,
            first_bad=self.first_bad,
            reason=self.reason,
            checkpoints=checked,
            last_checkpoint=latest,
        )
        if self.keyring is None:
            # Offline, only the signed checkpoints prove what the key would.
            out["pinned_through"] = latest or 0
        return out

    def _note_bad(self, seq: int, reason: str) -> None:
        if self.first_bad is None or seq < self.first_bad:
            self.first_bad, self.reason = seq, reason
