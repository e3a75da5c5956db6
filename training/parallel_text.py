"""Parallel text: reading aligned files, encoding them, and batching them reproducibly.

A :class:`Batch` is what every update step (MLE, MGS, MRT, PG) consumes: the source side as the model's
encoder input (or a decoder-only model's prompt), the target side as token ids ending in eos, and the raw
reference strings that task costs such as BLEU compare against.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from .padding import pad_rows

__all__ = ["ParallelText", "Batch", "read_parallel", "encode_parallel", "EncodedParallel",
           "make_batch", "epoch_batches"]


@dataclass(frozen=True)
class ParallelText:
    """Aligned sentence pairs: ``sources[i]`` translates to ``targets[i]``."""

    sources: tuple[str, ...]
    targets: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.sources)

    def head(self, count: int) -> "ParallelText":
        """The first ``count`` pairs."""
        return ParallelText(self.sources[:count], self.targets[:count])


def _read_lines(path: Path) -> list[str]:
    if not path.is_file():
        raise FileNotFoundError(f"parallel file {path} does not exist")
    with path.open(encoding="utf-8") as handle:
        return [line.rstrip("\n").rstrip("\r") for line in handle]


def read_parallel(source_path: str | Path, target_path: str | Path) -> ParallelText:
    """Read two line-aligned files (one sentence per line).

    Raises:
        ValueError: a file is empty, the files have different numbers of lines, or a line is blank on
            one side only (a sign of misalignment).
    """
    source_path, target_path = Path(source_path), Path(target_path)
    sources, targets = _read_lines(source_path), _read_lines(target_path)
    for path, lines in ((source_path, sources), (target_path, targets)):
        if not any(line.strip() for line in lines):
            raise ValueError(f"parallel file {path} is empty")
    if len(sources) != len(targets):
        raise ValueError(
            f"misaligned parallel files: {source_path} has {len(sources)} lines but {target_path} has "
            f"{len(targets)}"
        )
    for number, (source, target) in enumerate(zip(sources, targets), start=1):
        if bool(source.strip()) != bool(target.strip()):
            raise ValueError(
                f"misaligned parallel files: line {number} is blank in one of {source_path}, {target_path} "
                "but not in the other"
            )
    pairs = [(s, t) for s, t in zip(sources, targets) if s.strip()]
    return ParallelText(tuple(s for s, _ in pairs), tuple(t for _, t in pairs))


@dataclass(frozen=True)
class EncodedParallel:
    """Token ids of a :class:`ParallelText`; every sequence ends with eos."""

    source_ids: tuple[tuple[int, ...], ...]
    target_ids: tuple[tuple[int, ...], ...]
    text: ParallelText
    pad_token_id: int


def encode_parallel(text: ParallelText, tokenizer, *, max_length: int = 64) -> EncodedParallel:
    """Tokenise both sides, cut each to ``max_length - 1`` tokens and append eos."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    if len(text) == 0:
        raise ValueError("text: no sentence pairs to encode")
    eos = tokenizer.eos_token_id

    def encode(lines: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        ids = tokenizer(list(lines), add_special_tokens=False)["input_ids"]
        return tuple(tuple(row[: max_length - 1]) + (eos,) for row in ids)

    return EncodedParallel(encode(text.sources), encode(text.targets), text, tokenizer.pad_token_id)


@dataclass(frozen=True)
class Batch:
    """One minibatch.

    Attributes:
        source_ids: ``[B, S]`` source tokens: right-padded encoder input, or a decoder-only model's
            left-padded prompt.
        source_mask: ``[B, S]`` 1 on real tokens.
        target_ids: ``[B, T]`` right-padded target tokens, each row ending with eos.
        target_mask: ``[B, T]`` 1 on real tokens (eos included).
        references: the ``B`` raw target sentences.
        whole_longest_target: on a share of a batch (:meth:`rows`), the longest target of the whole batch,
            which caps decoding as it would for the whole batch; None on a whole batch.
        first_row, whole_rows: on a share, where its rows start in the whole batch and how many that has
            (sampling draws what the whole batch's rows draw: :attr:`share`); 0 and None on a whole batch.
    """

    source_ids: torch.LongTensor
    source_mask: torch.LongTensor
    target_ids: torch.LongTensor
    target_mask: torch.LongTensor
    references: tuple[str, ...]
    whole_longest_target: int | None = None
    first_row: int = 0
    whole_rows: int | None = None

    def __len__(self) -> int:
        return self.source_ids.shape[0]

    @property
    def longest_target(self) -> int:
        """Tokens of the longest target (eos included) of the whole batch this one is or is part of."""
        if self.whole_longest_target is not None:
            return self.whole_longest_target
        return int(self.target_mask.sum(1).max())

    @property
    def share(self) -> tuple[int, int] | None:
        """``(first_row, whole_rows)`` on a share of a batch (``generate``'s ``prompt_share``), else None."""
        return None if self.whole_rows is None else (self.first_row, self.whole_rows)

    def rows(self, first: int, stop: int) -> "Batch":
        """Rows ``first .. stop - 1``, padded as in the whole batch (one process's share under torchrun)."""
        if not 0 <= first <= stop <= len(self):
            raise ValueError(f"rows({first}, {stop}): need 0 <= first <= stop <= {len(self)}")
        whole_rows = len(self) if self.whole_rows is None else self.whole_rows
        return Batch(self.source_ids[first:stop], self.source_mask[first:stop], self.target_ids[first:stop],
                     self.target_mask[first:stop], self.references[first:stop], self.longest_target,
                     self.first_row + first, whole_rows)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.source_ids.to(device), self.source_mask.to(device), self.target_ids.to(device),
                     self.target_mask.to(device), self.references, self.whole_longest_target, self.first_row,
                     self.whole_rows)


def make_batch(data: EncodedParallel, indices: Sequence[int], *, left_pad_source: bool = False) -> Batch:
    """The batch of pairs ``indices``: targets right-padded; sources right-padded (encoder input) or,
    with ``left_pad_source``, left-padded (prompts of a decoder-only model)."""
    if len(indices) == 0:
        raise ValueError("indices: a batch needs at least one pair")
    source_ids, source_mask = pad_rows([data.source_ids[i] for i in indices], pad_token_id=data.pad_token_id,
                                       side="left" if left_pad_source else "right")  # [B, S] each, on the host
    target_ids, target_mask = pad_rows([data.target_ids[i] for i in indices], pad_token_id=data.pad_token_id)
    return Batch(source_ids, source_mask, target_ids, target_mask,
                 tuple(data.text.targets[i] for i in indices))


def epoch_batches(data: EncodedParallel, *, batch_size: int, epoch: int, seed: int,
                  bucket_factor: int = 50) -> list[list[int]]:
    """Index lists of one epoch's batches: shuffled, length-bucketed, reproducible from (seed, epoch).

    Pairs are shuffled, cut into buckets of ``bucket_factor * batch_size``, sorted by source length
    inside each bucket (less padding), split into batches, and the batches shuffled again.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(len(data.source_ids), generator=generator, device="cpu").tolist()
    bucket = batch_size * bucket_factor
    batches: list[list[int]] = []
    for start in range(0, len(order), bucket):
        chunk = sorted(order[start: start + bucket], key=lambda i: len(data.source_ids[i]))
        batches.extend(chunk[i: i + batch_size] for i in range(0, len(chunk), batch_size))
    shuffle = torch.randperm(len(batches), generator=generator, device="cpu").tolist()
    return [batches[i] for i in shuffle]
