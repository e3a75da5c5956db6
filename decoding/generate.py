"""``decoding.generate``: a drop-in for ``model.generate`` with consistent sampling and finished-row dropping."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch
from transformers import GenerationConfig

from . import transforms as T
from .options import DecodeOptions, _as_id_tuple, merged_generation_config, resolve_options
from .outputs import GenerateOutput, output_class
from .protocol import ModelInputs, StepModelBase, as_step_model, declared
from .records import concat_steps
from .search import (Processor, PromptNoise, Refill, SearchResult, Uniforms, beam_search, refill_blocker,
                     sample_search)
from .streaming import RowStreamer, StreamSink
from .token_rules import rule_processors

# KV-cache room reserved before decoding, in tokens; beyond it the cache grows geometrically, so a generous
# max_new_tokens costs nothing until it is used.
RESERVED_UP_FRONT = 2048

__all__ = ["generate", "GenerateOutput", "build_processors", "decode_prefilled"]


class _UserProcessor:
    """A transformers-style processor ``(input_ids, scores) -> scores`` as a loop :data:`Processor`, named
    after its class in errors."""

    def __init__(self, processor: Any) -> None:
        self.processor = processor
        self.name = getattr(processor, "__name__", None) or type(processor).__name__

    def __call__(self, history: torch.LongTensor, scores: torch.Tensor, prompt_index: torch.LongTensor) -> torch.Tensor:
        return self.processor(history, scores)


def _user_processor(processor: Any) -> Processor:
    return _UserProcessor(processor)


def build_processors(options: DecodeOptions, *, prefix_length: int, padding_lengths: torch.LongTensor | None,
                     device: torch.device | str = "cpu", in_place: bool = False,
                     first_prompt: int = 0) -> list[Processor]:
    """The logits-processor chain in transformers' order, user processors last (warpers and
    ``renormalize_logits`` are applied by the search loop itself, after these).

    Args:
        prefix_length: ``P``, the length of the rows' prefix (prompt or decoder start).
        padding_lengths: ``[B]`` left-padding columns per prompt (ignored by the repetition penalty).
        device: where the scores live (token-id tensors are made there once, not at every step).
        in_place: the step model's logits are scratch (``fresh_logits``): ban eos for ``min_new_tokens``
            in place instead of copying the ``[B, V]`` scores at every step.
        first_prompt: index of the batch's first prompt in the call (``prefix_allowed_tokens_fn``'s batch id).
    """
    chain: list[Processor] = []
    eos = torch.tensor(options.eos_token_ids, device=device) if options.eos_token_ids else None
    # transformers suppresses begin_suppress_tokens one step later after a one-token prefix and a forced bos
    begin = prefix_length + int(prefix_length == 1 and options.forced_bos_token_id is not None)

    def rules(stage: str) -> list[Processor]:
        return rule_processors(options.token_rules, stage, begin_index=begin, first_prompt=first_prompt,
                               device=device)

    chain.extend(rules("bias"))
    if options.repetition_penalty != 1.0:
        penalty = options.repetition_penalty

        def repetition(history, scores, prompt_index):
            ignore = None if padding_lengths is None else padding_lengths[prompt_index]
            return T.repetition_penalty(history, scores, penalty, prompt_ignore_length=ignore)

        chain.append(repetition)
    if options.no_repeat_ngram_size > 0:
        size = options.no_repeat_ngram_size
        chain.append(lambda history, scores, _: T.no_repeat_ngram(history, scores, size))
    chain.extend(rules("ban"))
    if options.min_new_tokens > 0 and eos is not None:
        min_len = prefix_length + options.min_new_tokens
        chain.append(lambda history, scores, _: T.min_length(scores, eos, cur_len=history.shape[1],
                                                             min_length=min_len, in_place=in_place))
    chain.extend(rules("prefix"))
    if options.forced_bos_token_id is not None:
        bos = options.forced_bos_token_id
        chain.append(lambda history, scores, _: T.forced_bos(scores, bos, cur_len=history.shape[1]))
    if options.forced_eos_token_id:
        forced = torch.tensor(options.forced_eos_token_id, device=device)
        max_len = prefix_length + options.max_new_tokens
        chain.append(lambda history, scores, _: T.forced_eos(scores, forced, cur_len=history.shape[1],
                                                             max_length=max_len))
    chain.extend(rules("invalid"))
    if options.exponential_decay_length_penalty is not None and eos is not None:
        start, factor = options.exponential_decay_length_penalty
        chain.append(lambda history, scores, _: T.exponential_decay_length_penalty(
            scores, eos, cur_len=history.shape[1], input_len=prefix_length, start_index=start,
            decay_factor=factor))
    chain.extend(rules("suppress") + rules("begin"))
    chain.extend(_user_processor(p) for p in options.logits_processor)
    return chain


def _check_input_ids(input_ids: Any, *, vocab_size: int, is_encoder_decoder: bool,
                     inputs_embeds: torch.Tensor | None) -> torch.LongTensor:
    """``input_ids`` as a ``[B, T]`` int64 tensor (``model.generate`` takes int32 too); with ``inputs_embeds``
    alone, ``[B, 0]``: the output then holds the generated tokens only, as in transformers."""
    if input_ids is None and inputs_embeds is not None:
        return torch.zeros(inputs_embeds.shape[0], 0, dtype=torch.long, device=inputs_embeds.device)
    if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError("input_ids must be an integer torch.Tensor of shape [batch, length]")
    if input_ids.dim() == 1:
        input_ids = input_ids.unsqueeze(0)
    if input_ids.dim() != 2:
        raise ValueError(f"input_ids must have shape [batch, length], got {tuple(input_ids.shape)}")
    if input_ids.shape[0] == 0:
        raise ValueError("input_ids has no rows: pass at least one prompt")
    if input_ids.shape[1] == 0:
        raise ValueError("input_ids is empty: a decoder-only model needs at least one prompt token"
                         if not is_encoder_decoder else "input_ids is empty: pass at least one source token")
    if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab_size:
        raise ValueError(f"input_ids contains token ids outside the vocabulary [0, {vocab_size})")
    return input_ids.long()


def _check_mask(attention_mask: Any, input_ids: torch.LongTensor, *, columns: int, is_encoder_decoder: bool,
                pad_token_ids: tuple[int, ...], eos_token_ids: Sequence[int]) -> torch.LongTensor:
    """The ``[B, columns]`` 0/1 attention mask; inferred from pad tokens for decoder-only models only, as
    transformers does (an encoder without a mask sees every token, pad ones included)."""
    if attention_mask is None:
        pad = pad_token_ids[0] if pad_token_ids else None
        # transformers' rule: infer the mask from pad tokens, unless pad is also an eos token
        infer = (not is_encoder_decoder and pad is not None and pad not in eos_token_ids
                 and bool((input_ids == pad).any()))
        if infer:
            return (input_ids != pad).long()
        return torch.ones(input_ids.shape[0], columns, dtype=torch.long, device=input_ids.device)
    if not isinstance(attention_mask, torch.Tensor):
        raise TypeError("attention_mask must be a torch.Tensor of shape [batch, length] holding 0 and 1")
    if attention_mask.dim() == 1:
        attention_mask = attention_mask.unsqueeze(0)
    if attention_mask.shape != (input_ids.shape[0], columns):
        raise ValueError(f"attention_mask shape {tuple(attention_mask.shape)} does not match the inputs' shape "
                         f"{(input_ids.shape[0], columns)}")
    if not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError("attention_mask must hold only 0 (padding) and 1 (real tokens); it holds other values "
                         "(NaN?)")
    attention_mask = attention_mask.long()
    if not bool(attention_mask.any(dim=1).all()):
        raise ValueError("attention_mask: some rows have no real token (all zeros); every prompt needs one")
    if not is_encoder_decoder and not bool(attention_mask[:, -1].all()):
        # transformers accepts it with a warning (holes in a mask are legitimate, e.g. a continued chat)
        warnings.warn("attention_mask: right padding detected (a prompt's last column is padding); decoder-only "
                      "models continue from the last column, so batches are normally left-padded "
                      "(tokenizer.padding_side = 'left')", UserWarning, stacklevel=3)
    return attention_mask


def _model_inputs(step_model: StepModelBase, *, is_encoder_decoder: bool, columns: int, rows: int,
                  token_type_ids: Any, position_ids: Any, inputs_embeds: Any, cache: Any) -> ModelInputs | None:
    """The forward inputs passed through to the model, checked; None when there are none."""
    given = {name: value for name, value in (("token_type_ids", token_type_ids), ("position_ids", position_ids),
                                             ("inputs_embeds", inputs_embeds), ("cache", cache)) if value is not None}
    if not given:
        return None
    if is_encoder_decoder or not step_model.takes_model_inputs:
        raise NotImplementedError(f"{sorted(given)}: model inputs are passed through for decoder-only transformers "
                                  f"models only, not {step_model.model_name}")
    for name in ("token_type_ids", "position_ids"):
        value = given.get(name)
        if value is not None and (not isinstance(value, torch.Tensor) or value.is_floating_point()
                                  or tuple(value.shape) != (rows, columns)):
            raise ValueError(f"{name} must be an integer tensor of shape {(rows, columns)} (one per input column)")
    if inputs_embeds is not None and (not isinstance(inputs_embeds, torch.Tensor) or inputs_embeds.dim() != 3
                                      or tuple(inputs_embeds.shape[:2]) != (rows, columns)):
        raise ValueError(f"inputs_embeds must be a tensor of shape {(rows, columns)} + (hidden,)")
    if cache is not None and not callable(getattr(cache, "get_seq_length", None)):
        raise TypeError("cache must be a transformers Cache (e.g. an earlier output's .cache)")
    return ModelInputs(token_type_ids=None if token_type_ids is None else token_type_ids.long(),
                       position_ids=None if position_ids is None else position_ids.long(),
                       inputs_embeds=inputs_embeds, cache=cache)


def _for_decoding(step_model: StepModelBase, options: DecodeOptions, *, refilling: bool) -> StepModelBase:
    """The step model as the options want it: uncached, decoder start token, KV-cache room reserved."""
    if not options.use_cache:
        step_model = step_model.uncached()
    if options.decoder_start_token_id is not None:
        step_model = step_model.starting_with(options.decoder_start_token_id)
    guaranteed = step_model.guaranteed_eos_token_id
    if guaranteed is not None and guaranteed not in options.eos_token_ids:
        raise ValueError(
            f"eos_token_id {list(options.eos_token_ids) or -1}: the self-terminating model's guarantee is about "
            f"its own eos token {guaranteed}; decoding would stop only at max_new_tokens. Include it "
            "in eos_token_id (or leave eos_token_id unset)")
    if options.use_cache:
        # refilled rows start at later columns of the cache: room for half a decode more saves regrowing;
        # the cache then grows with what is generated, as the token buffers do
        wanted = options.max_new_tokens * 3 // 2 if refilling else options.max_new_tokens
        step_model = step_model.reserving(min(wanted, RESERVED_UP_FRONT))
    return step_model


@torch.no_grad()
def generate(
    model: Any,
    input_ids: torch.LongTensor | None = None,
    attention_mask: torch.LongTensor | None = None,
    *,
    generation_config: GenerationConfig | None = None,
    logits_processor: Sequence[Any] | None = None,
    stopping_criteria: Sequence[Any] | None = None,
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
    streamer: Any = None,
    stream: RowStreamer | Callable[[Any], Any] | None = None,
    tokenizer: Any = None,
    consistent: bool = False,
    generator: torch.Generator | None = None,
    drop_finished: bool = True,
    beam_rule: str = "transformers",
    max_batch_size: int | None = None,
    progress: bool = False,
    token_type_ids: torch.LongTensor | None = None,
    position_ids: torch.LongTensor | None = None,
    inputs_embeds: torch.Tensor | None = None,
    cache: Any = None,
    past_key_values: Any = None,
    prompt_share: tuple[int, int] | None = None,
    **kwargs: Any,
) -> torch.LongTensor | GenerateOutput:
    """Generate continuations, with ``model.generate``'s options, meanings and output layout.

    Args:
        model: a transformers causal LM or encoder-decoder, or any :class:`~decoding.StepModel`.
        input_ids: ``[B, T]`` prompts (any integer dtype), left-padded for decoder-only models (encoder
            inputs for encoder-decoders); may be omitted next to ``inputs_embeds``.
        attention_mask: ``[B, T]``, 1 on real tokens, 0 on padding (holes too, as in transformers); inferred
            from ``pad_token_id`` for decoder-only models when omitted.
        generation_config: a ``transformers.GenerationConfig``; keyword options override it.
        logits_processor: a user's processors (``LogitsProcessorList`` or callables
            ``(input_ids, scores) -> scores``), applied after the built-in ones and before temperature and
            truncation, as transformers applies them.
        stopping_criteria: transformers ``StoppingCriteria`` (or callables ``(input_ids [n, T], scores [n, V])
            -> done [n]``); a row they flag ends (``terminated`` stays False). They are called on the rows
            still decoding (finished rows leave the batch), so each must judge a row by its tokens, as
            transformers' own do; in beam search, on the candidate hypotheses with ``scores=None``.
        prefix_allowed_tokens_fn: ``(batch_id, input_ids [T]) -> allowed token ids`` for the next token.
        streamer: transformers' streamer protocol (``put``/``end``, e.g. ``TextStreamer``): the prompt, then
            one ``[N]`` tensor per step (pad for finished rows). Greedy and sampling, without
            ``max_batch_size``, as in transformers.
        stream: batched streaming: a :class:`~decoding.streaming.RowStreamer` (e.g. ``PieceIterator``) or a
            callable that receives a :class:`~decoding.streaming.Piece` per row's new tokens, the last one
            with the row's end reason; every strategy, refill included.
        tokenizer: the model's tokenizer, for ``stop_strings``.
        consistent: keep the eos token(s) in the candidate set of every truncation sampler (top-k, top-p,
            min-p, typical, epsilon, eta, any combination), so sampling terminates with probability 1 when
            the model's p(eos) is bounded away from 0. eos keeps its own probability, renormalised.
        generator: the source of all randomness; the same seed gives the same output.
        drop_finished: take finished rows (prompts, in beam search) out of the batch and the model state
            at once, so they cost nothing. False keeps them in the batch fed with pad, as transformers
            does; the tokens are the same either way (kept for checks and benchmarks).
        beam_rule: ``"transformers"`` (default): ``model.generate``'s beam search. ``"papers"``: the rule
            of the self-terminating papers' code (Welleck et al. 2020; Choi et al. 2023): a prompt stops at
            the first step where one of its ``num_beams`` best candidates ends in eos and returns the best
            of them by summed log-probability (no length penalty); with none by the cap, its best running
            beam. Needs ``do_sample=False`` and one return sequence; ``length_penalty`` and
            ``early_stopping`` do not apply (passing them raises).
        max_batch_size: decode at most this many rows at once (a row: one sequence, one beam). Greedy and
            sampling then refill the rows that finish with the next prompts (continuous batching), when
            the step model can ``merge`` states (decoder-only transformers models, the RNN/LSTM LMs, the
            self-terminating wrappers of those) and no logits processor needs whole-batch lengths
            (repetition penalty, min/forced lengths, user processors); beam search refills too, a whole
            prompt's beams at a time. Otherwise, and in beam sampling, the prompts are decoded in
            consecutive chunks. Each prompt gets the tokens it gets without the limit (seeded samples
            too: every row and prompt draws its own random numbers), up to floating-point effects of batch
            composition. Pays off where rows end early; in a transformers model's KV cache every row attends
            over the span of the oldest running row, so with long rows it can be slower than decoding
            without a limit. None: all prompts at once.
        progress: show a tqdm bar over decoding steps.
        token_type_ids, position_ids: ``[B, T]`` passed to a decoder-only transformers model's forward as
            ``model.generate`` passes them (generated tokens: the last column's type, positions counting on).
        inputs_embeds: ``[B, T, H]`` fed to a decoder-only model instead of ``input_ids``.
        cache: a transformers cache holding the first columns of every row (``past_key_values``, the older
            name, is accepted too): e.g. an earlier output's ``cache`` with ``input_ids`` that output's
            sequences plus new tokens, to continue a conversation.
        prompt_share: ``(first_prompt, total_prompts)``: these prompts are prompts ``first_prompt ..`` of a
            sampled call over ``total_prompts`` prompts, and every row draws the random numbers it would draw
            in that whole call with the same ``generator``; so a sampled batch split across processes (one
            share each) gives exactly the samples of one call on the whole batch. Sampling only.
        **kwargs: transformers' generation options (see ``decoding.options.SUPPORTED_OPTIONS``).

    Returns:
        ``[N, P + G]`` token ids (``N = B x num_return_sequences``), or with ``return_dict_in_generate=True``
        the output class transformers returns (``GenerateDecoderOnlyOutput``, ...) with this library's
        fields (:class:`~decoding.outputs.GenerateOutput`).

    Example:
        >>> out = generate(model, ids, mask, do_sample=True, top_k=2, consistent=True,
        ...                max_new_tokens=200, return_dict_in_generate=True,
        ...                generator=torch.Generator().manual_seed(0))
        >>> out.terminated.float().mean()   # share of rows that emitted eos
    """
    if cache is not None and past_key_values is not None:
        raise ValueError("pass the cache as cache= or past_key_values=, not both")
    step_model = as_step_model(model)
    is_encoder_decoder = step_model.is_encoder_decoder
    input_ids = _check_input_ids(input_ids, vocab_size=int(step_model.vocab_size), is_encoder_decoder=is_encoder_decoder,
                                 inputs_embeds=None if is_encoder_decoder else inputs_embeds)
    options = resolve_options(
        model, prefix_length=1 if is_encoder_decoder else input_ids.shape[1], vocab_size=int(step_model.vocab_size),
        is_encoder_decoder=is_encoder_decoder, kwargs=kwargs, generation_config=generation_config,
        logits_processor=logits_processor, consistent=consistent, generator=generator, drop_finished=drop_finished,
        beam_rule=beam_rule, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn, stopping_criteria=stopping_criteria,
        tokenizer=tokenizer,
    )
    pad_ids = _as_id_tuple(merged_generation_config(model, generation_config, kwargs).pad_token_id, "pad_token_id")
    prompts = _prompts(model, step_model, input_ids, attention_mask, pad_token_ids=pad_ids,
                       eos_token_ids=options.eos_token_ids, token_type_ids=token_type_ids, position_ids=position_ids,
                       inputs_embeds=inputs_embeds, cache=cache if cache is not None else past_key_values)
    capacity = _check_max_batch_size(max_batch_size, options.rows_per_prompt, prompts.count)
    draws = _shared_draws(prompt_share, options, prompts=prompts.count, device=prompts.input_ids.device)
    sink = _stream_sink(streamer, stream, options, n_rows=prompts.count * options.num_return_sequences,
                        limited=capacity is not None)
    try:
        return _decode(step_model, prompts, options=options, capacity=capacity, sink=sink, progress=progress,
                       draws=draws)
    finally:
        if sink is not None:
            sink.end()


@dataclass(frozen=True)
class _Prompts:
    """The checked prompts of one call, on the model's device; prefilled and given their logits processors
    by rows (all of them, or a chunk's)."""

    input_ids: torch.LongTensor         # [B, T]; [B, 0] next to inputs_embeds alone
    attention_mask: torch.LongTensor    # [B, T'] (T' = inputs_embeds' columns when given)
    model_inputs: ModelInputs | None    # the forward inputs passed through, None when there are none
    is_encoder_decoder: bool

    @property
    def count(self) -> int:
        return self.input_ids.shape[0]

    def processors(self, options: DecodeOptions, rows: slice, *, in_place: bool) -> list[Processor]:
        """The logits-processor chain of prompts ``rows``."""
        padding = None if self.is_encoder_decoder else (self.attention_mask[rows] == 0).long().sum(dim=1)
        return build_processors(options, prefix_length=1 if self.is_encoder_decoder else self.input_ids.shape[1],
                                device=self.input_ids.device, in_place=in_place, padding_lengths=padding,
                                first_prompt=rows.start or 0)

    def prefill(self, step_model: StepModelBase, rows: slice) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        """``step_model.prefill`` on prompts ``rows``: ``(logits [b, V], state, prefix [b, P])``."""
        if self.model_inputs is None:
            return step_model.prefill(self.input_ids[rows], self.attention_mask[rows])
        chunk_inputs = self.model_inputs if rows == slice(None) else self.model_inputs.rows(rows)
        return step_model.prefill(self.input_ids[rows], self.attention_mask[rows], inputs=chunk_inputs)


def _prompts(model: Any, step_model: StepModelBase, input_ids: torch.LongTensor, attention_mask: Any, *,
             pad_token_ids: tuple[int, ...], eos_token_ids: Sequence[int], token_type_ids: Any, position_ids: Any,
             inputs_embeds: Any, cache: Any) -> _Prompts:
    """The attention mask and model inputs checked against ``input_ids`` (checked already), all moved to the
    model's device."""
    is_encoder_decoder = step_model.is_encoder_decoder
    columns = input_ids.shape[1] if inputs_embeds is None or is_encoder_decoder else inputs_embeds.shape[1]
    model_inputs = _model_inputs(step_model, is_encoder_decoder=is_encoder_decoder, columns=columns,
                                 rows=input_ids.shape[0], token_type_ids=token_type_ids, position_ids=position_ids,
                                 inputs_embeds=inputs_embeds, cache=cache)
    if (inputs_embeds is None or input_ids.shape[1]) and input_ids.shape[1] != columns:
        raise ValueError(f"input_ids has {input_ids.shape[1]} columns, inputs_embeds {columns}")
    attention_mask = _check_mask(attention_mask, input_ids, columns=columns, is_encoder_decoder=is_encoder_decoder,
                                 pad_token_ids=pad_token_ids, eos_token_ids=eos_token_ids)
    model_device = getattr(model, "device", None)
    if isinstance(model_device, torch.device) and model_device.type != "meta":
        input_ids, attention_mask = input_ids.to(model_device), attention_mask.to(model_device)
    return _Prompts(input_ids, attention_mask, model_inputs, is_encoder_decoder)


def _stream_sink(streamer: Any, stream: Any, options: DecodeOptions, *, n_rows: int,
                 limited: bool) -> StreamSink | None:
    """Where the loop streams to, or None; refuses what transformers' streamer protocol cannot carry."""
    if streamer is None and stream is None:
        return None
    if streamer is not None and options.is_beam_search:
        raise ValueError("streamer cannot be used with beam search (as in transformers): set num_beams=1, or "
                         "use stream= (batched streaming, which gives each prompt's sequences when it is done)")
    if streamer is not None and limited:
        raise ValueError("streamer streams one batch: with max_batch_size use stream= (batched streaming)")
    return StreamSink(rows=stream, streamer=streamer, n_rows=n_rows, pad_token_id=options.pad_token_id)


def _decode(step_model: StepModelBase, prompts: _Prompts, *, options: DecodeOptions, capacity: int | None,
            sink: StreamSink | None, progress: bool,
            draws: Uniforms | PromptNoise | None = None) -> torch.LongTensor | GenerateOutput:
    """Prefill and search, in one batch or in chunks of ``capacity`` rows (refilled where possible), with the
    random numbers ``draws`` (those of these prompts alone when None)."""
    everything = slice(None)
    batch_wide = bool(prompts.processors(options, everything, in_place=False))
    refilling = (capacity is not None and step_model.can_merge
                 and refill_blocker(options, batch_wide_processors=batch_wide) is None)
    step_model = _for_decoding(step_model, options, refilling=refilling)
    if capacity is not None:
        results = _decode_in_chunks(step_model, prompts, options=options, capacity=capacity, refilling=refilling,
                                    sink=sink, progress=progress, draws=draws)
        return _shape_output(_concat_results(results, options), options, step_model,
                             is_encoder_decoder=prompts.is_encoder_decoder)
    logits, state, prefix = prompts.prefill(step_model, everything)
    if sink is not None:
        sink.prompt(prefix.repeat_interleave(options.num_return_sequences, dim=0))
    processors = prompts.processors(options, everything, in_place=step_model.fresh_logits)
    return decode_prefilled(step_model, logits, state, prefix, options=options, processors=processors,
                            progress=progress, stream=sink, draws=draws)


def _decode_in_chunks(step_model: StepModelBase, prompts: _Prompts, *, options: DecodeOptions, capacity: int,
                      refilling: bool, sink: StreamSink | None, progress: bool,
                      draws: Uniforms | PromptNoise | None) -> list[SearchResult]:
    """The prompts in chunks of ``capacity`` rows: the first chunk refilled with the rest as rows finish, or
    (when the step model cannot merge this state, or the call cannot refill) chunk after chunk."""
    per_prompt = options.rows_per_prompt
    chunk, search = capacity // per_prompt, beam_search if options.is_beam_search else sample_search
    if draws is None:
        draws = _random_draws(options, prompts=prompts.count, device=prompts.input_ids.device)
    results = []
    for start in range(0, prompts.count, chunk):
        rows = slice(start, start + chunk)
        processors = prompts.processors(options, rows, in_place=step_model.fresh_logits)
        logits, state, prefix = prompts.prefill(step_model, rows)
        refill = None
        if refilling and step_model.mergeable(state):
            refill = Refill(admit=_admitting(lambda more: prompts.prefill(step_model, more), first=start + chunk),
                            merge=step_model.merge, prompts=prompts.count - start - chunk, capacity=chunk * per_prompt,
                            threshold=max(per_prompt, chunk * per_prompt // 8))
        stream = None if sink is None else sink.shifted(start * options.num_return_sequences)
        results.append(search(step_model, logits, state, prefix, options=options, processors=processors,
                              progress=progress, refill=refill, stream=stream,
                              draws=_chunk_view(draws, start, per_prompt)))
        if refill is not None:
            break
    return results


def _random_draws(options: DecodeOptions, *, prompts: int, device: torch.device) -> Uniforms | PromptNoise | None:
    """The random numbers of a call decoded in chunks, drawn per row (sampling) or per prompt (beam sampling)
    so that chunking never changes a sample."""
    if not options.do_sample:
        return None
    if options.is_beam_search:
        return PromptNoise(prompts, generator=options.generator, device=device)
    return Uniforms(prompts * options.num_return_sequences, generator=options.generator, device=device)


def _shared_draws(prompt_share: Any, options: DecodeOptions, *, prompts: int,
                  device: torch.device) -> Uniforms | PromptNoise | None:
    """The random numbers of ``prompts`` prompts that are prompts ``first ..`` of a call over ``total``
    (``prompt_share = (first, total)``), checked; None without a share."""
    if prompt_share is None:
        return None
    if (not isinstance(prompt_share, (tuple, list)) or len(prompt_share) != 2
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in prompt_share)):
        raise TypeError(f"prompt_share must be a pair of integers (first_prompt, total_prompts), got {prompt_share!r}")
    first, total = prompt_share
    if not 0 <= first <= total - prompts:
        raise ValueError(f"prompt_share=({first}, {total}): the {prompts} prompts given must lie inside the "
                         f"whole call, 0 <= first_prompt <= total_prompts - {prompts}")
    if not options.do_sample:
        raise ValueError("prompt_share keys the random numbers of sampling; without do_sample=True nothing is "
                         "random (leave prompt_share unset)")
    return _chunk_view(_random_draws(options, prompts=total, device=device), first, options.rows_per_prompt)


def _chunk_view(draws: Uniforms | PromptNoise | None, first_prompt: int,
                per_prompt: int) -> Uniforms | PromptNoise | None:
    """The part of ``draws`` of a chunk starting at prompt ``first_prompt``."""
    if isinstance(draws, Uniforms):
        return draws.rows_from(first_prompt * per_prompt)
    if isinstance(draws, PromptNoise):
        return draws.prompts_from(first_prompt)
    return None


def _check_max_batch_size(max_batch_size: Any, per_prompt: int, n_prompts: int) -> int | None:
    """The row limit, or None when every row fits at once."""
    if max_batch_size is None:
        return None
    if isinstance(max_batch_size, bool) or not isinstance(max_batch_size, int) or max_batch_size < per_prompt:
        raise ValueError(f"max_batch_size must be an integer >= {per_prompt} (the rows of one prompt: "
                         f"num_beams or num_return_sequences), got {max_batch_size!r}")
    return None if n_prompts * per_prompt <= max_batch_size else max_batch_size


def _admitting(prefill: Callable[[slice], tuple[torch.Tensor, Any, torch.LongTensor]], *,
               first: int) -> Callable[[int], tuple[torch.Tensor, Any, torch.LongTensor]]:
    """``admit(count)`` for a :class:`Refill`: prefill the next ``count`` prompts, from prompt ``first`` on."""
    admitted = first

    def admit(count: int) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        nonlocal admitted
        rows = slice(admitted, admitted + count)
        admitted += count
        return prefill(rows)

    return admit


def _concat_results(results: Sequence[SearchResult], options: DecodeOptions) -> SearchResult:
    """The rows of consecutive chunks' results, in order (sequences padded to the widest, as one batch is)."""
    width = max(r.sequences.shape[1] for r in results)
    fill = options.beam_fill_token_id if options.is_beam_search else options.pad_token_id
    sequences = torch.cat([torch.nn.functional.pad(r.sequences, (0, width - r.sequences.shape[1]), value=fill)
                           for r in results])
    scores = None if results[0].scores is None else torch.cat([r.scores for r in results])
    beam_indices = None
    if results[0].beam_indices is not None:
        steps = width - results[0].sequences.shape[1] + results[0].beam_indices.shape[1]
        beam_indices = torch.cat([torch.nn.functional.pad(r.beam_indices, (0, steps - r.beam_indices.shape[1]),
                                                          value=-1) for r in results])

    def steps_of(field: str) -> tuple[torch.Tensor, ...] | None:
        parts = [getattr(r, field) for r in results]
        return None if parts[0] is None else concat_steps(parts, [r.lengths.shape[0] for r in results])

    return SearchResult(sequences=sequences, lengths=torch.cat([r.lengths for r in results]),
                        terminated=torch.cat([r.terminated for r in results]), scores=scores,
                        step_scores=steps_of("step_scores"), step_logits=steps_of("step_logits"),
                        beam_indices=beam_indices)


def decode_prefilled(step_model: StepModelBase, logits: torch.Tensor, state: Any, prefix: torch.LongTensor, *,
                     options: DecodeOptions, processors: Sequence[Processor], progress: bool = False,
                     stream: StreamSink | None = None,
                     draws: Uniforms | PromptNoise | None = None) -> torch.LongTensor | GenerateOutput:
    """Run the search the options ask for from a prefilled state and shape the result as ``generate``
    returns it (the sequences, or the output class with ``return_dict_in_generate``)."""
    step_model = declared(step_model)
    search = beam_search if options.is_beam_search else sample_search
    result = search(step_model, logits, state, prefix, options=options, processors=processors, progress=progress,
                    stream=stream, draws=draws)
    return _shape_output(result, options, step_model, is_encoder_decoder=step_model.is_encoder_decoder)


def _shape_output(result: SearchResult, options: DecodeOptions, step_model: StepModelBase, *,
                  is_encoder_decoder: bool) -> torch.LongTensor | GenerateOutput:
    """The sequences, or transformers' output class for the model and search with this library's fields."""
    if not options.return_dict_in_generate:
        return result.sequences
    cache = None if result.state is None else step_model.model_cache(result.state)
    output = output_class(is_encoder_decoder=is_encoder_decoder, beam_search=options.is_beam_search)
    fields: dict[str, Any] = dict(sequences=result.sequences, terminated=result.terminated, lengths=result.lengths,
                                  sequences_scores=result.scores, scores=result.step_scores,
                                  logits=result.step_logits, cache=cache)
    beam_indices = result.beam_indices
    if beam_indices is not None:  # beam slots -> rows of the prompts x num_beams batch, as transformers numbers them
        prompt = torch.arange(beam_indices.shape[0], device=beam_indices.device) // options.num_return_sequences
        fields["beam_indices"] = torch.where(beam_indices >= 0, beam_indices + (prompt * options.num_beams)[:, None].to(
            beam_indices.dtype), beam_indices)
    return output(**fields)
