"""training.distributed and its users under two gloo processes: sharded cells equal one process's, MLE with
DistributedDataParallel equals one process on the whole batch, checkpoints resume under another number of
processes, and the non-termination benchmark resumes a one-process cache with two processes (and back)
without recomputing a cell."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from benchmarks.nontermination_cells import DECODERS, cell_units, decode_cell
from decoding.models import lstm_lm
from training.distributed import Ranks, all_sum, current_ranks, gather, shard
from training.lm import collate_lm_batch, train_lm

from .processes import run_in_processes

EOS, PAD, VOCAB = 2, 0, 12
CELL_DECODERS = ("greedy", "beam-2", "ancestral", "nucleus-0.4", "consistent-top-k-2")


# ------------------------------------------------------------------------------- a group of one
def test_a_group_of_one_without_torchrun() -> None:
    ranks = current_ranks()
    assert ranks == Ranks(0, 1) and ranks.main and not ranks.distributed
    assert gather({"a": 1}, ranks) == [{"a": 1}]
    assert all_sum([1.5, 2], ranks) == [1.5, 2.0]
    assert shard(list(range(7)), Ranks(1, 3)) == [1, 4]


@pytest.mark.parametrize("sampled", [False, True])
@pytest.mark.parametrize("prompts", [1, 5, 9])
def test_cell_units_cover_every_prompt_once_under_any_size(sampled: bool, prompts: int) -> None:
    chunks = {size: [unit for rank in range(size)
                     for unit in cell_units(prompts, sampled=sampled, batch_size=2, ranks=Ranks(rank, size))]
              for size in (1, 2, 3)}  # fmt: skip
    for size, units in chunks.items():
        covered = sorted(i for first, stop in units for i in range(first, stop))
        assert covered == list(range(prompts)), size
    if sampled:  # the same chunks (hence the same seeds) whatever the number of processes
        assert sorted(chunks[1]) == sorted(chunks[2]) == sorted(chunks[3])


# ------------------------------------------------------------------------------- sharded cells
def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return lstm_lm(VOCAB, eos_token_id=EOS, pad_token_id=PAD, hidden_size=8, dropout=0.0).eval()


def _prompts() -> torch.Tensor:
    return torch.randint(3, VOCAB, (7, 3), generator=torch.Generator().manual_seed(1))


def _cells() -> dict[str, dict]:
    out = {}
    for name in CELL_DECODERS:
        cell = decode_cell(_model(), _prompts(), model_name="tiny", decoder=DECODERS[name], eos_token_id=EOS,
                           pad_token_id=PAD, max_new_tokens=9, reference_lengths=[3] * 7, sample_sets=2, seed=5,
                           batch_size=3, progress=False)  # fmt: skip
        out[name] = {k: v for k, v in asdict(cell).items() if k != "seconds"}
    return out


def _cells_in_process(rank: int, out: str) -> None:
    cells = _cells()
    if rank == 0:
        Path(out).write_text(json.dumps(cells))


def test_two_processes_decode_the_same_cells_as_one(tmp_path: Path) -> None:
    alone = _cells()
    assert any(cell["nontermination"] != [0.0] for cell in alone.values())  # the cells are not trivial
    run_in_processes(_cells_in_process, 2, str(tmp_path / "cells.json"))
    assert json.loads((tmp_path / "cells.json").read_text()) == json.loads(json.dumps(alone))


# ------------------------------------------------------------------------------- MLE under DDP
def _batches(rows: int) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(2)
    batches = []
    for _ in range(3):
        sequences = [torch.randint(3, VOCAB, (int(n),), generator=generator).tolist() + [EOS]
                     for n in torch.randint(2, 7, (rows,), generator=generator)]  # fmt: skip
        batches.append(collate_lm_batch(sequences, pad_token_id=PAD, context_lengths=[1] * rows))
    return batches


def _train(epochs: int, checkpoint_dir: str | None) -> dict[str, torch.Tensor]:
    model = _model().train()
    batches = _batches(6)
    train_lm(model, batches, batches[:1], epochs=epochs, lr=1e-2, patience=5, checkpoint_dir=checkpoint_dir,
             progress=False, seed=4)  # fmt: skip
    return model.state_dict()


def _train_in_process(rank: int, epochs: int, checkpoint_dir: str | None, out: str) -> None:
    state = _train(epochs, checkpoint_dir)
    if rank == 0:
        torch.save(state, out)


def _assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-4, atol=1e-5, msg=name)  # Adam amplifies rounding


def test_two_process_mle_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    alone = _train(2, None)
    assert not torch.equal(alone["output.bias"], _model().state_dict()["output.bias"])  # it trained
    run_in_processes(_train_in_process, 2, 2, None, str(tmp_path / "two.pt"))
    _assert_same_weights(torch.load(tmp_path / "two.pt"), alone)


def test_a_checkpoint_resumes_under_another_number_of_processes(tmp_path: Path) -> None:
    alone = _train(3, None)
    run_in_processes(_train_in_process, 2, 1, str(tmp_path / "ckpt"), str(tmp_path / "first.pt"))
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["best.pt", "last.pt"]  # rank 0 wrote once
    _train(2, str(tmp_path / "ckpt"))  # one process: epoch 2
    run_in_processes(_train_in_process, 2, 3, str(tmp_path / "ckpt"), str(tmp_path / "last.pt"))  # two: epoch 3
    last = torch.load(tmp_path / "ckpt" / "last.pt", weights_only=True)
    assert last["epoch"] == 3
    _assert_same_weights(last["model"], alone)


# ------------------------------------------------------------------------------- the benchmark
DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2" / "test.txt").is_file(), reason="WikiText-2 not found")


def _benchmark(cache: Path, out: Path, decoders: str) -> None:
    from benchmarks import nontermination as nt

    from .test_nontermination import TINY

    nt.main(["--data-dir", str(DATA), "--out", str(out), "--cache-dir", str(cache), "--models",
             "rnn-vanilla,rnn-st-1e-1", "--decoders", decoders, "--no-progress", "--seed", "3"],
            settings=replace(TINY, smollm2=False))  # fmt: skip


def _benchmark_in_process(rank: int, cache: str, out: str, decoders: str) -> None:
    _benchmark(Path(cache), Path(out), decoders)


def _cell_files(cache: Path) -> dict[str, tuple[float, dict]]:
    return {path.name: (path.stat().st_mtime_ns, {k: v for k, v in json.loads(path.read_text()).items()
                                                   if k != "seconds"})
            for path in sorted(cache.glob("*/cells/*.json"))}  # fmt: skip


@needs_data
def test_benchmark_resumes_across_process_counts_with_the_same_cells(tmp_path: Path) -> None:
    one, two = tmp_path / "one", tmp_path / "two"
    _benchmark(one, tmp_path / "out1", "greedy,ancestral")  # one process trains and decodes two cells a model
    shutil.copytree(one, two)
    before = _cell_files(two)
    everything = ",".join(CELL_DECODERS)
    run_in_processes(_benchmark_in_process, 2, str(two), str(tmp_path / "out2"), everything)
    _benchmark(one, tmp_path / "out1", everything)  # the same cells in one process
    after_two, after_one = _cell_files(two), _cell_files(one)
    assert len(after_two) == 2 * len(CELL_DECODERS)
    for name, (mtime, _) in before.items():  # cells already in the cache were not decoded again
        assert after_two[name][0] == mtime, name
    assert {n: cell for n, (_, cell) in after_two.items()} == {n: cell for n, (_, cell) in after_one.items()}
    report = json.loads((tmp_path / "out2" / "nontermination.json").read_text())
    assert len(report["cells"]) == 2 * len(CELL_DECODERS)
