"""Greedy and beam search tokens against model.generate, exactly (post-eos fill included), for decoder-only
and encoder-decoder models, over inputs that once differed: holes in masks, int32 ids, eos -1 (never stop),
eos ids as a tensor, pad id 0; through decoding.generate and through custom_generate."""

from __future__ import annotations

import warnings

import pytest
import torch

from decoding import custom_generate, generate
from tests.tiny_models import DECODER_ONLY, ENCODER_DECODER, EOS, PAD, left_padded_prompts, tiny_model

SEARCHES = {"greedy": {}, "beam": {"num_beams": 3, "num_return_sequences": 2, "length_penalty": 0.8}}
CASES = ("holes", "int32", "eos -1", "eos tensor", "pad 0")


def _inputs(kind: str, case: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    ids, mask = left_padded_prompts(seed=3)
    if kind in ENCODER_DECODER:
        mask = mask.flip(1)
        ids = torch.where(mask.bool(), ids.flip(1), PAD)
    options: dict = {}
    if case == "holes":
        mask[:, 4] = 0
    elif case == "int32":
        ids, mask = ids.int(), mask.int()
    elif case == "eos -1":
        options["eos_token_id"] = -1
    elif case == "eos tensor":
        options["eos_token_id"] = torch.tensor([EOS, 9])
    elif case == "pad 0":
        options["pad_token_id"] = 0
    return ids, mask, options


@pytest.mark.parametrize("path", ["generate", "custom_generate"])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("search", list(SEARCHES))
@pytest.mark.parametrize("kind", DECODER_ONLY + ENCODER_DECODER)
def test_same_tensor_as_model_generate(kind, search, case, path):
    model = tiny_model(kind, eos_boost=2.5)
    ids, mask, options = _inputs(kind, case)
    options.update(SEARCHES[search], max_new_tokens=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers' notes on pad/eos settings
        expected = model.generate(ids, attention_mask=mask, **options)
        if path == "generate":
            ours = generate(model, ids, mask, **options)
        else:
            ours = model.generate(ids, attention_mask=mask, custom_generate=custom_generate, **options)
    assert ours.dtype == expected.dtype and torch.equal(ours, expected)


def test_the_matrix_has_rows_that_stop_early_and_rows_cut_at_the_cap():
    lengths = torch.cat([
        generate(tiny_model(kind, eos_boost=2.5), *_inputs(kind, "holes")[:2], max_new_tokens=16,
                 return_dict_in_generate=True, **SEARCHES[search]).lengths
        for kind in DECODER_ONLY + ENCODER_DECODER for search in SEARCHES
    ])
    assert (lengths < 16).any() and (lengths == 16).any()
