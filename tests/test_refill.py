"""generate(max_batch_size=...): continuous batching (rows that finish are refilled with the next prompts)
and chunked decoding give every prompt the tokens it gets when all prompts decode at once."""

from __future__ import annotations

import pytest
import torch
from transformers.cache_utils import DynamicCache

from decoding import adapters, generate
from decoding.kv_cache import ReservedLayer, merge_caches
from decoding.models import lstm_lm
from decoding.self_terminating import make_self_terminating
from tests.tiny_models import EOS, PAD, left_padded_prompts, tiny_model

STRATEGIES = {
    "greedy": {},
    "top-k": {"do_sample": True, "top_k": 8},
    "nucleus x3": {"do_sample": True, "top_p": 0.9, "num_return_sequences": 3},
    "beam 3 x2": {"num_beams": 3, "num_return_sequences": 2},
    "beam 2 never": {"num_beams": 2, "length_penalty": 0.7, "early_stopping": "never"},
}


def _model(kind: str) -> torch.nn.Module:
    """Random models whose rows end after 1 to 30 tokens (the self-terminating ones when sampling)."""
    if kind in ("lstm", "lstm-nmst"):
        torch.manual_seed(0)
        extra = {"head": "nmst", "epsilon": 0.02} if kind == "lstm-nmst" else {}
        model = lstm_lm(64, eos_token_id=EOS, pad_token_id=PAD, hidden_size=32, **extra).eval()
        with torch.no_grad():
            if not extra:
                model.embedding.weight.normal_(0.0, 2.0)  # peaked outputs (tied weights): greedy rows differ
            model.output.bias[EOS] = -5.0 if extra else 1.0
        return model
    if kind == "gpt2-st":
        base = tiny_model("gpt2", seed=2, eos_boost=1.0)
        bias = torch.zeros(base.config.vocab_size)
        bias[EOS] = 5.0  # GPT-2's output layer has no bias: add one after it
        base.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
        return make_self_terminating(base, kind="st", epsilon=0.05, eos_token_id=EOS)
    if kind == "gpt2":
        return tiny_model("gpt2", seed=2, eos_boost=4.0)
    return tiny_model(kind, eos_boost=2.0)


# random self-terminating heads put eos first at step 1 under greedy and beam search: they are checked sampling
CASES = [(kind, strategy) for kind in ("gpt2", "llama", "lstm", "lstm-nmst", "gpt2-st") for strategy in STRATEGIES
         if STRATEGIES[strategy].get("do_sample") or kind not in ("lstm-nmst", "gpt2-st")]


@pytest.fixture
def merges(monkeypatch):
    """Counts the merges (admissions next to running rows) of every step-model class that merges."""
    from decoding.models import RecurrentStepModel

    calls: list[str] = []
    for cls in (adapters.CausalLMStepModel, RecurrentStepModel):
        original = cls.merge

        def counting(self, state, other, _original=original, _name=cls.__name__):
            calls.append(_name)
            return _original(self, state, other)

        monkeypatch.setattr(cls, "merge", counting)
    return calls


def _both(model, ids, mask, *, limit: int, **options):
    kw = {"max_new_tokens": 30, "eos_token_id": EOS, "pad_token_id": PAD, "return_dict_in_generate": True,
          **options}
    whole = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), **kw)
    limited = generate(model, ids, mask, generator=torch.Generator().manual_seed(3), max_batch_size=limit, **kw)
    return whole, limited


@pytest.mark.parametrize(("kind", "strategy"), CASES)
def test_refilling_gives_the_tokens_of_one_batch(kind, strategy, merges):
    ids, mask = left_padded_prompts(seed=1, batch=17, length=6)
    options = STRATEGIES[strategy]
    limit = 6 if options.get("num_return_sequences") or options.get("num_beams") else 5
    whole, limited = _both(_model(kind), ids, mask, limit=limit, **options)
    assert torch.equal(whole.sequences, limited.sequences)
    assert torch.equal(whole.lengths, limited.lengths)
    assert torch.equal(whole.terminated, limited.terminated)
    if whole.sequences_scores is not None:  # attention over other rows' masked columns: last-bit differences
        assert torch.allclose(whole.sequences_scores, limited.sequences_scores, rtol=1e-5, atol=1e-6)
    assert merges, "no prompt was admitted next to running rows: the refill path did not run"
    lengths = whole.lengths.tolist()
    assert min(lengths) < max(lengths), "rows must finish at different steps for the check to mean anything"


def test_refilling_forgets_columns_no_row_attends(monkeypatch):
    """Long decodes: columns hidden from every row are dropped from the cache, tokens unchanged."""
    seen: list[int] = []
    original = adapters.merge_caches

    def spy(cache, other, *, width, drop=0):
        seen.append(drop)
        return original(cache, other, width=width, drop=drop)

    monkeypatch.setattr(adapters, "merge_caches", spy)
    model = tiny_model("llama", eos_boost=1.6)
    ids, mask = left_padded_prompts(seed=0, batch=30, length=7)
    whole, limited = _both(model, ids, mask, limit=4, max_new_tokens=100)
    assert whole.lengths.min() < 10 and whole.lengths.max() == 100
    assert torch.equal(whole.sequences, limited.sequences)
    assert any(drop > 0 for drop in seen)


def test_refilling_uncached_matches(merges):
    model = _model("gpt2")
    ids, mask = left_padded_prompts(seed=2, batch=9, length=5)
    whole, limited = _both(model, ids, mask, limit=3, use_cache=False)
    assert torch.equal(whole.sequences, limited.sequences)
    assert merges


@pytest.mark.parametrize("options", [
    {"repetition_penalty": 1.3},                                      # a processor: chunks
    {"min_new_tokens": 4},
    {"num_beams": 3, "num_return_sequences": 2, "no_repeat_ngram_size": 2},
])
def test_chunked_decoding_matches(options, merges):
    model = _model("gpt2")
    ids, mask = left_padded_prompts(seed=4, batch=7, length=6)
    limit = 6 if "num_beams" in options else 3
    whole, limited = _both(model, ids, mask, limit=limit, **options)
    assert torch.equal(whole.sequences, limited.sequences)
    assert torch.equal(whole.lengths, limited.lengths)
    if whole.sequences_scores is not None:
        assert torch.allclose(whole.sequences_scores, limited.sequences_scores)
    assert not merges, "with processors the prompts go in chunks, never merged"


def test_beam_sampling_goes_in_chunks(merges):
    """Beam sampling draws its noise per prompt and step for all prompts of a call: chunked, not refilled."""
    model = _model("gpt2")
    ids, mask = left_padded_prompts(seed=4, batch=7, length=6)
    kw = dict(num_beams=2, do_sample=True, max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD)
    first, again = (generate(model, ids, mask, generator=torch.Generator().manual_seed(0), max_batch_size=4, **kw)
                    for _ in range(2))
    assert torch.equal(first, again) and first.shape[0] == 7
    assert not merges


def test_chunked_encoder_decoder_matches():
    model = tiny_model("bart", eos_boost=2.0)
    ids, mask = left_padded_prompts(seed=5, batch=7, length=6)
    whole, limited = _both(model, ids, mask, limit=2)
    assert torch.equal(whole.sequences, limited.sequences)


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "8"])
def test_max_batch_size_is_checked(bad):
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(batch=3)
    with pytest.raises(ValueError, match="max_batch_size"):
        generate(model, ids, mask, max_new_tokens=3, max_batch_size=bad)


def test_max_batch_size_must_hold_one_prompts_beams():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(batch=3)
    with pytest.raises(ValueError, match=r"max_batch_size must be an integer >= 4"):
        generate(model, ids, mask, max_new_tokens=3, num_beams=4, max_batch_size=3)


def _filled_layer(keys: torch.Tensor, reserve: int = 8) -> ReservedLayer:
    layer = ReservedLayer(reserve)
    layer.update(keys, keys + 100)
    return layer


def test_reserved_layer_append_rows_right_aligns_and_zero_fills():
    torch.manual_seed(0)
    mine, theirs = torch.randn(3, 2, 6, 4), torch.randn(1, 2, 4, 4)
    layer = _filled_layer(mine)
    layer.batch_select_indices(torch.tensor([0, 2]))          # rows free in the buffers: written in place
    buffer = layer._key_buffer
    layer.append_rows(_filled_layer(theirs), width=6)
    assert layer._key_buffer is buffer
    assert torch.equal(layer.keys[:2], mine[[0, 2]])
    assert torch.equal(layer.keys[2:, :, 2:], theirs)
    assert torch.equal(layer.keys[2:, :, :2], torch.zeros(1, 2, 2, 4))
    assert torch.equal(layer.values[2:, :, 2:], theirs + 100)

    longer = _filled_layer(torch.randn(1, 2, 9, 4))            # the newcomer is longer: realign the others
    layer.append_rows(longer, width=9)
    assert layer.keys.shape == (4, 2, 9, 4)
    assert torch.equal(layer.keys[:2, :, 3:], mine[[0, 2]])
    assert torch.equal(layer.keys[:2, :, :3], torch.zeros(2, 2, 3, 4))
    assert torch.equal(layer.keys[3], longer.keys[0])
    with pytest.raises(ValueError, match="width"):
        layer.append_rows(longer, width=8)


@pytest.mark.parametrize("count", [0, 1, 3, 5, 10])
def test_reserved_layer_drop_leading_equals_slicing(count):
    torch.manual_seed(1)
    keys = torch.randn(2, 3, 10, 4)
    layer = _filled_layer(keys)
    layer.drop_leading(count)
    assert torch.equal(layer.keys, keys[:, :, count:])
    assert torch.equal(layer.values, keys[:, :, count:] + 100)
    layer.update(torch.ones(2, 3, 1, 4), torch.ones(2, 3, 1, 4))   # decoding goes on after the drop
    assert torch.equal(layer.keys[:, :, -1], torch.ones(2, 3, 4))
    with pytest.raises(ValueError, match="count"):
        layer.drop_leading(layer.length + 1)


def test_merge_caches_refuses_layers_it_cannot_realign():
    plain = DynamicCache()
    plain.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    other = DynamicCache()
    other.update(torch.randn(1, 2, 3, 4), torch.randn(1, 2, 3, 4), 0)
    with pytest.raises(NotImplementedError, match="ReservedLayer"):
        merge_caches(plain, other, width=3)


def test_a_cache_that_cannot_merge_falls_back_to_chunks(monkeypatch, merges):
    """Sliding-window and other non-dynamic caches: generate sees it after the first prefill and goes in
    chunks instead of failing at the first admission."""
    monkeypatch.setattr(adapters.CausalLMStepModel, "mergeable", lambda self, state: False)
    model = _model("gpt2")
    ids, mask = left_padded_prompts(seed=1, batch=9, length=6)
    whole, limited = _both(model, ids, mask, limit=4)
    assert torch.equal(whole.sequences, limited.sequences)
    assert not merges


# ------------------------------------------------------------------------------ prompt_share
SAMPLED = {name: options for name, options in STRATEGIES.items() if options.get("do_sample")}
SAMPLED["beam sampling 2"] = {"do_sample": True, "num_beams": 2}


def _rows(output, prefix: int) -> list[list[int]]:
    """Each output row's tokens up to its length (shares pad to their own longest row)."""
    return [row[:prefix + n].tolist() for row, n in zip(output.sequences, output.lengths.tolist())]


@pytest.mark.parametrize("kind", ["gpt2", "lstm"])
@pytest.mark.parametrize("strategy", sorted(SAMPLED))
@pytest.mark.parametrize("limit", [None, 6])
def test_prompt_share_splits_a_sampled_call(kind, strategy, limit):
    """Shares of a batch, each decoded alone with prompt_share (as processes under torchrun do), sample what
    one call on the whole batch samples; without prompt_share a share draws other numbers."""
    model, options = _model(kind), SAMPLED[strategy]
    ids, mask = left_padded_prompts(seed=6, batch=7, length=6)
    kw = {"max_new_tokens": 20, "eos_token_id": EOS, "pad_token_id": PAD, "return_dict_in_generate": True,
          **options}
    whole = generate(model, ids, mask, generator=torch.Generator().manual_seed(5), **kw)
    per_prompt = options.get("num_return_sequences", 1)
    shared, alone = [], []
    for first, stop in ((0, 3), (3, 4), (4, 7)):
        shared += _rows(generate(model, ids[first:stop], mask[first:stop], generator=torch.Generator().manual_seed(5),
                                 prompt_share=(first, 7), max_batch_size=limit, **kw), ids.shape[1])
        alone += _rows(generate(model, ids[first:stop], mask[first:stop], generator=torch.Generator().manual_seed(5),
                                **kw), ids.shape[1])
    assert shared == _rows(whole, ids.shape[1])
    assert alone[3 * per_prompt:] != shared[3 * per_prompt:], "shares must need prompt_share to match"


@pytest.mark.parametrize(("share", "error"), [
    ((0, 2), ValueError), ((-1, 5), ValueError), ((3, 5), ValueError), ((0.0, 5), TypeError), (5, TypeError),
    ((0, 5, 1), TypeError), ((True, 5), TypeError),
])
def test_prompt_share_is_checked(share, error):
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(batch=3)
    with pytest.raises(error, match="prompt_share"):
        generate(model, ids, mask, max_new_tokens=3, do_sample=True, prompt_share=share)


def test_prompt_share_needs_sampling():
    model = tiny_model("gpt2")
    ids, mask = left_padded_prompts(batch=3)
    with pytest.raises(ValueError, match="prompt_share.*do_sample"):
        generate(model, ids, mask, max_new_tokens=3, prompt_share=(0, 3))
