"""Which decoders of a self-terminating (ST / NMST) model stop within T(eps) = termination_bound(eps), one
test per case the README states, and one showing where the bound does not reach.

From step T on, p(eos) >= 1/2 for every prefix, so eos is each beam's best extension and the best
candidate overall. Without logits processors:
- greedy emits eos by step T (an exact float32 tie between eos and another token goes to eos);
- beam search with early_stopping=True: every step from T on finishes at least one hypothesis, so the search
  ends, every returned hypothesis ending in eos, within T + num_beams - 1 tokens;
- beam search with length_penalty <= 0 (any early_stopping): a hypothesis finishing after T scores below the
  best beam's eos at T, so the best hypothesis ends in eos within T;
- beam_rule="papers": the prompt stops at the first step where one of its num_beams best candidates ends in
  eos, which happens by step T at the latest (eos of the best beam is the best candidate), so within T;
- length_penalty > 0 with early_stopping False or "never": longer hypotheses can win; only max_new_tokens.
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from decoding import generate, make_self_terminating, termination_bound
from decoding.heads import self_terminating_log_probs
from decoding.models.self_terminating import SelfTerminatingStepModel
from tests.tiny_models import left_padded_prompts, tiny_model


class _Constant:
    """Raw logits that never change: eos (id 2) at ``eos_logit``, token 1 taking the whole softmax."""

    vocab_size = 3

    def __init__(self, eos_logit: float) -> None:
        self.logits = torch.tensor([-50.0, 50.0, eos_logit])

    def prefill(self, input_ids, attention_mask):
        return self.logits.expand(input_ids.shape[0], 3).clone(), None, input_ids

    def step(self, tokens, state):
        return self.logits.expand(tokens.shape[0], 3).clone(), None

    def select(self, state, index):
        return None


@pytest.mark.parametrize("kind", ["st", "nmst"])
def test_greedy_breaks_the_float32_tie_at_the_bound_toward_eos(kind):
    """eps with (1 - eps)^T within 1e-13 of 1/2: p(eos) and the top token's probability round to the same
    float32 number at step T, and eos (id 2) is above the other token (id 1), so argmax alone picks 1."""
    epsilon = -math.expm1(-math.log(2.0) / 69) * (1 + 1e-13)
    bound = termination_bound(epsilon)
    slow = 50.0 if kind == "st" else -50.0
    logits = torch.tensor([-50.0, 50.0, slow]).expand(1, bound, 3)
    log_probs, _ = self_terminating_log_probs(logits, kind=kind, epsilon=epsilon, eos_token_id=2)
    assert log_probs[0, bound - 1, 2] == log_probs[0, bound - 1, 1], "the case needs an exact tie at T"
    model = SelfTerminatingStepModel(_Constant(slow), kind=kind, epsilon=epsilon, eos_token_id=2)
    out = generate(model, torch.tensor([[1, 1]]), max_new_tokens=bound + 5, eos_token_id=2, pad_token_id=0,
                   return_dict_in_generate=True)
    assert out.terminated.all() and out.lengths.tolist() == [bound]


def _models():
    """Random tiny ST / NMST models (decoder-only and encoder-decoder) and the prompts to decode."""
    for family in ("gpt2", "t5"):
        for seed in (0, 1):
            ids, mask = left_padded_prompts(seed=seed)
            if family == "t5":
                mask = mask.flip(1)
                ids = torch.where(mask.bool(), ids.flip(1), 0)
            for kind in ("st", "nmst"):
                for epsilon in (0.5, 0.1, 0.01):
                    base = tiny_model(family, seed=seed, eos_boost=0.0)
                    yield make_self_terminating(base, kind=kind, epsilon=epsilon, eos_token_id=1), ids, mask


@pytest.mark.parametrize("num_beams", [2, 4])
def test_beam_search_with_early_stopping_ends_within_the_bound_plus_beams(num_beams):
    for model, ids, mask in _models():
        bound = termination_bound(model.epsilon)
        out = generate(model, ids, mask, num_beams=num_beams, num_return_sequences=num_beams, early_stopping=True,
                       length_penalty=2.0, max_new_tokens=3 * bound + 20, return_dict_in_generate=True)
        assert out.terminated.all() and int(out.lengths.max()) <= bound + num_beams - 1


@pytest.mark.parametrize("early_stopping", [False, "never"])
@pytest.mark.parametrize("length_penalty", [0.0, -1.0])
def test_beam_search_without_a_positive_length_penalty_returns_a_best_hypothesis_within_the_bound(
        length_penalty, early_stopping):
    for model, ids, mask in _models():
        bound = termination_bound(model.epsilon)
        out = generate(model, ids, mask, num_beams=4, length_penalty=length_penalty, early_stopping=early_stopping,
                       max_new_tokens=3 * bound + 20, return_dict_in_generate=True)
        assert out.terminated.all() and int(out.lengths.max()) <= bound


@pytest.mark.parametrize("num_beams", [2, 4])
def test_the_papers_beam_rule_ends_within_the_bound(num_beams):
    for model, ids, mask in _models():
        bound = termination_bound(model.epsilon)
        out = generate(model, ids, mask, num_beams=num_beams, beam_rule="papers", max_new_tokens=3 * bound + 20,
                       return_dict_in_generate=True)
        assert out.terminated.all() and int(out.lengths.max()) <= bound


def test_a_positive_length_penalty_is_not_covered():
    """The README's exception: with length_penalty > 0 and the default early_stopping a longer hypothesis can
    win (here 142 tokens where T = 69), so such beam searches are bounded by max_new_tokens only."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        longest = max(
            int(generate(model, ids, mask, num_beams=4, length_penalty=2.0, max_new_tokens=3 * 69 + 20,
                         return_dict_in_generate=True).lengths.max())
            for model, ids, mask in _models() if model.epsilon == 0.01)
    assert longest > termination_bound(0.01)
