"""Resolve and validate ``generate`` options the way transformers does.

Priority, as in ``model.generate``: keyword arguments > a ``generation_config`` argument >
``model.generation_config`` > transformers' global defaults. Every option is validated here, before any
model work; an option this library does not implement raises instead of being silently ignored.
"""

from __future__ import annotations

import copy
import numbers
import warnings
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple, Sequence

import torch
from transformers import GenerationConfig
from transformers.generation.stopping_criteria import StopStringCriteria

from .token_rules import TokenRules, resolve_token_rules
from .transforms import Truncation, check_temperature

__all__ = ["DecodeOptions", "resolve_options", "SUPPORTED_OPTIONS"]

# Options generate() implements, with transformers' names and meanings.
SUPPORTED_OPTIONS = frozenset({
    "max_new_tokens", "max_length", "min_new_tokens", "min_length", "do_sample", "temperature", "top_k",
    "top_p", "min_p", "typical_p", "epsilon_cutoff", "eta_cutoff", "num_beams", "length_penalty",
    "early_stopping", "num_return_sequences", "eos_token_id", "pad_token_id", "bos_token_id",
    "decoder_start_token_id", "repetition_penalty", "no_repeat_ngram_size", "forced_eos_token_id",
    "forced_bos_token_id", "exponential_decay_length_penalty", "return_dict_in_generate", "use_cache",
    "sequence_bias", "bad_words_ids", "suppress_tokens", "begin_suppress_tokens", "remove_invalid_values",
    "renormalize_logits", "output_scores", "output_logits", "stop_strings",
})

# Config fields that are accepted only at their "off" value; anything else is an unsupported feature.
_OFF_VALUES: dict[str, tuple[Any, ...]] = {
    "guidance_scale": (None, 1, 1.0), "encoder_repetition_penalty": (None, 1.0),
    "encoder_no_repeat_ngram_size": (None, 0), "top_h": (None,), "max_time": (None,), "watermarking_config": (None,),
    "num_beam_groups": (None, 1), "diversity_penalty": (None, 0.0), "constraints": (None,),
    "force_words_ids": (None,), "penalty_alpha": (None,), "dola_layers": (None,), "token_healing": (None, False),
    "prompt_lookup_num_tokens": (None,), "low_memory": (None, False), "output_attentions": (None, False),
    "output_hidden_states": (None, False), "cache_implementation": (None, "dynamic"),
    "prefill_chunk_size": (None,), "use_mtp": (None, False),
}


@dataclass(frozen=True)
class DecodeOptions:
    """Everything the decode loop needs, resolved and validated. Lengths count generated tokens."""

    max_new_tokens: int
    min_new_tokens: int
    do_sample: bool
    temperature: float
    truncation: Truncation
    consistent: bool
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    num_return_sequences: int
    eos_token_ids: tuple[int, ...]
    pad_token_id: int
    repetition_penalty: float
    no_repeat_ngram_size: int
    forced_bos_token_id: int | None
    forced_eos_token_id: tuple[int, ...]
    exponential_decay_length_penalty: tuple[int, float] | None
    logits_processor: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...]
    return_dict_in_generate: bool
    use_cache: bool
    generator: torch.Generator | None
    decoder_start_token_id: int | None
    drop_finished: bool = True
    beam_rule: str = "transformers"  # or "papers": first finished hypothesis, unnormalised score
    token_rules: TokenRules = TokenRules()
    # stopping criteria called as transformers' StoppingCriteria: (input_ids [n, T], scores [n, V]) -> done [n]
    stopping_criteria: tuple[Callable[[torch.Tensor, torch.Tensor], torch.Tensor], ...] = ()
    output_scores: bool = False    # return the processed scores of every step (return_dict_in_generate)
    output_logits: bool = False    # return the model's raw logits of every step (return_dict_in_generate)

    @property
    def is_beam_search(self) -> bool:
        return self.num_beams > 1

    @property
    def rows_per_prompt(self) -> int:
        """Rows one prompt takes in the batch: its beams, or its returned sequences."""
        return self.num_beams if self.is_beam_search else self.num_return_sequences

    @property
    def beam_fill_token_id(self) -> int:
        """What beam search writes after a hypothesis' eos: transformers' ``pad_token_id or eos_token_id[0]``,
        so a pad id of 0 gives eos (its quirk, matched so the output tensors are the same)."""
        return self.pad_token_id or (self.eos_token_ids[0] if self.eos_token_ids else self.pad_token_id)


NEVER_STOP = -1  # transformers' eos_token_id meaning "no eos": it never matches a token


def _as_id_tuple(value: Any, name: str) -> tuple[int, ...]:
    """Token ids given as an int, a list of ints or an integer tensor of any shape, as a tuple."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            raise TypeError(f"{name}: expected integer token ids, got a {value.dtype} tensor")
        value = value.flatten().tolist()
    if _is_int(value):
        return (int(value),)
    if isinstance(value, Sequence) and all(_is_int(v) for v in value):
        return tuple(int(v) for v in value)
    raise TypeError(f"{name}: expected an int or a list of ints, got {value!r}")


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _check_int(name: str, value: Any, *, low: int) -> int:
    """``value`` as an int, or a ValueError naming ``name`` (transformers raises for ``top_k=2.5`` too)."""
    if not _is_int(value) or value < low:
        raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    return int(value)


def _check_token(name: str, token: int, vocab_size: int) -> int:
    if not 0 <= token < vocab_size:
        raise ValueError(f"{name} {token} is outside the vocabulary [0, {vocab_size})")
    return token


def eos_ids(value: Any, vocab_size: int) -> tuple[int, ...]:
    """The eos ids of ``eos_token_id`` (int, list or tensor); ``-1``, transformers' "never stop", matches
    no token and is dropped."""
    ids = _as_id_tuple(value, "eos_token_id")
    for token in ids:
        if token != NEVER_STOP:
            _check_token("eos_token_id", token, vocab_size)
    return tuple(token for token in ids if token != NEVER_STOP)


def merged_generation_config(model: Any, generation_config: GenerationConfig | None,
                             kwargs: dict[str, Any]) -> GenerationConfig:
    """kwargs > generation_config > model.generation_config > transformers' defaults."""
    config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    model_config = getattr(model, "generation_config", None)
    if isinstance(model_config, GenerationConfig):
        config.update(**model_config.to_dict(), defaults_only=True, allow_custom_entries=True)
    config.update(**GenerationConfig._get_default_generation_params(), defaults_only=True)
    unknown = config.update(**kwargs)
    if unknown:
        raise TypeError(f"generate() got unexpected keyword arguments: {sorted(unknown)}")
    return config


def _check_unsupported(config: GenerationConfig) -> None:
    for name, off in _OFF_VALUES.items():
        value = getattr(config, name, None)
        if value not in off:
            raise NotImplementedError(
                f"{name}={value!r} is not supported by decoding.generate (it would be silently ignored); "
                f"allowed: {', '.join(repr(v) for v in off)}. Use model.generate for this feature."
            )


def resolve_options(
    model: Any,
    *,
    prefix_length: int,
    vocab_size: int,
    is_encoder_decoder: bool,
    kwargs: dict[str, Any],
    generation_config: GenerationConfig | None = None,
    logits_processor: Sequence[Callable] | None = None,
    consistent: bool = False,
    generator: torch.Generator | None = None,
    drop_finished: bool = True,
    beam_rule: str = "transformers",
    prefix_allowed_tokens_fn: Callable[[int, torch.Tensor], Sequence[int]] | None = None,
    stopping_criteria: Sequence[Callable] | None = None,
    tokenizer: Any = None,
) -> DecodeOptions:
    """Merge, validate and normalise the options of one ``generate`` call.

    Args:
        prefix_length: length of the sequences the output rows start with (the prompt for a decoder-only
            model, 1 for an encoder-decoder), used to turn ``max_length``/``min_length`` into token counts.
        vocab_size: the model's vocabulary size, to check token ids.
        stopping_criteria: transformers ``StoppingCriteria`` (or callables ``(input_ids, scores) -> done``).
        tokenizer: the model's tokenizer, needed by ``stop_strings`` (as in transformers).
    """
    _check_keywords(kwargs)
    default_max = _has_default_max_length(model, generation_config, kwargs)
    config = merged_generation_config(model, generation_config, kwargs)
    _check_unsupported(config)
    max_new_tokens, min_new_tokens = _lengths(config, model, prefix_length=prefix_length, default_max=default_max)
    ids = _token_ids(config, vocab_size, consistent=consistent, is_encoder_decoder=is_encoder_decoder)
    do_sample = bool(config.do_sample)
    num_beams, num_return_sequences = _beams(config, do_sample=do_sample)
    _check_beam_rule(beam_rule, kwargs, do_sample=do_sample, num_return_sequences=num_return_sequences)
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}")
    return DecodeOptions(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=do_sample,
        temperature=_temperature(config, do_sample=do_sample),
        truncation=_truncation(config, num_beams=num_beams, eos_token_ids=ids.eos),
        consistent=bool(consistent),
        num_beams=num_beams,
        length_penalty=float(config.length_penalty),
        early_stopping=_early_stopping(config),
        num_return_sequences=num_return_sequences,
        eos_token_ids=ids.eos,
        pad_token_id=ids.pad,
        repetition_penalty=_repetition_penalty(config),
        no_repeat_ngram_size=_check_int("no_repeat_ngram_size", config.no_repeat_ngram_size or 0, low=0),
        forced_bos_token_id=ids.forced_bos,
        forced_eos_token_id=ids.forced_eos,
        exponential_decay_length_penalty=_length_decay(config),
        logits_processor=tuple(logits_processor or ()),
        return_dict_in_generate=bool(config.return_dict_in_generate),
        use_cache=bool(config.use_cache if config.use_cache is not None else True),
        generator=generator,
        decoder_start_token_id=ids.decoder_start,
        drop_finished=bool(drop_finished),
        beam_rule=beam_rule,
        token_rules=resolve_token_rules(config, prefix_allowed_tokens_fn=prefix_allowed_tokens_fn,
                                        vocab_size=vocab_size, eos_token_ids=ids.eos, consistent=consistent),
        stopping_criteria=_stopping_criteria(config.stop_strings, tokenizer, stopping_criteria),
        output_scores=bool(config.output_scores),
        output_logits=bool(config.output_logits),
    )


def _check_keywords(kwargs: dict[str, Any]) -> None:
    """Refuse keyword options that are neither supported nor a config field accepted at its "off" value."""
    unsupported = sorted(set(kwargs) - SUPPORTED_OPTIONS)
    known_to_config = [k for k in unsupported if k in _OFF_VALUES]
    if unsupported and len(known_to_config) != len(unsupported):
        raise TypeError(
            f"generate() got unsupported keyword arguments {unsupported}; supported: "
            f"{sorted(SUPPORTED_OPTIONS | {'logits_processor', 'generation_config', 'consistent', 'generator'})}"
        )


def _has_default_max_length(model: Any, generation_config: GenerationConfig | None, kwargs: dict[str, Any]) -> bool:
    """Whether no one set a length: transformers then warns and counts ``max_length`` from the prompt's end."""
    return kwargs.get("max_length") is None and kwargs.get("max_new_tokens") is None and all(
        getattr(c, "max_length", None) is None and getattr(c, "max_new_tokens", None) is None
        for c in (generation_config, getattr(model, "generation_config", None)) if c is not None
    )


def _lengths(config: GenerationConfig, model: Any, *, prefix_length: int, default_max: bool) -> tuple[int, int]:
    """``(max_new_tokens, min_new_tokens)`` as transformers computes them: ``max_new_tokens`` wins over
    ``max_length``, ``min_new_tokens`` over ``min_length``; the ``*_length`` options count the prefix."""
    if config.max_new_tokens is not None:
        max_new_tokens = _check_int("max_new_tokens", config.max_new_tokens, low=1)
    else:
        max_length = _check_int("max_length", config.max_length, low=1)
        if default_max:
            max_length = max_length + prefix_length
            positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
            if positions is not None:
                max_length = min(max_length, int(positions))
            warnings.warn(
                f"Using the model-agnostic default `max_length` (={max_length}) to control the generation "
                "length. We recommend setting `max_new_tokens` to control the maximum length of the generation.",
                UserWarning, stacklevel=4,
            )
        if prefix_length >= max_length:
            raise ValueError(
                f"max_length: the input is {prefix_length} tokens long but max_length is {max_length}; "
                "set max_new_tokens instead"
            )
        max_new_tokens = max_length - prefix_length
    if config.min_new_tokens is not None:
        return max_new_tokens, _check_int("min_new_tokens", config.min_new_tokens, low=0)
    min_length = _check_int("min_length", config.min_length or 0, low=0)
    return max_new_tokens, max(0, min_length - prefix_length)


class _TokenIds(NamedTuple):
    eos: tuple[int, ...]
    pad: int
    forced_bos: int | None
    forced_eos: tuple[int, ...]
    decoder_start: int | None   # None: the model's own (and always for decoder-only models)


def _token_ids(config: GenerationConfig, vocab_size: int, *, consistent: bool, is_encoder_decoder: bool) -> _TokenIds:
    """The special token ids, each checked against the vocabulary."""
    eos = eos_ids(config.eos_token_id, vocab_size)
    if consistent and not eos:
        raise ValueError(
            "consistent=True needs an eos token: pass eos_token_id (int or list of ints) or set it in "
            "model.generation_config"
        )
    pad_ids = _as_id_tuple(config.pad_token_id, "pad_token_id")
    pad = _check_token("pad_token_id", pad_ids[0], vocab_size) if pad_ids else (eos[0] if eos else 0)
    forced_bos = _as_id_tuple(config.forced_bos_token_id, "forced_bos_token_id")
    forced_eos = _as_id_tuple(config.forced_eos_token_id, "forced_eos_token_id")
    for name, token_ids in (("forced_bos_token_id", forced_bos), ("forced_eos_token_id", forced_eos)):
        for token in token_ids:
            _check_token(name, token, vocab_size)
    decoder_start = None
    if is_encoder_decoder and config.decoder_start_token_id is not None:
        starts = _as_id_tuple(config.decoder_start_token_id, "decoder_start_token_id")
        if len(starts) != 1:
            raise ValueError(f"decoder_start_token_id must be one token id (one per row is not supported), got "
                             f"{config.decoder_start_token_id!r}")
        decoder_start = _check_token("decoder_start_token_id", starts[0], vocab_size)
    return _TokenIds(eos=eos, pad=int(pad), forced_bos=forced_bos[0] if forced_bos else None, forced_eos=forced_eos,
                     decoder_start=decoder_start)


def _beams(config: GenerationConfig, *, do_sample: bool) -> tuple[int, int]:
    """``(num_beams, num_return_sequences)``; without sampling, no more sequences than beams."""
    num_beams = _check_int("num_beams", config.num_beams, low=1)
    num_return_sequences = _check_int("num_return_sequences", config.num_return_sequences, low=1)
    if not do_sample and num_return_sequences > num_beams:
        raise ValueError(
            f"num_return_sequences ({num_return_sequences}) must be <= num_beams ({num_beams}) without "
            "sampling: greedy and beam search return at most num_beams distinct sequences"
        )
    return num_beams, num_return_sequences


def _temperature(config: GenerationConfig, *, do_sample: bool) -> float:
    """The temperature, checked when sampling (greedy and beam search ignore it, as in transformers)."""
    temperature = 1.0 if config.temperature is None else config.temperature
    if do_sample:
        try:
            temperature = check_temperature(temperature)
        except ValueError as error:  # name the option as this module does
            raise ValueError(f"temperature must be a finite number > 0 when sampling (do_sample=True), got "
                             f"{temperature!r}") from error
    return float(temperature)


def _truncation(config: GenerationConfig, *, num_beams: int, eos_token_ids: tuple[int, ...]) -> Truncation:
    """The truncation rules of sampling (checked by :class:`Truncation`)."""
    return Truncation(
        top_k=_check_int("top_k", config.top_k or 0, low=0),
        top_p=float(config.top_p if config.top_p is not None else 1.0),
        min_p=None if config.min_p is None else float(config.min_p),
        typical_p=float(config.typical_p if config.typical_p is not None else 1.0),
        epsilon_cutoff=float(config.epsilon_cutoff or 0.0),
        eta_cutoff=float(config.eta_cutoff or 0.0),
        # transformers keeps eos plus one more token in beam sampling, so a beam can always continue
        min_tokens_to_keep=(len(eos_token_ids) + 1 if eos_token_ids else 2) if num_beams > 1 else 1,
    )


def _early_stopping(config: GenerationConfig) -> bool | str:
    early_stopping = config.early_stopping
    if early_stopping not in (True, False, "never"):
        raise ValueError(f"early_stopping must be True, False or 'never', got {early_stopping!r}")
    return early_stopping


def _repetition_penalty(config: GenerationConfig) -> float:
    repetition_penalty = float(config.repetition_penalty)
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    return repetition_penalty


def _length_decay(config: GenerationConfig) -> tuple[int, float] | None:
    """``exponential_decay_length_penalty`` as ``(start_index, decay_factor)``, or None."""
    decay = config.exponential_decay_length_penalty
    if decay is None:
        return None
    if len(decay) != 2 or decay[0] < 0 or not decay[1] >= 1.0:
        raise ValueError(
            f"exponential_decay_length_penalty must be (start_index >= 0, decay_factor >= 1.0), got {decay!r}"
        )
    return int(decay[0]), float(decay[1])


BEAM_RULES = ("transformers", "papers")


def _check_beam_rule(beam_rule: str, kwargs: dict[str, Any], *, do_sample: bool, num_return_sequences: int) -> None:
    """The papers' beam rule returns one hypothesis, unnormalised, from deterministic search."""
    if beam_rule not in BEAM_RULES:
        raise ValueError(f"beam_rule must be one of {BEAM_RULES}, got {beam_rule!r}")
    if beam_rule == "transformers":
        return
    if do_sample:
        raise ValueError("beam_rule='papers' is a rule of deterministic beam search; it needs do_sample=False")
    if num_return_sequences != 1:
        raise ValueError(f"beam_rule='papers' returns one hypothesis per prompt; got num_return_sequences="
                         f"{num_return_sequences}")
    for name in ("length_penalty", "early_stopping"):
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} does not apply with beam_rule='papers' (unnormalised scores, stop at the "
                             "first finished hypothesis); leave it unset")


def _stopping_criteria(stop_strings: Any, tokenizer: Any, criteria: Sequence[Callable] | None) -> tuple[Callable, ...]:
    """transformers' ``StopStringCriteria`` for ``stop_strings``, then the user's criteria (eos and the length
    limit are the loop's own)."""
    built: list[Callable] = []
    if stop_strings is not None:
        if tokenizer is None:
            raise ValueError("stop_strings needs the model's tokenizer: pass tokenizer=... to generate, as in "
                             "model.generate")
        built.append(StopStringCriteria(tokenizer=tokenizer, stop_strings=stop_strings))
    for criterion in criteria or ():
        if not callable(criterion):
            raise TypeError(f"stopping_criteria: {criterion!r} is not callable (expected transformers "
                            "StoppingCriteria or (input_ids, scores) -> done)")
        built.append(criterion)
    return tuple(built)
