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
from training.distributed import Ranks, all_sum, current_ranks, gather, row_range, shard
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


@pytest.mark.parametrize("rows", [0, 1, 2, 5, 7, 9])
@pytest.mark.parametrize("size", [1, 2, 3, 4])
def test_row_range_is_torch_tensor_split(rows: int, size: int) -> None:
    blocks = torch.arange(rows).tensor_split(size)
    for rank in range(size):
        first, stop = row_range(rows, Ranks(rank, size))
        assert list(range(first, stop)) == blocks[rank].tolist()


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


# ------------------------------------------------------------------- train(): MLE, MGS, MRT, PG
MULTI30K = DATA / "multi30k"
needs_multi30k = pytest.mark.skipif(not (MULTI30K / "train.de").is_file(), reason="Multi30k not found")


def _seq2seq_run(step_name: str, checkpoint_dir: str | None, updates: int) -> dict[str, torch.Tensor]:
    from training.loop import LoopConfig, train
    from training.mgs import MGSConfig, MGSStep
    from training.parallel_text import encode_parallel, read_parallel
    from training.seq2seq import Seq2SeqSize, build_seq2seq
    from training.steps import MLEStep, MRTStep, PGStep
    from training.task import Seq2SeqTask
    from training.tokenizer import train_tokenizer

    text = read_parallel(MULTI30K / "train.de", MULTI30K / "train.en").head(48)
    tokenizer = train_tokenizer(list(text.sources + text.targets), vocab_size=150)
    data = encode_parallel(text, tokenizer, max_length=40)  # targets of different lengths
    model = build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0), seed=0)
    if step_name == "mgs-sampled":  # samples that end at different steps: decodes of shares differ in length
        model.final_logits_bias[0, tokenizer.eos_token_id] = 3.0
    # costs that vary with the weights (MGS's greedy decodes) and between samples (MRT, PG)
    task = Seq2SeqTask(tokenizer, cost="length_ratio" if step_name in ("mrt", "pg") else "repetition",
                       max_length_factor=1.0, strategy="sample" if step_name == "mgs-sampled" else "greedy")
    step = {"mle": lambda: MLEStep(task), "mgs": lambda: MGSStep(task, MGSConfig(num_candidates=3, sigma=30.0, alpha=20.0)),
            "mgs-sampled": lambda: MGSStep(task, MGSConfig(num_candidates=3, sigma=30.0, alpha=20.0, common_noise=False)),
            "mrt": lambda: MRTStep(task, num_samples=3, mle_probability=0.25),
            "pg": lambda: PGStep(task, num_samples=3, mle_probability=0.0)}[step_name]()
    config = LoopConfig(batch_size=8, max_updates=updates, checkpoint_every=1, progress=False, seed=1)
    train(model, step, data, torch.optim.SGD(model.parameters(), lr=0.5), config=config,  # SGD: no Adam normalising
          checkpoint_dir=checkpoint_dir)  # fmt: skip
    return model.state_dict()


def _seq2seq_in_process(rank: int, step_name: str, checkpoint_dir: str | None, updates: int, out: str) -> None:
    state = _seq2seq_run(step_name, checkpoint_dir, updates)
    if rank == 0:
        torch.save(state, out)


@needs_multi30k
@pytest.mark.parametrize("step_name", ["mle", "mgs", "mgs-sampled", "mrt", "pg"])
def test_train_under_two_processes_equals_one_process_on_the_whole_batch(tmp_path: Path, step_name: str) -> None:
    alone = _seq2seq_run(step_name, None, 4)
    run_in_processes(_seq2seq_in_process, 2, step_name, str(tmp_path / "ckpt"), 2, str(tmp_path / "half.pt"))
    state = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)
    assert state["result"]["updates"] == 2
    state["result"]["stop_reason"] = None  # as the periodic checkpoint of a run killed after update 2
    torch.save(state, tmp_path / "ckpt" / "state.pt")
    _seq2seq_run(step_name, str(tmp_path / "ckpt"), 4)  # one process resumes the two-process run
    resumed = torch.load(tmp_path / "ckpt" / "state.pt", weights_only=False)
    assert resumed["result"]["updates"] == 4
    _assert_same_weights(resumed["model"], alone)


class _OneProcessStep:
    """A user's step that does not say it runs under torchrun."""

    def __call__(self, model, batch, optimizer, *, generator=None):
        raise AssertionError("never called: train refuses the step first")


def _mre_in_process(rank: int) -> None:
    from training.loop import LoopConfig, train

    with pytest.raises(ValueError, match="_OneProcessStep does not run under torchrun"):
        train(torch.nn.Linear(2, 2), _OneProcessStep(), None, None,  # type: ignore[arg-type]
              config=LoopConfig(max_updates=1))  # fmt: skip


def test_steps_without_distributed_support_are_refused_under_torchrun() -> None:
    run_in_processes(_mre_in_process, 2)


def _toy_mgs(rank: int | None, size: int, out: str | None) -> dict[str, torch.Tensor]:
    """MGS updates on test_mgs's exact-match toy: the whole batch (rank None) or this process's half."""
    from training.mgs import MGSConfig, MGSStep

    from .test_mgs import ExactMatchTask, ToyBatch, toy_problem

    model, batch, generator = toy_problem(0)
    if rank is not None:
        rows = torch.arange(len(batch)).tensor_split(size)[rank]
        batch = ToyBatch(batch.inputs[rows], batch.targets[rows])
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    step = MGSStep(ExactMatchTask(), MGSConfig(num_candidates=4))
    costs = [step(model, batch, optimizer, generator=generator)["cost_before"] for _ in range(12)]
    if out is not None and rank == 0:
        torch.save({"state": model.state_dict(), "costs": costs}, out)
    return {"state": model.state_dict(), "costs": costs}


def test_mgs_step_under_two_processes_equals_one_process_on_the_whole_batch(tmp_path: Path) -> None:
    alone = _toy_mgs(None, 1, None)
    assert len(set(alone["costs"])) > 2  # the costs move, so averaging them over processes matters
    run_in_processes(_toy_mgs, 2, 2, str(tmp_path / "two.pt"))
    two = torch.load(tmp_path / "two.pt")
    assert two["costs"] == pytest.approx(alone["costs"])
    _assert_same_weights(two["state"], alone["state"])


# ------------------------------------------------------------------------------- one clock
def _timed_loop(rank: int, out: str) -> None:
    """run_loop with a wall-time budget where rank 1's updates take three times as long as rank 0's."""
    import time

    from training.loop import LoopPosition, run_loop

    position = LoopPosition()
    run_loop(position, epoch_items=lambda epoch: list(range(100)),
             update=lambda item: time.sleep(0.01 * (1 + 2 * rank)) or {"item": float(item)},
             after_update=lambda logs: "max_seconds" if position.train_seconds >= 0.25 else None)  # fmt: skip
    torch.save((position.updates, position.train_seconds, position.train_cpu_seconds), f"{out}.{rank}")


def test_time_budgets_stop_every_process_after_the_same_update(tmp_path: Path) -> None:
    """Each process's own clock would stop rank 0 after about 3x rank 1's updates, and a process that stops
    while another still trains leaves that one waiting in its next all-reduce."""
    run_in_processes(_timed_loop, 2, str(tmp_path / "pos"))
    first, second = (torch.load(tmp_path / f"pos.{rank}") for rank in range(2))
    assert first == second
    assert first[1] >= 0.25 and first[0] <= 10  # rank 1's pace: about 0.03 s an update


# ------------------------------------------------------------------------------- benchmarks.mt_bleu
def _translations(rank: int | None, out: str | None) -> dict[str, object]:
    """Greedy and beam-2 translations of 13 sources in batches of 4 by a tiny random model."""
    from training.evaluate import translate
    from training.parallel_text import read_parallel
    from training.seq2seq import Seq2SeqSize, build_seq2seq
    from training.tokenizer import train_tokenizer

    text = read_parallel(MULTI30K / "train.de", MULTI30K / "train.en").head(60)
    tokenizer = train_tokenizer(list(text.sources + text.targets), vocab_size=150)
    model = build_seq2seq(tokenizer, Seq2SeqSize(d_model=16, layers=1, heads=2, ffn_dim=32, dropout=0.0), seed=3)
    sources = text.sources[:13]
    found = {f"beams{beams}": asdict(translate(model, tokenizer, sources, num_beams=beams, batch_size=4, length_slack=2))
             for beams in (1, 2)}  # fmt: skip
    if out is not None and rank is not None:
        torch.save(found, f"{out}.{rank}")
    return found


@needs_multi30k
def test_translate_under_two_processes_equals_one_process(tmp_path: Path) -> None:
    alone = _translations(None, None)
    assert len(set(alone["beams1"]["lengths"])) > 2  # batches of different caps: rows must come back in place
    run_in_processes(_translations, 2, str(tmp_path / "found"))
    for rank in range(2):
        assert torch.load(tmp_path / f"found.{rank}") == alone


def _mt_bleu_arguments(tmp_path: Path) -> list[str]:
    return ["--tiny", "--data-dir", str(DATA), "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out"),
            "--name", "tiny", "--train-pairs", "120", "--val-pairs", "8", "--test-pairs", "8", "--vocab-size", "200",
            "--base-seconds", "1", "--finetune-seconds", "0.3", "--finetune-validate-seconds", "0.15", "--seeds", "0",
            "--no-progress"]  # fmt: skip


def _mt_bleu_in_process(rank: int, tmp: str) -> None:
    from benchmarks import mt_bleu

    mt_bleu.main(_mt_bleu_arguments(Path(tmp)))


@needs_multi30k
def test_mt_bleu_runs_under_two_processes_and_resumes_across_process_counts(tmp_path: Path) -> None:
    from benchmarks import mt_bleu

    run_in_processes(_mt_bleu_in_process, 2, str(tmp_path))
    report = json.loads((tmp_path / "out" / "tiny.json").read_text())
    assert [run["method"] for run in report["runs"]] == ["mle", "mgs", "mrt", "pg"]
    assert all(run["updates"] >= 1 for run in report["runs"])
    cached = sorted((tmp_path / "cache").glob("*/finetune-*/*-seed0/result.json")) + sorted(
        (tmp_path / "cache").glob("*/base/*.json"))
    stamps = [path.stat().st_mtime_ns for path in cached]
    again = mt_bleu.main(_mt_bleu_arguments(tmp_path))  # one process: everything comes from the cache
    assert [path.stat().st_mtime_ns for path in cached] == stamps
    assert again["runs"] == report["runs"]
