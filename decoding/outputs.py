"""What ``generate(..., return_dict_in_generate=True)`` returns: transformers' own output classes, with this
library's fields added.

transformers returns one of four classes (decoder-only or encoder-decoder, sampling or beam search);
each has a subclass here that also carries :class:`GenerateOutput`'s fields, so code written for
``model.generate``'s outputs (``isinstance`` checks, ``out.sequences``, ``out.cache``) keeps working and
``isinstance(out, GenerateOutput)`` holds for all four. New output fields go on :class:`GenerateOutput`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.generation import (GenerateBeamDecoderOnlyOutput, GenerateBeamEncoderDecoderOutput,
                                     GenerateDecoderOnlyOutput, GenerateEncoderDecoderOutput)

__all__ = ["GenerateOutput", "DecoderOnlyOutput", "EncoderDecoderOutput", "BeamDecoderOnlyOutput",
           "BeamEncoderDecoderOutput", "output_class"]


@dataclass
class GenerateOutput:
    """This library's fields of every ``generate`` output, after transformers' own (from the other base).

    Attributes:
        sequences (transformers' field): ``[N, P + G]`` prefix + continuation, pad after eos (beam search: transformers'
            ``pad_token_id or eos``); ``N = prompts x num_return_sequences``, the rows of one prompt
            adjacent, best beam first.
        terminated: ``[N]`` bool, the row ended with eos (False: cut by the length limit).
        lengths: ``[N]`` generated tokens per row, eos included.
        sequences_scores: ``[N]`` final beam scores (beam search only).
        scores (transformers' field): ``output_scores``: per generated step, the processed scores ``[N, V]``
            (beam search: ``[prompts x num_beams, V]``, one row per beam), as transformers returns them;
            ``-inf`` in the rows that had left the batch (finished) at that step.
        logits (transformers' field): ``output_logits``: per step, the model's raw logits, laid out as ``scores``.
        beam_indices (transformers' field, beam classes only): ``[N, G]`` int32: for each token, the beam row
            (``prompt x num_beams + beam``) it extended; -1 after the row's end.
        cache (transformers' field): the model's KV cache after the last fed token (every row's prompt and
            generated tokens but the last), to continue from with ``generate(..., cache=out.cache)``; set for
            greedy and sampling when the final batch still holds every row in order (one row, rows that all end
            at the same step, or ``drop_finished=False``), None otherwise and for beam search.
    """

    terminated: torch.BoolTensor | None = None
    lengths: torch.LongTensor | None = None
    sequences_scores: torch.Tensor | None = None


@dataclass
class DecoderOnlyOutput(GenerateOutput, GenerateDecoderOnlyOutput):
    """transformers' ``GenerateDecoderOnlyOutput`` with :class:`GenerateOutput`'s fields."""


@dataclass
class EncoderDecoderOutput(GenerateOutput, GenerateEncoderDecoderOutput):
    """transformers' ``GenerateEncoderDecoderOutput`` with :class:`GenerateOutput`'s fields."""


@dataclass
class BeamDecoderOnlyOutput(GenerateOutput, GenerateBeamDecoderOnlyOutput):
    """transformers' ``GenerateBeamDecoderOnlyOutput`` with :class:`GenerateOutput`'s fields."""


@dataclass
class BeamEncoderDecoderOutput(GenerateOutput, GenerateBeamEncoderDecoderOutput):
    """transformers' ``GenerateBeamEncoderDecoderOutput`` with :class:`GenerateOutput`'s fields."""


def output_class(*, is_encoder_decoder: bool, beam_search: bool) -> type[GenerateOutput]:
    """The class transformers returns for this kind of model and search, with this library's fields."""
    if beam_search:
        return BeamEncoderDecoderOutput if is_encoder_decoder else BeamDecoderOnlyOutput
    return EncoderDecoderOutput if is_encoder_decoder else DecoderOnlyOutput
