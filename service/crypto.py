"""Encrypt target URLs at rest; the first key encrypts, every configured key decrypts."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from service.audit.actions import AuditAction


class SecretBox:
    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ValueError("RETORT_SECRET_KEY is empty: set at least one Fernet key")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def rotate(self, token: str) -> str:
        """Re-encrypt a ciphertext of any configured key with the first key."""
        try:
            return self._fernet.rotate(token.encode()).decode()
        except InvalidToken:
            raise RuntimeError(
                "a stored secret cannot be decrypted with the configured RETORT_SECRET_KEY"
            ) from None

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise RuntimeError(
                "a stored secret cannot be decrypted with the configured RETORT_SECRET_KEY"
            ) from None


def rotate_secrets(session, box: SecretBox, actor: str) -> dict[str, int]:
    """Re-encrypt every stored secret with the first configured key (`retort secrets rotate`).

    Run it after putting a new key first in RETORT_SECRET_KEY (new,old); once
    it has run, the old key can be dropped from the list.
    """
    from sqlalchemy import select

    from service.audit.ops import record_event
    from service.databases.models import Database
    from service.projects.models import Project
    from service.webhooks.models import Webhook

    counts = {"databases": 0, "webhooks": 0, "project_secrets": 0}
    for db in session.scalars(select(Database).with_for_update()):
        db.url_encrypted = box.rotate(db.url_encrypted)
        counts["databases"] += 1
    for hook in session.scalars(select(Webhook).with_for_update()):
        hook.secret_encrypted = box.rotate(hook.secret_encrypted)
        counts["webhooks"] += 1
    for project in session.scalars(select(Project).with_for_update()):
        if project.secret_env:
            project.secret_env = {k: box.rotate(v) for k, v in project.secret_env.items()}
            counts["project_secrets"] += len(project.secret_env)
    record_event(session, AuditAction.SECRETS_ROTATED, actor=actor, data=counts)
    return counts
