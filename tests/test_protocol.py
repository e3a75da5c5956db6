"""The step-model protocol: declared capabilities and their defaults, step models written from scratch
(:class:`PlainStepModel`), the dispatch of :func:`as_step_model`, and the layout's promises (the pure
modules load no model code; the old import paths reach the moved modules)."""

from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch

import decoding
from decoding.generate import generate
from decoding.models.adapters import CausalLMStepModel, Seq2SeqStepModel
from decoding.models.recurrent import RecurrentStepModel, lstm_lm
from decoding.models.self_terminating import SelfTerminatingStepModel
from decoding.protocol import PlainStepModel, StepModelBase, as_step_model, declared
from tests.tiny_models import EOS, PAD, left_padded_prompts, tiny_model

VOCAB = 6


class Bigram:
    """The protocol's own example: next-token logits from a table, state = the last token."""

    def __init__(self, seed: int = 0) -> None:
        self.table = torch.randn(VOCAB, VOCAB, generator=torch.Generator().manual_seed(seed)) * 2
        self.vocab_size = VOCAB

    def prefill(self, input_ids, attention_mask):
        last = input_ids[:, -1]
        return self.table[last], last, input_ids

    def step(self, tokens, state):
        return self.table[tokens], tokens

    def select(self, state, index):
        return state[index]


class MergingBigram(Bigram):
    """The bigram with the optional ``merge`` (and a count of its calls)."""

    fresh_logits = False

    def __init__(self, seed: int = 0) -> None:
        super().__init__(seed)
        self.merges = 0

    def merge(self, state, other):
        self.merges += 1
        return torch.cat([state, other])


class Declaring(StepModelBase):
    """A subclass that declares nothing: every capability at its default."""

    vocab_size = VOCAB

    def prefill(self, input_ids, attention_mask):
        raise AssertionError("not called")

    step = select = prefill


def test_defaults_of_a_step_model_that_declares_nothing():
    model = Declaring()
    assert (model.is_encoder_decoder, model.fresh_logits, model.can_merge, model.takes_model_inputs) == (
        False, False, False, False)
    assert model.guaranteed_eos_token_id is None and not model.mergeable(object())
    assert model.reserving(100) is model and model.model_cache(object()) is None
    with pytest.raises(NotImplementedError, match="Declaring cannot merge"):
        model.merge(None, None)
    with pytest.raises(NotImplementedError, match="use_cache=False is not supported for Declaring"):
        model.uncached()
    with pytest.raises(NotImplementedError, match="decoder_start_token_id: Declaring"):
        model.starting_with(0)
    with pytest.raises(NotImplementedError, match="Declaring has no prefill_encoded"):
        model.prefill_encoded(None, None, None)


def test_a_step_model_written_from_scratch_declares_what_it_defines():
    plain = declared(Bigram())
    assert isinstance(plain, PlainStepModel) and not plain.can_merge and not plain.fresh_logits
    merging = declared(MergingBigram())
    assert merging.can_merge and merging.mergeable(torch.zeros(2))
    assert merging.merge(torch.tensor([1]), torch.tensor([2])).tolist() == [1, 2]
    with pytest.raises(NotImplementedError, match="use_cache=False is not supported for Bigram"):
        plain.uncached()
    encoder_decoder = Bigram()
    encoder_decoder.config = SimpleNamespace(is_encoder_decoder=True)
    assert declared(encoder_decoder).is_encoder_decoder
    with pytest.raises(TypeError, match="inner must be a StepModel"):
        declared(torch.nn.Linear(2, 2), name="inner")


def test_as_step_model_dispatches_on_what_it_is_given():
    gpt2, bart = tiny_model("gpt2"), tiny_model("bart")
    assert isinstance(as_step_model(gpt2), CausalLMStepModel)
    assert isinstance(as_step_model(bart), Seq2SeqStepModel)
    lstm = lstm_lm(VOCAB, eos_token_id=0, hidden_size=8)
    assert isinstance(as_step_model(lstm), RecurrentStepModel)
    library_model = as_step_model(gpt2)
    assert as_step_model(library_model) is library_model
    assert isinstance(as_step_model(Bigram()), PlainStepModel)
    with pytest.raises(TypeError, match="PreTrainedModel"):
        as_step_model(torch.nn.Linear(2, 2))


def test_library_step_models_declare_their_capabilities():
    causal = as_step_model(tiny_model("gpt2"))
    assert causal.fresh_logits and causal.can_merge and causal.takes_model_inputs and not causal.is_encoder_decoder
    seq2seq = as_step_model(tiny_model("bart"))
    assert seq2seq.is_encoder_decoder and not seq2seq.can_merge and not seq2seq.takes_model_inputs
    head = SelfTerminatingStepModel(seq2seq, kind="st", epsilon=0.1, eos_token_id=EOS)
    assert head.is_encoder_decoder and not head.can_merge and head.guaranteed_eos_token_id == EOS
    over_lstm = lstm_lm(VOCAB, eos_token_id=0, hidden_size=8, head="nmst", epsilon=0.1).as_step_model()
    assert over_lstm.can_merge and over_lstm.fresh_logits and over_lstm.reserving(10).can_merge


def test_a_step_model_from_scratch_that_merges_is_refilled():
    """Declared by defining ``merge``: ``max_batch_size`` admits new prompts into finished rows, and every
    prompt gets the tokens it gets in one batch."""
    ids = torch.randint(1, VOCAB, (7, 3), generator=torch.Generator().manual_seed(0))
    options = dict(max_new_tokens=8, do_sample=True, eos_token_id=0, pad_token_id=0)
    whole = generate(MergingBigram(), ids, generator=torch.Generator().manual_seed(1), **options)
    model = MergingBigram()
    limited = generate(model, ids, generator=torch.Generator().manual_seed(1), max_batch_size=3, **options)
    assert torch.equal(whole, limited) and model.merges > 0
    chunked = generate(Bigram(), ids, generator=torch.Generator().manual_seed(1), max_batch_size=3, **options)
    assert torch.equal(whole, chunked)


def test_a_self_terminating_model_refuses_eos_settings_without_its_eos():
    ids, mask = left_padded_prompts(batch=2)
    model = decoding.make_self_terminating(tiny_model("gpt2"), kind="st", epsilon=0.1)
    with pytest.raises(ValueError, match=f"its own eos token {EOS}"):
        generate(model, ids, mask, max_new_tokens=3, eos_token_id=PAD, pad_token_id=PAD)


def _modules_after(statement: str) -> list[str]:
    code = f"{statement}; import sys; print(' '.join(sorted(sys.modules)))"
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()


def test_the_pure_modules_load_no_model_code():
    loaded = _modules_after("import decoding.protocol, decoding.heads, decoding.transforms")
    assert not [m for m in loaded if m.startswith(("decoding.models", "transformers"))]
    loops = _modules_after("import decoding.search, decoding.generate, decoding.options")
    assert not [m for m in loops if m.startswith("decoding.models")]


def test_the_old_import_paths_reach_the_moved_modules():
    import decoding.adapters
    import decoding.generate  # the submodule: the package attribute stays the function
    import decoding.heads
    import decoding.kv_cache
    import decoding.models.adapters
    import decoding.models.kv_cache
    import decoding.models.pretrained
    import decoding.models.self_terminating
    import decoding.pretrained
    import decoding.self_terminating

    assert decoding.adapters is decoding.models.adapters and decoding.kv_cache is decoding.models.kv_cache
    assert decoding.pretrained is decoding.models.pretrained
    assert decoding.self_terminating.make_self_terminating is decoding.models.self_terminating.make_self_terminating
    assert decoding.self_terminating.termination_bound is decoding.heads.termination_bound
    assert callable(decoding.generate) and decoding.generate.__module__ == "decoding.generate"
    assert all(getattr(decoding, name) is not None for name in decoding.__all__)
    from decoding.models import RecurrentLM, lstm_lm  # decoding.models, once a module, exports the RNN/LSTM LMs

    assert isinstance(lstm_lm(VOCAB, eos_token_id=0, hidden_size=8), RecurrentLM)
