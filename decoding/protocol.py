"""The one interface between a model and the decode loop.

The loop in :mod:`decoding.search` never calls a model directly. It talks to a *step model*: an object
with three methods, ``prefill``, ``step`` and ``select``. transformers models are wrapped into step models
by :mod:`decoding.adapters`; the library's own RNN/LSTM language models implement the protocol
themselves; a self-terminating head wraps any step model into another one.

State is opaque to the loop. Whatever a step model keeps per row (a KV cache, RNN hidden states, the
running ``log(1 - p_eos)`` of a self-terminating head, an attention mask) lives in the state object it
returns, and ``select`` is the only way rows are reordered, duplicated (beam expansion) or dropped
(finished rows): one call keeps every piece of per-row state consistent.

Example, a bigram table as a step model::

    class Bigram:
        def __init__(self, table):            # table: [V, V] next-token logits
            self.table = table
            self.vocab_size = table.shape[0]

        def prefill(self, input_ids, attention_mask):
            last = input_ids[:, -1]            # left padding: the last column is always real
            return self.table[last], last, input_ids

        def step(self, tokens, state):
            return self.table[tokens], tokens

        def select(self, state, index):
            return state[index]
"""

from __future__ import annotations

from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["StepModel", "as_step_model"]


@runtime_checkable
class StepModel(Protocol):
    """A model the decode loop can drive one token at a time.

    Attributes:
        vocab_size: size of the last dimension of the logits it returns.

    Optional extras the library uses when present: ``is_encoder_decoder`` (True: output rows start with
    a decoder start token, so length options count from 1 instead of the prompt length),
    ``uncached()`` (a step model that recomputes from the whole sequence, for ``use_cache=False``) and
    ``fresh_logits`` (True: every call returns logits in a new tensor nobody else holds, so the loop may
    modify them in place instead of copying; leave it unset when logits can alias the model's own data)
    and ``merge(state, other)`` (the rows of ``state`` followed by the rows of ``other``, a state from a
    later ``prefill``: lets ``generate(max_batch_size=...)`` admit new prompts into rows that finished),
    with ``mergeable(state)`` when only some states can be merged (``generate`` then decodes in chunks).
    """

    vocab_size: int

    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        """Consume the prompts and return the logits for the first generated token.

        Args:
            input_ids: ``[B, T]`` prompt tokens, left-padded.
            attention_mask: ``[B, T]``, 1 on real tokens and 0 on padding.

        Returns:
            ``(logits, state, prefix)``: ``logits [B, V]`` (float, unnormalised or log-probabilities) for
            the next token; the model's opaque per-row ``state``; ``prefix [B, P]``, the tokens each output
            row starts with (the prompt itself for a decoder-only model, the decoder start token for an
            encoder-decoder model). Logits processors see ``prefix`` followed by the generated tokens.
        """
        ...

    def step(self, tokens: torch.LongTensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed one token per row and return the logits for the next one.

        Args:
            tokens: ``[B]`` the tokens just chosen, one per row of ``state``.
            state: the state returned by ``prefill``, ``step`` or ``select``.

        Returns:
            ``(logits [B, V], new_state)``.
        """
        ...

    def select(self, state: Any, index: torch.LongTensor) -> Any:
        """Rows ``index`` of ``state``, in that order.

        Args:
            state: a state of ``B`` rows.
            index: ``[B']`` row indices into ``state``; may repeat rows (beam expansion, reordering) and
                may be shorter than ``B`` (dropping finished rows).

        Returns:
            A state of ``B'`` rows. The input state may be reused or invalidated.
        """
        ...


def as_step_model(model: Any) -> StepModel:
    """Return a :class:`StepModel` for ``model``.

    Accepts a step model as is, an object with an ``as_step_model()`` method (the library's
    self-terminating wrappers), or a transformers ``PreTrainedModel`` (causal LM or encoder-decoder).
    """
    if all(callable(getattr(model, name, None)) for name in ("prefill", "step", "select")):
        return model
    if callable(getattr(model, "as_step_model", None)):
        return model.as_step_model()
    from .adapters import hf_step_model  # local import: adapters pulls in transformers

    return hf_step_model(model)
