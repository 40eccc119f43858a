"""Confidence intervals for evaluation scores over independent test seeds.

Each test seed is one independent episode, so the mean score over N seeds has a standard error of
``std / sqrt(N)``. With N = 50 that is about +/-0.04 at 95%, which is why one 50-seed evaluation (and even
more the max over many of them) is a noisy basis for a claim; 500 seeds bring it near +/-0.01.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% quantile of the standard normal


def mean_interval(values: Sequence[float], z: float = Z95) -> tuple[float, float, float]:
    """(mean, low, high) of the normal-approximation 95% interval ``mean +/- z * std / sqrt(n)``.

    ``std`` is the sample standard deviation (n - 1); the interval is clipped to the scores' [0, 1] range.
    One value gives a zero-width interval at that value.
    """
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("mean_interval: no values")
    mean = float(x.mean())
    if x.size == 1:
        return mean, mean, mean
    half = z * float(x.std(ddof=1)) / math.sqrt(x.size)
    return mean, max(0.0, mean - half), min(1.0, mean + half)


def wilson_interval(successes: int, n: int, z: float = Z95) -> tuple[float, float, float]:
    """(rate, low, high) of the Wilson score interval for a success rate (sensible at 0 or n successes)."""
    if n < 1:
        raise ValueError("wilson_interval: n must be >= 1")
    p = successes / n
    denom = 1 + z * z / n
    center = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return p, max(0.0, center - half), min(1.0, center + half)


def split_summary(log: Mapping[str, Any], prefix: str = "test/") -> dict[str, Any]:
    """95% intervals for one split of an env runner log (``{prefix}sim_max_reward_<seed>`` per seed, plus
    ``{prefix}success_rate``); {} when the split has no episodes."""
    key = f"{prefix}sim_max_reward_"
    seeds = sorted(int(k[len(key) :]) for k in log if k.startswith(key))
    if not seeds:
        return {}
    scores = [float(log[f"{key}{s}"]) for s in seeds]
    mean, low, high = mean_interval(scores)
    out = {
        f"{prefix}n_episodes": len(seeds),
        f"{prefix}first_seed": seeds[0],
        f"{prefix}last_seed": seeds[-1],
        f"{prefix}mean_score_ci95_low": low,
        f"{prefix}mean_score_ci95_high": high,
    }
    if f"{prefix}success_rate" in log:
        successes = round(float(log[f"{prefix}success_rate"]) * len(seeds))
        _, s_low, s_high = wilson_interval(successes, len(seeds))
        out[f"{prefix}success_rate_ci95_low"] = s_low
        out[f"{prefix}success_rate_ci95_high"] = s_high
    return out
