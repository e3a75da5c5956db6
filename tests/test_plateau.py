"""The plateau rule on synthetic validation curves, and the loop stopping on it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from training.parallel_text import encode_parallel, read_parallel
from training.loop import LoopConfig, train
from training.seq2seq import Seq2SeqSize, build_seq2seq
from training.plateau import PlateauRule
from training.steps import MLEStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "multi30k"


def curve(scores: list[float], every: int = 400) -> list[dict[str, float]]:
    return [{"update": every * (i + 1), "score": s} for i, s in enumerate(scores)]


def first_plateau(rule: PlateauRule, history: list[dict[str, float]]) -> int | None:
    """The update of the first validation after which the rule says 'plateaued'."""
    for n in range(1, len(history) + 1):
        if rule(history[:n]):
            return history[n - 1]["update"]
    return None


def test_worked_example_by_hand():
    rule = PlateauRule(window_share=0.2, min_gain=0.3, min_validations=5)
    history = curve([20, 28, 31, 32.0, 32.8, 32.9, 33.0])
    # window after 2,000 updates: (1,600, 2,000] -> 32.8 vs 32.0 before
    assert rule.gain(history[:5]) == pytest.approx(0.8) and not rule(history[:5])
    # after 2,400: (1,920, 2,400] holds 32.8 and 32.9 -> 0.9 over 32.0
    assert rule.gain(history[:6]) == pytest.approx(0.9) and not rule(history[:6])
    # after 2,800: (2,240, 2,800] holds 32.9 and 33.0 -> 0.2 over 32.8
    assert rule.gain(history[:7]) == pytest.approx(0.2) and rule(history[:7])


def test_saturating_curve_plateaus_once_the_slope_is_small_and_never_while_rising():
    rule = PlateauRule()
    # BLEU(u) = 35 (1 - exp(-u / 1500)), validated every 400 updates. After 8,400 updates the window
    # (6,720, 8,400] gains 35 (exp(-6400/1500) - exp(-8400/1500)) = 0.362 over the best before it; after
    # 8,800, (7,040, 8,800] gains 35 (exp(-6800/1500) - exp(-8800/1500)) = 0.277 <= 0.3.
    saturating = curve([35 * (1 - math.exp(-400 * (i + 1) / 1500)) for i in range(40)])
    assert rule.gain([h for h in saturating if h["update"] <= 8_400]) == pytest.approx(0.362, abs=1e-3)
    assert first_plateau(rule, saturating) == 8_800
    linear = curve([0.5 * i for i in range(40)])        # +0.5 per validation: always progress
    assert first_plateau(rule, linear) is None


def test_noise_and_dips_count_only_through_the_best_score():
    rule = PlateauRule(min_validations=2)
    # a dip in the window: (1,600, 2,000] holds only 29.0, 2.2 below the best before -> plateaued
    dipped = curve([30, 31, 31.2, 31.2, 29.0])
    assert rule.gain(dipped) == pytest.approx(-2.2) and rule(dipped)
    # an early spike (34 at update 400) sets the bar: the window (3,200, 4,000] best 34.9 beats the best
    # before it, 34.2 at 3,200, by 0.7 -> still progress
    spiked = curve([34, 30, 31, 32, 33, 33.5, 34.0, 34.2, 34.4, 34.9])
    assert rule.gain(spiked) == pytest.approx(0.7) and not rule(spiked)


def test_too_few_validations_or_an_empty_side_never_plateau():
    rule = PlateauRule(min_validations=5)
    assert not rule(curve([30, 30, 30, 30]))                # flat but only 4 validations
    assert rule(curve([30, 30, 30, 30, 30]))
    assert rule.gain([]) is None and rule.gain(curve([30])) is None
    assert not PlateauRule(min_validations=2)(curve([30]))


@pytest.mark.parametrize("kwargs, message", [({"window_share": 0.0}, "window_share"),
                                             ({"window_share": 1.0}, "window_share"),
                                             ({"min_gain": -0.1}, "min_gain"),
                                             ({"min_validations": 1}, "min_validations")])
def test_bad_settings_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PlateauRule(**kwargs)


@pytest.fixture(scope="module")
def tiny():
    text = read_parallel(DATA / "train.de", DATA / "train.en").head(64)
    tokenizer = train_tokenizer(list(text.sources + text.targets), vocab_size=150)
    return tokenizer, encode_parallel(text, tokenizer, max_length=16)


def tiny_model(tokenizer):
    return build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32), seed=0)


def test_the_loop_stops_on_the_rule_and_records_a_known_start_score(tiny):
    tokenizer, data = tiny
    scores = iter([10.0, 20.0, 25.0, 25.1, 25.2, 25.2, 99.0])
    calls = []

    def validate(model):
        calls.append(1)
        return next(scores)

    model = tiny_model(tokenizer)
    config = LoopConfig(batch_size=16, max_updates=100, validate_every=2, validate_at_start=True,
                        progress=False, keep_step_logs=True)
    result = train(model, MLEStep(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(model.parameters()),
                   config=config, validate=validate, stop_rule=PlateauRule(min_validations=3), start_score=5.0)
    # curve: 5 (start, not validated), 10 @2, 20 @4, 25 @6, 25.1 @8 (window (6.4, 8]: +0.1 over 25) -> stop
    assert result.stop_reason == "plateau" and result.updates == 8
    assert [h["score"] for h in result.history] == [5.0, 10.0, 20.0, 25.0, 25.1] and len(calls) == 4
    assert [s["update"] for s in result.step_logs] == list(range(1, 9))
    assert all("mle_loss" in s for s in result.step_logs)
    no_start = LoopConfig(batch_size=16, max_updates=1, progress=False)
    with pytest.raises(ValueError, match="start_score"):
        train(model, MLEStep(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(model.parameters()),
              config=no_start, validate=validate, start_score=5.0)


def test_bfloat16_autocast_runs_the_update_in_bfloat16_and_bad_dtypes_are_rejected(tiny):
    tokenizer, data = tiny
    seen = []

    class Recording(MLEStep):
        def __call__(self, model, batch, optimizer, *, generator=None):
            seen.append(torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None)
            return super().__call__(model, batch, optimizer, generator=generator)

    model = tiny_model(tokenizer)
    config = LoopConfig(batch_size=16, max_updates=2, progress=False, autocast_dtype=torch.bfloat16)
    result = train(model, Recording(Seq2SeqTask(tokenizer)), data, torch.optim.AdamW(model.parameters()),
                   config=config)
    assert seen == [torch.bfloat16, torch.bfloat16] and result.updates == 2
    assert all(p.dtype == torch.float32 for p in model.parameters())      # weights stay in float32
    with pytest.raises(ValueError, match="autocast_dtype"):
        LoopConfig(max_updates=1, autocast_dtype=torch.float64)
