"""Health bookkeeping with hysteresis: a flapping server must fail or succeed several times in a row."""

from __future__ import annotations


class HealthTracker:
    """Counts consecutive outcomes. Pure: the caller feeds it results.

    A server that has never been healthy becomes healthy on its first success (there is nothing to
    hysterese against); after that it takes ``fail_threshold`` failures in a row to go down and
    ``recover_threshold`` successes in a row to come back.
    """

    __slots__ = ("_ever_healthy", "fail_threshold", "failures", "healthy", "recover_threshold", "successes")

    def __init__(self, *, fail_threshold: int, recover_threshold: int) -> None:
        if fail_threshold < 1 or recover_threshold < 1:
            raise ValueError("health thresholds must be >= 1")
        self.fail_threshold = fail_threshold
        self.recover_threshold = recover_threshold
        self.healthy = False
        self.failures = 0
        self.successes = 0
        self._ever_healthy = False

    def observe(self, ok: bool) -> bool:
        """Record one outcome; returns True when ``healthy`` changed."""
        if ok:
            self.successes += 1
            self.failures = 0
            if not self.healthy and (not self._ever_healthy or self.successes >= self.recover_threshold):
                self.healthy = True
                self._ever_healthy = True
                return True
            return False
        self.failures += 1
        self.successes = 0
        if self.healthy and self.failures >= self.fail_threshold:
            self.healthy = False
            return True
        return False
