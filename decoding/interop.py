"""Run this library's decode loop from inside ``model.generate`` (transformers >= 4.56).

    from decoding import custom_generate
    out = model.generate(input_ids, attention_mask=mask, max_new_tokens=200, do_sample=True, top_p=0.4,
                         custom_generate=custom_generate, consistent=True)

transformers prepares everything as usual (merged generation config, expanded inputs, the encoder run for
encoder-decoders, its logits processors) and hands over to :func:`custom_generate`, which decodes with the
library's loop: finished rows stop costing compute, and ``consistent=True`` keeps eos in every truncation
sampler's candidate set. transformers' own temperature/truncation warpers are replaced by the library's
equivalents (built from the same generation config); every other processor in its list runs unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import GenerationConfig
from transformers.generation import logits_process as lp
from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

from .adapters import ModelInputs, Seq2SeqStepModel, hf_step_model
from .generate import _for_decoding, _user_processor, decode_prefilled
from .options import resolve_options
from .outputs import GenerateOutput

__all__ = ["custom_generate"]

# What transformers hands over in model_kwargs that the loop takes (any other input is refused by name).
_DECODER_ONLY_INPUTS = frozenset({"attention_mask", "position_ids", "token_type_ids", "inputs_embeds", "cache",
                                  "past_key_values", "use_cache", "logits_to_keep"})
_ENCODER_DECODER_INPUTS = frozenset({"attention_mask", "encoder_outputs", "cache", "past_key_values", "use_cache"})
_WARPERS = (lp.TemperatureLogitsWarper, lp.TopKLogitsWarper, lp.TopPLogitsWarper, lp.MinPLogitsWarper,
            lp.TypicalLogitsWarper, lp.EpsilonLogitsWarper, lp.EtaLogitsWarper)


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
    **model_kwargs: Any,
) -> torch.LongTensor | GenerateOutput:
    """The decoding method transformers calls with ``custom_generate=custom_generate``.

    Args:
        input_ids: ``[B x expand, P]`` transformers' expanded prompts (decoder start tokens for an
            encoder-decoder), ``expand = max(num_beams, num_return_sequences)``.
        consistent, generator: this library's options, passed to ``model.generate`` as keywords.
    """
    if synced_gpus or streamer is not None:
        raise NotImplementedError("custom_generate supports neither synced_gpus nor streamer")
    for criterion in stopping_criteria or []:
        if not isinstance(criterion, (MaxLengthCriteria, EosTokenCriteria)):
            raise NotImplementedError(f"stopping criterion {type(criterion).__name__} is not supported")
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
    processors = [_user_processor(p) for p in kept]
    # transformers' repetition penalty holds one row per expanded input (its prompt padding): the batch
    # must keep its rows, so finished rows stay in it here, fed with pad, as in transformers' own loop.
    per_row = any(isinstance(getattr(p, "prompt_ignore_length", None), torch.Tensor) for p in kept)
    options = resolve_options(
        model, prefix_length=prompts.shape[1], vocab_size=step_model.vocab_size,
        is_encoder_decoder=is_encoder_decoder, kwargs={}, generation_config=generation_config,
        consistent=consistent, generator=generator, drop_finished=not per_row,
    )
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
    return decode_prefilled(step_model, logits, state, prefix, options=options, processors=processors)


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
