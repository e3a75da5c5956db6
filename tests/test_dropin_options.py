"""Where the drop-in fixes (growing storage, int32 ids, named NaN culprits) meet the everyday options (streaming,
output_scores / beam_indices, renormalize_logits, custom_generate's processor chain) and the papers' beam rule."""

from __future__ import annotations

import pytest
import torch
from transformers import LogitsProcessor

from decoding import custom_generate, generate, search
from decoding.streaming import Piece
from tests.test_streaming import check_pieces
from tests.tiny_models import left_padded_prompts, tiny_model

STRATEGIES = {"greedy": {}, "sample": {"do_sample": True, "top_k": 8, "num_return_sequences": 2},
              "beam": {"num_beams": 3, "num_return_sequences": 2}}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_streaming_with_a_huge_cap_streams_what_is_generated(strategy):
    """max_new_tokens=10**7: storage follows the tokens, and every row streams to its eos."""
    model = tiny_model("llama", eos_boost=6.0)
    ids, mask = left_padded_prompts()
    pieces: list[Piece] = []
    out = generate(model, ids, mask, max_new_tokens=10**7, return_dict_in_generate=True, stream=pieces.append,
                   generator=torch.Generator().manual_seed(0), **STRATEGIES[strategy])
    assert out.terminated.all() and out.lengths.max() < 500
    check_pieces(pieces, out, ids.shape[1], 10**7)


@pytest.mark.parametrize("limit", [None, 6])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_growing_storage_keeps_pieces_scores_and_beam_indices(strategy, limit, monkeypatch):
    """Buffers (tokens, beam parents, random numbers) that double many times during a streamed decode give the
    pieces, scores and beam indices of buffers sized up front, in one batch and refilled."""
    model = tiny_model("llama", eos_boost=1.0)
    ids, mask = left_padded_prompts(batch=5)
    max_new = 40

    def run():
        pieces: list[Piece] = []
        out = generate(model, ids, mask, max_new_tokens=max_new, return_dict_in_generate=True, output_scores=True,
                       stream=pieces.append, max_batch_size=limit, generator=torch.Generator().manual_seed(3),
                       **STRATEGIES[strategy])
        return out, pieces

    whole, whole_pieces = run()
    monkeypatch.setattr(search, "FIRST_CAPACITY", 3)
    grown, grown_pieces = run()
    assert whole.lengths.max() > 12  # past 3, 6 and 12 generated columns
    check_pieces(grown_pieces, grown, ids.shape[1], max_new)
    assert sorted(whole_pieces, key=lambda p: p.row) == sorted(grown_pieces, key=lambda p: p.row)
    assert torch.equal(whole.sequences, grown.sequences)
    assert len(whole.scores) == len(grown.scores)
    for a, b in zip(whole.scores, grown.scores):
        torch.testing.assert_close(a, b)
    if strategy == "beam":
        assert grown.beam_indices.shape == (grown.sequences.shape[0], grown.sequences.shape[1] - ids.shape[1])
        assert torch.equal(whole.beam_indices, grown.beam_indices)


@pytest.mark.parametrize("path", ["generate", "custom_generate"])
@pytest.mark.parametrize("strategy", ["greedy", "beam"])
def test_output_scores_and_beam_indices_with_int32_input_ids(strategy, path):
    model = tiny_model("gpt2", eos_boost=2.5)
    ids, mask = left_padded_prompts(seed=1)
    ids, mask = ids.int(), mask.int()
    common = dict(max_new_tokens=12, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  **STRATEGIES[strategy])
    theirs = model.generate(ids, attention_mask=mask, **common)
    if path == "generate":
        ours = generate(model, ids, mask, **common)
    else:
        ours = model.generate(ids, attention_mask=mask, custom_generate=custom_generate, **common)
    assert ours.sequences.dtype == torch.long and torch.equal(ours.sequences, theirs.sequences)
    if strategy == "greedy":
        assert (ours.lengths < 12).any()  # some rows left the batch: their later scores are -inf
    for step in range(min(len(ours.scores), len(theirs.scores))):
        alive = ~ours.scores[step].isneginf().all(dim=-1)
        assert alive.any()
        torch.testing.assert_close(ours.scores[step][alive], theirs.scores[step][alive])
        torch.testing.assert_close(ours.logits[step][alive], theirs.logits[step][alive])
    if strategy == "beam":
        assert torch.equal(ours.beam_indices, theirs.beam_indices)
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)


@pytest.mark.parametrize("limit", [None, 3])
def test_papers_beam_rule_streams_its_returned_sequences(limit):
    model = tiny_model("llama", eos_boost=2.5)
    ids, mask = left_padded_prompts(seed=2, batch=6)
    common = dict(max_new_tokens=10, num_beams=3, beam_rule="papers", return_dict_in_generate=True)
    pieces: list[Piece] = []
    out = generate(model, ids, mask, stream=pieces.append, max_batch_size=limit, **common)
    check_pieces(pieces, out, ids.shape[1], 10)
    assert out.terminated.any()
    plain = generate(model, ids, mask, **common)
    assert torch.equal(out.sequences, plain.sequences)
    transformers_rule = generate(model, ids, mask, max_new_tokens=10, num_beams=3)
    assert not torch.equal(plain.sequences, transformers_rule)  # the rule is in force here


class _NaNAt(LogitsProcessor):
    """Writes NaN into one token's score (not eos)."""

    def __call__(self, input_ids, scores):
        scores = scores.clone()
        scores[:, 5] = float("nan")
        return scores


@pytest.mark.parametrize("options", [{}, {"num_beams": 2}, {"do_sample": True}])
@pytest.mark.parametrize("path", ["generate", "custom_generate"])
def test_a_nan_processor_is_named_with_renormalize_logits_and_through_custom_generate(path, options):
    """renormalize_logits' log-softmax after the processors spreads the NaN; custom_generate's chain keeps the
    user's processor by name."""
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts()
    common = dict(max_new_tokens=3, renormalize_logits=True, logits_processor=[_NaNAt()],
                  generator=torch.Generator().manual_seed(0), **options)
    with pytest.raises(FloatingPointError, match="_NaNAt"):
        if path == "generate":
            generate(model, ids, mask, **common)
        else:
            model.generate(ids, attention_mask=mask, custom_generate=custom_generate, **common)
