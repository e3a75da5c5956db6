"""How often do language models fail to stop, under which decoders, and do the fixes work?

    python -m benchmarks.nontermination [--quick] [--data-dir ../shared/data] [--out DIR] [--seed 0]
        [--models 'lstm-*,smollm2*'] [--decoders greedy,consistent-nucleus-0.4] [--threads N]

1. WikiText-2 word-level *sentences* (:mod:`benchmarks.nontermination_words`): trains, or reuses from the
   cache, 2-layer tanh-RNN and LSTM LMs with vanilla, ST and NMST heads (epsilon grid, default
   1e-3, 1e-4, 1e-5), with validation and test perplexity on the continuation tokens.
2. SmolLM2-135M-Instruct on WikiText-2 *lines* (:mod:`benchmarks.nontermination_smollm2`): the
   pretrained model, and the same model fine-tuned on the same train lines with a vanilla, ST and NMST
   head, with test perplexity on continuations.
3. Every model decodes the first 10 tokens of test sequences with ancestral sampling, greedy, beam 2/4,
   top-k 2/4, nucleus 0.2/0.4 and consistent top-k / nucleus, up to L new tokens (1,500 for the RNN/LSTM,
   1,000 for SmolLM2); each cell reports r_L, mean generated length and its ratio to the references',
   seq-rep-4, and for sampled decoders the spread over independent sample sets.

Writes ``<out>/nontermination.md``, ``.json`` and ``.png`` (length distributions; needs matplotlib).
Models, fine-tunes (checkpointed) and every finished cell are cached under
``$CONSISTENT_DECODING_CACHE/nontermination/<settings hash>`` (default ``~/.cache/consistent-decoding``),
so an interrupted run resumes and a finished cell is never decoded twice. ``--quick`` shrinks the models,
vocabulary, data, prompts and (for SmolLM2) the decoder set so that the whole run fits in about half an
hour of a 2-core CPU; L is never reduced.
"""

from __future__ import annotations

import argparse
import fnmatch
import hashlib
import json
import os
import shlex
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from benchmarks.data import CACHE_ENV, add_data_arguments
from benchmarks.nontermination_cells import DECODERS, CellResult, decode_cell, load_cell, save_cell
from benchmarks.nontermination_smollm2 import SmolSettings
from benchmarks.nontermination_words import WordModelSpec, WordSettings

REPO = Path(__file__).resolve().parent.parent
SMOL_VARIANTS = ("pretrained", "ft-vanilla", "ft-st", "ft-nmst")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (hashed into the cache key)."""

    words: WordSettings = WordSettings()
    smol: SmolSettings = SmolSettings()
    epsilons: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    word_max_new_tokens: int = 1500
    smol_max_new_tokens: int = 1000
    smol_decoders: tuple[str, ...] = tuple(DECODERS)
    sample_sets: int = 3
    batch_prompts: int = 256
    seed: int = 0
    version: int = 3  # bump when a code change alters the numbers, so cached results are not reused


QUICK = Settings(
    words=WordSettings(
        vocab_size=3000, train_tokens=300_000, eval_sentences=500, prompts=32, rnn_hidden=128, lstm_hidden=128,
        rnn_dropout=0.2, lstm_dropout=0.2, epochs=1, patience=1, lr=3e-3,
    ),
    smol=SmolSettings(prompts=16, eval_lines=32, finetune_tokens=100_000, train_layers=2, batch_tokens=1024, lr=1e-4),
    smol_decoders=("greedy", "consistent-nucleus-0.4"),
    sample_sets=2,
)  # fmt: skip


def format_epsilon(epsilon: float) -> str:
    """``1e-3`` for 0.001 (model names and tables)."""
    mantissa, exponent = f"{epsilon:e}".split("e")
    mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def word_specs(settings: Settings) -> list[WordModelSpec]:
    """The RNN / LSTM models: per cell vanilla, then ST and NMST for every epsilon."""
    specs = []
    for cell in ("rnn", "lstm"):
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
    return [spec.name for spec in word_specs(settings)] + list(smol_names(settings))


def select(patterns: str | None, names: list[str], *, what: str) -> list[str]:
    """Names matching comma-separated exact names or globs, in ``names`` order; ValueError for a pattern
    that matches nothing, naming the choices."""
    if patterns is None:
        return list(names)
    wanted = [p.strip() for p in patterns.split(",") if p.strip()]
    if not wanted:
        raise ValueError(f"--{what} is empty; choose from {', '.join(names)}")
    for pattern in wanted:
        if not fnmatch.filter(names, pattern):
            raise ValueError(f"unknown {what[:-1]} {pattern!r}; choose from {', '.join(names)} (globs allowed)")
    return [name for name in names if any(fnmatch.fnmatchcase(name, p) for p in wanted)]


def cache_key(settings: Settings) -> str:
    text = json.dumps(asdict(settings), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def default_cache_dir() -> Path:
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "consistent-decoding"
    return Path(root).expanduser() / "nontermination"


@dataclass
class RunResult:
    """What :func:`run_benchmark` measured: model records and cells, in table order."""

    settings: Settings
    records: dict[str, dict] = field(default_factory=dict)
    cells: list[CellResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)  # "model / decoder" cells selected but not in the cache


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _decode_missing(
    model: object, name: str, decoders: list[str], *, folder: Path, settings: Settings, prompts: torch.Tensor,
    reference_lengths: list[int], eos: int, pad: int, max_new_tokens: int, progress: bool,
) -> None:  # fmt: skip
    for decoder in decoders:
        path = folder / f"{name}__{decoder}.json"
        if path.is_file():
            continue
        result = decode_cell(
            model, prompts, model_name=name, decoder=DECODERS[decoder], eos_token_id=eos, pad_token_id=pad,
            max_new_tokens=max_new_tokens, reference_lengths=reference_lengths, sample_sets=settings.sample_sets,
            seed=settings.seed, batch_size=settings.batch_prompts, progress=progress,
        )  # fmt: skip
        save_cell(result, path)
        summary = result.summary()
        _say(f"[cell] {name} / {decoder}: r_L={summary['nontermination']:.3f} "
             f"len={summary['mean_length']:.1f} ({result.seconds:.0f} s)")  # fmt: skip


def _run_words(
    settings: Settings, models: list[str], decoders: list[str], *, root: Path, data_dir: str | None, progress: bool
) -> None:
    from benchmarks.nontermination_words import load_word_data, train_or_load_word_model

    data = None
    for spec in word_specs(settings):
        if spec.name not in models:
            continue
        missing = [d for d in decoders if not (root / "cells" / f"{spec.name}__{d}.json").is_file()]
        if not missing and (root / "models" / f"{spec.name}.json").is_file():
            continue
        if data is None:
            data = load_word_data(data_dir, settings.words, seed=settings.seed)
            _say(f"[data] word level: {len(data.vocab)} words, {data.train_tokens} training tokens, "
                 f"{len(data.reference_lengths)} prompts")  # fmt: skip
        (root / "models").mkdir(parents=True, exist_ok=True)
        model, _ = train_or_load_word_model(
            spec, settings.words, data, folder=root / "models", seed=settings.seed, progress=progress
        )
        _decode_missing(
            model, spec.name, missing, folder=root / "cells", settings=settings, prompts=data.prompts,
            reference_lengths=data.reference_lengths, eos=data.vocab.eos_id, pad=data.vocab.pad_id,
            max_new_tokens=settings.word_max_new_tokens, progress=progress,
        )  # fmt: skip


def _run_smollm2(
    settings: Settings, models: list[str], decoders: list[str], *, root: Path, data_dir: str | None, progress: bool
) -> None:
    from benchmarks.nontermination_smollm2 import SmolLM2Bench, load_smol_data, load_smollm2

    bench = None
    for name, variant in smol_names(settings).items():
        if name not in models:
            continue
        missing = [d for d in decoders if not (root / "cells" / f"{name}__{d}.json").is_file()]
        if not missing and (root / "models" / f"smollm2-{variant}.json").is_file():
            continue
        if bench is None:
            tokenizer, model = load_smollm2()
            data = load_smol_data(data_dir, tokenizer, settings.smol, seed=settings.seed)
            bench = SmolLM2Bench(tokenizer, model, settings.smol, data, folder=root / "models", seed=settings.seed,
                                 progress=progress)  # fmt: skip
        bench.load_variant(variant)
        _, model = bench.head(variant)
        _decode_missing(
            model, name, missing, folder=root / "cells", settings=settings, prompts=bench.data.prompts,
            reference_lengths=bench.data.reference_lengths, eos=bench.eos, pad=bench.eos,
            max_new_tokens=settings.smol_max_new_tokens, progress=progress,
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
) -> RunResult:
    """Train / fine-tune / decode whatever the cache lacks for ``models`` x ``decoders``; gather results.

    ``compute=False`` only gathers what the cache holds (``missing`` then lists the cells not run).
    """
    root = Path(cache_dir) / cache_key(settings)
    (root / "cells").mkdir(parents=True, exist_ok=True)
    (root / "models").mkdir(parents=True, exist_ok=True)
    (root / "settings.json").write_text(json.dumps(asdict(settings), indent=2, default=str))
    smol_decoders = [d for d in decoders if d in settings.smol_decoders]
    if compute:
        _run_words(settings, models, decoders, root=root, data_dir=data_dir, progress=progress)
    if compute and smol_decoders and any(name in models for name in smol_names(settings)):
        _run_smollm2(settings, models, smol_decoders, root=root, data_dir=data_dir, progress=progress)
    result = RunResult(settings)
    smol = smol_names(settings)
    for name in models:
        record_file = root / "models" / (f"smollm2-{smol[name]}.json" if name in smol else f"{name}.json")
        if record_file.is_file():
            result.records[name] = json.loads(record_file.read_text())
        for decoder in smol_decoders if name in smol else decoders:
            cell = load_cell(root / "cells" / f"{name}__{decoder}.json")
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


def notes_for(settings: Settings, *, quick: bool) -> list[str]:
    """What differs from the papers' setting, stated in the report."""
    words, smol = settings.words, settings.smol
    notes = [
        f"RNN/LSTM: WikiText-2 sentences, first 10 tokens = context; {words.prompts or 'all'} test prompts; "
        f"vocabulary {words.vocab_size or 'full (33,278 + pad/eos)'}; hidden {words.rnn_hidden} (RNN) / "
        f"{words.lstm_hidden} (LSTM) x {words.layers} layers; training tokens per epoch "
        f"{words.train_tokens or 'all'}; at most {words.epochs} epochs, patience {words.patience}.",
        f"SmolLM2: WikiText-2 test lines, first 10 SmolLM2 tokens = context; {smol.prompts} prompts; fine-tunes "
        f"train the top {smol.train_layers} of 30 layers, the final norm and the eos row of the output layer on {smol.finetune_tokens:,} train-line "
        f"tokens (lines ending in eos), ST/NMST eps = {format_epsilon(smol.epsilon)}; perplexity on "
        f"{smol.eval_lines} test lines' continuations.",
        f"L = {settings.word_max_new_tokens} (RNN/LSTM) and {settings.smol_max_new_tokens} (SmolLM2), never "
        f"reduced; sampled decoders: {settings.sample_sets} independent sample sets per prompt (seed {settings.seed}).",
    ]
    if tuple(settings.smol_decoders) != tuple(DECODERS):
        notes.append(f"SmolLM2 decoders reduced to {', '.join(settings.smol_decoders)} (CPU budget).")
    if quick:
        notes.append("--quick: small models, vocabulary and data - perplexities are far from the papers'.")
    return notes


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.nontermination",
        description="Non-termination ratio r_L of RNN/LSTM (vanilla/ST/NMST) and SmolLM2 under 12 decoders.",
    )
    parser.add_argument("--quick", action="store_true", help="small models/data, about 30 min on 2 CPU cores")
    add_data_arguments(parser)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results", help="directory for the report")
    parser.add_argument("--cache-dir", type=Path, default=None, help=f"default {default_cache_dir()}")
    parser.add_argument("--seed", type=int, default=0, help="seeds data sampling, training and decoding")
    parser.add_argument("--models", default=None, help="comma-separated model names or globs (default: all)")
    parser.add_argument("--decoders", default=None, help="comma-separated decoder names or globs (default: all)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    parser.add_argument("--report-only", action="store_true",
                        help="train and decode nothing: write the report from the cached results")
    parser.add_argument("--list", action="store_true", help="print the model and decoder names and exit")
    return parser


def main(argv: list[str] | None = None, *, settings: Settings | None = None) -> RunResult:
    """Command-line entry point; ``settings`` overrides the --quick / default settings (tests)."""
    from benchmarks.nontermination_report import environment, json_report, markdown_report, write_outputs

    parser = build_parser()
    args = parser.parse_args(argv)
    settings = replace(settings or (QUICK if args.quick else Settings()), seed=args.seed)
    if args.threads is not None:
        if args.threads < 1:
            parser.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    if args.list:
        print("models:", ", ".join(all_models(settings)))
        print("decoders:", ", ".join(DECODERS))
        raise SystemExit(0)
    try:
        models = select(args.models, all_models(settings), what="models")
        decoders = select(args.decoders, list(DECODERS), what="decoders")
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    result = run_benchmark(settings, data_dir=args.data_dir, cache_dir=args.cache_dir or default_cache_dir(),
                           models=models, decoders=decoders, progress=not args.no_progress,
                           compute=not args.report_only)  # fmt: skip
    wall = time.perf_counter() - start
    command = "python -m benchmarks.nontermination " + shlex.join(argv if argv is not None else sys.argv[1:])
    env = {**environment(REPO), "date": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    records = _with_bounds(settings, result.records)
    notes = notes_for(settings, quick=args.quick)
    if result.missing:
        notes.append(f"Not run (not in the cache when this report was written): {', '.join(result.missing)}.")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        notes.append("Length plot skipped: matplotlib is not installed (pip install matplotlib).")
    shared = {"command": command, "env": env, "settings": asdict(settings), "records": records,
              "cells": result.cells, "notes": notes, "wall_seconds": wall}  # fmt: skip
    written = write_outputs(args.out, markdown=markdown_report(**shared), report=json_report(**shared), cells=result.cells)
    _say("wrote " + ", ".join(str(path) for path in written))
    return result


if __name__ == "__main__":
    main()
