"""Tiny transformers models with random weights, built from configs (nothing is downloaded)."""

from __future__ import annotations

import zlib

import torch
from transformers import (BartConfig, BartForConditionalGeneration, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                          LlamaForCausalLM, T5Config, T5ForConditionalGeneration)

from benchmarks.smollm2 import SmolData

VOCAB = 64
EOS, PAD = 1, 2
DECODER_ONLY = ("gpt2", "llama")
ENCODER_DECODER = ("bart", "t5")


def tiny_model(kind: str, *, seed: int = 0, eos_boost: float = 3.0) -> torch.nn.Module:
    """A 2-layer model of ``kind`` in eval mode; ``eos_boost`` scales the eos row of the output layer so
    that eos is the argmax in some contexts and not in others (rows finish at different steps)."""
    torch.manual_seed(seed)
    if kind == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                           bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD))
    elif kind == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=256, bos_token_id=0, eos_token_id=EOS,
                                             pad_token_id=PAD, tie_word_embeddings=False))
    elif kind == "bart":
        model = BartForConditionalGeneration(BartConfig(
            vocab_size=VOCAB, d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=2,
            decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=256,
            bos_token_id=0, eos_token_id=EOS, pad_token_id=PAD, decoder_start_token_id=EOS,
            forced_eos_token_id=EOS))
    elif kind == "t5":
        model = T5ForConditionalGeneration(T5Config(
            vocab_size=VOCAB, d_model=32, d_kv=16, d_ff=64, num_layers=2, num_heads=2, eos_token_id=EOS,
            pad_token_id=0, decoder_start_token_id=0))
    else:
        raise ValueError(kind)
    with torch.no_grad():
        model.get_output_embeddings().weight[EOS] *= eos_boost
    return model.eval()


def left_padded_prompts(*, seed: int = 0, batch: int = 4, length: int = 7, pad: int = PAD):
    """``(input_ids, attention_mask)`` with different prompt lengths, left-padded; tokens avoid eos/pad."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, length), generator=g)
    mask = torch.ones_like(ids)
    for row in range(batch):
        n_pad = row % 3
        ids[row, :n_pad] = pad
        mask[row, :n_pad] = 0
    return ids, mask


def after_eos_as_pad(sequences: torch.LongTensor, prefix_len: int, pad: int, eos: int = EOS) -> torch.LongTensor:
    """Set every generated position after a row's first eos to ``pad`` (transformers' beam search fills
    with eos instead of pad when ``pad_token_id == 0``)."""
    generated = sequences[:, prefix_len:]
    seen = (generated == eos).long().cumsum(dim=1)
    after = (seen - (generated == eos).long()) > 0
    out = sequences.clone()
    out[:, prefix_len:] = generated.masked_fill(after, pad)
    return out


class WordTokenizer:
    """Stands in for a real tokenizer on WikiText lines: one id in ``[3, 64)`` per word, by crc32."""

    eos_token_id = 2

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        del add_special_tokens
        return {"input_ids": [3 + zlib.crc32(word.encode()) % 61 for word in text.split()]}


def tiny_smollm2(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"
                 ) -> tuple[LlamaForCausalLM, WordTokenizer]:  # fmt: skip
    """``(model, tokenizer)`` standing in for :func:`benchmarks.smollm2.load_smollm2` (same arguments): a
    2-layer Llama with tied embeddings whose eos is 2, as SmolLM2's."""
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512, bos_token_id=0,
                         eos_token_id=2, pad_token_id=2, tie_word_embeddings=True)
    config._attn_implementation = "sdpa"
    return LlamaForCausalLM(config).to(device=device, dtype=dtype).eval(), WordTokenizer()


def tiny_smol_data() -> SmolData:
    """Random lines for :func:`tiny_smollm2` (token ids 3..63, each ending in eos 2), batched by a bench with
    ``batch_tokens=128`` into 1 to 6 rows: the longest line is a batch of its own."""
    generator = torch.Generator().manual_seed(7)

    def lines(lengths: list[int]) -> list[list[int]]:
        return [torch.randint(3, 64, (n - 1,), generator=generator).tolist() + [2] for n in lengths]

    return SmolData(train=lines([12, 15, 18, 20, 22, 25, 28, 30, 33, 36, 40, 90]),
                    evaluation=lines([14, 19, 24, 31, 38, 70]),
                    prompts=torch.randint(3, 64, (5, 10), generator=generator), reference_lengths=[4, 7, 9, 12, 5])
