"""Health hysteresis, outcome by outcome."""

from __future__ import annotations

import pytest

from gateway.registry import HealthTracker


def feed(tracker: HealthTracker, outcomes: str) -> str:
    """Feed 'o'k / 'x' outcomes; returns the health after each ('H' healthy, '.' not)."""
    out = ""
    for outcome in outcomes:
        tracker.observe(outcome == "o")
        out += "H" if tracker.healthy else "."
    return out


def test_first_success_makes_a_new_server_healthy() -> None:
    assert feed(HealthTracker(fail_threshold=3, recover_threshold=2), "xxo") == "..H"


def test_goes_down_only_after_consecutive_failures() -> None:
    tracker = HealthTracker(fail_threshold=3, recover_threshold=2)
    assert feed(tracker, "oxxoxxx") == "HHHHHH."


def test_comes_back_only_after_consecutive_successes() -> None:
    tracker = HealthTracker(fail_threshold=1, recover_threshold=3)
    assert feed(tracker, "ox" + "ooxooo") == "H." + "....." + "H"


def test_observe_reports_changes() -> None:
    tracker = HealthTracker(fail_threshold=1, recover_threshold=1)
    assert tracker.observe(True) is True
    assert tracker.observe(True) is False
    assert tracker.observe(False) is True
    assert tracker.observe(False) is False


def test_thresholds_must_be_positive() -> None:
    with pytest.raises(ValueError):
        HealthTracker(fail_threshold=0, recover_threshold=1)
