"""Unit tests of policy resolution and of splitting findings into blocking and warnings."""

from __future__ import annotations

import pytest

from service.lint import CODES, Finding, evaluate, resolve_policy


def finding(code: str) -> Finding:
    return Finding(code, CODES[code].severity, "r1", "SQL", 0, "message", "advice")


def test_defaults_block_data_loss_and_failing_statements_and_warn_the_rest():
    actions = resolve_policy(None, None, {})
    assert set(actions) == set(CODES)
    blocked = {code for code, action in actions.items() if action == "block"}
    assert blocked == {
        "table_dropped",
        "column_dropped",
        "concurrently_in_transaction",
        "database_drifted",
    }
    assert set(actions.values()) == {"block", "warn"}


def test_project_policy_overrides_defaults():
    actions = resolve_policy({"table_dropped": "warn", "index_not_concurrent": "block"}, None, {})
    assert actions["table_dropped"] == "warn"
    assert actions["index_not_concurrent"] == "block"
    assert actions["column_dropped"] == "block"


def test_matching_tags_apply_in_sorted_key_order():
    by_tag = {
        "tier=prod": {"index_not_concurrent": "block", "table_renamed": "block"},
        "env=dev": {"table_dropped": "off"},
        "tier=dev": {"index_not_concurrent": "off"},
        "env=prod": {"table_renamed": "off"},
    }
    actions = resolve_policy({"table_renamed": "warn"}, by_tag, {"env": "prod", "tier": "prod"})
    assert actions["index_not_concurrent"] == "block"
    # "env=prod" sorts before "tier=prod": the later entry wins.
    assert actions["table_renamed"] == "block"
    assert actions["table_dropped"] == "block"  # env=dev does not match


def test_unknown_codes_actions_and_tag_keys_are_named():
    with pytest.raises(ValueError, match="no_such_code"):
        resolve_policy({"no_such_code": "warn"}, None, {})
    with pytest.raises(ValueError, match="'stop'"):
        resolve_policy(None, {"env=prod": {"table_dropped": "stop"}}, {})
    with pytest.raises(ValueError, match="tag=value"):
        resolve_policy(None, {"prod": {"table_dropped": "off"}}, {})
    with pytest.raises(ValueError, match="first.*second"):
        resolve_policy({"first": "warn", "second": "warn"}, None, {})


def test_evaluate_splits_blocking_from_warnings_and_drops_off():
    policy = resolve_policy({"index_not_concurrent": "off"}, None, {})
    findings = [
        finding("table_dropped"),
        finding("column_dropped"),
        finding("index_not_concurrent"),
        finding("set_not_null"),
    ]
    blocking, warnings = evaluate(findings, policy, allowed={"column_dropped"})
    assert [f.code for f in blocking] == ["table_dropped"]
    # An allowed blocking finding is still reported, as a warning.
    assert [f.code for f in warnings] == ["column_dropped", "set_not_null"]


def test_evaluate_falls_back_to_the_default_action_for_codes_missing_from_policy():
    blocking, warnings = evaluate([finding("table_dropped"), finding("set_not_null")], {}, set())
    assert [f.code for f in blocking] == ["table_dropped"]
    assert [f.code for f in warnings] == ["set_not_null"]
