"""When has training converged? A plateau rule on the validation curve.

:class:`PlateauRule` looks at the validations so far (``TrainResult.history``: dicts with ``update`` and
``score``, higher is better) and says that training has plateaued when the best score of the last
``window_share`` of training beats the best score before that window by no more than ``min_gain``.
:func:`training.loop.train` takes it as ``stop_rule`` and then stops with reason ``"plateau"``.

Example: validations every 400 updates scoring 20, 28, 31, 32.0, 32.8 (the last at update 2,000): the
last fifth is updates 1,601-2,000, whose best (32.8) beats the best before it (32.0) by 0.8 > 0.3: not
yet. With 32.9 at 2,400 the window (1,921-2,400) holds 32.8 and 32.9, still 0.9 over 32.0; with 33.0 at
2,800 the window (2,241-2,800) gains 0.2 over 32.8: plateaued.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

__all__ = ["PlateauRule"]


@dataclass(frozen=True)
class PlateauRule:
    """Stop when the last ``window_share`` of training gained at most ``min_gain`` over the best before.

    Attributes:
        window_share: the share of updates, counted back from the last validation, that must show a gain;
            in ``(0, 1)``.
        min_gain: a gain of the window's best score over the earlier best above this is progress; >= 0.
        min_validations: never plateaued before this many validations (early curves are noisy); >= 2.
    """

    window_share: float = 0.2
    min_gain: float = 0.3
    min_validations: int = 5

    def __post_init__(self) -> None:
        if not 0.0 < self.window_share < 1.0:
            raise ValueError(f"window_share must be in (0, 1), got {self.window_share}")
        if not self.min_gain >= 0.0:
            raise ValueError(f"min_gain must be >= 0, got {self.min_gain}")
        if not (isinstance(self.min_validations, int) and self.min_validations >= 2):
            raise ValueError(f"min_validations must be an integer >= 2, got {self.min_validations!r}")

    def gain(self, history: Sequence[dict[str, float]]) -> float | None:
        """Best score in the window minus the best score before it; None while either side is empty."""
        if not history:
            return None
        window_start = (1.0 - self.window_share) * history[-1]["update"]
        before = [h["score"] for h in history if h["update"] <= window_start]
        window = [h["score"] for h in history if h["update"] > window_start]
        if not before or not window:
            return None
        return max(window) - max(before)

    def __call__(self, history: Sequence[dict[str, float]]) -> bool:
        """Whether training has plateaued given the validations in ``history`` (in update order)."""
        if len(history) < self.min_validations:
            return False
        gain = self.gain(history)
        return gain is not None and gain <= self.min_gain
