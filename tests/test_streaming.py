"""Streaming: per-row pieces and end events in every strategy and in refill mode; transformers' streamers."""

from __future__ import annotations

import threading

import pytest
import torch
from transformers import TextIteratorStreamer
from transformers.generation.streamers import BaseStreamer

from decoding.generate import generate
from decoding.interop import custom_generate
from decoding.streaming import Piece, PieceIterator
from tests.test_options_parity import char_tokenizer
from tests.tiny_models import ENCODER_DECODER, PAD, left_padded_prompts, tiny_model

MAX_NEW = 10
STRATEGIES = {
    "greedy": {},
    "sample-n2": {"do_sample": True, "top_k": 5, "num_return_sequences": 2},
    "beam3-n2": {"num_beams": 3, "num_return_sequences": 2},
    "beam-sample": {"do_sample": True, "num_beams": 2},
    "greedy-stop": {"stopping_criteria": [lambda ids, scores: ids[:, -1] % 7 == 0]},
}


def _inputs(kind: str, batch: int = 4):
    ids, mask = left_padded_prompts(seed=2, batch=batch)
    if kind in ENCODER_DECODER:
        mask = mask.flip(1)
        ids = torch.where(mask.bool(), ids.flip(1), PAD)
    return ids, mask


def check_pieces(pieces: list[Piece], out, prefix: int, cap: int = MAX_NEW) -> None:
    """Each row's pieces concatenate to its returned tokens; one end, on its last piece, with the right reason."""
    assert {p.row for p in pieces} == set(range(out.sequences.shape[0]))
    for row in range(out.sequences.shape[0]):
        mine = [p for p in pieces if p.row == row]
        length = int(out.lengths[row])
        assert [t for p in mine for t in p.tokens] == out.sequences[row, prefix:prefix + length].tolist()
        assert [p.end is not None for p in mine] == [False] * (len(mine) - 1) + [True]
        expected = "eos" if out.terminated[row] else "cap" if length == cap else "stop"
        assert mine[-1].end == expected


@pytest.mark.parametrize("limit", [None, 4])
@pytest.mark.parametrize("strategy", list(STRATEGIES))
@pytest.mark.parametrize("kind", ["llama", "bart"])
def test_pieces_rebuild_every_row(kind, strategy, limit):
    model = tiny_model(kind, eos_boost=2.5 if kind == "llama" else 0.9)
    ids, mask = _inputs(kind, batch=6)
    pieces: list[Piece] = []
    out = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, stream=pieces.append,
                   max_batch_size=limit, generator=torch.Generator().manual_seed(0), **STRATEGIES[strategy])
    check_pieces(pieces, out, 1 if kind in ENCODER_DECODER else ids.shape[1])


def test_refill_streams_rows_as_they_come_and_go():
    model = tiny_model("llama", eos_boost=2.5)
    ids, mask = _inputs("llama", batch=8)
    pieces: list[Piece] = []
    out = generate(model, ids, mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True, stream=pieces.append,
                   max_batch_size=3)
    check_pieces(pieces, out, ids.shape[1])
    assert (out.lengths < MAX_NEW).any() and (out.lengths == MAX_NEW).any()
    first_piece_of = {row: min(i for i, p in enumerate(pieces) if p.row == row) for row in range(8)}
    first_end = min(i for i, p in enumerate(pieces) if p.end)
    assert any(first_piece_of[row] > first_end for row in range(3, 8))  # admitted after another row ended


def test_piece_iterator_in_another_thread_and_custom_generate_stream():
    model = tiny_model("gpt2", eos_boost=2.5)
    ids, mask = _inputs("gpt2")
    pieces = PieceIterator(timeout=30)
    result = {}
    worker = threading.Thread(target=lambda: result.update(out=model.generate(
        ids, attention_mask=mask, max_new_tokens=MAX_NEW, return_dict_in_generate=True,
        custom_generate=custom_generate, stream=pieces)))
    worker.start()
    received = list(pieces)
    worker.join()
    check_pieces(received, result["out"], ids.shape[1])


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[torch.Tensor] = []
        self.ends = 0

    def put(self, value):
        self.puts.append(value.clone())

    def end(self):
        self.ends += 1


@pytest.mark.parametrize("options", [{}, {"do_sample": True, "top_k": 1}])
@pytest.mark.parametrize("path", ["generate", "custom_generate"])
@pytest.mark.parametrize("kind", ["gpt2", "bart"])
def test_transformers_streamer_gets_what_model_generate_gives_it(kind, path, options):
    model = tiny_model(kind, eos_boost=2.5 if kind == "gpt2" else 0.9)
    ids, mask = _inputs(kind)
    theirs, ours = _Recorder(), _Recorder()
    model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, streamer=theirs, **options)
    if path == "generate":
        generate(model, ids, mask, max_new_tokens=MAX_NEW, streamer=ours, **options)
    else:
        model.generate(ids, attention_mask=mask, max_new_tokens=MAX_NEW, streamer=ours,
                       custom_generate=custom_generate, **options)
    assert ours.ends == theirs.ends == 1
    assert len(ours.puts) == len(theirs.puts)
    assert all(torch.equal(a, b) for a, b in zip(ours.puts, theirs.puts))


def test_text_iterator_streamer_at_batch_one_through_custom_generate():
    """Regression: transformers does not pass the streamer to custom_generate; end() never came."""
    model, tokenizer = tiny_model("gpt2", eos_boost=0.5), char_tokenizer()
    ids = torch.tensor([[5, 9, 12]])
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, timeout=10)
    out = model.generate(ids, max_new_tokens=MAX_NEW, streamer=streamer, custom_generate=custom_generate)
    assert "".join(streamer) == tokenizer.decode(out[0, 3:])


def test_streamer_refusals_still_end_the_streamer():
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    for options in ({"num_beams": 2}, {"max_batch_size": 2}):
        with pytest.raises(ValueError, match="stream="):
            generate(model, ids, mask, max_new_tokens=3, streamer=_Recorder(), **options)
    recorder = _Recorder()
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, attention_mask=mask, max_new_tokens=3, num_beams=2, streamer=recorder,
                       custom_generate=custom_generate)
    assert recorder.ends == 1


def test_stream_end_comes_when_generate_fails():
    model = tiny_model("gpt2")
    ids, mask = _inputs("gpt2")
    pieces = PieceIterator(timeout=5)

    def failing(ids, scores):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        generate(model, ids, mask, max_new_tokens=3, stream=pieces, stopping_criteria=[failing])
    assert list(pieces) == []  # ends (queue.Empty after 5 s otherwise): the criterion failed before any piece
