"""Shared reporting for the benchmarks: median and min-max spread of repeated measurements, and of
per-repeat ratios (each ratio pairs the two sides measured back to back in the same repeat)."""

from __future__ import annotations

import os
import statistics


def spread(values: list[float], fmt: str = ".1f") -> str:
    """``median (min-max, n=N)`` of ``values``."""
    return (f"{statistics.median(values):{fmt}} ({min(values):{fmt}}-{max(values):{fmt}}, n={len(values)})")


def ratios(num: list[float], den: list[float]) -> list[float]:
    """Per-repeat ratios ``num[i] / den[i]`` (both sides of repeat i ran back to back)."""
    return [a / b for a, b in zip(num, den)]


def load() -> str:
    """The 1/5/15-minute load averages, printed with every result: the machine may be shared."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f} {five:.2f} {fifteen:.2f} on {os.cpu_count()} cores"
