"""MLE training (training.lm): batches, perplexity, a short run on WikiText-2 for every head, checkpoints,
resuming, early stopping, transformers models."""

from __future__ import annotations

import math
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from decoding.models import lstm_lm, rnn_lm
from decoding.self_terminating import make_self_terminating
from training.lm import collate_lm_batch, evaluate_perplexity, train_lm

WIKITEXT = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "wikitext-2"
EOS, PAD, UNK = 0, 1, 2


def wikitext_lines(split: str, count: int) -> list[list[str]]:
    """The first ``count`` non-empty, non-heading lines of a split, as words (at most 30 each)."""
    path = WIKITEXT / f"{split}.txt"
    if not path.is_file():
        pytest.skip(f"WikiText-2 not found at {path}")
    lines = []
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            words = line.split()
            if words and words[0] != "=":
                lines.append(words[:30])
            if len(lines) == count:
                break
    return lines


@pytest.fixture(scope="module")
def wikitext_batches():
    """Word-level batches: vocabulary of the words seen twice in 300 training lines; eos ends each line."""
    train_lines, valid_lines = wikitext_lines("train", 300), wikitext_lines("valid", 60)
    counts = Counter(word for line in train_lines for word in line)
    vocab = {word: index + 3 for index, word in enumerate(sorted(w for w, c in counts.items() if c >= 2))}

    def batches(lines: list[list[str]]) -> list[dict[str, torch.Tensor]]:
        sequences = [[vocab.get(word, UNK) for word in line] + [EOS] for line in lines]
        return [collate_lm_batch(sequences[i : i + 20], pad_token_id=PAD) for i in range(0, len(sequences), 20)]

    return batches(train_lines), batches(valid_lines), len(vocab) + 3


def toy_batches(seed: int, count: int = 4, vocab: int = 12) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(count):
        lengths = torch.randint(3, 9, (5,), generator=generator).tolist()
        sequences = [torch.randint(3, vocab, (n,), generator=generator).tolist() + [EOS] for n in lengths]
        batches.append(collate_lm_batch(sequences, pad_token_id=PAD, context_lengths=[2] * 5))
    return batches


def test_collate_pads_right_and_masks_context_and_padding():
    batch = collate_lm_batch([[5, 6, 7, 0], [8, 0]], pad_token_id=PAD, context_lengths=[2, 0])
    assert batch["input_ids"].tolist() == [[5, 6, 7, 0], [8, 0, PAD, PAD]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 0], [8, 0, -100, -100]]
    with pytest.raises(ValueError, match="sequences"):
        collate_lm_batch([[1], []], pad_token_id=PAD)
    with pytest.raises(ValueError, match="context_lengths"):
        collate_lm_batch([[1, 2]], pad_token_id=PAD, context_lengths=[1, 1])


def test_perplexity_is_exp_of_the_mean_token_nll():
    torch.manual_seed(0)
    model = rnn_lm(12, eos_token_id=EOS, head="st", epsilon=0.1, hidden_size=8)
    batches = toy_batches(1, count=3)
    total, count = 0.0, 0
    with torch.no_grad():
        for batch in batches:
            log_probs = model.eval()(batch["input_ids"], batch["attention_mask"], labels=batch["labels"]).logits
            targets = batch["labels"][:, 1:]
            keep = targets != -100
            total -= float(log_probs[:, :-1][keep].gather(-1, targets[keep].unsqueeze(-1)).sum())
            count += int(keep.sum())
    assert evaluate_perplexity(model, batches) == pytest.approx(math.exp(total / count), rel=1e-5)


@pytest.mark.parametrize("build", [rnn_lm, lstm_lm])
@pytest.mark.parametrize("head, epsilon", [("vanilla", None), ("st", 1e-2), ("nmst", 1e-2)])
def test_short_mle_run_on_wikitext_lowers_validation_perplexity(wikitext_batches, build, head, epsilon):
    train, valid, vocab_size = wikitext_batches
    torch.manual_seed(0)
    model = build(vocab_size, eos_token_id=EOS, pad_token_id=PAD, head=head, epsilon=epsilon,
                  hidden_size=32, dropout=0.1)  # fmt: skip
    before = evaluate_perplexity(model, valid)
    history = train_lm(model, train, valid, epochs=2, lr=1e-2, progress=False)
    assert len(history.epochs) == 2
    assert history.best_valid_perplexity < 0.6 * before
    assert evaluate_perplexity(model, valid) == pytest.approx(history.best_valid_perplexity, rel=1e-6)


def test_resuming_from_a_checkpoint_equals_training_straight_through(tmp_path):
    def fresh():
        torch.manual_seed(0)
        return lstm_lm(12, eos_token_id=EOS, pad_token_id=PAD, head="nmst", epsilon=0.1, hidden_size=8, dropout=0.3)

    train, valid = toy_batches(2), toy_batches(3, count=2)
    straight = fresh()
    straight_history = train_lm(straight, train, valid, epochs=3, lr=1e-2, patience=5, progress=False)

    resumed = fresh()
    train_lm(resumed, train, valid, epochs=1, lr=1e-2, patience=5, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left
    torch.manual_seed(123)  # the checkpoint's RNG state, not this one, drives dropout after resuming
    resumed = fresh()
    resumed_history = train_lm(resumed, train, valid, epochs=3, lr=1e-2, patience=5, checkpoint_dir=tmp_path,
                               progress=False)  # fmt: skip
    assert resumed_history == straight_history
    for name, value in straight.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[name], value, atol=0, rtol=0)


def test_early_stopping_keeps_the_best_weights(tmp_path):
    """Training on token 5 only while validating on token 7 only: every epoch after the first is worse."""
    torch.manual_seed(0)
    model = rnn_lm(12, eos_token_id=EOS, pad_token_id=PAD, hidden_size=8, dropout=0.0)
    train = [collate_lm_batch([[5] * 6 + [EOS]] * 4, pad_token_id=PAD)] * 3
    valid = [collate_lm_batch([[7] * 6 + [EOS]] * 4, pad_token_id=PAD)]
    history = train_lm(model, train, valid, epochs=10, lr=1e-2, patience=2, checkpoint_dir=tmp_path, progress=False)
    assert history.stopped_early and len(history.epochs) == 3
    assert history.best_epoch == 1 and [record.improved for record in history.epochs] == [True, False, False]
    perplexities = [record.valid_perplexity for record in history.epochs]
    assert perplexities[0] < perplexities[1] < perplexities[2]
    assert evaluate_perplexity(model, valid) == pytest.approx(perplexities[0], rel=1e-6)  # best weights restored
    again = train_lm(model, train, valid, epochs=10, lr=1e-2, patience=2, checkpoint_dir=tmp_path, progress=False)
    assert again == history  # a finished run resumes as finished
    assert evaluate_perplexity(model, valid) == pytest.approx(perplexities[0], rel=1e-6)


def test_trains_a_transformers_self_terminating_model():
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=12, n_positions=32, n_embd=16, n_layer=1, n_head=2, eos_token_id=EOS)
    model = make_self_terminating(GPT2LMHeadModel(config), kind="st", epsilon=0.05)
    train, valid = toy_batches(6), toy_batches(7, count=2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        before = evaluate_perplexity(model, valid)
        history = train_lm(model, train, valid, epochs=3, lr=1e-2, progress=False)
    assert history.best_valid_perplexity < before


@pytest.mark.parametrize(
    "options, argument",
    [({"epochs": 0}, "epochs"), ({"lr": -1.0}, "lr"), ({"clip": 0.0}, "clip"), ({"patience": 0}, "patience"),
     ({"lr_decay": 1.5}, "lr_decay")],
)  # fmt: skip
def test_bad_options_are_rejected(options, argument):
    model = rnn_lm(12, eos_token_id=EOS, hidden_size=8)
    arguments = {"epochs": 1, "lr": 1e-3, **options}
    with pytest.raises(ValueError, match=argument):
        train_lm(model, toy_batches(0), toy_batches(1), progress=False, **arguments)


def test_scored_loss_equals_the_forward_loss_with_its_gradients():
    """RecurrentLM.scored_loss runs the output layer on fewer positions, for the same value and gradient."""
    for head, epsilon in (("vanilla", None), ("st", 0.1), ("nmst", 0.1)):
        torch.manual_seed(0)
        model = lstm_lm(12, eos_token_id=EOS, pad_token_id=PAD, head=head, epsilon=epsilon, hidden_size=8, dropout=0.0)
        batch = toy_batches(5)[0]
        full = model(**batch).loss
        (full_grad,) = torch.autograd.grad(full, model.output.weight)
        fast = model.scored_loss(**batch)
        (fast_grad,) = torch.autograd.grad(fast, model.output.weight)
        torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast_grad, full_grad, rtol=1e-4, atol=1e-7)


def test_loss_function_autocast_and_per_epoch_metrics_survive_a_resume(tmp_path):
    calls = []

    def loss_fn(model, batch):
        calls.append(torch.is_autocast_enabled("cpu"))
        return model.scored_loss(batch["input_ids"], batch["attention_mask"], batch["labels"])

    def probe(model, epoch):
        assert not model.training  # measured in eval mode
        return {"epoch_squared": epoch**2, "weight_norm": float(model.output.weight.detach().norm())}

    def fresh():
        torch.manual_seed(0)
        return rnn_lm(12, eos_token_id=EOS, pad_token_id=PAD, hidden_size=8, dropout=0.0)

    train, valid = toy_batches(2), toy_batches(3, count=2)
    options = dict(lr=1e-2, patience=5, progress=False, loss_fn=loss_fn, autocast_dtype=torch.bfloat16,
                   on_epoch_end=probe, checkpoint_dir=tmp_path)  # fmt: skip
    model = fresh()
    first = train_lm(model, train, valid, epochs=1, **options)
    assert model.training  # train mode restored after the probe
    assert calls and all(calls)  # training and validation both ran the function under autocast
    history = train_lm(fresh(), train, valid, epochs=2, **options)
    assert [e.metrics["epoch_squared"] for e in history.epochs] == [1.0, 4.0]
    assert history.epochs[0] == first.epochs[0]  # the resumed run kept epoch 1's metrics from the checkpoint
    assert history.epochs[1].metrics["weight_norm"] != history.epochs[0].metrics["weight_norm"]
