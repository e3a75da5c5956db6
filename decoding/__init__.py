"""Consistent decoding: text generation that provably terminates.

- :func:`generate` — a drop-in for ``model.generate`` (same options and output layout) with
  ``consistent=True`` for truncation samplers that keep eos, an explicit ``generator``, and finished rows
  that stop costing compute.
- :func:`make_self_terminating` — ST / NMST output layers that make even greedy and beam search stop
  within :func:`termination_bound` tokens.
- :mod:`decoding.metrics` — non-termination ratio, lengths, repetition, perplexity, BLEU.

Layout: the decode loop (:mod:`~decoding.generate`, :mod:`~decoding.search`, :mod:`~decoding.options`,
:mod:`~decoding.transforms`) talks to models only through the step-model protocol (:mod:`~decoding.protocol`);
everything that turns a model into a step model is in :mod:`decoding.models`; the self-terminating heads'
math is :mod:`decoding.heads`.

The names below are imported when first used, so ``import decoding.protocol`` (or any one module) loads
that module alone.
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import TYPE_CHECKING, Any

# public name -> the module that defines it
_EXPORTS = {
    "GenerateOutput": ".outputs", "RecurrentLM": ".models.recurrent", "RecurrentLMConfig": ".models.recurrent",
    "SelfTerminatingLM": ".models.self_terminating", "StepModel": ".protocol", "StepModelBase": ".protocol",
    "Truncation": ".transforms", "as_step_model": ".protocol", "custom_generate": ".interop",
    "generate": ".generate", "load_self_terminating": ".models.self_terminating",
    "make_self_terminating": ".models.self_terminating", "save_self_terminating": ".models.self_terminating",
    "termination_bound": ".heads",
}
__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .generate import generate
    from .heads import termination_bound
    from .interop import custom_generate
    from .models.recurrent import RecurrentLM, RecurrentLMConfig
    from .models.self_terminating import (SelfTerminatingLM, load_self_terminating, make_self_terminating,
                                          save_self_terminating)
    from .outputs import GenerateOutput
    from .protocol import StepModel, StepModelBase, as_step_model
    from .transforms import Truncation


def __getattr__(name: str) -> Any:
    """A public name, or a submodule (``decoding.models``), imported on first use."""
    if name.startswith("_"):
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    else:
        try:
            value = importlib.import_module(f".{name}", __name__)
        except ModuleNotFoundError as error:
            if error.name != f"{__name__}.{name}":
                raise
            raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


class _Package(types.ModuleType):
    """The package keeps ``decoding.generate`` the function: importing the submodule of the same name
    (``decoding/generate.py``) would otherwise make the attribute that module."""

    def __setattr__(self, name: str, value: Any) -> None:
        if name in _EXPORTS and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
