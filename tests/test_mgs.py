"""MLE-guided parameter search: toy convergence, ablations, weights by hand, untouched base parameters."""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch

from training.mgs import (MGSConfig, MGSStep, candidate_costs, combine, importance_log_weights,
                          log_proposal_density, mle_direction, sample_candidates)

B, D, L, V = 8, 8, 3, 5


@dataclass(frozen=True)
class ToyBatch:
    inputs: torch.Tensor   # [B, D]
    targets: torch.Tensor  # [B, L]

    def __len__(self) -> int:
        return self.inputs.shape[0]


class ExactMatchTask:
    """A linear 'decoder' emitting L tokens by argmax; cost 1 unless the whole sequence matches."""

    def mle_loss(self, model, batch):
        logits = model(batch.inputs).view(len(batch), L, V)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch.targets.flatten())

    def decode_costs(self, model, batch, *, generator):
        predicted = model(batch.inputs).view(len(batch), L, V).argmax(-1)
        return 1.0 - predicted.eq(batch.targets).all(dim=1).float()


def toy_problem(seed: int):
    generator = torch.Generator().manual_seed(seed)
    batch = ToyBatch(torch.randn(B, D, generator=generator), torch.randint(0, V, (B, L), generator=generator))
    torch.manual_seed(seed)
    return torch.nn.Linear(D, L * V), batch, generator


def run_mgs(config: MGSConfig, *, seed: int, updates: int = 40) -> list[float]:
    model, batch, generator = toy_problem(seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    step = MGSStep(ExactMatchTask(), config)
    costs = [step(model, batch, optimizer, generator=generator)["cost_before"] for _ in range(updates)]
    return costs + [float(ExactMatchTask().decode_costs(model, batch, generator=None).mean())]


@pytest.mark.parametrize("importance", ["reference", "exact"])
def test_mgs_solves_exact_match_toy_and_zero_only_is_slower(importance):
    for seed in range(2):
        mixture = run_mgs(MGSConfig(importance=importance), seed=seed)
        mle_only = run_mgs(MGSConfig(importance=importance, mle_share=1.0), seed=seed)
        zero_only = run_mgs(MGSConfig(importance=importance, mle_share=0.0), seed=seed)
        assert mixture[0] == 1.0                       # starts with no sequence right
        assert mixture[-1] == 0.0 and mle_only[-1] == 0.0  # the known optimum: every sequence right
        assert zero_only[-1] >= 0.75                   # random search barely moves in 40 updates
        assert sum(zero_only) > sum(mixture) + 10      # the area under the curve tells the same story


def test_importance_weights_match_hand_computation_reference():
    costs = torch.tensor([0.4, 0.5, 0.7, 0.45])
    log_w = importance_log_weights(torch.tensor(0.5), costs, alpha=10.0)
    raw = [math.exp(10.0 * (0.5 - c)) for c in costs.tolist()]
    expected = [r / sum(raw) for r in raw]
    assert log_w.exp().tolist() == pytest.approx(expected, rel=1e-9)


def _hand_log_normal(values, centre, scale):
    return sum(-0.5 * ((v - c) / scale) ** 2 - math.log(scale) - 0.5 * math.log(2 * math.pi)
               for v, c in zip(values, centre))


def test_importance_weights_match_hand_computation_exact():
    direction = {"a": torch.tensor([0.2, -0.4]), "b": torch.tensor([[1.0, 0.0, -0.5]])}
    candidates = [{"a": torch.tensor([0.25, -0.3]), "b": torch.tensor([[0.9, 0.1, -0.4]])},
                  {"a": torch.tensor([0.05, 0.1]), "b": torch.tensor([[-0.2, 0.3, 0.1]])}]
    config = MGSConfig(num_candidates=2, sigma=0.5, alpha=3.0, mle_share=0.25, importance="exact")
    scale_a, scale_b = 0.5 * 0.3, 0.5 * 0.5        # sigma * mean |g| per tensor
    hand_log_q = []
    for c in candidates:
        around_g = (_hand_log_normal(c["a"].tolist(), [0.2, -0.4], scale_a)
                    + _hand_log_normal(c["b"].flatten().tolist(), [1.0, 0.0, -0.5], scale_b))
        around_0 = (_hand_log_normal(c["a"].tolist(), [0, 0], scale_a)
                    + _hand_log_normal(c["b"].flatten().tolist(), [0, 0, 0], scale_b))
        hand_log_q.append(math.log(0.25 * math.exp(around_g) + 0.75 * math.exp(around_0)))
    log_q = torch.stack([log_proposal_density(c, direction, config) for c in candidates])
    assert log_q.tolist() == pytest.approx(hand_log_q, rel=1e-6)  # float32 inputs
    costs = torch.tensor([0.3, 0.6])
    log_w = importance_log_weights(torch.tensor(0.5), costs, alpha=3.0, log_proposal=log_q)
    raw = [3.0 * (0.5 - c) - q for c, q in zip(costs.tolist(), hand_log_q)]
    expected = [math.exp(r - max(raw)) for r in raw]
    assert log_w.exp().tolist() == pytest.approx([e / sum(expected) for e in expected], rel=1e-6)
    delta = combine(candidates, log_w.exp())
    w0, w1 = (e / sum(expected) for e in expected)
    assert delta["a"].tolist() == pytest.approx([w0 * 0.25 + w1 * 0.05, w0 * -0.3 + w1 * 0.1])


def test_candidates_mixture_split_and_per_tensor_noise_scale():
    direction = {"big": torch.full((200,), 2.0), "small": torch.full((200,), -0.01)}
    config = MGSConfig(num_candidates=4, sigma=0.1, mle_share=0.5)
    candidates = sample_candidates(direction, config, generator=torch.Generator().manual_seed(0))
    for k, candidate in enumerate(candidates):
        centre = direction if k < 2 else {n: torch.zeros_like(t) for n, t in direction.items()}
        for name in direction:
            noise = candidate[name] - centre[name]
            expected_std = 0.1 * direction[name].abs().mean()
            assert noise.std().item() == pytest.approx(float(expected_std), rel=0.25)


def test_base_parameters_bit_identical_and_candidates_really_used():
    model, batch, _ = toy_problem(0)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    task = ExactMatchTask()
    solution = torch.zeros(L * V, D)
    solution_bias = torch.zeros(L * V)
    # weights that put a large logit on each target token: solve W x_b = one-hot rows (D == B)
    one_hot = torch.nn.functional.one_hot(batch.targets, V).float().view(B, L * V) * 10
    solution = torch.linalg.solve(batch.inputs, one_hot).T           # [L*V, D]
    to_solution = {"weight": solution - model.weight.detach(), "bias": solution_bias - model.bias.detach()}
    zero = {n: torch.zeros_like(p) for n, p in model.named_parameters()}
    costs = candidate_costs(model, task, batch, [zero, to_solution])
    assert costs[0].item() == pytest.approx(task.decode_costs(model, batch, generator=None).mean().item())
    assert costs[1].item() == 0.0
    for name, p in model.named_parameters():
        assert torch.equal(p, before[name])
        assert p.grad is None


def test_mgs_step_logs_and_mle_mix_one_is_exactly_the_mle_step():
    model, batch, generator = toy_problem(1)
    task = ExactMatchTask()
    logs = MGSStep(task, MGSConfig(mle_share=1.0))(model, batch, torch.optim.SGD(model.parameters(), lr=0.1),
                                                    generator=generator)
    assert logs["weight_mle"] == pytest.approx(1.0)
    assert 1.0 <= logs["ess"] <= 4.0 + 1e-9 and -1.0 <= logs["cosine_mle"] <= 1.0
    assert set(logs) >= {"cost_before", "cost_expected", "cost_best", "mle_loss"}

    model, batch, generator = toy_problem(2)
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    direction, _ = mle_direction(model, task, batch, clip=1.0)
    step = MGSStep(task, MGSConfig(mle_mix=1.0, update_clip=1e9), measure_after=True)
    logs = step(model, batch, torch.optim.SGD(model.parameters(), lr=1.0), generator=generator)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.detach() - start[name], direction[name])
    assert "cost_after" in logs


@pytest.mark.parametrize("kwargs, match", [
    ({"num_candidates": 0}, "num_candidates"), ({"sigma": 0.0}, "sigma"), ({"sigma": -1.0}, "sigma"),
    ({"alpha": 0.0}, "alpha"), ({"mle_share": 1.5}, "mle_share"), ({"mle_share": -0.1}, "mle_share"),
    ({"importance": "approx"}, "importance"), ({"mle_mix": 2.0}, "mle_mix"),
])
def test_config_rejects_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MGSConfig(**kwargs)


class CountingTask(ExactMatchTask):
    def __init__(self):
        self.decodes = self.mle_calls = 0

    def mle_loss(self, model, batch):
        self.mle_calls += 1
        return super().mle_loss(model, batch)

    def decode_costs(self, model, batch, *, generator):
        self.decodes += 1
        return super().decode_costs(model, batch, generator=generator)


@pytest.mark.parametrize("k", [1, 3, 4])
def test_one_update_costs_k_plus_one_decodes_and_one_mle_backward(k):
    model, batch, generator = toy_problem(0)
    task = CountingTask()
    MGSStep(task, MGSConfig(num_candidates=k))(model, batch, torch.optim.SGD(model.parameters(), lr=0.1),
                                               generator=generator)
    assert task.decodes == k + 1 and task.mle_calls == 1
