"""A KV-cache layer that writes new keys and values into reserved storage instead of concatenating.

transformers' ``DynamicLayer`` grows by ``torch.cat`` at every step, so step t copies the whole cache:
decoding L tokens moves O(L^2) bytes, and on a long decode that copy, not the model, is most of a step on
a CPU (80% of a SmolLM2-135M step at batch 16 with 700 cached tokens, torch profiler). :class:`ReservedLayer` holds each layer's keys and values
in a buffer with room for the tokens still to come and hands attention a view of the filled part: one
write per step. The values handed to attention are the same numbers in the same order, so the logits are
bit-identical to the concatenating cache (the parity tests check tokens against ``model.generate``).

Pages of the buffer that are never written are never touched, so a reservation that is not used costs
address space, not resident memory.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import DynamicLayer

__all__ = ["ReservedLayer", "reserve_cache", "merge_caches", "mergeable"]

_MIN_GROWTH = 64  # tokens added when a write overruns the reservation (then half the length, amortised O(1))

# Every layer of a cache is reordered by the same index tensor: the rows it moves are found once (one host
# sync per reorder, not one per layer). Holding the tensor keeps its identity from being reused.
_last_moves: tuple[torch.Tensor, int, torch.Tensor, torch.Tensor] | None = None


def _row_moves(index: torch.LongTensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(moved, sources)``: the positions ``i`` with ``index[i] != i`` and ``index`` at them."""
    global _last_moves
    cached = _last_moves
    if cached is not None and cached[0] is index and cached[1] == index._version:
        return cached[2], cached[3]
    moved = (index != torch.arange(index.numel(), device=index.device)).nonzero().flatten()
    sources = index.index_select(0, moved)
    _last_moves = (index, index._version, moved, sources)
    return moved, sources


class _ReservedBuffers:
    """The storage of a :class:`ReservedLayer`: keys and values live in ``[rows, H, capacity, D]`` buffers,
    ``keys``/``values`` are views of the filled part ``[: self.rows, :, : self.length]``, and rows and columns
    are moved inside the buffers (reordered, appended right-aligned, shifted left) instead of reallocated."""

    _key_buffer: torch.Tensor | None
    _value_buffer: torch.Tensor | None
    keys: torch.Tensor | None
    values: torch.Tensor | None
    length: int  # filled columns
    rows: int    # rows in use: the first ``rows`` of the buffers (dropping rows keeps the buffers)
    reserve: int

    def _set_views(self) -> None:
        self.keys = self._key_buffer[: self.rows, :, : self.length]
        self.values = self._value_buffer[: self.rows, :, : self.length]

    def _allocate(self, key_states: torch.Tensor, value_states: torch.Tensor, *, capacity: int) -> None:
        """The first buffers: the rows of ``key_states``/``value_states`` ``[B, H, n, D]``, ``capacity`` columns."""
        batch, heads, _, dim = key_states.shape
        self._key_buffer = key_states.new_empty((batch, heads, capacity, dim))
        self._value_buffer = value_states.new_empty((batch, value_states.shape[1], capacity, value_states.shape[3]))
        self.rows = batch

    def _reallocate(self, capacity: int, index: torch.LongTensor | None = None) -> None:
        """New buffers of ``capacity`` positions holding the filled part (rows ``index`` only, when given)."""
        old_keys, old_values = self.keys, self.values  # the filled part, [rows, H, n, D]
        rows = self.rows if index is None else index.numel()
        keys = old_keys.new_empty((rows, old_keys.shape[1], capacity, old_keys.shape[3]))
        values = old_values.new_empty((rows, old_values.shape[1], capacity, old_values.shape[3]))
        n = self.length
        if index is None:
            keys[:, :, :n].copy_(old_keys)
            values[:, :, :n].copy_(old_values)
        else:
            torch.index_select(old_keys, 0, index, out=keys[:, :, :n])
            torch.index_select(old_values, 0, index, out=values[:, :, :n])
        self._key_buffer, self._value_buffer, self.rows = keys, values, rows
        self._set_views()

    def _select_rows(self, index: torch.LongTensor) -> None:
        """Row ``i`` becomes row ``index[i]``, in place when there are no more rows than the buffers hold.

        Only the rows that change are copied (read first, then written, so overlapping sources are safe):
        a beam reorder that keeps most beams where they are, or dropping finished rows near the end of the
        batch, moves a few rows instead of the whole cache, and nothing is reallocated.
        """
        index = index.to(self._key_buffer.device)
        if index.numel() > self._key_buffer.shape[0]:
            self._reallocate(self._key_buffer.shape[2], index)
            return
        moved, sources = _row_moves(index)
        if moved.numel() > 0:
            for buffer, filled in ((self._key_buffer, self.keys), (self._value_buffer, self.values)):
                buffer[:, :, : self.length].index_copy_(0, moved, filled.index_select(0, sources))
        self.rows = index.numel()
        self._set_views()

    def append_rows(self, other: DynamicLayer, width: int) -> None:
        """Put the rows of ``other`` after this layer's rows, every row right-aligned to ``width`` columns.

        Columns left of a shorter row's own ones hold zero keys and values: positions the attention mask
        must hide (zeros, not stale memory, so a hidden position can never bring a NaN into attention).
        Writes in place when the buffers have the rows and columns; continuous batching admits new prompts
        into the rows finished ones left, so they usually do.
        """
        keys, values = other.keys, other.values  # [add, H, n_other, D]
        add, n_other = keys.shape[0], keys.shape[-2]
        if width < max(self.length, n_other):
            raise ValueError(f"width {width} is shorter than the rows it aligns ({self.length}, {n_other})")
        if (self.length != width or self.rows + add > self._key_buffer.shape[0]
                or width > self._key_buffer.shape[2]):
            self._realign(self.rows + add, width)
        for buffer, new in ((self._key_buffer, keys), (self._value_buffer, values)):
            buffer[self.rows: self.rows + add, :, : width - n_other].zero_()
            buffer[self.rows: self.rows + add, :, width - n_other: width].copy_(new)
        self.rows += add
        self._set_views()

    def _realign(self, rows: int, width: int) -> None:
        """New buffers with room for ``rows`` rows and ``width`` columns plus the reservation, this layer's
        rows right-aligned to ``width`` (zeros on their left)."""
        old_keys, old_values, shift = self.keys, self.values, width - self.length
        capacity = max(self._key_buffer.shape[2], width + self.reserve)
        rows = max(rows, self._key_buffer.shape[0])
        for name, old in (("_key_buffer", old_keys), ("_value_buffer", old_values)):
            buffer = old.new_empty((rows, old.shape[1], capacity, old.shape[3]))
            buffer[: self.rows, :, :shift].zero_()
            buffer[: self.rows, :, shift:width].copy_(old)
            setattr(self, name, buffer)
        self.length = width
        self._set_views()

    def drop_leading(self, count: int) -> None:
        """Forget the first ``count`` columns (ones every row's attention mask hides), shifting the rest left
        in place, ``count`` columns per copy so that no copy reads what it writes."""
        if not 0 <= count <= self.length:
            raise ValueError(f"count must be in [0, {self.length}], got {count}")
        if count == 0:
            return
        for buffer in (self._key_buffer, self._value_buffer):
            for start in range(count, self.length, count):
                end = min(start + count, self.length)
                buffer[: self.rows, :, start - count: end - count].copy_(buffer[: self.rows, :, start:end])
        self.length -= count
        self._set_views()

class ReservedLayer(_ReservedBuffers, DynamicLayer):
    """One attention layer's cache: ``keys``/``values`` are ``[B, H, n, D]`` views of ``[B, H, capacity, D]``
    buffers; ``update`` writes the new positions in place and grows the buffer only on overrun. The rest of
    transformers' layer interface (reorder, select, repeat, crop, reset) works on the same buffers."""

    def __init__(self, reserve: int = 0) -> None:
        super().__init__()
        self.reserve = reserve
        self.length = 0
        self.rows = 0  # rows in use: the first ``rows`` of the buffers (dropping rows keeps the buffers)
        self._key_buffer: torch.Tensor | None = None
        self._value_buffer: torch.Tensor | None = None

    @classmethod
    def adopt(cls, layer: DynamicLayer, reserve: int) -> "ReservedLayer":
        """A reserved copy of a filled ``DynamicLayer`` with room for ``reserve`` more tokens."""
        adopted = cls(reserve)
        if layer.is_initialized and layer.get_seq_length() > 0:
            adopted.update(layer.keys, layer.values)
        return adopted

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any,
               **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        start, new = self.length, key_states.shape[-2]
        end = start + new
        if self._key_buffer is None:
            self._allocate(key_states, value_states, capacity=end + self.reserve)
        elif end > self._key_buffer.shape[2]:
            self._reallocate(end + max(_MIN_GROWTH, end // 2))
        if key_states.shape[0] != self.rows:
            raise ValueError(f"key_states has {key_states.shape[0]} rows, the cache {self.rows}")
        self._key_buffer[: self.rows, :, start:end].copy_(key_states)
        self._value_buffer[: self.rows, :, start:end].copy_(value_states)
        self.length = end
        self._set_views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.length > 0:
            self._select_rows(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        if self.length > 0:
            indices = indices.to(self._key_buffer.device)
            if indices.dtype == torch.bool:
                indices = indices.nonzero().flatten()
            self._select_rows(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.length > 0:
            rows = torch.arange(self.rows, device=self._key_buffer.device)
            self._reallocate(self._key_buffer.shape[2], rows.repeat_interleave(repeats))

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop: tokens_to_remove must be <= 0 (tokens to drop, negated), got {tokens_to_remove}")
        if tokens_to_remove < 0 and self.length > 0:
            self.length = max(0, self.length + tokens_to_remove)
            self._set_views()

    def reset(self) -> None:
        self.length = self.rows = 0
        self._key_buffer = self._value_buffer = None
        self.keys = self.values = None
        self.is_initialized = False

    def offload(self) -> None:
        raise NotImplementedError("ReservedLayer does not support cache offloading")

    def prefetch(self) -> None:
        raise NotImplementedError("ReservedLayer does not support cache offloading")


def reserve_cache(cache: Any, reserve: int) -> Any:
    """Swap every plain ``DynamicLayer`` of a transformers ``Cache`` (the self-attention part of an
    ``EncoderDecoderCache``) for a :class:`ReservedLayer` with room for ``reserve`` more tokens, in place.

    Other layer kinds (sliding-window, static, quantised, linear-attention) and legacy tuple caches are
    left as they are. Returns ``cache``.
    """
    if reserve < 0:
        raise ValueError(f"reserve must be >= 0, got {reserve}")
    target = getattr(cache, "self_attention_cache", cache)
    layers = getattr(target, "layers", None)
    if not isinstance(layers, list):
        return cache
    for i, layer in enumerate(layers):
        if type(layer) is DynamicLayer:
            layers[i] = ReservedLayer.adopt(layer, reserve)
    return cache


def mergeable(cache: Any) -> bool:
    """Whether :func:`merge_caches` can take ``cache``: every layer a :class:`ReservedLayer`."""
    layers = getattr(cache, "layers", None)
    return isinstance(layers, list) and all(isinstance(layer, ReservedLayer) for layer in layers)


def merge_caches(cache: Any, other: Any, *, width: int, drop: int = 0) -> Any:
    """The rows of ``other`` appended to ``cache`` (in place), every row right-aligned to ``width`` columns,
    then the first ``drop`` columns (hidden from every row) forgotten. Returns ``cache``.

    Both must be transformers caches whose layers are all :class:`ReservedLayer` (what :func:`reserve_cache`
    makes of plain ``DynamicLayer`` caches); sliding-window and other layer kinds cannot be realigned.
    """
    layers, other_layers = getattr(cache, "layers", None), getattr(other, "layers", None)
    if not (mergeable(cache) and mergeable(other)) or len(layers) != len(other_layers):
        kinds = sorted({type(layer).__name__ for layer in (layers or []) + (other_layers or [])})
        raise NotImplementedError(f"merging rows needs two caches of the same number of ReservedLayer layers, got "
                                  f"{type(cache).__name__} and {type(other).__name__} with layers {kinds}")
    for layer, incoming in zip(layers, other_layers):
        layer.append_rows(incoming, width)
        layer.drop_leading(drop)
    return cache
