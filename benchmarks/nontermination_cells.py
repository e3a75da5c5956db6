"""Decoders and per-cell metrics for :mod:`benchmarks.nontermination` and :mod:`benchmarks.smollm2_frontier`.

A *cell* is one model decoded with one decoder on the benchmark's prompts. :func:`decode_cell` runs
:func:`decoding.generate` up to ``L`` new tokens and :func:`cell_metrics` turns the generated tokens into
the table's numbers: the non-termination ratio ``r_L``, the mean generated length and its ratio to the
reference continuations', and seq-rep-4. Sampled decoders draw ``R`` independent sample sets in one call
(``num_return_sequences=R``, one seeded generator per chunk of prompts); each set is scored on its own and the table shows the
mean and the spread (sample standard deviation) over the sets. :func:`decode_missing_cells` decodes and
caches the cells a folder lacks (under ``torchrun`` every process decodes its share, rank 0 writes).
"""

from __future__ import annotations

import json
import statistics
import zlib
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import GenerationConfig

from benchmarks.common import say
from decoding.generate import generate
from decoding.metrics import continuation_tokens, length_ratio, mean_seq_rep_n, nontermination_ratio
from training.checkpoint import atomic_write_text
from training.decode import eos_lengths
from training.distributed import Ranks, barrier, current_ranks, gather, row_range, shard

__all__ = [
    "DecoderSpec",
    "DECODERS",
    "CellResult",
    "cell_metrics",
    "cell_file",
    "cell_units",
    "chunk_seed",
    "decode_cell",
    "decode_missing_cells",
    "load_cell",
    "save_cell",
]


@dataclass(frozen=True)
class DecoderSpec:
    """One decoding algorithm, as ``generate`` options.

    Attributes:
        name: the name used on the command line and in the tables.
        sampled: draws at random (scored over several sample sets).
        consistent: keep eos in the candidate set (consistent top-k / nucleus).
        options: ``generate`` keyword options (besides lengths, ids and the generator).
    """

    name: str
    sampled: bool
    consistent: bool = False
    options: dict[str, Any] = field(default_factory=dict)


def _sampler(name: str, *, top_k: int = 0, top_p: float = 1.0, consistent: bool = False) -> DecoderSpec:
    options = {"do_sample": True, "num_beams": 1, "top_k": top_k, "top_p": top_p, "temperature": 1.0}
    return DecoderSpec(name, sampled=True, consistent=consistent, options=options)


def _searcher(name: str, *, num_beams: int) -> DecoderSpec:
    options = {"do_sample": False, "num_beams": num_beams}
    if num_beams > 1:  # the papers' beam search: the first finished hypothesis, unnormalised scores
        options["beam_rule"] = "papers"
    return DecoderSpec(name, sampled=False, options=options)


# top_k=0 everywhere but top-k: transformers would otherwise add its default top_k=50 to every sampler
DECODERS: dict[str, DecoderSpec] = {
    spec.name: spec
    for spec in (
        _sampler("ancestral"),
        _searcher("greedy", num_beams=1),
        _searcher("beam-2", num_beams=2),
        _searcher("beam-4", num_beams=4),
        _sampler("top-k-2", top_k=2),
        _sampler("top-k-4", top_k=4),
        _sampler("nucleus-0.2", top_p=0.2),
        _sampler("nucleus-0.4", top_p=0.4),
        _sampler("consistent-top-k-2", top_k=2, consistent=True),
        _sampler("consistent-top-k-4", top_k=4, consistent=True),
        _sampler("consistent-nucleus-0.2", top_p=0.2, consistent=True),
        _sampler("consistent-nucleus-0.4", top_p=0.4, consistent=True),
    )
}


@dataclass
class CellResult:
    """The numbers of one model x decoder cell.

    Attributes:
        model, decoder: names.
        max_new_tokens: ``L``.
        prompts: number of prompts; sample_sets: ``R`` (1 for greedy and beam search).
        nontermination: ``r_L`` per sample set.
        mean_length: mean generated length per set (eos included; unfinished rows count ``L``).
        length_ratio: mean generated length over mean reference length, per set.
        seq_rep_4: mean seq-rep-4 of the continuations (eos excluded), per set.
        lengths: every row's generated length, set after set (for the length plot).
        seconds: wall time of the decode.
        distinct: share of distinct continuations among the prompts, per set.
        mode_share: share of the prompts whose continuation is the most common one, per set (high: the
            model ignores its prompt and says the same thing whatever it is given).
        unk_share: share of ``<unk>`` among the generated tokens (eos excluded), per set; None when the
            vocabulary has no unknown token.
    """

    model: str
    decoder: str
    max_new_tokens: int
    prompts: int
    sample_sets: int
    nontermination: list[float]
    mean_length: list[float]
    length_ratio: list[float]
    seq_rep_4: list[float]
    lengths: list[int]
    seconds: float = 0.0
    distinct: list[float] = field(default_factory=list)
    unk_share: list[float] | None = None
    mode_share: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, float | None]:
        """Mean and sample standard deviation (None for one set) of each metric over the sample sets."""
        out: dict[str, float | None] = {}
        for name in ("nontermination", "mean_length", "length_ratio", "seq_rep_4", "distinct", "mode_share",
                     "unk_share"):
            values = getattr(self, name)
            if not values:  # cells cached before the metric existed, or no unknown token
                continue
            out[name] = statistics.fmean(values)
            out[f"{name}_std"] = statistics.stdev(values) if len(values) > 1 else None
        return out


def cell_metrics(
    generated: torch.Tensor | Sequence[Sequence[int]],
    *,
    eos_token_id: int,
    max_new_tokens: int,
    reference_lengths: Sequence[int],
    sample_sets: int = 1,
    terminated: torch.Tensor | None = None,
    unk_token_id: int | None = None,
) -> dict[str, list[float] | list[int] | None]:
    """Score generated continuations, one sample set at a time.

    Args:
        generated: ``[N * R, G]`` generated tokens only (no prompt), ``G <= L``, or ``N * R`` token lists;
            rows of one prompt adjacent (``generate``'s layout for ``num_return_sequences=R``). A row
            without eos must hold all ``L`` tokens; rows with eos may be padded after it.
        eos_token_id: the end token.
        max_new_tokens: ``L``, the cap the decode ran with.
        reference_lengths: ``N`` reference continuation lengths (eos included).
        sample_sets: ``R``.
        terminated: optional ``[N * R]`` flags from the decoder, cross-checked against the tokens.
        unk_token_id: the unknown-word token, if the vocabulary has one.

    Returns:
        ``{"nontermination", "mean_length", "length_ratio", "seq_rep_4", "distinct", "mode_share",
        "unk_share"}``: one
        value per sample set (``unk_share`` None without ``unk_token_id``), and ``"lengths"``: every row's
        generated length (eos included), set after set.
    """
    n_prompts = len(reference_lengths)
    if sample_sets < 1:
        raise ValueError(f"sample_sets must be >= 1, got {sample_sets}")
    rows_all = generated.tolist() if isinstance(generated, torch.Tensor) else [list(row) for row in generated]
    if len(rows_all) != n_prompts * sample_sets:
        raise ValueError(
            f"generated has {len(rows_all)} rows, expected {n_prompts} prompts x {sample_sets} sample sets"
        )
    out: dict[str, list | None] = {"nontermination": [], "mean_length": [], "length_ratio": [], "seq_rep_4": [],
                                   "lengths": [], "distinct": [], "mode_share": [],
                                   "unk_share": [] if unk_token_id is not None else None}
    for index in range(sample_sets):
        rows = rows_all[index::sample_sets]  # N rows
        flags = None if terminated is None else terminated[index::sample_sets]
        # no pad_token_id: a row without eos must then span all L tokens, whatever tokens it holds
        out["nontermination"].append(
            nontermination_ratio(rows, eos_token_id=eos_token_id, max_new_tokens=max_new_tokens, terminated=flags)
        )
        with_eos = continuation_tokens(rows, eos_token_id=eos_token_id, keep_eos=True)
        lengths = [len(row) for row in with_eos]
        out["lengths"].extend(lengths)
        out["mean_length"].append(statistics.fmean(lengths))
        out["length_ratio"].append(length_ratio(lengths, reference_lengths))
        without_eos = continuation_tokens(rows, eos_token_id=eos_token_id)
        out["seq_rep_4"].append(mean_seq_rep_n(without_eos, n=4))
        counts = Counter(tuple(row) for row in with_eos)
        out["distinct"].append(len(counts) / len(with_eos))
        out["mode_share"].append(counts.most_common(1)[0][1] / len(with_eos))
        if unk_token_id is not None:
            generated_tokens = sum(len(row) for row in without_eos)
            unknown = sum(row.count(unk_token_id) for row in without_eos)
            out["unk_share"].append(unknown / generated_tokens if generated_tokens else 0.0)
    return out


def cell_seed(seed: int, model: str, decoder: str) -> int:
    """A stable per-cell seed (crc32, not ``hash``: the same in every process)."""
    return (seed * 1_000_003 + zlib.crc32(f"{model}/{decoder}".encode())) % (2**63)


def chunk_seed(seed: int, model: str, decoder: str, first_prompt: int) -> int:
    """The seed of the sampled chunk that starts at prompt ``first_prompt``: a chunk draws the same numbers
    whichever process decodes it and whatever was decoded before it."""
    return (cell_seed(seed, model, decoder) * 1_000_003 + first_prompt) % (2**63)


def _model_device(model: Any) -> torch.device:
    """Where ``model``'s parameters are; the CPU for a step model without any."""
    if isinstance(model, torch.nn.Module):
        for parameter in model.parameters():
            return parameter.device
    return torch.device("cpu")


def cell_units(prompts: int, *, sampled: bool, batch_size: int, ranks: Ranks) -> list[tuple[int, int]]:
    """The ``(first, stop)`` prompt ranges this process decodes, in order.

    A sampled decoder goes by chunks of ``batch_size`` prompts, dealt round robin (each chunk has its own
    seed, :func:`chunk_seed`); greedy and beam search take one contiguous block of the prompts per process
    and decode it in one call with continuous batching (their output does not depend on the batch).
    """
    if sampled:
        return shard([(first, min(first + batch_size, prompts)) for first in range(0, prompts, batch_size)], ranks)
    first, stop = row_range(prompts, ranks)
    return [(first, stop)] if first < stop else []


def decode_cell(
    model: Any,
    prompts: torch.Tensor,
    *,
    model_name: str,
    decoder: DecoderSpec,
    eos_token_id: int,
    pad_token_id: int,
    max_new_tokens: int,
    reference_lengths: Sequence[int],
    sample_sets: int,
    seed: int,
    batch_size: int,
    progress: bool = True,
    unk_token_id: int | None = None,
    ranks: Ranks | None = None,
) -> CellResult:
    """Decode ``prompts [N, P]`` (unpadded, all of length ``P``) with one decoder and score the result.

    A sampled decoder takes the prompts in chunks of ``batch_size`` and draws ``sample_sets`` continuations
    per prompt in the same call, each chunk from its own generator (:func:`chunk_seed`). Greedy and beam
    search take all prompts in one call with continuous batching (``max_batch_size`` = ``batch_size``
    prompts' rows): a finished prompt's rows are refilled at once instead of idling until the chunk's
    longest row ends, with the tokens each prompt gets on its own.

    ``ranks``: under ``torchrun``, the processes share the prompts (:func:`cell_units`) and every process
    returns the whole cell, the same as one process would (default: :func:`current_ranks`).
    """
    import time

    ranks = ranks or current_ranks()
    sets = sample_sets if decoder.sampled else 1
    device = _model_device(model)
    config = GenerationConfig(eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    refill = None if decoder.sampled else batch_size * decoder.options.get("num_beams", 1)
    start = time.perf_counter()
    decoded = {}
    for first, stop in cell_units(prompts.shape[0], sampled=decoder.sampled, batch_size=batch_size, ranks=ranks):
        input_ids = prompts[first:stop].to(device)
        generator = torch.Generator().manual_seed(chunk_seed(seed, model_name, decoder.name, first))
        out = generate(
            model, input_ids, torch.ones_like(input_ids), generation_config=config, consistent=decoder.consistent,
            generator=generator, progress=progress and ranks.main, max_new_tokens=max_new_tokens,
            min_new_tokens=0, num_return_sequences=sets, return_dict_in_generate=True, max_batch_size=refill,
            **decoder.options,
        )  # fmt: skip
        generated = out.sequences[:, input_ids.shape[1] :]
        padded = torch.nn.functional.pad(generated, (0, max_new_tokens - generated.shape[1]), value=pad_token_id)
        decoded[first] = (padded.cpu(), out.terminated.cpu())
    parts = {first: part for shares in gather(decoded, ranks) for first, part in shares.items()}
    # prompt-major rows (each prompt's sets side by side), in prompt order
    generated = torch.cat([parts[first][0] for first in sorted(parts)])
    terminated = torch.cat([parts[first][1] for first in sorted(parts)])
    metrics = cell_metrics(
        _strip_fill(generated, eos_token_id), eos_token_id=eos_token_id, max_new_tokens=max_new_tokens,
        reference_lengths=reference_lengths, sample_sets=sets, terminated=terminated, unk_token_id=unk_token_id,
    )  # fmt: skip
    return CellResult(
        model=model_name, decoder=decoder.name, max_new_tokens=max_new_tokens, prompts=len(reference_lengths),
        sample_sets=sets, seconds=time.perf_counter() - start, **metrics,
    )  # fmt: skip


def decode_missing_cells(
    model: Any, prompts: torch.Tensor, *, model_name: str, decoders: Sequence[str], folder: Path, eos_token_id: int,
    pad_token_id: int, max_new_tokens: int, reference_lengths: Sequence[int], sample_sets: int, seed: int,
    batch_size: int, progress: bool = True, unk_token_id: int | None = None,
) -> None:  # fmt: skip
    """Decode (:func:`decode_cell`) and save every cell of ``model_name`` x ``decoders`` (names in
    :data:`DECODERS`) that ``folder`` lacks, and say each one's numbers.

    Under ``torchrun`` every process decodes its share of each cell's prompts, rank 0 writes the cell and every
    process waits for the file (so a later look at the folder finds the same cells everywhere).
    """
    ranks = current_ranks()
    for decoder in decoders:
        path = cell_file(folder, model_name, decoder)
        if path.is_file():
            continue
        result = decode_cell(
            model, prompts, model_name=model_name, decoder=DECODERS[decoder], eos_token_id=eos_token_id,
            pad_token_id=pad_token_id, max_new_tokens=max_new_tokens, reference_lengths=reference_lengths,
            sample_sets=sample_sets, seed=seed, batch_size=batch_size, progress=progress, unk_token_id=unk_token_id,
            ranks=ranks,
        )  # fmt: skip
        if ranks.main:
            save_cell(result, path)
        barrier(ranks)
        summary = result.summary()
        say(f"[cell] {model_name} / {decoder}: r_L={summary['nontermination']:.3f} "
            f"len={summary['mean_length']:.1f} ({result.seconds:.0f} s)")  # fmt: skip


def _strip_fill(generated: torch.Tensor, eos_token_id: int) -> list[list[int]]:
    """Rows as lists: finished rows up to their eos, unfinished rows whole (they span all L tokens)."""
    lengths, _ = eos_lengths(generated, eos_token_id)
    return [row[:length] for row, length in zip(generated.tolist(), lengths.tolist())]


# How sampled cells draw their random numbers, in their file names so that a cache never mixes schemes:
# 1 (unnamed) - one generator per cell, running on across chunks; 2 - one generator per chunk of prompts
# (:func:`chunk_seed`), the same under any number of processes.
SAMPLED_DRAWS = 2


def cell_file(folder: Path, model: str, decoder: str) -> Path:
    """Where the cell ``model`` x ``decoder`` is cached in ``folder``."""
    suffix = f".draws{SAMPLED_DRAWS}" if DECODERS[decoder].sampled else ""
    return Path(folder) / f"{model}__{decoder}{suffix}.json"


def save_cell(result: CellResult, path: Path) -> None:
    """Write a cell's result as JSON, atomically."""
    atomic_write_text(path, json.dumps(result.__dict__))


def load_cell(path: Path) -> CellResult | None:
    """A cell saved by :func:`save_cell`, or None when there is none."""
    if not path.is_file():
        return None
    return CellResult(**json.loads(path.read_text()))
