"""training.distributed and its users under two gloo processes: sharded cells equal one process's, MLE with
DistributedDataParallel equals one process on the whole batch, checkpoints resume under another number of
processes, and the non-termination benchmark resumes a one-process cache with two processes (and back)
without recomputing a cell; the SmolLM2 bench (a tiny Llama) fine-tunes, scores, decodes and runs MGS on two
processes as on one, and the frontier benchmark runs on two and resumes on one."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from benchmarks.nontermination_cells import DECODERS, cell_units, decode_cell, decode_missing_cells
from benchmarks.smollm2 import Head, SmolLM2Bench, SmolSettings
from decoding.models import lstm_lm
from training.distributed import Ranks, all_sum, current_ranks, gather, row_range, shard
from training.lm import collate_lm_batch, train_lm

from .processes import run_in_processes
from .tiny_models import tiny_smol_data, tiny_smollm2

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


# ------------------------------------------------------------- SmolLM2 (a tiny random Llama stands in)
SMOL_HEAD = Head("st", 0.2)  # fine-tuned: eos_init gathers every process's rows of the first batch
SMOL_DECODERS = ("greedy", "consistent-nucleus-0.4")


def _smol_bench(folder: Path) -> SmolLM2Bench:
    """tiny_smollm2 on random lines in batches of 1 to 6 rows: the longest line is a batch of its own, where
    one of two processes has no row."""
    data = tiny_smol_data()
    # float32: under bfloat16 autocast each process's weight gradients are rounded to bfloat16 before they are
    # summed, which moves Adam's updates by more than float32 rounding
    settings = SmolSettings(prompts=5, train_layers=1, epsilon=0.2, lr=1e-2, batch_tokens=128, checkpoint_every=2,
                            train_bf16=False)  # fmt: skip
    model, tokenizer = tiny_smollm2()
    return SmolLM2Bench(model, tokenizer, settings, data, folder=folder, seed=0, progress=False)


def _finetune_order(bench: SmolLM2Bench) -> list[int]:
    """The batch order :meth:`SmolLM2Bench.finetune` visits."""
    return torch.randperm(bench.train_batch_count(), generator=torch.Generator().manual_seed(bench.seed)).tolist()


def _smol_run(folder: Path) -> dict:
    """What the SmolLM2 tests compare, from one process or from each of a group: the pretrained perplexity,
    two cells, the first 3 updates of the ``ft-st`` fine-tune (its checkpoint left behind, as by a killed run),
    a whole fine-tune and two MGS continuation updates."""
    from benchmarks.smollm2_frontier import ContinuationSettings, mgs_update
    from training.mgs import MGSConfig

    bench = _smol_bench(folder)
    found = {"perplexity": bench.load_variant("pretrained")["test_perplexity"], "pretrained": bench.pretrained}
    decode_missing_cells(bench.decodable(Head()), bench.data.prompts, model_name="tiny",
                         decoders=SMOL_DECODERS, folder=folder / "cells", eos_token_id=2, pad_token_id=2,
                         max_new_tokens=12, reference_lengths=bench.data.reference_lengths, sample_sets=2, seed=5,
                         batch_size=2, progress=False)  # fmt: skip
    order = _finetune_order(bench)
    start = {**bench.pretrained, **bench.eos_init(SMOL_HEAD.kind)}
    part = bench.train_updates("ft-st", start=start, order=order[:3], update=bench.mle_update(SMOL_HEAD))
    found["part"] = {"weights": bench.weights(), "tokens": part["tokens"], "train_loss": part["train_loss"]}
    found["finetune"] = {"record": bench.finetune("ft-whole", SMOL_HEAD), "weights": bench.weights()}
    settings = ContinuationSettings(mgs=MGSConfig(num_candidates=2, sigma=30.0), decode_rows=3, max_reference_tokens=40)
    mgs = bench.train_updates("mgs", start=bench.pretrained, order=[3, 0], update=mgs_update(bench, settings, seed=0))
    found["mgs"] = {"weights": bench.weights(), "logs": mgs["logs"]}
    return found


def _smol_in_process(rank: int, folder: str) -> None:
    torch.save(_smol_run(Path(folder)), Path(folder) / f"found.{rank}.pt")


def _cells_in(folder: Path) -> dict[str, dict]:
    return {path.name: {k: v for k, v in json.loads(path.read_text()).items() if k != "seconds"}
            for path in sorted((folder / "cells").glob("*.json"))}  # fmt: skip


@pytest.fixture(scope="module")
def smol_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """The SmolLM2 run in one process (``one``) and in two (``two``: rank 0's, ``two_rank1``), and the folder
    the two processes wrote (``two_folder``)."""
    one, two = tmp_path_factory.mktemp("smol-one"), tmp_path_factory.mktemp("smol-two")
    alone = _smol_run(one)
    run_in_processes(_smol_in_process, 2, str(two))
    return {"one": alone, "one_folder": one, "two": torch.load(two / "found.0.pt", weights_only=False),
            "two_rank1": torch.load(two / "found.1.pt", weights_only=False), "two_folder": two}


def test_smollm2_perplexity_under_two_processes_equals_one_process(smol_runs: dict) -> None:
    assert smol_runs["two"]["perplexity"] == pytest.approx(smol_runs["one"]["perplexity"], rel=1e-6)
    assert smol_runs["two_rank1"]["perplexity"] == smol_runs["two"]["perplexity"]


def test_smollm2_cells_under_two_processes_equal_one_process(smol_runs: dict) -> None:
    alone = _cells_in(smol_runs["one_folder"])
    assert sorted(alone) == ["tiny__consistent-nucleus-0.4.draws2.json", "tiny__greedy.json"]
    assert len(set(alone["tiny__consistent-nucleus-0.4.draws2.json"]["lengths"])) > 2  # rows stop at different steps
    assert alone["tiny__greedy.json"]["distinct"] == [1.0]  # every prompt its own continuation
    assert _cells_in(smol_runs["two_folder"]) == alone


def test_smollm2_fine_tune_under_two_processes_equals_one_process_and_resumes_in_one(smol_runs: dict) -> None:
    one, two = smol_runs["one"], smol_runs["two"]
    assert not torch.equal(one["part"]["weights"]["model.norm.weight"], one["pretrained"]["model.norm.weight"])
    for run in ("part", "finetune"):
        _assert_same_weights(two[run]["weights"], one[run]["weights"])
        _assert_same_weights(smol_runs["two_rank1"][run]["weights"], two[run]["weights"])
    assert two["part"]["tokens"] == one["part"]["tokens"]
    assert two["part"]["train_loss"] == pytest.approx(one["part"]["train_loss"], rel=1e-6)
    record, alone = two["finetune"]["record"], one["finetune"]["record"]
    assert record["finetune_tokens"] == alone["finetune_tokens"] and record["finetune_steps"] == alone["finetune_steps"]
    for key in ("finetune_train_loss", "test_perplexity"):
        assert record[key] == pytest.approx(alone[key], rel=1e-5), key
    bench = _smol_bench(smol_runs["two_folder"])  # one process resumes the two processes' checkpoint of ft-st
    assert torch.load(smol_runs["two_folder"] / "ft-st.ckpt.pt", weights_only=True)["step"] == 3
    resumed = bench.finetune("ft-st", SMOL_HEAD)
    _assert_same_weights(bench.weights(), one["finetune"]["weights"])
    assert resumed["finetune_tokens"] == alone["finetune_tokens"]
    assert resumed["finetune_train_loss"] == pytest.approx(alone["finetune_train_loss"], rel=1e-5)


def test_smollm2_mgs_continuation_under_two_processes_equals_one_process(smol_runs: dict) -> None:
    one, two = smol_runs["one"]["mgs"], smol_runs["two"]["mgs"]
    assert len({log["cost_before"] for log in one["logs"]} | {log["cost_best"] for log in one["logs"]}) > 1
    _assert_same_weights(two["weights"], one["weights"])
    assert two["logs"] == [pytest.approx(log, rel=1e-5) for log in one["logs"]]


def _frontier(tmp: Path) -> object:
    """benchmarks.smollm2_frontier on WikiText-2 with the tiny Llama for SmolLM2 (test_smollm2_frontier's
    settings; MGS prompts from lines long enough that two processes share three of them)."""
    import benchmarks.smollm2_frontier as frontier

    from .test_smollm2_frontier import TINY

    settings = replace(TINY, continuation=replace(TINY.continuation, max_reference_tokens=300))
    return frontier.main(["--data-dir", str(DATA), "--out", str(tmp / "out"), "--cache-dir", str(tmp / "cache"),
                          "--no-progress"], settings=settings)  # fmt: skip


def _frontier_in_process(rank: int, tmp: str) -> None:
    import benchmarks.smollm2 as smol_module

    smol_module.load_smollm2 = tiny_smollm2  # a fresh interpreter: nothing to restore
    _frontier(Path(tmp))


@needs_data
def test_smollm2_frontier_runs_under_two_processes_and_one_process_resumes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import benchmarks.nontermination_cells as cells_module
    import benchmarks.smollm2 as smol_module

    run_in_processes(_frontier_in_process, 2, str(tmp_path))
    report = json.loads((tmp_path / "out" / "smollm2-frontier.json").read_text())
    names = ["ft-vanilla", "ft-st-2e-1", "ft-nmst-2e-1", "ft-vanilla+mle", "ft-vanilla+mgs"]
    assert [row["model"] for row in report["frontier"]] == names

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(smol_module, "load_smollm2", forbidden)
    monkeypatch.setattr(cells_module, "decode_cell", forbidden)
    again = _frontier(tmp_path)  # one process: everything comes from the two processes' cache
    assert list(again.records) == names and not again.missing
    assert {again.records[name]["continuation"]["processes"] for name in names[3:]} == {2}
