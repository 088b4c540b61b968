"""Checkpoint files: atomic writes, ``weights_only`` loading, and strict weight loading with clear errors.

A training checkpoint is a plain dict (``torch.load(weights_only=True)`` reads it)::

    {"model": state_dict, "optimizer": ..., "scheduler": ..., "scaler": ..., "iteration": int,
     "rng": {...}, "config": plain dict, "format": "maskformer/1"}

A weights file may also be a bare state dict.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

CHECKPOINT_FORMAT = "maskformer/1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, unreadable, or does not fit the model. The message names the file."""


def save_checkpoint(payload: dict[str, Any], path: str | os.PathLike) -> None:
    """Write ``payload`` to ``path`` atomically: a temporary file in the same folder, then a rename.

    A crash mid-write leaves the previous file intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint with ``weights_only=True`` (no arbitrary code runs)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    try:
        data = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # torch raises several types for corrupt or unsafe files
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a dict, got {type(data).__name__}")
    return data


def extract_state_dict(data: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The model state dict inside a training checkpoint, or ``data`` itself if it is one."""
    if "model" in data and isinstance(data["model"], dict):
        data = data["model"]
    elif "state_dict" in data and isinstance(data["state_dict"], dict):
        data = data["state_dict"]
    return {k.removeprefix("module."): v for k, v in data.items()}


def describe_mismatch(model: nn.Module, state_dict: dict[str, torch.Tensor], limit: int = 20) -> list[str]:
    """Human-readable lines for missing keys, unexpected keys and shape mismatches (empty if it fits)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = sorted(k for k in set(expected) & set(state_dict)
                    if tuple(expected[k].shape) != tuple(state_dict[k].shape))
    lines = []

    def listing(title: str, keys: list[str], fmt) -> None:
        if keys:
            lines.append(f"{title} ({len(keys)}):")
            lines.extend(f"  {fmt(k)}" for k in keys[:limit])
            if len(keys) > limit:
                lines.append(f"  ... and {len(keys) - limit} more")

    listing("missing keys", missing, str)
    listing("unexpected keys", unexpected, str)
    listing("shape mismatches", shapes,
            lambda k: f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}")
    return lines


def load_model_weights(model: nn.Module, path: str | os.PathLike) -> None:
    """Load weights from ``path`` into ``model`` strictly; a mismatch names every offending key.

    Accepts this project's checkpoints and bare state dicts; official MaskFormer ``.pkl`` files
    and Hugging Face checkpoints go through ``maskformer.interop`` first.
    """
    path = Path(path)
    state_dict = _read_any_format(path, model)
    problems = describe_mismatch(model, state_dict)
    if problems:
        raise CheckpointError(f"{path} does not fit the model built from this config:\n" + "\n".join(problems))
    model.load_state_dict(state_dict)


def _read_any_format(path: Path, model: nn.Module) -> dict[str, torch.Tensor]:
    try:
        from maskformer.interop import read_weights  # official / Hugging Face formats, converted on the fly
    except ImportError:
        read_weights = None
    if read_weights is not None:
        return read_weights(path, model)
    return extract_state_dict(load_checkpoint(path))
