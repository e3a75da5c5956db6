"""decoding.generate against transformers' model.generate, and its own guarantees."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from decoding.generate import generate
from decoding.interop import custom_generate
from tests.tiny_models import (DECODER_ONLY, ENCODER_DECODER, EOS, PAD, after_eos_as_pad, left_padded_prompts,
                               tiny_model)

MAX_NEW = 24
SEARCH_SETTINGS = {
    "greedy": {},
    "beam2": {"num_beams": 2},
    "beam3-lp0.5-early-n2": {"num_beams": 3, "length_penalty": 0.5, "early_stopping": True,
                             "num_return_sequences": 2},
    "beam4-lp2-heuristic-n3": {"num_beams": 4, "length_penalty": 2.0, "early_stopping": False,
                               "num_return_sequences": 3},
    "beam3-lp1.5-never": {"num_beams": 3, "length_penalty": 1.5, "early_stopping": "never"},
}


def _inputs(kind: str, seed: int = 0):
    ids, mask = left_padded_prompts(seed=seed)
    if kind in ENCODER_DECODER:  # encoder inputs: right padding is the convention, any padding works
        mask = mask.flip(1)
        ids = torch.where(mask.bool(), ids.flip(1), PAD)
    return ids, mask


def _pad_id(model) -> int:
    return model.generation_config.pad_token_id


@pytest.mark.parametrize("setting", list(SEARCH_SETTINGS))
@pytest.mark.parametrize("kind", DECODER_ONLY + ENCODER_DECODER)
def test_same_tokens_as_transformers(kind, setting):
    model = tiny_model(kind)
    ids, mask = _inputs(kind)
    options = dict(SEARCH_SETTINGS[setting], max_new_tokens=MAX_NEW)
    expected = model.generate(ids, attention_mask=mask, **options)
    ours = generate(model, ids, mask, return_dict_in_generate=True, **options)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    pad = _pad_id(model)
    assert ours.sequences.shape == expected.shape
    assert torch.equal(after_eos_as_pad(ours.sequences, prefix, pad), after_eos_as_pad(expected, prefix, pad))
    # the settings must exercise both outcomes somewhere: rows that stop early and rows that run to the cap
    assert ours.lengths.shape == (expected.shape[0],)


def test_settings_exercise_early_and_capped_rows():
    lengths = torch.cat([
        generate(tiny_model(kind), *_inputs(kind), max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                 **SEARCH_SETTINGS[setting]).lengths
        for kind in DECODER_ONLY + ENCODER_DECODER for setting in ("greedy", "beam2")
    ])
    assert (lengths < MAX_NEW).any() and (lengths == MAX_NEW).any()


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.3},
    {"no_repeat_ngram_size": 2},
    {"min_new_tokens": 5},
    {"exponential_decay_length_penalty": (3, 1.2)},
    {"forced_eos_token_id": EOS, "num_beams": 2},
    {"repetition_penalty": 0.8, "num_beams": 3, "no_repeat_ngram_size": 3},
])
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_processors_match_transformers(kind, options):
    model = tiny_model(kind, eos_boost=2.0)
    ids, mask = _inputs(kind)
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, **options)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, **options)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    pad = _pad_id(model)
    assert torch.equal(after_eos_as_pad(ours, prefix, pad), after_eos_as_pad(expected, prefix, pad))


class _BanToken(LogitsProcessor):
    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, self.token] = -float("inf")
        return scores


def test_user_logits_processor_applied_like_transformers():
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    plain = generate(model, ids, mask, max_new_tokens=MAX_NEW)
    banned = int(plain[0, ids.shape[1]])  # the first greedy token of row 0
    processors = LogitsProcessorList([_BanToken(banned)])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, logits_processor=processors)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, logits_processor=processors)
    assert torch.equal(ours, expected)
    assert not (ours[:, ids.shape[1]:] == banned).any()


@pytest.mark.parametrize("setting", ["greedy", "beam3-lp0.5-early-n2", "beam4-lp2-heuristic-n3"])
@pytest.mark.parametrize("kind", ["llama", "t5"])
def test_custom_generate_inside_model_generate(kind, setting):
    model = tiny_model(kind)
    ids, mask = _inputs(kind)
    options = dict(SEARCH_SETTINGS[setting], max_new_tokens=MAX_NEW)
    expected = model.generate(ids, attention_mask=mask, **options)
    ours = model.generate(ids, attention_mask=mask, custom_generate=custom_generate, **options)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    pad = _pad_id(model)
    assert torch.equal(after_eos_as_pad(ours, prefix, pad), after_eos_as_pad(expected, prefix, pad))


def test_custom_generate_passes_consistent_and_generator():
    model = tiny_model("gpt2", eos_boost=0.0)  # eos logit 0: never in a small top-k of a random model
    ids, mask = _inputs("gpt2")
    ids, mask = ids.repeat(4, 1), mask.repeat(4, 1)
    kwargs = dict(attention_mask=mask, max_new_tokens=60, do_sample=True, top_k=3, return_dict_in_generate=True,
                  custom_generate=custom_generate)
    plain = model.generate(ids, consistent=False, generator=torch.Generator().manual_seed(0), **kwargs)
    fixed = model.generate(ids, consistent=True, generator=torch.Generator().manual_seed(0), **kwargs)
    again = model.generate(ids, consistent=True, generator=torch.Generator().manual_seed(0), **kwargs)
    assert not plain.terminated.any()
    assert fixed.terminated.any()
    assert torch.equal(fixed.sequences, again.sequences)


@pytest.mark.parametrize("options", [
    {}, {"num_beams": 3, "num_return_sequences": 2}, {"num_beams": 2, "early_stopping": True},
    {"do_sample": True, "top_p": 0.9}, {"do_sample": True, "top_k": 5, "num_return_sequences": 3},
    {"do_sample": True, "num_beams": 2},
])
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_dropping_finished_rows_does_not_change_tokens(kind, options):
    model = tiny_model(kind)
    ids, mask = _inputs(kind)
    runs = [generate(model, ids, mask, max_new_tokens=MAX_NEW, drop_finished=drop, return_dict_in_generate=True,
                     generator=torch.Generator().manual_seed(3), **options) for drop in (True, False)]
    assert torch.equal(runs[0].sequences, runs[1].sequences)
    assert torch.equal(runs[0].lengths, runs[1].lengths)
    assert torch.equal(runs[0].terminated, runs[1].terminated)


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}])
@pytest.mark.parametrize("kind", DECODER_ONLY)
def test_cached_equals_uncached(kind, options):
    model = tiny_model(kind)
    ids, mask = _inputs(kind)
    cached = generate(model, ids, mask, max_new_tokens=MAX_NEW, **options)
    uncached = generate(model, ids, mask, max_new_tokens=MAX_NEW, use_cache=False, **options)
    assert torch.equal(cached, uncached)


@pytest.mark.parametrize("options", [{}, {"num_beams": 3}])
@pytest.mark.parametrize("kind", DECODER_ONLY + ENCODER_DECODER)
def test_batched_equals_one_by_one(kind, options):
    model = tiny_model(kind)
    ids, mask = _inputs(kind)
    batched = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, **options)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    for row in range(ids.shape[0]):
        real = mask[row].bool()
        alone = generate(model, ids[row][real][None], max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                         **options)
        n = int(alone.lengths[0])
        assert int(batched.lengths[row]) == n
        assert torch.equal(batched.sequences[row, prefix:prefix + n], alone.sequences[0, -n:][:n]
                           if kind in DECODER_ONLY else alone.sequences[0, 1:1 + n])


def test_same_seed_same_samples_and_seeds_differ():
    model = tiny_model("llama", eos_boost=1.0)
    ids, mask = _inputs("llama")

    def sample(seed):
        return generate(model, ids, mask, max_new_tokens=MAX_NEW, do_sample=True, top_k=0, temperature=1.5,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(0), sample(0))
    assert not torch.equal(sample(0), sample(1))


def test_num_return_sequences_rows_are_grouped_by_prompt():
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    out = generate(model, ids, mask, max_new_tokens=8, do_sample=True, num_return_sequences=3,
                   generator=torch.Generator().manual_seed(0))
    assert out.shape[0] == 3 * ids.shape[0]
    assert torch.equal(out[:, :ids.shape[1]], ids.repeat_interleave(3, dim=0))


def test_output_layout_pads_after_eos_and_reports_termination():
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    out = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True)
    generated = out.sequences[:, ids.shape[1]:]
    for row, length in enumerate(out.lengths.tolist()):
        assert out.terminated[row] == (generated[row, length - 1] == EOS)
        assert not (generated[row, :length - 1] == EOS).any()
        assert (generated[row, length:] == PAD).all()
    assert generated.shape[1] == int(out.lengths.max())


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2}])
def test_several_eos_ids_match_transformers(options):
    model = tiny_model("gpt2", eos_boost=1.0)
    ids, mask = _inputs("gpt2")
    plain = generate(model, ids, mask, max_new_tokens=MAX_NEW)
    second_eos = int(plain[0, ids.shape[1] + 2])  # a token greedy emits early: stopping on it changes rows
    eos = [EOS, second_eos]
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos, **options)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, return_dict_in_generate=True,
                    **options)
    assert torch.equal(ours.sequences, expected)
    if not options:  # greedy emits the second eos early by construction
        assert ours.terminated.any()


class _LegacyCacheName(torch.nn.Module):
    """A model whose forward takes and returns its cache as ``past_key_values`` (transformers < 5.2x)."""

    def __init__(self, inner):
        super().__init__()
        self.inner = inner
        self.config = inner.config
        self.generation_config = inner.generation_config

    def get_output_embeddings(self):
        return self.inner.get_output_embeddings()

    def forward(self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=True,
                return_dict=True):
        out = self.inner(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         cache=past_key_values, use_cache=use_cache)
        return {"logits": out.logits, "past_key_values": out.cache}


def test_models_with_the_old_past_key_values_name_work():
    model = tiny_model("llama")
    ids, mask = _inputs("llama")
    legacy = _LegacyCacheName(model)
    for options in ({}, {"num_beams": 3}):
        assert torch.equal(generate(legacy, ids, mask, max_new_tokens=MAX_NEW, **options),
                           generate(model, ids, mask, max_new_tokens=MAX_NEW, **options))


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}])
def test_custom_generate_with_transformers_repetition_penalty_on_padded_prompts(options):
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    kwargs = dict(attention_mask=mask, max_new_tokens=MAX_NEW, repetition_penalty=1.5, **options)
    expected = model.generate(ids, **kwargs)
    ours = model.generate(ids, custom_generate=custom_generate, **kwargs)
    assert torch.equal(after_eos_as_pad(ours, ids.shape[1], PAD), after_eos_as_pad(expected, ids.shape[1], PAD))
