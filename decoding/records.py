"""Per-step scores and logits kept for ``output_scores`` / ``output_logits``, shaped as transformers returns them."""

from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["StepRecord", "concat_steps"]


class StepRecord:
    """``[V]`` vectors per (row, step), recorded while rows come and go, assembled into a tuple over steps of
    ``[N, V]`` tensors; a row's entries after it left the batch (or before it joined) are ``-inf``."""

    def __init__(self) -> None:
        self._rows: list[torch.LongTensor] = []
        self._steps: list[torch.LongTensor] = []
        self._values: list[torch.Tensor] = []

    def add(self, rows: torch.LongTensor, steps: torch.LongTensor, values: torch.Tensor) -> None:
        """``values [n, V]`` of ``rows [n]`` at their step ``steps [n]`` (0 = first generated token); copied."""
        self._rows.append(rows.clone())
        self._steps.append(steps.clone())
        self._values.append(values.float().clone())

    def assemble(self, n_rows: int) -> tuple[torch.Tensor, ...]:
        """One ``[n_rows, V]`` tensor per step, up to the last step recorded."""
        if not self._values:
            return ()
        values = torch.cat(self._values)
        rows, steps = torch.cat(self._rows), torch.cat(self._steps)
        out = values.new_full((int(steps.max()) + 1, n_rows, values.shape[-1]), float("-inf"))
        out[steps, rows] = values
        return tuple(out.unbind(0))


def concat_steps(parts: Sequence[tuple[torch.Tensor, ...]], rows: Sequence[int]) -> tuple[torch.Tensor, ...]:
    """The step tuples of consecutive chunks (``rows[i]`` rows each) as one tuple over the longest run."""
    n_steps = max(len(part) for part in parts)
    vocab = next(part[0].shape[-1] for part in parts if part)
    reference = next(part[0] for part in parts if part)

    def step(t: int) -> torch.Tensor:
        return torch.cat([part[t] if t < len(part) else reference.new_full((count, vocab), float("-inf"))
                          for part, count in zip(parts, rows)])

    return tuple(step(t) for t in range(n_steps))
