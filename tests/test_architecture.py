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
    assert "Contracts: 7 kept, 0 broken." in out.stdout, out.stdout


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


def import_cycles(graph) -> list[list[str]]:
    """The import cycles of a grimp graph: its strongly connected components (Tarjan)."""
    cycles: list[list[str]] = []
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for other in graph.find_modules_directly_imported_by(module):
            if other not in index:
                visit(other)
                low[module] = min(low[module], low[other])
            elif other in on_stack:
                low[module] = min(low[module], index[other])
        if low[module] == index[module]:
            component = []
            while True:
                other = stack.pop()
                on_stack.discard(other)
                component.append(other)
                if other == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(graph.modules):
        if module not in index:
            visit(module)
    return cycles


def test_no_module_of_retort_imports_itself_back():
    """No import cycle, however long, among service/ and worker/ (grimp: import-linter's graph)."""
    import grimp

    made = grimp.ImportGraph()
    for importer, imported in (("a.x", "a.y"), ("a.y", "a.z"), ("a.z", "a.x"), ("a.z", "a.w")):
        made.add_import(importer=importer, imported=imported)
    assert import_cycles(made) == [["a.x", "a.y", "a.z"]]  # the check finds a cycle of three
    graph = grimp.build_graph("service", "worker", exclude_type_checking_imports=True)
    assert len(graph.modules) > 100
    assert import_cycles(graph) == []
