"""What every benchmark shares: the cache folder and its keys, atomic reports, run metadata, the command-line
options of a resumable run, name selection and the figure setup.

Each benchmark script (:mod:`benchmarks.speed`, :mod:`benchmarks.nontermination`, :mod:`benchmarks.mt_bleu`,
:mod:`benchmarks.smollm2_frontier`) answers one question; what they have in common lives here, so no script
imports another one's internals.

Example, the skeleton of a resumable benchmark::

    root = cache_root() / "my-benchmark" / settings_key(settings)     # results of these settings only
    started = time.perf_counter()
    ...                                                               # train / decode what root lacks
    meta = {"command": command_line("benchmarks.my_benchmark", argv), **run_environment(),
            "wall_seconds": time.perf_counter() - started}
    write_json(out / "my-benchmark.json", {**meta, "rows": rows})
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import hashlib
import io
import json
import os
import platform
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import atomic_write_bytes, atomic_write_text
from training.distributed import current_ranks

__all__ = [
    "CACHE_ENV",
    "REPO",
    "cache_root",
    "settings_key",
    "write_json",
    "command_line",
    "git",
    "machine",
    "run_environment",
    "report_header",
    "add_run_arguments",
    "set_threads",
    "select",
    "format_epsilon",
    "say",
    "pyplot",
    "save_figure",
]

CACHE_ENV = "CONSISTENT_DECODING_CACHE"
REPO = Path(__file__).resolve().parent.parent


# ---------------------------------------------------------------------------------------------- the cache
def cache_root() -> Path:
    """``$CONSISTENT_DECODING_CACHE``, default ``~/.cache/consistent-decoding``: where the benchmarks keep
    data, trained models and finished results (outside the repository)."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "consistent-decoding").expanduser()


def settings_key(settings: Any) -> str:
    """A short, stable hash of a settings dataclass (or a dict): the name of the cache folder holding the
    numbers those settings decide."""
    values = settings if isinstance(settings, dict) else asdict(settings)
    return hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()[:12]


def write_json(path: Path, payload: Any, *, indent: int = 2) -> None:
    """Write ``payload`` as indented JSON to ``path`` atomically (objects JSON lacks are written as ``str``)."""
    atomic_write_text(path, json.dumps(payload, indent=indent, default=str))


# --------------------------------------------------------------------------------------------- metadata
def open_run_folder(root: Path, settings: Any) -> None:
    """Make a cached run's ``cells/`` and ``models/`` folders and write its ``settings.json`` (a dataclass),
    by rank 0 under torchrun; every process returns once they exist."""
    from training.distributed import barrier, current_ranks

    ranks = current_ranks()
    if ranks.main:
        (root / "cells").mkdir(parents=True, exist_ok=True)
        (root / "models").mkdir(parents=True, exist_ok=True)
        write_json(root / "settings.json", asdict(settings))
    barrier(ranks)


def command_line(module: str, argv: Sequence[str] | None) -> str:
    """The command that ran: ``python -m <module>`` and ``argv`` (default: this process's arguments)."""
    return f"python -m {module} " + shlex.join(sys.argv[1:] if argv is None else argv)


def git(*args: str) -> str:
    """``git <args>`` in the repository, stripped; ``"unknown"`` without git or outside a checkout."""
    try:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine() -> str:
    """The CPU model, logical CPUs and operating system, e.g. ``"AMD EPYC 7B13, 2 logical CPUs, Linux 6.1"``."""
    cpu = platform.processor() or platform.machine()
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else cpu
    return f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}"


def run_environment() -> dict[str, Any]:
    """Where and when a report was made: commit (and whether tracked files differ from it), machine, torch
    threads, library versions and the date (UTC)."""
    import transformers

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": machine(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def report_header(meta: dict[str, Any]) -> list[str]:
    """The Markdown lines every report opens with: command, commit, machine, date and wall time.

    ``meta``: :func:`run_environment` with ``command`` and ``wall_seconds``.
    """
    return [
        f"Command: `{meta['command']}`  ",
        f"Commit: `{meta['commit']}`{' (uncommitted changes)' if meta['dirty'] else ''}  ",
        f"Machine: {meta['machine']}; torch {meta['torch']} ({meta['torch_threads']} threads), "
        f"transformers {meta['transformers']}  ",
        f"Date: {meta['date']}; this invocation's wall time {meta['wall_seconds'] / 60:.1f} min  ",
    ]


# ------------------------------------------------------------------------------------------ command line
def add_run_arguments(parser: argparse.ArgumentParser, *, cache_dir: Path, out_dir: Path) -> None:
    """The options every resumable benchmark shares: where the report and the cache go, the seed, which
    models, threads, progress bars and report-only mode."""
    parser.add_argument("--out", type=Path, default=out_dir, help="directory for the report")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {cache_dir}")
    parser.add_argument("--seed", type=int, default=0, help="seeds data sampling, training and decoding")
    parser.add_argument("--models", default=None, help="comma-separated model names or globs (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train and decode nothing: write the report from the cached results")


def one_process_only(script: str) -> None:
    """Stop at once, with the reason, when ``script`` was started by ``torchrun`` with several processes:
    it runs in one process only (it times decoding, which other processes on the machine would slow down)."""
    processes = int(os.environ.get("WORLD_SIZE", "1"))
    if processes > 1:
        raise SystemExit(f"{script}: runs in one process only, not under torchrun ({processes} processes): its "
                         "timings must not share the machine; under torchrun: benchmarks.nontermination, "
                         "benchmarks.smollm2_frontier, benchmarks.mt_bleu, training.train (MLE, MGS, MRT, PG) and "
                         "training.lm.train_lm")


def set_threads(parser: argparse.ArgumentParser, threads: int | None) -> None:
    """Apply ``--threads`` (``parser.error`` below 1; None keeps torch's default)."""
    if threads is None:
        return
    if threads < 1:
        parser.error(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def select(pattern: str | None, names: list[str], *, what: str) -> list[str]:
    """The ``names`` matching a comma-separated list of names or globs (None: all), in ``names``' order.

    Raises:
        ValueError: the list is empty, or an entry matches no name (the message lists the choices).
    """
    if pattern is None:
        return list(names)
    wanted = [p.strip() for p in pattern.split(",") if p.strip()]
    if not wanted:
        raise ValueError(f"--{what} is empty; choose from {', '.join(names)}")
    for entry in wanted:
        if not fnmatch.filter(names, entry):
            raise ValueError(f"unknown {what[:-1]} {entry!r}; choose from {', '.join(names)} (globs allowed)")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in wanted)]


def format_epsilon(epsilon: float) -> str:
    """``1e-3`` for 0.001 (model names and tables)."""
    mantissa, exponent = f"{epsilon:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def say(message: str) -> None:
    """A progress line on stderr (the reports go to files); under ``torchrun``, from rank 0 only."""
    if current_ranks().main:
        print(message, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------- figures
def pyplot() -> Any | None:
    """``matplotlib.pyplot`` on the file-only Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def save_figure(figure: Any, path: Path, *, dpi: int) -> None:
    """Lay out ``figure``, write it to ``path`` (format from the suffix) atomically and close it."""
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format=path.suffix.lstrip("."), dpi=dpi)
    pyplot().close(figure)
    atomic_write_bytes(path, buffer.getvalue())
