"""Tables, notes and the validation-BLEU plot of :mod:`benchmarks.mt_bleu`.

A fine-tuning record (one method, one seed) holds ``method``, ``seed``, ``lr``, ``batch_size``,
``budget_seconds`` (update time it was given), ``base`` (the base model's cache key), ``updates``,
``train_seconds``, ``seconds_per_update``, ``best_val_bleu``, ``history`` (validations), ``step_logs``
(per update, MGS only), ``test`` (scores on the primary test set) and ``test_sets`` (every test set:
``{"greedy": scores, "beam4": scores}``). :func:`check_comparable` refuses to put records side by side
unless they were fine-tuned from the same base for the same update time, batch size, number of processes
(``processes``) and learning rate.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Sequence

from benchmarks.common import pyplot, report_header, save_figure

__all__ = ["METHODS", "RATE_CONTROL", "ALL_METHODS", "check_comparable", "summary_rows", "test_set_rows",
           "markdown", "mgs_notes", "comparison_note", "base_note", "plot"]

METHODS = ("mle", "mgs", "mrt", "pg")
RATE_CONTROL = "mle-base-lr"    # MLE continued at the base's own learning rate instead of the fine-tuning one
ALL_METHODS = METHODS + (RATE_CONTROL,)
DECODERS = ("greedy", "beam4")

COLUMNS = (("BLEU greedy", ("test", "greedy", "bleu")), ("BLEU beam4", ("test", "beam4", "bleu")),
           ("chrF greedy", ("test", "greedy", "chrf")), ("chrF beam4", ("test", "beam4", "chrf")),
           ("len ratio greedy", ("test", "greedy", "length_ratio")),
           ("non-term greedy", ("test", "greedy", "nontermination")),
           ("non-term beam4", ("test", "beam4", "nontermination")),
           ("best val BLEU", ("best_val_bleu",)), ("s / update", ("seconds_per_update",)),
           ("updates", ("updates",)), ("fine-tune s", ("train_seconds",)))
SET_COLUMNS = tuple((f"{metric} {decoder}", (decoder, key)) for metric, key in
                    (("BLEU", "bleu"), ("chrF", "chrf"), ("non-term", "nontermination")) for decoder in DECODERS)
MGS_LOGS = ("cost_before", "cost_expected", "weight_mle", "cosine_mle", "ess")


# ----------------------------------------------------------------------------------------- comparability

def check_comparable(runs: Sequence[dict]) -> None:
    """Raise ``ValueError`` unless the runs can share one table.

    Every run must start from the same base and get the same update time, batch size and number of
    processes (under torchrun an update-time budget buys more updates); the methods
    compared with each other (:data:`METHODS`) must also share the learning rate. Only the rate control
    (:data:`RATE_CONTROL`) may differ in learning rate - that is what it is for.
    """
    unknown = sorted({run["method"] for run in runs} - set(ALL_METHODS))
    if unknown:
        raise ValueError(f"unknown method(s) {unknown}; known: {', '.join(ALL_METHODS)}")
    for key, scope in (("base", runs), ("budget_seconds", runs), ("batch_size", runs), ("processes", runs),
                       ("lr", [run for run in runs if run["method"] in METHODS])):
        values = {run.get(key, 1) for run in scope}  # records from before torchrun: one process
        if len(values) > 1:
            listing = ", ".join(f"{run['method']} seed {run['seed']}: {run.get(key, 1)}" for run in scope)
            raise ValueError(f"refusing to compare methods fine-tuned with different {key} ({listing}); "
                             "rerun them with equal settings")


# ---------------------------------------------------------------------------------------------- tables

def _get(record: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _cell(values: list[float | None]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:.3g}" if abs(mean) < 10 else f"{mean:.1f}" if abs(mean) < 100 else f"{mean:.0f}"
    if len(values) > 1:
        sd = statistics.stdev(values)
        text += f" ± {sd:.2g}" if abs(sd) < 10 else f" ± {sd:.0f}"
    return text


def method_label(method: str, runs: Sequence[dict]) -> str:
    if method != RATE_CONTROL:
        return method
    rates = sorted({run["lr"] for run in runs if run["method"] == method})
    return f"mle @ base lr ({', '.join(f'{rate:.2g}' for rate in rates)})"


def _groups(runs: Sequence[dict]) -> list[tuple[str, list[dict]]]:
    return [(method, [r for r in runs if r["method"] == method]) for method in ALL_METHODS
            if any(r["method"] == method for r in runs)]


def summary_rows(base: dict, runs: Sequence[dict]) -> list[dict]:
    """One row for the base and one per method (mean ± sd over seeds) on the primary test set."""
    check_comparable(runs)
    base_record = {"test": base["test"], "best_val_bleu": base["best_val_bleu"], "updates": base["updates"],
                   "train_seconds": base["train_seconds"],
                   "seconds_per_update": base["train_seconds"] / max(base["updates"], 1)}
    rows = [{"method": "base (MLE)", "seeds": 1, **{t: _cell([_get(base_record, p)]) for t, p in COLUMNS}}]
    for method, records in _groups(runs):
        rows.append({"method": method_label(method, runs), "seeds": len(records),
                     **{t: _cell([_get(r, p) for r in records]) for t, p in COLUMNS}})
    return rows


def test_set_rows(base: dict, runs: Sequence[dict]) -> list[dict]:
    """Rows (test set, method) with BLEU, chrF and non-termination for both decoders."""
    check_comparable(runs)
    rows = []
    for test_set, base_scores in base["test_sets"].items():
        rows.append({"test set": test_set, "method": "base (MLE)", "seeds": 1,
                     **{t: _cell([_get(base_scores, p)]) for t, p in SET_COLUMNS}})
        for method, records in _groups(runs):
            rows.append({"test set": test_set, "method": method_label(method, runs), "seeds": len(records),
                         **{t: _cell([_get(r["test_sets"][test_set], p) for r in records])
                            for t, p in SET_COLUMNS}})
    return rows


def _table(rows: list[dict]) -> list[str]:
    titles = list(rows[0])
    return (["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
            + ["| " + " | ".join(str(row[t]) for t in titles) + " |" for row in rows])


# ----------------------------------------------------------------------------------------------- notes

def base_note(base: dict) -> str:
    """How the base training ended: plateaued, or stopped by a budget before it did."""
    text = (f"Base: {base['updates']} updates ({base['epochs']} epochs) in {base['train_seconds']:.0f} s of "
            f"update time; best validation BLEU {base['best_val_bleu']:.2f} at update {base['best_update']}; ")
    if base["stop_reason"] == "plateau":
        return text + (f"stopped by the plateau rule (gain {base['plateau_gain']:.2f} BLEU over the last "
                       f"{base['plateau_rule']['window_share']:.0%} of training, at most "
                       f"{base['plateau_rule']['min_gain']}).")
    gain = base.get("plateau_gain")
    measured = "" if gain is None else f" (last-window gain {gain:.2f})"
    return text + f"stopped by {base['stop_reason']} **before the validation curve plateaued**{measured}."


def comparison_note(runs: Sequence[dict], test_set: str) -> str | None:
    """MGS against MLE at the same learning rate and time, beam 4 on ``test_set``, with the seed spread."""
    scores = {method: [r["test_sets"][test_set]["beam4"]["bleu"] for r in runs if r["method"] == method]
              for method in ("mgs", "mle")}
    if not scores["mgs"] or not scores["mle"]:
        return None
    difference = statistics.fmean(scores["mgs"]) - statistics.fmean(scores["mle"])
    spreads = [statistics.stdev(v) for v in scores.values() if len(v) > 1]
    if not spreads:
        return f"MGS − MLE ({test_set}, beam 4): {difference:+.2f} BLEU (one seed each: no spread to judge by)."
    spread = max(spreads)
    verdict = "exceeds" if abs(difference) > spread else "does not exceed"
    return (f"MGS − MLE at the same learning rate and update time ({test_set}, beam 4): {difference:+.2f} "
            f"BLEU, which {verdict} the larger seed sd ({spread:.2f}; MGS n={len(scores['mgs'])}, "
            f"MLE n={len(scores['mle'])}).")


def mgs_notes(runs: Sequence[dict]) -> list[str]:
    """Update-time ratio MGS / MLE and the per-update MGS diagnostics (mean, first and last third)."""
    notes = []
    per_method = {m: [r["seconds_per_update"] for r in runs if r["method"] == m] for m in ("mgs", "mle")}
    if per_method["mgs"] and per_method["mle"]:
        ratio = statistics.fmean(per_method["mgs"]) / statistics.fmean(per_method["mle"])
        notes.append(f"MGS / MLE update-time ratio: {ratio:.1f} (K + 1 batched greedy decodes plus one MLE "
                     "forward/backward per MGS update).")
    updates = [s for r in runs if r["method"] == "mgs" for s in r.get("step_logs", []) if "ess" in s]
    source = "per update"
    if not updates:   # runs recorded before per-update logs: the interval means in the history
        updates = [h for r in runs if r["method"] == "mgs" for h in r["history"] if "ess" in h]
        source = "validation-interval means"
    if updates:
        def describe(rows: list[dict]) -> str:
            means = {key: statistics.fmean(row[key] for row in rows) for key in MGS_LOGS}
            return (f"C(θ) {means['cost_before']:.3f} → weighted candidate cost {means['cost_expected']:.3f}, "
                    f"weight on MLE-centred {means['weight_mle']:.2f}, cosine(Δ*, g) {means['cosine_mle']:.2f}, "
                    f"ESS {means['ess']:.2f}")
        text = f"MGS diagnostics ({source}, {len(updates)} in all): mean {describe(updates)}."
        by_run = [[s for s in r.get("step_logs", []) if "ess" in s] for r in runs if r["method"] == "mgs"]
        thirds = [(run[: len(run) // 3], run[-(len(run) // 3):]) for run in by_run if len(run) >= 3]
        if thirds:
            text += (f" First third of each run: {describe([s for first, _ in thirds for s in first])}; "
                     f"last third: {describe([s for _, last in thirds for s in last])}.")
        notes.append(text)
    return notes


# -------------------------------------------------------------------------------------------- markdown

def markdown(meta: dict, base: dict, runs: Sequence[dict], *, primary: str) -> str:
    """The report: header, the primary test set's table, the per-test-set table and the notes."""
    rows = summary_rows(base, runs)
    lines = ["# Multi30k De->En: MGS vs MRT vs PG vs MLE continuation", "",
             *report_header(meta), f"BLEU signature: `{meta['bleu_signature']}`  ",
             f"chrF signature: `{meta['chrf_signature']}`", "",
             f"Test set: {primary}. Fine-tuned rows: mean ± sd over seeds; every method gets the same update "
             "time (validation excluded) and, except the rate control `mle @ base lr`, the same learning "
             f"rate; the checkpoint with the best validation BLEU ({meta['selection']}) is scored. "
             f"`non-term`: share of outputs without eos within {meta['length_rule']}. `s / update`: update "
             "wall time, on a shared CPU, so ratios are more telling than absolute values.", "",
             *_table(rows)]
    if len(base["test_sets"]) > 1:
        lines += ["", "Every test set (mean ± sd over seeds):", "", *_table(test_set_rows(base, runs))]
    return "\n".join(lines + ["", *meta["notes"]]) + "\n"


# ------------------------------------------------------------------------------------------------ plot

def plot(base: dict, runs: Sequence[dict], path: Path) -> str | None:
    """Validation BLEU against update time: the base's training (left), every fine-tuning run (right).

    Returns a note when the plot could not be drawn (matplotlib missing), else None.
    """
    plt = pyplot()
    if plt is None:
        return "matplotlib is not installed (optional `bench` extra): the validation-BLEU plot was skipped."
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.5))
    history = base["history"]
    left.plot([h["train_seconds"] for h in history], [h["score"] for h in history], marker="o", markersize=3,
              color="black")
    left.set_title("base (MLE)")
    left.set_xlabel("update time (s, validation excluded)")
    left.set_ylabel("validation BLEU")
    colours = dict(zip(ALL_METHODS, ("tab:gray", "tab:red", "tab:blue", "tab:green", "tab:purple")))
    labelled = set()
    for record in runs:   # one line per seed, one legend entry per method
        history, method = record["history"], record["method"]
        right.plot([h["train_seconds"] for h in history], [h["score"] for h in history], marker="o",
                   markersize=3, color=colours[method], alpha=0.8,
                   label=None if method in labelled else method_label(method, runs))
        labelled.add(method)
    right.axhline(base["best_val_bleu"], color="black", linestyle=":", label="base model")
    right.set_title("fine-tuning from the base (one line per seed)")
    right.set_xlabel("fine-tuning update time (s, validation excluded)")
    right.legend(fontsize=7)
    save_figure(figure, path, dpi=120)
    return None
