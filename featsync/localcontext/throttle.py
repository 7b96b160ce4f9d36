"""A budget of failed attempts per client (a token bucket): a burst of failures is allowed,
then one more per interval. `featsync serve` keys it by remote address to slow down
secret guessing at the token endpoint without sleeping in a server thread: an address
out of budget is refused at once, its attempt never checked."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable


class FailureBudget:
    def __init__(
        self,
        burst: int,
        interval_s: float,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 10_000,
    ) -> None:
        if burst < 1 or interval_s <= 0:
            raise ValueError("a failure budget needs a burst >= 1 and an interval > 0")
        self.burst, self.interval_s, self.max_keys = burst, interval_s, max_keys
        self._clock = clock
        self._lock = threading.Lock()
        self._left: dict[str, tuple[float, float]] = {}  # key -> (attempts left, as of)

    def _level(self, key: str, now: float) -> float:
        left, at = self._left.get(key, (float(self.burst), now))
        return min(float(self.burst), left + (now - at) / self.interval_s)

    def take(self, key: str) -> float:
        """Reserve one attempt for `key`: 0.0 if it may go ahead, else the seconds to wait.

        The attempt is reserved before it is checked, so concurrent attempts from one
        key cannot all slip through while the first is being checked."""
        with self._lock:
            now = self._clock()
            level = self._level(key, now)
            if level < 1.0:
                return (1.0 - level) * self.interval_s
            self._left.pop(key, None)  # re-insert: the dict stays ordered by last use
            self._left[key] = (level - 1.0, now)
            self._forget_some(now)
            return 0.0

    def refund(self, key: str) -> None:
        """The reserved attempt succeeded: it costs nothing."""
        with self._lock:
            now = self._clock()
            self._left[key] = (min(float(self.burst), self._level(key, now) + 1.0), now)

    def _forget_some(self, now: float) -> None:
        """Bound the memory: drop keys whose budget is full again, then the least recent."""
        if len(self._left) <= self.max_keys:
            return
        for key in [k for k in self._left if self._level(k, now) >= self.burst]:
            del self._left[key]
        while len(self._left) > self.max_keys:
            del self._left[next(iter(self._left))]
