"""Tables, JSON and the length plot of :mod:`benchmarks.nontermination`."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.nontermination_cells import DECODERS, CellResult

__all__ = ["environment", "markdown_report", "json_report", "write_outputs", "plot_lengths"]


def environment(repo: Path) -> dict[str, Any]:
    """Commit (with a dirty flag), machine and library versions."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    import transformers

    return {
        "commit": git("rev-parse", "HEAD"),
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "machine": f"{platform.platform()}, {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }


def _value(cell: CellResult, metric: str, digits: int) -> str:
    summary = cell.summary()
    mean, spread = summary[metric], summary[f"{metric}_std"]
    text = f"{mean:.{digits}f}"
    return text if spread is None else f"{text} ± {spread:.{digits}f}"


def _model_rows(records: dict[str, dict]) -> list[str]:
    rows = ["| model | valid ppl | test ppl | training | T(eps) |", "|---|---|---|---|---|"]
    for name, record in records.items():
        valid = record.get("valid_perplexity")
        if "train_tokens_per_epoch" in record:
            training = (f"{record['epochs']} epoch(s) x {record['train_tokens_per_epoch']:,} tokens, "
                        f"{record['parameters']:,} params")  # fmt: skip
        elif record.get("finetune_tokens"):
            training = (f"fine-tuned top {record['trained_layers']} layers on {record['finetune_tokens']:,} tokens "
                        f"({record['finetune_steps']} steps)")  # fmt: skip
        else:
            training = "pretrained, not fine-tuned"
        if record.get("worse_than_uniform"):
            training += " - **worse than uniform** (validation perplexity above the vocabulary size: diverged)"
        rows.append(
            f"| {name} | {'-' if valid is None else f'{valid:.1f}'} | {record['test_perplexity']:.1f} | {training} "
            f"| {record.get('termination_bound') or '-'} |"
        )
    return rows


def _training_minutes(records: dict[str, dict]) -> float:
    return sum(r.get("train_seconds", 0.0) + r.get("finetune_seconds", 0.0) for r in records.values()) / 60


def _pivot(cells: Sequence[CellResult]) -> list[str]:
    """r_L with models as rows, decoders as columns."""
    decoders = [d for d in DECODERS if any(c.decoder == d for c in cells)]
    models = list(dict.fromkeys(c.model for c in cells))
    table = {(c.model, c.decoder): c for c in cells}
    rows = ["| model | " + " | ".join(decoders) + " |", "|---|" + "---|" * len(decoders)]
    for model in models:
        values = [f"{table[model, d].summary()['nontermination']:.2f}" if (model, d) in table else "" for d in decoders]
        rows.append(f"| {model} | " + " | ".join(values) + " |")
    return rows


def _cell_rows(cells: Sequence[CellResult]) -> list[str]:
    rows = ["| model | decoder | L | prompts x sets | r_L | mean length | length ratio | seq-rep-4 | seconds |",
            "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for c in cells:
        rows.append(
            f"| {c.model} | {c.decoder} | {c.max_new_tokens} | {c.prompts} x {c.sample_sets} | "
            f"{_value(c, 'nontermination', 3)} | {_value(c, 'mean_length', 1)} | {_value(c, 'length_ratio', 2)} | "
            f"{_value(c, 'seq_rep_4', 3)} | {c.seconds:.0f} |"
        )
    return rows


def markdown_report(
    *, command: str, env: dict[str, Any], settings: dict[str, Any], records: dict[str, dict],
    cells: Sequence[CellResult], notes: Sequence[str], wall_seconds: float,
) -> str:  # fmt: skip
    """The whole Markdown report."""
    word = [c for c in cells if not c.model.startswith("smollm2")]
    smol = [c for c in cells if c.model.startswith("smollm2")]
    lines = [
        "# Non-termination of language models under incomplete decoding",
        "",
        f"Command: `{command}`  ",
        f"Commit: `{env['commit']}`{' (uncommitted changes)' if env['dirty'] else ''}  ",
        f"Machine: {env['machine']}; torch {env['torch']} ({env['torch_threads']} threads), "
        f"transformers {env['transformers']}  ",
        f"Date: {env['date']}; this invocation's wall time {wall_seconds / 60:.1f} min "
        "(cached models and cells are not recomputed)  ",
        f"Compute recorded in the cache: training / fine-tuning {_training_minutes(records):.1f} min, decoding "
        f"{sum(c.seconds for c in cells) / 60:.1f} min (wall-clock sums; parallel processes overlap)",
        "",
        "r_L: share of continuations without eos within L generated tokens. Lengths count eos; an unfinished "
        "row counts L. Length ratio: mean generated length / mean reference continuation length. seq-rep-4 "
        "over the continuation (eos excluded). Sampled decoders: mean ± sample standard deviation over "
        "independent sample sets.",
        "",
        *[f"- {note}" for note in notes],
        "",
        "## Models",
        "",
        *_model_rows(records),
    ]
    for title, group in (("RNN / LSTM, WikiText-2 sentences", word), ("SmolLM2-135M-Instruct, WikiText-2 lines", smol)):
        if group:
            lines += ["", f"## r_L: {title} (L = {group[0].max_new_tokens})", "", *_pivot(group)]
    lines += ["", "## All cells", "", *_cell_rows(cells), "", "Settings:", "", "```json",
              json.dumps(settings, indent=1, default=str), "```", ""]  # fmt: skip
    return "\n".join(lines)


def json_report(
    *, command: str, env: dict[str, Any], settings: dict[str, Any], records: dict[str, dict],
    cells: Sequence[CellResult], notes: Sequence[str], wall_seconds: float,
) -> dict[str, Any]:  # fmt: skip
    """The JSON report: per cell the per-set values, their summary and length quantiles."""
    out_cells = []
    for c in cells:
        lengths = sorted(c.lengths)
        quantiles = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (10, 50, 90)}
        entry = {key: value for key, value in c.__dict__.items() if key != "lengths"}
        out_cells.append({**entry, **c.summary(), "length_quantiles": {**quantiles, "max": lengths[-1]}})
    return {"command": command, **env, "wall_seconds": wall_seconds, "notes": list(notes), "settings": settings,
            "models": records, "cells": out_cells}  # fmt: skip


def plot_lengths(cells: Sequence[CellResult], path: Path) -> bool:
    """Box plots of generated lengths, one panel per decoder, one box per model; False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    decoders = [d for d in DECODERS if any(c.decoder == d for c in cells)]
    columns = 4
    rows = (len(decoders) + columns - 1) // columns
    figure, axes = plt.subplots(rows, columns, figsize=(5 * columns, 4.2 * rows), squeeze=False)
    for axis, decoder in zip(axes.flat, decoders):
        group = [c for c in cells if c.decoder == decoder]
        axis.boxplot([c.lengths for c in group], whis=(5, 95), showfliers=True, flierprops={"markersize": 2})
        axis.set_xticks(range(1, len(group) + 1), [c.model for c in group], rotation=75, fontsize=7)
        axis.set_yscale("log")
        axis.set_title(decoder)
        for cap in sorted({c.max_new_tokens for c in group}):
            axis.axhline(cap, color="red", linewidth=0.6, linestyle="--")
    for axis in list(axes.flat)[len(decoders):]:
        axis.axis("off")
    figure.suptitle("Generated length (tokens, eos included; dashed: L; whiskers 5-95%)")
    figure.tight_layout()
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return True


def write_outputs(out_dir: Path, *, markdown: str, report: dict[str, Any], cells: Sequence[CellResult]) -> list[Path]:
    """Write ``nontermination.{md,json,png}`` (png only with matplotlib) atomically; returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", markdown), (".json", json.dumps(report, indent=1) + "\n")):
        path = out_dir / f"nontermination{suffix}"
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
        written.append(path)
    if cells and plot_lengths(cells, out_dir / "nontermination.png"):
        written.append(out_dir / "nontermination.png")
    return written

