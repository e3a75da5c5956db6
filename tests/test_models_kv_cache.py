"""The reserved KV cache holds exactly what transformers' concatenating cache holds, and decoding with it
gives bit-identical logits."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicLayer

from decoding.models.adapters import hf_step_model
from decoding.models.kv_cache import ReservedLayer, reserve_cache
from tests.tiny_models import DECODER_ONLY, ENCODER_DECODER, left_padded_prompts, tiny_model


def _kv(generator, batch=3, tokens=1):
    return (torch.randn(batch, 2, tokens, 4, generator=generator),
            torch.randn(batch, 2, tokens, 4, generator=generator))


@pytest.mark.parametrize("reserve", [0, 3, 50])
def test_reserved_layer_matches_dynamic_layer_through_updates_and_reorders(reserve):
    g = torch.Generator().manual_seed(0)
    plain, reserved = DynamicLayer(), ReservedLayer(reserve)
    for layer in (plain, reserved):
        assert layer.get_seq_length() == 0
    prompt = _kv(g, tokens=5)
    outputs = [plain.update(*prompt), reserved.update(*prompt)]
    batch = 3
    for step in range(150):  # well past every reservation: the buffer grows several times
        kv = _kv(g, batch=batch)
        outputs = [plain.update(*kv), reserved.update(*kv)]
        assert reserved.get_seq_length() == plain.get_seq_length()
        for got, want in zip(outputs[1], outputs[0]):  # what attention sees at this step
            assert torch.equal(got, want)
        buffer = reserved._key_buffer
        if step == 20:  # a reorder with a repeated row moves rows in place, no new buffer
            index = torch.tensor([2, 0, 0])
            plain.reorder_cache(index)
            reserved.reorder_cache(index)
            assert reserved._key_buffer is buffer
        if step == 30:  # identity reorder: nothing moves
            plain.reorder_cache(torch.arange(3))
            reserved.reorder_cache(torch.arange(3))
        if step == 40:
            plain.batch_repeat_interleave(2)
            reserved.batch_repeat_interleave(2)
            batch = 6
        if step == 41:  # dropping rows (unsorted) keeps the buffer
            keep = torch.tensor([5, 1, 2])
            plain.batch_select_indices(keep)
            reserved.batch_select_indices(keep)
            assert reserved._key_buffer is buffer
            batch = 3
        if step == 60:
            plain.crop(-4)
            reserved.crop(-4)
        assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)
    assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)


def test_update_does_not_copy_the_filled_part():
    layer = ReservedLayer(reserve=10)
    g = torch.Generator().manual_seed(0)
    layer.update(*_kv(g, tokens=4))
    pointer = layer.keys.data_ptr()
    for _ in range(10):
        keys, _ = layer.update(*_kv(g))
    assert keys.data_ptr() == pointer and keys.shape[2] == 14


def test_crop_rejects_positive_values():
    layer = ReservedLayer()
    with pytest.raises(ValueError, match="tokens_to_remove"):
        layer.crop(3)


def test_reserve_cache_rejects_negative_reserve():
    with pytest.raises(ValueError, match="reserve"):
        reserve_cache(None, -1)


def _self_attention_layers(cache):
    return getattr(cache, "self_attention_cache", cache).layers


@pytest.mark.parametrize("kind", DECODER_ONLY + ENCODER_DECODER)
def test_step_model_cache_is_reserved_and_logits_bit_identical(kind, monkeypatch):
    model = tiny_model(kind)
    ids, mask = left_padded_prompts()
    if kind in ENCODER_DECODER:
        mask = mask.flip(1)  # encoders take right padding
        ids = torch.where(mask.bool(), ids, 0 if kind == "t5" else 2)
    plain, reserved = hf_step_model(model), hf_step_model(model).reserving(4)
    logits_a, state_a, _ = reserved.prefill(ids, mask)
    assert all(isinstance(layer, ReservedLayer) for layer in _self_attention_layers(state_a.cache))
    # the reference keeps transformers' own concatenating layers
    monkeypatch.setattr("decoding.models.adapters.reserve_cache", lambda cache, reserve: cache)
    logits_b, state_b, _ = plain.prefill(ids, mask)
    assert not any(isinstance(layer, ReservedLayer) for layer in _self_attention_layers(state_b.cache))
    assert torch.equal(logits_a, logits_b)
    for step in range(12):  # past the reservation of 4
        tokens = logits_a.argmax(-1)
        logits_a, state_a = reserved.step(tokens, state_a)
        logits_b, state_b = plain.step(tokens, state_b)
        assert torch.equal(logits_a, logits_b), f"step {step}"
        if step == 5:  # drop a row, as finished rows are dropped
            keep = torch.tensor([0, 2, 3])
            state_a, state_b = reserved.select(state_a, keep), plain.select(state_b, keep)
            logits_a, logits_b = logits_a[keep], logits_b[keep]


def test_reorders_by_one_index_tensor_stay_right_when_it_is_changed_in_place():
    """The rows to move are found once per index tensor (every layer shares it); changing the tensor in place
    between layers must not reuse the stale answer."""
    g = torch.Generator().manual_seed(1)
    index = torch.tensor([1, 1, 0])
    for new_index in ([1, 1, 0], [2, 0, 1]):
        index.copy_(torch.tensor(new_index))
        plain, reserved = DynamicLayer(), ReservedLayer(4)
        kv = _kv(g, batch=3, tokens=5)
        plain.update(*kv)
        reserved.update(*kv)
        plain.reorder_cache(index)
        reserved.reorder_cache(index)
        assert torch.equal(reserved.keys, plain.keys) and torch.equal(reserved.values, plain.values)
