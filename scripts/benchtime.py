"""Alternating timings for the bench scripts (imported as a sibling module, like benchmem).

A ratio of two timings taken minutes apart follows the machine's load, not the code. Here
ours and the reference run alternately, ``A B A B ...`` for several rounds, each round
gives one ratio, and the median and the spread (min-max) of those ratios are reported:
load that changes during the run moves both sides of a round alike.

    ours, ref = alternate(lambda: ours_step(), lambda: reference_step(), rounds=5)
    print(ratio_line("clDice 256x256x80, ours / skimage", ours, ref))
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

CLOCKS: dict[str, Callable[[], float]] = {
    "wall": time.perf_counter,
    # the CPU seconds of this process: with one torch thread this follows the work, not the
    # other jobs on shared cores; wrong for GPU work (the GPU's time is not counted)
    "cpu": time.process_time,
}


def timed(fn: Callable[[], Any], clock: str = "wall", sync: Callable[[], None] | None = None):
    """``(seconds, result)`` of one call of ``fn`` on ``clock`` ("wall" or "cpu")."""
    now = CLOCKS[clock]
    if sync is not None:
        sync()
    t0 = now()
    out = fn()
    if sync is not None:
        sync()
    return now() - t0, out


def alternate(
    ours: Callable[[], Any],
    reference: Callable[[], Any],
    rounds: int = 5,
    warmup: int = 1,
    clock: str = "wall",
    sync: Callable[[], None] | None = None,
) -> tuple[list[float], list[float]]:
    """Time ``ours`` and ``reference`` alternately (``A B A B ...``), ``rounds`` times each.

    ``warmup`` untimed rounds come first (caches, allocator, kernels). Returns the two
    lists of seconds, round by round.
    """
    for _ in range(warmup):
        ours()
        reference()
    a, b = [], []
    for _ in range(rounds):
        a.append(timed(ours, clock, sync)[0])
        b.append(timed(reference, clock, sync)[0])
    return a, b


def ratios(a: Sequence[float], b: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``a[i] / b[i]``."""
    return [x / y for x, y in zip(a, b)]


def ratio_summary(a: Sequence[float], b: Sequence[float]) -> dict[str, float]:
    """Median and spread of the round-by-round ratios ``a / b``, and both sides' medians."""
    r = ratios(a, b)
    return {
        "median": statistics.median(r),
        "min": min(r),
        "max": max(r),
        "a_median_s": statistics.median(a),
        "b_median_s": statistics.median(b),
        "rounds": len(r),
    }


def ratio_line(name: str, a: Sequence[float], b: Sequence[float], unit: str = "s") -> str:
    """One printable line: both medians and the ratio's median [min-max] over the rounds."""
    s = ratio_summary(a, b)
    scale, fmt = (1e3, ".1f") if unit == "ms" else (1.0, ".3f")
    return (
        f"{name}: {s['a_median_s'] * scale:{fmt}} {unit} vs {s['b_median_s'] * scale:{fmt}} "
        f"{unit} (medians); ratio median x{s['median']:.3g} [x{s['min']:.3g}-x{s['max']:.3g}] "
        f"over {s['rounds']} alternating rounds"
    )
