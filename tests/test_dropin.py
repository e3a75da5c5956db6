"""Drop-in regressions: inputs and options model.generate takes that generate once mishandled, each checked
against transformers' own output or for the error that names the culprit."""

from __future__ import annotations

import importlib

import pytest
import torch
from transformers import GenerationConfig, LogitsProcessor
from transformers.generation import (GenerateBeamDecoderOnlyOutput, GenerateDecoderOnlyOutput,
                                     GenerateEncoderDecoderOutput)

from decoding import GenerateOutput, custom_generate, generate, make_self_terminating
from decoding import search
from tests.tiny_models import EOS, PAD, VOCAB, left_padded_prompts, tiny_model

MAX_NEW = 12


def _encoder_inputs(seed: int = 0, pad: int = PAD):
    ids, mask = left_padded_prompts(seed=seed)
    mask = mask.flip(1)
    return torch.where(mask.bool(), ids.flip(1), pad), mask


def test_int32_input_ids_give_transformers_tokens():
    model = tiny_model("llama")
    ids, mask = left_padded_prompts()
    for options in ({}, {"num_beams": 2}):
        expected = model.generate(ids.int(), attention_mask=mask.int(), max_new_tokens=MAX_NEW, **options)
        ours = generate(model, ids.int(), mask.int(), max_new_tokens=MAX_NEW, **options)
        assert ours.dtype == torch.long and torch.equal(ours, expected)


@pytest.mark.parametrize("how", ["argument", "generation_config"])
def test_decoder_start_token_id_is_used(how):
    model = tiny_model("bart")
    ids, mask = _encoder_inputs()
    options = ({"decoder_start_token_id": 7} if how == "argument"
               else {"generation_config": GenerationConfig(decoder_start_token_id=7, max_new_tokens=MAX_NEW)})
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, **options)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, **options)
    assert (ours[:, 0] == 7).all() and torch.equal(ours, expected)


def test_decoder_start_token_id_outside_the_vocabulary_is_refused():
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        generate(tiny_model("bart"), *_encoder_inputs(), max_new_tokens=3, decoder_start_token_id=VOCAB)


def test_encoder_without_mask_sees_pad_tokens_as_transformers_does():
    model = tiny_model("t5")  # pad id 0
    ids, _ = _encoder_inputs(pad=0)
    assert (ids == 0).any()
    for options in ({}, {"num_beams": 2}):
        expected = model.generate(ids, max_new_tokens=MAX_NEW, **options)
        assert torch.equal(generate(model, ids, max_new_tokens=MAX_NEW, **options), expected)


def test_eos_token_id_as_a_tensor_of_several_ids():
    model = tiny_model("gpt2", eos_boost=1.0)
    ids, mask = left_padded_prompts()
    second = int(generate(model, ids, mask, max_new_tokens=MAX_NEW)[0, ids.shape[1] + 1])
    eos = torch.tensor([EOS, second])
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=eos)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=eos, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, expected) and ours.terminated.any()


def test_eos_minus_one_means_never_stop():
    model = tiny_model("gpt2", eos_boost=4.0)
    ids, mask = left_padded_prompts()
    assert (generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True).lengths < MAX_NEW).any()
    expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, eos_token_id=-1)
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, eos_token_id=-1, return_dict_in_generate=True)
    assert torch.equal(ours.sequences, expected) and (ours.lengths == MAX_NEW).all()


def test_decoder_only_masks_with_holes_give_transformers_tokens():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts()
    mask[:, 3] = 0          # a hole in every row
    mask[2, -1] = 0         # and one row whose last column is padding
    for options in ({}, {"num_beams": 2}):
        expected = model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, **options)
        with pytest.warns(UserWarning, match="right padding"):
            ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, **options)
        assert torch.equal(ours, expected)


# ------------------------------------------------------------------------------------------ validation
@pytest.mark.parametrize(("options", "name"), [
    ({"top_k": 2.5, "do_sample": True}, "top_k"),
    ({"num_beams": 2.5}, "num_beams"),
    ({"num_return_sequences": 1.5, "do_sample": True}, "num_return_sequences"),
    ({"temperature": float("inf"), "do_sample": True}, "temperature"),
    ({"pad_token_id": -7}, "pad_token_id"),
    ({"pad_token_id": VOCAB}, "pad_token_id"),
    ({"eos_token_id": -7}, "eos_token_id"),
])
def test_bad_values_are_refused_before_any_model_work(options, name):
    model = tiny_model("gpt2")
    calls = []
    model.register_forward_hook(lambda *args: calls.append(1))
    with pytest.raises(ValueError, match=name):
        generate(model, *left_padded_prompts(), max_new_tokens=3, **options)
    assert not calls


def test_a_nan_attention_mask_is_refused_by_name():
    ids, mask = left_padded_prompts()
    mask = mask.float()
    mask[0, -1] = float("nan")
    with pytest.raises(ValueError, match="attention_mask"):
        generate(tiny_model("gpt2"), ids, mask, max_new_tokens=3)


class _NaNAt(LogitsProcessor):
    """Writes NaN into one token's score (not eos)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, 5] = float("nan")
        return scores


@pytest.mark.parametrize("options", [{"do_sample": True}, {}, {"num_beams": 2}, {"num_beams": 2, "do_sample": True}])
def test_nan_from_a_logits_processor_names_the_processor(options):
    model = tiny_model("gpt2")
    with pytest.raises(FloatingPointError, match="_NaNAt"):
        generate(model, *left_padded_prompts(), max_new_tokens=3, logits_processor=[_NaNAt()],
                 generator=torch.Generator().manual_seed(0), **options)


def test_nan_logits_from_the_model_still_blame_the_model():
    model = tiny_model("gpt2")
    model.lm_head.register_forward_hook(lambda module, inputs, output: output * float("nan"))
    for options in ({"do_sample": True}, {}, {"num_beams": 2}):
        with pytest.raises(FloatingPointError, match="the model returned NaN"):
            generate(model, *left_padded_prompts(), max_new_tokens=3, **options)


def test_a_temperature_that_overflows_the_scores_is_named():
    with pytest.raises(FloatingPointError, match="temperature"):
        generate(tiny_model("gpt2"), *left_padded_prompts(), max_new_tokens=3, do_sample=True, temperature=1e-45,
                 generator=torch.Generator().manual_seed(0))


def test_a_self_terminating_model_refuses_another_eos():
    model = make_self_terminating(tiny_model("gpt2"), kind="nmst", epsilon=0.1)
    ids, mask = left_padded_prompts()
    for eos in (5, -1):
        with pytest.raises(ValueError, match="eos_token_id"):
            generate(model, ids, mask, max_new_tokens=3, eos_token_id=eos)
    assert generate(model, ids, mask, max_new_tokens=3, eos_token_id=[5, EOS]).shape[0] == ids.shape[0]


class _WideLogits:
    """A step model whose logits have one column more than its vocabulary."""

    vocab_size = 8

    def prefill(self, input_ids, attention_mask):
        logits = torch.zeros(input_ids.shape[0], 9)
        logits[:, 8] = 1.0
        return logits, None, input_ids

    def step(self, tokens, state):
        return self.prefill(tokens[:, None], None)[:2]

    def select(self, state, index):
        return state


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}])
def test_logits_wider_than_the_vocabulary_are_refused(options):
    with pytest.raises(ValueError, match="vocab_size"):
        generate(_WideLogits(), torch.tensor([[1, 2]]), max_new_tokens=3, eos_token_id=0, **options)


# -------------------------------------------------------------------------------------- storage growth
@pytest.mark.parametrize("options", [{}, {"do_sample": True}, {"num_beams": 2}])
def test_a_huge_max_new_tokens_costs_only_what_is_generated(options):
    """Rows stop after a few tokens: neither the token buffers, the random numbers nor the KV cache may be
    sized by the cap (1e12 tokens would not fit in any memory)."""
    model = tiny_model("llama", eos_boost=6.0)
    ids, mask = left_padded_prompts()
    for cap in (10**7, 10**12):
        out = generate(model, ids, mask, max_new_tokens=cap, return_dict_in_generate=True,
                       generator=torch.Generator().manual_seed(0), **options)
        assert out.terminated.all() and out.lengths.max() < 500
    if not options:  # the KV cache kept for every row (drop_finished=False) is sized by the tokens, too
        kept = generate(model, ids, mask, max_new_tokens=10**12, drop_finished=False, return_dict_in_generate=True)
        assert max(layer.keys.untyped_storage().nbytes() for layer in kept.cache.layers) < 10**7


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "top_k": 8}, {"num_beams": 3},
                                     {"num_beams": 2, "do_sample": True}])
def test_storage_that_grows_gives_the_same_tokens(options, monkeypatch):
    """Token buffers, random-number tables and the KV cache start tiny and double many times."""
    model = tiny_model("llama", eos_boost=1.0)
    ids, mask = left_padded_prompts(batch=5)
    kw = dict(max_new_tokens=40, return_dict_in_generate=True, **options)
    whole = generate(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    monkeypatch.setattr(search, "FIRST_CAPACITY", 3)
    monkeypatch.setattr(importlib.import_module("decoding.generate"), "RESERVED_UP_FRONT", 2)
    grown = generate(model, ids, mask, generator=torch.Generator().manual_seed(2), **kw)
    assert torch.equal(whole.sequences, grown.sequences) and torch.equal(whole.lengths, grown.lengths)
    assert whole.lengths.max() > 12  # past 3, 6 and 12 generated columns
    if not options:  # greedy: transformers' tokens too
        assert torch.equal(grown.sequences, model.generate(ids, attention_mask=mask, max_new_tokens=40))


# ---------------------------------------------------------------------------- chunks keep seeded samples
@pytest.mark.parametrize(("kind", "options"), [
    ("bart", {"do_sample": True, "top_k": 8}),
    ("gpt2", {"do_sample": True, "num_beams": 2}),
    ("gpt2", {"do_sample": True, "min_new_tokens": 3}),
    ("gpt2", {"do_sample": True, "repetition_penalty": 1.3, "num_return_sequences": 2}),
    ("gpt2", {"do_sample": True, "logits_processor": [lambda ids, scores: scores * 1.1]}),
])
def test_chunked_sampling_draws_what_one_batch_draws(kind, options):
    model = tiny_model(kind, eos_boost=2.0)
    ids, mask = _encoder_inputs() if kind == "bart" else left_padded_prompts(batch=7)
    per_prompt = options.get("num_beams", options.get("num_return_sequences", 1))
    kw = dict(max_new_tokens=16, return_dict_in_generate=True, **options)
    whole = generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    chunked = generate(model, ids, mask, generator=torch.Generator().manual_seed(5), max_batch_size=2 * per_prompt,
                       **kw)
    assert torch.equal(whole.sequences, chunked.sequences)
    other_seed = generate(model, ids, mask, generator=torch.Generator().manual_seed(6), **kw)
    assert not torch.equal(whole.sequences, other_seed.sequences)


# -------------------------------------------------------------------------------------------- outputs
def test_outputs_are_transformers_classes_with_our_fields():
    ids, mask = left_padded_prompts()
    greedy = generate(tiny_model("gpt2"), ids, mask, max_new_tokens=4, return_dict_in_generate=True)
    beam = generate(tiny_model("gpt2"), ids, mask, max_new_tokens=4, num_beams=2, return_dict_in_generate=True)
    seq2seq = generate(tiny_model("t5"), *_encoder_inputs(pad=0), max_new_tokens=4, return_dict_in_generate=True)
    assert isinstance(greedy, GenerateDecoderOnlyOutput) and isinstance(beam, GenerateBeamDecoderOnlyOutput)
    assert isinstance(seq2seq, GenerateEncoderDecoderOutput)
    for out in (greedy, beam, seq2seq):
        assert isinstance(out, GenerateOutput) and out.lengths is not None and out.terminated is not None
    assert beam.sequences_scores.shape == (ids.shape[0],) and beam.cache is None


# ------------------------------------------------------------------------------------------ model inputs
def _token_types(ids):
    return torch.randint(0, 2, ids.shape, generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("options", [{}, {"num_beams": 3, "num_return_sequences": 2}])
def test_token_type_ids_pass_through(options):
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts()
    types = _token_types(ids)
    expected = model.generate(ids, attention_mask=mask, token_type_ids=types, max_new_tokens=MAX_NEW, **options)
    assert not torch.equal(expected, model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, **options))
    ours = generate(model, ids, mask, token_type_ids=types, max_new_tokens=MAX_NEW, **options)
    inside = model.generate(ids, attention_mask=mask, token_type_ids=types, max_new_tokens=MAX_NEW,
                            custom_generate=custom_generate, **options)
    assert torch.equal(ours, expected) and torch.equal(inside, expected)


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}])
def test_token_type_ids_follow_their_rows_when_refilling(options):
    model = tiny_model("gpt2", eos_boost=3.0)
    ids, mask = left_padded_prompts(batch=9)
    types = _token_types(ids)
    kw = dict(token_type_ids=types, max_new_tokens=MAX_NEW, **options)
    whole = generate(model, ids, mask, **kw)
    assert torch.equal(whole, model.generate(ids, attention_mask=mask, **kw))
    assert torch.equal(generate(model, ids, mask, max_batch_size=2 * options.get("num_beams", 1), **kw), whole)


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}])
def test_position_ids_pass_through(options):
    model = tiny_model("gpt2")  # absolute positions: shifting them changes the tokens
    ids, mask = left_padded_prompts()
    positions = (mask.cumsum(-1) - 1).clamp_min(0) + 5
    kw = dict(attention_mask=mask, position_ids=positions, max_new_tokens=MAX_NEW, **options)
    expected = model.generate(ids, **kw)
    assert not torch.equal(expected, model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, **options))
    assert torch.equal(generate(model, ids, **kw), expected)
    assert torch.equal(model.generate(ids, custom_generate=custom_generate, **kw), expected)


@pytest.mark.parametrize("with_ids", [False, True])
def test_inputs_embeds_pass_through(with_ids):
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts()
    embeds = model.get_input_embeddings()(ids) * 1.5  # not what the ids would give
    prompt = ids if with_ids else None
    expected = model.generate(prompt, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW)
    ours = generate(model, prompt, mask, inputs_embeds=embeds, max_new_tokens=MAX_NEW)
    inside = model.generate(prompt, inputs_embeds=embeds, attention_mask=mask, max_new_tokens=MAX_NEW,
                            custom_generate=custom_generate)
    assert expected.shape[1] == (ids.shape[1] if with_ids else 0) + MAX_NEW
    assert torch.equal(ours, expected) and torch.equal(inside, expected)


def test_a_conversation_continues_from_the_returned_cache():
    model = tiny_model("llama", eos_boost=0.0)
    ids, mask = left_padded_prompts(batch=2)
    first = generate(model, ids, mask, max_new_tokens=5, return_dict_in_generate=True)
    assert first.cache.get_seq_length() == first.sequences.shape[1] - 1
    reply = torch.randint(3, VOCAB, (2, 3), generator=torch.Generator().manual_seed(1))
    history = torch.cat([first.sequences, reply], 1)
    history_mask = torch.cat([mask, torch.ones(2, 8, dtype=torch.long)], 1)
    expected = model.generate(history, attention_mask=history_mask, max_new_tokens=6)
    assert torch.equal(generate(model, history, history_mask, max_new_tokens=6, cache=first.cache), expected)


def test_model_inputs_custom_generate_cannot_pass_are_refused_by_name():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts()
    with pytest.raises(NotImplementedError, match="encoder_hidden_states"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, custom_generate=custom_generate,
                       encoder_hidden_states=torch.zeros(ids.shape[0], 2, 32))


def test_model_inputs_for_models_that_cannot_take_them_are_refused_by_name():
    with pytest.raises(NotImplementedError, match="token_type_ids"):
        generate(tiny_model("t5"), *_encoder_inputs(pad=0), max_new_tokens=3,
                 token_type_ids=torch.zeros(4, 7, dtype=torch.long))
