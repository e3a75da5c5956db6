"""Padded batches: token-id lists of different lengths stacked into one ``[B, T]`` tensor and its mask.

The one place every batch of the library and its benchmarks is padded: right padding for training batches
and encoder inputs, left padding for the prompts of a decoder-only model (its next token then sits in the
last column of every row). Batches are built on the host; callers move them to their device per step.

Example::

    pad_rows([[5, 6, 7], [8]], pad_token_id=0)               # ids [[5, 6, 7], [8, 0, 0]], mask [[1, 1, 1], [1, 0, 0]]
    pad_rows([[5, 6, 7], [8]], pad_token_id=0, side="left")  # ids [[5, 6, 7], [0, 0, 8]], mask [[1, 1, 1], [0, 0, 1]]
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch

__all__ = ["pad_rows"]


def pad_rows(rows: Sequence[Sequence[int]], *, pad_token_id: int, side: Literal["right", "left"] = "right"
             ) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Stack ``B`` token-id lists into ``input_ids [B, T]`` and ``attention_mask [B, T]`` (``T``: the longest).

    Args:
        rows: at least one list; each with at least one token.
        pad_token_id: the id written into the padding.
        side: ``"right"`` (padding after the tokens) or ``"left"`` (before them).

    Returns:
        ``(input_ids, attention_mask)``, long tensors on the CPU; the mask is 1 on real tokens.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    if len(rows) == 0:
        raise ValueError("rows is empty: a batch needs at least one row")
    width = max(len(row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long, device="cpu")  # host batch
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long, device="cpu")
    for index, row in enumerate(rows):
        if len(row) == 0:
            raise ValueError(f"rows[{index}] is empty: every row needs at least one token")
        columns = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        input_ids[index, columns] = torch.as_tensor(list(row), dtype=torch.long, device="cpu")
        attention_mask[index, columns] = 1
    return input_ids, attention_mask
