"""Several processes on torch's own distributed stack: ``torchrun`` starts them, this module joins them.

Under ``torchrun --nproc-per-node N`` every process runs the same command; :func:`init_distributed` reads
the launcher's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``PORT``) and joins
the process group (NCCL on CUDA, gloo on the CPU). Without a launcher it does nothing, and every helper
below behaves as the one process of a group of one, so the same code runs both ways:

    ranks = init_distributed(device)         # Ranks(rank=0, size=1) without torchrun
    mine = shard(range(len(chunks)), ranks)  # the chunks this process decodes
    parts = gather(decoded, ranks)           # every process's results, in rank order
    if ranks.main:
        save(parts)
    barrier(ranks)

The work is always divided by something that does not depend on the number of processes (a chunk's index,
a prompt's), so a run gives the same numbers under any ``N``, and a run killed under one ``N`` resumes
under another. Training (:func:`training.lm.train_lm`) splits every batch's rows across the processes and
synchronises gradients with :class:`~torch.nn.parallel.DistributedDataParallel`.
"""

from __future__ import annotations

import datetime
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = ["Ranks", "init_distributed", "current_ranks", "local_device", "shard", "gather", "barrier", "all_sum",
           "all_max", "backend_device", "collective_device", "agreed_seconds", "global_mean", "counts_of_all",
           "weight_of_counts", "share_weight", "row_range", "average_gradients"]

T = TypeVar("T")

# Processes wait for one another while one of them trains or writes a report: minutes, not seconds.
WAIT = datetime.timedelta(hours=6)


@dataclass(frozen=True)
class Ranks:
    """This process's place in the group: ``rank`` in ``0 .. size - 1``; ``main`` is rank 0, the one
    that writes files and reports."""

    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def current_ranks() -> Ranks:
    """The group this process belongs to (a group of one when none was joined)."""
    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size())
    return Ranks()


def init_distributed(device: torch.device | str = "cpu") -> Ranks:
    """Join the process group ``torchrun`` set up (once; later calls return the same ranks).

    ``device``: a CUDA device selects NCCL and this process's GPU (``cuda:LOCAL_RANK``, returned by
    :func:`local_device`); anything else gloo. Without ``WORLD_SIZE`` > 1 in the environment: a group of one.
    """
    if dist.is_available() and dist.is_initialized():
        return current_ranks()
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return Ranks()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo", timeout=WAIT)
    return current_ranks()


def local_device(device: torch.device | str) -> torch.device:
    """``device`` for this process: a bare ``cuda`` becomes ``cuda:LOCAL_RANK`` under torchrun."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return device


def shard(items: Sequence[T], ranks: Ranks) -> list[T]:
    """This process's share of ``items``: every ``size``-th one from position ``rank`` (round robin, so
    uneven costs spread out)."""
    return list(items[ranks.rank :: ranks.size])


def gather(value: Any, ranks: Ranks) -> list[Any]:
    """Every process's ``value`` (any picklable object; tensors travel through the host), in rank order,
    on every process."""
    if not ranks.distributed:
        return [value]
    values: list[Any] = [None] * ranks.size
    dist.all_gather_object(values, value)
    return values


def all_sum(values: Sequence[float], ranks: Ranks, *, device: torch.device | str = "cpu") -> list[float]:
    """The sums over processes of each of ``values`` (float64 on ``device``, the backend's device)."""
    if not ranks.distributed:
        return [float(v) for v in values]
    total = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return total.tolist()


def backend_device(device: torch.device | str) -> torch.device:
    """Where collective operations take their tensors: the GPU under NCCL, the host under gloo."""
    device = torch.device(device)
    return device if device.type == "cuda" else torch.device("cpu")


def global_mean(mean: float, count: float, ranks: Ranks, *, device: torch.device | str = "cpu") -> float:
    """The mean over all processes' items of per-process means ``mean`` over ``count`` items each."""
    if not ranks.distributed:
        return float(mean)
    total, items = all_sum([float(mean) * float(count), float(count)], ranks, device=device)
    return total / items if items > 0 else float("nan")


def all_max(values: Sequence[float], ranks: Ranks, *, device: torch.device | str = "cpu") -> list[float]:
    """The largest over processes of each of ``values`` (float64 on ``device``, the backend's device)."""
    if not ranks.distributed:
        return [float(v) for v in values]
    largest = torch.tensor([float(v) for v in values], dtype=torch.float64, device=device)
    dist.all_reduce(largest, op=dist.ReduceOp.MAX)
    return largest.tolist()


def collective_device() -> torch.device:
    """Where this group's collectives take their tensors: this process's GPU under NCCL, else the host."""
    if dist.is_available() and dist.is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def agreed_seconds(seconds: Sequence[float], ranks: Ranks) -> list[float]:
    """Each of ``seconds`` (e.g. an update's wall and CPU time), the largest over the processes: a clock
    every process reads alike, so time budgets stop them all after the same update."""
    return all_max(seconds, ranks, device=collective_device())


def counts_of_all(count: float, ranks: Ranks, *, device: torch.device | str = "cpu") -> list[float]:
    """Every process's ``count`` (e.g. its labelled tokens), in rank order, on every process."""
    counts = [0.0] * ranks.size
    counts[ranks.rank] = float(count)
    return all_sum(counts, ranks, device=device)


def weight_of_counts(counts: Sequence[float], ranks: Ranks) -> float:
    """``size * own count / total`` from every process's count (:func:`counts_of_all`): what this process's
    mean loss is multiplied by so that averaging the gradients over the processes gives the gradient of the
    mean over all of them."""
    total = sum(counts)
    return ranks.size * float(counts[ranks.rank]) / total if total > 0 else 0.0


def share_weight(count: float, ranks: Ranks, *, device: torch.device | str = "cpu") -> float:
    """:func:`weight_of_counts` for this process's ``count`` (1 in a group of one)."""
    if not ranks.distributed:
        return 1.0
    return weight_of_counts(counts_of_all(count, ranks, device=device), ranks)


def row_range(rows: int, ranks: Ranks) -> tuple[int, int]:
    """``(first, stop)``: this process's contiguous block of ``rows`` rows (``torch.tensor_split``'s sizes:
    the first ``rows % size`` blocks one row longer; empty when there are fewer rows than processes)."""
    base, extra = divmod(rows, ranks.size)
    first = ranks.rank * base + min(ranks.rank, extra)
    return first, first + base + (ranks.rank < extra)


def average_gradients(parameters: Sequence[torch.Tensor], ranks: Ranks) -> None:
    """Replace each parameter's ``.grad`` by its mean over the processes (one all-reduce for all of them);
    nothing in a group of one. Every process must hold gradients for the same parameters."""
    if not ranks.distributed:
        return
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    flat = torch.cat([g.reshape(-1).float() for g in grads])
    dist.all_reduce(flat)
    flat /= ranks.size
    offset = 0
    for grad in grads:
        grad.copy_(flat[offset : offset + grad.numel()].view_as(grad))
        offset += grad.numel()


def barrier(ranks: Ranks) -> None:
    """Wait until every process reaches this point (nothing in a group of one)."""
    if ranks.distributed:
        dist.barrier()
