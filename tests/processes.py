"""Run a function in N processes joined by the gloo backend, as ``torchrun --nproc-per-node N`` would.

The function must be importable (defined at a module's top level): each process is a fresh interpreter that
imports it. It is called as ``fn(rank, *args)`` after :func:`training.distributed.init_distributed`; return
values are lost, so a test has its processes write what it checks to files.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from training.distributed import init_distributed


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _join_and_run(rank: int, size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(size), RANK=str(rank),
                      LOCAL_RANK=str(rank))  # fmt: skip
    torch.set_num_threads(1)
    ranks = init_distributed("cpu")
    assert (ranks.rank, ranks.size) == (rank, size)
    try:
        fn(rank, *args)
    finally:
        dist.destroy_process_group()


def run_in_processes(fn: Callable[..., Any], size: int, *args: Any) -> None:
    """``fn(rank, *args)`` in ``size`` processes of one gloo group; raises if any of them fails."""
    mp.spawn(_join_and_run, args=(size, _free_port(), fn, args), nprocs=size, join=True)
