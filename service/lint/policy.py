"""Resolve a project's lint policy and split findings into blocking and warnings.

A policy maps a code to "block", "warn" or "off". Each code starts from its
registry default (codes.py); the project's policy overrides it; then every
by-tag entry whose "key=value" matches the environment's tags, in sorted key
order so the result does not depend on how the settings were stored.
"""

from __future__ import annotations

from service.lint.codes import CODES, Action, Finding

ACTIONS = frozenset(a.value for a in Action)


def _problems(policy: dict[str, str], where: str) -> list[str]:
    problems = []
    for code, action in policy.items():
        if code not in CODES:
            problems.append(f"{where}: unknown lint code {code!r}")
        elif action not in ACTIONS:
            problems.append(
                f"{where}: unknown action {action!r} for {code} (expected block, warn or off)"
            )
    return problems


def resolve_policy(
    policy: dict[str, str] | None,
    by_tag: dict[str, dict[str, str]] | None,
    tags: dict[str, str],
) -> dict[str, str]:
    """Return code -> action; raise ValueError naming every unknown code, action or tag key."""
    problems = _problems(policy or {}, "policy")
    for key, entry in (by_tag or {}).items():
        if "=" not in key or not key.split("=", 1)[0]:
            problems.append(f"by_tag: {key!r} is not of the form tag=value")
        problems += _problems(entry, f"by_tag[{key!r}]")
    if problems:
        raise ValueError("; ".join(problems))
    actions = {code: info.default_action for code, info in CODES.items()}
    actions.update(policy or {})
    for key in sorted(by_tag or {}):
        tag, value = key.split("=", 1)
        if tags.get(tag) == value:
            actions.update(by_tag[key])
    return actions


def evaluate(
    findings: list[Finding], policy: dict[str, str], allowed: set[str]
) -> tuple[list[Finding], list[Finding]]:
    """Split findings into (blocking, warnings); allowed codes warn, "off" codes are dropped."""
    blocking: list[Finding] = []
    warnings: list[Finding] = []
    for finding in findings:
        default = CODES[finding.code].default_action if finding.code in CODES else Action.WARN
        action = policy.get(finding.code, default)
        if action == Action.OFF:
            continue
        if action == Action.BLOCK and finding.code not in allowed:
            blocking.append(finding)
        else:
            warnings.append(finding)
    return blocking, warnings
