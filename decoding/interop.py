"""Run this library's decode loop from inside ``model.generate`` (transformers >= 4.56).

    from decoding import custom_generate
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=200, do_sample=True, top_p=0.4,
                         custom_generate=custom_generate, consistent=True)

transformers prepares everything as usual (merged generation config, expanded inputs, the encoder run for
encoder-decoders, its logits processors) and hands over to :func:`custom_generate`, which decodes with the
library's loop: finished rows stop costing compute, and ``consistent=True`` keeps eos in every truncation
sampler's candidate set. transformers' own temperature/truncation warpers are replaced by the library's
equivalents (built from the same generation config), and so are its token-rule processors (sequence bias,
bad words, suppressed tokens, prefix constraints, invalid values, renormalisation: the library's keep the
batch's prompt ids right as rows leave it, and follow ``consistent``'s eos rules); every other processor in its
list runs unchanged. transformers' ``streamer`` gets every step and its ``end()``; ``stream=`` streams per row.

transformers does not hand a callable ``custom_generate`` its ``tokenizer``, so ``stop_strings`` fail there;
pass ``stopping_criteria=[StopStringCriteria(tokenizer, strings)]`` instead.
"""

from __future__ import annotations

import copy
import inspect
import sys
from typing import Any, Callable

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria
from transformers.generation.utils import GenerationMixin

from .generate import _for_decoding, _stream_sink, _user_processor, decode_prefilled
from .models.adapters import Seq2SeqStepModel, hf_step_model
from .options import DecodeOptions, resolve_options
from .outputs import GenerateOutput
from .protocol import ModelInputs
from .search import Processor
from .streaming import RowStreamer
from .token_rules import rule_processors

__all__ = ["custom_generate"]

# What transformers hands over in model_kwargs that the loop takes (any other input is refused by name).
_DECODER_ONLY_INPUTS = frozenset({"attention_mask", "position_ids", "token_type_ids", "inputs_embeds", "cache",
                                  "past_key_values", "use_cache", "logits_to_keep"})
_ENCODER_DECODER_INPUTS = frozenset({"attention_mask", "encoder_outputs", "cache", "past_key_values", "use_cache"})
_WARPERS = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
            lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper)
# transformers' token-rule processors -> (the config field that makes transformers build one, our stage)
_RULES = {lp.NoBadWordsLogitsProcessor: ("bad_words_ids", "ban"),
          lp.SequenceBiasLogitsProcessor: ("sequence_bias", "bias"),
          lp.SuppressTokensLogitsProcessor: ("suppress_tokens", "suppress"),
          lp.SuppressTokensAtBeginLogitsProcessor: ("begin_suppress_tokens", "begin"),
          lp.InfNanRemoveLogitsProcessor: ("remove_invalid_values", "invalid")}
_GENERATE_CODE = inspect.unwrap(GenerationMixin.generate).__code__


def custom_generate(
    model: Any,
    input_ids: torch.LongTensor,
    logits_processor: Any,
    stopping_criteria: Any,
    generation_config: GenerationConfig,
    synced_gpus: bool = False,
    streamer: Any = None,
    consistent: bool = False,
    generator: torch.Generator | None = None,
    stream: RowStreamer | Callable[[Any], Any] | None = None,
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateOutput:
    """The decoding method transformers calls with ``custom_generate=custom_generate``.

    Args:
        input_ids: ``[B x expand, P]`` transformers' expanded prompts (decoder start tokens for an
            encoder-decoder), ``expand = max(num_beams, num_return_sequences)``.
        streamer: transformers' streamer (it has been given the prompt already); found in the calling
            ``generate`` when transformers does not pass it.
        consistent, generator, stream: this library's options, passed to ``model.generate`` as keywords.
    """
    streamer = streamer if streamer is not None else _callers_streamer()
    sink = None
    try:
        if synced_gpus:
            raise NotImplementedError("custom_generate does not support synced_gpus")
        step_model, options, processors, prefill = _prepare(model, input_ids, logits_processor, stopping_criteria,
                                                            generation_config, consistent, generator, model_kwargs)
        sink = _stream_sink(streamer, stream, options, n_rows=prefill[2].shape[0] * options.num_return_sequences,
                            limited=False)
        return decode_prefilled(step_model, *prefill, options=options, processors=processors, stream=sink)
    finally:
        if sink is not None:
            sink.end()
        elif streamer is not None:  # refused or failed before decoding: a consumer must not wait forever
            streamer.end()


def _callers_streamer() -> Any:
    """The ``streamer`` of the transformers ``generate`` call this runs in (transformers 5.x puts the prompt to
    it, then calls a callable ``custom_generate`` without it)."""
    frame = sys._getframe(1)
    while frame is not None and frame.f_code is not _GENERATE_CODE:
        frame = frame.f_back
    return None if frame is None else frame.f_locals.get("streamer")


def _prepare(model: Any, input_ids: torch.LongTensor, logits_processor: Any, stopping_criteria: Any,
             generation_config: GenerationConfig, consistent: bool, generator: torch.Generator | None,
             model_kwargs: dict[str, Any]) -> tuple[Any, DecodeOptions, list[Processor], tuple]:
    """The step model, options, processors and prefill ``(logits, state, prefix)`` of one custom_generate call."""
    criteria = [c for c in stopping_criteria or [] if not isinstance(c, (MaxLengthCriteria, EosTokenCriteria))]
    is_encoder_decoder = bool(model.config.is_encoder_decoder)
    unknown = sorted(name for name, value in model_kwargs.items()
                     if value is not None and name not in (_ENCODER_DECODER_INPUTS if is_encoder_decoder
                                                           else _DECODER_ONLY_INPUTS))
    if unknown:
        raise NotImplementedError(f"model inputs {unknown} are not passed through by custom_generate (the model "
                                  "would silently run without them); use model.generate without it")

    expand = max(int(generation_config.num_beams or 1), int(generation_config.num_return_sequences or 1))
    step_model = hf_step_model(model)
    prompts = input_ids[::expand].long()  # model.generate takes int32 ids too
    kept = [p for p in logits_processor or [] if not isinstance(p, _WARPERS)]
    constraint = next((p for p in kept if isinstance(p, lp.PrefixConstrainedLogitsProcessor)), None)
    # transformers' repetition penalty holds one row per expanded input (its prompt padding): the batch
    # must keep its rows, so finished rows stay in it here, fed with pad, as in transformers' own loop.
    per_row = any(isinstance(getattr(p, "prompt_ignore_length", None), torch.Tensor) for p in kept)
    config = copy.copy(generation_config)
    config.stop_strings = None  # transformers built their criterion (it is in stopping_criteria)
    options = resolve_options(
        model, prefix_length=prompts.shape[1], vocab_size=step_model.vocab_size,
        is_encoder_decoder=is_encoder_decoder, kwargs={}, generation_config=config,
        consistent=consistent, generator=generator, drop_finished=not per_row, stopping_criteria=criteria,
        prefix_allowed_tokens_fn=None if constraint is None else constraint._prefix_allowed_tokens_fn,
    )
    processors = _processors(kept, options, generation_config, prefix_length=prompts.shape[1],
                             device=input_ids.device)
    step_model = _for_decoding(step_model, options, refilling=False)
    mask = model_kwargs.get("attention_mask")
    if is_encoder_decoder:
        assert isinstance(step_model, Seq2SeqStepModel)
        cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
        if cache is not None and cache.get_seq_length() > 0:
            raise NotImplementedError("cache: custom_generate cannot continue an encoder-decoder from a filled cache")
        hidden = model_kwargs["encoder_outputs"].last_hidden_state[::expand]
        mask = torch.ones(hidden.shape[:2], dtype=torch.long, device=hidden.device) if mask is None else mask[::expand]
        logits, state, prefix = step_model.prefill_encoded(hidden, mask, prompts)
    else:
        logits, state, prefix = _prefill_decoder_only(step_model, prompts, model_kwargs, expand=expand)
    return step_model, options, processors, (logits, state, prefix)


def _processors(kept: list, options: DecodeOptions, config: GenerationConfig, *, prefix_length: int,
                device: torch.device) -> list[Processor]:
    """transformers' processors in its order, its token rules replaced by the library's at the same place
    (``renormalize_logits``' normalisation runs after the warpers, in the loop)."""
    begin = prefix_length + int(prefix_length == 1 and options.forced_bos_token_id is not None)
    chain: list[Processor] = []
    for processor in kept:
        rule = _RULES.get(type(processor))
        if isinstance(processor, lp.PrefixConstrainedLogitsProcessor):
            rule = ("prefix", "prefix")
        elif isinstance(processor, lp.LogitNormalization) and options.token_rules.renormalize_logits:
            continue
        if rule is None or (rule[0] != "prefix" and getattr(config, rule[0], None) in (None, False)):
            chain.append(_user_processor(processor))  # not one transformers built from the config: as given
            continue
        chain.extend(rule_processors(options.token_rules, rule[1], begin_index=begin, device=device))
    return chain


def _prefill_decoder_only(step_model: Any, prompts: torch.LongTensor, model_kwargs: dict[str, Any], *,
                          expand: int) -> tuple[torch.Tensor, Any, torch.LongTensor]:
    """Prefill the prompts (one row of every ``expand``) with the model inputs transformers prepared."""
    def rows(name: str) -> torch.Tensor | None:
        value = model_kwargs.get(name)
        return None if value is None else value[::expand]

    embeds = rows("inputs_embeds")
    columns = prompts.shape[1] if embeds is None else embeds.shape[1]
    mask = rows("attention_mask")
    if mask is None:  # transformers drops an all-ones mask
        mask = torch.ones(prompts.shape[0], columns, dtype=torch.long, device=prompts.device)
    cache = model_kwargs.get("cache", model_kwargs.get("past_key_values"))
    if cache is not None and cache.get_seq_length() == 0:
        cache = None  # the empty cache transformers made for its own loop
    inputs = ModelInputs(token_type_ids=rows("token_type_ids"), position_ids=rows("position_ids"),
                         inputs_embeds=embeds, cache=cache)
    return step_model.prefill(prompts, mask, inputs=inputs)
