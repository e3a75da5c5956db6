"""Self-terminating heads, the math (:mod:`decoding.heads`): probabilities sum to 1, ST's p(eos) never
decreases, both stay above 1 - (1 - eps)^t, the step form equals the full form, the termination bound."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from decoding.heads import (nmst_log_probs, self_terminating_log_probs, self_terminating_step, st_log_probs,
                            termination_bound)

PROPERTY = settings(max_examples=60, deadline=None, derandomize=True)


# ------------------------------------------------------------------------------------------ helpers
def random_logits(seed: int, shape: tuple[int, ...], scale: float, dtype=torch.float64) -> torch.Tensor:
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def random_mask(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.rand(shape, generator=torch.Generator().manual_seed(seed + 1)) < 0.3


def generated_steps(context: torch.Tensor) -> torch.Tensor:
    """``t`` at every position: generated positions so far, the current one included."""
    return (~context).long().cumsum(-1)


shapes = st.tuples(st.integers(1, 3), st.integers(1, 8), st.integers(2, 7))
epsilons = st.sampled_from([1e-4, 1e-2, 0.1, 0.3, 0.9]) | st.floats(1e-4, 0.99)
scales = st.sampled_from([0.5, 3.0, 30.0, 1e4])
kinds = st.sampled_from(["st", "nmst"])


# --------------------------------------------------------------------------------- math properties
@PROPERTY
@given(shape=shapes, kind=kinds, epsilon=epsilons, scale=scales, seed=st.integers(0, 10_000), data=st.data())
def test_probabilities_sum_to_one_and_respect_bound(shape, kind, epsilon, scale, seed, data):
    batch, length, vocab = shape
    eos = data.draw(st.integers(0, vocab - 1))
    logits = random_logits(seed, shape, scale)
    context = random_mask(seed, shape[:2])
    log_probs, _ = self_terminating_log_probs(
        logits, kind=kind, epsilon=epsilon, eos_token_id=eos, context_mask=context
    )
    assert not torch.isnan(log_probs).any()
    torch.testing.assert_close(log_probs.logsumexp(-1), torch.zeros(batch, length, dtype=torch.float64))
    p_eos = log_probs[..., eos].exp()
    assert torch.equal(p_eos[context], torch.zeros_like(p_eos[context]))  # context: p(eos) = 0 exactly
    lower = 1 - (1 - epsilon) ** generated_steps(context).double()
    assert bool((p_eos[~context] >= lower[~context] - 1e-12).all())


@PROPERTY
@given(shape=shapes, epsilon=epsilons, scale=scales, seed=st.integers(0, 10_000))
def test_st_p_eos_never_decreases(shape, epsilon, scale, seed):
    logits = random_logits(seed, shape, scale)
    context = random_mask(seed, shape[:2])
    log_probs, _ = self_terminating_log_probs(logits, kind="st", epsilon=epsilon, eos_token_id=0, context_mask=context)
    p_eos = log_probs[..., 0].exp()
    for row in range(shape[0]):
        generated = p_eos[row][~context[row]]
        assert bool((generated[1:] >= generated[:-1] - 1e-12).all())


@PROPERTY
@given(shape=shapes, kind=kinds, epsilon=epsilons, scale=scales, seed=st.integers(0, 10_000), data=st.data())
def test_step_form_equals_full_form(shape, kind, epsilon, scale, seed, data):
    """Prompt positions are context; the step form starts fresh after them (as in decoding)."""
    batch, length, vocab = shape
    eos = data.draw(st.integers(0, vocab - 1))
    prompt = data.draw(st.integers(0, length - 1))
    logits = random_logits(seed, shape, scale)
    context = torch.zeros(batch, length, dtype=torch.bool)
    context[:, :prompt] = True
    full, final_state = self_terminating_log_probs(
        logits, kind=kind, epsilon=epsilon, eos_token_id=eos, context_mask=context
    )
    state = None
    for position in range(prompt, length):
        step, state = self_terminating_step(logits[:, position], state, kind=kind, epsilon=epsilon, eos_token_id=eos)
        assert (step - full[:, position]).abs().max() <= 1e-6
    assert torch.equal(state, final_state)


@PROPERTY
@given(shape=shapes, kind=kinds, epsilon=epsilons, seed=st.integers(0, 10_000))
def test_chained_single_positions_equal_full_form_with_any_context(shape, kind, epsilon, seed):
    logits = random_logits(seed, shape, 3.0)
    context = random_mask(seed, shape[:2])
    eos = 1 % shape[2]
    full, _ = self_terminating_log_probs(logits, kind=kind, epsilon=epsilon, eos_token_id=eos, context_mask=context)
    state = None
    for position in range(shape[1]):
        one, state = self_terminating_log_probs(
            logits[:, position : position + 1], kind=kind, epsilon=epsilon, eos_token_id=eos,
            context_mask=context[:, position : position + 1], state=state,
        )  # fmt: skip
        torch.testing.assert_close(one[:, 0], full[:, position], atol=1e-6, rtol=0)  # -inf == -inf on context


def test_layers_match_the_formulas():
    logits = random_logits(0, (2, 6, 5), 2.0)
    z, others = logits[..., 0], logits[..., 1:]
    eps = 0.05
    p_st = st_log_probs(others, z, epsilon=eps)[1].exp()
    expected_st = 1 - torch.cumprod((1 - eps) * torch.sigmoid(z), dim=-1)
    torch.testing.assert_close(p_st, expected_st)
    p_nmst = nmst_log_probs(others, z, epsilon=eps)[1].exp()
    t = torch.arange(1, 7, dtype=torch.float64)
    expected_nmst = (1 - torch.sigmoid(z)) * (1 - (1 - eps) ** t) + torch.sigmoid(z)
    torch.testing.assert_close(p_nmst, expected_nmst)
    # non-eos tokens share 1 - p(eos) by a softmax over V \ {eos}
    log_p_non_eos = st_log_probs(others, z, epsilon=eps)[0]
    torch.testing.assert_close(log_p_non_eos.exp(), (1 - expected_st).unsqueeze(-1) * torch.softmax(others, -1))


@pytest.mark.parametrize("kind", ["st", "nmst"])
@pytest.mark.parametrize("eos", [0, 3, 6])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_full_vocabulary_form_equals_the_split_layers_with_gradients(kind, eos, dtype):
    """self_terminating_log_probs masks eos in place of splitting the vocabulary: same values, same grads."""
    logits = random_logits(3, (2, 5, 7), 4.0, dtype)
    context = random_mask(3, (2, 5))
    full_input = logits.clone().requires_grad_(True)
    full, state = self_terminating_log_probs(full_input, kind=kind, epsilon=0.05, eos_token_id=eos, context_mask=context)
    split_input = logits.clone().requires_grad_(True)
    others = torch.cat([split_input[..., :eos], split_input[..., eos + 1 :]], dim=-1)
    layer = st_log_probs if kind == "st" else nmst_log_probs
    log_p_others, log_p_eos, split_state = layer(others, split_input[..., eos], epsilon=0.05, context_mask=context)
    split = torch.cat([log_p_others[..., :eos], log_p_eos.unsqueeze(-1), log_p_others[..., eos:]], dim=-1)
    assert full.dtype == split.dtype == torch.promote_types(dtype, torch.float32)
    torch.testing.assert_close(full, split)
    torch.testing.assert_close(state, split_state)
    weights = random_logits(4, (2, 5, 7), 1.0, full.dtype)
    finite = torch.isfinite(split)
    (full.where(finite, 0) * weights).sum().backward()
    (split.where(finite, 0) * weights).sum().backward()
    torch.testing.assert_close(full_input.grad, split_input.grad)


@pytest.mark.parametrize("kind", ["st", "nmst"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits_give_finite_log_probs_and_gradients(kind, dtype):
    values = torch.tensor([-1e4, 0.0, 1e4], dtype=dtype)
    index = torch.randint(0, 3, (4, 9, 6), generator=torch.Generator().manual_seed(0))
    logits = values[index].requires_grad_(True)
    context = torch.zeros(4, 9, dtype=torch.bool)
    context[:, :3] = True
    log_probs, _ = self_terminating_log_probs(logits, kind=kind, epsilon=1e-3, eos_token_id=2, context_mask=context)
    eos_column = torch.zeros(6, dtype=torch.bool)
    eos_column[2] = True
    assert torch.isfinite(log_probs[~context]).all()
    assert torch.isfinite(log_probs[context][:, ~eos_column]).all()
    assert torch.equal(log_probs[context][:, 2], torch.full((12,), -math.inf, dtype=log_probs.dtype))
    log_probs[~context].sum().backward()
    assert torch.isfinite(logits.grad).all()


# ------------------------------------------------------------------------------------------- bound
def test_termination_bound_values():
    assert [termination_bound(e) for e in (1e-1, 1e-2, 1e-3, 1e-4, 1e-5)] == [7, 69, 693, 6932, 69315]


@settings(max_examples=200, deadline=None, derandomize=True)
@given(epsilon=st.floats(1e-6, 0.999))
def test_termination_bound_is_the_first_step_past_one_half(epsilon):
    bound = termination_bound(epsilon)
    assert (1 - epsilon) ** bound <= 0.5 < (1 - epsilon) ** (bound - 1)


@pytest.mark.parametrize("kind", ["st", "nmst"])
@pytest.mark.parametrize("epsilon", [1e-1, 1e-2, 1e-3, 1e-4, 1e-5])
def test_greedy_on_the_worst_case_head_stops_exactly_at_the_bound(kind, epsilon):
    """eos logit pushed to the slow end (ST: s(z) = 1, NMST: s(z) = 0) and one non-eos token taking all
    the softmax: p(eos) = 1 - (1 - eps)^t exactly, so eos first becomes the argmax at t = T(eps)."""
    bound = termination_bound(epsilon)
    logits = torch.zeros(1, bound + 5, 3)  # float32, as models produce
    logits[..., 0] = 50.0 if kind == "st" else -50.0
    logits[..., 1] = 50.0
    log_probs, _ = self_terminating_log_probs(logits, kind=kind, epsilon=epsilon, eos_token_id=0)
    eos_is_argmax = log_probs[0].argmax(-1) == 0
    assert int(eos_is_argmax.long().argmax()) + 1 == bound


# ------------------------------------------------------------------------------------- bad inputs
@pytest.mark.parametrize("epsilon", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_epsilon_outside_open_interval_is_rejected(epsilon):
    with pytest.raises(ValueError, match="epsilon"):
        termination_bound(epsilon)
    with pytest.raises(ValueError, match="epsilon"):
        self_terminating_log_probs(torch.zeros(1, 2, 3), kind="st", epsilon=epsilon, eos_token_id=0)


@pytest.mark.parametrize("epsilon", ["0.1", None, True])
def test_epsilon_of_wrong_type_is_rejected(epsilon):
    with pytest.raises(TypeError, match="epsilon"):
        termination_bound(epsilon)


def test_bad_kind_and_eos_are_rejected():
    with pytest.raises(ValueError, match="kind"):
        self_terminating_log_probs(torch.zeros(1, 2, 3), kind="softmax", epsilon=0.1, eos_token_id=0)
    for eos in (3, -1):
        with pytest.raises(ValueError, match="eos_token_id"):
            self_terminating_log_probs(torch.zeros(1, 2, 3), kind="st", epsilon=0.1, eos_token_id=eos)
    with pytest.raises(ValueError, match="context_mask"):
        wrong_shape = torch.zeros(2, 2, dtype=torch.bool)
        self_terminating_log_probs(torch.zeros(1, 2, 3), kind="st", epsilon=0.1, eos_token_id=0,
                                   context_mask=wrong_shape)  # fmt: skip
