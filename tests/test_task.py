"""training.task with a decoder-only LM: the same update steps drive it against non-termination (left-padded
prompts)."""

from __future__ import annotations

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from training.parallel_text import ParallelText, encode_parallel, make_batch
from training.decode import decode
from training.losses import mle_loss, teacher_forced_logits
from training.mgs import MGSConfig, MGSStep
from training.steps import PGStep
from training.task import Seq2SeqTask
from training.tokenizer import train_tokenizer

TEXT = ParallelText(("the cat sat", "a dog ran far", "birds", "the old man and"),
                    ("on the mat .", "away from home .", "sing in the trees .", "the sea ."))


@pytest.fixture(scope="module")
def lm_setup():
    tokenizer = train_tokenizer(list(TEXT.sources + TEXT.targets) * 4, vocab_size=80, min_frequency=1)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_positions=64, n_embd=16, n_layer=1,
                                       n_head=2, bos_token_id=tokenizer.bos_token_id,
                                       eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id))
    data = encode_parallel(TEXT, tokenizer)
    batch = make_batch(data, [0, 1, 2, 3], left_pad_source=True)
    return tokenizer, model, batch


def test_left_padded_prompts(lm_setup):
    tokenizer, _, batch = lm_setup
    assert bool(batch.source_mask[:, -1].all())                 # the last column is always real
    assert batch.source_ids[2, 0].item() == tokenizer.pad_token_id


def test_decoder_only_teacher_forcing_reads_continuation_positions(lm_setup):
    tokenizer, model, batch = lm_setup
    model.eval()
    row = 1                                                      # the longest prompt: no left padding
    logits = teacher_forced_logits(model, batch.source_ids, batch.source_mask, batch.target_ids,
                                   batch.target_mask)
    full = torch.cat([batch.source_ids[row], batch.target_ids[row]])[None]
    direct = model(input_ids=full).logits[0, batch.source_ids.shape[1] - 1: -1]
    torch.testing.assert_close(logits[row], direct, atol=1e-5, rtol=1e-5)
    loss = mle_loss(model, batch.source_ids, batch.source_mask, batch.target_ids, batch.target_mask)
    assert torch.isfinite(loss)


def test_mgs_and_pg_against_nontermination(lm_setup):
    tokenizer, model, batch = lm_setup
    task = Seq2SeqTask(tokenizer, cost="nontermination", max_length_factor=1.0)
    model.eval()
    hyps = decode(model, batch.source_ids, batch.source_mask, max_new_tokens=task.max_new_tokens(batch),
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    expected = 1.0 - hyps.terminated.float().mean().item()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    logs = MGSStep(task, MGSConfig(num_candidates=2))(model, batch, optimizer)
    assert logs["cost_before"] == pytest.approx(expected)
    pg_logs = PGStep(task, num_samples=2, mle_probability=0.0)(model, batch, optimizer,
                                                               generator=torch.Generator().manual_seed(0))
    assert pg_logs["cost_samples"] in (0.0, 0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0)
