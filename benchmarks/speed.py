"""Speed and memory of ``decoding.generate`` against ``model.generate``, a hand-written loop and CTranslate2.

``python -m benchmarks.speed [--quick]`` writes ``benchmarks/results/speed.{md,json}``. Every comparison
runs the contenders on the same model, the same inputs and the same settings, alternating them (A, B, A,
B, ... with the order rotated every repeat) in one process, and reports the median and the spread
(min..max) of wall time and of process CPU time. CPU time is the steadier figure on a shared machine:
other jobs stretch wall time but barely change the CPU time a single-threaded run needs.

Two sections:

1. Fixed length (eos disabled with ``min_new_tokens``): greedy, nucleus (top-p 0.9) and beam 4 at batch 1
   and 16 on SmolLM2-135M, a GPT-2-small config, a tiny GPT-2 config and the library's LSTM LM, plus a
   minimal hand-written cache loop around the same forward pass (greedy) as the floor, and CTranslate2
   fp32 where it is installed and can run the model.
2. The non-termination workload: WikiText-2 test prompts (first 10 words), long ``max_new_tokens``,
   greedy / nucleus 0.4 / beam 4 in batches of 32: wall time, generated tokens per second, the share of
   rows that stopped with eos, and whether the tokens are identical. The LSTM has no ``model.generate``:
   there ``drop_finished=True`` is compared with ``drop_finished=False`` of the same loop. With more prompts
   than one batch, ours also decodes all of them in one call with ``max_batch_size`` = the batch size
   (continuous batching), timed against the sum of the baseline's batches. ``--models smollm2-st`` /
   ``smollm2-nmst`` time the quick non-termination benchmark's self-terminating fine-tunes, with
   ``model.generate`` running the same head as a logits processor.

Peak resident memory (the kernel's ``VmHWM``, reset before every run) is recorded for every run.

The parts: the timing harness (:mod:`benchmarks.timing`), the models (:mod:`benchmarks.speed_models`), the
contenders and how their outputs are compared (:mod:`benchmarks.speed_contenders`), the report
(:mod:`benchmarks.speed_report`); this module runs the cells and the command line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from benchmarks.common import REPO, one_process_only
from benchmarks.datasets import prompt_batch
from benchmarks.devices import resolve_device
from benchmarks.speed_contenders import (STRATEGIES, WORKLOAD_STRATEGIES, fixed_length_contenders, generated_rows,
                                         generated_stats, normalise, workload_contenders)
from benchmarks.speed_models import MODELS, Subject, load_subjects, wikitext_prompts
from benchmarks.speed_report import markdown, run_metadata
from benchmarks.timing import Run, alternate, summary
from training.checkpoint import atomic_write_text

RESULTS = REPO / "benchmarks" / "results"


@dataclass(frozen=True)
class Plan:
    """How much to run: the full plan took 33 minutes on 2 idle cores (2 threads), --quick ~8."""

    repeats: int
    small_steps: int            # new tokens per fixed-length run, tiny GPT-2 and LSTM
    large_steps: int            # ... SmolLM2 and GPT-2 small
    smollm2_prompts: int        # workload prompts, greedy and nucleus
    smollm2_length: int
    smollm2_beam_prompts: int   # ... beam 4 (each prompt is 4 rows)
    lstm_prompts: int
    lstm_length: int
    smollm2_repeats: int = 2    # alternating rounds per workload batch (the LSTM's gaps are wide: 1)
    batch_size: int = 32


PLANS = {
    "full": Plan(repeats=3, small_steps=48, large_steps=12, smollm2_prompts=16, smollm2_length=1000,
                 smollm2_beam_prompts=4, lstm_prompts=64, lstm_length=1000, smollm2_repeats=1),
    "quick": Plan(repeats=3, small_steps=24, large_steps=6, smollm2_prompts=32, smollm2_length=24,
                  smollm2_beam_prompts=8, lstm_prompts=64, lstm_length=200, smollm2_repeats=1),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (~8 minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine)")
    parser.add_argument("--sections", default="fixed,workload", help="comma list of: fixed, workload")
    parser.add_argument("--models", default=",".join(MODELS[:4]),
                        help="comma list of: smollm2, gpt2-small, gpt2-tiny, lstm, smollm2-st, smollm2-nmst (the "
                             "last two: the quick non-termination benchmark's fine-tunes, workload section only)")
    parser.add_argument("--smollm2-finetunes", type=Path,
                        help="folder with smollm2-ft-{st,nmst}.pt (default: the quick non-termination cache)")
    parser.add_argument("--no-refill", action="store_true",
                        help="skip the continuous-batching (max_batch_size) contenders of the workload")
    parser.add_argument("--strategies", default=",".join(WORKLOAD_STRATEGIES),
                        help="comma list of workload strategies: greedy, nucleus0.4, beam4")
    parser.add_argument("--workload-prompts", type=int, help="override the number of workload prompts (spec: 256)")
    parser.add_argument("--workload-length", type=int, help="override max_new_tokens of the workload (spec: 1000)")
    parser.add_argument("--lstm-checkpoint", help="a trained LSTM (save_recurrent_lm file) instead of random weights")
    parser.add_argument("--repeats", type=int, help="alternating repeats per fixed-length cell (default: the plan's)")
    parser.add_argument("--no-ctranslate2", action="store_true", help="skip the CTranslate2 column")
    parser.add_argument("--device", default=None,
                        help="torch device for every model and input, e.g. cpu, cuda, cuda:1 (default: cuda when "
                             "available, else cpu); decoding runs in float32")  # fmt: skip
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for speed.md and speed.json")
    args = parser.parse_args(argv)
    try:
        args.device = resolve_device(args.device)
    except ValueError as error:
        parser.error(str(error))
    unknown_models = set(args.models.split(",")) - set(MODELS)
    if unknown_models:
        parser.error(f"--models: unknown {sorted(unknown_models)}; choose from {', '.join(MODELS)}")
    args.strategies = args.strategies.split(",")
    unknown = set(args.strategies) - set(WORKLOAD_STRATEGIES)
    if unknown:
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(WORKLOAD_STRATEGIES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def fixed_ids(subject: Subject, prompts: list[list[str]], *, rows: int, width: int = 10) -> torch.LongTensor:
    """``[rows, width]`` prompts without padding, on the subject's device: the first ``width`` ids of the first
    long-enough prompts."""
    encoded = [ids[:width] for ids in map(subject.encode, prompts) if len(ids) >= width]
    return torch.tensor(encoded[:rows], device=subject.device)


def fixed_length_cell(subject: Subject, fixed_ids: torch.LongTensor, *, strategy: str, batch: int, steps: int,
                      repeats: int, threads: int) -> dict[str, Any]:
    """Time one (model, strategy, batch) cell: ms per decoding step, ratios and identical-output checks."""
    input_ids = fixed_ids[:batch]
    for warm in fixed_length_contenders(subject, input_ids, strategy, 2, threads).values():
        warm()
    contenders = fixed_length_contenders(subject, input_ids, strategy, steps, threads)
    load = os.getloadavg()[0]
    runs = alternate(contenders, repeats=repeats)
    cell: dict[str, Any] = {"model": subject.name, "strategy": strategy, "batch": batch, "new_tokens": steps,
                            "loadavg_1min": load, "ms_per_step": {}, "ratio": {}, "identical": {}}
    for name, name_runs in runs.items():
        cell["ms_per_step"][name] = {k: (v * 1000 if k[:3] in ("wal", "cpu") else v)
                                     for k, v in summary(name_runs, per=steps).items()}
    ours = runs["ours"][0].output
    prefix = input_ids.shape[1]
    for name in runs:
        if name == "ours":
            continue
        mine, theirs = cell["ms_per_step"]["ours"], cell["ms_per_step"][name]
        cell["ratio"][name] = {"wall": mine["wall_median"] / theirs["wall_median"],
                               "cpu": mine["cpu_median"] / theirs["cpu_median"]}
        if not STRATEGIES[strategy].get("do_sample"):
            other = runs[name][0].output
            if name == "ctranslate2":
                other = torch.cat([input_ids, other], dim=1)
            a = normalise(ours, prefix, subject.eos_token_id, subject.pad_token_id)
            b = normalise(other, prefix, subject.eos_token_id, subject.pad_token_id)
            cell["identical"][name] = a.shape == b.shape and bool(torch.equal(a, b))
    return cell


def _add_total(totals: dict[str, dict[str, float]], name: str, runs: Sequence[Run], *, prefix: int,
               rows: int, eos: int) -> dict[str, float]:
    """Add one batch's median time, tokens and stopped rows of contender ``name`` to its totals."""
    medians = summary(runs)
    tokens, stopped = generated_stats(runs[0].output, prefix, eos)
    total = totals.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "tokens": 0, "rows": 0, "stopped": 0,
                                     "peak_rss_mb": 0.0, "extra_rss_mb": 0.0})
    total["wall_s"] += medians["wall_median"]
    total["cpu_s"] += medians["cpu_median"]
    total["tokens"] += tokens
    total["rows"] += rows
    total["stopped"] += stopped
    total["peak_rss_mb"] = max(total["peak_rss_mb"], medians["peak_rss_mb"])
    total["extra_rss_mb"] = max(total["extra_rss_mb"], medians["extra_rss_mb"])
    return medians


def workload_cell(subject: Subject, prompts: list[list[str]], *, strategy: str, max_new: int, batch_size: int,
                  repeats: int, refill: bool = True) -> dict[str, Any]:
    """Decode all prompts in batches, contenders alternating within each batch (``repeats`` rounds, median
    time per batch); totals over batches and per-batch ratios.

    With ``refill`` (more prompts than one batch): then also all prompts in one call of ours with
    ``max_batch_size`` = the rows of one batch (continuous batching), its contenders alternating with each
    other; its tokens are checked against the baseline's batches (greedy and beam).
    """
    baseline = "transformers" if subject.is_hf else "ours-keep-finished"
    sampling = bool(WORKLOAD_STRATEGIES[strategy].get("do_sample"))
    totals: dict[str, dict[str, float]] = {}
    batch_ratios: list[dict[str, float]] = []
    identical, row_steps = True, 0
    baseline_rows: list[list[int]] = []
    load = os.getloadavg()[0]
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        ids = [subject.encode(words) for words in prompts[start:start + batch_size]]
        input_ids, mask = (t.to(subject.device) for t in prompt_batch(ids, pad_id=subject.pad_token_id))
        runs = alternate(workload_contenders(subject, input_ids, mask, strategy, max_new, seed=index),
                         repeats=repeats, start=index)
        prefix = input_ids.shape[1]
        medians = {name: _add_total(totals, name, name_runs, prefix=prefix, rows=input_ids.shape[0],
                                    eos=subject.eos_token_id) for name, name_runs in runs.items()}
        baseline_output = runs[baseline][0].output
        baseline_rows += generated_rows(baseline_output, prefix, subject)
        row_steps += baseline_output.shape[0] * (baseline_output.shape[1] - prefix)
        batch_ratios.append({key: medians["ours"][f"{key}_median"] / medians[baseline][f"{key}_median"]
                             for key in ("wall", "cpu")})
        if not sampling or not subject.is_hf:
            a, b = (normalise(runs[n][0].output, prefix, subject.eos_token_id, subject.pad_token_id)
                    for n in ("ours", baseline))
            identical = identical and a.shape == b.shape and bool(torch.equal(a, b))
    refill_identical = None
    if refill and len(prompts) > batch_size:
        input_ids, mask = (t.to(subject.device)
                           for t in prompt_batch([subject.encode(words) for words in prompts], pad_id=subject.pad_token_id))
        rows = batch_size * WORKLOAD_STRATEGIES[strategy].get("num_beams", 1)   # the baseline's batch, in rows
        runs = alternate(workload_contenders(subject, input_ids, mask, strategy, max_new, seed=0,
                                             refill_rows=rows), repeats=repeats)
        for name, name_runs in runs.items():
            _add_total(totals, name, name_runs, prefix=input_ids.shape[1], rows=input_ids.shape[0],
                       eos=subject.eos_token_id)
        if not sampling:
            refill_identical = generated_rows(runs["ours-refill"][0].output, input_ids.shape[1], subject) == baseline_rows
    for total in totals.values():
        total["tokens_per_s"] = total["tokens"] / total["wall_s"]
        total["stopped_share"] = total["stopped"] / total["rows"]
    comparable = not sampling or not subject.is_hf
    consistent_baseline = "transformers-consistent" if subject.is_hf else "ours-consistent-keep-finished"

    def ratio(mine: str, theirs: str) -> dict[str, float] | None:
        if mine not in totals or theirs not in totals:
            return None
        return {key: totals[mine][f"{key}_s"] / totals[theirs][f"{key}_s"] for key in ("wall", "cpu")}

    return {
        "model": subject.name, "strategy": strategy, "prompts": len(prompts), "batch_size": batch_size,
        "max_new_tokens": max_new, "repeats": repeats, "baseline": baseline, "loadavg_1min": load,
        "totals": totals,
        # the ratio if a step cost were proportional to the rows in it: ours' tokens over the baseline's
        # rows x steps (beam search: its rows are prompts, each step costs num_beams rows)
        "row_step_share": totals["ours"]["tokens"] / row_steps,
        "ratio_total": {"wall": totals["ours"]["wall_s"] / totals[baseline]["wall_s"],
                        "cpu": totals["ours"]["cpu_s"] / totals[baseline]["cpu_s"]},
        # consistent sampling: ours against the same warper inside model.generate, or inside our loop keeping
        # finished rows (the LSTM); different RNG streams
        "consistent_baseline": consistent_baseline,
        "ratio_consistent": ratio("ours-consistent", consistent_baseline),
        # continuous batching: all prompts in one call, at most batch_size rows at once, against the baseline's
        # batches
        "ratio_refill": ratio("ours-refill", baseline),
        "ratio_consistent_refill": ratio("ours-consistent-refill", consistent_baseline),
        "refill_identical": refill_identical,
        "ratio_per_batch": {key: {"median": statistics.median(r[key] for r in batch_ratios),
                                  "min": min(r[key] for r in batch_ratios),
                                  "max": max(r[key] for r in batch_ratios)} for key in ("wall", "cpu")},
        "identical": identical if comparable else None,
    }


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    started = time.perf_counter()
    args = parse_args(argv)
    one_process_only("python -m benchmarks.speed")
    notes: list[str] = []
    torch.set_num_threads(args.threads)
    plan = PLANS["quick" if args.quick else "full"]
    sections = set(args.sections.split(","))
    meta = run_metadata(argv, device=args.device)
    subjects = load_subjects(args.models.split(","), ctranslate2=not args.no_ctranslate2,
                             lstm_checkpoint=args.lstm_checkpoint, smollm2_finetunes=args.smollm2_finetunes,
                             notes=notes, device=args.device)  # fmt: skip
    fixed: list[dict[str, Any]] = []
    if "fixed" in sections:
        prompts = wikitext_prompts(64)
        cells = [(s, strategy, batch) for s in subjects if s.baseline_model is None for strategy in STRATEGIES
                 for batch in (1, 16)]
        for subject, strategy, batch in tqdm(cells, desc="fixed-length cells"):
            large = subject.name in ("SmolLM2-135M", "GPT-2-small-config")
            fixed.append(fixed_length_cell(
                subject, fixed_ids(subject, prompts, rows=16), strategy=strategy, batch=batch,
                steps=plan.large_steps if large else plan.small_steps,
                repeats=args.repeats or (max(3, plan.repeats - 2) if large else plan.repeats), threads=args.threads))
            tqdm.write(json.dumps({k: fixed[-1][k] for k in ("model", "strategy", "batch", "ratio", "identical")}))
    workload: list[dict[str, Any]] = []
    if "workload" in sections:
        jobs = [(s, strategy) for s in subjects if s.name.startswith("SmolLM2-135M") or s.name == "LSTM-LM"
                for strategy in WORKLOAD_STRATEGIES if strategy in args.strategies
                # the head's processor in model.generate keeps per-row state: wrong once beams reorder rows
                and not (strategy == "beam4" and s.baseline_processors is not None)]
        for subject, strategy in tqdm(jobs, desc="workload cells"):
            is_lstm = not subject.is_hf
            smol_count = plan.smollm2_beam_prompts if strategy == "beam4" else plan.smollm2_prompts
            count = args.workload_prompts or (plan.lstm_prompts if is_lstm else smol_count)
            length = args.workload_length or (plan.lstm_length if is_lstm else plan.smollm2_length)
            workload.append(workload_cell(subject, wikitext_prompts(count), strategy=strategy, max_new=length,
                                          batch_size=plan.batch_size, repeats=1 if is_lstm else plan.smollm2_repeats,
                                          refill=not args.no_refill))
            tqdm.write(json.dumps({k: workload[-1][k] for k in ("model", "strategy", "ratio_total", "identical")}))
    meta.update(loadavg_end=os.getloadavg(), notes=notes, wall_seconds=time.perf_counter() - started)
    report = {"meta": meta, "fixed_length": fixed, "workload": workload}
    atomic_write_text(args.out / "speed.json", json.dumps(report, indent=1, default=float) + "\n")
    atomic_write_text(args.out / "speed.md", markdown(meta, fixed, workload))
    return report


if __name__ == "__main__":
    main()
