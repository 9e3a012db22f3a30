"""Rollout states: one StrEnum, the strings stored in rollouts.state and sent."""

from service.rollouts.states import FINAL_STATES, RolloutState


def test_rollout_states_are_the_strings_of_the_wire():
    assert [s.value for s in RolloutState] == [
        "running",
        "paused",
        "waiting_for_approval",
        "halted",
        "aborted",
        "succeeded",
        "failed",
    ]
    assert FINAL_STATES == ("aborted", "succeeded", "failed")
    assert f"rollout 1 is {RolloutState.HALTED}" == "rollout 1 is halted"
