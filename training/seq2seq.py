"""Building, saving and loading the encoder-decoder models that :mod:`training` fine-tunes.

A model folder holds the transformers model and its tokenizer side by side (``save_pretrained`` of
both), so ``load_seq2seq(folder)`` restores the pair. Loading checks the architecture and raises a clear
error when the folder holds another one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (AutoConfig, AutoTokenizer, BartConfig, BartForConditionalGeneration,
                          PreTrainedModel)

__all__ = ["Seq2SeqSize", "build_seq2seq", "save_seq2seq", "load_seq2seq", "check_architecture"]


@dataclass(frozen=True)
class Seq2SeqSize:
    """Width and depth of a from-scratch BART model."""

    d_model: int = 256
    """Width of the embeddings and of every layer."""
    layers: int = 3
    """Layers of the encoder, and as many of the decoder."""
    heads: int = 4
    """Attention heads per layer."""
    ffn_dim: int = 4 * 256
    """Width of each layer's feed-forward block (four times ``d_model`` by default, as usual)."""
    dropout: float = 0.1
    """Dropout on the layers' outputs; half of it on the attention weights."""
    max_positions: int = 128
    """Longest sequence (source or target tokens) the position embeddings cover."""


def build_seq2seq(tokenizer, size: Seq2SeqSize = Seq2SeqSize(), *, seed: int = 0
                  ) -> BartForConditionalGeneration:
    """A randomly initialised BART encoder-decoder over ``tokenizer``'s vocabulary (shared embeddings).

    The decoder starts from ``<s>`` (``bos``) and ends with ``</s>`` (``eos``).
    """
    config = BartConfig(
        vocab_size=len(tokenizer), d_model=size.d_model,
        encoder_layers=size.layers, decoder_layers=size.layers,
        encoder_attention_heads=size.heads, decoder_attention_heads=size.heads,
        encoder_ffn_dim=size.ffn_dim, decoder_ffn_dim=size.ffn_dim,
        dropout=size.dropout, attention_dropout=size.dropout / 2, activation_dropout=0.0,
        max_position_embeddings=size.max_positions, scale_embedding=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.bos_token_id,
        forced_bos_token_id=None, forced_eos_token_id=None,
    )
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        model = BartForConditionalGeneration(config)
    finally:
        torch.random.set_rng_state(state)
    _clear_generation_defaults(model)
    return model


def _clear_generation_defaults(model: PreTrainedModel) -> None:
    """Drop generation defaults that would change decoding behind the caller's back."""
    config = model.generation_config
    for name in ("forced_bos_token_id", "forced_eos_token_id", "no_repeat_ngram_size", "early_stopping"):
        if hasattr(config, name):
            setattr(config, name, None)
    config.num_beams = 1
    config.max_length = model.config.max_position_embeddings


def save_seq2seq(model: PreTrainedModel, tokenizer, folder: str | Path) -> None:
    """Write model and tokenizer into ``folder`` (created if missing)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def check_architecture(folder: str | Path, *, expected: str = "bart") -> None:
    """Raise ``ValueError`` unless ``folder`` holds an encoder-decoder model of type ``expected``."""
    config = AutoConfig.from_pretrained(folder)
    if config.model_type != expected or not getattr(config, "is_encoder_decoder", False):
        raise ValueError(
            f"checkpoint {folder} holds a {config.model_type!r} model "
            f"(is_encoder_decoder={getattr(config, 'is_encoder_decoder', False)}), expected an "
            f"encoder-decoder of type {expected!r}"
        )


def load_seq2seq(folder: str | Path, *, expected: str = "bart"
                 ) -> tuple[BartForConditionalGeneration, object]:
    """Load ``(model, tokenizer)`` saved by :func:`save_seq2seq`; the architecture is checked first."""
    check_architecture(folder, expected=expected)
    model = BartForConditionalGeneration.from_pretrained(folder)
    _clear_generation_defaults(model)
    return model, AutoTokenizer.from_pretrained(folder)
