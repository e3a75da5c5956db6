"""Decoding inside training loops, through the library's ``decoding.generate``.

:func:`decode` returns only the generated part of each output row (:class:`Hypotheses`): the tokens, how
many there are (eos included) and whether the row ended with eos before the length cap. The ``generate``
callable is injectable (``generate_fn``) so tests and experiments can swap the decoder; the default is
:func:`decoding.generate`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Literal

import torch

__all__ = ["Hypotheses", "GenerateFn", "decode", "default_generate", "eos_lengths"]

GenerateFn = Callable[..., Any]
Strategy = Literal["greedy", "sample", "beam"]


@dataclass(frozen=True)
class Hypotheses:
    """Generated continuations, ``N`` rows.

    Attributes:
        tokens: ``[N, L]`` generated tokens; after eos (or the length cap) rows hold padding.
        lengths: ``[N]`` generated tokens per row, eos included.
        terminated: ``[N]`` True where the row emitted eos within the cap.
    """

    tokens: torch.LongTensor
    lengths: torch.LongTensor
    terminated: torch.BoolTensor

    @property
    def mask(self) -> torch.Tensor:
        """``[N, L]`` float, 1 on generated tokens (eos included), 0 on padding."""
        positions = torch.arange(self.tokens.shape[1], device=self.tokens.device)
        return (positions[None, :] < self.lengths[:, None]).float()


def default_generate() -> GenerateFn:
    """The library decoder, :func:`decoding.generate`."""
    from decoding.generate import generate  # local import: keeps `import training` light

    return generate


def _generated_part(model: torch.nn.Module, sequences: torch.LongTensor, prompt_width: int
                    ) -> torch.LongTensor:
    if getattr(model.config, "is_encoder_decoder", False):
        return sequences[:, 1:]                       # drop the decoder start token
    return sequences[:, prompt_width:]


def eos_lengths(tokens: torch.LongTensor, eos_token_id: int) -> tuple[torch.LongTensor, torch.BoolTensor]:
    """Length of each row up to its first eos, and whether it has one.

    For the output of a model that :func:`decoding.generate` did not produce (``model.generate``, a hand
    loop), or a batch of reference rows; ``decoding.generate`` returns both as ``lengths`` and ``terminated``.

    Args:
        tokens: ``[N, L]`` generated tokens (no prompt); what follows a row's first eos is ignored.

    Returns:
        ``lengths [N]``: tokens up to and including the first eos, ``L`` for a row without eos;
        ``terminated [N]``: the row holds an eos.
    """
    is_eos = tokens.eq(eos_token_id)  # [N, L]
    terminated = is_eos.any(dim=1)
    first = torch.where(terminated, is_eos.float().argmax(dim=1) + 1,
                        torch.full_like(terminated, tokens.shape[1], dtype=torch.long))
    return first.long(), terminated


def decode(model: torch.nn.Module, input_ids: torch.LongTensor, attention_mask: torch.LongTensor, *,
           max_new_tokens: int, strategy: Strategy = "greedy", num_return_sequences: int = 1,
           num_beams: int = 4, eos_token_id: int, pad_token_id: int,
           generator: torch.Generator | None = None, generate_fn: GenerateFn | None = None,
           prompt_share: tuple[int, int] | None = None) -> Hypotheses:
    """Decode a batch and return its :class:`Hypotheses` (``N = B * num_return_sequences`` rows).

    Args:
        input_ids: ``[B, S]`` encoder input (encoder-decoder) or left-padded prompt (decoder-only).
        attention_mask: ``[B, S]``.
        max_new_tokens: length cap; rows that reach it without eos are non-terminated.
        strategy: ``"greedy"``, ``"sample"`` (ancestral sampling) or ``"beam"`` (``num_beams`` beams).
        generator: random source for sampling.
        generate_fn: a drop-in for ``model.generate`` taking the model as first argument; default
            :func:`decoding.generate`.
        prompt_share: ``(first_row, whole_rows)`` when these rows are a share of a larger batch (sampling
            only): each row samples what it samples in the whole batch (``decoding.generate``'s option).
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if strategy not in ("greedy", "sample", "beam"):
        raise ValueError(f"strategy must be 'greedy', 'sample' or 'beam', got {strategy!r}")
    generate = generate_fn if generate_fn is not None else default_generate()
    options: dict[str, Any] = dict(
        max_new_tokens=max_new_tokens, do_sample=strategy == "sample",
        num_beams=num_beams if strategy == "beam" else 1, num_return_sequences=num_return_sequences,
        eos_token_id=eos_token_id, pad_token_id=pad_token_id, return_dict_in_generate=True,
    )
    if strategy == "sample":
        options.update(top_k=0, top_p=1.0, temperature=1.0, generator=generator)
        if prompt_share is not None:
            options["prompt_share"] = tuple(prompt_share)
    with torch.no_grad():
        output = generate(model, input_ids, attention_mask=attention_mask, **options)
    sequences = output.sequences if hasattr(output, "sequences") else output
    tokens = _generated_part(model, sequences, input_ids.shape[1])
    lengths, terminated = eos_lengths(tokens, eos_token_id)
    positions = torch.arange(tokens.shape[1], device=tokens.device)  # [L]
    tokens = tokens.masked_fill(positions[None, :] >= lengths[:, None], pad_token_id)
    return Hypotheses(tokens=tokens, lengths=lengths, terminated=terminated)
