"""Self-terminating wrappers (:mod:`decoding.models.self_terminating`): the transformers wrapper (loss,
Trainer, save/load), the step wrapper, and termination of every decoder on randomly initialised ST / NMST
models."""

from __future__ import annotations

import json
import math
import warnings

import pytest
import torch
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
)

from decoding.generate import generate
from decoding.heads import context_mask_from_labels, termination_bound
from decoding.models import lstm_lm, rnn_lm
from decoding.models.self_terminating import (
    SelfTerminatingLM,
    SelfTerminatingStepModel,
    load_self_terminating,
    make_self_terminating,
)

VOCAB = 40


def test_make_self_terminating_rejects_bad_arguments():
    model = tiny_gpt2(0)
    with pytest.raises(ValueError, match="kind"):
        make_self_terminating(model, kind="mst", epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        make_self_terminating(model, kind="st", epsilon=1.0)
    with pytest.raises(ValueError, match="eos_token_id"):
        make_self_terminating(model, kind="st", epsilon=0.1, eos_token_id=VOCAB)
    with pytest.raises(TypeError, match="output layer"):
        make_self_terminating(GPT2Model(model.config), kind="st", epsilon=0.1)
    with pytest.raises(TypeError, match="model must be a transformers PreTrainedModel"):
        make_self_terminating(torch.nn.Linear(3, 3), kind="st", epsilon=0.1)
    with pytest.raises(TypeError, match="already self-terminating"):
        make_self_terminating(make_self_terminating(model, kind="st", epsilon=0.1), kind="st", epsilon=0.1)
    model.generation_config.eos_token_id = [0, 1]
    with pytest.raises(ValueError, match="eos_token_id"):
        make_self_terminating(model, kind="st", epsilon=0.1)
    with pytest.raises(ValueError, match="epsilon"):
        SelfTerminatingStepModel(_Table(), kind="st", epsilon=0.0, eos_token_id=0)
    with pytest.raises(ValueError, match="eos_token_id"):
        SelfTerminatingStepModel(_Table(vocab=6), kind="nmst", epsilon=0.1, eos_token_id=6)
    with pytest.raises(TypeError, match="inner"):
        SelfTerminatingStepModel(model, kind="nmst", epsilon=0.1, eos_token_id=0)


# ------------------------------------------------------------------------------ transformers models
def tiny_gpt2(seed: int, eos_bias: float = 0.0, peak: bool = False) -> GPT2LMHeadModel:
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=VOCAB, n_positions=512, n_embd=16, n_layer=2, n_head=2, eos_token_id=0)
    model = GPT2LMHeadModel(config).eval()
    bias = logit_bias(eos=0, eos_bias=eos_bias, peak=peak)
    if bias.any():  # GPT-2's output layer has no bias: add one after it
        model.lm_head.register_forward_hook(lambda module, inputs, output: output + bias)
    return model


def tiny_bart(seed: int, eos_bias: float = 0.0, peak: bool = False) -> BartForConditionalGeneration:
    torch.manual_seed(seed)
    config = BartConfig(
        vocab_size=VOCAB, d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
        decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32, max_position_embeddings=512,
        pad_token_id=1, bos_token_id=0, eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None,
    )  # fmt: skip
    model = BartForConditionalGeneration(config).eval()
    with torch.no_grad():
        model.final_logits_bias.copy_(logit_bias(eos=2, eos_bias=eos_bias, peak=peak).unsqueeze(0))
    return model


def logit_bias(*, eos: int, eos_bias: float, peak: bool) -> torch.Tensor:
    """``[V]``: ``eos_bias`` on eos; with ``peak``, +30 on token 7 so it takes the whole softmax."""
    bias = torch.zeros(VOCAB)
    bias[eos] = eos_bias
    if peak:
        bias[7] = 30.0
    return bias


def recurrent(cell: str, seed: int, *, kind: str, epsilon: float, eos_bias: float = 0.0, peak: bool = False):
    torch.manual_seed(seed)
    build = rnn_lm if cell == "rnn" else lstm_lm
    model = build(VOCAB, eos_token_id=0, head=kind, epsilon=epsilon, hidden_size=16).eval()
    with torch.no_grad():
        model.output.bias.copy_(logit_bias(eos=0, eos_bias=eos_bias, peak=peak))
    return model


def self_terminating(family: str, seed: int, *, kind: str, epsilon: float, eos_bias: float = 0.0, peak: bool = False):
    if family in ("rnn", "lstm"):
        return recurrent(family, seed, kind=kind, epsilon=epsilon, eos_bias=eos_bias, peak=peak)
    build = tiny_gpt2 if family == "gpt2" else tiny_bart
    return make_self_terminating(build(seed, eos_bias, peak), kind=kind, epsilon=epsilon)


class _Table:
    """A bigram step model (raw logits from a table) for testing the wrapper alone."""

    def __init__(self, seed: int = 0, vocab: int = 6) -> None:
        self.table = torch.randn(vocab, vocab, generator=torch.Generator().manual_seed(seed)) * 3
        self.vocab_size = vocab

    def prefill(self, input_ids, attention_mask):
        return self.table[input_ids[:, -1]], input_ids[:, -1], input_ids

    def step(self, tokens, state):
        return self.table[tokens], tokens

    def select(self, state, index):
        return state[index]


def prompts(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Three left-padded prompts of tokens 3..V-1 (no special tokens)."""
    ids = torch.randint(3, VOCAB, (3, 5), generator=torch.Generator().manual_seed(seed))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    mask[1, :1] = 0
    return ids, mask


@pytest.mark.parametrize("family", ["gpt2", "bart"])
@pytest.mark.parametrize("kind", ["st", "nmst"])
def test_hf_forward_returns_log_probs_and_transformers_loss_is_the_nll(family, kind):
    model = self_terminating(family, 0, kind=kind, epsilon=0.1)
    ids, mask = prompts()
    labels = torch.randint(3, VOCAB, (3, 6), generator=torch.Generator().manual_seed(1))
    if family == "gpt2":
        labels = ids.masked_fill(mask == 0, -100)
        labels[:, :3] = -100  # prompt part
    else:
        labels[:, :2] = -100  # a forced decoder prefix
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(ids, mask, labels=labels)
    torch.testing.assert_close(out.logits.logsumexp(-1), torch.zeros(out.logits.shape[:2]))
    shifted = family == "gpt2"
    predicted = labels[:, 1:] if shifted else labels
    log_probs = out.logits[:, :-1] if shifted else out.logits
    keep = predicted != -100
    nll = -log_probs[keep].gather(-1, predicted[keep].unsqueeze(-1)).mean()
    torch.testing.assert_close(out.loss, nll)
    context = context_mask_from_labels(labels, shifted=shifted)
    if shifted:
        context |= mask == 0
    eos = model.eos_token_id
    assert torch.equal(out.logits[..., eos][context].exp(), torch.zeros(int(context.sum())))
    assert bool((out.logits[..., eos][~context].exp() > 0).all())
    decoder = {} if shifted else {"decoder_input_ids": model.base.prepare_decoder_input_ids_from_labels(labels=labels)}
    explicit = model(ids, mask, context_mask=context, **decoder)  # an explicit context mask instead of labels
    assert explicit.loss is None and torch.equal(explicit.logits, out.logits)


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_conversion_keeps_base_model_and_only_reshapes_the_output(family):
    base = tiny_gpt2(0) if family == "gpt2" else tiny_bart(0)
    ids, mask = prompts()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    decoder = {"position_ids": positions} if family == "gpt2" else {"decoder_input_ids": ids[:, 1:]}
    before = base(input_ids=ids, attention_mask=mask, **decoder).logits
    model = make_self_terminating(base, kind="nmst", epsilon=0.01)
    after = base(input_ids=ids, attention_mask=mask, **decoder).logits
    assert torch.equal(before, after)
    log_probs = model(ids, mask, **decoder).logits
    eos = model.eos_token_id
    keep = torch.arange(VOCAB) != eos
    difference = log_probs[..., keep] - torch.log_softmax(before[..., keep], dim=-1)
    torch.testing.assert_close(difference, difference[..., :1].expand_as(difference))  # one shift per position


@pytest.mark.parametrize("family", ["gpt2", "bart"])
def test_save_and_load_round_trip_exactly(tmp_path, family):
    model = self_terminating(family, 3, kind="st", epsilon=0.02)
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "self_terminating.json").read_text()) == {
        "kind": "st", "epsilon": 0.02, "eos_token_id": model.eos_token_id,
    }  # fmt: skip
    loaded = SelfTerminatingLM.from_pretrained(tmp_path).eval()
    assert (loaded.kind, loaded.epsilon, loaded.eos_token_id) == ("st", 0.02, model.eos_token_id)
    ids, mask = prompts()
    decoder = {} if family == "gpt2" else {"decoder_input_ids": ids[:, 1:]}
    assert torch.equal(model(ids, mask, **decoder).logits, loaded(ids, mask, **decoder).logits)
    assert torch.equal(load_self_terminating(tmp_path)(ids, mask, **decoder).logits, model(ids, mask, **decoder).logits)
    with pytest.raises(FileNotFoundError, match="self_terminating.json"):
        load_self_terminating(tmp_path / "missing")


@pytest.mark.parametrize("family", ["gpt2", "bart", "rnn", "lstm"])
@pytest.mark.parametrize("kind", ["st", "nmst"])
def test_step_model_agrees_with_forward(family, kind):
    """KV-cached prefill + steps give the forward's log-probabilities at the generated positions."""
    model = self_terminating(family, 1, kind=kind, epsilon=0.05)
    ids, mask = prompts(2)
    step_model = model.as_step_model()
    log_probs, state, prefix = step_model.prefill(ids, mask)
    stepped, tokens = [log_probs], []
    for _ in range(4):
        token = stepped[-1].argmax(-1) if len(tokens) % 2 else torch.tensor([5, 9, 11])  # not eos
        tokens.append(token)
        log_probs, state = step_model.step(token, state)
        stepped.append(log_probs)
    generated = torch.stack(tokens, 1)
    stepped = torch.stack(stepped, 1)  # [B, 5, V]
    if family == "bart":
        decoder_ids = torch.cat([prefix, generated], 1)
        full = model(ids, mask, decoder_input_ids=decoder_ids).logits
    else:
        sequence = torch.cat([ids, generated], 1)
        labels = torch.cat([torch.full_like(ids, -100), generated], 1)
        full = model(sequence, torch.cat([mask, torch.ones_like(generated)], 1), labels=labels).logits
        full = full[:, ids.shape[1] - 1 :]
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


def test_select_reorders_the_head_state():
    model = SelfTerminatingStepModel(_Table(), kind="st", epsilon=0.1, eos_token_id=0)
    ids = torch.tensor([[1], [2], [3]])
    _, state, _ = model.prefill(ids, torch.ones_like(ids))
    for tokens in ([4, 5, 1], [2, 2, 3]):
        _, state = model.step(torch.tensor(tokens), state)
    index = torch.tensor([2, 0, 0])
    selected = model.select(state, index)
    assert torch.equal(selected.head, state.head[index])
    after_select, _ = model.step(torch.tensor([1, 1, 1]), selected)
    after_all, _ = model.step(torch.tensor([1, 1, 1]), state)
    torch.testing.assert_close(after_select, after_all[index])


# --------------------------------------------------------------------------- termination in decoding
FAMILIES = ["gpt2", "bart", "rnn", "lstm"]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["st", "nmst"])
@pytest.mark.parametrize("epsilon", [1e-1, 1e-2])
def test_greedy_stops_within_the_bound(family, kind, epsilon):
    bound = termination_bound(epsilon)
    ids, mask = prompts()
    for seed, eos_bias in [(0, 0.0), (1, -30.0), (2, 30.0), (3, -30.0)]:
        model = self_terminating(family, seed, kind=kind, epsilon=epsilon, eos_bias=eos_bias)
        out = generate(model, ids, mask, max_new_tokens=bound + 20, return_dict_in_generate=True)
        assert out.terminated.all() and int(out.lengths.max()) <= bound
    # the worst case: eos pushed to the slow end, one token taking all the softmax -> exactly the bound
    slow = 30.0 if kind == "st" else -30.0
    model = self_terminating(family, 4, kind=kind, epsilon=epsilon, eos_bias=slow, peak=True)
    out = generate(model, ids, mask, max_new_tokens=bound + 20, return_dict_in_generate=True)
    assert out.terminated.all() and out.lengths.tolist() == [bound] * 3


SAMPLERS = [
    {"do_sample": True},
    {"do_sample": True, "top_k": 3},
    {"do_sample": True, "top_p": 0.5},
    {"do_sample": True, "top_k": 3, "consistent": True},
    {"do_sample": True, "top_p": 0.5, "consistent": True},
    {"do_sample": True, "top_k": 5, "temperature": 0.7},
]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("kind", ["st", "nmst"])
def test_beam_search_and_samplers_terminate(family, kind):
    epsilon = 0.1
    bound = termination_bound(epsilon)
    ids, mask = prompts()
    slow = 30.0 if kind == "st" else -30.0
    for peak in (False, True):
        model = self_terminating(family, 5, kind=kind, epsilon=epsilon, eos_bias=slow, peak=peak)
        beam = generate(model, ids, mask, num_beams=3, num_return_sequences=2, max_new_tokens=4 * bound,
                        return_dict_in_generate=True)  # fmt: skip
        assert beam.terminated.all()
        for options in SAMPLERS:
            out = generate(model, ids, mask, max_new_tokens=bound + 60, return_dict_in_generate=True,
                           generator=torch.Generator().manual_seed(0), **options)  # fmt: skip
            assert out.terminated.all(), options


@pytest.mark.parametrize("family", ["gpt2", "lstm"])
def test_beam_scores_are_the_forward_log_probs_of_the_hypotheses(family):
    """With length_penalty=0 a beam's score is the sum of its tokens' log-probabilities: recomputing them
    with the full forward checks the head state followed its beam through every reorder."""
    model = self_terminating(family, 6, kind="st", epsilon=0.1, eos_bias=30.0)
    ids, mask = prompts(3)
    out = generate(model, ids, mask, num_beams=4, num_return_sequences=4, length_penalty=0.0,
                   max_new_tokens=30, return_dict_in_generate=True)  # fmt: skip
    rows = ids.repeat_interleave(4, 0)
    row_mask = mask.repeat_interleave(4, 0)
    generated = out.sequences[:, ids.shape[1] :]
    positions = torch.arange(generated.shape[1])
    real = positions[None] < out.lengths[:, None]
    labels = torch.cat([torch.full_like(rows, -100), generated.masked_fill(~real, -100)], 1)
    sequence = torch.cat([rows, generated], 1)
    full_mask = torch.cat([row_mask, torch.ones_like(generated)], 1)
    log_probs = model(sequence, full_mask, labels=labels).logits[:, ids.shape[1] - 1 : -1]
    token_log_probs = log_probs.gather(-1, generated.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(out.sequences_scores, token_log_probs.where(real, 0.0).sum(-1), atol=1e-4, rtol=1e-5)


def test_uncached_decoding_gives_the_same_tokens():
    model = self_terminating("gpt2", 7, kind="nmst", epsilon=0.01, eos_bias=-30.0, peak=False)
    ids, mask = prompts()
    cached = generate(model, ids, mask, max_new_tokens=40)
    uncached = generate(model, ids, mask, max_new_tokens=40, use_cache=False)
    assert torch.equal(cached, uncached)


# ------------------------------------------------------------------------------------ HF Trainer
def test_transformers_trainer_trains_the_wrapper_unchanged(tmp_path):
    pytest.importorskip("accelerate", reason="transformers.Trainer needs accelerate")
    from transformers import Trainer, TrainingArguments

    model = make_self_terminating(tiny_gpt2(8), kind="nmst", epsilon=0.05).train()
    sequences = torch.randint(3, 10, (16, 12), generator=torch.Generator().manual_seed(0))
    sequences[:, -1] = 0  # each sequence ends in eos
    labels = sequences.clone()
    labels[:, :4] = -100  # a context of 4 tokens
    dataset = [{"input_ids": s, "attention_mask": torch.ones_like(s), "labels": l} for s, l in zip(sequences, labels)]
    before = {name: value.clone() for name, value in model.state_dict().items()}
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        start = float(model(sequences, labels=labels).loss)
    arguments = TrainingArguments(
        output_dir=str(tmp_path), max_steps=30, per_device_train_batch_size=8, learning_rate=1e-2,
        report_to=[], save_strategy="no", logging_steps=10, use_cpu=True, seed=0, disable_tqdm=True,
    )  # fmt: skip
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        Trainer(model=model, args=arguments, train_dataset=dataset).train()
        model.eval()
        with torch.no_grad():
            end = float(model(sequences, labels=labels).loss)
    assert any(not torch.equal(before[name], value) for name, value in model.state_dict().items())
    assert math.isfinite(end) and end < start - 0.5
