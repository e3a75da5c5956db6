"""Consistent decoding: text generation that provably terminates.

- :func:`generate` — a drop-in for ``model.generate`` (same options and output layout) with
  ``consistent=True`` for truncation samplers that keep eos, an explicit ``generator``, and finished rows
  that stop costing compute.
- :func:`make_self_terminating` — ST / NMST output layers that make even greedy and beam search stop
  within :func:`termination_bound` tokens.
- :mod:`decoding.metrics` — non-termination ratio, lengths, repetition, perplexity, BLEU.
"""

from .generate import generate
from .outputs import GenerateOutput
from .interop import custom_generate
from .models import RecurrentLM, RecurrentLMConfig
from .protocol import StepModel, as_step_model
from .self_terminating import (SelfTerminatingLM, load_self_terminating, make_self_terminating,
                               save_self_terminating, termination_bound)
from .transforms import Truncation

__all__ = [
    "GenerateOutput", "RecurrentLM", "RecurrentLMConfig", "SelfTerminatingLM", "StepModel", "Truncation",
    "as_step_model", "custom_generate", "generate", "load_self_terminating", "make_self_terminating",
    "save_self_terminating", "termination_bound",
]
