"""Requirement lines a project may declare: checked where they arrive, normalized for a key.

A line is one PEP 508 requirement (`name[extras] specifier ; marker`), or a
direct reference `name @ https://...`. No pip options (`-r`, `-e`, `--index-url`):
where packages come from is the operator's setting, not a tenant's.
"""

from __future__ import annotations

import re

from packaging.requirements import InvalidRequirement, Requirement


class RequirementError(ValueError):
    """A line that is not a requirement; `line` is its 1-based number."""

    def __init__(self, line: int, text: str, why: str):
        super().__init__(f"requirement line {line} ({text!r}): {why}")
        self.line, self.text, self.why = line, text, why


def parse_requirements(lines: list[str]) -> list[Requirement]:
    out = []
    for number, raw in enumerate(lines, 1):
        text = raw.split(" #", 1)[0].strip()
        if not text or text.startswith("#"):
            continue
        if text.startswith("-"):
            raise RequirementError(
                number, raw, "pip options are not allowed; the package index is Retort's setting"
            )
        try:
            req = Requirement(text)
        except InvalidRequirement as exc:
            raise RequirementError(number, raw, str(exc)) from None
        if req.url and not req.url.startswith(("https://", "http://")):
            raise RequirementError(number, raw, "a direct reference must be an http(s) URL")
        out.append(req)
    return out


def check_requirements(lines: list[str]) -> list[str]:
    """The lines as given, once every one parses (raises RequirementError, a ValueError)."""
    parse_requirements(lines)
    return [line.strip() for line in lines if line.strip()]


def canonical_name(line: str) -> str:
    """The project name a normalized line installs (PEP 503: lower case, runs of -_. as -)."""
    return re.sub(r"[-_.]+", "-", Requirement(line).name).lower()


def normalized(lines: list[str]) -> list[str]:
    """One canonical, sorted form of a requirement set (the environment's key)."""
    return sorted({str(req) for req in parse_requirements(lines)})
