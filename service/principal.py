"""Who is asking: a token's name, role and the projects it may see."""

from __future__ import annotations

from dataclasses import dataclass

ROLES = ("viewer", "deployer", "admin")


@dataclass(frozen=True)
class Principal:
    name: str
    role: str
    # None: every project, present and future ("*").
    projects: frozenset[str] | None
    token_id: int | None = None

    def sees(self, project: str | None) -> bool:
        """Say whether this principal may know that `project` (and what is in it) exists."""
        return self.projects is None or (project is not None and project in self.projects)

    def has_role(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def everywhere(self) -> bool:
        return self.projects is None


# The bootstrap token from RETORT_ADMIN_TOKEN; also what operators' commands act as.
ADMIN = Principal("admin", "admin", None)
