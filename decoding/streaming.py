"""Streaming: every row's new tokens and its end, as the decode loop produces them.

Batched streaming (``generate(..., stream=...)``) hands out :class:`Piece` objects: one per running row and
step in greedy decoding and sampling, one per returned sequence when its prompt finishes in beam search
(beams are reordered until then). A row's last piece carries ``end`` ("eos", "cap": ``max_new_tokens``
reached, "stop": a stopping criterion or stop string), exactly once. Rows are the rows of the returned
``sequences`` (prompt ``i``'s ``j``-th sequence is row ``i * num_return_sequences + j``), also when
``max_batch_size`` refills the batch: pieces of different rows interleave, each row's pieces come in order.

    pieces = PieceIterator()
    Thread(target=generate, args=(model, ids, mask), kwargs=dict(stream=pieces, max_new_tokens=50)).start()
    for piece in pieces:
        print(piece.row, piece.tokens, piece.end)

A plain callable ``stream=print`` works too. transformers' own ``streamer`` protocol (``put``/``end``, e.g.
``TextStreamer``) is served by the same loop: the prompt once, then one ``[N]`` tensor per step.
"""

from __future__ import annotations

import queue
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

__all__ = ["Piece", "RowStreamer", "PieceIterator", "StreamSink", "END_REASONS"]

END_REASONS = (None, "eos", "cap", "stop")  # the loop's end codes 0..3


@dataclass(frozen=True)
class Piece:
    """New tokens of one row of the output."""

    row: int                    # row of the returned sequences
    tokens: tuple[int, ...]     # the row's next tokens, in order
    end: str | None = None      # None: the row goes on; "eos" | "cap" | "stop": these were its last tokens


class RowStreamer:
    """Receives pieces as they are generated (subclass it, or pass a plain callable as ``stream``)."""

    def put(self, piece: Piece) -> None:
        raise NotImplementedError

    def end(self) -> None:
        """Decoding is over (every row ended, or the call failed)."""


class PieceIterator(RowStreamer):
    """Pieces as an iterator, for a consumer in another thread than ``generate`` (like transformers'
    ``TextIteratorStreamer``). Iteration stops at ``end()``; ``timeout`` seconds without a piece raise
    ``queue.Empty``."""

    def __init__(self, *, timeout: float | None = None) -> None:
        self._queue: queue.Queue[Piece | None] = queue.Queue()
        self.timeout = timeout

    def put(self, piece: Piece) -> None:
        self._queue.put(piece)

    def end(self) -> None:
        self._queue.put(None)

    def __iter__(self) -> Iterator[Piece]:
        while (piece := self._queue.get(timeout=self.timeout)) is not None:
            yield piece


class _CallbackStreamer(RowStreamer):
    def __init__(self, callback: Callable[[Piece], Any]) -> None:
        self.callback = callback

    def put(self, piece: Piece) -> None:
        self.callback(piece)


class StreamSink:
    """Where the decode loops report tokens: fans them out to a :class:`RowStreamer` and/or a transformers
    streamer (``put``/``end``). ``offset`` shifts rows (a chunk of a larger call)."""

    def __init__(self, *, rows: RowStreamer | Callable[[Piece], Any] | None = None, streamer: Any = None,
                 n_rows: int = 0, pad_token_id: int = 0, offset: int = 0) -> None:
        if rows is not None and not isinstance(rows, RowStreamer):
            if not callable(rows):
                raise TypeError(f"stream must be a RowStreamer or a callable taking a Piece, got {rows!r}")
            rows = _CallbackStreamer(rows)
        if streamer is not None and not (callable(getattr(streamer, "put", None))
                                         and callable(getattr(streamer, "end", None))):
            raise TypeError(f"streamer must have put() and end() (transformers' BaseStreamer), got {streamer!r}")
        self.rows, self.streamer = rows, streamer
        self.n_rows, self.pad_token_id, self.offset = n_rows, pad_token_id, offset

    def shifted(self, offset: int) -> "StreamSink":
        """The same destinations, rows counted from ``offset``."""
        return StreamSink(rows=self.rows, streamer=self.streamer, n_rows=self.n_rows,
                          pad_token_id=self.pad_token_id, offset=offset)

    def prompt(self, prefix: torch.LongTensor) -> None:
        """``[N, P]`` the rows' prefix, to a transformers streamer (it gets the prompt first)."""
        if self.streamer is not None:
            self.streamer.put(prefix.cpu())

    def step(self, rows: torch.LongTensor, tokens: torch.LongTensor, ends: torch.LongTensor) -> None:
        """One token for each of ``rows [n]``: ``tokens [n]``, ``ends [n]`` codes (0 running, 1 eos, 2 cap,
        3 stop). A transformers streamer gets an ``[N]`` tensor, pad for rows not in ``rows``."""
        if self.streamer is not None:
            full = torch.full((self.n_rows,), self.pad_token_id, dtype=tokens.dtype, device=tokens.device)
            self.streamer.put(full.index_copy(0, rows + self.offset, tokens).cpu())
        if self.rows is not None:
            for row, token, end in zip(*torch.stack([rows, tokens, ends]).tolist()):
                self.rows.put(Piece(row + self.offset, (token,), END_REASONS[end]))

    def finished(self, rows: Sequence[int], tokens: Sequence[Sequence[int]], ends: Sequence[int]) -> None:
        """Whole sequences that ended (beam search): their tokens and end codes."""
        if self.rows is not None:
            for row, row_tokens, end in zip(rows, tokens, ends):
                self.rows.put(Piece(row + self.offset, tuple(row_tokens), END_REASONS[end]))

    def end(self) -> None:
        for destination in (self.rows, self.streamer):
            if destination is not None:
                destination.end()
