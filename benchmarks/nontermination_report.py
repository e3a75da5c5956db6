"""Tables, JSON and the length plot of :mod:`benchmarks.nontermination`."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import pyplot, report_header, save_figure
from benchmarks.nontermination_cells import DECODERS, CellResult
from training.checkpoint import atomic_write_text

__all__ = ["markdown_report", "json_report", "write_outputs", "plot_lengths", "plot_epochs",
           "degenerate", "MODE_CEILING"]

# A model whose greedy continuations are mostly the same whatever the prompt (one continuation for more than
# this share of the prompts) ignores its prompt: its r_L says little about the decoders. (The share of
# distinct continuations is no test: many prompts legitimately end with the same short ". <eos>".)
MODE_CEILING = 0.5


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


def degenerate(cell: CellResult) -> bool:
    """The model behind this (greedy) cell says mostly the same thing whatever its prompt."""
    return bool(cell.mode_share) and max(cell.mode_share) > MODE_CEILING


def _prompt_use_rows(cells: Sequence[CellResult]) -> list[str]:
    """Per model, from its greedy cell: the most common continuation's share, distinct continuations, the
    <unk> share, and the degenerate flag."""
    rows = ["| model | most common greedy continuation (share of prompts) | distinct continuations | "
            "<unk> share of greedy tokens | greedy mean length | flag |", "|---|---|---|---|---|---|"]  # fmt: skip
    for cell in cells:
        if cell.decoder != "greedy" or not cell.mode_share:
            continue
        unk = "-" if not cell.unk_share else f"{cell.unk_share[0]:.3f}"
        flag = "**degenerate: ignores its prompt**" if degenerate(cell) else "ok"
        rows.append(f"| {cell.model} | {cell.mode_share[0]:.2f} | {cell.distinct[0]:.2f} | {unk} | "
                    f"{cell.mean_length[0]:.1f} | {flag} |")
    return rows


def _epoch_rows(records: dict[str, dict]) -> list[str]:
    """Per model and epoch: validation perplexity and the greedy r_L on validation contexts."""
    rows = ["| model | epoch | valid ppl | greedy r_L (valid) | greedy mean length | distinct |", "|---|---|---|---|---|---|"]
    for name, record in records.items():
        for epoch in record.get("history", []):
            metrics = epoch.get("metrics") or {}
            if "greedy_nontermination" not in metrics:
                continue
            rows.append(f"| {name} | {epoch['epoch']} | {epoch['valid_perplexity']:.1f} | "
                        f"{metrics['greedy_nontermination']:.3f} | {metrics['greedy_mean_length']:.1f} | "
                        f"{metrics['greedy_distinct']:.2f} |")  # fmt: skip
    return rows if len(rows) > 2 else []


def _papers_rows(papers: dict[str, Any], cells: Sequence[CellResult], records: dict[str, dict]) -> list[str]:
    """The standard tier's LSTM next to the papers' run (r_L in %)."""
    table = {(c.model, c.decoder): c.summary()["nontermination"] for c in cells}
    ours = records.get("lstm-vanilla", {})
    rows = ["| | test ppl | " + " | ".join(papers["vanilla"]) + " |", "|---|---|" + "---|" * len(papers["vanilla"])]
    rows.append("| papers: LSTM 2x512, converged | " + f"{papers['test perplexity']:.1f} | "
                + " | ".join(f"{100 * v:.2f}" for v in papers["vanilla"].values()) + " |")  # fmt: skip
    values = [f"{100 * table[('lstm-vanilla', d)]:.2f}" if ("lstm-vanilla", d) in table else "-" for d in papers["vanilla"]]
    ppl = f"{ours['test_perplexity']:.1f}" if "test_perplexity" in ours else "-"
    rows.append(f"| ours: lstm-vanilla | {ppl} | " + " | ".join(values) + " |")
    rows += ["", "| ST greedy r_L (%) | " + " | ".join(papers["st greedy"]) + " |",
             "|---|" + "---|" * len(papers["st greedy"]),
             "| papers | " + " | ".join(f"{100 * v:.2f}" for v in papers["st greedy"].values()) + " |"]  # fmt: skip
    ours_st = [f"{100 * table[(f'lstm-st-{e}', 'greedy')]:.2f}" if (f"lstm-st-{e}", "greedy") in table else "-"
               for e in papers["st greedy"]]  # fmt: skip
    rows.append("| ours (lstm-st) | " + " | ".join(ours_st) + " |")
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
    cells: Sequence[CellResult], notes: Sequence[str], wall_seconds: float, papers: dict[str, Any] | None = None,
) -> str:  # fmt: skip
    """The whole Markdown report."""
    word = [c for c in cells if not c.model.startswith("smollm2")]
    smol = [c for c in cells if c.model.startswith("smollm2")]
    lines = [
        "# Non-termination of language models under incomplete decoding",
        "",
        *report_header({"command": command, **env, "wall_seconds": wall_seconds}),
        f"Compute recorded in the cache (cached models and cells are not recomputed): training / fine-tuning "
        f"{_training_minutes(records):.1f} min, decoding {sum(c.seconds for c in cells) / 60:.1f} min (wall-clock "
        "sums; parallel processes overlap)",
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
    if papers is not None:
        lines += ["", "## Next to the papers (r_L in %, LSTM)", "", *_papers_rows(papers, cells, records)]
    use = _prompt_use_rows(cells)
    if len(use) > 2:
        lines += ["", "## Do the models use their prompt? (greedy)", "",
                  f"A model whose most common greedy continuation is the answer to more than {MODE_CEILING:.0%} of "
                  "its prompts is flagged: it says the same thing whatever it is given, and its r_L then measures "
                  "one loop, not a decoder.", "", *use]  # fmt: skip
    epochs = _epoch_rows(records)
    if epochs:
        lines += ["", "## Training: greedy r_L on validation contexts after every epoch", "", *epochs]
    lines += ["", "## All cells", "", *_cell_rows(cells), "", "Settings:", "", "```json",
              json.dumps(settings, indent=1, default=str), "```", ""]  # fmt: skip
    return "\n".join(lines)


def json_report(
    *, command: str, env: dict[str, Any], settings: dict[str, Any], records: dict[str, dict],
    cells: Sequence[CellResult], notes: Sequence[str], wall_seconds: float, papers: dict[str, Any] | None = None,
) -> dict[str, Any]:  # fmt: skip
    """The JSON report: per cell the per-set values, their summary and length quantiles."""
    out_cells = []
    for c in cells:
        lengths = sorted(c.lengths)
        quantiles = {f"p{q}": lengths[min(len(lengths) - 1, len(lengths) * q // 100)] for q in (10, 50, 90)}
        entry = {key: value for key, value in c.__dict__.items() if key != "lengths"}
        flag = {"degenerate": degenerate(c)} if c.decoder == "greedy" and c.mode_share else {}
        out_cells.append({**entry, **c.summary(), **flag, "length_quantiles": {**quantiles, "max": lengths[-1]}})
    return {"command": command, **env, "wall_seconds": wall_seconds, "notes": list(notes), "settings": settings,
            "models": records, "cells": out_cells, "papers": papers}  # fmt: skip


def plot_lengths(cells: Sequence[CellResult], path: Path) -> bool:
    """Box plots of generated lengths, one panel per decoder, one box per model; False without matplotlib."""
    plt = pyplot()
    if plt is None:
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
    save_figure(figure, path, dpi=90)
    return True


def plot_epochs(records: dict[str, dict], path: Path) -> bool:
    """Greedy r_L on validation contexts against validation perplexity, one point per epoch, one line per
    model; False without matplotlib or without per-epoch logs."""
    curves = {name: [(e["valid_perplexity"], e["metrics"]["greedy_nontermination"], e["epoch"])
                     for e in record.get("history", []) if "greedy_nontermination" in (e.get("metrics") or {})]
              for name, record in records.items()}  # fmt: skip
    curves = {name: points for name, points in curves.items() if points}
    if not curves:
        return False
    plt = pyplot()
    if plt is None:
        return False
    figure, axis = plt.subplots(figsize=(7, 5))
    for name, points in curves.items():
        ppl, r_l, epoch = zip(*points)
        axis.plot(ppl, r_l, marker="o", label=name)
        for x, y, n in points:
            axis.annotate(str(n), (x, y), fontsize=7, textcoords="offset points", xytext=(3, 3))
    axis.set_xscale("log")
    axis.set_xlabel("validation perplexity (continuation tokens)")
    axis.set_ylabel("greedy r_L on validation contexts")
    axis.set_title("Non-termination as the model learns (labels: epoch)")
    axis.legend(fontsize=7)
    save_figure(figure, path, dpi=90)
    return True


def write_outputs(
    out_dir: Path, *, markdown: str, report: dict[str, Any], cells: Sequence[CellResult],
    records: dict[str, dict] | None = None, stem: str = "nontermination",
) -> list[Path]:  # fmt: skip
    """Write ``<stem>.{md,json,png}`` and ``<stem>-epochs.png`` (pngs only with matplotlib) atomically;
    returns the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for suffix, text in ((".md", markdown), (".json", json.dumps(report, indent=1) + "\n")):
        path = out_dir / f"{stem}{suffix}"
        atomic_write_text(path, text)
        written.append(path)
    if cells and plot_lengths(cells, out_dir / f"{stem}.png"):
        written.append(out_dir / f"{stem}.png")
    if records and plot_epochs(records, out_dir / f"{stem}-epochs.png"):
        written.append(out_dir / f"{stem}-epochs.png")
    return written

