"""Check a migration target against a bundle's revision graph before queuing it."""

from __future__ import annotations

import warnings

from alembic.script.revision import MultipleHeads, RangeNotAncestorError, ResolutionError

from service.bundles.archive import revision_map
from service.bundles.models import Bundle
from service.errors import InvalidError, MultipleHeadsError
from service.jobs import relative


def check_target(bundle: Bundle, action: str, target: str) -> str:
    """Return the target, normalized, or raise a 422 that says how to fix it."""
    target = target.strip()
    heads = bundle.heads
    rel = relative.STEPS.match(target)
    if rel:
        sign, steps = rel.groups()
        if int(steps) == 0:
            raise InvalidError("a relative target must move at least one step", {"field": "target"})
        if action == "stamp":
            raise InvalidError(
                "stamp takes a revision, `head`, `heads` or `base`, not a relative step",
                {"field": "target"},
            )
        if (action == "upgrade") != (sign == "+"):
            raise InvalidError(
                f"{action} needs a {'+N' if action == 'upgrade' else '-N'} target, not {target}",
                {"field": "target"},
            )
        if len(heads) > 1:
            raise InvalidError(
                f"relative target {target} is ambiguous: the bundle has {len(heads)} heads "
                f"({', '.join(heads)}); use a revision id or branch@{target}",
                {"field": "target", "heads": heads},
                code="ambiguous_relative_target",
            )
        return target
    if target == "head" and len(heads) > 1:
        raise MultipleHeadsError(
            f"the bundle has {len(heads)} heads ({', '.join(heads)}): "
            "use `heads` to reach all of them or `<branch>@head` for one",
            {
                "field": "target",
                "heads": heads,
                "suggestions": ["heads"] + [f"{h}@head" for h in heads],
            },
        )
    if target in ("head", "heads", "base"):
        return target
    rmap = revision_map(bundle.revisions)
    branch = relative.BRANCH.match(target)
    rev_rel = relative.FROM_REVISION.match(target) if not branch else None
    ref = branch.group("label") if branch else rev_rel.group("rev") if rev_rel else target
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = rmap.get_revisions(ref)
    except MultipleHeads as exc:
        raise MultipleHeadsError(str(exc), {"field": "target", "heads": heads}) from None
    except (ResolutionError, RangeNotAncestorError) as exc:
        raise InvalidError(
            f"unknown revision {ref!r} in bundle {bundle.digest[:12]}: {exc}",
            {"field": "target", "revision": ref},
            code="unknown_revision",
        ) from None
    if not found:
        raise InvalidError(
            f"unknown revision {ref!r}",
            {"field": "target", "revision": ref},
            code="unknown_revision",
        )
    return target
