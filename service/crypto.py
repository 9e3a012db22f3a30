"""Encrypt target URLs at rest; the first key encrypts, every configured key decrypts."""

from __future__ import annotations

from cryptography.fernet import Fernet, InvalidToken, MultiFernet


class SecretBox:
    def __init__(self, keys: tuple[str, ...]):
        if not keys:
            raise ValueError("RETORT_SECRET_KEY is empty: set at least one Fernet key")
        self._fernet = MultiFernet([Fernet(k.encode()) for k in keys])

    def encrypt(self, value: str) -> str:
        return self._fernet.encrypt(value.encode()).decode()

    def decrypt(self, token: str) -> str:
        try:
            return self._fernet.decrypt(token.encode()).decode()
        except InvalidToken:
            raise RuntimeError(
                "a stored secret cannot be decrypted with the configured RETORT_SECRET_KEY"
            ) from None
