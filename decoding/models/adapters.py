"""Step models for transformers models: causal LMs and encoder-decoders, with their KV cache.

Each adapter feeds the model exactly what transformers' own ``generate`` feeds it (position ids from the
attention mask, the mask dropped when a batch has no padding, the encoder run once per prompt), so greedy
and beam search reproduce ``model.generate`` token for token.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, replace
from typing import Any

import torch
from transformers.modeling_outputs import BaseModelOutput

from ..protocol import ModelInputs, StepModelBase
from .kv_cache import merge_caches, mergeable, reserve_cache

__all__ = ["CausalLMStepModel", "ModelInputs", "Seq2SeqStepModel", "hf_step_model"]


def _cache_argument(model: torch.nn.Module) -> str:
    """The keyword the model's forward takes its KV cache by: ``cache`` (transformers >= 5.2x) or
    ``past_key_values`` (older releases)."""
    parameters = inspect.signature(model.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def _field(outputs: Any, name: str) -> Any:
    return outputs.get(name) if hasattr(outputs, "get") else getattr(outputs, name, None)


def _output_cache(outputs: Any) -> Any:
    cache = _field(outputs, "cache")
    return cache if cache is not None else _field(outputs, "past_key_values")


def _last_logits(outputs: Any) -> torch.Tensor:
    return _field(outputs, "logits")[:, -1, :].float()


def _reorder(cache: Any, index: torch.LongTensor) -> Any:
    if cache is None:
        return None
    if hasattr(cache, "reorder_cache"):
        cache.reorder_cache(index)
        return cache
    # Legacy tuple-of-tuples caches: [layers][k, v, ...] each [B, ...].
    return tuple(tuple(t.index_select(0, index) for t in layer) for layer in cache)


def positions_from_mask(attention_mask: torch.Tensor) -> torch.LongTensor:
    """``[B, T]`` transformers' position ids: real tokens counted from 0, 0 on every masked column (left
    padding and holes alike)."""
    mask = attention_mask.long()
    return (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)


@dataclass(frozen=True)
class _CausalState:
    cache: Any                                # the model's KV cache, B rows (None when uncached)
    attention_mask: torch.LongTensor | None   # [B, T] or None when no row has padding
    next_position: torch.LongTensor           # [B] position id of the next token
    tokens: torch.LongTensor | None = None    # [B, T] the whole sequence, kept only when uncached
    positions: torch.LongTensor | None = None  # [B, T] its position ids, kept only when uncached
    token_type: torch.LongTensor | None = None  # [B] the token type id of generated tokens (token_type_ids)


class CausalLMStepModel(StepModelBase):
    """A decoder-only transformers model (GPT-2, Llama, ...) as a :class:`~decoding.protocol.StepModel`."""

    fresh_logits = True        # each forward's logits are a new tensor
    can_merge = True           # see mergeable: plain dynamic KV caches only
    takes_model_inputs = True  # prefill(..., inputs=ModelInputs)

    def __init__(self, model: torch.nn.Module, *, use_cache: bool = True, reserve: int = 0) -> None:
        self.model = model
        self.use_cache = use_cache
        self.reserve = reserve
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._cache_kw = _cache_argument(model)
        parameters = inspect.signature(model.forward).parameters
        self._takes_positions = "position_ids" in parameters
        self._takes_logits_to_keep = "logits_to_keep" in parameters

    def uncached(self) -> "CausalLMStepModel":
        """The same model recomputing the whole sequence at every step (to check caches against)."""
        return CausalLMStepModel(self.model, use_cache=False)

    def reserving(self, new_tokens: int) -> "CausalLMStepModel":
        """The same model with KV-cache room reserved for ``new_tokens`` decoded tokens (see
        :mod:`decoding.kv_cache`; a longer decode still works, growing the cache)."""
        return CausalLMStepModel(self.model, use_cache=self.use_cache, reserve=new_tokens)

    def _forward(self, input_ids, attention_mask, position_ids, cache, *, token_type_ids=None, inputs_embeds=None):
        kwargs: dict[str, Any] = {"attention_mask": attention_mask, "use_cache": self.use_cache}
        if inputs_embeds is not None:
            kwargs["inputs_embeds"] = inputs_embeds
        else:
            kwargs["input_ids"] = input_ids
        if token_type_ids is not None:
            kwargs["token_type_ids"] = token_type_ids
        if self._takes_positions:
            kwargs["position_ids"] = position_ids
        if self._takes_logits_to_keep:
            kwargs["logits_to_keep"] = 1
        if cache is not None:
            kwargs[self._cache_kw] = cache
        outputs = self.model(**kwargs, return_dict=True)
        return _last_logits(outputs), _output_cache(outputs)

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask, *, inputs: ModelInputs | None = None):
        """Feed the prompts (``inputs``: :class:`ModelInputs`, ``input_ids`` may then be ``[B, 0]`` next to
        ``inputs_embeds``); returns ``(logits [B, V], state, input_ids)``."""
        inputs = inputs or ModelInputs()
        if not self.use_cache and (inputs.token_type_ids is not None or inputs.inputs_embeds is not None
                                   or inputs.cache is not None):
            raise NotImplementedError("use_cache=False takes no token_type_ids, inputs_embeds or cache")
        position_ids = positions_from_mask(attention_mask) if inputs.position_ids is None else inputs.position_ids
        mask = None if bool((attention_mask == 1).all()) else attention_mask
        fed = 0 if inputs.cache is None else inputs.cache.get_seq_length()  # columns the cache holds already
        if not 0 <= fed < attention_mask.shape[1]:
            raise ValueError(f"cache: it holds {fed} columns but the attention mask has {attention_mask.shape[1]}; "
                             "pass the whole conversation (the cached columns and at least one new one)")
        token_types = inputs.token_type_ids

        def new(tensor):
            return None if tensor is None else tensor[:, fed:]

        logits, cache = self._forward(new(input_ids) if input_ids.shape[1] else None, mask, new(position_ids),
                                      inputs.cache, token_type_ids=new(token_types),
                                      inputs_embeds=new(inputs.inputs_embeds))
        if self.use_cache:
            cache = reserve_cache(cache, self.reserve)
        state = _CausalState(cache=cache, attention_mask=mask, next_position=position_ids[:, -1] + 1,
                             token_type=None if token_types is None else token_types[:, -1])
        if not self.use_cache:
            state = replace(state, cache=None, tokens=input_ids, positions=position_ids)
        return logits, state, input_ids

    def model_cache(self, state: _CausalState) -> Any:
        """The transformers cache of ``state`` (what ``model.generate`` returns as ``cache``)."""
        return state.cache

    @torch.no_grad()
    def step(self, tokens, state: _CausalState):
        mask = state.attention_mask
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
        if not self.use_cache:
            ids = torch.cat([state.tokens, tokens[:, None]], dim=1)
            positions = torch.cat([state.positions, state.next_position[:, None]], dim=1)
            logits, _ = self._forward(ids, mask, positions, None)
            return logits, replace(state, attention_mask=mask, next_position=state.next_position + 1,
                                   tokens=ids, positions=positions)
        token_type = None if state.token_type is None else state.token_type[:, None]
        logits, cache = self._forward(tokens[:, None], mask, state.next_position[:, None], state.cache,
                                      token_type_ids=token_type)
        return logits, replace(state, cache=cache, attention_mask=mask, next_position=state.next_position + 1)

    def select(self, state: _CausalState, index):
        def rows(tensor):
            return None if tensor is None else tensor.index_select(0, index)

        return _CausalState(cache=_reorder(state.cache, index), attention_mask=rows(state.attention_mask),
                            next_position=rows(state.next_position), tokens=rows(state.tokens),
                            positions=rows(state.positions), token_type=rows(state.token_type))

    def mergeable(self, state: _CausalState) -> bool:
        """Whether :meth:`merge` can take ``state``: no cache, or a plain dynamic KV cache (not sliding-window
        or other layer kinds, which cannot be realigned)."""
        return state.cache is None or mergeable(state.cache)

    def merge(self, state: _CausalState, other: _CausalState) -> _CausalState:
        """The rows of ``state`` followed by those of ``other`` (a later prefill), for continuous batching.

        Rows are right-aligned to the longer of the two; the attention mask hides the columns a row did not
        fill, and each row keeps its own position ids, so every row computes what it computes alone.
        Columns hidden from every row are forgotten once they are a quarter of the cache.
        """
        def length(s: _CausalState) -> int:
            return s.tokens.shape[1] if s.cache is None else s.cache.get_seq_length()

        mine, theirs = length(state), length(other)
        width = max(mine, theirs)
        masks = [s.attention_mask if s.attention_mask is not None else s.next_position.new_ones(len(s.next_position), n)
                 for s, n in ((state, mine), (other, theirs))]
        mask = torch.cat([_pad_left(m, width, 0) for m in masks])            # [B + B', width]
        hidden = int((mask.cumsum(dim=1) == 0).sum(dim=1).min())             # leading columns no row attends
        drop = hidden if 4 * hidden >= width else 0
        mask = mask[:, drop:]
        mask = None if bool(mask.all()) else mask
        next_position = torch.cat([state.next_position, other.next_position])
        token_type = None if state.token_type is None else torch.cat([state.token_type, other.token_type])
        if state.cache is None:
            tokens = torch.cat([_pad_left(s.tokens, width, 0) for s in (state, other)])[:, drop:]
            positions = torch.cat([_pad_left(s.positions, width, 0) for s in (state, other)])[:, drop:]
            return _CausalState(cache=None, attention_mask=mask, next_position=next_position, tokens=tokens,
                                positions=positions)
        cache = merge_caches(state.cache, other.cache, width=width, drop=drop)
        return _CausalState(cache=cache, attention_mask=mask, next_position=next_position, token_type=token_type)


def _pad_left(tensor: torch.Tensor | None, width: int, value: int) -> torch.Tensor | None:
    """``[B, n]`` -> ``[B, width]``, ``value`` in the new columns on the left."""
    if tensor is None:
        return None
    return torch.nn.functional.pad(tensor, (width - tensor.shape[1], 0), value=value)


@dataclass(frozen=True)
class _Seq2SeqState:
    cache: Any                            # decoder self- and cross-attention cache, B rows
    encoder_hidden: torch.Tensor          # [B, S, H]
    encoder_mask: torch.LongTensor        # [B, S]


class Seq2SeqStepModel(StepModelBase):
    """A transformers encoder-decoder (BART, T5, Marian, ...) as a :class:`~decoding.protocol.StepModel`.

    ``prefill`` runs the encoder once and the decoder on its start token; the output rows start with
    ``decoder_start_token_id``, as in ``model.generate``.
    """

    is_encoder_decoder = True
    fresh_logits = True  # each forward's logits are a new tensor

    def __init__(self, model: torch.nn.Module, *, decoder_start_token_id: int | None = None,
                 reserve: int = 0) -> None:
        self.model = model
        self.reserve = reserve
        self.vocab_size = int(model.get_output_embeddings().weight.shape[0])
        self._cache_kw = _cache_argument(model)
        if decoder_start_token_id is None:
            decoder_start_token_id = _decoder_start_token_id(model)
        self.decoder_start_token_id = decoder_start_token_id

    def reserving(self, new_tokens: int) -> "Seq2SeqStepModel":
        """The same model with decoder KV-cache room reserved for ``new_tokens`` decoded tokens."""
        return Seq2SeqStepModel(self.model, decoder_start_token_id=self.decoder_start_token_id,
                                reserve=new_tokens)

    def starting_with(self, decoder_start_token_id: int) -> "Seq2SeqStepModel":
        """The same model with output rows starting with ``decoder_start_token_id``."""
        return Seq2SeqStepModel(self.model, decoder_start_token_id=decoder_start_token_id, reserve=self.reserve)

    def model_cache(self, state: _Seq2SeqState) -> Any:
        """The transformers cache of ``state`` (what ``model.generate`` returns as ``cache``)."""
        return state.cache

    def _decode(self, decoder_input_ids, state: _Seq2SeqState):
        kwargs: dict[str, Any] = {
            "encoder_outputs": BaseModelOutput(last_hidden_state=state.encoder_hidden),
            "attention_mask": state.encoder_mask,
            "decoder_input_ids": decoder_input_ids,
            "use_cache": True,
        }
        if state.cache is not None:
            kwargs[self._cache_kw] = state.cache
        outputs = self.model(**kwargs, return_dict=True)
        return _last_logits(outputs), replace(state, cache=_output_cache(outputs))

    @torch.no_grad()
    def prefill(self, input_ids, attention_mask):
        encoder = self.model.get_encoder()
        hidden = encoder(input_ids=input_ids, attention_mask=attention_mask, return_dict=True).last_hidden_state
        start = torch.full((input_ids.shape[0], 1), self.decoder_start_token_id, dtype=torch.long,
                           device=input_ids.device)
        return self.prefill_encoded(hidden, attention_mask, start)

    @torch.no_grad()
    def prefill_encoded(self, encoder_hidden, encoder_mask, decoder_input_ids):
        """``prefill`` from encoder states computed elsewhere: ``encoder_hidden [B, S, H]``,
        ``encoder_mask [B, S]``, ``decoder_input_ids [B, P]``."""
        logits, state = self._decode(decoder_input_ids, _Seq2SeqState(cache=None, encoder_hidden=encoder_hidden,
                                                                      encoder_mask=encoder_mask))
        state = replace(state, cache=reserve_cache(state.cache, self.reserve))
        return logits, state, decoder_input_ids

    @torch.no_grad()
    def step(self, tokens, state: _Seq2SeqState):
        return self._decode(tokens[:, None], state)

    def select(self, state: _Seq2SeqState, index):
        return _Seq2SeqState(
            cache=_reorder(state.cache, index),
            encoder_hidden=state.encoder_hidden.index_select(0, index),
            encoder_mask=state.encoder_mask.index_select(0, index),
        )


def _decoder_start_token_id(model: torch.nn.Module) -> int:
    for source in (getattr(model, "generation_config", None), model.config):
        value = getattr(source, "decoder_start_token_id", None)
        if value is not None:
            return int(value[0] if isinstance(value, (list, tuple)) else value)
    bos = getattr(model.config, "bos_token_id", None)
    if bos is not None:
        return int(bos)
    raise ValueError(
        "decoder_start_token_id: the encoder-decoder model defines neither decoder_start_token_id nor "
        "bos_token_id; pass decoder_start_token_id to generate"
    )


def hf_step_model(model: torch.nn.Module, *, decoder_start_token_id: int | None = None):
    """Wrap a transformers ``PreTrainedModel`` with a language-modelling head into a step model."""
    config = getattr(model, "config", None)
    if config is None or not callable(getattr(model, "get_output_embeddings", None)):
        raise TypeError(
            f"model: expected a transformers PreTrainedModel with an LM head or an object implementing "
            f"decoding.StepModel (prefill/step/select), got {type(model).__name__}"
        )
    if model.get_output_embeddings() is None:
        raise TypeError(f"model: {type(model).__name__} has no language-modelling head to decode from")
    if getattr(config, "is_encoder_decoder", False):
        return Seq2SeqStepModel(model, decoder_start_token_id=decoder_start_token_id)
    return CausalLMStepModel(model)
