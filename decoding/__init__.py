"""Consistent decoding: text generation that provably terminates."""

from .protocol import StepModel, as_step_model

__all__ = ["StepModel", "as_step_model"]
