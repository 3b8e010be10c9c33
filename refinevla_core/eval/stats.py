"""Success rates with honest uncertainty: at 20-30 trials per task a bare percentage hides a +-20 point interval.

Wilson score interval (Wilson 1927): unlike the normal approximation it stays inside [0, 1] and is sensible at
0/n and n/n, the common cases for small evaluations.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Rate:
    successes: int
    trials: int
    low: float
    high: float

    @property
    def rate(self) -> float:
        return self.successes / self.trials if self.trials else float("nan")

    def text(self) -> str:
        """'45.0% [25.8, 65.8] (9/20)'."""
        if not self.trials:
            return "n/a (0 trials)"
        return f"{100 * self.rate:.1f}% [{100 * self.low:.1f}, {100 * self.high:.1f}] ({self.successes}/{self.trials})"


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Two-sided Wilson score interval for a binomial proportion (z = 1.96: 95 %)."""
    if trials < 0 or successes < 0 or successes > trials:
        raise ValueError(f"need 0 <= successes <= trials, got {successes}/{trials}")
    if trials == 0:
        return 0.0, 1.0
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def success_rate(successes: int, trials: int, z: float = 1.959964) -> Rate:
    low, high = wilson_interval(successes, trials, z)
    return Rate(successes, trials, low, high)
