"""Option resolution (:mod:`decoding.options`): lengths, token ids, search settings and their errors, checked
before any model work."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
from transformers import GenerationConfig

from decoding.options import resolve_options

VOCAB = 10


def resolve(*, prefix_length: int = 4, is_encoder_decoder: bool = False, model=None, consistent: bool = False,
            **kwargs):
    model = model if model is not None else SimpleNamespace(generation_config=None)
    return resolve_options(model, prefix_length=prefix_length, vocab_size=VOCAB,
                           is_encoder_decoder=is_encoder_decoder, kwargs=kwargs, consistent=consistent)


def test_max_new_tokens_wins_over_max_length_which_counts_the_prefix():
    assert resolve(max_new_tokens=5, max_length=100).max_new_tokens == 5
    assert resolve(max_length=10).max_new_tokens == 6
    with pytest.raises(ValueError, match="max_length: the input is 4 tokens long"):
        resolve(max_length=4)
    with pytest.raises(ValueError, match="max_new_tokens must be an integer >= 1, got 2.5"):
        resolve(max_new_tokens=2.5)


def test_the_default_max_length_warns_and_stops_at_the_model_positions():
    model = SimpleNamespace(generation_config=None, config=SimpleNamespace(max_position_embeddings=12))
    with pytest.warns(UserWarning, match="model-agnostic default `max_length` \\(=12\\)"):
        options = resolve(model=model, eos_token_id=1)
    assert options.max_new_tokens == 8  # 20 + 4 prompt tokens, cut to the 12 positions


def test_min_length_counts_the_prefix_and_min_new_tokens_wins():
    assert resolve(max_new_tokens=5, min_length=6).min_new_tokens == 2
    assert resolve(max_new_tokens=5, min_length=2).min_new_tokens == 0
    assert resolve(max_new_tokens=5, min_length=6, min_new_tokens=1).min_new_tokens == 1


def test_token_ids_are_normalised_and_checked():
    options = resolve(max_new_tokens=3, eos_token_id=[3, -1], forced_eos_token_id=[3, 4])
    assert options.eos_token_ids == (3,) and options.pad_token_id == 3 and options.forced_eos_token_id == (3, 4)
    assert resolve(max_new_tokens=3).pad_token_id == 0  # no eos, no pad
    with pytest.raises(ValueError, match="pad_token_id 10 is outside the vocabulary"):
        resolve(max_new_tokens=3, pad_token_id=10)
    with pytest.raises(ValueError, match="forced_bos_token_id 11"):
        resolve(max_new_tokens=3, forced_bos_token_id=11)
    with pytest.raises(ValueError, match="consistent=True needs an eos token"):
        resolve(max_new_tokens=3, consistent=True)


def test_the_decoder_start_token_is_an_encoder_decoder_option():
    assert resolve(max_new_tokens=3, decoder_start_token_id=5).decoder_start_token_id is None
    assert resolve(max_new_tokens=3, is_encoder_decoder=True, decoder_start_token_id=5).decoder_start_token_id == 5
    with pytest.raises(ValueError, match="decoder_start_token_id must be one token id"):
        resolve(max_new_tokens=3, is_encoder_decoder=True, decoder_start_token_id=[5, 6])


def test_search_settings():
    beam = resolve(max_new_tokens=3, num_beams=3, num_return_sequences=2, eos_token_id=[1, 2])
    assert beam.is_beam_search and beam.rows_per_prompt == 3
    assert beam.truncation.min_tokens_to_keep == 3  # beam sampling keeps every eos and one more token
    sampled = resolve(max_new_tokens=3, do_sample=True, num_return_sequences=4)
    assert not sampled.is_beam_search and sampled.rows_per_prompt == 4
    with pytest.raises(ValueError, match="num_return_sequences"):  # greedy and beam search: at most num_beams
        resolve(max_new_tokens=3, num_beams=2, num_return_sequences=3)
    with pytest.raises(ValueError, match="early_stopping"):
        resolve(max_new_tokens=3, num_beams=2, early_stopping="sometimes")


def test_temperature_is_checked_only_when_sampling():
    assert resolve(max_new_tokens=3, temperature=0.0).temperature == 0.0
    assert resolve(max_new_tokens=3, do_sample=True, temperature=0.5).temperature == 0.5
    with pytest.raises(ValueError, match="temperature must be a finite number > 0 when sampling"):
        resolve(max_new_tokens=3, do_sample=True, temperature=0.0)


def test_penalties():
    options = resolve(max_new_tokens=3, repetition_penalty=1.3, no_repeat_ngram_size=2,
                      exponential_decay_length_penalty=(2, 1.5), eos_token_id=1)
    assert (options.repetition_penalty, options.no_repeat_ngram_size) == (1.3, 2)
    assert options.exponential_decay_length_penalty == (2, 1.5)
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        resolve(max_new_tokens=3, repetition_penalty=0.0)
    with pytest.raises(ValueError, match="exponential_decay_length_penalty"):
        resolve(max_new_tokens=3, exponential_decay_length_penalty=(2, 0.5))


def test_options_the_library_does_not_implement_raise_instead_of_being_ignored():
    with pytest.raises(TypeError, match="unsupported keyword arguments \\['speculate'\\]"):
        resolve(max_new_tokens=3, speculate=True)
    with pytest.raises(NotImplementedError, match="diversity_penalty=0.5 is not supported"):
        resolve(max_new_tokens=3, num_beams=2, diversity_penalty=0.5)
    assert resolve(max_new_tokens=3, diversity_penalty=0.0).max_new_tokens == 3  # its "off" value is fine


def test_keywords_override_the_generation_config_which_overrides_the_model_s():
    model = SimpleNamespace(generation_config=GenerationConfig(max_new_tokens=7, top_k=3, eos_token_id=1))
    given = GenerationConfig(max_new_tokens=5)
    options = resolve_options(model, prefix_length=2, vocab_size=VOCAB, is_encoder_decoder=False,
                              kwargs={"top_k": 4}, generation_config=given)
    assert (options.max_new_tokens, options.truncation.top_k, options.eos_token_ids) == (5, 4, (1,))
