"""training.loop.run_loop, the loop every trainer runs: hook order, skipped batches, stop reasons, resume."""

from __future__ import annotations

import pytest
import torch

from training.loop import LoopPosition, gradient_step, run_loop


def _run(position: LoopPosition, calls: list, *, updates: int, epochs: int) -> str:
    def epoch_items(epoch: int) -> list[str]:
        calls.append(f"epoch {epoch}")
        return [f"{epoch}.{index}" for index in range(3)]

    def update(item: str) -> dict[str, float] | None:
        calls.append(item)
        return None if item.endswith(".1") else {"n": 1.0}  # batch 1 of every epoch is skipped

    return run_loop(
        position, epoch_items=epoch_items, update=update,
        after_update=lambda logs: "updates" if position.updates >= updates else None,
        end_epoch=lambda: calls.append(f"end {position.epoch}") and None,
        stop=lambda: "epochs" if position.epoch >= epochs else None,
    )  # fmt: skip


def test_hooks_run_in_order_and_skipped_batches_are_not_updates():
    calls: list[str] = []
    position = LoopPosition()
    assert _run(position, calls, updates=100, epochs=2) == "epochs"
    assert calls == ["epoch 0", "0.0", "0.1", "0.2", "end 1", "epoch 1", "1.0", "1.1", "1.2", "end 2"]
    assert (position.updates, position.epoch, position.batch_index) == (4, 2, 0)
    assert position.train_seconds >= 0 and position.train_cpu_seconds >= 0


def test_a_stopped_run_resumes_where_it_stopped():
    calls: list[str] = []
    position = LoopPosition()
    assert _run(position, calls, updates=2, epochs=5) == "updates"
    assert calls[-1] == "0.2" and (position.epoch, position.batch_index) == (0, 3)
    calls.clear()
    assert _run(position, calls, updates=3, epochs=5) == "updates"
    assert calls == ["epoch 0", "end 1", "epoch 1", "1.0"]


def test_stop_is_asked_before_the_first_update():
    calls: list[str] = []
    assert _run(LoopPosition(epoch=5), calls, updates=100, epochs=5) == "epochs" and calls == []


def test_gradient_step_clips_then_steps():
    weight = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
    optimizer = torch.optim.SGD([weight], lr=1.0)
    norm = gradient_step((weight ** 2).sum() / 2, optimizer, parameters=[weight], clip=1.0)
    assert norm == pytest.approx(5.0)
    assert weight.detach().tolist() == pytest.approx([3.0 - 0.6, 4.0 - 0.8])
    assert gradient_step((weight ** 2).sum(), optimizer, parameters=[weight], clip=None) is None
