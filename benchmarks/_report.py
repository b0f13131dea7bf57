"""Shared pieces of the benchmarks: median and min-max spread of repeated measurements, and of
per-repeat ratios (each ratio pairs the two sides measured back to back in the same repeat); a
`lorakit serve` subprocess."""

from __future__ import annotations

import os
import re
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Optional


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


def start_serve(model: Path, adapter_dir: Path, env: Optional[dict] = None) -> tuple[subprocess.Popen, str]:
    """A `lorakit serve` of ``model`` on a free port (adapters loadable from ``adapter_dir``); returns
    the process and its /v1 URL. Exits with the server's output when it does not start."""
    proc = subprocess.Popen([sys.executable, "-m", "lorakit", "serve", "--model", str(model), "--port", "0",
                             "--adapter-dir", str(adapter_dir)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **(env or {})})
    line = proc.stdout.readline()
    found = re.search(r"http://127\.0\.0\.1:\d+/v1", line)
    if not found:
        proc.kill()
        raise SystemExit(f"lorakit serve did not start: {line}{proc.stdout.read()}")
    return proc, found.group(0)
