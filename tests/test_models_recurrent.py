"""The library's RNN / LSTM language models: configuration, forward, padding, step protocol, save/load."""

from __future__ import annotations

import pytest
import torch

from decoding.generate import generate
from decoding.models.recurrent import (
    RecurrentLM,
    RecurrentLMConfig,
    RecurrentStepModel,
    load_recurrent_lm,
    lstm_lm,
    rnn_lm,
    save_recurrent_lm,
)
from decoding.models.self_terminating import SelfTerminatingStepModel

VOCAB = 30
HEADS = [("vanilla", None), ("st", 0.1), ("nmst", 0.1)]


def small(cell: str, head: str = "vanilla", epsilon: float | None = None, seed: int = 0) -> RecurrentLM:
    torch.manual_seed(seed)
    build = rnn_lm if cell == "rnn" else lstm_lm
    return build(VOCAB, eos_token_id=0, pad_token_id=1, head=head, epsilon=epsilon, hidden_size=12).eval()


def left_padded(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(2, VOCAB, (4, 7), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    for row, padding in enumerate([0, 2, 5, 1]):
        mask[row, :padding] = 0
        ids[row, :padding] = 1
    return ids, mask


def test_defaults_follow_the_papers():
    rnn = rnn_lm(100, eos_token_id=0)
    assert isinstance(rnn.rnn, torch.nn.RNN) and rnn.rnn.nonlinearity == "tanh"
    assert (rnn.rnn.hidden_size, rnn.rnn.num_layers, rnn.rnn.dropout, rnn.dropout.p) == (256, 2, 0.3, 0.3)
    lstm = lstm_lm(100, eos_token_id=0)
    assert isinstance(lstm.rnn, torch.nn.LSTM)
    assert (lstm.rnn.hidden_size, lstm.rnn.num_layers, lstm.rnn.dropout, lstm.dropout.p) == (512, 2, 0.5, 0.5)
    for model in (rnn, lstm):
        assert model.output.weight is model.embedding.weight  # tied
        assert model.generation_config.eos_token_id == 0 and model.generation_config.pad_token_id == 0


@pytest.mark.parametrize(
    "changes, argument",
    [
        ({"head": "softmax"}, "head"),
        ({"head": "st"}, "epsilon"),
        ({"head": "nmst", "epsilon": 1.0}, "epsilon"),
        ({"head": "vanilla", "epsilon": 0.1}, "epsilon"),
        ({"eos_token_id": 30}, "eos_token_id"),
        ({"pad_token_id": -1}, "pad_token_id"),
        ({"cell": "gru"}, "cell"),
        ({"dropout": 1.0}, "dropout"),
    ],
)
def test_bad_configuration_is_rejected(changes, argument):
    options = {"vocab_size": VOCAB, "eos_token_id": 0, **changes}
    with pytest.raises(ValueError, match=argument):
        RecurrentLMConfig(**options)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("head, epsilon", HEADS)
def test_forward_gives_log_probs_and_the_shifted_nll(cell, head, epsilon):
    model = small(cell, head, epsilon)
    ids = torch.randint(2, VOCAB, (3, 9), generator=torch.Generator().manual_seed(1))
    labels = ids.clone()
    labels[:, :3] = -100
    out = model(ids, labels=labels)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(3, 9))
    targets = labels[:, 1:]
    keep = targets != -100
    nll = -out.logits[:, :-1][keep].gather(-1, targets[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, nll)
    if head != "vanilla":  # positions predicting context tokens have p(eos) = 0
        assert torch.equal(out.logits[:, :2, 0].exp(), torch.zeros(3, 2))
        assert bool((out.logits[:, 2:, 0].exp() > 0).all())


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_padding_does_not_change_a_row(cell):
    model = small(cell, "nmst", 0.1)
    ids, mask = left_padded()
    batched = model(ids, mask).logits
    for row in range(4):
        alone = model(ids[row][mask[row].bool()].unsqueeze(0)).logits[0]
        torch.testing.assert_close(batched[row][mask[row].bool()], alone, atol=1e-6, rtol=1e-5)
    right = torch.full_like(ids, 1)  # the same rows, right-padded
    right_mask = torch.zeros_like(mask)
    for row in range(4):
        real = ids[row][mask[row].bool()]
        right[row, : len(real)], right_mask[row, : len(real)] = real, 1
    right_out = model(right, right_mask).logits
    for row in range(4):
        torch.testing.assert_close(right_out[row][right_mask[row].bool()], batched[row][mask[row].bool()])


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("head, epsilon", HEADS)
def test_batched_prefill_equals_one_by_one(cell, head, epsilon):
    step_model = small(cell, head, epsilon).as_step_model()
    ids, mask = left_padded(2)
    logits, _, prefix = step_model.prefill(ids, mask)
    assert torch.equal(prefix, ids)
    for row in range(4):
        real = ids[row][mask[row].bool()].unsqueeze(0)
        alone, _, _ = step_model.prefill(real, torch.ones_like(real))
        torch.testing.assert_close(logits[row], alone[0], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
@pytest.mark.parametrize("head, epsilon", HEADS)
def test_steps_equal_the_forward(cell, head, epsilon):
    model = small(cell, head, epsilon, seed=3)
    step_model = model.as_step_model()
    assert isinstance(step_model, RecurrentStepModel if head == "vanilla" else SelfTerminatingStepModel)
    ids, mask = left_padded(4)
    logits, state, _ = step_model.prefill(ids, mask)
    outputs, tokens = [logits], torch.randint(2, VOCAB, (4, 5), generator=torch.Generator().manual_seed(5))
    for column in range(tokens.shape[1]):
        logits, state = step_model.step(tokens[:, column], state)
        outputs.append(logits)
    stepped = torch.stack(outputs, 1)  # [B, 6, V]
    if head == "vanilla":
        stepped = torch.log_softmax(stepped, -1)
    labels = torch.cat([torch.full_like(ids, -100), tokens], 1)
    full_mask = torch.cat([mask, torch.ones_like(tokens)], 1)
    full = model(torch.cat([ids, tokens], 1), full_mask, labels=labels).logits[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_select_reorders_the_recurrent_state(cell):
    step_model = small(cell).as_step_model()
    ids, mask = left_padded(6)
    _, state, _ = step_model.prefill(ids, mask)
    index = torch.tensor([3, 3, 0])
    tokens = torch.tensor([5, 6, 7, 8])
    after_select, _ = step_model.step(tokens[index], step_model.select(state, index))
    after_all, _ = step_model.step(tokens, state)
    torch.testing.assert_close(after_select, after_all[index])


@pytest.mark.parametrize("cell", ["rnn", "lstm"])
def test_greedy_generate_matches_argmax_of_the_forward(cell):
    model = small(cell, seed=7)
    ids, mask = left_padded(8)
    out = generate(model, ids, mask, max_new_tokens=6, return_dict_in_generate=True)
    sequence, full_mask = ids, mask
    for _ in range(6):  # no cache: rerun the whole sequence every step
        following = model(sequence, full_mask).logits[:, -1].argmax(-1, keepdim=True)
        sequence = torch.cat([sequence, following], 1)
        full_mask = torch.cat([full_mask, torch.ones_like(following)], 1)
    for row in range(4):
        length = int(out.lengths[row])
        assert torch.equal(out.sequences[row, : ids.shape[1] + length], sequence[row, : ids.shape[1] + length])


def test_save_and_load_round_trip_exactly(tmp_path):
    model = small("lstm", "st", 0.05, seed=9)
    path = tmp_path / "lstm.pt"
    save_recurrent_lm(model, path)
    assert not (tmp_path / "lstm.pt.tmp").exists()
    loaded = load_recurrent_lm(path).eval()
    assert loaded.config == model.config
    assert loaded.output.weight is loaded.embedding.weight
    ids, mask = left_padded(10)
    assert torch.equal(loaded(ids, mask).logits, model(ids, mask).logits)


def test_empty_rows_are_rejected():
    model = small("rnn")
    ids, mask = left_padded()
    mask[2] = 0
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, mask)
