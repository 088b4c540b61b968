"""Run logging: console + ``log.txt`` lines, ``metrics.jsonl`` records, optional TensorBoard events.

Only the main process writes; other ranks get a logger that drops everything.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch


def format_seconds(seconds: float) -> str:
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    except ImportError:  # not on POSIX
        return float("nan")


class RunLogger:
    """Writes what a run reports.

    Args:
        output_dir: the run's folder (``log.txt``, ``metrics.jsonl``, TensorBoard events).
        enabled: False on non-main ranks.
        fresh: a new run (not a resumed one): an existing ``metrics.jsonl`` is renamed to
            ``metrics.<time>.jsonl`` so that the new run's records (and curves drawn from them) are its own.
    """

    def __init__(self, output_dir: Path | None, enabled: bool = True, name: str = "maskformer", fresh: bool = False):
        self.enabled = enabled and output_dir is not None
        self.output_dir = output_dir
        self.logger = logging.getLogger(f"{name}.{id(self)}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO if self.enabled else logging.CRITICAL + 1)
        self._metrics = None
        self._tb = None
        if not self.enabled:
            return
        output_dir.mkdir(parents=True, exist_ok=True)
        fmt = logging.Formatter("[%(asctime)s] %(message)s", datefmt="%m/%d %H:%M:%S")
        for handler in (logging.StreamHandler(sys.stdout), logging.FileHandler(output_dir / "log.txt")):
            handler.setFormatter(fmt)
            self.logger.addHandler(handler)
        metrics_path = output_dir / "metrics.jsonl"
        previous = None
        if fresh and metrics_path.is_file() and metrics_path.stat().st_size > 0:
            stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(metrics_path.stat().st_mtime))
            previous = metrics_path.with_name(f"metrics.{stamp}.jsonl")
            metrics_path.replace(previous)
        self._metrics = open(metrics_path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(output_dir))
        except ImportError:  # tensorboard is optional
            self._tb = None
        if previous is not None:
            self.info(f"a new run in {output_dir}: the previous run's metrics.jsonl is now {previous.name}")

    def info(self, message: str) -> None:
        self.logger.info(message)

    def record(self, iteration: int, values: dict[str, Any], kind: str = "train") -> None:
        """One JSON line ``{"iteration", "kind", "time", **values}``, plus TensorBoard scalars."""
        if not self.enabled:
            return
        row = {"iteration": iteration, "kind": kind, "time": time.time(), **values}
        self._metrics.write(json.dumps(row, default=_jsonable) + "\n")
        if self._tb is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)) and math.isfinite(value):
                    self._tb.add_scalar(f"{kind}/{key}", value, iteration)

    def close(self) -> None:
        if self._metrics is not None:
            self._metrics.close()
        if self._tb is not None:
            self._tb.close()
        for handler in list(self.logger.handlers):
            handler.close()
            self.logger.removeHandler(handler)


def _jsonable(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else value.tolist()
    return str(value)


class Throughput:
    """Smoothed seconds per iteration and data-loading time, for log lines and the ETA."""

    def __init__(self, window: int = 20):
        self.window = window
        self.iter_times: list[float] = []
        self.data_times: list[float] = []

    def update(self, iter_time: float, data_time: float) -> None:
        self.iter_times = (self.iter_times + [iter_time])[-self.window:]
        self.data_times = (self.data_times + [data_time])[-self.window:]

    @property
    def seconds_per_iter(self) -> float:
        return sum(self.iter_times) / max(len(self.iter_times), 1)

    @property
    def data_seconds(self) -> float:
        return sum(self.data_times) / max(len(self.data_times), 1)
