"""decoding.processors: consistent samplers as transformers LogitsProcessors, alone and in generate."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.generation import logits_process as hf

from decoding.processors import (
    ConsistentEpsilonLogitsWarper,
    ConsistentEtaLogitsWarper,
    ConsistentMinPLogitsWarper,
    ConsistentTopKLogitsWarper,
    ConsistentTopPLogitsWarper,
    ConsistentTruncationLogitsWarper,
    ConsistentTypicalLogitsWarper,
)
from decoding.transforms import Truncation

EOS = 0
VOCAB = 50
PROMPT = 3
STEPS = 60

# (processor class, transformers warper of the same kind, strategy for the rule's parameter)
KINDS = {
    "top_k": (ConsistentTopKLogitsWarper, lambda v: hf.TopKLogitsWarper(top_k=v), st.integers(1, 70)),
    "top_p": (ConsistentTopPLogitsWarper, lambda v: hf.TopPLogitsWarper(top_p=v), st.floats(0.01, 0.99)),
    "min_p": (ConsistentMinPLogitsWarper, lambda v: hf.MinPLogitsWarper(min_p=v), st.floats(0.001, 1.0)),
    "typical": (
        ConsistentTypicalLogitsWarper,
        lambda v: hf.TypicalLogitsWarper(mass=v),
        st.floats(0.01, 0.99),
    ),
    "epsilon": (
        ConsistentEpsilonLogitsWarper,
        lambda v: hf.EpsilonLogitsWarper(epsilon=v),
        st.floats(1e-4, 0.3),
    ),
    "eta": (ConsistentEtaLogitsWarper, lambda v: hf.EtaLogitsWarper(epsilon=v), st.floats(1e-4, 0.5)),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
@settings(max_examples=30, deadline=None)
@given(
    seed=st.integers(0, 2**31 - 1),
    batch=st.integers(1, 4),
    vocab=st.integers(2, 60),
    temperature=st.sampled_from([1.0, 0.6, 1.7]),
    data=st.data(),
)
def test_processor_is_transformers_warper_plus_eos(kind, seed, batch, vocab, temperature, data) -> None:
    processor_cls, make_hf, values = KINDS[kind]
    value = data.draw(values)
    eos = data.draw(st.lists(st.integers(0, vocab - 1), min_size=1, max_size=2))
    scores = torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * 3.0
    input_ids = torch.zeros((batch, 4), dtype=torch.long)
    before = scores.clone()
    out = processor_cls(value, eos, temperature=temperature)(input_ids, scores)
    assert torch.equal(scores, before)
    warm = scores / temperature  # transformers' TemperatureLogitsWarper, applied first
    theirs = make_hf(value)(input_ids, warm.clone())
    is_eos = torch.zeros(vocab, dtype=torch.bool)
    is_eos[eos] = True
    assert torch.equal(out, torch.where(is_eos, warm, theirs))
    assert bool(torch.isfinite(out[:, eos]).all())


def test_general_processor_chains_rules_like_transformers() -> None:
    scores = torch.randn(3, 40, generator=torch.Generator().manual_seed(0)) * 2.0
    truncation = Truncation(top_k=10, top_p=0.7, min_tokens_to_keep=2)
    out = ConsistentTruncationLogitsWarper(truncation, [5, 7])(torch.zeros((3, 1), dtype=torch.long), scores)
    chain = hf.LogitsProcessorList(
        [hf.TopKLogitsWarper(10, min_tokens_to_keep=2), hf.TopPLogitsWarper(0.7, min_tokens_to_keep=2)]
    )
    theirs = chain(torch.zeros((3, 1), dtype=torch.long), scores.clone())
    assert torch.equal(out[:, [5, 7]], scores[:, [5, 7]])
    keep_cols = torch.ones(40, dtype=torch.bool)
    keep_cols[[5, 7]] = False
    assert torch.equal(out[:, keep_cols], theirs[:, keep_cols])


@pytest.mark.parametrize(
    ("make", "error", "name"),
    [
        (lambda: ConsistentTopKLogitsWarper(2, EOS, temperature=0.0), ValueError, "temperature"),
        (lambda: ConsistentTopKLogitsWarper(2, -1), ValueError, "eos_token_id"),
        (lambda: ConsistentTopKLogitsWarper(2, []), ValueError, "eos_token_id"),
        (lambda: ConsistentTopKLogitsWarper(-2, EOS), ValueError, "top_k"),
        (lambda: ConsistentTopPLogitsWarper(1.5, EOS), ValueError, "top_p"),
        (lambda: ConsistentMinPLogitsWarper(0.0, EOS), ValueError, "min_p"),
        (lambda: ConsistentTypicalLogitsWarper(0.0, EOS), ValueError, "typical_p"),
        (lambda: ConsistentEpsilonLogitsWarper(1.0, EOS), ValueError, "epsilon_cutoff"),
        (lambda: ConsistentEtaLogitsWarper(-0.1, EOS), ValueError, "eta_cutoff"),
        (lambda: ConsistentTopKLogitsWarper(2, EOS, min_tokens_to_keep=0), ValueError, "min_tokens_to_keep"),
        (lambda: ConsistentTruncationLogitsWarper({"top_k": 2}, EOS), TypeError, "truncation"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(make, error, name: str) -> None:
    with pytest.raises(error, match=name):
        make()


# ------------------------------------------------------------------------------- through model.generate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is many times faster than several on a shared CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def looping_model() -> GPT2LMHeadModel:
    """A tiny GPT-2 whose next-token logits are the same at every position: 5.0 for tokens 1 and 2, 4.0 for
    eos, 0 elsewhere. eos has p ~ 0.14 but is never in the top 2 nor in the 0.5-nucleus, so top-k=2 and
    top-p=0.5 sampling loop forever, while their consistent versions stop with p(eos) ~ 0.16 per step."""
    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=128, tie_word_embeddings=False,
        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
    )  # fmt: skip
    model = GPT2LMHeadModel(config).eval()
    logits = torch.zeros(VOCAB)
    logits[1] = logits[2] = 5.0
    logits[EOS] = 4.0
    with torch.no_grad():  # final hidden state = e_0 whatever the input, so logits = lm_head.weight[:, 0]
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(torch.nn.functional.one_hot(torch.tensor(0), 32).float())
        model.lm_head.weight.zero_()
        model.lm_head.weight[:, 0] = logits
    return model


def sample(model: GPT2LMHeadModel, seed: int, **options) -> torch.Tensor:
    """The generated part ``[8, <= STEPS]`` of 8 sampled continuations of one prompt."""
    prompt = torch.full((8, PROMPT), 7)
    torch.manual_seed(seed)
    out = model.generate(
        prompt, attention_mask=torch.ones_like(prompt), do_sample=True, max_new_tokens=STEPS, **options
    )
    return out[:, PROMPT:]


def test_looping_model_has_the_intended_distribution(looping_model) -> None:
    with torch.no_grad():
        logits = looping_model(torch.randint(1, VOCAB, (2, 5))).logits  # [2, 5, V]
    probs = logits.softmax(-1)
    assert torch.allclose(probs, probs[0, 0].expand_as(probs))
    assert 0.1 < float(probs[0, 0, EOS]) < float(probs[0, 0, 1])
    assert float(probs[0, 0, EOS]) == pytest.approx(math.exp(4) / (2 * math.exp(5) + math.exp(4) + VOCAB - 3))


@pytest.mark.parametrize("seed", range(3))
def test_plain_top_k_and_top_p_never_stop(looping_model, seed: int) -> None:
    for options in ({"top_k": 2}, {"top_k": 0, "top_p": 0.5}):
        generated = sample(looping_model, seed, **options)
        assert generated.shape[1] == STEPS
        assert not bool((generated == EOS).any())


@pytest.mark.parametrize("seed", range(3))
def test_consistent_processors_stop(looping_model, seed: int) -> None:
    for processor in (ConsistentTopKLogitsWarper(2, EOS), ConsistentTopPLogitsWarper(0.5, EOS)):
        generated = sample(looping_model, seed, top_k=0, top_p=1.0, logits_processor=[processor])
        assert bool((generated == EOS).any(dim=1).all()), "every row should end within STEPS tokens"
        tokens = generated[generated != EOS]  # before eos only the truncated set {1, 2} is ever sampled
        assert set(tokens.unique().tolist()) <= {1, 2}


def test_builtin_warper_left_on_masks_eos_again(looping_model) -> None:
    """The documented pitfall: generate's own top_k runs after user processors and removes eos again."""
    generated = sample(looping_model, 0, top_k=2, logits_processor=[ConsistentTopKLogitsWarper(2, EOS)])
    assert not bool((generated == EOS).any())


def test_processor_temperature_matches_generate_temperature(looping_model) -> None:
    """With a rule that keeps everything, the processor's temperature gives generate's samples exactly."""
    keep_all = ConsistentTopKLogitsWarper(VOCAB, EOS, temperature=2.5)
    ours = sample(looping_model, 5, top_k=0, logits_processor=[keep_all])
    theirs = sample(looping_model, 5, top_k=0, temperature=2.5)
    assert torch.equal(ours, theirs)
    assert bool((ours != EOS).any())
