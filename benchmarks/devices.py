"""``--device`` and ``--dtype`` for the benchmarks: where models and batches go, and the training precision.

The device never enters a cache key (it changes speed, not what a setting means); the training dtype is a
setting of each benchmark (e.g. ``WordSettings.autocast``), so overriding it changes the key as it should.
``--dtype auto`` keeps a tier's own precision on the CPU (the published numbers) and uses bfloat16 autocast
on a CUDA device that supports it.
"""

from __future__ import annotations

import argparse

import torch

__all__ = ["DTYPES", "add_device_arguments", "resolve_device", "training_autocast", "training_bf16"]

DTYPES = ("auto", "float32", "bfloat16")


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """Add ``--device`` and ``--dtype`` to ``parser``."""
    parser.add_argument("--device", default=None,
                        help="torch device for models and batches, e.g. cpu, cuda, cuda:1 (default: cuda when "
                             "available, else cpu)")  # fmt: skip
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="training precision: bfloat16 autocast or float32 (default auto: the tier's own on "
                             "the CPU, bfloat16 on a CUDA device that supports it); decoding runs in float32")


def resolve_device(name: str | None) -> torch.device:
    """The device ``name`` (``None``: cuda when available, else cpu); an unusable one is a ValueError."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: {name!r} is not a torch device ({error})") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: no CUDA device is available (use --device cpu)")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s)")
    elif device.type not in ("cpu", "mps", "xpu"):
        raise ValueError(f"--device {name}: expected cpu, cuda[:N], mps or xpu")
    return device


def _supports_bfloat16(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_bf16_supported()


def training_autocast(dtype: str, device: torch.device, *, tier: str | None) -> str | None:
    """The training autocast setting (``"bfloat16"`` or ``None`` for float32) for ``--dtype dtype``.

    ``tier``: the tier's own setting, kept by ``auto`` on the CPU.
    """
    if dtype not in DTYPES:
        raise ValueError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
    if dtype == "auto":
        if device.type == "cpu":
            return tier
        return "bfloat16" if _supports_bfloat16(device) else None
    if dtype == "bfloat16" and device.type != "cpu" and not _supports_bfloat16(device):
        raise ValueError(f"--dtype bfloat16: {device} does not support bfloat16 (use --dtype float32)")
    return "bfloat16" if dtype == "bfloat16" else None


def training_bf16(dtype: str, device: torch.device, *, tier: bool) -> bool:
    """:func:`training_autocast` for a setting kept as a flag (e.g. ``SmolSettings.train_bf16``): whether to
    train under bfloat16 autocast; ``tier``: the tier's own flag, kept by ``auto`` on the CPU."""
    return training_autocast(dtype, device, tier="bfloat16" if tier else None) == "bfloat16"
