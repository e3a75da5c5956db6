"""transformers' everyday options (token rules, stopping criteria, stop strings, scores and logits, beam indices)
against model.generate, through decoding.generate and custom_generate; consistent=True's eos rules."""

from __future__ import annotations

import string

import pytest
import torch
from tokenizers import Tokenizer, decoders, pre_tokenizers
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast, StoppingCriteria
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import StopStringCriteria

from decoding import token_rules as R
from decoding.generate import generate
from decoding.interop import custom_generate
from tests.tiny_models import ENCODER_DECODER, EOS, PAD, VOCAB, left_padded_prompts, tiny_model

MAX_NEW = 12
EOS_BOOST = {"gpt2": 2.5, "bart": 0.5}  # greedy: one gpt2 row ends early; bart rows run to the cap
STRATEGIES = {"greedy": {}, "beam": {"num_beams": 3, "num_return_sequences": 2},
              "sample": {"do_sample": True, "top_k": 8, "temperature": 0.7, "num_return_sequences": 2}}


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One character per token id (``VOCAB`` ids), for stop strings and text streamers."""
    chars = (string.ascii_letters + string.digits + "+/")[:VOCAB]
    backend = Tokenizer(WordLevel({c: i for i, c in enumerate(chars)}, unk_token="a"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=backend)


def _inputs(kind: str):
    ids, mask = left_padded_prompts(seed=1)
    if kind in ENCODER_DECODER:
        mask = mask.flip(1)
        ids = torch.where(mask.bool(), ids.flip(1), PAD)
    return ids, mask


class _EndsOn(StoppingCriteria):
    """Row-wise: a row is done once its last token is ``token``."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids, scores, **kwargs):
        return input_ids[:, -1] == self.token


def _option_cases(model, ids, mask, kind: str) -> dict[str, dict]:
    """Each option with values that change the plain greedy output of these prompts (tokens it emits)."""
    plain = generate(model, ids, mask, max_new_tokens=MAX_NEW)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    new = plain[:, prefix:]
    first, second, third = int(new[0, 0]), int(new[1, 1]), int(new[3, 2])
    pair = [int(new[2, 0]), int(new[2, 1])]
    stop_text = char_tokenizer().decode(pair)
    return {
        "bad_words_ids": {"bad_words_ids": [[first], pair, [second, third]]},
        "suppress_tokens": {"suppress_tokens": [first, third]},
        "begin_suppress_tokens": {"begin_suppress_tokens": [int(new[1, 0]), int(new[2, 0])]},
        "sequence_bias": {"sequence_bias": [[[first], -3.0], [[second], 1.5], [pair, 4.0]]},
        "prefix_allowed_tokens_fn": {"prefix_allowed_tokens_fn":
                                     lambda batch_id, sent: [EOS] + list(range(3 + batch_id, VOCAB, 2))},
        "renormalize_logits": {"renormalize_logits": True, "repetition_penalty": 1.5},
        "remove_invalid_values": {"remove_invalid_values": True},
        "stopping_criteria": {"stopping_criteria": [_EndsOn(second)]},
        "stop_strings": {"stop_strings": [stop_text], "tokenizer": char_tokenizer()},
    }


def _theirs(model, ids, mask, options):
    return model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True,
                          output_scores=True, output_logits=True, **options)


def _ours(path, model, ids, mask, options):
    common = dict(max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True, output_logits=True,
                  generator=torch.Generator().manual_seed(0))
    if path == "generate":
        return generate(model, ids, mask, **common, **options)
    options = dict(options)
    if "stop_strings" in options:  # transformers does not hand a callable custom_generate the tokenizer
        options["stopping_criteria"] = [StopStringCriteria(options.pop("tokenizer"), options.pop("stop_strings"))]
    return model.generate(ids, attention_mask=mask, custom_generate=custom_generate, **common, **options)


def _their_chain(model, ids, mask, options):
    """transformers' own processor list for these options, as model.generate builds it."""
    captured = {}

    def capture(model, input_ids, logits_processor, stopping_criteria, generation_config, **kwargs):
        captured["chain"] = logits_processor
        return input_ids

    model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, custom_generate=capture,
                   **{k: v for k, v in options.items() if k not in ("stopping_criteria", "stop_strings", "tokenizer")})
    return captured["chain"]


def _alive(lengths: torch.LongTensor, step: int) -> torch.BoolTensor:
    return lengths > step


@pytest.mark.parametrize("path", ["generate", "custom_generate"])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("option", ["bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                                    "prefix_allowed_tokens_fn", "renormalize_logits", "remove_invalid_values",
                                    "stopping_criteria", "stop_strings"])
def test_option_parity(option, kind, strategy, path):
    model = tiny_model(kind, eos_boost=EOS_BOOST[kind])
    ids, mask = _inputs(kind)
    options = dict(_option_cases(model, ids, mask, kind)[option], **STRATEGIES[strategy])
    ours = _ours(path, model, ids, mask, options)
    prefix = 1 if kind in ENCODER_DECODER else ids.shape[1]
    if strategy == "sample":  # every step: transformers' chain on our rows' history and raw logits
        chain = _their_chain(model, ids, mask, options)
        assert len(ours.scores) == len(ours.logits) == ours.sequences.shape[1] - prefix
        for step, (scores, logits) in enumerate(zip(ours.scores, ours.logits)):
            alive = _alive(ours.lengths, step)
            expected = chain(ours.sequences[:, :prefix + step], logits)
            torch.testing.assert_close(scores[alive], expected[alive], rtol=1e-5, atol=1e-5)
        return
    theirs = _theirs(model, ids, mask, options)
    assert torch.equal(ours.sequences, theirs.sequences)
    if strategy == "greedy":
        for step, (mine, their) in enumerate(zip(ours.scores, theirs.scores)):
            alive = _alive(ours.lengths, step)
            torch.testing.assert_close(mine[alive], their[alive])
            torch.testing.assert_close(ours.logits[step][alive], theirs.logits[step][alive])
    else:
        assert torch.equal(ours.beam_indices, theirs.beam_indices)
        torch.testing.assert_close(ours.sequences_scores, theirs.sequences_scores)
        # a prompt's beams are in the batch until it is done; transformers' run on with the others
        for step in range(min(len(ours.scores), len(theirs.scores))):
            alive = ~ours.scores[step].isneginf().all(dim=-1)
            torch.testing.assert_close(ours.scores[step][alive], theirs.scores[step][alive])
            torch.testing.assert_close(ours.logits[step][alive], theirs.logits[step][alive])


@pytest.mark.parametrize("kind", ["gpt2", "bart"])
@pytest.mark.parametrize("option", ["bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "sequence_bias",
                                    "prefix_allowed_tokens_fn", "stopping_criteria", "stop_strings"])
def test_each_option_changes_the_output(option, kind):
    """The parity cases are not vacuous: every option changes greedy or beam output of these prompts."""
    model = tiny_model(kind, eos_boost=EOS_BOOST[kind])
    ids, mask = _inputs(kind)
    options = _option_cases(model, ids, mask, kind)[option]
    changed = False
    for strategy in ("greedy", "beam"):
        plain = generate(model, ids, mask, max_new_tokens=MAX_NEW, **STRATEGIES[strategy])
        with_option = generate(model, ids, mask, max_new_tokens=MAX_NEW, **options, **STRATEGIES[strategy])
        changed |= plain.shape != with_option.shape or not torch.equal(plain, with_option)
    assert changed


def test_drop_finished_false_gives_transformers_scores_for_finished_rows_too():
    model = tiny_model("gpt2", eos_boost=2.0)
    ids, mask = _inputs("gpt2")
    theirs = _theirs(model, ids, mask, {})
    ours = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True,
                    output_logits=True, drop_finished=False)
    assert (ours.lengths < MAX_NEW).any()
    for mine, their in zip(ours.scores + ours.logits, theirs.scores + theirs.logits):
        torch.testing.assert_close(mine, their)
    dropped = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True)
    finished = ~_alive(dropped.lengths, len(dropped.scores) - 1)
    assert dropped.scores[-1][finished].isneginf().all()


def test_scores_and_beam_indices_survive_chunks_and_refill():
    model = tiny_model("llama", eos_boost=2.0)
    ids, mask = left_padded_prompts(seed=1, batch=6)
    for options in ({"do_sample": False}, {"num_beams": 2}):
        kwargs = dict(max_new_tokens=MAX_NEW, return_dict_in_generate=True, output_scores=True, **options)
        whole = generate(model, ids, mask, **kwargs)
        limited = generate(model, ids, mask, max_batch_size=2 * options.get("num_beams", 1), **kwargs)
        assert torch.equal(whole.sequences, limited.sequences)
        if "num_beams" in options:
            assert torch.equal(whole.beam_indices, limited.beam_indices)
        for a, b in zip(whole.scores, limited.scores):
            alive = ~a.isneginf().all(dim=-1)
            assert torch.equal(alive, ~b.isneginf().all(dim=-1))
            torch.testing.assert_close(a[alive], b[alive], rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------------------------------ pure rules vs transformers


def test_rules_equal_transformers_processors_on_hand_made_scores():
    torch.manual_seed(0)
    history = torch.randint(0, 8, (6, 5))
    scores = torch.randn(6, 8)
    bias = [[[3], -2.0], [[history[0, -1].item(), 5], 1.5], [[history[1, -2].item(), history[1, -1].item(), 6], 4.0]]
    table = R.SequenceBias.build([(tuple(ids), b) for ids, b in bias])
    torch.testing.assert_close(R.sequence_bias(history, scores, table),
                               lp.SequenceBiasLogitsProcessor(bias)(history, scores))
    torch.testing.assert_close(R.suppress(scores, torch.tensor([1, 4])),
                               lp.SuppressTokensLogitsProcessor([1, 4])(history, scores))
    weird = scores.clone()
    weird[0, 0], weird[1, 1], weird[2, 2] = float("nan"), float("inf"), float("-inf")
    assert torch.equal(R.remove_invalid(weird), lp.InfNanRemoveLogitsProcessor()(history, weird))
    allowed = lambda batch_id, sent: [int(sent[-1]), batch_id]  # noqa: E731
    prompt_index = torch.arange(6) // 2
    torch.testing.assert_close(R.allowed_prefix(history, scores, allowed, prompt_index),
                               lp.PrefixConstrainedLogitsProcessor(allowed, 2)(history, scores))
    before = scores.clone()
    R.sequence_bias(history, scores, table)
    assert torch.equal(scores, before)  # pure


# ------------------------------------------------------------------------------------ consistent=True's eos rules


def test_consistent_bad_words_never_ban_eos():
    model = tiny_model("gpt2", eos_boost=2.0)
    ids, mask = _inputs("gpt2")
    last = ids[:, -1].tolist()
    bad = [[token, EOS] for token in last] + [[EOS]]
    kwargs = dict(max_new_tokens=1, do_sample=True, top_k=0, return_dict_in_generate=True, output_scores=True,
                  bad_words_ids=bad)
    plain = generate(model, ids, mask, **kwargs)
    consistent = generate(model, ids, mask, consistent=True, **kwargs)
    assert plain.scores[0][:, EOS].isneginf().all()          # transformers' meaning: [prompt end, eos] is banned
    assert torch.isfinite(consistent.scores[0][:, EOS]).all()


def test_consistent_prefix_constraint_allows_eos():
    model = tiny_model("gpt2", eos_boost=2.0)
    ids, mask = _inputs("gpt2")
    kwargs = dict(max_new_tokens=3, return_dict_in_generate=True, output_scores=True,
                  prefix_allowed_tokens_fn=lambda batch_id, sent: [5, 6])
    assert generate(model, ids, mask, **kwargs).scores[0][:, EOS].isneginf().all()
    assert torch.isfinite(generate(model, ids, mask, consistent=True, **kwargs).scores[0][:, EOS]).all()


@pytest.mark.parametrize("options", [{"suppress_tokens": [4, EOS]}, {"sequence_bias": [[[EOS], float("-inf")]]}])
def test_consistent_refuses_banning_eos_outright(options):
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    generate(model, ids, mask, max_new_tokens=2, **options)  # fine without consistent
    with pytest.raises(ValueError, match="consistent=True"):
        generate(model, ids, mask, max_new_tokens=2, consistent=True, do_sample=True, **options)


@pytest.mark.parametrize("options, match", [
    ({"bad_words_ids": [[3, VOCAB]]}, "bad_words_ids"),
    ({"bad_words_ids": [[]]}, "bad_words_ids"),
    ({"suppress_tokens": [-1]}, "suppress_tokens"),
    ({"sequence_bias": [[[3], float("nan")]]}, "sequence_bias"),
    ({"stop_strings": ["ab"]}, "tokenizer"),
])
def test_bad_option_values_fail_early_by_name(options, match):
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    with pytest.raises(ValueError, match=match):
        generate(model, ids, mask, max_new_tokens=2, **options)
