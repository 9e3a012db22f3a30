"""Lint a job's migration plan: pure functions, no I/O, no database.

The sandboxed runner renders each revision's SQL, gathers live facts (tables,
row estimates, lock_timeout, observed locks and rewrites) and calls lint();
the worker applies the project's policy with resolve_policy() and evaluate().
docs/lint.md documents every code.
"""

from service.lint.codes import CODES, CodeInfo, Finding
from service.lint.plan import LiveState, RevisionInfo, Statement, lint, tables_referenced
from service.lint.policy import evaluate, resolve_policy

__all__ = [
    "CODES",
    "CodeInfo",
    "Finding",
    "LiveState",
    "RevisionInfo",
    "Statement",
    "evaluate",
    "lint",
    "resolve_policy",
    "tables_referenced",
]
