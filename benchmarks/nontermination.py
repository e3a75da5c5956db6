"""How often do language models fail to stop, under which decoders, and do the fixes work?

    python -m benchmarks.nontermination [--quick | --standard] [--data-dir ../shared/data] [--out DIR]
        [--seed 0] [--models 'lstm-*,smollm2*'] [--decoders greedy,consistent-nucleus-0.4] [--threads N]

1. WikiText-2 word-level *sentences* (:mod:`benchmarks.nontermination_words`), the papers' protocol:
   trains, or reuses from the cache, 2-layer tanh-RNN and LSTM LMs with vanilla, ST and NMST heads
   (epsilon grid), with validation and test perplexity on the continuation tokens and a greedy r_L on
   validation contexts after every epoch.
2. SmolLM2-135M-Instruct on WikiText-2 *lines* (:mod:`benchmarks.smollm2`): the
   pretrained model, and the same model fine-tuned on the same train lines with a vanilla, ST and NMST
   head, with test perplexity on continuations.
3. Every model decodes the first 10 tokens of test sequences with ancestral sampling, greedy, beam 2/4,
   top-k 2/4, nucleus 0.2/0.4 and consistent top-k / nucleus, up to L new tokens (1,500 for the RNN/LSTM,
   1,000 for SmolLM2); each cell reports r_L, mean generated length and its ratio to the references',
   seq-rep-4, and for sampled decoders the spread over independent sample sets.

Tiers: ``--quick`` (the README's first command, 39 minutes measured on 2 CPU cores: 10k-word vocabulary,
two epochs over 1M tokens, 400 test prompts, and the SmolLM2 part), ``--standard`` (word models only, about
3 hours there, 171 min of compute measured: the full vocabulary and training split, 1,000 test prompts;
results set next to the papers'), and the default, paper-size settings (40 epochs, every test sentence:
days on a CPU, see the README's "Running at paper size"). L is never reduced.

Writes ``<out>/nontermination[-standard].md``, ``.json`` and ``.png`` (length distributions and, with
per-epoch logs, r_L against perplexity; needs matplotlib). Models, fine-tunes (checkpointed) and every
finished cell are cached under ``$CONSISTENT_DECODING_CACHE/nontermination/<settings hash>`` (default
``~/.cache/consistent-decoding``), so an interrupted run resumes and a finished cell is never decoded
twice. Before any training, the run checks that the data, the packages and (for SmolLM2) the model file
it will need are there, and fails in seconds if not.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.common import (REPO, add_run_arguments, command_line, format_epsilon, open_run_folder, run_environment,
                               say, select, set_threads)
from benchmarks.datasets import add_data_arguments
from benchmarks.devices import add_device_arguments, resolve_device, training_autocast, training_bf16
from benchmarks.nontermination_cells import DECODERS, CellResult, cell_file, decode_missing_cells, load_cell
from benchmarks.nontermination_settings import QUICK, STANDARD, Settings, cache_key, default_cache_dir
from benchmarks.nontermination_words import WordModelSpec
from training.distributed import init_distributed, local_device

SMOL_VARIANTS = ("pretrained", "ft-vanilla", "ft-st", "ft-nmst")


# The papers' own code and protocol (sentence-level WikiText-2, full vocabulary, LSTM 2 x 512 trained to
# convergence, 9,708 test contexts, L = 1,500): one public run, the anchor the standard tier is set beside.
PAPERS_LSTM = {
    "test perplexity": 91.4,
    "vanilla": {"greedy": 0.0149, "beam-2": 0.0001, "beam-4": 0.0, "ancestral": 0.0, "top-k-2": 0.0,
                "top-k-4": 0.0, "nucleus-0.2": 0.0079, "nucleus-0.4": 0.0044},
    "st greedy": {"1e-2": 0.0, "1e-3": 0.0, "1e-4": 0.0033},
}  # fmt: skip


def word_specs(settings: Settings) -> list[WordModelSpec]:
    """The RNN / LSTM models: per cell vanilla, then ST and NMST for every epsilon."""
    specs = []
    for cell in settings.words.cells:
        specs.append(WordModelSpec(f"{cell}-vanilla", cell, "vanilla"))
        for head in ("st", "nmst"):
            specs.extend(WordModelSpec(f"{cell}-{head}-{format_epsilon(e)}", cell, head, e) for e in settings.epsilons)
    return specs


def smol_names(settings: Settings) -> dict[str, str]:
    """SmolLM2 model name -> variant."""
    eps = format_epsilon(settings.smol.epsilon)
    names = {"pretrained": "smollm2", "ft-vanilla": "smollm2-ft-vanilla", "ft-st": f"smollm2-ft-st-{eps}",
             "ft-nmst": f"smollm2-ft-nmst-{eps}"}  # fmt: skip
    return {names[variant]: variant for variant in SMOL_VARIANTS}


def all_models(settings: Settings) -> list[str]:
    return [spec.name for spec in word_specs(settings)] + (list(smol_names(settings)) if settings.smollm2 else [])


@dataclass
class RunResult:
    """What :func:`run_benchmark` measured: model records and cells, in table order."""

    settings: Settings
    records: dict[str, dict] = field(default_factory=dict)
    cells: list[CellResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "model / decoder" cells selected but not in the cache


def _run_words(
    settings: Settings, models: list[str], decoders: list[str], *, root: Path, data_dir: str | None, progress: bool,
    device: torch.device,
) -> None:
    from benchmarks.nontermination_words import load_word_data, train_or_load_word_model, vanilla_start

    data = None
    words = settings.words
    for spec in word_specs(settings):
        missing = [d for d in decoders if not cell_file(root / "cells", spec.name, d).is_file()]
        done = not missing and (root / "models" / f"{spec.name}.json").is_file()
        # a head model trained at equal compute starts from the vanilla model's checkpoint
        needed_as_start = (spec.head == "vanilla" and words.shares_epochs
                           and not vanilla_start(root / "models", spec.cell).is_file()
                           and any(s.cell == spec.cell and s.name in models and s.head != "vanilla"
                                   and not (root / "models" / f"{s.name}.json").is_file() for s in word_specs(settings)))
        if (spec.name not in models or done) and not needed_as_start:
            continue
        if data is None:
            data = load_word_data(data_dir, words, seed=settings.seed)
            say(f"[data] word level: {len(data.vocab)} words, {data.train_tokens} training tokens, "
                 f"{len(data.reference_lengths)} prompts")  # fmt: skip
        (root / "models").mkdir(parents=True, exist_ok=True)
        model, record = train_or_load_word_model(
            spec, words, data, folder=root / "models", seed=settings.seed, progress=progress,
            max_new_tokens=settings.word_max_new_tokens, batch_size=settings.batch_prompts, device=device,
        )  # fmt: skip
        say(f"[model] {spec.name}: valid ppl {record['valid_perplexity']:.1f}, test ppl "
             f"{record['test_perplexity']:.1f} ({record['train_seconds'] / 60:.1f} min)")  # fmt: skip
        if spec.name not in models:
            continue
        decode_missing_cells(
            model, data.prompts, model_name=spec.name, decoders=missing, folder=root / "cells",
            eos_token_id=data.vocab.eos_id, pad_token_id=data.vocab.pad_id, max_new_tokens=settings.word_max_new_tokens,
            reference_lengths=data.reference_lengths, sample_sets=settings.sample_sets, seed=settings.seed,
            batch_size=settings.batch_prompts, progress=progress, unk_token_id=data.vocab.unk_id,
        )  # fmt: skip


def _run_smollm2(
    settings: Settings, models: list[str], decoders: list[str], *, root: Path, data_dir: str | None, progress: bool,
    device: torch.device,
) -> None:
    from benchmarks import smollm2

    bench = None
    for name, variant in smol_names(settings).items():
        if name not in models:
            continue
        missing = [d for d in decoders if not cell_file(root / "cells", name, d).is_file()]
        if not missing and (root / "models" / f"smollm2-{variant}.json").is_file():
            continue
        if bench is None:
            model, tokenizer = smollm2.load_smollm2(device=device)
            data = smollm2.load_smol_data(data_dir, tokenizer, settings.smol, seed=settings.seed)
            bench = smollm2.SmolLM2Bench(model, tokenizer, settings.smol, data, folder=root / "models",
                                         seed=settings.seed, progress=progress)  # fmt: skip
        bench.load_variant(variant)
        _, model = bench.head(variant)
        decode_missing_cells(
            model, bench.data.prompts, model_name=name, decoders=missing, folder=root / "cells",
            eos_token_id=bench.eos, pad_token_id=bench.eos, max_new_tokens=settings.smol_max_new_tokens,
            reference_lengths=bench.data.reference_lengths, sample_sets=settings.sample_sets, seed=settings.seed,
            batch_size=settings.batch_prompts, progress=progress,
        )  # fmt: skip


def run_benchmark(
    settings: Settings,
    *,
    data_dir: str | None,
    cache_dir: Path,
    models: list[str],
    decoders: list[str],
    progress: bool = True,
    compute: bool = True,
    device: torch.device | str = "cpu",
) -> RunResult:
    """Train / fine-tune / decode whatever the cache lacks for ``models`` x ``decoders``; gather results.

    ``compute=False`` only gathers what the cache holds (``missing`` then lists the cells not run).
    ``device``: where the word models and SmolLM2 train and decode (not part of the cache key).
    """
    root = Path(cache_dir) / cache_key(settings)
    open_run_folder(root, settings)
    smol_decoders = [d for d in decoders if d in settings.smol_decoders]
    if compute:
        _run_words(settings, models, decoders, root=root, data_dir=data_dir, progress=progress,
                   device=torch.device(device))
    if compute and smol_decoders and any(name in models for name in smol_names(settings)):
        _run_smollm2(settings, models, smol_decoders, root=root, data_dir=data_dir, progress=progress,
                     device=torch.device(device))  # fmt: skip
    result = RunResult(settings)
    smol = smol_names(settings)
    for name in models:
        record_file = root / "models" / (f"smollm2-{smol[name]}.json" if name in smol else f"{name}.json")
        if record_file.is_file():
            result.records[name] = json.loads(record_file.read_text())
        for decoder in smol_decoders if name in smol else decoders:
            cell = load_cell(cell_file(root / "cells", name, decoder))
            if cell is not None:
                result.cells.append(cell)
            else:
                result.missing.append(f"{name} / {decoder}")
    return result


def _with_bounds(settings: Settings, records: dict[str, dict]) -> dict[str, dict]:
    """Add ``termination_bound`` T(eps) to the self-terminating models' records."""
    from decoding.self_terminating import termination_bound

    epsilons = {spec.name: spec.epsilon for spec in word_specs(settings)}
    epsilons.update({name: settings.smol.epsilon for name, v in smol_names(settings).items() if v in ("ft-st", "ft-nmst")})
    return {name: {**record, "termination_bound": termination_bound(epsilons[name]) if epsilons.get(name) else None}
            for name, record in records.items()}  # fmt: skip


def preflight(settings: Settings, models: list[str], data_dir: str | None) -> list[str]:
    """What the run will need and lacks (data files, packages, the SmolLM2 file), found in seconds."""
    from benchmarks import smollm2
    from benchmarks.datasets import WIKITEXT2_SHA256, WIKITEXT2_SOURCES, locate_dataset

    problems = []
    try:
        locate_dataset("wikitext-2", list(WIKITEXT2_SHA256), WIKITEXT2_SHA256, data_dir=data_dir,
                       sources=WIKITEXT2_SOURCES)  # fmt: skip
    except (OSError, ValueError) as error:
        problems.append(f"WikiText-2: {error}")
    if settings.smollm2 and any(name in models for name in smol_names(settings)):
        for problem in smollm2.smollm2_problems():
            problems.append(f"SmolLM2: {problem} (or leave it out with --models 'rnn-*,lstm-*')")
    return problems


def notes_for(settings: Settings, *, tier: str) -> list[str]:
    """What differs from the papers' setting, stated in the report."""
    words, smol = settings.words, settings.smol
    heads = ("every head trained from scratch" if words.head_epochs is None else
             f"equal compute: ST/NMST start from the vanilla checkpoint after {words.epochs - words.head_epochs} "
             f"epoch(s) (weights, optimizer state, learning rate) and train {words.head_epochs} epoch(s) with their "
             f"head, while vanilla trains its last {words.head_epochs} with its own")  # fmt: skip
    notes = [
        f"RNN/LSTM: the papers' protocol - WikiText-2 sentences, first 10 tokens = context (shorter sentences "
        f"left-padded with <cpad>, reference = eos), loss and the ST/NMST clock on the continuation only, "
        f"beam search returns the first finished hypothesis by unnormalised log-probability; "
        f"{words.prompts or 'all'} test prompts; vocabulary {words.vocab_size or 'full (33,231 words + pad/unk/eos/<cpad>)'}; "
        f"hidden {words.rnn_hidden} (RNN) / {words.lstm_hidden} (LSTM) x {words.layers} layers, dropout "
        f"{words.rnn_dropout} / {words.lstm_dropout}; training tokens per epoch {words.train_tokens or 'all'}; "
        f"{words.epochs} epochs at most (patience {words.patience}, Adam lr {words.lr}, "
        f"{'bfloat16 autocast' if words.autocast else 'float32'} training, float32 evaluation and decoding, "
        f"{words.batch_sentences} sentences a batch, output bias initialised to the log unigram distribution); {heads}.",
        f"Per-epoch greedy r_L on {words.valid_prompts} fixed validation contexts (papers: 1,000).",
        f"SmolLM2: WikiText-2 test lines, first 10 SmolLM2 tokens = context; {smol.prompts} prompts; fine-tunes "
        f"train the top {smol.train_layers} of 30 layers, the final norm and the eos row of the output layer on {smol.finetune_tokens:,} train-line "
        f"tokens (lines ending in eos), ST/NMST eps = {format_epsilon(smol.epsilon)}; perplexity on "
        f"{smol.eval_lines} test lines' continuations.",
        f"L = {settings.word_max_new_tokens} (RNN/LSTM) and {settings.smol_max_new_tokens} (SmolLM2), never "
        f"reduced; sampled decoders: {settings.sample_sets} independent sample sets per prompt (seed {settings.seed}).",
    ]
    if tuple(settings.smol_decoders) != tuple(DECODERS):
        notes.append(f"SmolLM2 decoders reduced to {', '.join(settings.smol_decoders)} (CPU budget).")
    if tier == "quick":
        notes.append("--quick: 10k-word vocabulary, 1M training tokens per epoch, 2 epochs - perplexities are "
                     "far from the papers'; read the trends, not the digits.")
    if not settings.smollm2:
        notes = [note for note in notes if not note.startswith("SmolLM2")]
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.nontermination",
        description="Non-termination ratio r_L of RNN/LSTM (vanilla/ST/NMST) and SmolLM2 under 12 decoders.",
    )
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="10k vocabulary, 2 epochs, 400 prompts, SmolLM2: about 40 min on 2 CPU cores")
    tier.add_argument("--standard", action="store_true",
                      help="full vocabulary and training split, 1,000 prompts, word models (about 3 h on 2 CPU cores; resumes after a kill)")
    add_data_arguments(parser)
    add_run_arguments(parser, cache_dir=default_cache_dir(), out_dir=REPO / "benchmarks" / "results")
    parser.add_argument("--decoders", default=None, help="comma-separated decoder names or globs (default: all)")
    add_device_arguments(parser)
    parser.add_argument("--list", action="store_true", help="print the model and decoder names and exit")
    return parser


def main(argv: list[str] | None = None, *, settings: Settings | None = None) -> RunResult:
    """Command-line entry point; ``settings`` overrides the --quick / default settings (tests)."""
    from benchmarks.nontermination_report import json_report, markdown_report, write_outputs

    parser = build_parser()
    args = parser.parse_args(argv)
    tier = "quick" if args.quick else "standard" if args.standard else "full"
    settings = replace(settings or {"quick": QUICK, "standard": STANDARD, "full": Settings()}[tier], seed=args.seed)
    try:
        device = local_device(resolve_device(args.device))
        autocast = training_autocast(args.dtype, device, tier=settings.words.autocast)
        smol_bf16 = training_bf16(args.dtype, device, tier=settings.smol.train_bf16)
    except ValueError as error:
        parser.error(str(error))
    ranks = init_distributed(device)  # a group of one without torchrun
    settings = replace(settings, words=replace(settings.words, autocast=autocast),
                       smol=replace(settings.smol, train_bf16=smol_bf16))  # fmt: skip
    set_threads(parser, args.threads)
    if args.list:
        print("models:", ", ".join(all_models(settings)))
        print("decoders:", ", ".join(DECODERS))
        raise SystemExit(0)
    try:
        models = select(args.models, all_models(settings), what="models")
        decoders = select(args.decoders, list(DECODERS), what="decoders")
    except ValueError as error:
        parser.error(str(error))
    if not args.report_only:
        problems = preflight(settings, models, args.data_dir)
        if problems:
            parser.error("cannot start, nothing was trained:\n  - " + "\n  - ".join(problems))
    start = time.perf_counter()
    result = run_benchmark(settings, data_dir=args.data_dir, cache_dir=args.cache_dir or default_cache_dir(),
                           models=models, decoders=decoders, progress=not args.no_progress,
                           compute=not args.report_only, device=device)  # fmt: skip
    wall = time.perf_counter() - start
    command = command_line("benchmarks.nontermination", argv)
    env = run_environment()
    records = _with_bounds(settings, result.records)
    notes = notes_for(settings, tier=tier)
    if result.missing:
        notes.append(f"Not run (not in the cache when this report was written): {', '.join(result.missing)}.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("Length plot skipped: matplotlib is not installed (pip install matplotlib).")
    shared = {"command": command, "env": env, "settings": asdict(settings), "records": records,
              "cells": result.cells, "notes": notes, "wall_seconds": wall}  # fmt: skip
    stem = "nontermination" + ("-standard" if tier == "standard" else "")
    shared["papers"] = PAPERS_LSTM if tier == "standard" else None
    if not ranks.main:
        return result
    written = write_outputs(args.out, markdown=markdown_report(**shared), report=json_report(**shared),
                            cells=result.cells, records=records, stem=stem)  # fmt: skip
    say("wrote " + ", ".join(str(path) for path in written))
    return result


if __name__ == "__main__":
    main()
