"""Atomic file writes and checkpoints: write to a temporary file in the same folder, then ``os.replace``.

A reader therefore sees either the previous file or the new one, never a half-written file, even when the
process is killed mid-write. Every file the library and its benchmarks write for later reuse (checkpoints,
records, reports) goes through :func:`atomic_save`, :func:`atomic_write_text`, :func:`atomic_write_bytes` or
:func:`atomic_copy` (a folder: :func:`atomic_folder`).
Each checkpoint records the model's architecture signature; loading it into another architecture raises a
clear ``ValueError``.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch

__all__ = ["atomic_save", "atomic_write_bytes", "atomic_write_text", "atomic_copy", "atomic_folder", "model_signature", "check_signature",
           "load_checkpoint"]


def _write_atomically(path: str | Path, write: Callable[[IO[bytes]], None]) -> None:
    """Call ``write`` on a fresh temporary file beside ``path``, flush it to disk, then rename it to ``path``
    (parent folders are created; the temporary file is removed if anything fails)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_save(obj: Any, path: str | Path) -> None:
    """``torch.save(obj, path)`` so that ``path`` is replaced in one step."""
    _write_atomically(path, lambda stream: torch.save(obj, stream))


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is replaced in one step."""
    _write_atomically(path, lambda stream: stream.write(data))


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` so that ``path`` is replaced in one step."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_copy(source: str | Path, path: str | Path) -> None:
    """Copy the file ``source`` to ``path`` so that ``path`` is replaced in one step."""
    with open(source, "rb") as original:
        _write_atomically(path, lambda stream: shutil.copyfileobj(original, stream))


def atomic_folder(path: str | Path, write: Callable[[Path], None]) -> None:
    """Call ``write(folder)`` on a fresh folder beside ``path``, then put it in place of ``path``.

    A folder cannot replace another in one step: an old ``path`` is removed first, so a reader must check a
    file written after this call (e.g. a record next to it) before it trusts ``path``. A half-written folder
    is never left at ``path``.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    try:
        write(staging)
        shutil.rmtree(path, ignore_errors=True)
        os.replace(staging, path)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
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
