"""Secret keys: rotate to a new key while old ciphertexts still decrypt, then drop the old."""

import os
import subprocess
import sys

from cryptography.fernet import Fernet


def test_secrets_rotate_reencrypts_with_the_new_key(tmp_path):
    from service.config import Config
    from service.crypto import SecretBox
    from service.databases.models import Database
    from service.databases.ops import create_database
    from service.databases.schemas import DatabaseCreate
    from service.db import make_engine, transaction
    from service.projects.ops import create_project
    from service.projects.schemas import ProjectCreate
    from service.schema import upgrade_schema
    from service.sessions import make_state_sessions
    from service.webhooks.ops import create_webhook
    from service.webhooks.schemas import WebhookCreate

    old, new = Fernet.generate_key().decode(), Fernet.generate_key().decode()
    state = f"sqlite:///{tmp_path / 'state.db'}"
    upgrade_schema(state)
    engine = make_engine(state)
    sessions = make_state_sessions(engine, ("audit-key-of-this-test",))
    secret_url = "postgresql://app:Rotate-Me-7781@db.internal/app"
    with transaction(sessions) as s:
        project = create_project(s, ProjectCreate(name="p"), "admin")
        body = DatabaseCreate(name="d", project="p", url=secret_url)
        config = Config(state, "redis://x", tmp_path, "x", (old,))
        create_database(s, body, SecretBox((old,)), "admin", None, config)
        hook = WebhookCreate(url="https://example.com/h", events=["job.failed"], secret="s" * 20)
        create_webhook(s, project, hook, SecretBox((old,)), "admin")

    env = {k: v for k, v in os.environ.items() if not k.startswith("RETORT_")}
    env.update(
        RETORT_DATABASE_URL=state,
        RETORT_DATA_DIR=str(tmp_path),
        RETORT_SECRET_KEY=f"{new},{old}",
        RETORT_ADMIN_TOKEN="x",
        RETORT_AUDIT_KEY="audit-key-of-this-test",
    )
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "secrets", "rotate"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    assert "1 database URLs, 1 webhook secrets" in out.stdout

    only_new = SecretBox((new,))
    with transaction(sessions) as s:
        db = s.query(Database).one()
        assert only_new.decrypt(db.url_encrypted).endswith("Rotate-Me-7781@db.internal/app")
        try:
            SecretBox((old,)).decrypt(db.url_encrypted)
            raise AssertionError("the old key still decrypts after rotation")
        except RuntimeError as exc:
            assert "RETORT_SECRET_KEY" in str(exc) and "Rotate-Me" not in str(exc)
    # A key that never encrypted anything is refused with a clear message, not a traceback.
    env["RETORT_SECRET_KEY"] = Fernet.generate_key().decode()
    out = subprocess.run(
        [sys.executable, "-m", "service.cli", "secrets", "rotate"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 1 and "cannot be decrypted" in out.stderr
    assert "Traceback" not in out.stderr
    engine.dispose()
