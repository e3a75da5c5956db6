"""training.padding.pad_rows: the one padded-batch builder."""

from __future__ import annotations

import pytest
import torch

from benchmarks.datasets import prompt_batch
from training.lm import collate_lm_batch
from training.padding import pad_rows


def test_right_and_left_padding_by_hand():
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_token_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and mask.tolist() == [[1, 1, 1], [1, 0, 0]]
    ids, mask = pad_rows([[5, 6, 7], [8]], pad_token_id=9, side="left")
    assert ids.tolist() == [[5, 6, 7], [9, 9, 8]] and mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long and ids.device.type == "cpu"


def test_bad_rows_and_sides_fail_with_the_argument_named():
    with pytest.raises(ValueError, match="rows is empty"):
        pad_rows([], pad_token_id=0)
    with pytest.raises(ValueError, match=r"rows\[1\] is empty"):
        pad_rows([[1], []], pad_token_id=0)
    with pytest.raises(ValueError, match="side must be"):
        pad_rows([[1]], pad_token_id=0, side="middle")


def test_the_batch_builders_of_both_packages_share_it():
    rows = [[4, 5], [6, 7, 8, 2]]
    prompts = prompt_batch(rows, pad_id=0)
    assert torch.equal(prompts.input_ids, pad_rows(rows, pad_token_id=0, side="left")[0])
    batch = collate_lm_batch(rows, pad_token_id=0, context_lengths=[1, 2])
    assert torch.equal(batch["input_ids"], pad_rows(rows, pad_token_id=0)[0])
    assert batch["labels"].tolist() == [[-100, 5, -100, -100], [-100, -100, 8, 2]]
