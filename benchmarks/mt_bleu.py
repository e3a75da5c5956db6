"""Multi30k De->En: does MLE-guided parameter search raise BLEU over an MLE model, and over plain MLE
given the same fine-tuning time? MRT and PG are the output-space baselines.

    python -m benchmarks.mt_bleu [--quick] [--data-dir ../shared/data] [--seeds 0 1]

1. Train (or reuse from the cache, outside the repository) a BART-style MLE base model from scratch with a
   joint BPE tokenizer trained on the training split.
2. Fine-tune copies of it with MGS, MRT, PG and - the fair control - plain MLE, each for the same update
   time (validation excluded), over several seeds; validation BLEU (greedy) is recorded along the way and
   the best checkpoint on validation is kept.
3. Score base and fine-tuned models on test_2016_flickr with greedy and beam-4 decoding: sacrebleu corpus
   BLEU (with its signature), chrF, length ratio, non-termination rate, seconds per update.

Writes ``<out>/<name>.md``, ``<out>/<name>.json`` and ``<out>/<name>_val_bleu.png`` (if matplotlib is
installed). Every stage caches its outcome under ``$CONSISTENT_DECODING_CACHE/mt_bleu`` (default
``~/.cache/consistent-decoding/mt_bleu``) and every training run checkpoints atomically, so a killed run
resumes where it stopped and finished work is never redone.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from training.checkpoint import atomic_save
from training.data import ParallelText, encode_parallel, read_parallel
from training.evaluate import score_translations, translate
from training.loop import LoopConfig, load_best, train
from training.mgs import MGSConfig, MGSStep
from training.models import Seq2SeqSize, build_seq2seq, load_seq2seq, save_seq2seq
from training.steps import MLEStep, MRTStep, PGStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

REPO = Path(__file__).resolve().parent.parent
METHODS = ("mle", "mgs", "mrt", "pg")


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (hashed into the cache key)."""

    train_pairs: int | None = None
    val_pairs: int | None = None          # validation subset used for model selection and curves
    test_pairs: int | None = None
    vocab_size: int = 8000
    size: Seq2SeqSize = Seq2SeqSize()
    base_seconds: float = 4 * 3600.0
    base_epochs: int = 30
    base_batch: int = 64
    base_lr: float = 1e-3
    base_warmup: int = 400
    base_validate_every: int = 500
    label_smoothing: float = 0.1
    finetune_seconds: float = 600.0
    finetune_batch: int = 32
    finetune_lr: float = 1e-4
    finetune_validate_seconds: float = 60.0
    mgs: MGSConfig = MGSConfig()
    base_seed: int = 0


QUICK = Settings(vocab_size=6000, val_pairs=300, base_seconds=1500.0, base_epochs=10, base_warmup=300,
                 base_validate_every=400, finetune_seconds=150.0, finetune_validate_seconds=50.0)


def settings_from_args(args: argparse.Namespace) -> Settings:
    settings = QUICK if args.quick else Settings()
    overrides = {name: getattr(args, name) for name in
                 ("train_pairs", "val_pairs", "test_pairs", "base_seconds", "finetune_seconds",
                  "finetune_validate_seconds", "vocab_size")
                 if getattr(args, name) is not None}
    if args.tiny:
        overrides["size"] = Seq2SeqSize(d_model=32, layers=1, heads=2, ffn_dim=64)
    mgs = {field: getattr(args, f"mgs_{field}") for field in ("num_candidates", "sigma", "alpha", "mle_share",
                                                              "importance")
           if getattr(args, f"mgs_{field}") is not None}
    overrides["mgs"] = replace(settings.mgs, **mgs)
    return replace(settings, **overrides)


BASE_FIELDS = ("train_pairs", "val_pairs", "vocab_size", "size", "base_seconds", "base_epochs", "base_batch",
               "base_lr", "base_warmup", "base_validate_every", "label_smoothing", "base_seed")


def cache_key(settings: Settings, *, base_only: bool = False) -> str:
    """Hash of the settings (of those that shape the base model only, with ``base_only``)."""
    fields = asdict(settings)
    if base_only:
        fields = {name: fields[name] for name in BASE_FIELDS}
    text = json.dumps(fields, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def write_json(path: Path, payload: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp.write_text(json.dumps(payload, indent=2, default=str))
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------- data

def data_folder(data_dir: str | None) -> Path:
    """The multi30k folder: ``--data-dir``, else benchmarks.data's rules (env var, cache), else
    ``../shared/data`` beside the repository."""
    from benchmarks.data import MULTI30K_SHA256, MULTI30K_SOURCES, DATA_ENV, locate_dataset

    files = ["train.de", "train.en", "val.de", "val.en", "test_2016_flickr.de", "test_2016_flickr.en"]
    if data_dir is None and not os.environ.get(DATA_ENV) and (REPO.parent / "shared/data/multi30k").is_dir():
        data_dir = str(REPO.parent / "shared/data")
    return locate_dataset("multi30k", files, MULTI30K_SHA256, data_dir=data_dir, sources=MULTI30K_SOURCES)


def load_splits(folder: Path, settings: Settings) -> dict[str, ParallelText]:
    limits = {"train": settings.train_pairs, "val": settings.val_pairs, "test_2016_flickr": settings.test_pairs}
    splits = {}
    for split, limit in limits.items():
        text = read_parallel(folder / f"{split}.de", folder / f"{split}.en")
        splits[split] = text.head(limit) if limit is not None else text
    return splits


# ------------------------------------------------------------------------------------------ base model

def inverse_sqrt(warmup: int):
    return lambda update: min((update + 1) / warmup, (warmup / (update + 1)) ** 0.5)


def val_bleu_fn(tokenizer, val: ParallelText):
    def validate(model: torch.nn.Module) -> float:
        return score_translations(translate(model, tokenizer, val.sources), val.targets).bleu
    return validate


def train_base(root: Path, splits: dict[str, ParallelText], settings: Settings, *, progress: bool) -> dict:
    """Train the MLE base model into ``root/base/model`` (reused when it is already there)."""
    base = root / "base"
    info_path = base / "info.json"
    if info_path.is_file():
        return json.loads(info_path.read_text())
    tokenizer_dir = base / "tokenizer"
    if tokenizer_dir.is_dir():
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    else:
        train_text = splits["train"]
        tokenizer = train_tokenizer(list(train_text.sources) + list(train_text.targets),
                                    vocab_size=settings.vocab_size)
        tokenizer.save_pretrained(tokenizer_dir)
    model = build_seq2seq(tokenizer, settings.size, seed=settings.base_seed)
    data = encode_parallel(splits["train"], tokenizer)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.base_lr, betas=(0.9, 0.98), weight_decay=0.01)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, inverse_sqrt(settings.base_warmup))
    config = LoopConfig(batch_size=settings.base_batch, max_seconds=settings.base_seconds,
                        max_epochs=settings.base_epochs, validate_every=settings.base_validate_every,
                        patience=4, checkpoint_every=100, seed=settings.base_seed, progress=progress)
    task = Seq2SeqTask(tokenizer, label_smoothing=settings.label_smoothing)
    result = train(model, MLEStep(task), data, optimizer, config=config, scheduler=scheduler,
                   validate=val_bleu_fn(tokenizer, splits["val"]), checkpoint_dir=base / "checkpoint")
    load_best(model, base / "checkpoint")
    staging = base / "model.tmp"
    shutil.rmtree(staging, ignore_errors=True)
    save_seq2seq(model, tokenizer, staging)
    shutil.rmtree(base / "model", ignore_errors=True)
    os.replace(staging, base / "model")
    info = {"updates": result.updates, "epochs": result.epoch, "train_seconds": result.train_seconds,
            "best_val_bleu": result.best_score, "best_update": result.best_update,
            "stop_reason": result.stop_reason, "history": result.history,
            "parameters": sum(p.numel() for p in model.parameters())}
    write_json(info_path, info)
    return info


# ----------------------------------------------------------------------------------------- evaluation

def evaluate_test(model: torch.nn.Module, tokenizer, test: ParallelText, *, progress: bool) -> dict:
    """Test scores with greedy and beam-4 decoding."""
    scores = {}
    for name, beams in (("greedy", 1), ("beam4", 4)):
        started = time.perf_counter()
        translations = translate(model, tokenizer, test.sources, num_beams=beams, progress=progress)
        scores[name] = {**score_translations(translations, test.targets).as_dict(),
                        "decode_seconds": time.perf_counter() - started}
    return scores


def evaluate_base(root: Path, splits: dict[str, ParallelText], *, progress: bool) -> dict:
    path = root / "base" / "test.json"
    if path.is_file():
        return json.loads(path.read_text())
    model, tokenizer = load_seq2seq(root / "base" / "model")
    scores = evaluate_test(model, tokenizer, splits["test_2016_flickr"], progress=progress)
    write_json(path, scores)
    return scores


# ------------------------------------------------------------------------------------------ fine-tuning

def make_step(method: str, task: Seq2SeqTask, settings: Settings):
    if method == "mle":
        return MLEStep(task)
    if method == "mgs":
        return MGSStep(task, settings.mgs)
    if method == "mrt":
        return MRTStep(task)
    if method == "pg":
        return PGStep(task)
    raise ValueError(f"unknown method {method!r}; choose from {', '.join(METHODS)}")


def finetune(root: Path, method: str, seed: int, splits: dict[str, ParallelText], settings: Settings, *,
             progress: bool) -> dict:
    """One fine-tuning run from the base model; cached in
    ``root/finetune-<settings hash>/<method>-seed<seed>/result.json``."""
    run_dir = root / f"finetune-{cache_key(settings)}" / f"{method}-seed{seed}"
    result_path = run_dir / "result.json"
    if result_path.is_file():
        return json.loads(result_path.read_text())
    torch.manual_seed(seed)
    model, tokenizer = load_seq2seq(root / "base" / "model")
    task = Seq2SeqTask(tokenizer, cost="bleu", label_smoothing=settings.label_smoothing)
    step = make_step(method, task, settings)
    optimizer = torch.optim.AdamW(model.parameters(), lr=settings.finetune_lr, betas=(0.9, 0.98),
                                  weight_decay=0.01)
    config = LoopConfig(batch_size=settings.finetune_batch, max_seconds=settings.finetune_seconds,
                        validate_every_seconds=settings.finetune_validate_seconds, validate_at_start=True,
                        checkpoint_every=10, seed=1000 + seed, progress=progress)
    result = train(model, step, encode_parallel(splits["train"], tokenizer), optimizer, config=config,
                   validate=val_bleu_fn(tokenizer, splits["val"]), checkpoint_dir=run_dir / "checkpoint")
    load_best(model, run_dir / "checkpoint")
    record = {
        "method": method, "seed": seed, "updates": result.updates, "train_seconds": result.train_seconds,
        "seconds_per_update": result.train_seconds / max(result.updates, 1),
        "best_val_bleu": result.best_score, "best_update": result.best_update, "history": result.history,
        "test": evaluate_test(model, tokenizer, splits["test_2016_flickr"], progress=progress),
    }
    write_json(result_path, record)
    return record


# ---------------------------------------------------------------------------------------------- report

COLUMNS = (("BLEU greedy", ("test", "greedy", "bleu")), ("BLEU beam4", ("test", "beam4", "bleu")),
           ("chrF greedy", ("test", "greedy", "chrf")), ("chrF beam4", ("test", "beam4", "chrf")),
           ("len ratio greedy", ("test", "greedy", "length_ratio")),
           ("non-term greedy", ("test", "greedy", "nontermination")),
           ("non-term beam4", ("test", "beam4", "nontermination")),
           ("best val BLEU", ("best_val_bleu",)), ("s / update", ("seconds_per_update",)),
           ("updates", ("updates",)), ("fine-tune s", ("train_seconds",)))


def _get(record: dict, path: tuple[str, ...]) -> float | None:
    for key in path:
        if not isinstance(record, dict) or key not in record:
            return None
        record = record[key]
    return record


def _cell(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    mean = statistics.fmean(values)
    text = f"{mean:.3g}" if abs(mean) < 10 else f"{mean:.1f}" if abs(mean) < 100 else f"{mean:.0f}"
    if len(values) > 1:
        sd = statistics.stdev(values)
        text += f" ± {sd:.2g}" if abs(sd) < 10 else f" ± {sd:.0f}"
    return text


def summarise(base: dict, base_test: dict, runs: list[dict]) -> list[dict]:
    base_row = {"method": "base (MLE)", "seeds": 1, "test": base_test, "best_val_bleu": base["best_val_bleu"],
                "updates": base["updates"], "train_seconds": base["train_seconds"],
                "seconds_per_update": base["train_seconds"] / max(base["updates"], 1)}
    rows = [{"method": "base (MLE)", "seeds": 1,
             **{title: _cell([_get(base_row, path)]) for title, path in COLUMNS}}]
    for method in METHODS:
        records = [r for r in runs if r["method"] == method]
        if records:
            rows.append({"method": method, "seeds": len(records),
                         **{title: _cell([_get(r, path) for r in records]) for title, path in COLUMNS}})
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    titles = ["method", "seeds"] + [title for title, _ in COLUMNS]
    lines = ["| " + " | ".join(titles) + " |", "|" + "---|" * len(titles)]
    lines += ["| " + " | ".join(str(row[t]) for t in titles) + " |" for row in rows]
    notes = [f"# Multi30k De->En: MGS vs MRT vs PG vs MLE continuation", "",
             f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}  ", f"BLEU signature: `{meta['bleu_signature']}`  ",
             f"chrF signature: `{meta['chrf_signature']}`", "",
             "Test set: test_2016_flickr. Fine-tuned rows: mean ± sd over seeds; every method gets the same "
             "update time (validation excluded); the checkpoint with the best validation BLEU (greedy) is "
             "scored. `non-term`: share of outputs without eos within the length cap. `s / update`: update "
             "wall time, on a shared CPU, so ratios are more telling than absolute values.", ""]
    return "\n".join(notes + lines + ["", *meta["notes"]]) + "\n"


def plot(runs: list[dict], base: dict, path: Path) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (optional `bench` extra): the validation-BLEU plot was skipped."
    figure, axes = plt.subplots(figsize=(7, 4.5))
    colours = dict(zip(METHODS, ("tab:gray", "tab:red", "tab:blue", "tab:green")))
    for record in runs:
        history = record["history"]
        axes.plot([h["train_seconds"] for h in history], [h["score"] for h in history], marker="o",
                  markersize=3, color=colours[record["method"]], alpha=0.8,
                  label=f"{record['method']} (seed {record['seed']})")
    axes.axhline(base["best_val_bleu"], color="black", linestyle=":", label="base model")
    axes.set_xlabel("fine-tuning time (s, validation excluded)")
    axes.set_ylabel("validation BLEU (greedy)")
    axes.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return None


# ------------------------------------------------------------------------------------------------ main

def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.mt_bleu", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="about an hour on a 2-core CPU")
    parser.add_argument("--data-dir", default=None, help="directory containing multi30k/ (default: "
                        "$CONSISTENT_DECODING_DATA, else ../shared/data beside the repository, else the cache)")
    parser.add_argument("--cache-dir", default=None, help="where models and runs are cached (default "
                        "$CONSISTENT_DECODING_CACHE/mt_bleu or ~/.cache/consistent-decoding/mt_bleu)")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    parser.add_argument("--name", default="mt_bleu", help="output file stem")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--tiny", action="store_true", help="a tiny model (for tests)")
    parser.add_argument("--no-progress", action="store_true")
    for name, kind in (("train-pairs", int), ("val-pairs", int), ("test-pairs", int), ("vocab-size", int),
                       ("base-seconds", float), ("finetune-seconds", float),
                       ("finetune-validate-seconds", float)):
        parser.add_argument(f"--{name}", type=kind, default=None)
    parser.add_argument("--mgs-num-candidates", type=int, default=None, help="K (default 4)")
    parser.add_argument("--mgs-sigma", type=float, default=None, help="noise scale (default 1.0)")
    parser.add_argument("--mgs-alpha", type=float, default=None, help="inverse temperature (default 100)")
    parser.add_argument("--mgs-mle-share", type=float, default=None,
                        help="pi: share of MLE-centred candidates (default 0.5; 1 = MLE-only, 0 = zero-only)")
    parser.add_argument("--mgs-importance", choices=("reference", "exact"), default=None)
    args = parser.parse_args(argv)
    if len(args.seeds) < 1 or args.threads < 1:
        parser.error("need at least one seed and one thread")
    return args


def cache_root(args: argparse.Namespace, settings: Settings) -> Path:
    if args.cache_dir is not None:
        base = Path(args.cache_dir)
    else:
        base = Path(os.environ.get("CONSISTENT_DECODING_CACHE") or Path.home() / ".cache/consistent-decoding")
        base = base / "mt_bleu"
    return base.expanduser() / cache_key(settings, base_only=True)


def metadata(argv: list[str] | None, settings: Settings, root: Path, notes: list[str]) -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    from sacrebleu.metrics import BLEU, CHRF
    bleu, chrf = BLEU(), CHRF()
    bleu.corpus_score(["a"], [["a"]])
    chrf.corpus_score(["a"], [["a"]])
    arguments = sys.argv[1:] if argv is None else argv
    return {
        "command": " ".join(["python -m benchmarks.mt_bleu", *arguments]), "commit": commit,
        "machine": f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores (shared), "
                   f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "settings": asdict(settings), "cache": str(root),
        "bleu_signature": str(bleu.get_signature()), "chrf_signature": str(chrf.get_signature()),
        "notes": notes,
    }


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = settings_from_args(args)
    root = cache_root(args, settings)
    progress = not args.no_progress
    splits = load_splits(data_folder(args.data_dir), settings)
    print(f"[mt_bleu] cache {root}; train {len(splits['train'])} pairs, val {len(splits['val'])}, "
          f"test {len(splits['test_2016_flickr'])}", flush=True)
    base = train_base(root, splits, settings, progress=progress)
    base_test = evaluate_base(root, splits, progress=progress)
    print(f"[mt_bleu] base: val {base['best_val_bleu']:.2f}, test greedy {base_test['greedy']['bleu']:.2f}, "
          f"beam4 {base_test['beam4']['bleu']:.2f}", flush=True)
    runs = []
    for seed in args.seeds:
        for method in args.methods:
            record = finetune(root, method, seed, splits, settings, progress=progress)
            print(f"[mt_bleu] {method} seed {seed}: {record['updates']} updates, test greedy "
                  f"{record['test']['greedy']['bleu']:.2f}, beam4 {record['test']['beam4']['bleu']:.2f}",
                  flush=True)
            runs.append(record)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = update_time_notes(runs)
    plot_note = plot(runs, base, out / f"{args.name}_val_bleu.png")
    notes += [plot_note] if plot_note else [f"Plot: `{args.name}_val_bleu.png` (validation BLEU against "
                                            "fine-tuning time)."]
    meta = metadata(argv, settings, root, notes)
    rows = summarise(base, base_test, runs)
    payload = {**meta, "rows": rows, "base": {**base, "test": base_test}, "runs": runs}
    write_json(out / f"{args.name}.json", payload)
    (out / f"{args.name}.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))
    return payload


MGS_LOGS = ("cost_before", "cost_expected", "weight_mle", "cosine_mle", "ess")


def update_time_notes(runs: list[dict]) -> list[str]:
    per_method = {m: [r["seconds_per_update"] for r in runs if r["method"] == m] for m in METHODS}
    notes = []
    if per_method["mgs"] and per_method["mle"]:
        ratio = statistics.fmean(per_method["mgs"]) / statistics.fmean(per_method["mle"])
        notes.append(f"MGS / MLE update-time ratio: {ratio:.1f} (K + 1 batched greedy decodes plus one MLE "
                     "forward/backward per MGS update).")
    intervals = [h for r in runs if r["method"] == "mgs" for h in r["history"] if "ess" in h]
    if intervals:
        means = {key: statistics.fmean(h[key] for h in intervals) for key in MGS_LOGS}
        notes.append("MGS diagnostics (mean over updates): cost before the update C(θ) "
                     f"{means['cost_before']:.3f}, importance-weighted candidate cost {means['cost_expected']:.3f}, "
                     f"weight on MLE-centred candidates {means['weight_mle']:.2f}, cosine(Δ*, g) "
                     f"{means['cosine_mle']:.2f}, effective sample size {means['ess']:.2f} of K.")
    return notes


if __name__ == "__main__":
    main()
