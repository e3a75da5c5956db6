"""Update steps: MLE, minimum risk training (MRT) and policy gradient (PG).

Every step is a callable ``step(model, batch, optimizer, *, generator) -> logs`` that performs one
optimiser update and returns scalar logs; :class:`training.mgs.MGSStep` is the fourth. Steps with state
(PG's baseline) expose ``state_dict`` / ``load_state_dict`` so checkpoints resume them exactly.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from .distributed import Ranks, all_max, backend_device, current_ranks, global_mean, share_weight
from .parallel_text import Batch
from .loop import gradient_step
from .losses import MovingAverageBaseline, mrt_loss, pg_loss
from .task import Seq2SeqTask, SequenceTask

__all__ = ["UpdateStep", "MLEStep", "MRTStep", "PGStep", "loss_weight", "seeded_stream"]


class UpdateStep(Protocol):
    def __call__(self, model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        ...

    def state_dict(self) -> dict[str, Any]:
        ...

    def load_state_dict(self, state: dict[str, Any]) -> None:
        ...


def _backward_and_step(model: torch.nn.Module, loss: torch.Tensor, optimizer: torch.optim.Optimizer,
                       clip: float) -> float:
    norm = gradient_step(loss, optimizer, parameters=[p for p in model.parameters() if p.requires_grad], clip=clip)
    optimizer.zero_grad(set_to_none=True)
    return norm


def loss_weight(task: SequenceTask, batch: Batch) -> float:
    """What ``task.mle_loss`` averages over in ``batch``: ``task.loss_weight(batch)`` (e.g. target tokens)
    when the task says, else its rows."""
    weight = getattr(task, "loss_weight", None)
    if weight is not None:
        return float(weight(batch))
    if not hasattr(batch, "__len__"):
        raise TypeError(f"under torchrun {type(task).__name__} needs a loss_weight(batch) method: "
                        f"{type(batch).__name__} has no rows to count")
    return float(len(batch))


class MLEStep:
    """One MLE update: token cross-entropy (with the task's label smoothing), clip, step.

    Under ``torchrun`` each process takes its share of the batch; the update is the one-process update on
    the whole batch (each share's loss weighted by its tokens, gradients averaged)."""

    runs_distributed = True

    def __init__(self, task: SequenceTask, *, clip: float = 1.0) -> None:
        self.task = task
        self.clip = clip

    def __call__(self, model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        del generator
        model.train()
        loss = self.task.mle_loss(model, batch)
        ranks, device = current_ranks(), backend_device(next(model.parameters()).device)
        weight = loss_weight(self.task, batch) if ranks.distributed else 1.0
        share = share_weight(weight, ranks, device=device)
        norm = _backward_and_step(model, loss if share == 1.0 else loss * share, optimizer, self.clip)
        return {"mle_loss": global_mean(float(loss.detach()), weight, ranks, device=device), "grad_norm": norm}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class _SampledStep:
    """Shared part of MRT and PG: with probability ``mle_probability`` an MLE step, else K samples.

    The samples come from a stream seeded by one draw of the step's ``generator``, so the generator moves
    on by the same amount whatever the samples' lengths. Under ``torchrun`` each process samples its share
    of the batch's rows with the numbers those rows draw in the whole batch (``prompt_share``), costs are
    scaled by the whole batch's largest, and the update is the one-process update on the whole batch."""

    runs_distributed = True

    def __init__(self, task: Seq2SeqTask, *, num_samples: int = 4, mle_probability: float = 0.1,
                 clip: float = 1.0) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if not 0.0 <= mle_probability <= 1.0:
            raise ValueError(f"mle_probability must be in [0, 1], got {mle_probability}")
        self.task = task
        self.num_samples = num_samples
        self.mle_probability = mle_probability
        self.clip = clip
        self._mle = MLEStep(task, clip=clip)

    def __call__(self, model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        device = generator.device if generator is not None else next(model.parameters()).device
        if float(torch.rand((), generator=generator, device=device)) < self.mle_probability:
            return {**self._mle(model, batch, optimizer), "mle_substep": 1.0}
        decoded, costs = self.task.sample(model, batch, num_samples=self.num_samples,
                                          generator=seeded_stream(generator, device))
        costs = costs.view(len(batch), self.num_samples)                    # [B, K]
        ranks, host = current_ranks(), backend_device(next(model.parameters()).device)
        model.train()
        scores = self.task.hypothesis_scores(model, batch, decoded, num_samples=self.num_samples)
        loss = self.loss(scores, costs, scale=all_max([float(costs.max())], ranks, device=host)[0], ranks=ranks)
        share = share_weight(len(batch), ranks, device=host)
        norm = _backward_and_step(model, loss if share == 1.0 else loss * share, optimizer, self.clip)
        return {"loss": global_mean(float(loss.detach()), len(batch), ranks, device=host),
                "cost_samples": global_mean(float(costs.mean()), len(batch), ranks, device=host),
                "grad_norm": norm, "mle_substep": 0.0}

    def loss(self, scores: torch.Tensor, costs: torch.Tensor, *, scale: float, ranks: Ranks) -> torch.Tensor:
        """The mean loss of these rows (``[B, K]`` scores and costs), costs scaled by ``scale`` (the whole
        batch's largest cost)."""
        raise NotImplementedError


def seeded_stream(generator: torch.Generator | None, device: torch.device | str) -> torch.Generator:
    """A fresh random stream on ``device`` seeded by one draw of ``generator``: what decodes sample from, so
    that ``generator`` moves on by one draw however long they run (under torchrun: equally everywhere)."""
    seed = int(torch.randint(0, 2**62, (), generator=generator, device=generator.device if generator else "cpu"))
    return torch.Generator(device).manual_seed(seed)


class MRTStep(_SampledStep):
    """Minimum risk training: ``Σ_k cost_k Q_k`` over 4 samples per source (Shen et al. 2016, "Minimum risk training for neural machine translation")."""

    def loss(self, scores: torch.Tensor, costs: torch.Tensor, *, scale: float, ranks: Ranks) -> torch.Tensor:
        return mrt_loss(scores, costs, scale=scale)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


class PGStep(_SampledStep):
    """REINFORCE with reward ``-cost / batch max`` and a moving-average baseline."""

    def __init__(self, task: Seq2SeqTask, *, num_samples: int = 4, mle_probability: float = 0.1,
                 clip: float = 1.0, baseline_momentum: float = 0.9) -> None:
        super().__init__(task, num_samples=num_samples, mle_probability=mle_probability, clip=clip)
        self.baseline = MovingAverageBaseline(baseline_momentum)

    def loss(self, scores: torch.Tensor, costs: torch.Tensor, *, scale: float, ranks: Ranks) -> torch.Tensor:
        rewards = -costs / max(scale, 1e-12)
        mean = global_mean(float(rewards.mean()), rewards.shape[0], ranks, device=backend_device(rewards.device))
        return pg_loss(scores, self.baseline.advantages(rewards, mean=mean))

    def state_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.baseline.load_state_dict(state["baseline"])
