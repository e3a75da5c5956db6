"""decoding.transforms against transformers' own processors and warpers, on random (and nasty) logits."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers.generation import logits_process as hf

from decoding.transforms import (
    Truncation,
    apply_temperature,
    epsilon_keep,
    eta_keep,
    exponential_decay_length_penalty,
    forced_bos,
    forced_eos,
    mask_scores,
    min_length,
    min_p_keep,
    no_repeat_ngram,
    repetition_penalty,
    top_k_keep,
    top_p_keep,
    truncate,
    truncation_keep,
    typical_keep,
    with_eos,
)

SETTINGS = settings(max_examples=50, deadline=None)
KINDS = ("plain", "ties", "neg_inf", "ties_neg_inf", "peaked")


def make_scores(seed: int, batch: int, vocab: int, kind: str) -> torch.Tensor:
    """Random logits ``[B, V]``; 'ties' draws from a few integer values, 'neg_inf' masks about a third of the
    entries (at least one finite per row), 'peaked' has one dominant token per row."""
    gen = torch.Generator().manual_seed(seed)
    if kind.startswith("ties"):
        scores = torch.randint(-2, 2, (batch, vocab), generator=gen).float()
    else:
        scores = torch.randn(batch, vocab, generator=gen) * 3.0
    if kind == "peaked":
        scores[torch.arange(batch), torch.randint(vocab, (batch,), generator=gen)] += 12.0
    if kind.endswith("neg_inf"):
        masked = torch.rand(batch, vocab, generator=gen) < 0.35
        masked[torch.arange(batch), torch.randint(vocab, (batch,), generator=gen)] = False
        scores = scores.masked_fill(masked, -math.inf)
    return scores


@st.composite
def score_cases(draw: st.DrawFn) -> torch.Tensor:
    return make_scores(
        draw(st.integers(0, 2**31 - 1)),
        draw(st.integers(1, 4)),
        draw(st.integers(2, 60)),
        draw(st.sampled_from(KINDS)),
    )


def hf_call(
    processor: hf.LogitsProcessor, scores: torch.Tensor, input_ids: torch.Tensor | None = None
) -> torch.Tensor:
    """transformers' output on a clone (some of its processors write in place)."""
    if input_ids is None:
        input_ids = torch.zeros((scores.shape[0], 1), dtype=torch.long)
    return processor(input_ids.clone(), scores.clone())


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    assert torch.equal(torch.isfinite(ours), torch.isfinite(theirs))
    assert torch.equal(ours, theirs)


# (our keep function, transformers warper factory, strategy for the rule's parameter)
def with_edges(values: st.SearchStrategy[float], *edges: float) -> st.SearchStrategy[float]:
    """``values`` plus exact boundary values that tied logits hit (0.25, 0.5, ... are exact in float32)."""
    return st.one_of(st.sampled_from(edges), values)


RULES = {
    "top_k": (
        top_k_keep,
        lambda v, m: hf.TopKLogitsWarper(top_k=v, min_tokens_to_keep=m),
        st.integers(1, 70),
    ),
    "top_p": (
        top_p_keep,
        lambda v, m: hf.TopPLogitsWarper(top_p=v, min_tokens_to_keep=m),
        with_edges(st.floats(0.01, 0.99), 0.25, 0.5, 0.75),
    ),
    "min_p": (
        min_p_keep,
        lambda v, m: hf.MinPLogitsWarper(min_p=v, min_tokens_to_keep=m),
        with_edges(st.floats(0.001, 1.0), 0.5, 1.0),
    ),
    "typical": (
        typical_keep,
        lambda v, m: hf.TypicalLogitsWarper(mass=v, min_tokens_to_keep=m),
        st.floats(0.01, 0.99),
    ),
    "epsilon": (
        epsilon_keep,
        lambda v, m: hf.EpsilonLogitsWarper(epsilon=v, min_tokens_to_keep=m),
        st.floats(1e-4, 0.3),
    ),
    "eta": (eta_keep, lambda v, m: hf.EtaLogitsWarper(epsilon=v, min_tokens_to_keep=m), st.floats(1e-4, 0.5)),
}


@pytest.mark.parametrize("rule", sorted(RULES))
@SETTINGS
@given(scores=score_cases(), data=st.data(), keep_min=st.integers(1, 5))
def test_keep_matches_transformers_warper(
    rule: str, scores: torch.Tensor, data: st.DataObject, keep_min: int
) -> None:
    keep_fn, make_hf, values = RULES[rule]
    value = data.draw(values)
    before = scores.clone()
    keep = keep_fn(scores, value, min_tokens_to_keep=keep_min)
    assert torch.equal(scores, before)
    assert keep.dtype == torch.bool and keep.shape == scores.shape
    theirs = hf_call(make_hf(value, keep_min), scores)
    assert torch.equal(keep & torch.isfinite(scores), torch.isfinite(theirs))
    assert_same_scores(mask_scores(scores, keep), theirs)


@pytest.mark.parametrize(
    ("keep_fn", "off"),
    [(top_k_keep, 0), (top_p_keep, 1.0), (typical_keep, 1.0), (epsilon_keep, 0.0), (eta_keep, 0.0)],
)
def test_off_values_keep_everything(keep_fn, off) -> None:
    scores = make_scores(0, 3, 20, "neg_inf")
    assert bool(keep_fn(scores, off, min_tokens_to_keep=2).all())


def test_top_k_keeps_all_ties_of_kth() -> None:
    scores = torch.tensor([[3.0, 1.0, 1.0, 1.0, 0.0]])
    assert top_k_keep(scores, 2).tolist() == [[True, True, True, True, False]]


def test_top_p_keeps_the_token_that_crosses() -> None:
    scores = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    assert top_p_keep(scores, 0.7).tolist() == [[True, True, False, False]]
    assert top_p_keep(scores, 0.85).tolist() == [[True, True, True, False]]


@pytest.mark.parametrize("kind", ["peaked", "flat", "ties", "masked", "steep"])
def test_top_p_on_large_vocabularies_is_transformers_rule(kind: str) -> None:
    # above 128 tokens top_p_keep settles most rows from their top 128 and sorts only the rest
    from decoding.transforms import _top_p_from_head

    generator = torch.Generator().manual_seed(sum(map(ord, kind)))
    scores = torch.randn(48, 3000, generator=generator) * {"peaked": 4.0, "flat": 0.3, "steep": 12.0}.get(kind, 3.0)
    if kind == "ties":
        scores = (scores * 2).round() / 2
    if kind == "masked":
        scores[:, ::2] = -math.inf
    settled = 0
    for top_p in (0.05, 0.2, 0.4, 0.9):
        for keep_min in (1, 3):
            keep = top_p_keep(scores, top_p, min_tokens_to_keep=keep_min)
            theirs = hf_call(hf.TopPLogitsWarper(top_p, min_tokens_to_keep=keep_min), scores)
            assert_same_scores(mask_scores(scores, keep), theirs)
            settled += int((~_top_p_from_head(scores, top_p, keep_min)[1]).sum())
    if kind != "flat":  # the head does settle rows (else the fast path would be dead code)
        assert settled > 0


def test_exact_boundaries_match_transformers() -> None:
    uniform = torch.zeros(1, 4)  # p = 0.25 each, cumulative masses exact in float32
    for top_p, kept in ((0.5, 2), (0.75, 3), (0.25, 1)):
        keep = top_p_keep(uniform, top_p)
        assert int(keep.sum()) == kept
        assert_same_scores(mask_scores(uniform, keep), hf_call(hf.TopPLogitsWarper(top_p), uniform))
    tied_top = torch.tensor([[0.0, 0.0, -1.0]])
    assert min_p_keep(tied_top, 1.0).tolist() == [[True, True, False]]
    assert_same_scores(
        mask_scores(tied_top, min_p_keep(tied_top, 1.0)), hf_call(hf.MinPLogitsWarper(1.0), tied_top)
    )
    peaked = torch.tensor([[1.0, 0.0, 0.0, -3.0]])
    epsilon = float(peaked.softmax(-1)[0, 1])  # exactly the probability of tokens 1 and 2
    assert epsilon_keep(peaked, epsilon).tolist() == [[True, True, True, False]]
    assert_same_scores(
        mask_scores(peaked, epsilon_keep(peaked, epsilon)), hf_call(hf.EpsilonLogitsWarper(epsilon), peaked)
    )


@st.composite
def truncations(draw: st.DrawFn) -> Truncation:
    on = lambda: draw(st.booleans())  # noqa: E731
    return Truncation(
        top_k=draw(st.integers(1, 70)) if on() else 0,
        top_p=draw(st.floats(0.01, 0.99)) if on() else 1.0,
        min_p=draw(st.floats(0.001, 1.0)) if on() else None,
        typical_p=draw(st.floats(0.01, 0.99)) if on() else 1.0,
        epsilon_cutoff=draw(st.floats(1e-4, 0.3)) if on() else 0.0,
        eta_cutoff=draw(st.floats(1e-4, 0.5)) if on() else 0.0,
        min_tokens_to_keep=draw(st.integers(1, 4)),
    )


def hf_chain(truncation: Truncation, scores: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """transformers' warpers in generate's order, built from the same settings."""
    m = truncation.min_tokens_to_keep
    chain = [hf.TemperatureLogitsWarper(temperature)] if temperature != 1.0 else []
    if truncation.top_k:
        chain.append(hf.TopKLogitsWarper(top_k=truncation.top_k, min_tokens_to_keep=m))
    if truncation.top_p < 1.0:
        chain.append(hf.TopPLogitsWarper(top_p=truncation.top_p, min_tokens_to_keep=m))
    if truncation.min_p is not None:
        chain.append(hf.MinPLogitsWarper(min_p=truncation.min_p, min_tokens_to_keep=m))
    if truncation.typical_p < 1.0:
        chain.append(hf.TypicalLogitsWarper(mass=truncation.typical_p, min_tokens_to_keep=m))
    if truncation.epsilon_cutoff > 0:
        chain.append(hf.EpsilonLogitsWarper(epsilon=truncation.epsilon_cutoff, min_tokens_to_keep=m))
    if truncation.eta_cutoff > 0:
        chain.append(hf.EtaLogitsWarper(epsilon=truncation.eta_cutoff, min_tokens_to_keep=m))
    return hf_call(hf.LogitsProcessorList(chain), scores)


@SETTINGS
@given(scores=score_cases(), truncation=truncations(), temperature=st.sampled_from([1.0, 0.7, 1.6]))
def test_truncation_keep_matches_transformers_chain(
    scores: torch.Tensor, truncation: Truncation, temperature: float
) -> None:
    before = scores.clone()
    warm = apply_temperature(scores, temperature) if temperature != 1.0 else scores
    keep = truncation_keep(warm, truncation)
    assert torch.equal(scores, before)
    theirs = hf_chain(truncation, scores, temperature)
    assert_same_scores(mask_scores(warm, keep), theirs)
    assert_same_scores(truncate(warm, truncation), theirs)
    assert truncation.active == bool(len(truncation.rules()))


@SETTINGS
@given(scores=score_cases(), truncation=truncations(), data=st.data())
def test_consistent_truncation_is_the_set_plus_eos(
    scores: torch.Tensor, truncation: Truncation, data: st.DataObject
) -> None:
    vocab = scores.shape[1]
    eos_list = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2))
    eos = torch.tensor(eos_list)
    before = scores.clone()
    out = truncate(scores, truncation, eos_token_ids=eos, consistent=True)
    assert torch.equal(scores, before)
    is_eos = torch.zeros(vocab, dtype=torch.bool)
    is_eos[eos] = True
    theirs = hf_chain(truncation, scores)
    # eos keeps its own score; every other entry is exactly what transformers' chain gives
    assert torch.equal(out, torch.where(is_eos, scores, theirs))
    assert torch.equal(torch.isfinite(out), torch.isfinite(theirs) | (is_eos & torch.isfinite(scores)))
    # renormalising over a subset that contains eos can only raise p(eos)
    q_eos = out.softmax(-1)[:, eos]
    p_eos = scores.softmax(-1)[:, eos]
    assert bool((q_eos >= p_eos * (1 - 1e-5)).all())


@SETTINGS
@given(scores=score_cases(), top_k=st.integers(1, 70), eos_id=st.integers(0, 59))
def test_consistent_top_k_always_has_eos(scores: torch.Tensor, top_k: int, eos_id: int) -> None:
    eos_id %= scores.shape[1]
    out = truncate(scores, Truncation(top_k=top_k), eos_token_ids=eos_id, consistent=True)
    assert torch.equal(out[:, eos_id], scores[:, eos_id])
    plain = truncate(scores, Truncation(top_k=top_k))
    assert int(torch.isfinite(out).sum()) <= int(torch.isfinite(plain).sum()) + scores.shape[0]


def test_with_eos_and_mask_scores_are_pure() -> None:
    keep = torch.tensor([[True, False, False]])
    scores = torch.tensor([[1.0, 2.0, 3.0]])
    keep_before, scores_before = keep.clone(), scores.clone()
    assert with_eos(keep, torch.tensor([2])).tolist() == [[True, False, True]]
    assert with_eos(keep, [1, 2]).tolist() == [[True, True, True]]
    assert mask_scores(scores, keep).tolist() == [[1.0, -math.inf, -math.inf]]
    assert torch.equal(keep, keep_before) and torch.equal(scores, scores_before)


@SETTINGS
@given(scores=score_cases(), temperature=st.floats(0.05, 5.0))
def test_temperature_matches_transformers(scores: torch.Tensor, temperature: float) -> None:
    before = scores.clone()
    assert_same_scores(
        apply_temperature(scores, temperature), hf_call(hf.TemperatureLogitsWarper(temperature), scores)
    )
    assert torch.equal(scores, before)


# ------------------------------------------------------------------------------ penalties, constraints


@st.composite
def history_cases(draw: st.DrawFn, *, alphabet_extra: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(history [B, T], scores [B, V])``; history ids may exceed the vocab (ignored by transformers)."""
    scores = draw(score_cases())
    batch, vocab = scores.shape
    length = draw(st.integers(0, 30))
    high = draw(st.sampled_from([3, vocab + alphabet_extra]))  # 3 = few ids, many repeated n-grams
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    return torch.randint(0, high, (batch, length), generator=gen), scores


@SETTINGS
@given(case=history_cases(), penalty=st.floats(0.1, 3.0), data=st.data())
def test_repetition_penalty_matches_transformers(case, penalty: float, data: st.DataObject) -> None:
    history, scores = case
    ignore_kind = data.draw(st.sampled_from(["none", "int", "tensor"]))
    if ignore_kind == "int":
        ignore = data.draw(st.integers(0, history.shape[1] + 2))
    elif ignore_kind == "tensor":
        ignore = torch.tensor(
            data.draw(st.lists(st.integers(0, 32), min_size=len(history), max_size=len(history)))
        )
    else:
        ignore = None
    before_h, before_s = history.clone(), scores.clone()
    ours = repetition_penalty(history, scores, penalty, prompt_ignore_length=ignore)
    hf_ignore = ignore.clone() if isinstance(ignore, torch.Tensor) else ignore
    theirs = hf_call(
        hf.RepetitionPenaltyLogitsProcessor(penalty, prompt_ignore_length=hf_ignore), scores, history
    )
    assert_same_scores(ours, theirs)
    assert torch.equal(history, before_h) and torch.equal(scores, before_s)


@SETTINGS
@given(case=history_cases(), ngram_size=st.integers(1, 4))
def test_no_repeat_ngram_matches_transformers(case, ngram_size: int) -> None:
    history, scores = case
    before_h, before_s = history.clone(), scores.clone()
    ours = no_repeat_ngram(history, scores, ngram_size)
    theirs = hf_call(hf.NoRepeatNGramLogitsProcessor(ngram_size), scores, history)
    assert_same_scores(ours, theirs)
    assert torch.equal(history, before_h) and torch.equal(scores, before_s)


def test_no_repeat_ngram_long_history() -> None:
    gen = torch.Generator().manual_seed(3)
    history = torch.randint(0, 6, (3, 1000), generator=gen)
    scores = torch.randn(3, 50, generator=gen)
    for size in (2, 3, 5):
        ours = no_repeat_ngram(history, scores, size)
        assert torch.isinf(ours).any()
        assert_same_scores(ours, hf_call(hf.NoRepeatNGramLogitsProcessor(size), scores, history))


def test_no_repeat_ngram_hand_made() -> None:
    history = torch.tensor([[1, 2, 3, 1, 2]])
    out = no_repeat_ngram(history, torch.zeros(1, 5), 3)  # "1 2" was followed by 3
    assert torch.isinf(out).nonzero().tolist() == [[0, 3]]


@SETTINGS
@given(
    scores=score_cases(),
    cur_len=st.integers(0, 12),
    minimum=st.integers(0, 12),
    prompt=st.integers(0, 5),
    data=st.data(),
)
def test_min_length_matches_transformers(
    scores: torch.Tensor, cur_len: int, minimum: int, prompt: int, data
) -> None:
    eos = data.draw(st.lists(st.integers(0, scores.shape[1] - 1), min_size=1, max_size=2))
    before = scores.clone()
    ids = torch.zeros((scores.shape[0], cur_len), dtype=torch.long)
    ours = min_length(scores, torch.tensor(eos), cur_len=cur_len, min_length=minimum)
    assert_same_scores(ours, hf_call(hf.MinLengthLogitsProcessor(minimum, eos), scores, ids))
    # min_new_tokens: the same function on the count of new tokens
    ids = torch.zeros((scores.shape[0], prompt + cur_len), dtype=torch.long)
    theirs = hf_call(hf.MinNewTokensLengthLogitsProcessor(prompt, minimum, eos), scores, ids)
    assert_same_scores(ours, theirs)
    assert torch.equal(scores, before)
    scratch = scores.clone()
    in_place = min_length(scratch, torch.tensor(eos), cur_len=cur_len, min_length=minimum, in_place=True)
    assert in_place is scratch
    assert_same_scores(in_place, ours)


@SETTINGS
@given(scores=score_cases(), cur_len=st.integers(0, 6), max_len=st.integers(1, 7), data=st.data())
def test_forced_bos_and_eos_match_transformers(
    scores: torch.Tensor, cur_len: int, max_len: int, data
) -> None:
    vocab = scores.shape[1]
    bos = data.draw(st.integers(0, vocab - 1))
    eos = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2))
    before = scores.clone()
    ids = torch.zeros((scores.shape[0], cur_len), dtype=torch.long)
    assert_same_scores(
        forced_bos(scores, bos, cur_len=cur_len), hf_call(hf.ForcedBOSTokenLogitsProcessor(bos), scores, ids)
    )
    ours = forced_eos(scores, eos, cur_len=cur_len, max_length=max_len)
    assert_same_scores(ours, hf_call(hf.ForcedEOSTokenLogitsProcessor(max_len, eos), scores, ids))
    assert torch.equal(scores, before)


@SETTINGS
@given(
    scores=score_cases(),
    cur_len=st.integers(0, 20),
    input_len=st.integers(0, 6),
    start=st.integers(0, 8),
    factor=st.floats(0.5, 2.0),
    data=st.data(),
)
def test_exponential_decay_matches_transformers(scores, cur_len, input_len, start, factor, data) -> None:
    eos = data.draw(st.lists(st.integers(0, scores.shape[1] - 1), min_size=1, max_size=2))
    before = scores.clone()
    ids = torch.zeros((scores.shape[0], cur_len), dtype=torch.long)
    ours = exponential_decay_length_penalty(
        scores, eos, cur_len=cur_len, input_len=input_len, start_index=start, decay_factor=factor
    )
    theirs = hf_call(hf.ExponentialDecayLengthPenalty((start, factor), eos, input_len), scores, ids)
    assert_same_scores(ours, theirs)
    assert torch.equal(scores, before)


# ---------------------------------------------------------------------------------------- bad input

S = torch.zeros(2, 5)
H = torch.zeros(2, 3, dtype=torch.long)
BAD = [
    (lambda: Truncation(top_k=-1), "top_k"),
    (lambda: Truncation(top_k=2.5), "top_k"),
    (lambda: Truncation(top_k=True), "top_k"),
    (lambda: Truncation(top_p=0.0), "top_p"),
    (lambda: Truncation(top_p=1.5), "top_p"),
    (lambda: Truncation(top_p=math.nan), "top_p"),
    (lambda: Truncation(min_p=0.0), "min_p"),
    (lambda: Truncation(min_p=1.2), "min_p"),
    (lambda: Truncation(typical_p=0.0), "typical_p"),
    (lambda: Truncation(typical_p=1.01), "typical_p"),
    (lambda: Truncation(epsilon_cutoff=-0.1), "epsilon_cutoff"),
    (lambda: Truncation(epsilon_cutoff=1.0), "epsilon_cutoff"),
    (lambda: Truncation(eta_cutoff=-1e-3), "eta_cutoff"),
    (lambda: Truncation(eta_cutoff=1.0), "eta_cutoff"),
    (lambda: Truncation(min_tokens_to_keep=0), "min_tokens_to_keep"),
    (lambda: apply_temperature(S, 0.0), "temperature"),
    (lambda: apply_temperature(S, -1.0), "temperature"),
    (lambda: top_k_keep(S, -3), "top_k"),
    (lambda: top_k_keep(S, 2, min_tokens_to_keep=0), "min_tokens_to_keep"),
    (lambda: top_p_keep(S, 0.0), "top_p"),
    (lambda: min_p_keep(S, 0.0), "min_p"),
    (lambda: typical_keep(S, 1.5), "mass"),
    (lambda: epsilon_keep(S, 1.0), "epsilon"),
    (lambda: eta_keep(S, -0.5), "epsilon"),
    (lambda: top_k_keep(torch.zeros(5), 2), "scores"),
    (lambda: truncate(S, Truncation(top_k=2), consistent=True), "eos_token_ids"),
    (lambda: with_eos(S.bool(), torch.tensor([1.0])), "eos_token_ids"),
    (lambda: with_eos(S.bool(), []), "eos_token_ids"),
    (lambda: with_eos(S.bool(), -1), "eos_token_ids"),
    (lambda: repetition_penalty(H, S, 0.0), "penalty"),
    (lambda: repetition_penalty(H.float(), S, 1.2), "history"),
    (lambda: repetition_penalty(H[:1], S, 1.2), "history"),
    (
        lambda: repetition_penalty(H, S, 1.2, prompt_ignore_length=torch.tensor([1, 2, 3])),
        "prompt_ignore_length",
    ),
    (lambda: repetition_penalty(H, S, 1.2, prompt_ignore_length=-1), "prompt_ignore_length"),
    (lambda: no_repeat_ngram(H, S, 0), "ngram_size"),
    (lambda: min_length(S, 1, cur_len=0, min_length=-1), "min_length"),
    (lambda: min_length(S, 1, cur_len=-1, min_length=2), "cur_len"),
    (lambda: forced_bos(S, -1, cur_len=1), "bos_token_id"),
    (lambda: forced_eos(S, 1, cur_len=1, max_length=0), "max_length"),
    (
        lambda: exponential_decay_length_penalty(
            S, 1, cur_len=5, input_len=1, start_index=1, decay_factor=0.0
        ),
        "decay_factor",
    ),
    (
        lambda: exponential_decay_length_penalty(
            S, 1, cur_len=5, input_len=1, start_index=-1, decay_factor=1.5
        ),
        "start_index",
    ),
]


@pytest.mark.parametrize(("call", "name"), BAD, ids=[f"{i}-{name}" for i, (_, name) in enumerate(BAD)])
def test_bad_arguments_raise_naming_the_argument(call, name: str) -> None:
    with pytest.raises(ValueError, match=f"`?{name}`?"):
        call()


def test_truncate_rejects_non_truncation() -> None:
    with pytest.raises(TypeError, match="truncation"):
        truncate(S, {"top_k": 2})  # type: ignore[arg-type]
