"""The decode loops on hand-built step models, where the right answer is known exactly; bad input."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from decoding.generate import generate
from tests.tiny_models import tiny_model

EOS_ID, A, B = 0, 1, 2


class TableModel:
    """A step model whose next-token distribution depends only on the step: ``table[t]`` (probabilities)."""

    def __init__(self, table: list[list[float]]) -> None:
        self.log_table = torch.tensor(table).log()
        self.vocab_size = self.log_table.shape[1]

    def prefill(self, input_ids, attention_mask):
        step = torch.zeros(input_ids.shape[0], dtype=torch.long)
        return self.log_table[step], step, input_ids

    def step(self, tokens, state):
        state = (state + 1).clamp_max(self.log_table.shape[0] - 1)
        return self.log_table[state], state

    def select(self, state, index):
        return state[index]


TABLE = [
    [0.1, 0.6, 0.3],          # step 0: eos .1, a .6, b .3
    [0.5, 0.3, 0.2],          # step 1
    [1 - 2e-6, 1e-6, 1e-6],   # step 2: eos (almost) surely
]


@pytest.mark.parametrize("length_penalty", [1.0, 0.0])
def test_beam_search_hypotheses_and_scores_by_hand(length_penalty):
    ln = math.log
    # Step 0 keeps a, b running (eos ranks third, outside the top num_beams, so it is not kept).
    # Step 1: "a eos" (ln .6 + ln .5) finishes; "a a", "a b" keep running. Step 2: both end with eos.
    finished = {
        (A, EOS_ID): (ln(0.6) + ln(0.5), 2),
        (A, A, EOS_ID): (ln(0.6) + ln(0.3) + ln(1 - 2e-6), 3),
        (A, B, EOS_ID): (ln(0.6) + ln(0.2) + ln(1 - 2e-6), 3),
    }
    scored = sorted(((s / n ** length_penalty, h) for h, (s, n) in finished.items()), reverse=True)[:2]
    out = generate(TableModel(TABLE), torch.tensor([[A]]), num_beams=2, num_return_sequences=2,
                   length_penalty=length_penalty, early_stopping=True, max_new_tokens=5, eos_token_id=EOS_ID,
                   pad_token_id=B, return_dict_in_generate=True)
    for row, (score, hypothesis) in enumerate(scored):
        n = len(hypothesis)
        assert out.sequences[row, 1:1 + n].tolist() == list(hypothesis)
        assert out.sequences_scores[row].item() == pytest.approx(score, rel=1e-5)
        assert out.lengths[row] == n and out.terminated[row]


def test_greedy_on_the_table_and_length_cap():
    out = generate(TableModel(TABLE), torch.tensor([[A], [A]]), max_new_tokens=5, eos_token_id=EOS_ID,
                   pad_token_id=B, return_dict_in_generate=True)
    assert out.sequences[:, 1:].tolist() == [[A, EOS_ID], [A, EOS_ID]]
    assert out.lengths.tolist() == [2, 2] and out.terminated.all()
    capped = generate(TableModel(TABLE), torch.tensor([[A]]), max_new_tokens=1, eos_token_id=EOS_ID,
                      pad_token_id=B, return_dict_in_generate=True)
    assert capped.sequences[0, 1:].tolist() == [A] and not capped.terminated[0] and capped.lengths[0] == 1


class LoopingModel:
    """Top-2 is always {a, b}; eos has a small but nonzero probability (about 0.005) at every step."""

    vocab_size = 6

    def __init__(self) -> None:
        probs = torch.tensor([0.005, 0.55, 0.40, 0.015, 0.015, 0.015])
        self.logits = probs.log()

    def prefill(self, input_ids, attention_mask):
        return self.logits.expand(input_ids.shape[0], -1), None, input_ids

    def step(self, tokens, state):
        return self.logits.expand(tokens.shape[0], -1), None

    def select(self, state, index):
        return None


def test_top_k_loops_forever_but_consistent_top_k_terminates():
    prompts = torch.full((64, 1), A)
    common = dict(do_sample=True, top_k=2, max_new_tokens=3000, eos_token_id=EOS_ID, pad_token_id=B,
                  return_dict_in_generate=True)
    plain = generate(LoopingModel(), prompts, generator=torch.Generator().manual_seed(0), **common)
    fixed = generate(LoopingModel(), prompts, generator=torch.Generator().manual_seed(0), consistent=True,
                     **common)
    assert not plain.terminated.any() and (plain.lengths == 3000).all()
    # q(eos) = .005 / (.005 + .55 + .40) > .005 per step: P(no eos in 3000 steps) < 1e-6 per row
    assert fixed.terminated.all()
    assert (fixed.sequences[:, 1:][fixed.sequences[:, 1:] == EOS_ID].numel()) == 64


def test_consistent_nucleus_and_min_p_terminate_too():
    prompts = torch.full((32, 1), A)
    for options in ({"top_p": 0.5, "top_k": 0}, {"min_p": 0.5, "top_k": 0}, {"typical_p": 0.5, "top_k": 0}):
        out = generate(LoopingModel(), prompts, do_sample=True, max_new_tokens=3000, eos_token_id=EOS_ID,
                       pad_token_id=B, consistent=True, return_dict_in_generate=True,
                       generator=torch.Generator().manual_seed(1), **options)
        assert out.terminated.all(), options


class NaNModel(LoopingModel):
    def step(self, tokens, state):
        logits = self.logits.expand(tokens.shape[0], -1).clone()
        logits[0, 2] = float("nan")
        return logits, None


def test_nan_logits_raise_naming_the_step():
    with pytest.raises(FloatingPointError, match="step 1"):
        generate(NaNModel(), torch.full((2, 1), A), max_new_tokens=5, eos_token_id=EOS_ID, pad_token_id=B)


def test_row_with_no_token_left_raises():
    def ban_everything(input_ids, scores):
        return torch.full_like(scores, float("-inf"))

    with pytest.raises(RuntimeError, match="no token left"):
        generate(LoopingModel(), torch.full((2, 1), A), max_new_tokens=5, eos_token_id=EOS_ID,
                 pad_token_id=B, logits_processor=[ban_everything])


GPT2_IDS = torch.tensor([[5, 6, 7], [8, 9, 10]])


@pytest.mark.parametrize("options, error, pattern", [
    ({"do_sample": True, "top_k": -1}, ValueError, "top_k"),
    ({"do_sample": True, "top_p": 0.0}, ValueError, "top_p"),
    ({"do_sample": True, "top_p": 1.5}, ValueError, "top_p"),
    ({"do_sample": True, "min_p": 1.2}, ValueError, "min_p"),
    ({"do_sample": True, "typical_p": 0.0}, ValueError, "typical_p"),
    ({"do_sample": True, "epsilon_cutoff": -0.1}, ValueError, "epsilon_cutoff"),
    ({"do_sample": True, "eta_cutoff": -0.1}, ValueError, "eta_cutoff"),
    ({"do_sample": True, "temperature": 0.0}, ValueError, "temperature"),
    ({"do_sample": True, "temperature": -1.0}, ValueError, "temperature"),
    ({"num_beams": 0}, ValueError, "num_beams"),
    ({"num_beams": 2, "num_return_sequences": 3}, ValueError, "num_return_sequences"),
    ({"num_return_sequences": 2}, ValueError, "num_return_sequences"),
    ({"eos_token_id": 10_000}, ValueError, "eos_token_id"),
    ({"eos_token_id": None, "consistent": True, "do_sample": True}, ValueError, "eos"),
    ({"early_stopping": "sometimes", "num_beams": 2}, ValueError, "early_stopping"),
    ({"repetition_penalty": 0.0}, ValueError, "repetition_penalty"),
    ({"max_new_tokens": 0}, ValueError, "max_new_tokens"),
    ({"num_beam_groups": 2, "num_beams": 2}, NotImplementedError, "num_beam_groups"),
    ({"output_attentions": True}, NotImplementedError, "output_attentions"),
    ({"bad_words_ids": [[3, 10_000]]}, ValueError, "bad_words_ids"),
    ({"stop_strings": ["x"]}, ValueError, "tokenizer"),
    ({"not_an_option": 1}, TypeError, "not_an_option"),
    ({"generator": 7}, TypeError, "generator"),
])
def test_bad_options_raise_before_any_model_work(options, error, pattern):
    model = tiny_model("gpt2")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    options = dict(options)
    if "eos_token_id" in options and options["eos_token_id"] is None:
        model.generation_config.eos_token_id = None
        options.pop("eos_token_id")
    with pytest.raises(error, match=pattern):
        generate(model, GPT2_IDS, **{"max_new_tokens": 5, **options})
    assert not calls


def test_bad_inputs_raise():
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="attention_mask shape"):
        generate(model, GPT2_IDS, torch.ones(2, 4, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty"):
        generate(model, torch.zeros(2, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        generate(model, torch.tensor([[5, 10_000]]), max_new_tokens=3)
    with pytest.raises(TypeError, match="input_ids"):
        generate(model, torch.tensor([[5.0, 6.0]]), max_new_tokens=3)
    with pytest.warns(UserWarning, match="right padding"):  # transformers warns and decodes, so do we
        generate(model, GPT2_IDS, torch.tensor([[1, 1, 1], [1, 1, 0]]), max_new_tokens=3)
    with pytest.raises(ValueError, match="no real token"):
        generate(model, GPT2_IDS, torch.tensor([[1, 1, 1], [0, 0, 0]]), max_new_tokens=3)


def test_no_length_limit_falls_back_with_transformers_warning():
    model = tiny_model("gpt2", eos_boost=0.0)
    with pytest.warns(UserWarning, match="max_length"):
        out = generate(model, GPT2_IDS)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        expected = model.generate(GPT2_IDS)
    assert out.shape == expected.shape == (2, 3 + 20)
    with pytest.warns(UserWarning, match="max_length"):
        capped = generate(model, GPT2_IDS, do_sample=True, top_k=2, consistent=True,
                          generator=torch.Generator().manual_seed(0), return_dict_in_generate=True)
    assert (capped.lengths <= 20).all()


# The papers' beam rule (Welleck et al. 2020; Choi et al. 2023): stop at the first finished hypothesis.
EARLY_EOS_THEN_LOOP = [
    [0.3, 0.7 - 1e-6, 1e-6],      # step 0: eos is the 2nd best candidate
    [0.005, 0.99, 0.005],         # later: "a" forever, eos never in the top 2 of the live beam
]


def test_papers_beam_rule_returns_the_finished_short_hypothesis_not_the_unfinished_long_one():
    common = dict(num_beams=2, max_new_tokens=6, eos_token_id=EOS_ID, pad_token_id=B, return_dict_in_generate=True)
    hf_rule = generate(TableModel(EARLY_EOS_THEN_LOOP), torch.tensor([[A]]), **common)
    # transformers' rule: "a a a a a a" (unfinished, normalised score ~ -0.07) beats "eos" (ln .3 = -1.2)
    assert not hf_rule.terminated[0] and hf_rule.lengths[0] == 6
    papers = generate(TableModel(EARLY_EOS_THEN_LOOP), torch.tensor([[A]]), beam_rule="papers", **common)
    assert papers.terminated[0] and papers.lengths[0] == 1
    assert papers.sequences[0, 1:].tolist() == [EOS_ID]
    assert papers.sequences_scores[0].item() == pytest.approx(math.log(0.3), rel=1e-5)


def test_papers_beam_rule_ranks_finished_hypotheses_by_unnormalised_log_probability():
    table = [
        [1e-6, 0.5, 0.5 - 1e-6],  # step 0: a, b tie-ish; eos far behind
        [0.45, 0.35, 0.2],        # step 1: both beams can end; "a eos" and "b eos" are the top 2
    ]
    out = generate(TableModel(table), torch.tensor([[A]]), num_beams=2, max_new_tokens=6, eos_token_id=EOS_ID,
                   pad_token_id=B, return_dict_in_generate=True, beam_rule="papers")
    assert out.sequences[0, 1:].tolist() == [A, EOS_ID]
    assert out.sequences_scores[0].item() == pytest.approx(math.log(0.5) + math.log(0.45), rel=1e-5)


def test_papers_beam_rule_without_a_finished_hypothesis_returns_the_best_running_beam():
    table = [[1e-3, 0.6, 0.399], [1e-3, 0.3, 0.699]]
    out = generate(TableModel(table), torch.tensor([[A], [A]]), num_beams=2, max_new_tokens=4, eos_token_id=EOS_ID,
                   pad_token_id=B, return_dict_in_generate=True, beam_rule="papers")
    assert not out.terminated.any() and out.lengths.tolist() == [4, 4]
    assert out.sequences[0, 1:].tolist() == [A, B, B, B]
    expected = math.log(0.6) + 3 * math.log(0.699)
    assert out.sequences_scores[0].item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bad", [dict(beam_rule="fairseq"), dict(beam_rule="papers", do_sample=True),
                                 dict(beam_rule="papers", num_return_sequences=2),
                                 dict(beam_rule="papers", length_penalty=2.0),
                                 dict(beam_rule="papers", early_stopping=True)])
def test_papers_beam_rule_rejects_options_it_would_ignore(bad):
    with pytest.raises(ValueError, match="beam_rule|length_penalty|early_stopping"):
        generate(TableModel(TABLE), torch.tensor([[A]]), num_beams=2, max_new_tokens=4, eos_token_id=EOS_ID,
                 pad_token_id=B, **bad)


# ----------------------------------------------------------------------------------------- refill rule
def _options(**kwargs):
    from decoding.options import resolve_options

    model = type("Model", (), {"generation_config": None})()
    return resolve_options(model, prefix_length=1, vocab_size=3, is_encoder_decoder=False,
                           kwargs={"max_new_tokens": 4, "eos_token_id": EOS_ID, **kwargs})


def test_refill_blocker_names_what_keeps_rows_from_being_refilled():
    from dataclasses import replace

    from decoding.search import refill_blocker

    assert refill_blocker(_options(), batch_wide_processors=False) is None
    assert refill_blocker(_options(num_beams=2), batch_wide_processors=False) is None
    assert "processors" in refill_blocker(_options(), batch_wide_processors=True)
    assert "drop_finished" in refill_blocker(replace(_options(), drop_finished=False), batch_wide_processors=False)
    assert "stopping" in refill_blocker(replace(_options(), stopping_criteria=(lambda ids, scores: False,)),
                                        batch_wide_processors=False)
    assert "beam sampling" in refill_blocker(_options(num_beams=2, do_sample=True), batch_wide_processors=False)


@pytest.mark.parametrize("beams", [1, 2])
def test_a_search_refuses_a_refill_the_rule_forbids(beams):
    from decoding.search import Refill, beam_search, sample_search

    model = TableModel(TABLE)
    prefix = torch.tensor([[A]])
    logits, state, prefix = model.prefill(prefix, torch.ones_like(prefix))
    refill = Refill(admit=model.prefill, merge=lambda s, o: torch.cat([s, o]), prompts=1, capacity=2, threshold=1)
    search = beam_search if beams > 1 else sample_search
    with pytest.raises(ValueError, match="refill: .*processors"):
        search(model, logits, state, prefix, options=_options(num_beams=beams),
               processors=[lambda history, scores, prompt_index: scores], refill=refill)
