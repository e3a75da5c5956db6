"""Which SmolLM2 fine-tune stops where it should, at what perplexity? The ST / NMST / MGS frontier.

    python -m benchmarks.smollm2_frontier [--data-dir ../shared/data] [--out DIR] [--cache-dir DIR] [--seed 0]
        [--models 'ft-st-*'] [--threads N] [--no-progress] [--report-only] [--list]
        [--device cuda] [--dtype auto|float32|bfloat16]
    torchrun --nproc-per-node N -m benchmarks.smollm2_frontier ...   # N processes (gloo on CPUs, NCCL on GPUs)

SmolLM2-135M-Instruct (:mod:`benchmarks.smollm2`: WikiText-2 lines, first 10 tokens = prompt,
the top ``train_layers`` layers, final norm and eos row trained over frozen lower layers) is fine-tuned from
the same weights on the same train lines in the same order, one pass of ``finetune_tokens`` tokens each:

- ``ft-vanilla``: the softmax head;
- ``ft-st-<eps>`` and ``ft-nmst-<eps>`` for every eps of the sweep;
- two continuations of ``ft-vanilla`` with the same budget of update time (process CPU time, steady on a
  shared machine): ``ft-vanilla+mle`` (more MLE passes) and ``ft-vanilla+mgs`` (MLE-guided parameter search
  against a sequence cost on greedy decodes of short train lines; :class:`training.prompt_costs.PromptTask`).

Every model is scored by test perplexity (continuations after 10 tokens) and decoded from the same test
prompts with greedy and consistent nucleus-0.4 to L = 1,000 new tokens: r_L, mean length ratio to the
reference, seq-rep-4 (:mod:`benchmarks.nontermination_cells`). Report: ``smollm2-frontier.{md,json,png}``
(:mod:`benchmarks.smollm2_frontier_report`). Fine-tunes (checkpointed), records and decoded cells are cached
atomically under ``$CONSISTENT_DECODING_CACHE/smollm2-frontier/<settings hash>``, so an interrupted run
resumes where it stopped.

Under ``torchrun`` the processes share every batch's rows (:class:`benchmarks.smollm2.SmolLM2Bench`), the MGS
prompts and each cell's prompts, so fine-tunes, perplexities and cells are a one-process run's (to float
rounding) and rank 0 writes the cache, which any number of processes resumes. The continuations' CPU-time
budget counts each update at the slowest process's time, so it buys more updates with more processes, and
on a GPU (``--device``; not part of the cache key) more than on the CPU: their records carry the process
count and the device type, and the report refuses to mix either.

Cost on this 2-core CPU, estimated (not yet run) from the committed quick run and short measurements taken
while another job loaded the machine (so on the slow side): a fine-tune step costs 0.80 / 0.98 / 1.35 ms per
token when training the top 2 / 4 / 8 layers (bf16, ~2k-token batches; the quick run's 2-layer fine-tunes
took 1.2-1.45 ms per token with 1k-token batches and optimizer steps included), so nine 200k-token fine-tunes
over 4 layers take about 35 min (8 layers: about 11 min more); the frozen layers' passes about 4 min;
eleven perplexities about 4 min; the two continuations 2 x 1,200 CPU s, about 21 min. Decoding 64 prompts
took 0.34 s per step (0.58 s for 128 rows), about 410 s for a cell whose rows all run to L = 1,000; with the
quick run's lengths (vanilla-like models 70 % greedy / 30 % nucleus rows to L, eps = 1e-3 greedy stops near
650 tokens and nucleus near 35) and the smaller eps assumed vanilla-like, the 22 cells take about 75 min.
Expected total about 2.3 h; the worst case (every row of every model to L) about 3.6 h, finished by a
second, resumed invocation.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch

from benchmarks import smollm2
from benchmarks.common import (REPO, add_run_arguments, cache_root, command_line, format_epsilon, open_run_folder,
                               run_environment, say, select, set_threads, settings_key, write_json)
from benchmarks.datasets import add_data_arguments
from benchmarks.devices import add_device_arguments, resolve_device, training_bf16
from benchmarks.nontermination_cells import DECODERS, CellResult, cell_file, decode_missing_cells, load_cell
from benchmarks.smollm2 import CONTEXT_LEN, Head, SmolLM2Bench, SmolSettings
from training.distributed import barrier, current_ranks, init_distributed, local_device, row_range
from training.mgs import MGSConfig, MGSStep
from training.prompt_costs import TOKEN_COSTS, Prompts, PromptTask, PromptTaskBatch, mean_cost

VANILLA, MLE_CONTINUATION, MGS_CONTINUATION = "ft-vanilla", "ft-vanilla+mle", "ft-vanilla+mgs"


@dataclass(frozen=True)
class ContinuationSettings:
    """The two continuations of ``ft-vanilla`` (MLE and MGS) at equal update time.

    Attributes:
        cpu_seconds: process CPU time of each continuation's updates (with 2 threads about twice wall time).
        max_updates: an extra cap on updates (None: the time budget alone).
        mgs: K, sigma, alpha, pi and the rest of MGS.
        cost: token-level costs averaged into the MGS cost (:data:`training.prompt_costs.TOKEN_COSTS`).
        decode_rows: train-line prompts greedily decoded per MGS cost evaluation.
        max_reference_tokens: only train lines whose continuation (eos included) is at most this long feed the
            MGS decodes, so their length cap stays small.
        length_factor: the decodes' cap is ``ceil(factor * longest reference)`` new tokens.
    """

    cpu_seconds: float = 1200.0
    max_updates: int | None = None
    mgs: MGSConfig = MGSConfig()
    cost: tuple[str, ...] = ("nontermination", "repetition")
    decode_rows: int = 16
    max_reference_tokens: int = 48
    length_factor: float = 1.5

    def __post_init__(self) -> None:
        if not self.cpu_seconds > 0 or (self.max_updates is not None and self.max_updates < 1):
            raise ValueError(f"cpu_seconds must be > 0 and max_updates >= 1, got {self.cpu_seconds}, {self.max_updates}")
        if not self.cost or any(name not in TOKEN_COSTS for name in self.cost):
            raise ValueError(f"cost must name token-level costs {TOKEN_COSTS}, got {self.cost}")
        if self.decode_rows < 1 or self.max_reference_tokens < 1 or not self.length_factor > 0:
            raise ValueError("decode_rows, max_reference_tokens and length_factor must be positive")


@dataclass(frozen=True)
class FrontierSettings:
    """Everything that decides the numbers (hashed into the cache key). ``smol.epsilon`` is unused here."""

    smol: SmolSettings = SmolSettings(prompts=64, eval_lines=400, finetune_tokens=200_000, train_layers=4, lr=1e-4,
                                      batch_tokens=2048)  # fmt: skip
    epsilons: tuple[float, ...] = (1e-3, 3e-4, 1e-4, 1e-5)
    continuation: ContinuationSettings = ContinuationSettings()
    max_new_tokens: int = 1000
    decoders: tuple[str, ...] = ("greedy", "consistent-nucleus-0.4")
    sample_sets: int = 1
    batch_prompts: int = 64
    seed: int = 0
    version: int = 1  # bump when a code change alters the numbers, so cached results are not reused

    def __post_init__(self) -> None:
        unknown = [d for d in self.decoders if d not in DECODERS]
        if unknown:
            raise ValueError(f"unknown decoders {unknown}; choose from {', '.join(DECODERS)}")
        if not self.epsilons or self.max_new_tokens < 1 or self.sample_sets < 1 or self.batch_prompts < 1:
            raise ValueError("epsilons must be non-empty; max_new_tokens, sample_sets, batch_prompts >= 1")


def finetune_heads(settings: FrontierSettings) -> dict[str, Head]:
    """The fine-tunes from the pretrained weights: name -> head, vanilla first, then ST / NMST per eps."""
    heads = {VANILLA: Head()}
    for epsilon in settings.epsilons:
        for kind in ("st", "nmst"):
            heads[f"ft-{kind}-{format_epsilon(epsilon)}"] = Head(kind, epsilon)
    return heads


def all_models(settings: FrontierSettings) -> list[str]:
    return [*finetune_heads(settings), MLE_CONTINUATION, MGS_CONTINUATION]


def cache_key(settings: FrontierSettings) -> str:
    return settings_key(settings)


def default_cache_dir() -> Path:
    return cache_root() / "smollm2-frontier"


# ------------------------------------------------------------------------------------ continuations
def decode_pool(bench: SmolLM2Bench, settings: ContinuationSettings, *, seed: int) -> list[list[int]]:
    """Train lines short enough for the MGS decodes, in a seeded order (raises if there are none)."""
    limit = CONTEXT_LEN + settings.max_reference_tokens
    pool = [line for line in bench.data.train if len(line) <= limit]
    if not pool:
        raise ValueError(f"no train line has a continuation of at most {settings.max_reference_tokens} tokens: "
                         "raise continuation.max_reference_tokens")  # fmt: skip
    random.Random(seed).shuffle(pool)
    return pool


def prompts_for_update(pool: list[list[int]], step: int, rows: int) -> Prompts:
    """The ``step``-th group of ``rows`` lines of ``pool`` (cycling) as prompts with reference lengths, on the
    host (the task's decode moves them to the model)."""
    rows = min(rows, len(pool))
    lines = [pool[(step * rows + offset) % len(pool)] for offset in range(rows)]
    return Prompts(torch.tensor([line[:CONTEXT_LEN] for line in lines], dtype=torch.long, device="cpu"),
                   torch.tensor([len(line) - CONTEXT_LEN for line in lines], dtype=torch.long, device="cpu"))  # fmt: skip


def continuation_order(bench: SmolLM2Bench, *, seed: int, passes: int = 1000) -> list[int]:
    """Further passes over the train batches, each in a fresh seeded order (the fine-tune used pass 0)."""
    count = bench.train_batch_count()
    order = []
    for index in range(1, passes + 1):
        order += torch.randperm(count, generator=torch.Generator().manual_seed(seed + index), device="cpu").tolist()
    return order


def mgs_update(bench: SmolLM2Bench, settings: ContinuationSettings, *, seed: int):
    """The MGS update of the vanilla head: MLE direction on the train batch, cost on short lines' decodes.

    Under ``torchrun`` each process takes its rows of the train batch and its block of the prompts, and
    :class:`~training.mgs.MGSStep` averages the gradient and the costs: the one-process update."""
    head, ranks = Head(), current_ranks()

    def loss(model: torch.nn.Module, index: int) -> torch.Tensor:
        nll, count = bench.train_batch_nll(index, head)
        return nll / max(count, 1)  # 0 rows here under torchrun: 0, weighted 0

    task = PromptTask(loss=loss, eos_token_id=bench.eos, pad_token_id=bench.eos, cost=mean_cost(settings.cost),
                      max_length_factor=settings.length_factor,
                      weight=lambda index: bench.train_batch_tokens(index, share=True))  # fmt: skip
    step_rule, pool = MGSStep(task, settings.mgs), decode_pool(bench, settings, seed=seed)
    rows = min(settings.decode_rows, len(pool))
    if rows < ranks.size:
        raise ValueError(f"{rows} prompts per MGS update cannot be shared by {ranks.size} processes: raise "
                         "continuation.decode_rows or use fewer processes")

    def update(step: int, index: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
        prompts = prompts_for_update(pool, step, settings.decode_rows)
        batch = PromptTaskBatch(index, prompts)
        if ranks.distributed:
            batch = batch.rows(*row_range(len(prompts), ranks))
        logs = step_rule(bench.model, batch, optimizer, generator=generator)
        count = bench.train_batch_tokens(index)
        return {"nll": logs["mle_loss"] * count, "tokens": count, "max_new_tokens": task.max_new_tokens(prompts), **logs}

    return update


def run_continuation(bench: SmolLM2Bench, name: str, base: dict, settings: FrontierSettings) -> dict:
    """``ft-vanilla+mle`` or ``ft-vanilla+mgs`` from ``ft-vanilla``'s weights (loaded), or its cached record."""
    record_path = bench.folder / f"{name}.json"
    if not (record_path.is_file() and (bench.folder / f"{name}.pt").is_file()):
        config, seed = settings.continuation, settings.seed
        order = continuation_order(bench, seed=seed)
        if config.max_updates is not None:
            order = order[: config.max_updates]
        update = bench.mle_update(Head()) if name == MLE_CONTINUATION else mgs_update(bench, config, seed=seed)
        counts = bench.train_updates(name, start=bench.weights(), order=order, update=update,
                                     max_cpu_seconds=config.cpu_seconds)  # fmt: skip
        record = {
            **base, "test_perplexity": bench.perplexity(Head()), "start": VANILLA,
            "method": "mle" if name == MLE_CONTINUATION else "mgs",
            "continuation": {"budget_cpu_seconds": config.cpu_seconds, "max_updates": config.max_updates,
                             "processes": current_ranks().size, "device": bench.model.device.type,
                             "updates": counts["steps"], "tokens": counts["tokens"], "seconds": counts["seconds"],
                             "cpu_seconds": counts["cpu_seconds"], "train_loss": counts["train_loss"],
                             "stopped_by": counts["stopped_by"]},
        }  # fmt: skip
        if name == MGS_CONTINUATION:
            record["continuation"]["mgs_logs"] = [
                {key: log[key] for key in ("cost_before", "cost_best", "weight_mle", "ess", "mle_loss", "max_new_tokens")}
                for log in counts["logs"]
            ]  # fmt: skip
        bench.finish(name, record)
    bench.load_weights(name)
    return json.loads(record_path.read_text())


# ----------------------------------------------------------------------------------------------- run
@dataclass
class FrontierResult:
    """What :func:`run_frontier` gathered: model records and cells, in table order."""

    settings: FrontierSettings
    records: dict[str, dict] = field(default_factory=dict)
    cells: list[CellResult] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    evaluation_lengths: list[int] | None = None  # scored tokens per perplexity line (t counts them)


def _decode_missing(bench: SmolLM2Bench, name: str, head: Head, root: Path, settings: FrontierSettings,
                    progress: bool) -> None:  # fmt: skip
    decode_missing_cells(
        bench.decodable(head), bench.data.prompts, model_name=name, decoders=settings.decoders, folder=root / "cells",
        eos_token_id=bench.eos, pad_token_id=bench.eos, max_new_tokens=settings.max_new_tokens,
        reference_lengths=bench.data.reference_lengths, sample_sets=settings.sample_sets, seed=settings.seed,
        batch_size=settings.batch_prompts, progress=progress,
    )  # fmt: skip


def _missing_work(name: str, root: Path, settings: FrontierSettings) -> bool:
    cells = all(cell_file(root / "cells", name, d).is_file() for d in settings.decoders)
    return not (cells and (root / "models" / f"{name}.json").is_file())


def _compute(settings: FrontierSettings, models: list[str], *, root: Path, data_dir: str | None, progress: bool,
             device: torch.device) -> None:  # fmt: skip
    """Fine-tune, continue and decode whatever the cache lacks, model by model (vanilla first), on ``device``."""
    heads = finetune_heads(settings)
    wanted = [name for name in all_models(settings) if name in models and _missing_work(name, root, settings)]
    if not wanted:
        return
    model, tokenizer = smollm2.load_smollm2(device=device)
    data = smollm2.load_smol_data(data_dir, tokenizer, settings.smol, seed=settings.seed)
    ranks = current_ranks()
    if ranks.main:
        write_json(root / "evaluation_lengths.json", [len(line) - CONTEXT_LEN for line in data.evaluation])
    barrier(ranks)
    bench = SmolLM2Bench(model, tokenizer, settings.smol, data, folder=root / "models", seed=settings.seed,
                         progress=progress)  # fmt: skip
    for name in wanted:
        if name in heads:
            bench.finetune(name, heads[name])
            _decode_missing(bench, name, heads[name], root, settings, progress)
            continue
        base = bench.finetune(VANILLA, heads[VANILLA])  # the starting point (cached after its first run)
        run_continuation(bench, name, base, settings)
        _decode_missing(bench, name, Head(), root, settings, progress)


def run_frontier(settings: FrontierSettings, *, data_dir: str | None, cache_dir: Path, models: list[str],
                 progress: bool = True, compute: bool = True, device: torch.device | str = "cpu") -> FrontierResult:  # fmt: skip
    """Compute what the cache lacks for ``models`` (unless ``compute`` is False) on ``device`` (not part of
    the cache key) and gather the results."""
    root = Path(cache_dir) / cache_key(settings)
    open_run_folder(root, settings)
    if compute:
        _compute(settings, models, root=root, data_dir=data_dir, progress=progress, device=torch.device(device))
    result = FrontierResult(settings)
    if (root / "evaluation_lengths.json").is_file():
        result.evaluation_lengths = json.loads((root / "evaluation_lengths.json").read_text())
    for name in [n for n in all_models(settings) if n in models]:
        record_file = root / "models" / f"{name}.json"
        if record_file.is_file():
            result.records[name] = json.loads(record_file.read_text())
        for decoder in settings.decoders:
            cell = load_cell(cell_file(root / "cells", name, decoder))
            if cell is None:
                result.missing.append(f"{name} / {decoder}")
            else:
                result.cells.append(cell)
    return result


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.smollm2_frontier",
                                     description="Perplexity vs r_L of SmolLM2 fine-tunes: vanilla, ST/NMST eps sweep, MGS.")
    add_data_arguments(parser)
    add_run_arguments(parser, cache_dir=default_cache_dir(), out_dir=REPO / "benchmarks" / "results")
    add_device_arguments(parser)
    parser.add_argument("--list", action="store_true", help="print the model names and exit")
    return parser


def main(argv: list[str] | None = None, *, settings: FrontierSettings | None = None) -> FrontierResult:
    """Command-line entry point; ``settings`` overrides the defaults (tests)."""
    from benchmarks.smollm2_frontier_report import write_report

    parser = build_parser()
    args = parser.parse_args(argv)
    settings = replace(settings or FrontierSettings(), seed=args.seed)
    try:
        device = local_device(resolve_device(args.device))
        bf16 = training_bf16(args.dtype, device, tier=settings.smol.train_bf16)
    except ValueError as error:
        parser.error(str(error))
    ranks = init_distributed(device)  # a group of one without torchrun
    settings = replace(settings, smol=replace(settings.smol, train_bf16=bf16))
    set_threads(parser, args.threads)
    if args.list:
        print("models:", ", ".join(all_models(settings)))
        raise SystemExit(0)
    try:
        models = select(args.models, all_models(settings), what="models")
    except ValueError as error:
        parser.error(str(error))
    start = time.perf_counter()
    result = run_frontier(settings, data_dir=args.data_dir, cache_dir=args.cache_dir or default_cache_dir(),
                          models=models, progress=not args.no_progress, compute=not args.report_only,
                          device=device)  # fmt: skip
    if not ranks.main:
        return result
    command = command_line("benchmarks.smollm2_frontier", argv)
    written = write_report(args.out, result, command=command, env=run_environment(), wall_seconds=time.perf_counter() - start)
    say("wrote " + ", ".join(str(path) for path in written))
    return result


if __name__ == "__main__":
    main()
