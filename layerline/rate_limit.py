"""Request-rate limits per key: a token bucket for each key (an API key at the HTTP API, a client key at a stage's
OpenSession), refilled at `rate` per second up to `burst`. A request that finds its key's bucket empty is refused
at once with the seconds until it would pass (HTTP 429 with Retry-After, gRPC RESOURCE_EXHAUSTED), so one key's
burst never slows another key's requests. The clock is injectable (tests count decisions, not durations)."""

from __future__ import annotations

import math
import re
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 100_000  # buckets kept; the least recently used go first (a full bucket is what a new key gets anyway)
_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class Rate:
    """`count` requests per `period` seconds; `text` as the user wrote it (for messages)."""

    count: float
    period: float
    text: str

    @property
    def per_second(self) -> float:
        return self.count / self.period


def parse_rate(text: str) -> Rate:
    """`N/s`, `N/min` or `N/h` (N > 0, may be fractional) -> Rate; ValueError naming the form otherwise."""
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*/\s*([a-z]+)\s*", text or "")
    if not m or m.group(2) not in _UNITS or not float(m.group(1)) > 0 or not math.isfinite(float(m.group(1))):
        raise ValueError(f"a rate is N/s, N/min or N/h with N > 0, got {text!r}")
    return Rate(float(m.group(1)), _UNITS[m.group(2)], text.strip())


class RateLimiter:
    """Token buckets per key: each holds up to `burst` requests (default: one period's count, at least 1) and
    refills at the rate. Thread-safe."""

    def __init__(self, rate: Rate, burst: float | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst = max(1.0, burst if burst is not None else rate.count)
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # key -> (tokens, at)
        self._lock = threading.Lock()
        self.refused = 0

    def acquire(self, key: str) -> float:
        """0.0 when `key` may make a request now (it is counted), else the seconds until it may."""
        now = self._clock()
        with self._lock:
            tokens, at = self._buckets.pop(key, (self.burst, now))
            tokens = min(self.burst, tokens + (now - at) * self.rate.per_second)
            if tokens >= 1.0:
                wait, tokens = 0.0, tokens - 1.0
            else:
                wait = (1.0 - tokens) / self.rate.per_second
                self.refused += 1
            self._buckets[key] = (tokens, now)
            while len(self._buckets) > MAX_KEYS:
                self._buckets.popitem(last=False)
            return wait

    def message(self, what: str) -> str:
        return f"rate limit: at most {self.rate.text} {what}"
