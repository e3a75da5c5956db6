"""Multi30k De->En: does MLE-guided parameter search raise BLEU over an MLE model, and over plain MLE
given the same fine-tuning time and learning rate? MRT and PG are the output-space baselines.

    python -m benchmarks.mt_bleu [--quick | --standard] [--data-dir ../shared/data] [--seeds 0 1 2]

1. Train (or reuse from the cache, outside the repository) a BART-style MLE base model from scratch with a
   joint BPE tokenizer trained on the training split. ``--standard`` trains it until validation BLEU
   plateaus (:class:`training.plateau.PlateauRule`; inverse-square-root learning-rate decay; bfloat16
   autocast), capped by ``--base-seconds``.
2. Fine-tune copies of it with MGS, MRT, PG and - the fair control - plain MLE, each for the same update
   time (validation excluded) and learning rate, over several seeds; ``mle-base-lr`` continues MLE at the
   base's own learning rate instead, so a change of rate is not credited to a method. Validation BLEU is
   recorded along the way and the best checkpoint on validation is kept.
3. Score base and fine-tuned models on the test sets with greedy and beam-4 decoding: sacrebleu corpus
   BLEU (with its signature), chrF, length ratio, non-termination rate, seconds per update.

Tiers: ``--quick`` (about an hour: 1,500 s base, 150 s fine-tuning, 2 seeds, greedy selection on 300
validation pairs, test_2016_flickr); ``--standard`` (at most 3 hours with one thread on a shared 2-core
CPU: base to a plateau or 2,700 s of update time, 150 s fine-tuning of 5 methods x 3 seeds, selection with
beam 4 on all 1,014 validation pairs, four test sets, non-termination at 3x the source length); no flag: a
4-hour base.

Writes ``<out>/<name>.md``, ``<out>/<name>.json`` and ``<out>/<name>_val_bleu.png`` (if matplotlib is
installed). Every stage caches its outcome under ``$CONSISTENT_DECODING_CACHE/mt_bleu`` (default
``~/.cache/consistent-decoding/mt_bleu``) and every training run checkpoints atomically, so a killed run
resumes where it stopped and finished work is never redone.

Under ``torchrun --nproc-per-node N`` every process trains on its share of each batch, translates its share
of the batches and rank 0 writes the cache and the report; a run resumes another's cache under any ``N``.
The update-time budgets then buy more updates than in one process: compare runs at equal ``N``.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

from benchmarks.common import REPO, cache_root, command_line, run_environment, settings_key, write_json
from benchmarks.devices import add_device_arguments, resolve_device, training_autocast
from benchmarks.mt_bleu_report import ALL_METHODS, METHODS, RATE_CONTROL, base_note, comparison_note, markdown
from benchmarks.mt_bleu_report import mgs_notes, plot, summary_rows
from training.parallel_text import ParallelText, encode_parallel, read_parallel
from decoding.metrics import corpus_bleu_signature
from training.checkpoint import atomic_folder, atomic_write_text
from training.distributed import barrier, current_ranks, init_distributed, local_device
from training.evaluate import Translations, chrf_signature, score_translations, translate
from training.loop import LoopConfig, load_best, train
from training.mgs import MGSConfig, MGSStep
from training.seq2seq import Seq2SeqSize, build_seq2seq, load_seq2seq, save_seq2seq
from training.plateau import PlateauRule
from training.steps import MLEStep, MRTStep, PGStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

TEST_SETS = ("test_2016_flickr", "test_2017_flickr", "test_2017_mscoco", "test_2018_flickr")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (hashed into the cache key).

    Decoding for validation and test: ``val_beams`` beams for checkpoint selection; a row's length cap is
    ``min(120, ceil(length_factor * source tokens) + length_slack)``, per row with ``per_row_cap`` (else
    per batch, from its longest source); a row without eos within it is non-terminated.
    """

    train_pairs: int | None = None
    val_pairs: int | None = None          # validation subset used for model selection and curves
    test_pairs: int | None = None         # per test set
    test_sets: tuple[str, ...] = ("test_2016_flickr",)   # the first is the primary one
    vocab_size: int = 8000
    size: Seq2SeqSize = Seq2SeqSize()
    val_beams: int = 1
    length_factor: float = 1.5
    length_slack: int = 10
    per_row_cap: bool = False
    base_seconds: float = 4 * 3600.0
    base_epochs: int = 30
    base_batch: int = 64
    base_lr: float = 1e-3
    base_warmup: int = 400
    base_validate_every: int = 500
    base_plateau: PlateauRule | None = None
    base_bf16: bool = False
    label_smoothing: float = 0.1
    finetune_seconds: float = 600.0
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    finetune_validate_seconds: float = 60.0
    finetune_bf16: bool = False
    mgs: MGSConfig = MGSConfig()
    base_seed: int = 0


QUICK = Settings(vocab_size=6000, val_pairs=300, base_seconds=1500.0, base_epochs=10, base_warmup=300,
                 base_validate_every=400, finetune_seconds=150.0, finetune_validate_seconds=50.0)
STANDARD = Settings(test_sets=TEST_SETS, val_beams=4, length_factor=3.0, length_slack=0, per_row_cap=True,
                    base_seconds=2700.0, base_epochs=40, base_validate_every=400,
                    base_plateau=PlateauRule(window_share=0.2, min_gain=0.3, min_validations=5), base_bf16=True,
                    finetune_seconds=150.0, finetune_validate_seconds=75.0)
TIERS = {"full": (Settings(), (0, 1), METHODS), "quick": (QUICK, (0, 1), METHODS),
         "standard": (STANDARD, (0, 1, 2), ALL_METHODS)}


def settings_from_args(args: argparse.Namespace) -> Settings:
    """The tier's settings with the command line's overrides."""
    settings = TIERS[tier_name(args)][0]
    overrides = {name: getattr(args, name) for name in
                 ("train_pairs", "val_pairs", "test_pairs", "base_seconds", "finetune_seconds",
                  "finetune_validate_seconds", "finetune_batch", "finetune_lr", "vocab_size", "length_factor")
                 if getattr(args, name) is not None}
    if args.tiny:
        overrides["size"] = Seq2SeqSize(d_model=32, layers=1, heads=2, ffn_dim=64)
    if args.bf16 is not None:
        overrides["base_bf16"], overrides["finetune_bf16"] = args.bf16 in ("base", "all"), args.bf16 == "all"
    device = resolve_device(args.device)
    for name in ("base_bf16", "finetune_bf16"):
        tier_choice = "bfloat16" if overrides.get(name, getattr(settings, name)) else None
        overrides[name] = training_autocast(args.dtype, device, tier=tier_choice) == "bfloat16"
    mgs = {field: getattr(args, f"mgs_{field}") for field in ("num_candidates", "sigma", "alpha", "mle_share",
                                                              "importance")
           if getattr(args, f"mgs_{field}") is not None}
    overrides["mgs"] = replace(settings.mgs, **mgs)
    return replace(settings, **overrides)


def tier_name(args: argparse.Namespace) -> str:
    return "quick" if args.quick else "standard" if args.standard else "full"


BASE_FIELDS = ("train_pairs", "val_pairs", "vocab_size", "size", "val_beams", "length_factor", "length_slack",
               "per_row_cap", "base_seconds", "base_epochs", "base_batch", "base_lr", "base_warmup",
               "base_validate_every", "base_plateau", "base_bf16", "label_smoothing", "base_seed")
TEST_FIELDS = ("test_pairs", "test_sets", "length_factor", "length_slack", "per_row_cap")


def cache_key(settings: Settings, *, fields: tuple[str, ...] | None = None) -> str:
    """Hash of the settings (of ``fields`` only, when given)."""
    values = asdict(settings)
    return settings_key(values if fields is None else {name: values[name] for name in fields})


# ----------------------------------------------------------------------------------------------- data

def data_folder(data_dir: str | None, settings: Settings) -> Path:
    """The multi30k folder: ``--data-dir``, else benchmarks.datasets's rules (env var, cache), else
    ``../shared/data`` beside the repository."""
    from benchmarks.datasets import MULTI30K_SHA256, MULTI30K_SOURCES, DATA_ENV, locate_dataset

    files = [f"{split}.{side}" for split in ("train", "val", *settings.test_sets) for side in ("de", "en")]
    if data_dir is None and not os.environ.get(DATA_ENV) and (REPO.parent / "shared/data/multi30k").is_dir():
        data_dir = str(REPO.parent / "shared/data")
    return locate_dataset("multi30k", files, MULTI30K_SHA256, data_dir=data_dir, sources=MULTI30K_SOURCES)


def load_splits(folder: Path, settings: Settings) -> dict[str, ParallelText]:
    limits = {"train": settings.train_pairs, "val": settings.val_pairs,
              **{test_set: settings.test_pairs for test_set in settings.test_sets}}
    splits = {}
    for split, limit in limits.items():
        text = read_parallel(folder / f"{split}.de", folder / f"{split}.en")
        splits[split] = text.head(limit) if limit is not None else text
    return splits


# ------------------------------------------------------------------------------------------- decoding

def translate_with(model: torch.nn.Module, tokenizer, sources: tuple[str, ...], settings: Settings, *,
                   num_beams: int, progress: bool = False) -> Translations:
    """Translations with the settings' length rule."""
    return translate(model, tokenizer, sources, num_beams=num_beams, length_factor=settings.length_factor,
                     length_slack=settings.length_slack, per_row_cap=settings.per_row_cap, progress=progress)


def val_bleu_fn(tokenizer, val: ParallelText, settings: Settings):
    def validate(model: torch.nn.Module) -> float:
        translations = translate_with(model, tokenizer, val.sources, settings, num_beams=settings.val_beams)
        return score_translations(translations, val.targets).bleu
    return validate


def evaluate_test(model: torch.nn.Module, tokenizer, splits: dict[str, ParallelText], settings: Settings, *,
                  progress: bool) -> dict[str, dict]:
    """``{test set: {"greedy": scores, "beam4": scores}}`` for every test set of the settings."""
    scores = {}
    for test_set in settings.test_sets:
        test = splits[test_set]
        scores[test_set] = {}
        for name, beams in (("greedy", 1), ("beam4", 4)):
            started = time.perf_counter()
            translations = translate_with(model, tokenizer, test.sources, settings, num_beams=beams,
                                          progress=progress)
            scores[test_set][name] = {**score_translations(translations, test.targets).as_dict(),
                                      "decode_seconds": time.perf_counter() - started}
    return scores


# ------------------------------------------------------------------------------------------ base model

def inverse_sqrt(warmup: int):
    """Learning-rate factor: linear warm-up over ``warmup`` updates, then decay as 1 / sqrt(update)."""
    return lambda update: min((update + 1) / warmup, (warmup / (update + 1)) ** 0.5)


def base_tokenizer(folder: Path, train_text: ParallelText, settings: Settings):
    """The tokenizer saved in ``folder``, trained there first if missing (by rank 0 under torchrun)."""
    from transformers import AutoTokenizer

    ranks = current_ranks()
    if not folder.is_dir() and ranks.main:
        tokenizer = train_tokenizer(list(train_text.sources) + list(train_text.targets),
                                    vocab_size=settings.vocab_size)
        atomic_folder(folder, tokenizer.save_pretrained)
    barrier(ranks)
    return AutoTokenizer.from_pretrained(folder)


def train_base(root: Path, splits: dict[str, ParallelText], settings: Settings, *, progress: bool,
               device: torch.device | str = "cpu") -> dict:
    """Train the MLE base model into ``root/base/model`` (reused when it is already there).

    Stops at the first of: the plateau rule (if the settings have one), ``base_seconds`` of update time,
    ``base_epochs``; without a plateau rule, also after 4 validations without improvement. The best
    checkpoint on validation is kept. ``continue_lr`` in the returned record is the learning rate the
    schedule would give the update after the best one (what continuing the base's training would use).
    """
    base = root / "base"
    info_path = base / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    tokenizer = base_tokenizer(base / "tokenizer", splits["train"], settings)
    torch.manual_seed(settings.base_seed)   # dropout draws from the global generator (restored on resume)
    model = build_seq2seq(tokenizer, settings.size, seed=settings.base_seed).to(device)
    data = encode_parallel(splits["train"], tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr, betas=(0.9, 0.98), weight_decay=0.01)
    schedule = inverse_sqrt(settings.base_warmup)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    config = LoopConfig(batch_size=settings.base_batch, max_seconds=settings.base_seconds,
                        max_epochs=settings.base_epochs, validate_every=settings.base_validate_every,
                        patience=None if settings.base_plateau is not None else 4, checkpoint_every=100,
                        seed=settings.base_seed, progress=progress,
                        autocast_dtype=torch.bfloat16 if settings.base_bf16 else None)
    task = Seq2SeqTask(tokenizer, label_smoothing=settings.label_smoothing)
    result = train(model, MLEStep(task), data, optimizer, config=config, scheduler=scheduler,
                   validate=val_bleu_fn(tokenizer, splits["val"], settings), checkpoint_dir=base / "checkpoint",
                   stop_rule=settings.base_plateau)
    load_best(model, base / "checkpoint")
    rule = settings.base_plateau
    info = {"updates": result.updates, "epochs": result.epoch, "train_seconds": result.train_seconds,
            "best_val_bleu": result.best_score, "best_update": result.best_update,
            "stop_reason": result.stop_reason, "history": result.history,
            "continue_lr": settings.base_lr * schedule(result.best_update or 0),
            "plateau_rule": asdict(rule) if rule is not None else None,
            "plateau_gain": rule.gain(result.history) if rule is not None else None,
            "parameters": sum(p.numel() for p in model.parameters())}
    if current_ranks().main:  # every process holds the same model; one writes it
        atomic_folder(base / "model", lambda folder: save_seq2seq(model, tokenizer, folder))
        write_json(info_path, info)
    barrier(current_ranks())
    return info


def evaluate_base(root: Path, splits: dict[str, ParallelText], settings: Settings, *, progress: bool,
                  device: torch.device | str = "cpu") -> dict:
    path = root / "base" / f"test-{cache_key(settings, fields=TEST_FIELDS)}.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_seq2seq(root / "base" / "model")
    scores = evaluate_test(model.to(device), tokenizer, splits, settings, progress=progress)
    _write_on_main(path, scores)
    return scores


# ------------------------------------------------------------------------------------------ fine-tuning

def make_step(method: str, task: Seq2SeqTask, settings: Settings):
    if method in ("mle", RATE_CONTROL):
        return MLEStep(task)
    if method == "mgs":
        return MGSStep(task, settings.mgs)
    if method == "mrt":
        return MRTStep(task)
    if method == "pg":
        return PGStep(task)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(ALL_METHODS)}")


def finetune(root: Path, base: dict, method: str, seed: int, splits: dict[str, ParallelText],
             settings: Settings, *, progress: bool, device: torch.device | str = "cpu") -> dict:
    """One fine-tuning run from the base model; cached in
    ``root/finetune-<settings hash>/<method>-seed<seed>/result.json``.

    Every method runs at ``finetune_lr`` except :data:`RATE_CONTROL`, which runs at the base's
    ``continue_lr``. The run's curve starts with the base's validation score (not measured again).
    """
    run_dir = root / f"finetune-{cache_key(settings)}" / f"{method}-seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    torch.manual_seed(seed)
    model, tokenizer = load_seq2seq(root / "base" / "model")
    model = model.to(device)
    task = Seq2SeqTask(tokenizer, cost="bleu", label_smoothing=settings.label_smoothing)
    step = make_step(method, task, settings)
    lr = base["continue_lr"] if method == RATE_CONTROL else settings.finetune_lr
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    config = LoopConfig(batch_size=settings.finetune_batch, max_seconds=settings.finetune_seconds,
                        validate_every_seconds=settings.finetune_validate_seconds, validate_at_start=True,
                        checkpoint_every=25, seed=1000 + seed, progress=progress,
                        autocast_dtype=torch.bfloat16 if settings.finetune_bf16 else None,
                        keep_step_logs=method == "mgs")
    result = train(model, step, encode_parallel(splits["train"], tokenizer), optimizer, config=config,
                   validate=val_bleu_fn(tokenizer, splits["val"], settings), checkpoint_dir=run_dir / "checkpoint",
                   start_score=base["best_val_bleu"])
    load_best(model, run_dir / "checkpoint")
    test_sets = evaluate_test(model, tokenizer, splits, settings, progress=progress)
    record = {
        "method": method, "seed": seed, "lr": lr, "batch_size": settings.finetune_batch,
        "processes": current_ranks().size,
        "budget_seconds": settings.finetune_seconds, "base": root.name, "updates": result.updates,
        "train_seconds": result.train_seconds, "seconds_per_update": result.train_seconds / max(result.updates, 1),
        "best_val_bleu": result.best_score, "best_update": result.best_update, "history": result.history,
        "step_logs": result.step_logs, "test": test_sets[settings.test_sets[0]], "test_sets": test_sets,
    }
    _write_on_main(result_path, record)
    return record


def _write_on_main(path: Path, payload: dict) -> None:
    """``payload`` to ``path`` by rank 0 (every process computed it alike); the others wait for the file."""
    ranks = current_ranks()
    if ranks.main:
        write_json(path, payload)
    barrier(ranks)


# ------------------------------------------------------------------------------------------------ main

def _positive(kind):
    def convert(text: str):
        value = kind(text)
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return convert


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mt_bleu", description=__doc__.split("\n\n")[0])
    tier = parser.add_mutually_exclusive_group()
    tier.add_argument("--quick", action="store_true", help="about an hour on a 2-core CPU")
    tier.add_argument("--standard", action="store_true", help="at most 3 hours on a 2-core CPU: a plateaued "
                      "base, 5 methods x 3 seeds, beam-4 selection on the full validation set, 4 test sets")
    parser.add_argument("--data-dir", default=None, help="directory containing multi30k/ (default: "
                        "$CONSISTENT_DECODING_DATA, else ../shared/data beside the repository, else the cache)")
    parser.add_argument("--cache-dir", default=None, help="where models and runs are cached (default "
                        "$CONSISTENT_DECODING_CACHE/mt_bleu or ~/.cache/consistent-decoding/mt_bleu)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default=None, help="output file stem (default mt_bleu, or mt_bleu-standard)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default 0 1 (--standard: 0 1 2)")
    parser.add_argument("--methods", nargs="+", default=None, choices=ALL_METHODS,
                        help=f"default {' '.join(METHODS)} (--standard: also {RATE_CONTROL}, MLE at the base's "
                        "own learning rate)")
    parser.add_argument("--threads", type=_positive(int), default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (for tests)")
    parser.add_argument("--no-progress", action="store_true")
    for name, kind in (("train-pairs", int), ("val-pairs", int), ("test-pairs", int), ("vocab-size", int),
                       ("base-seconds", float), ("finetune-seconds", float), ("finetune-validate-seconds", float),
                       ("finetune-batch", int), ("finetune-lr", float), ("length-factor", float)):
        parser.add_argument(f"--{name}", type=_positive(kind), default=None,
                            help="length cap per row: L = ceil(this x source tokens) with --standard (default 3); "
                            "otherwise per batch, ceil(this x longest source) + 10 (default 1.5)"
                            if name == "length-factor" else None)
    parser.add_argument("--bf16", choices=("off", "base", "all"), default=None,
                        help="bfloat16 autocast for the updates of the base only, or of every run (evaluation "
                        "always in float32; default: base with --standard, else off)")
    add_device_arguments(parser)
    parser.add_argument("--mgs-num-candidates", type=_positive(int), default=None, help="K (default 4)")
    parser.add_argument("--mgs-sigma", type=_positive(float), default=None, help="noise scale (default 1.0)")
    parser.add_argument("--mgs-alpha", type=_positive(float), default=None, help="inverse temperature (default 100)")
    parser.add_argument("--mgs-mle-share", type=float, default=None,
                        help="pi in [0, 1]: share of MLE-centred candidates (default 0.5; 1 = MLE-only, 0 = zero-only)")
    parser.add_argument("--mgs-importance", choices=("reference", "exact"), default=None)
    args = parser.parse_args(argv)
    if args.seeds is not None and len(args.seeds) < 1:
        parser.error("--seeds: need at least one seed")
    if args.mgs_mle_share is not None and not 0.0 <= args.mgs_mle_share <= 1.0:
        parser.error(f"--mgs-mle-share must be in [0, 1], got {args.mgs_mle_share}")
    if args.bf16 is not None and args.dtype != "auto":
        parser.error("--bf16 and --dtype both set the training precision: give one")
    try:
        training_autocast(args.dtype, resolve_device(args.device), tier=None)
    except ValueError as error:
        parser.error(str(error))
    return args


def run_folder(args: argparse.Namespace, settings: Settings) -> Path:
    """Where this base model and its fine-tuning runs are cached: ``--cache-dir`` (default
    ``<cache root>/mt_bleu``) / the hash of the base's settings."""
    base = Path(args.cache_dir) if args.cache_dir is not None else cache_root() / "mt_bleu"
    return base.expanduser() / cache_key(settings, fields=BASE_FIELDS)


def describe_decoding(settings: Settings, val_pairs: int) -> tuple[str, str]:
    """(How checkpoints are selected, what the length cap is) in words, for the report."""
    decoder = "greedy" if settings.val_beams == 1 else f"beam {settings.val_beams}"
    selection = f"{decoder}, {val_pairs:,} validation pairs"
    cap = f"ceil({settings.length_factor:g} × source tokens)" + (
        f" + {settings.length_slack}" if settings.length_slack else "")
    scope = "each row's own" if settings.per_row_cap else "the batch's longest source's"
    return selection, f"L = {cap}, at most 120 tokens ({scope})"


def metadata(argv: list[str] | None, settings: Settings, root: Path, splits: dict[str, ParallelText],
             notes: list[str], *, wall_seconds: float) -> dict:
    """The report's header: the run (:func:`benchmarks.common.run_environment`), settings, cache, decoding
    rules and sacrebleu's signatures."""
    selection, length_rule = describe_decoding(settings, len(splits["val"]))
    return {
        "command": command_line("benchmarks.mt_bleu", argv), **run_environment(), "wall_seconds": wall_seconds,
        "settings": asdict(settings), "cache": str(root), "selection": selection, "length_rule": length_rule,
        "bleu_signature": corpus_bleu_signature(), "chrf_signature": chrf_signature(), "notes": notes,
    }


def main(argv: list[str] | None = None) -> dict:
    started = time.perf_counter()
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    device = local_device(resolve_device(args.device))
    ranks = init_distributed(device)  # a group of one without torchrun
    say = print if ranks.main else lambda *a, **k: None
    _, tier_seeds, tier_methods = TIERS[tier_name(args)]
    seeds = args.seeds if args.seeds is not None else list(tier_seeds)
    methods = args.methods if args.methods is not None else list(tier_methods)
    name = args.name or ("mt_bleu-standard" if args.standard else "mt_bleu")
    root = run_folder(args, settings)
    progress = not args.no_progress and ranks.main
    splits = load_splits(data_folder(args.data_dir, settings), settings)
    primary = settings.test_sets[0]
    say(f"[mt_bleu] cache {root}; train {len(splits['train'])} pairs, val {len(splits['val'])}, test "
          + ", ".join(f"{s} {len(splits[s])}" for s in settings.test_sets), flush=True)
    base = train_base(root, splits, settings, progress=progress, device=device)
    base = {**base, "test_sets": evaluate_base(root, splits, settings, progress=progress, device=device)}
    base["test"] = base["test_sets"][primary]
    say(f"[mt_bleu] base: {base['stop_reason']} after {base['updates']} updates, val {base['best_val_bleu']:.2f}, "
          f"{primary} greedy {base['test']['greedy']['bleu']:.2f}, beam4 {base['test']['beam4']['bleu']:.2f}",
          flush=True)
    runs = []
    for seed in seeds:
        for method in methods:
            record = finetune(root, base, method, seed, splits, settings, progress=progress, device=device)
            say(f"[mt_bleu] {method} seed {seed}: {record['updates']} updates, {primary} greedy "
                  f"{record['test']['greedy']['bleu']:.2f}, beam4 {record['test']['beam4']['bleu']:.2f}",
                  flush=True)
            runs.append(record)
    if not ranks.main:
        return {}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = [note for note in (base_note(base), comparison_note(runs, primary)) if note] + mgs_notes(runs)
    plot_note = plot(base, runs, out / f"{name}_val_bleu.png")
    notes += [plot_note] if plot_note else [f"Plot: `{name}_val_bleu.png` (validation BLEU against update "
                                            "time: the base's training, then every fine-tuning run)."]
    meta = metadata(argv, settings, root, splits, notes, wall_seconds=time.perf_counter() - started)
    payload = {**meta, "rows": summary_rows(base, runs), "base": base, "runs": runs}
    report = markdown(meta, base, runs, primary=primary)
    write_json(out / f"{name}.json", payload)
    atomic_write_text(out / f"{name}.md", report)
    print(report)
    return payload


if __name__ == "__main__":
    main()
