"""The one interface between a model and the decode loop.

The loop in :mod:`decoding.search` never calls a model directly. It talks to a *step model*: an object
with three methods, ``prefill``, ``step`` and ``select``. Everything that turns a model into a step model lives in
:mod:`decoding.models` (transformers adapters, the RNN/LSTM LMs, the self-terminating wrappers); this
module, like the loops, imports none of it.

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

What a step model can do beyond the three methods (merge states for continuous batching, recompute
without a cache, hand out logits the loop may overwrite, ...) is declared by the attributes and methods of
:class:`StepModelBase`, with the defaults a step model gets when it declares nothing. The library's step
models subclass it; a step model written from scratch, like the bigram above, need not:
:func:`as_step_model` wraps it in a :class:`PlainStepModel` that declares what it defines.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import torch

__all__ = ["ModelInputs", "PlainStepModel", "StepModel", "StepModelBase", "as_step_model", "declared",
           "is_step_model"]


@runtime_checkable
class StepModel(Protocol):
    """A model the decode loop can drive one token at a time.

    Attributes:
        vocab_size: size of the last dimension of the logits it returns.

    The optional capabilities beyond these three methods are declared by :class:`StepModelBase`.
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


@dataclass(frozen=True)
class ModelInputs:
    """Forward inputs of a decoder-only batch besides ``input_ids`` and ``attention_mask``, as
    ``model.generate`` takes them, for step models that declare ``takes_model_inputs``; every tensor has one
    row per prompt and the mask's ``T`` columns.

    ``cache`` holds the first columns of every row already (a conversation continued from an earlier
    output's ``cache``): only the columns after them are fed, with the whole mask.
    """

    token_type_ids: torch.LongTensor | None = None   # [B, T]; generated tokens repeat the last column's
    position_ids: torch.LongTensor | None = None     # [B, T]; generated tokens count on from the last
    inputs_embeds: torch.Tensor | None = None        # [B, T, H], fed instead of input_ids
    cache: Any = None                                # a transformers Cache of B rows

    def rows(self, index: slice) -> "ModelInputs":
        """The inputs of prompts ``index`` (a batch decoded in chunks or refilled)."""
        if self.cache is not None:
            raise NotImplementedError("cache (past_key_values): continuing from a cache cannot be combined with "
                                      "max_batch_size (the cache's rows cannot be split)")
        def take(tensor):
            return None if tensor is None else tensor[index]

        return ModelInputs(take(self.token_type_ids), take(self.position_ids), take(self.inputs_embeds))


class StepModelBase:
    """The optional capabilities of a :class:`StepModel`, declared with the defaults the loop assumes for a
    step model that declares nothing. A subclass implements ``vocab_size``, ``prefill``, ``step`` and
    ``select`` and overrides what it supports; the loop reads these attributes and calls these methods
    without probing.

    Attributes:
        is_encoder_decoder: output rows start with a decoder start token, so length options count from 1
            instead of the prompt length.
        fresh_logits: every call returns logits in a new tensor nobody else holds, so the loop may modify
            them in place instead of copying (leave False when logits can alias the model's own data).
        can_merge: :meth:`merge` works, so ``generate(max_batch_size=...)`` may admit new prompts into rows
            that finished (continuous batching); :meth:`mergeable` can still refuse a given state.
        takes_model_inputs: ``prefill(input_ids, attention_mask, *, inputs=ModelInputs(...))`` feeds a
            decoder-only model ``token_type_ids``, ``position_ids``, ``inputs_embeds`` or a ``cache``.
        guaranteed_eos_token_id: the eos token the model provably emits (a self-terminating head's);
            ``generate`` refuses eos settings that leave it out. None: no such guarantee.
    """

    is_encoder_decoder: bool = False
    fresh_logits: bool = False
    can_merge: bool = False
    takes_model_inputs: bool = False
    guaranteed_eos_token_id: int | None = None

    @property
    def model_name(self) -> str:
        """The model's name in error messages."""
        return type(self).__name__

    def mergeable(self, state: Any) -> bool:
        """Whether :meth:`merge` can take ``state`` (``can_merge`` unless some states cannot be merged;
        ``generate`` then decodes in chunks)."""
        return self.can_merge

    def merge(self, state: Any, other: Any) -> Any:
        """The rows of ``state`` followed by the rows of ``other``, a state from a later ``prefill``."""
        raise NotImplementedError(f"{self.model_name} cannot merge states (can_merge is False)")

    def uncached(self) -> StepModelBase:
        """The same model recomputing from the whole sequence at every step (``use_cache=False``)."""
        raise NotImplementedError(f"use_cache=False is not supported for {self.model_name}")

    def reserving(self, new_tokens: int) -> StepModelBase:
        """The same model with cache room reserved for ``new_tokens`` decoded tokens (itself when it keeps
        no cache that reserves)."""
        return self

    def starting_with(self, decoder_start_token_id: int) -> StepModelBase:
        """Encoder-decoders: the same model with output rows starting with ``decoder_start_token_id``."""
        raise NotImplementedError(f"decoder_start_token_id: {self.model_name} cannot change its decoder start "
                                  "token")

    def model_cache(self, state: Any) -> Any:
        """The transformers cache in ``state`` (what ``model.generate`` returns as ``cache``), or None."""
        return None

    def prefill_encoded(self, encoder_hidden: torch.Tensor, encoder_mask: torch.LongTensor,
                        decoder_input_ids: torch.LongTensor) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        """Encoder-decoders: ``prefill`` from encoder states ``[B, S, H]`` computed elsewhere."""
        raise NotImplementedError(f"{self.model_name} has no prefill_encoded")


def is_step_model(model: Any) -> bool:
    """Whether ``model`` has the three methods of a :class:`StepModel`."""
    return all(callable(getattr(model, name, None)) for name in ("prefill", "step", "select"))


class PlainStepModel(StepModelBase):
    """A step model that does not subclass :class:`StepModelBase` (written from scratch, as in this module's
    example), with the capabilities it defines declared once, here: the one place that looks for them."""

    def __init__(self, model: Any) -> None:
        self.model = model
        self.vocab_size = model.vocab_size
        config = getattr(model, "config", None)
        self.is_encoder_decoder = bool(getattr(model, "is_encoder_decoder", False)
                                       or getattr(config, "is_encoder_decoder", False))
        self.fresh_logits = bool(getattr(model, "fresh_logits", False))
        self.can_merge = callable(getattr(model, "merge", None))

    @property
    def model_name(self) -> str:
        return type(self.model).__name__

    def prefill(self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        return self.model.prefill(input_ids, attention_mask)

    def step(self, tokens: torch.LongTensor, state: Any) -> tuple[torch.Tensor, Any]:
        return self.model.step(tokens, state)

    def select(self, state: Any, index: torch.LongTensor) -> Any:
        return self.model.select(state, index)

    def _defined(self, name: str) -> Any:
        """The model's own method ``name``, or None."""
        method = getattr(self.model, name, None)
        return method if callable(method) else None

    def mergeable(self, state: Any) -> bool:
        own = self._defined("mergeable")
        return self.can_merge and (own is None or bool(own(state)))

    def merge(self, state: Any, other: Any) -> Any:
        own = self._defined("merge")
        return super().merge(state, other) if own is None else own(state, other)

    def uncached(self) -> StepModelBase:
        own = self._defined("uncached")
        return super().uncached() if own is None else declared(own())

    def reserving(self, new_tokens: int) -> StepModelBase:
        own = self._defined("reserving")
        return self if own is None else declared(own(new_tokens))

    def starting_with(self, decoder_start_token_id: int) -> StepModelBase:
        own = self._defined("starting_with")
        return super().starting_with(decoder_start_token_id) if own is None else declared(own(decoder_start_token_id))

    def model_cache(self, state: Any) -> Any:
        own = self._defined("model_cache")
        return None if own is None else own(state)

    def prefill_encoded(self, encoder_hidden: torch.Tensor, encoder_mask: torch.LongTensor,
                        decoder_input_ids: torch.LongTensor) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        own = self._defined("prefill_encoded")
        if own is None:
            return super().prefill_encoded(encoder_hidden, encoder_mask, decoder_input_ids)
        return own(encoder_hidden, encoder_mask, decoder_input_ids)


def declared(model: Any, *, name: str = "model") -> StepModelBase:
    """``model`` as a :class:`StepModelBase`: itself when it subclasses it, else a :class:`PlainStepModel`
    over it; a TypeError naming ``name`` when it is no step model at all."""
    if isinstance(model, StepModelBase):
        return model
    if not is_step_model(model):
        raise TypeError(f"{name} must be a StepModel (prefill/step/select), got {type(model).__name__}")
    return PlainStepModel(model)


def as_step_model(model: Any) -> StepModelBase:
    """Return a step model for ``model``, with its capabilities declared.

    Accepts a step model (see :func:`declared`), an object with an ``as_step_model()`` method (the library's
    self-terminating and RNN/LSTM models), or a transformers ``PreTrainedModel`` (causal LM or
    encoder-decoder). The last is the one place the pure modules reach an adapter: imported here, at call
    time, so that importing the protocol (or the loops) imports no model code.
    """
    if is_step_model(model):
        return declared(model)
    if callable(getattr(model, "as_step_model", None)):
        return declared(model.as_step_model())
    from .models.adapters import hf_step_model  # the dispatch point for raw transformers models

    return hf_step_model(model)
