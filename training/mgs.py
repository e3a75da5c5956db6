"""MLE-guided parameter search (MGS; Welleck & Cho, "MLE-guided parameter search for task loss minimization in
neural sequence modeling", AAAI 2021).

One update:

1. ``C(θ)``: decode the minibatch with the current parameters and average the per-sequence cost.
2. ``g = -∇θ L_MLE(θ)`` on the same minibatch, gradient norm clipped (to 1 by default).
3. ``K`` candidates ``Δ_k ~ π N(g, σ_t²) + (1 - π) N(0, σ_t²)``: the first ``round(π K)`` around ``g``,
   the rest around 0, with per-tensor noise scale ``σ_t = σ * mean|g_t|``.
4. ``C(θ + Δ_k)`` with the same decoder on the same minibatch. Candidates are parameter dicts evaluated
   with :func:`torch.func.functional_call` for the duration of one decode: the model is never copied and
   its own parameters are never written.
5. ``log w_k = α [C(θ) - C(θ + Δ_k)] - log q(Δ_k)``, self-normalised with a softmax. ``importance=
   "reference"`` (default) treats ``q`` as constant, as the reference code in effect does;
   ``importance="exact"`` uses the exact mixture density above.
6. ``Δ* = Σ_k w_k Δ_k``; ``-Δ*`` is handed to the optimiser as the gradient (optionally mixed with the
   MLE gradient), then clipped and stepped.

Cost: ``K + 1`` batched decodes and one MLE forward/backward per update.

Under ``torchrun`` each process decodes and scores its share of the minibatch: the MLE gradient (step 2)
and the costs (steps 1 and 4) are averaged over all processes, so every process draws the same candidates
from the same seed and applies the same update - the one a single process makes on the whole minibatch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.func import functional_call

from .distributed import average_gradients, backend_device, current_ranks, global_mean, share_weight
from .parallel_text import Batch
from .steps import loss_weight, seeded_stream
from .task import SequenceTask

__all__ = ["MGSConfig", "mle_direction", "sample_candidates", "candidate_costs", "log_proposal_density",
           "importance_log_weights", "combine", "mean_cost", "MGSStep"]

Params = dict[str, torch.Tensor]


@dataclass(frozen=True)
class MGSConfig:
    """MGS options (defaults follow the reference code: K=4, σ=1, α=100, π=1/2).

    Attributes:
        num_candidates: K >= 1.
        sigma: noise scale σ > 0, relative to each tensor's mean |g|.
        alpha: inverse temperature α > 0 on the cost improvement (β in the reference code).
        mle_share: π in [0, 1], the share of candidates centred on the MLE step; 1 is the "MLE-only"
            ablation, 0 the "zero-only" ablation (pure random search).
        importance: ``"reference"`` (constant proposal correction) or ``"exact"`` (mixture density).
        grad_clip: norm the MLE gradient is clipped to before it centres candidates.
        mle_mix: λ in [0, 1]; the optimiser receives ``-((1 - λ) Δ* + λ g)``.
        update_clip: norm the final update is clipped to before the optimiser step.
        common_noise: reuse one decoder random state for ``C(θ)`` and every candidate (matters only for a
            sampling decoder; it makes cost differences reflect the parameters, not the draw).
    """

    num_candidates: int = 4
    sigma: float = 1.0
    alpha: float = 100.0
    mle_share: float = 0.5
    importance: Literal["reference", "exact"] = "reference"
    grad_clip: float = 1.0
    mle_mix: float = 0.0
    update_clip: float = 1.0
    common_noise: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.num_candidates, int) or self.num_candidates < 1:
            raise ValueError(f"num_candidates (K) must be an integer >= 1, got {self.num_candidates!r}")
        if not self.sigma > 0:
            raise ValueError(f"sigma must be > 0, got {self.sigma}")
        if not self.alpha > 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        if not 0.0 <= self.mle_share <= 1.0:
            raise ValueError(f"mle_share (pi) must be in [0, 1], got {self.mle_share}")
        if self.importance not in ("reference", "exact"):
            raise ValueError(f"importance must be 'reference' or 'exact', got {self.importance!r}")
        if not 0.0 <= self.mle_mix <= 1.0:
            raise ValueError(f"mle_mix must be in [0, 1], got {self.mle_mix}")
        if not self.grad_clip > 0 or not self.update_clip > 0:
            raise ValueError(f"grad_clip and update_clip must be > 0, got {self.grad_clip}, {self.update_clip}")

    @property
    def num_mle_centred(self) -> int:
        """How many of the K candidates are centred on the MLE step: ``round(π K)``."""
        return int(math.floor(self.mle_share * self.num_candidates + 0.5))


def trainable_parameters(model: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


def mle_direction(model: torch.nn.Module, task: SequenceTask, batch: Batch, *, clip: float
                  ) -> tuple[Params, float]:
    """``(g, loss)``: ``g = -∇ L_MLE`` clipped to norm ``clip`` (detached copies), and the loss value.

    Runs in train mode (dropout on); leaves ``.grad`` of the parameters zeroed.
    """
    params = trainable_parameters(model)
    model.zero_grad(set_to_none=True)
    loss = task.mle_loss(model, batch)
    ranks, device = current_ranks(), backend_device(next(iter(params.values())).device)
    weight = loss_weight(task, batch) if ranks.distributed else 1.0
    share = share_weight(weight, ranks, device=device)  # under torchrun: the gradient of the whole batch's mean
    (loss if share == 1.0 else loss * share).backward()
    average_gradients(list(params.values()), ranks)
    torch.nn.utils.clip_grad_norm_(list(params.values()), clip)
    direction = {name: -(p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p))
                 for name, p in params.items()}
    model.zero_grad(set_to_none=True)
    return direction, global_mean(float(loss.detach()), weight, ranks, device=device)


def mean_cost(per_sequence: torch.Tensor) -> torch.Tensor:
    """The mean of per-sequence costs; under ``torchrun``, over every process's sequences."""
    mean = per_sequence.float().mean()
    ranks = current_ranks()
    if not ranks.distributed:
        return mean
    value = global_mean(float(mean), per_sequence.numel(), ranks, device=backend_device(per_sequence.device))
    return torch.tensor(value, dtype=mean.dtype, device=mean.device)


def noise_scales(direction: Params, sigma: float) -> dict[str, float]:
    """Per-tensor noise standard deviation ``σ * mean|g_t|``."""
    return {name: sigma * float(g.abs().mean()) for name, g in direction.items()}


def sample_candidates(direction: Params, config: MGSConfig, *, generator: torch.Generator | None
                      ) -> list[Params]:
    """K candidate updates; the first ``config.num_mle_centred`` are centred on ``direction``."""
    scales = noise_scales(direction, config.sigma)
    candidates = []
    for k in range(config.num_candidates):
        centred = k < config.num_mle_centred
        candidate = {}
        for name, g in direction.items():
            noise = torch.randn(g.shape, generator=generator, dtype=g.dtype, device=g.device) * scales[name]
            candidate[name] = g + noise if centred else noise
        candidates.append(candidate)
    return candidates


class _DecodeCosts(torch.nn.Module):
    """Holds the model as a submodule so a parameter dict can replace its weights for one whole decode."""

    def __init__(self, model: torch.nn.Module, task: SequenceTask) -> None:
        super().__init__()
        self.model = model
        self.task = task

    def forward(self, batch: Batch, generator: torch.Generator | None) -> torch.Tensor:
        return self.task.decode_costs(self.model, batch, generator=generator)


def _fork(generator: torch.Generator | None) -> torch.Generator | None:
    if generator is None:
        return None
    fork = torch.Generator(device=generator.device)
    fork.set_state(generator.get_state())
    return fork


def candidate_costs(model: torch.nn.Module, task: SequenceTask, batch: Batch, candidates: list[Params], *,
                    generator: torch.Generator | None = None, common_noise: bool = True) -> torch.Tensor:
    """``[K]`` mean costs ``C(θ + Δ_k)``, each from one batched decode of the perturbed model.

    The perturbed weights exist only inside :func:`torch.func.functional_call`; ``model``'s own
    parameters are left bit-identical. With ``common_noise``, every candidate decodes with a copy of
    ``generator``'s current state; without, with a stream seeded by one draw of ``generator`` each.
    """
    runner = _DecodeCosts(model, task)
    base = {name: p.detach() for name, p in trainable_parameters(model).items()}
    costs = []
    with torch.no_grad():
        for candidate in candidates:
            params = {f"model.{name}": base[name] + delta for name, delta in candidate.items()}
            fresh = not common_noise and generator is not None
            draw = seeded_stream(generator, generator.device) if fresh else _fork(generator)
            per_sequence = functional_call(runner, params, (batch, draw), strict=False)
            costs.append(mean_cost(per_sequence))
    return torch.stack(costs)


def _gaussian_log_density(delta: Params, centre: Params | None, scales: dict[str, float]) -> torch.Tensor:
    total = torch.zeros((), dtype=torch.float64, device=next(iter(delta.values())).device)
    for name, d in delta.items():
        scale = scales[name]
        if scale <= 0:
            continue  # a deterministic coordinate: the same factor for every candidate
        diff = d.double() if centre is None else (d.double() - centre[name].double())
        n = d.numel()
        total = total - 0.5 * (diff / scale).pow(2).sum() - n * math.log(scale) - 0.5 * n * math.log(2 * math.pi)
    return total


def log_proposal_density(candidate: Params, direction: Params, config: MGSConfig) -> torch.Tensor:
    """Exact ``log q(Δ)`` of the mixture ``π N(g, σ_t²) + (1 - π) N(0, σ_t²)`` (float64 scalar)."""
    scales = noise_scales(direction, config.sigma)
    pi = config.mle_share
    parts = []
    if pi > 0:
        parts.append(math.log(pi) + _gaussian_log_density(candidate, direction, scales))
    if pi < 1:
        parts.append(math.log(1 - pi) + _gaussian_log_density(candidate, None, scales))
    return torch.logsumexp(torch.stack(parts), dim=0)


def importance_log_weights(cost_before: torch.Tensor, costs: torch.Tensor, *, alpha: float,
                           log_proposal: torch.Tensor | None = None) -> torch.Tensor:
    """``[K]`` self-normalised log weights ``log_softmax(α (C(θ) - C_k) - log q_k)``.

    ``log_proposal`` ``[K]`` is ``log q(Δ_k)``; ``None`` means a constant correction (reference).
    """
    logits = alpha * (cost_before.double() - costs.double())
    if log_proposal is not None:
        logits = logits - log_proposal.double()
    return torch.log_softmax(logits, dim=0)


def combine(candidates: list[Params], weights: torch.Tensor) -> Params:
    """``Δ* = Σ_k w_k Δ_k`` (``weights [K]``)."""
    return {name: sum(float(w) * c[name] for w, c in zip(weights, candidates))
            for name in candidates[0]}


def _flat(params: Params) -> torch.Tensor:
    return torch.cat([t.reshape(-1).double() for t in params.values()])


def _cosine(a: Params, b: Params) -> float:
    fa, fb = _flat(a), _flat(b)
    denominator = float(fa.norm() * fb.norm())
    return float(fa @ fb) / denominator if denominator > 0 else 0.0


class MGSStep:
    """One MGS update per call (see the module docstring); logs what happened.

    Logged: ``cost_before`` C(θ), ``cost_candidates`` (mean C(θ+Δ_k)), ``cost_best``, ``cost_expected``
    (Σ w_k C(θ+Δ_k), the importance-weighted estimate of the cost after the update), ``cost_after``
    (measured with one extra decode only when ``measure_after``), ``weight_mle`` (total weight on
    MLE-centred candidates), ``cosine_mle`` (cosine between Δ* and g), ``ess`` (1 / Σ w_k²), ``mle_loss``.
    """

    runs_distributed = True  # under torchrun: shares of the batch, gradients and costs over all processes

    def __init__(self, task: SequenceTask, config: MGSConfig = MGSConfig(), *, measure_after: bool = False
                 ) -> None:
        self.task = task
        self.config = config
        self.measure_after = measure_after

    def __call__(self, model: torch.nn.Module, batch: Batch, optimizer: torch.optim.Optimizer, *,
                 generator: torch.Generator | None = None) -> dict[str, float]:
        config = self.config
        snapshot = _fork(generator) if config.common_noise else generator
        cost_before = mean_cost(self.task.decode_costs(model, batch, generator=_fork(snapshot)))
        model.train()
        direction, loss = mle_direction(model, self.task, batch, clip=config.grad_clip)
        candidates = sample_candidates(direction, config, generator=generator)
        costs = candidate_costs(model, self.task, batch, candidates, generator=snapshot,
                                common_noise=config.common_noise)
        log_q = None
        if config.importance == "exact":
            log_q = torch.stack([log_proposal_density(c, direction, config) for c in candidates])
        weights = importance_log_weights(cost_before, costs, alpha=config.alpha, log_proposal=log_q).exp()
        delta = combine(candidates, weights)
        self._apply(model, optimizer, delta, direction)
        logs = {
            "cost_before": float(cost_before), "cost_candidates": float(costs.mean()),
            "cost_best": float(costs.min()), "cost_expected": float((weights * costs.double()).sum()),
            "weight_mle": float(weights[: config.num_mle_centred].sum()),
            "cosine_mle": _cosine(delta, direction), "ess": float(1.0 / weights.pow(2).sum()),
            "mle_loss": loss,
        }
        if self.measure_after:
            logs["cost_after"] = float(mean_cost(self.task.decode_costs(model, batch, generator=_fork(snapshot))))
        return logs

    def _apply(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, delta: Params,
               direction: Params) -> None:
        mix = self.config.mle_mix
        params = trainable_parameters(model)
        optimizer.zero_grad(set_to_none=True)
        for name, p in params.items():
            update = delta[name] if mix == 0 else (1 - mix) * delta[name] + mix * direction[name]
            p.grad = (-update).to(p.dtype)
        torch.nn.utils.clip_grad_norm_(list(params.values()), self.config.update_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state
