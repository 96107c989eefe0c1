"""The one timer of the benchmarks: warm-up excluded, medians, optional interleaving.

Every section times through these helpers so that figures in docs/BENCHMARKS.md mean the same
thing: wall-clock seconds of one call, blocking until results are ready (`jax.block_until_ready`
on whatever the callable returns; torch CPU ops are synchronous).
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax

__all__ = ["Timing", "cpu_name", "time_fn", "time_interleaved"]


def cpu_name() -> str:
    """The host CPU's model name (/proc/cpuinfo), else what `platform` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            names = [ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")]
        if names:
            return names[0]
    except OSError:
        pass
    return platform.processor() or platform.machine()


class Timing(dict):
    """{'median_s', 'min_s', 'max_s', 'first_s', 'repeats', 'times_s'} of one callable."""


def _call(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    return time.perf_counter() - t0


def time_fn(fn: Callable[[], Any], *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Times `fn()` `repeats` times after `warmup` untimed calls.

    Args:
      fn: a callable without arguments; its result is blocked on.
      warmup: untimed calls first (compilation, caches); the first of them is reported as
        `first_s` (compile + run for a jitted function).
      repeats: timed calls.

    Returns:
      A `Timing` with the median, min, max, first call and every timed call, in seconds.
    """
    first = None
    for i in range(warmup):
        t = _call(fn)
        if i == 0:
            first = t
    times = [_call(fn) for _ in range(repeats)]
    return Timing(
        median_s=statistics.median(times),
        min_s=min(times),
        max_s=max(times),
        first_s=first,
        repeats=repeats,
        times_s=times,
    )


def time_interleaved(
    fns: Mapping[str, Callable[[], Any]], *, warmup: int = 1, repeats: int = 5
) -> dict[str, Timing]:
    """Times several callables in turn (A, B, A, B, ...) so that machine noise hits all alike.

    Args:
      fns: {name: callable}.
      warmup: untimed calls of each first.
      repeats: timed rounds.

    Returns:
      {name: Timing}.
    """
    first: dict[str, float | None] = {k: None for k in fns}
    for i in range(warmup):
        for k, fn in fns.items():
            t = _call(fn)
            if i == 0:
                first[k] = t
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for k, fn in fns.items():
            times[k].append(_call(fn))
    return {
        k: Timing(
            median_s=statistics.median(v),
            min_s=min(v),
            max_s=max(v),
            first_s=first[k],
            repeats=repeats,
            times_s=v,
        )
        for k, v in times.items()
    }
