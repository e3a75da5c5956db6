"""The Markdown report of :mod:`benchmarks.speed` and the run metadata it opens with."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

import torch

from benchmarks.common import command_line, git, report_header, run_environment

__all__ = ["run_metadata", "device_name", "markdown"]


def run_metadata(argv: Sequence[str] | None, *, device: torch.device | str = "cpu") -> dict[str, Any]:
    """:func:`benchmarks.common.run_environment` with what the speed tables add: the command, whether
    ``decoding/`` differs from the commit, the CTranslate2 version, the load average at the start and the
    device (with the GPU's name)."""
    try:
        import ctranslate2

        ct2_version = ctranslate2.__version__
    except ImportError:
        ct2_version = None
    return {"command": command_line("benchmarks.speed", argv), **run_environment(),
            "decoding_files_dirty": bool(git("status", "--porcelain", "decoding")), "ctranslate2": ct2_version,
            "loadavg_start": os.getloadavg(), "device": device_name(device)}


def device_name(device: torch.device | str) -> str:
    """``"cpu"``, or e.g. ``"cuda:0 (NVIDIA H100 80GB HBM3)"``."""
    device = torch.device(device)
    if device.type != "cuda":
        return str(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    return f"cuda:{index} ({torch.cuda.get_device_name(index)})"


def _device_lines(meta: dict[str, Any]) -> list[str]:
    """The device line, on a GPU only (reports from before ``--device`` ran on the CPU)."""
    device = meta.get("device", "cpu")
    if device == "cpu":
        return []
    return [f"Device: {device}. Each call is synchronised before the clock stops; CPU time counts the host "
            "only, so read wall time; peak device memory is in the JSON (`peak_device_mb`).  "]


def _spread(stats: dict[str, float], key: str) -> str:
    return f"{stats[key + '_median']:.2f} ({stats[key + '_min']:.2f}..{stats[key + '_max']:.2f})"


def _number(values: dict[str, float] | None, key: str) -> str:
    return "" if values is None else f"{values[key]:.2f}"


def _head(*columns: str) -> list[str]:
    """A Markdown table's header and separator rows."""
    return ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]


def _contender_rows(cells: list[dict[str, Any]], field: str, columns: Sequence[str],
                    row: Callable[[dict[str, Any], str, dict[str, Any]], str]) -> list[str]:
    """A table with one row per cell and contender: ``row(cell, contender, cell[field][contender])``."""
    return _head(*columns) + [row(cell, name, values) for cell in cells for name, values in cell[field].items()]


def _fixed_row(cell: dict[str, Any], name: str, stats: dict[str, float]) -> str:
    """Section 1: ms per step, ratios to ours, identical tokens, memory."""
    ratio, same = cell["ratio"].get(name), cell["identical"].get(name)
    return (f"| {cell['model']} | {cell['strategy']} | {cell['batch']} | {name} | {_spread(stats, 'wall')} | "
            f"{_spread(stats, 'cpu')} | {_number(ratio, 'wall')} | {_number(ratio, 'cpu')} | "
            f"{'' if same is None else same} | {stats['peak_rss_mb']:.0f} (+{stats['extra_rss_mb']:.0f}) |")


def _workload_row(cell: dict[str, Any], name: str, total: dict[str, float]) -> str:
    """Section 2: totals over all batches."""
    return (f"| {cell['model']} | {cell['strategy']} | {cell['prompts']} x {cell['max_new_tokens']} | {name} | "
            f"{total['wall_s']:.1f} | {total['cpu_s']:.1f} | {total['tokens']} | {total['tokens_per_s']:.1f} | "
            f"{total['stopped_share']:.0%} | {total['peak_rss_mb']:.0f} (+{total['extra_rss_mb']:.0f}) |")


FIXED_COLUMNS = ("model", "strategy", "batch", "contender", "wall ms/step", "CPU ms/step", "ratio wall", "ratio CPU",
                 "same", "peak RSS MiB (+ added by the run)")
WORKLOAD_COLUMNS = ("model", "strategy", "prompts x L", "contender", "wall s", "CPU s", "tokens", "tokens/s",
                    "stopped", "peak RSS MiB (+ added by the run)")


def _ratio_rows(workload: list[dict[str, Any]]) -> list[str]:
    """Section 2: per cell, ours against the baseline (and the consistent / refill contenders against theirs)."""
    rows = _head("model", "strategy", "baseline", "ratio wall (total)", "ratio CPU (total)", "per-batch wall",
                 "per-batch CPU", "row-step share", "identical tokens")  # fmt: skip
    for cell in workload:
        per = cell["ratio_per_batch"]
        rows.append(
            f"| {cell['model']} | {cell['strategy']} | {cell['baseline']} | {cell['ratio_total']['wall']:.2f} | "
            f"{cell['ratio_total']['cpu']:.2f} | {per['wall']['median']:.2f} ({per['wall']['min']:.2f}.."
            f"{per['wall']['max']:.2f}) | {per['cpu']['median']:.2f} ({per['cpu']['min']:.2f}..{per['cpu']['max']:.2f})"
            f" | {cell['row_step_share']:.2f} | "
            f"{'n/a (sampling, different RNG)' if cell['identical'] is None else cell['identical']} |")
        extra = [("consistent-", cell.get("consistent_baseline", "transformers-consistent"),
                  cell.get("ratio_consistent"), None),
                 ("refill ", cell["baseline"], cell.get("ratio_refill"), cell.get("refill_identical")),
                 ("refill consistent-", cell.get("consistent_baseline"), cell.get("ratio_consistent_refill"), None)]
        for label, against, values, same in extra:
            if values is not None:
                rows.append(
                    f"| {cell['model']} | {label}{cell['strategy']} | {against} | {values['wall']:.2f} | "
                    f"{values['cpu']:.2f} | | | | {'n/a (sampling, different RNG)' if same is None else same} |")
    return rows


def markdown(meta: dict[str, Any], fixed: list[dict[str, Any]], workload: list[dict[str, Any]]) -> str:
    """The results as Markdown tables, after the run's metadata (:func:`run_metadata`)."""
    lines = [
        "# Decoding speed: decoding.generate vs model.generate", "",
        *report_header(meta),
        *_device_lines(meta),
        f"Load average at start {meta['loadavg_start'][0]:.1f}, at end {meta['loadavg_end'][0]:.1f} (a machine "
        f"shared with other jobs: read the CPU-time columns first); ctranslate2 {meta['ctranslate2']}", "",
        "## 1. Fixed length (eos disabled by min_new_tokens)", "",
        "ms per decoding step, median (min..max) over alternating repeats; ratio = ours / other on the medians "
        "(< 1: ours faster); same = identical tokens.", "",
        *_contender_rows(fixed, "ms_per_step", FIXED_COLUMNS, _fixed_row), "",
        "## 2. Non-termination workload (WikiText-2 test prompts, first 10 words)", "",
        "Totals over all batches; ratio = ours / baseline on total time, and the per-batch ratio median "
        "(min..max). The LSTM baseline is our own loop with drop_finished=False (it has no model.generate). "
        "The -refill contenders decode all prompts in one call with max_batch_size = the batch size (continuous "
        "batching: rows that finish are refilled with the next prompts), timed against the sum of the "
        "baseline's batches.", "",
        *_contender_rows(workload, "totals", WORKLOAD_COLUMNS, _workload_row), "",
        "Row-step share: our generated tokens over the baseline's rows x steps, the time ratio a decoder whose "
        "step cost is proportional to its rows would reach.", "",
        *_ratio_rows(workload),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"
