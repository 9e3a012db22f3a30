"""Architecture contracts ([tool.importlinter] in pyproject.toml), checked on every run."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    lint = Path(sys.executable).with_name("lint-imports")
    out = subprocess.run([str(lint)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Contracts: 5 kept, 0 broken." in out.stdout, out.stdout


def test_any_module_imports_first_and_blueprints_stand_without_the_app():
    """Issue 21: blueprints took their helpers from service.app (a cycle), and importing
    service.webhooks.ops first raised ImportError. Each module in a fresh interpreter."""
    modules = [
        "service.webhooks.ops",
        "service.audit.ops",
        "service.audit.hooks",
        "service.sessions",
        "service.jobs.ops",
        "service.rollouts.ops",
        "service.jobs.run.supervise",
        *(
            f"service.{name}.api"
            for name in (
                "audit",
                "bundles",
                "databases",
                "jobs",
                "projects",
                "rollouts",
                "tokens",
                "webhooks",
            )
        ),
    ]
    for module in modules:
        code = f"import sys, {module}; print('service.app' in sys.modules)"
        out = subprocess.run(
            [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60
        )
        assert out.returncode == 0, (module, out.stderr)
        assert out.stdout.strip() == "False", f"{module} pulls in service.app"


def test_only_service_sessions_gives_sessions_the_audit_keys():
    """Issue 21: webhooks subscribe to the audit log in service.sessions, so a process that
    records events must take its sessions from there (without the keys, the commit fails)."""
    givers = sorted(
        str(path.relative_to(ROOT))
        for folder in ("service", "worker", "bench")
        for path in (ROOT / folder).rglob("*.py")
        if "AUDIT_KEYS" in path.read_text()
    )
    assert givers == ["service/audit/ops.py", "service/sessions.py"], givers
