"""The worker's side of the lint: check what a runner found, judge it by the project's
policy, and park a job whose blocking findings need an approval.

A parked job holds nothing: no lease, no worker, no runner. An approval puts it
back in the queue, where it runs again from the database's heads as they are
then (and is linted again: the approval covers the codes it named).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.orm import Session

from service.audit.actions import AuditAction
from service.jobs.run.context import JobContext
from service.jobs.run.transitions import update_job
from service.jobs.states import JobState
from service.lint import CODES, resolve_policy
from service.locks import ops as leases

# What a finding may carry back from a runner (its own job's data, bounded).
_MAX_FINDINGS = 500
_TEXT = {"message": 2000, "advice": 2000, "statement": 4000, "revision": 64, "table": 200}


@dataclass
class Verdict:
    """The findings of one look at a database, each with the action the policy gives it."""

    blocking: list[dict[str, Any]] = field(default_factory=list)
    allowed: list[dict[str, Any]] = field(default_factory=list)  # blocking, but allowed
    warnings: list[dict[str, Any]] = field(default_factory=list)
    mode: str | None = None

    @property
    def empty(self) -> bool:
        return not (self.blocking or self.allowed or self.warnings)

    def document(self) -> dict[str, Any]:
        return {
            "mode": self.mode,
            "blocking": self.blocking,
            "allowed": self.allowed,
            "warnings": self.warnings,
        }


def checked_findings(raw: Any) -> list[dict[str, Any]]:
    """A runner's findings as data Retort stores: known codes, bounded strings."""
    if not isinstance(raw, list):
        return []
    out: list[dict[str, Any]] = []
    for item in raw[:_MAX_FINDINGS]:
        if not isinstance(item, dict) or item.get("code") not in CODES:
            continue
        severity = item.get("severity")
        if severity not in ("error", "warning", "info"):
            severity = CODES[item["code"]].severity
        finding: dict[str, Any] = {"code": item["code"], "severity": severity}
        for key, limit in _TEXT.items():
            value = item.get(key)
            finding[key] = value[:limit] if isinstance(value, str) else None
        index = item.get("statement_index")
        finding["statement_index"] = index if isinstance(index, int) else None
        observed = item.get("observed")
        if isinstance(observed, dict) and len(json.dumps(observed, default=str)) <= 4096:
            finding["observed"] = json.loads(json.dumps(observed, default=str))
        out.append(finding)
    return out


def lint_settings(settings: dict[str, Any]) -> dict[str, Any]:
    return settings.get("lint") or {}


def judge(
    report: Any,
    settings: dict[str, Any],
    tags: dict[str, str],
    allowed_codes: set[str],
    drifted: bool = False,
) -> Verdict:
    """Apply the project's policy (per database tag) to the lint's report of one job."""
    report = report if isinstance(report, dict) else {}
    findings = checked_findings(report.get("findings"))
    if isinstance(report.get("error"), str):
        # The lint itself could not run: never silently fine.
        findings.append(
            {
                "code": "unparsed_statement",
                "severity": CODES["unparsed_statement"].severity,
                "revision": None,
                "statement": None,
                "statement_index": None,
                "table": None,
                "message": f"the job's SQL could not be rendered for the lint: "
                f"{report['error'][:500]}",
                "advice": "run a plan (retort plan DB) to see what fails, or allow the code",
            }
        )
    drift = settings.get("drift") or {}
    if drifted and drift.get("refuse_when_drifted"):
        findings.append(
            {
                "code": "database_drifted",
                "severity": CODES["database_drifted"].severity,
                "revision": None,
                "statement": None,
                "statement_index": None,
                "table": None,
                "message": "the database's newest drift check found its schema differs from "
                "what the bundle builds at its revision (project setting "
                "drift.refuse_when_drifted)",
                "advice": "see `retort drift DB`: reconcile the schema, or approve this job",
            }
        )
    lint = lint_settings(settings)
    policy = resolve_policy(lint.get("policy"), lint.get("by_tag"), tags or {})
    mode = report.get("mode")
    verdict = Verdict(mode=mode if isinstance(mode, str) and len(mode) <= 32 else None)
    for finding in findings:
        action = policy.get(finding["code"], "warn")
        finding["action"] = action
        if action == "off":
            continue
        if action != "block":
            verdict.warnings.append(finding)
        elif finding["code"] in allowed_codes:
            verdict.allowed.append(finding)
        else:
            verdict.blocking.append(finding)
    return verdict


def allowed_codes(options: dict[str, Any] | None, approval: dict[str, Any] | None) -> set[str]:
    """Codes the request allowed (`allow`) and an approval accepted."""
    codes = set((options or {}).get("allow") or ())
    if approval and approval.get("decision") == "approved":
        codes |= set(approval.get("codes") or ())
    return codes


def park(s: Session, ctx: JobContext, verdict: Verdict) -> bool:
    """Park a running job for an approval in the caller's fenced transaction; free its lease.

    Nothing was applied yet: when approved it starts over from the heads the
    database has then (started_at and from_heads cleared).
    """
    parked = update_job(
        s,
        ctx.job_id,
        (JobState.RUNNING,),
        state=JobState.WAITING_FOR_APPROVAL,
        findings=verdict.document(),
        worker=None,
        claim_expires_at=None,
        started_at=None,
        from_heads=None,
        fencing_token=None,
    )
    if not parked:
        return False
    ctx.audit(
        s,
        AuditAction.JOB_WAITING_FOR_APPROVAL,
        {
            "codes": sorted({f["code"] for f in verdict.blocking}),
            "findings": [_brief(f) for f in verdict.blocking],
        },
    )
    if leases.release(s, ctx.database_id, ctx.token):
        ctx.audit(s, AuditAction.LEASE_RELEASED)
    return True


def record(s: Session, ctx: JobContext, verdict: Verdict, requested_by: str) -> None:
    """Keep a starting job's findings; audit what its request or an approval allowed."""
    update_job(s, ctx.job_id, findings=verdict.document())
    if verdict.allowed:
        ctx.audit(
            s,
            AuditAction.JOB_FINDINGS_ALLOWED,
            {
                "codes": sorted({f["code"] for f in verdict.allowed}),
                "findings": [_brief(f) for f in verdict.allowed],
                "requested_by": requested_by,
            },
        )


def _brief(finding: dict[str, Any]) -> dict[str, Any]:
    return {k: finding.get(k) for k in ("code", "revision", "table", "message")}
