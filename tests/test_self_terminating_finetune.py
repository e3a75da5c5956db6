"""The self-terminating fine-tuning recipe, the epsilon helper, and MGS against non-termination."""

from __future__ import annotations

import copy
import math

import pytest
import torch

from decoding.models import rnn_lm
from decoding.self_terminating import SelfTerminatingLM, termination_bound
from training.lm import collate_lm_batch, evaluate_perplexity
from training.mgs import MGSConfig, MGSStep
from training.prompt_costs import Prompts, PromptTask, PromptTaskBatch, mean_cost
from training.self_terminating_finetune import (choose_epsilon, finetune_self_terminating, perplexity_tax,
                                                sampled_nontermination_bound)

from .tiny_models import EOS, PAD, VOCAB, tiny_model


def counting_lines(count: int, *, seed: int, vocab: int = VOCAB, eos: int = EOS) -> list[list[int]]:
    """Lines that count up (mod the vocabulary, skipping ids < 3) from a random start, 5-11 tokens, no eos."""
    generator = torch.Generator().manual_seed(seed)
    lines = []
    for _ in range(count):
        start = int(torch.randint(3, vocab, (1,), generator=generator))
        length = int(torch.randint(5, 12, (1,), generator=generator))
        lines.append([3 + (start + i) % (vocab - 3) for i in range(length)])
    return lines


def _held_out(lines: list[list[int]]) -> list[dict[str, torch.Tensor]]:
    rows = [line + [EOS] for line in lines]
    return [collate_lm_batch(rows[i : i + 8], pad_token_id=PAD) for i in range(0, len(rows), 8)]


@pytest.mark.parametrize("kind", ["st", "nmst"])
def test_recipe_lowers_held_out_loss_and_round_trips(kind: str, tmp_path) -> None:
    train, valid = counting_lines(64, seed=0), _held_out(counting_lines(16, seed=1))
    converted = finetune_self_terminating(copy.deepcopy(tiny_model("gpt2")), train, kind=kind, epsilon=1e-2,
                                          steps=0, progress=False)  # fmt: skip
    tuned = finetune_self_terminating(tiny_model("gpt2"), train, kind=kind, epsilon=1e-2, steps=150, lr=3e-3,
                                      batch_size=8, progress=False)  # fmt: skip
    before, after = math.log(evaluate_perplexity(converted, valid)), math.log(evaluate_perplexity(tuned, valid))
    assert after < before - 1.0  # nats per token: the pattern and where lines end are learnt
    tuned.save_pretrained(tmp_path)
    loaded = SelfTerminatingLM.from_pretrained(tmp_path)
    assert (loaded.kind, loaded.epsilon, loaded.eos_token_id) == (kind, 1e-2, EOS)
    assert evaluate_perplexity(loaded, valid) == pytest.approx(math.exp(after), rel=1e-5)


def test_fitted_eos_row_starts_near_the_models_stopping_odds() -> None:
    lines = counting_lines(32, seed=2)
    batch = collate_lm_batch([line + [EOS] for line in lines], pad_token_id=PAD)
    base = tiny_model("gpt2")
    with torch.no_grad():
        logits = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    real = batch["attention_mask"].bool() & (batch["input_ids"] != EOS)  # positions predicting a token
    others = torch.cat([logits[..., :EOS], logits[..., EOS + 1 :]], dim=-1)
    target = (logits[..., EOS] - torch.logsumexp(others, dim=-1))[real]  # the model's eos log-odds
    errors = {}
    for init in ("keep", "fit"):
        model = finetune_self_terminating(copy.deepcopy(base), lines, kind="nmst", epsilon=1e-6, steps=0,
                                          eos_init=init, progress=False)  # fmt: skip
        with torch.no_grad():  # NMST at t ~ 1 with a tiny eps: p(eos) = sigmoid(eos logit)
            log_probs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        p_eos = log_probs[..., EOS].exp()[real].double().clamp(1e-12, 1 - 1e-12)
        errors[init] = float((torch.log(p_eos) - torch.log1p(-p_eos) - target).abs().mean())
    assert errors["fit"] < 0.5 * errors["keep"]


def test_recipe_rejects_bad_input() -> None:
    model = tiny_model("gpt2")
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        finetune_self_terminating(model, [[3, 4]], kind="st", epsilon=1e-3, steps=-1)
    with pytest.raises(ValueError, match="eos_init"):
        finetune_self_terminating(model, [[3, 4]], kind="st", epsilon=1e-3, eos_init="zero")
    with pytest.raises(ValueError, match="sequences is empty"):
        finetune_self_terminating(model, [], kind="st", epsilon=1e-3)
    with pytest.raises(ValueError, match=r"sequences\[1\]"):
        finetune_self_terminating(model, [[3, 4, 5], [3]], kind="nmst", epsilon=1e-3, context_length=2)
    with pytest.raises(ValueError, match="epsilon"):
        finetune_self_terminating(model, [[3, 4]], kind="st", epsilon=0.0)
    with pytest.raises(ValueError, match="selected no parameter"):
        finetune_self_terminating(model, [[3, 4]], kind="st", epsilon=1e-3, trainable=lambda name: False,
                                  progress=False)  # fmt: skip


# ------------------------------------------------------------------------------------------ epsilon
def test_perplexity_tax_and_sampling_bound_by_hand() -> None:
    # lengths 3 and 5: pairs 3 + 10 = 13 over 8 tokens
    assert perplexity_tax([3, 5], 0.01) == pytest.approx(math.exp(-math.log(0.99) * 13 / 8))
    assert perplexity_tax([1, 1], 0.5) == 1.0  # a lone eos pays nothing
    assert sampled_nontermination_bound(0.1, 3) == pytest.approx(0.9**6)
    with pytest.raises(ValueError, match="lengths"):
        perplexity_tax([3, 0], 0.01)
    with pytest.raises(ValueError, match="max_new_tokens"):
        sampled_nontermination_bound(0.1, 0)


def test_choose_epsilon_is_the_largest_meeting_both_limits() -> None:
    lengths = list(range(10, 110)) + [400]
    for budget in (0.001, 0.05, 10.0):
        choice = choose_epsilon(lengths, quantile=0.99, max_perplexity_increase=budget)
        assert choice.tail_length == 109
        assert choice.termination_bound == termination_bound(choice.epsilon) >= 109
        assert choice.perplexity_factor <= 1 + budget + 1e-12
        if choice.limited_by == "perplexity":  # any larger eps costs more than the budget
            assert perplexity_tax(lengths, choice.epsilon * (1 + 1e-9)) > 1 + budget
        else:  # p(eos) >= 1/2 is forced exactly at the tail length: ln 2 / -ln(1 - eps) = 109
            assert math.log(2) / -math.log1p(-choice.epsilon) == pytest.approx(109, rel=1e-12)
    assert choose_epsilon(lengths, max_perplexity_increase=0.001).limited_by == "perplexity"
    assert choose_epsilon(lengths, max_perplexity_increase=10.0).limited_by == "tail"
    with pytest.raises(ValueError, match="quantile"):
        choose_epsilon(lengths, quantile=0.0)
    with pytest.raises(ValueError, match="max_perplexity_increase"):
        choose_epsilon(lengths, max_perplexity_increase=0.0)


# -------------------------------------------------------------------------------------------- MGS
def test_mgs_against_nontermination_teaches_a_model_that_never_stops_to_stop() -> None:
    vocab, eos = 12, 0
    torch.manual_seed(0)
    model = rnn_lm(vocab, eos_token_id=eos, hidden_size=16, num_layers=1, dropout=0.0)
    with torch.no_grad():
        model.output.bias[eos] = -6.0  # eos is never the argmax: every greedy decode runs to the cap
    lines = [line + [eos] for line in counting_lines(32, seed=3, vocab=vocab, eos=eos)]
    prompts = Prompts(torch.tensor([line[:3] for line in lines]), torch.tensor([len(line) - 3 for line in lines]))
    task = PromptTask(loss=lambda m, batch: m(**batch).loss, eos_token_id=eos, pad_token_id=eos,
                      cost="nontermination", max_length_factor=1.5)  # fmt: skip
    batch = PromptTaskBatch(collate_lm_batch(lines, pad_token_id=eos), prompts)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.05)
    step, generator = MGSStep(task, MGSConfig(num_candidates=4)), torch.Generator().manual_seed(0)
    terminated = [1.0 - step(model, batch, optimizer, generator=generator)["cost_before"] for _ in range(30)]
    terminated.append(1.0 - float(task.decode_costs(model, batch, generator=None).mean()))
    assert terminated[0] == 0.0  # nothing stops at first
    assert min(terminated[-5:]) >= 0.75  # most decodes stop after a few dozen updates, and stay stopped


def test_mean_cost_and_prompt_task_checks() -> None:
    with pytest.raises(ValueError, match="token-level"):
        mean_cost(("nontermination", "bleu"))
    with pytest.raises(ValueError, match="token-level"):
        PromptTask(loss=lambda m, b: m(**b).loss, eos_token_id=0, pad_token_id=0, cost="bleu")
    with pytest.raises(ValueError, match="reference_lengths"):
        Prompts(torch.ones(2, 3, dtype=torch.long), torch.tensor([1]))


def test_a_share_of_prompts_keeps_the_whole_batch_cap() -> None:
    task = PromptTask(loss=lambda m, b: m(**b).loss, eos_token_id=0, pad_token_id=0, weight=len)
    prompts = Prompts(torch.arange(8).view(4, 2), torch.tensor([2, 8, 3, 1]))
    share = PromptTaskBatch([1, 2, 3], prompts).rows(2, 4)
    assert share.prompts.input_ids.tolist() == [[4, 5], [6, 7]] and share.prompts.reference_lengths.tolist() == [3, 1]
    assert task.max_new_tokens(share.prompts) == task.max_new_tokens(prompts) == 12  # 1.5 x 8, not 1.5 x 3
    assert task.loss_weight(share) == 3.0  # weight of the whole mle part: the loss shares it itself
    with pytest.raises(ValueError, match="a share needs a prompt"):
        prompts.rows(2, 2)
    with pytest.raises(TypeError, match="needs weight="):
        PromptTask(loss=task.loss, eos_token_id=0, pad_token_id=0).loss_weight(share)
