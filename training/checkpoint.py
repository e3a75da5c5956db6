"""Atomic checkpoints: write to a temporary file in the same folder, then ``os.replace``.

A reader therefore sees either the previous checkpoint or the new one, never a half-written file, even
when the process is killed mid-write. Each checkpoint records the model's architecture signature;
loading it into another architecture raises a clear ``ValueError``.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

__all__ = ["atomic_save", "model_signature", "check_signature", "load_checkpoint"]


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` so that ``path`` is replaced in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            torch.save(obj, stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def model_signature(model: torch.nn.Module) -> dict[str, Any]:
    """Class name, model type and every parameter's shape: what a checkpoint must match."""
    config = getattr(model, "config", None)
    return {
        "class": type(model).__name__,
        "model_type": getattr(config, "model_type", None),
        "shapes": {name: tuple(t.shape) for name, t in model.state_dict().items()},
    }


def check_signature(model: torch.nn.Module, signature: dict[str, Any], *, source: str) -> None:
    """Raise ``ValueError`` when ``signature`` (from a checkpoint) does not fit ``model``."""
    mine = model_signature(model)
    if mine["class"] != signature["class"] or mine["model_type"] != signature["model_type"]:
        raise ValueError(
            f"{source} was written for a {signature['class']} ({signature['model_type']}) but the model is a "
            f"{mine['class']} ({mine['model_type']}): a checkpoint of another architecture"
        )
    if mine["shapes"] != signature["shapes"]:
        differing = sorted(set(mine["shapes"].items()) ^ set(signature["shapes"].items()))[:3]
        raise ValueError(
            f"{source} has parameters of other names or shapes than the model (another architecture or "
            f"size), e.g. {differing}"
        )


def load_checkpoint(path: str | Path, model: torch.nn.Module) -> dict[str, Any]:
    """Load a checkpoint dict written by :mod:`training.loop`, after checking the architecture."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    check_signature(model, state["signature"], source=f"checkpoint {path}")
    return state
