"""Metrics to ``metrics.jsonl`` (+ optional TensorBoard), a progress display, and the loss-curve PNG."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any, Optional


class MetricsWriter:
    """Appends one JSON object per line. On resume, lines past the resumed step are dropped first,
    so the file tells one consistent history however often the run was killed."""

    def __init__(self, path: Path, resume_step: Optional[int] = None, tensorboard_dir: Optional[Path] = None) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        if resume_step is None:
            path.write_text("")
        elif path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a line cut short by the kill that we resume from
                    continue
                if record.get("step", 0) <= resume_step:
                    kept.append(line)
            path.write_text("".join(line + "\n" for line in kept))
        self._tb = None
        if tensorboard_dir is not None:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise ValueError("train.tensorboard=true needs the tensorboard package: pip install tensorboard") from None
            self._tb = SummaryWriter(str(tensorboard_dir))

    def log(self, record: dict[str, Any]) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")
        if self._tb is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)):
                    self._tb.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()


class Progress:
    """A tqdm bar on a terminal; on a pipe or file, a plain line about every 5% of the run."""

    def __init__(self, total: int, initial: int = 0, desc: str = "train") -> None:
        self.total, self.step = total, initial
        self.start, self.start_step = time.perf_counter(), initial
        self.every = max(1, total // 20)
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int, **values: float) -> None:
        shown = {k: (f"{v:.4g}" if isinstance(v, float) else v) for k, v in values.items()}
        if self.bar is not None:
            self.bar.update(step - self.step)
            self.bar.set_postfix(shown, refresh=False)
        elif step % self.every == 0 or step == self.total:
            done = step - self.start_step
            elapsed = time.perf_counter() - self.start
            eta = elapsed / done * (self.total - step) if done else 0.0
            fields = "  ".join(f"{k} {v}" for k, v in shown.items())
            print(f"step {step}/{self.total}  {fields}  eta {eta:.0f}s", flush=True)
        self.step = step

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def plot_loss(metrics_path: Path, png_path: Path) -> bool:
    """Draw train (and eval) loss against step; False when matplotlib is not installed."""
    return plot_metrics(metrics_path, png_path, {"loss": "train loss", "eval_loss": "eval loss"},
                        "loss (per labelled token)", "optimizer step")


def plot_metrics(metrics_path: Path, png_path: Path, series: dict[str, str], ylabel: str, xlabel: str = "step") -> bool:
    """Draw each metric key of ``series`` (key -> legend label) against step from metrics.jsonl.

    Keys logged at every step are drawn as lines; sparse ones (evaluations) get markers too.
    Returns False when matplotlib is not installed.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    points: dict[str, list[tuple[int, float]]] = {key: [] for key in series}
    steps = set()
    for line in metrics_path.read_text().splitlines():
        record = json.loads(line)
        steps.add(record.get("step"))
        for key in series:
            if isinstance(record.get(key), (int, float)):
                points[key].append((record["step"], record[key]))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    for key, label in series.items():
        if points[key]:
            sparse = len(points[key]) < len(steps) / 2
            ax.plot(*zip(*points[key]), marker="o" if sparse else None, label=label)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png_path)
    plt.close(fig)
    return True
