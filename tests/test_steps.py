"""training.steps (MRT and PG) and their losses (training.losses): losses against hand computation and
gradcheck; the update steps on a tiny BART."""

from __future__ import annotations

import math

import pytest
import torch

from training.parallel_text import ParallelText, encode_parallel, make_batch
from training.losses import (MovingAverageBaseline, length_normalised, mrt_loss, pg_loss,
                             teacher_forced_logprobs)
from training.seq2seq import Seq2SeqSize, build_seq2seq
from training.steps import MRTStep, PGStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

PAIRS = ParallelText(
    ("ein Mann fährt Rad .", "zwei Hunde spielen im Schnee .", "eine Frau liest ein Buch .",
     "Kinder spielen am Strand ."),
    ("a man rides a bike .", "two dogs play in the snow .", "a woman reads a book .",
     "children play on the beach ."),
)


@pytest.fixture(scope="module")
def setup():
    tokenizer = train_tokenizer(list(PAIRS.sources + PAIRS.targets) * 3, vocab_size=120, min_frequency=1)
    model = build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32), seed=0)
    batch = make_batch(encode_parallel(PAIRS, tokenizer), [0, 1, 2, 3])
    return tokenizer, model, batch


def test_mrt_loss_by_hand():
    scores = torch.tensor([[0.0, -1.0], [-0.5, -0.5]])
    costs = torch.tensor([[0.2, 0.8], [0.4, 0.0]])
    q0 = [1 / (1 + math.exp(-1)), math.exp(-1) / (1 + math.exp(-1))]
    row0 = 0.25 * q0[0] + 1.0 * q0[1]          # costs / batch max 0.8
    row1 = 0.5 * 0.5 + 0.0 * 0.5
    assert mrt_loss(scores, costs).item() == pytest.approx((row0 + row1) / 2, rel=1e-6)


def test_pg_loss_and_baseline_by_hand():
    baseline = MovingAverageBaseline(momentum=0.5)
    first = torch.tensor([[-1.0, -0.5], [-0.25, -0.25]])         # mean -0.5
    adv = baseline.advantages(first)
    torch.testing.assert_close(adv, torch.tensor([[-0.5, 0.0], [0.25, 0.25]]))
    assert baseline.value == pytest.approx(-0.5)
    second = torch.tensor([[0.0, 0.0], [-1.0, -1.0]])            # mean -0.5 -> b stays -0.5
    torch.testing.assert_close(baseline.advantages(second), torch.tensor([[0.5, 0.5], [-0.5, -0.5]]))
    third = torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    torch.testing.assert_close(baseline.advantages(third), torch.tensor([[1.5, 1.5], [1.5, 1.5]]))
    assert baseline.value == pytest.approx(0.5 * -0.5 + 0.5 * 1.0)
    scores = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    expected = -((0.5 * -1.0 + 0.0 * -2.0) + (-0.25 * -0.5 + 0.25 * -3.0)) / 2
    assert pg_loss(scores, torch.tensor([[0.5, 0.0], [-0.25, 0.25]])).item() == pytest.approx(expected)


def test_length_normalised_by_hand():
    logprobs = torch.tensor([[-1.0, -2.0, -9.0], [-0.5, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    assert length_normalised(logprobs, mask).tolist() == pytest.approx([-1.5, -0.5])


def test_gradcheck_through_length_normalisation():
    generator = torch.Generator().manual_seed(0)
    token_logprobs = -torch.rand(6, 5, generator=generator, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0],
                         [1, 1, 0, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.float64)
    costs = torch.rand(2, 3, generator=generator, dtype=torch.float64)
    advantages = torch.randn(2, 3, generator=generator, dtype=torch.float64)
    token_logprobs.requires_grad_(True)

    def mrt(x):
        return mrt_loss(length_normalised(x, mask).view(2, 3), costs)

    def pg(x):
        return pg_loss(length_normalised(x, mask).view(2, 3), advantages)

    assert torch.autograd.gradcheck(mrt, (token_logprobs,))
    assert torch.autograd.gradcheck(pg, (token_logprobs,))


def test_losses_reject_shape_mismatch():
    with pytest.raises(ValueError, match="scores and costs"):
        mrt_loss(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="scores and advantages"):
        pg_loss(torch.zeros(6), torch.zeros(6))


def test_teacher_forced_logprobs_match_stepwise_forward(setup):
    tokenizer, model, batch = setup
    model.eval()
    tokens = batch.target_ids[:2]
    mask = batch.target_mask[:2].float()
    got = teacher_forced_logprobs(model, batch.source_ids[:2], batch.source_mask[:2], tokens, mask)
    start = torch.full((2, 1), model.config.decoder_start_token_id)
    for t in range(tokens.shape[1]):
        prefix = torch.cat([start, tokens[:, :t]], dim=1)
        logits = model(input_ids=batch.source_ids[:2], attention_mask=batch.source_mask[:2],
                       decoder_input_ids=prefix).logits[:, -1]
        expected = torch.log_softmax(logits, -1).gather(1, tokens[:, t:t + 1]).squeeze(1) * mask[:, t]
        torch.testing.assert_close(got[:, t], expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("make_step", [MRTStep, PGStep])
def test_sampled_steps_update_parameters(setup, make_step):
    tokenizer, model, batch = setup
    model = build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32), seed=1)
    task = Seq2SeqTask(tokenizer, cost="bleu")
    step = make_step(task, num_samples=3, mle_probability=0.0)
    before = [p.detach().clone() for p in model.parameters()]
    logs = step(model, batch, torch.optim.SGD(model.parameters(), lr=0.1),
                generator=torch.Generator().manual_seed(0))
    assert logs["mle_substep"] == 0.0 and 0.0 <= logs["cost_samples"] <= 1.0
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))
    mle_logs = make_step(task, mle_probability=1.0)(model, batch, torch.optim.SGD(model.parameters(), lr=0.1),
                                                    generator=torch.Generator().manual_seed(0))
    assert mle_logs["mle_substep"] == 1.0 and "mle_loss" in mle_logs


def test_pg_state_round_trip(setup):
    tokenizer, _, _ = setup
    step = PGStep(Seq2SeqTask(tokenizer), baseline_momentum=0.8)
    step.baseline.advantages(torch.tensor([[-0.3, -0.1]]))
    other = PGStep(Seq2SeqTask(tokenizer))
    other.load_state_dict(step.state_dict())
    assert other.baseline.value == pytest.approx(-0.2) and other.baseline.momentum == pytest.approx(0.8)


def test_step_options_are_checked(setup):
    tokenizer, _, _ = setup
    with pytest.raises(ValueError, match="num_samples"):
        MRTStep(Seq2SeqTask(tokenizer), num_samples=0)
    with pytest.raises(ValueError, match="mle_probability"):
        PGStep(Seq2SeqTask(tokenizer), mle_probability=1.5)
    with pytest.raises(ValueError, match="momentum"):
        MovingAverageBaseline(1.0)
