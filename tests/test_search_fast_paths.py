"""The fast paths change nothing: dropping finished rows (compaction) gives the tokens of keeping them.

``drop_finished=True`` takes finished rows (prompts, in beam search) out of the batch and the model state;
``drop_finished=False`` keeps them, fed with pad, as transformers does. Greedy, beam search and seeded
sampling must give identical outputs either way, on every kind of model the library decodes: a
transformers decoder (tiny GPT-2), the library's LSTM LM, and the LSTM under a self-terminating NMST head.
Each setting is checked to make rows finish at different steps, so the compaction path really runs.
"""

from __future__ import annotations

import pytest
import torch

from decoding.generate import generate
from decoding.models import lstm_lm
from tests.tiny_models import left_padded_prompts, tiny_model

MAX_NEW = 40
LSTM_VOCAB, LSTM_EOS, LSTM_PAD = 40, 1, 0

SETTINGS = {
    "greedy": {},
    "beam3": {"num_beams": 3},
    "beam2-early-n2": {"num_beams": 2, "early_stopping": True, "num_return_sequences": 2},
    "sample": {"do_sample": True, "top_k": 0},
    "nucleus-n2": {"do_sample": True, "top_p": 0.8, "top_k": 0, "num_return_sequences": 2},
    "consistent-top-k": {"do_sample": True, "top_k": 3, "consistent": True},
    "beam-sample": {"do_sample": True, "num_beams": 2, "top_k": 0},
}


def tiny_lstm(*, head: str = "vanilla", eos_bias: float = 4.0) -> torch.nn.Module:
    """A 1-layer LSTM LM with random weights scaled into a chaotic regime and a boosted eos bias, so that
    greedy rows stop after different numbers of steps (an untouched random LSTM collapses to one state)."""
    torch.manual_seed(0)
    model = lstm_lm(LSTM_VOCAB, eos_token_id=LSTM_EOS, pad_token_id=LSTM_PAD, hidden_size=16, num_layers=1,
                    dropout=0.0, head=head, epsilon=0.02 if head != "vanilla" else None)
    with torch.no_grad():
        model.embedding.weight.mul_(30.0)
        for name, weight in model.rnn.named_parameters():
            if "weight" in name:
                weight.mul_(5.0)
        model.output.bias[LSTM_EOS] = eos_bias
    return model.eval()


def lstm_prompts(batch: int = 6) -> tuple[torch.LongTensor, torch.LongTensor]:
    """Left-padded prompts of lengths 3..5 avoiding eos and pad."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, LSTM_VOCAB, (batch, 5), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        ids[row, : row % 3], mask[row, : row % 3] = LSTM_PAD, 0
    return ids, mask


def lstm_nmst() -> torch.nn.Module:
    """The LSTM under a self-terminating NMST head; the eos bias is lowered so that the head's growing
    lower bound on p(eos), not the bias, ends most rows."""
    return tiny_lstm(head="nmst", eos_bias=-5.0)


MODELS = {
    "gpt2": (lambda: tiny_model("gpt2"), lambda: left_padded_prompts(batch=6), {}),
    "lstm": (tiny_lstm, lstm_prompts, {"eos_token_id": LSTM_EOS, "pad_token_id": LSTM_PAD}),
    "lstm-nmst": (lstm_nmst, lstm_prompts, {"eos_token_id": LSTM_EOS, "pad_token_id": LSTM_PAD}),
}


def _decode(model, ids, mask, ids_options, setting: str, drop: bool):
    options = dict(SETTINGS[setting])
    consistent = options.pop("consistent", False)
    return generate(model, ids, mask, max_new_tokens=MAX_NEW, drop_finished=drop, consistent=consistent,
                    return_dict_in_generate=True, generator=torch.Generator().manual_seed(5), **ids_options,
                    **options)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("kind", list(MODELS))
def test_compaction_gives_the_tokens_of_keeping_finished_rows(kind, setting):
    build, prompts, ids_options = MODELS[kind]
    model = build()
    ids, mask = prompts()
    dropped = _decode(model, ids, mask, ids_options, setting, drop=True)
    kept = _decode(model, ids, mask, ids_options, setting, drop=False)
    assert torch.equal(dropped.sequences, kept.sequences)
    assert torch.equal(dropped.lengths, kept.lengths)
    assert torch.equal(dropped.terminated, kept.terminated)
    if dropped.sequences_scores is not None:
        assert torch.allclose(dropped.sequences_scores, kept.sequences_scores)


@pytest.mark.parametrize("kind", list(MODELS))
def test_rows_finish_at_different_steps(kind):
    """Without this the equality above would not exercise the compaction path."""
    build, prompts, ids_options = MODELS[kind]
    model = build()
    ids, mask = prompts()
    for setting in ("greedy", "sample"):
        out = _decode(model, ids, mask, ids_options, setting, drop=True)
        assert out.terminated.any(), setting
        assert out.lengths.unique().numel() > 1, setting


def test_self_terminating_rows_all_stop_and_compaction_agrees():
    model = lstm_nmst()
    ids, mask = lstm_prompts(batch=8)
    options = {"eos_token_id": LSTM_EOS, "pad_token_id": LSTM_PAD}
    runs = [_decode(model, ids, mask, options, "sample", drop=drop) for drop in (True, False)]
    # NMST: p(eos) >= 1 - (1 - 0.02)^t, so sampled rows stop long before 40 steps with high probability
    assert runs[0].terminated.all()
    assert torch.equal(runs[0].sequences, runs[1].sequences)


def test_samples_do_not_depend_on_which_rows_are_still_running():
    """Each row consumes its own uniform from a draw made for all rows: decoding a prompt alone (with the
    same generator state for its row index) reproduces its row of the batch."""
    model = tiny_lstm()
    ids, mask = lstm_prompts()
    options = {"eos_token_id": LSTM_EOS, "pad_token_id": LSTM_PAD, "do_sample": True, "top_k": 0}
    batch = generate(model, ids, mask, max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(1),
                     return_dict_in_generate=True, **options)
    # same batch, the first row finishing at step 1 by construction (eos forced), others unchanged
    first_row_done = generate(model, ids, mask, max_new_tokens=MAX_NEW, generator=torch.Generator().manual_seed(1),
                              return_dict_in_generate=True, logits_processor=[_ForceEosOnRow0()], **options)
    assert int(first_row_done.lengths[0]) == 1
    for row in range(1, ids.shape[0]):
        n = int(batch.lengths[row])
        assert int(first_row_done.lengths[row]) == n
        assert torch.equal(first_row_done.sequences[row, ids.shape[1]:ids.shape[1] + n],
                           batch.sequences[row, ids.shape[1]:ids.shape[1] + n])


class _ForceEosOnRow0:
    """Makes eos the only choice for the first row of the batch at the first step."""

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != 5 or scores.shape[0] != 6:
            return scores
        scores = scores.clone()
        scores[0] = float("-inf")
        scores[0, LSTM_EOS] = 0.0
        return scores


class _NaNAtStep2:
    """A step model whose logits hold one NaN from the second generated token on."""

    vocab_size = 5

    def logits(self, rows: int) -> torch.Tensor:
        return torch.tensor([-20.0, -20.0, 1.0, 0.0, 0.0]).expand(rows, -1).clone()  # eos (0) never chosen

    def prefill(self, input_ids, attention_mask):
        return self.logits(input_ids.shape[0]), 0, input_ids

    def step(self, tokens, state):
        logits = self.logits(tokens.shape[0])
        if state >= 1:
            logits[0, 3] = float("nan")
        return logits, state + 1

    def select(self, state, index):
        return state


@pytest.mark.parametrize("options", [{}, {"do_sample": True}, {"num_beams": 2}])
def test_nan_logits_are_caught_on_every_path(options):
    with pytest.raises(FloatingPointError, match="step 2"):
        generate(_NaNAtStep2(), torch.full((2, 1), 4), max_new_tokens=6, eos_token_id=0, pad_token_id=1,
                 generator=torch.Generator().manual_seed(0), **options)


@pytest.mark.parametrize("options", [{}, {"do_sample": True}, {"num_beams": 2}])
def test_a_row_with_no_token_left_is_caught_on_every_path(options):
    def ban_everything(input_ids, scores):
        return torch.full_like(scores, float("-inf"))

    with pytest.raises(RuntimeError, match="no token left"):
        generate(_NaNAtStep2(), torch.full((2, 1), 4), max_new_tokens=6, eos_token_id=0, pad_token_id=1,
                 logits_processor=[ban_everything], generator=torch.Generator().manual_seed(0), **options)


class _SharedLogits:
    """A step model that hands out the same logits tensor at every call (it does not set fresh_logits)."""

    def __init__(self, vocab: int = 12, eos: int = 1) -> None:
        self.vocab_size = vocab
        self.logits = torch.zeros(2, vocab)
        self.logits[:, eos] = 5.0  # eos is the argmax: only min_new_tokens holds it back
        self.logits[:, 3] = 1.0

    def prefill(self, input_ids, attention_mask):
        return self.logits, None, input_ids

    def step(self, tokens, state):
        return self.logits, state

    def select(self, state, index):
        return state


def test_min_new_tokens_never_writes_into_logits_a_step_model_may_hold():
    model = _SharedLogits()
    before = model.logits.clone()
    out = generate(model, torch.tensor([[4, 5], [6, 7]]), max_new_tokens=6, min_new_tokens=3,
                   eos_token_id=1, pad_token_id=0, return_dict_in_generate=True)
    assert torch.equal(model.logits, before)
    assert out.sequences[:, 2:].tolist() == [[3, 3, 3, 1]] * 2  # eos banned for 3 tokens, then chosen


class _NotFresh:
    """The same step model without ``fresh_logits``: the loop copies the scores instead."""

    def __init__(self, inner) -> None:
        self.inner, self.vocab_size = inner, inner.vocab_size

    def prefill(self, input_ids, attention_mask):
        return self.inner.prefill(input_ids, attention_mask)

    def step(self, tokens, state):
        return self.inner.step(tokens, state)

    def select(self, state, index):
        return self.inner.select(state, index)


@pytest.mark.parametrize("setting", ["greedy", "beam3", "sample"])
def test_in_place_eos_ban_gives_the_tokens_of_the_copying_ban(setting):
    from decoding.adapters import hf_step_model

    model = tiny_model("gpt2")
    step_model = hf_step_model(model)
    assert step_model.fresh_logits and not hasattr(_NotFresh(step_model), "fresh_logits")
    input_ids, attention_mask = left_padded_prompts()
    options = dict(SETTINGS[setting], max_new_tokens=12, min_new_tokens=8, return_dict_in_generate=True)
    outputs = [
        generate(candidate, input_ids, attention_mask, generator=torch.Generator().manual_seed(0),
                 eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id, **options)
        for candidate in (step_model, _NotFresh(step_model))
    ]  # fmt: skip
    assert torch.equal(outputs[0].sequences, outputs[1].sequences)
    assert (outputs[0].lengths >= 8).all()
    options.pop("min_new_tokens")
    unbanned = generate(step_model, input_ids, attention_mask, generator=torch.Generator().manual_seed(0),
                        eos_token_id=model.config.eos_token_id, pad_token_id=model.config.pad_token_id, **options)
    assert (unbanned.lengths < 8).any()  # the ban really held some row back
