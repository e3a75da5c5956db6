"""training.decode.eos_lengths: the one "length up to the first eos" for outputs decoding.generate did not make."""

from __future__ import annotations

import torch

from decoding.generate import generate
from training.decode import eos_lengths

from .tiny_models import EOS, PAD, tiny_model


def test_lengths_by_hand():
    tokens = torch.tensor([[5, 2, 2, 7], [5, 6, 7, 8], [2, 9, 9, 9]])
    lengths, terminated = eos_lengths(tokens, 2)
    assert lengths.tolist() == [2, 4, 1] and terminated.tolist() == [True, False, True]


def test_lengths_agree_with_what_generate_returns():
    model = tiny_model("gpt2", seed=3)
    prompts = torch.randint(3, 60, (6, 4), generator=torch.Generator().manual_seed(0))
    out = generate(model, prompts, torch.ones_like(prompts), max_new_tokens=12, eos_token_id=EOS, pad_token_id=PAD,
                   do_sample=True, generator=torch.Generator().manual_seed(1), return_dict_in_generate=True)
    lengths, terminated = eos_lengths(out.sequences[:, prompts.shape[1]:], EOS)
    assert torch.equal(lengths, out.lengths) and torch.equal(terminated, out.terminated)
