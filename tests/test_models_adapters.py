"""transformers models as step models (:mod:`decoding.models.adapters`): what wraps and what is refused,
position ids, and that the cached, reordered and merged states give the logits of computing from scratch."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Model

from decoding.models.adapters import CausalLMStepModel, Seq2SeqStepModel, hf_step_model, positions_from_mask
from decoding.protocol import ModelInputs
from tests.tiny_models import EOS, left_padded_prompts, tiny_model

TOLERANCE = dict(atol=1e-5, rtol=1e-5)


def test_positions_count_real_tokens_from_zero():
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 0, 1, 1]])  # left padding, and a hole
    assert positions_from_mask(mask).tolist() == [[0, 0, 0, 1, 2], [0, 1, 0, 2, 3]]


def test_what_wraps_and_what_is_refused():
    gpt2, bart = tiny_model("gpt2"), tiny_model("bart")
    assert isinstance(hf_step_model(gpt2), CausalLMStepModel)
    seq2seq = hf_step_model(bart)
    assert isinstance(seq2seq, Seq2SeqStepModel) and seq2seq.decoder_start_token_id == EOS
    assert hf_step_model(bart, decoder_start_token_id=5).decoder_start_token_id == 5
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        hf_step_model(torch.nn.Linear(3, 3))
    with pytest.raises(TypeError, match="no language-modelling head"):
        hf_step_model(GPT2Model(gpt2.config))
    bart.config.decoder_start_token_id = bart.generation_config.decoder_start_token_id = None
    bart.config.bos_token_id = None
    with pytest.raises(ValueError, match="decoder_start_token_id"):
        hf_step_model(bart)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_cached_steps_give_the_logits_of_recomputing(kind):
    cached = hf_step_model(tiny_model(kind))
    uncached = cached.uncached()
    ids, mask = left_padded_prompts(batch=3)
    tokens = torch.tensor([[5, 6, 7], [8, 9, 10], [11, 12, 13]])  # three steps, one column per step
    (logits, state, _), (reference, ref_state, _) = cached.prefill(ids, mask), uncached.prefill(ids, mask)
    torch.testing.assert_close(logits, reference, **TOLERANCE)
    for column in tokens.T:
        logits, state = cached.step(column, state)
        reference, ref_state = uncached.step(column, ref_state)
        torch.testing.assert_close(logits, reference, **TOLERANCE)


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_select_moves_every_piece_of_row_state(kind):
    step_model = hf_step_model(tiny_model(kind))
    ids, mask = left_padded_prompts(batch=3)
    _, state, _ = step_model.prefill(ids, mask)
    tokens = torch.tensor([5, 6, 7])
    logits, _ = step_model.step(tokens, state)
    index = torch.tensor([2, 0, 0])
    _, fresh_state, _ = step_model.prefill(ids, mask)
    moved, _ = step_model.step(tokens[index], step_model.select(fresh_state, index))
    torch.testing.assert_close(moved, logits[index], **TOLERANCE)


def test_merged_rows_compute_what_they_compute_alone():
    step_model = hf_step_model(tiny_model("gpt2")).reserving(8)
    ids, mask = left_padded_prompts(batch=4, length=7)
    short_ids, short_mask = ids[2:, 3:], mask[2:, 3:]  # shorter prompts, admitted later
    _, state, _ = step_model.prefill(ids[:2], mask[:2])
    _, state = step_model.step(torch.tensor([5, 6]), state)
    _, later, _ = step_model.prefill(short_ids, short_mask)
    assert step_model.mergeable(state) and step_model.mergeable(later)
    merged_logits, _ = step_model.step(torch.tensor([7, 8, 9, 10]), step_model.merge(state, later))

    _, alone, _ = step_model.prefill(ids[:2], mask[:2])
    _, alone = step_model.step(torch.tensor([5, 6]), alone)
    first, _ = step_model.step(torch.tensor([7, 8]), alone)
    _, alone_later, _ = step_model.prefill(short_ids, short_mask)
    second, _ = step_model.step(torch.tensor([9, 10]), alone_later)
    torch.testing.assert_close(merged_logits, torch.cat([first, second]), **TOLERANCE)


def test_model_inputs_with_a_cache_cannot_be_split_into_chunks():
    inputs = ModelInputs(position_ids=torch.arange(6).view(2, 3))
    assert inputs.rows(slice(1, 2)).position_ids.tolist() == [[3, 4, 5]]
    with pytest.raises(NotImplementedError, match="max_batch_size"):
        ModelInputs(cache=object()).rows(slice(0, 1))
