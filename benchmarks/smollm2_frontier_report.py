"""Tables, JSON and the frontier plot of :mod:`benchmarks.smollm2_frontier`.

One row per model: test perplexity (and its ratio to ``ft-vanilla``'s), the perplexity factor the eps floor
on p(eos) costs on the test lines' lengths (:func:`training.perplexity_tax`), and per
decoder r_L, the mean length ratio to the reference and seq-rep-4, with the fine-tuning time. Models are
comparable only at equal compute: :func:`check_budgets` refuses records fine-tuned on different token budgets
or layer counts, and continuations with different update budgets, numbers of processes or devices.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import pyplot, report_header, save_figure
from benchmarks.nontermination_cells import CellResult
from training.checkpoint import atomic_write_text
from decoding.self_terminating import termination_bound
from training.self_terminating_finetune import perplexity_tax

__all__ = ["check_budgets", "frontier_rows", "markdown_report", "json_report", "plot_frontier", "write_report"]

NAME = "smollm2-frontier"
MOONSHOT = {"greedy_nontermination": 0.05, "perplexity_ratio": 1.02, "greedy_length_ratio": 2.0}


def check_budgets(records: dict[str, dict]) -> None:
    """Raise ValueError unless every record was fine-tuned on the same tokens and layers, and every
    continuation had the same update budget under the same number of processes on the same kind of device
    (under torchrun, or on a GPU, a CPU-time budget buys more updates): a frontier compares models at equal
    compute only."""
    for key in ("finetune_tokens", "trained_layers"):
        values = {name: record.get(key) for name, record in records.items()}
        if len(set(values.values())) > 1:
            raise ValueError(f"models fine-tuned with different {key} cannot share one frontier: {values}")
    budgets = {name: (r["continuation"]["budget_cpu_seconds"], r["continuation"]["max_updates"],
                      r["continuation"].get("processes", 1),  # records from before torchrun: one process
                      r["continuation"].get("device", "cpu"))  # and from before --device: the CPU
               for name, r in records.items() if r.get("continuation")}  # fmt: skip
    if len(set(budgets.values())) > 1:
        raise ValueError(f"continuations with different update budgets (CPU seconds, max updates, processes, device) "
                         f"cannot share one frontier: {budgets}")


def frontier_rows(records: dict[str, dict], cells: Sequence[CellResult], lengths: Sequence[int] | None) -> list[dict]:
    """One dict per model with a record: perplexity, bounds and every decoder's summary (budgets checked)."""
    check_budgets(records)
    vanilla = records.get("ft-vanilla", {}).get("test_perplexity")
    rows = []
    for name, record in records.items():
        epsilon = record.get("epsilon")
        continuation = record.get("continuation") or {}
        row = {
            "model": name, "test_perplexity": record["test_perplexity"],
            "perplexity_ratio": record["test_perplexity"] / vanilla if vanilla else None,
            "epsilon": epsilon, "termination_bound": termination_bound(epsilon) if epsilon else None,
            "predicted_perplexity_factor": perplexity_tax(lengths, epsilon) if epsilon and lengths else None,
            "finetune_seconds": record["finetune_seconds"] + continuation.get("seconds", 0.0),
            "finetune_cpu_seconds": record.get("finetune_cpu_seconds", 0.0) + continuation.get("cpu_seconds", 0.0),
            "decoders": {},
        }  # fmt: skip
        for cell in cells:
            if cell.model == name:
                summary = cell.summary()
                row["decoders"][cell.decoder] = {key: summary[key] for key in ("nontermination", "length_ratio", "seq_rep_4", "mean_length")}
        rows.append(row)
    return rows


def _fmt(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _table(rows: list[dict], decoders: Sequence[str]) -> list[str]:
    head = "| model | eps | T(eps) | test ppl | vs vanilla | predicted factor (eps) | " + " | ".join(
        f"{d} r_L | {d} len ratio | {d} seq-rep-4" for d in decoders) + " | fine-tune min |"  # fmt: skip
    lines = [head, "|" + "---|" * (7 + 3 * len(decoders))]
    for row in rows:
        cells = []
        for decoder in decoders:
            got = row["decoders"].get(decoder, {})
            cells += [_fmt(got.get("nontermination"), 3), _fmt(got.get("length_ratio"), 2), _fmt(got.get("seq_rep_4"), 3)]
        lines.append(f"| {row['model']} | {row['epsilon'] or '-'} | {row['termination_bound'] or '-'} | "
                     f"{row['test_perplexity']:.2f} | {_fmt(row['perplexity_ratio'], 3)} | "
                     f"{_fmt(row['predicted_perplexity_factor'], 3)} | " + " | ".join(cells)
                     + f" | {row['finetune_seconds'] / 60:.1f} |")  # fmt: skip
    return lines


def _targets(rows: list[dict], records: dict[str, dict]) -> list[str]:
    """The issue's two targets, stated as measured."""
    scored = []
    for row in rows:
        greedy = row["decoders"].get("greedy")
        if greedy is None or row["perplexity_ratio"] is None:
            continue
        checks = (greedy["nontermination"] <= MOONSHOT["greedy_nontermination"],
                  row["perplexity_ratio"] <= MOONSHOT["perplexity_ratio"],
                  greedy["length_ratio"] <= MOONSHOT["greedy_length_ratio"])  # fmt: skip
        scored.append((sum(checks), -greedy["nontermination"], row["model"], checks))
    lines = ["Moonshot (greedy r_L <= 0.05, perplexity within 2 % of ft-vanilla, greedy length within 2x the "
             "reference): " + (", ".join(name for n, _, name, _ in scored if n == 3) or "no model reaches it") + "."]
    if scored:
        n, _, name, checks = max(scored)
        missed = [what for what, ok in zip(("r_L", "perplexity", "length"), checks) if not ok]
        lines.append(f"Closest: {name} ({n}/3 met{'; misses ' + ', '.join(missed) if missed else ''}).")
    by_name = {row["model"]: row for row in rows}
    mgs, mle = by_name.get("ft-vanilla+mgs"), by_name.get("ft-vanilla+mle")
    if mgs and mle and "greedy" in mgs["decoders"] and "greedy" in mle["decoders"]:
        logs = records["ft-vanilla+mgs"]["continuation"]
        lines.append(
            f"MGS vs the MLE continuation at equal update time: greedy r_L {mgs['decoders']['greedy']['nontermination']:.3f} "
            f"vs {mle['decoders']['greedy']['nontermination']:.3f}, perplexity {mgs['test_perplexity']:.2f} vs "
            f"{mle['test_perplexity']:.2f} ({logs['updates']} MGS updates vs "
            f"{records['ft-vanilla+mle']['continuation']['updates']} MLE updates)."
        )  # fmt: skip
    return lines


def markdown_report(result: Any, *, command: str, env: dict[str, Any], wall_seconds: float) -> str:
    """The Markdown report of a :class:`benchmarks.smollm2_frontier.FrontierResult`."""
    settings = result.settings
    rows = frontier_rows(result.records, result.cells, result.evaluation_lengths)
    smol, continuation = settings.smol, settings.continuation
    notes = [
        f"SmolLM2-135M-Instruct, WikiText-2 lines: {smol.prompts} test prompts (first 10 tokens), perplexity on "
        f"{smol.eval_lines} test lines' continuations; every fine-tune trains the top {smol.train_layers} of 30 "
        f"layers, the final norm and the eos row on the same {smol.finetune_tokens:,} train-line tokens in the "
        f"same order (lr {smol.lr}, {smol.batch_tokens} padded tokens per batch).",
        f"Continuations of ft-vanilla: {continuation.cpu_seconds:.0f} CPU seconds of updates each "
        f"(max updates {continuation.max_updates}). MGS: K={continuation.mgs.num_candidates}, "
        f"sigma={continuation.mgs.sigma}, alpha={continuation.mgs.alpha}, pi={continuation.mgs.mle_share}, cost "
        f"mean({', '.join(continuation.cost)}) on greedy decodes of {continuation.decode_rows} train lines "
        f"with continuations <= {continuation.max_reference_tokens} tokens, capped at "
        f"{continuation.length_factor} x the longest reference.",
        f"L = {settings.max_new_tokens}; sampled decoders: {settings.sample_sets} sample set(s) per prompt.",
        "predicted factor (eps): what the eps floor on p(eos) costs a model with the same next-token choices on "
        "these test lines' lengths, exp(-ln(1-eps) sum n(n-1) / (2 sum n)); the measured ratio to ft-vanilla "
        "also reflects whatever else each fine-tune learnt.",
    ]
    if result.missing:
        notes.append(f"Not run (not in the cache when this report was written): {', '.join(result.missing)}.")
    lines = [
        "# SmolLM2 fine-tunes: r_L against perplexity (ST / NMST eps sweep, MGS)", "",
        *report_header({"command": command, **env, "wall_seconds": wall_seconds}),
        f"Decoding recorded in the cache: {sum(c.seconds for c in result.cells) / 60:.1f} min", "",
        *[f"- {note}" for note in notes], "", "## Frontier", "", *_table(rows, settings.decoders), "",
        "## Targets", "", *[f"- {line}" for line in _targets(rows, result.records)], "",
        "Settings:", "", "```json", json.dumps(asdict(settings), indent=1, default=str), "```", "",
    ]  # fmt: skip
    return "\n".join(lines)


def json_report(result: Any, *, command: str, env: dict[str, Any], wall_seconds: float) -> dict[str, Any]:
    """The JSON report: settings, records, frontier rows and per-cell values."""
    return {"command": command, **env, "wall_seconds": wall_seconds, "settings": asdict(result.settings),
            "models": result.records, "frontier": frontier_rows(result.records, result.cells, result.evaluation_lengths),
            "cells": [{k: v for k, v in c.__dict__.items() if k != "lengths"} for c in result.cells],
            "missing": result.missing}  # fmt: skip


def plot_frontier(rows: list[dict], decoders: Sequence[str], path: Path) -> bool:
    """r_L against test perplexity, one panel per decoder, one labelled point per model; False without
    matplotlib."""
    plt = pyplot()
    if plt is None:
        return False
    figure, axes = plt.subplots(1, len(decoders), figsize=(6.5 * len(decoders), 5), squeeze=False)
    for axis, decoder in zip(axes.flat, decoders):
        for row in rows:
            got = row["decoders"].get(decoder)
            if got is None:
                continue
            axis.scatter(row["test_perplexity"], got["nontermination"], s=25)
            axis.annotate(f"{row['model'].removeprefix('ft-')} ({got['length_ratio']:.2f}x)",
                          (row["test_perplexity"], got["nontermination"]), fontsize=7, xytext=(3, 3),
                          textcoords="offset points")  # fmt: skip
        axis.set_xlabel("test perplexity")
        axis.set_ylabel("r_L (share unfinished at L)")
        axis.set_title(f"{decoder} (label: mean length / reference)")
        axis.set_ylim(-0.05, 1.05)
    save_figure(figure, path, dpi=90)
    return True


def write_report(out_dir: Path, result: Any, *, command: str, env: dict[str, Any], wall_seconds: float) -> list[Path]:
    """Write ``smollm2-frontier.{md,json,png}`` into ``out_dir`` atomically; returns the paths written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    markdown = markdown_report(result, command=command, env=env, wall_seconds=wall_seconds)
    report = json_report(result, command=command, env=env, wall_seconds=wall_seconds)
    written = []
    for suffix, text in ((".md", markdown), (".json", json.dumps(report, indent=1, default=str) + "\n")):
        atomic_write_text(out_dir / f"{NAME}{suffix}", text)
        written.append(out_dir / f"{NAME}{suffix}")
    rows = frontier_rows(result.records, result.cells, result.evaluation_lengths)
    if rows and plot_frontier(rows, result.settings.decoders, out_dir / f"{NAME}.png"):
        written.append(out_dir / f"{NAME}.png")
    return written
