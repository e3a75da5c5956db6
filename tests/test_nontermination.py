"""benchmarks.nontermination: r_L and cell metrics on hand-made decodes, name filters, and the whole
pipeline on a tiny WikiText-2 slice (tiny RNN/LSTM; a tiny random Llama standing in for SmolLM2)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import benchmarks.nontermination_cells as cells_module
import benchmarks.nontermination_report as report_module
import benchmarks.smollm2 as smol_module
import benchmarks.nontermination_words as words_module
from benchmarks import nontermination as nt
from benchmarks.common import format_epsilon, select
from benchmarks.nontermination_cells import DECODERS, CellResult, cell_metrics
from benchmarks.smollm2 import SmolSettings, detokenize_wikitext
from benchmarks.nontermination_words import WordSettings

from .tiny_models import tiny_smollm2

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2" / "test.txt").is_file(), reason="WikiText-2 not found")
EOS = 2


# ------------------------------------------------------------------------------------------ metrics
def test_cell_metrics_on_hand_made_decodes() -> None:
    # L = 4; prompt 0: eos at 2nd token; prompt 1: never; prompt 2: eos as the L-th token
    generated = torch.tensor([[5, EOS, 0, 0], [7, 7, 7, 7], [5, 6, 7, EOS]])
    out = cell_metrics(generated, eos_token_id=EOS, max_new_tokens=4, reference_lengths=[3, 2, 1])
    assert out["nontermination"] == [pytest.approx(1 / 3)]
    assert out["lengths"] == [2, 4, 4]
    assert out["mean_length"] == [pytest.approx(10 / 3)]
    assert out["length_ratio"] == [pytest.approx(10 / 6)]
    # seq-rep-4: [5] and [5, 6, 7] have no 4-gram (0), [7, 7, 7, 7] has one (unique 1 of 1 -> 0)
    assert out["seq_rep_4"] == [pytest.approx(0.0)]


def test_cell_metrics_splits_sample_sets() -> None:
    # 2 prompts x 2 sets, rows of one prompt adjacent: p0s0, p0s1, p1s0, p1s1
    rows = [[EOS, 0, 0], [4, 4, 4], [4, EOS, 0], [4, 4, 4]]
    out = cell_metrics(rows, eos_token_id=EOS, max_new_tokens=3, reference_lengths=[1, 2], sample_sets=2)
    assert out["nontermination"] == [0.0, 1.0]
    assert out["mean_length"] == [pytest.approx(1.5), pytest.approx(3.0)]
    assert out["length_ratio"] == [pytest.approx(1.0), pytest.approx(2.0)]
    assert out["lengths"] == [1, 2, 3, 3]
    result = CellResult("m", "d", 3, 2, 2, out["nontermination"], out["mean_length"], out["length_ratio"],
                        out["seq_rep_4"], out["lengths"])  # fmt: skip
    summary = result.summary()
    assert summary["nontermination"] == pytest.approx(0.5)
    assert summary["nontermination_std"] == pytest.approx(2**0.5 / 2)


def test_cell_metrics_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="no eos"):  # cut short without eos: r_L would be biased
        cell_metrics([[4, 4]], eos_token_id=EOS, max_new_tokens=3, reference_lengths=[1])
    with pytest.raises(ValueError, match="expected 2 prompts"):
        cell_metrics([[EOS]], eos_token_id=EOS, max_new_tokens=3, reference_lengths=[1, 1])
    with pytest.raises(ValueError, match="disagrees"):
        cell_metrics([[EOS, 0, 0]], eos_token_id=EOS, max_new_tokens=3, reference_lengths=[1],
                     terminated=torch.tensor([False]))  # fmt: skip


# ---------------------------------------------------------------------------------------- names, cli
def test_select_names_and_globs() -> None:
    names = nt.all_models(nt.Settings())
    assert select("lstm-st-*", names, what="models") == ["lstm-st-1e-3", "lstm-st-1e-4", "lstm-st-1e-5"]
    assert select("smollm2,rnn-vanilla", names, what="models") == ["rnn-vanilla", "smollm2"]
    with pytest.raises(ValueError, match="unknown model 'gpt9'"):
        select("gpt9", names, what="models")
    assert format_epsilon(1e-3) == "1e-3" and format_epsilon(5e-4) == "5e-4"


def test_cli_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        nt.main(["--decoders", "beam-3"])
    assert "unknown decoder 'beam-3'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        nt.main(["--models", "lstm-st-1e-7"])
    assert "choose from rnn-vanilla" in capsys.readouterr().err


def test_decoders_disable_the_default_top_k() -> None:
    for name, spec in DECODERS.items():
        if spec.sampled and not name.split("-")[-2:-1] == ["k"]:
            assert spec.options["top_k"] == 0, name
    assert DECODERS["consistent-top-k-2"].consistent and not DECODERS["top-k-2"].consistent


def test_detokenize_wikitext() -> None:
    tokens = "The 1 @,@ 000 km ( 620 mi ) well @-@ known road , it 's 3 @.@ 5 m wide .".split()
    assert detokenize_wikitext(tokens) == "The 1,000 km (620 mi) well-known road, it's 3.5 m wide."


# ---------------------------------------------------------------------------------------- end to end
TINY = replace(
    nt.QUICK,
    words=WordSettings(max_lines=200, vocab_size=300, train_tokens=2000, eval_sentences=20, prompts=6, rnn_hidden=8,
                       lstm_hidden=8, epochs=2, head_epochs=1, patience=2, batch_sentences=16, valid_prompts=5,
                       autocast="bfloat16"),
    epsilons=(0.1,),  # T(0.1) = 7 <= L = 12
    word_max_new_tokens=12,
    smol=SmolSettings(prompts=3, eval_lines=4, finetune_tokens=300, train_layers=1, epsilon=0.2, batch_tokens=256,
                      checkpoint_every=2),  # T(0.2) = 4 <= L = 12
    smol_max_new_tokens=12,
    smol_decoders=("greedy", "consistent-nucleus-0.4"),
)  # fmt: skip


def _run(tmp_path: Path, models: str, decoders: str | None = None) -> nt.RunResult:
    argv = ["--data-dir", str(DATA), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--models", models, "--no-progress", "--seed", "3"]  # fmt: skip
    return nt.main(argv + ([] if decoders is None else ["--decoders", decoders]), settings=TINY)


@needs_data
def test_word_pipeline_end_to_end_and_resume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    models = "rnn-vanilla,rnn-st-1e-1,lstm-nmst-1e-1"
    result = _run(tmp_path, models)
    assert len(result.cells) == 3 * len(DECODERS)
    cells = {(c.model, c.decoder): c for c in result.cells}
    for name in ("rnn-st-1e-1", "lstm-nmst-1e-1"):  # greedy stops within T(eps) = 7 <= L
        assert cells[name, "greedy"].nontermination == [0.0]
        assert max(cells[name, "greedy"].lengths) <= 7
    for cell in result.cells:
        assert cell.max_new_tokens == 12 and cell.prompts == 6
        assert cell.sample_sets == (2 if DECODERS[cell.decoder].sampled else 1)
        assert all(0.0 <= r <= 1.0 for r in cell.nontermination)
        assert all(1 <= n <= 12 for n in cell.lengths)
    report = json.loads((tmp_path / "out" / "nontermination.json").read_text())
    assert report["command"].startswith("python -m benchmarks.nontermination")
    assert {"commit", "machine", "date", "settings", "models", "cells"} <= set(report)
    assert set(report["models"]) == {"rnn-vanilla", "rnn-st-1e-1", "lstm-nmst-1e-1"}
    assert report["models"]["rnn-st-1e-1"]["termination_bound"] == 7
    assert all(record["test_perplexity"] > 1.0 for record in report["models"].values())
    for record in report["models"].values():  # tiny models barely learn: some are worse than uniform
        assert record["worse_than_uniform"] == (record["valid_perplexity"] >= record["vocab_size"])
    markdown = (tmp_path / "out" / "nontermination.md").read_text()
    flagged = sum(record["worse_than_uniform"] for record in report["models"].values())
    assert markdown.count("**worse than uniform**") == flagged
    header = "| model | " + " | ".join(DECODERS) + " |"
    assert header in markdown
    pivot = markdown.split(header)[1].split("\n\n")[0].strip().splitlines()
    assert len(pivot) == 1 + 3  # separator + one row per model
    assert all(row.count("|") == len(DECODERS) + 2 for row in pivot)
    # equal compute: the heads start from the vanilla model after epoch 1 and train epoch 2 with their head
    rnn_vanilla, rnn_st = report["models"]["rnn-vanilla"], report["models"]["rnn-st-1e-1"]
    assert rnn_vanilla["epochs"] == rnn_st["epochs"] == 2 and rnn_st["head_epochs"] == 1
    assert rnn_st["history"][0] == rnn_vanilla["history"][0]  # the shared first epoch
    assert rnn_st["history"][1]["valid_perplexity"] != rnn_vanilla["history"][1]["valid_perplexity"]
    for record in report["models"].values():  # the greedy r_L on validation contexts after every epoch
        assert [set(e["metrics"]) for e in record["history"]] == [
            {"greedy_nontermination", "greedy_mean_length", "greedy_distinct"}] * 2
    assert "## Training: greedy r_L on validation contexts after every epoch" in markdown
    assert "## Do the models use their prompt? (greedy)" in markdown
    greedy = [c for c in report["cells"] if c["decoder"] == "greedy"]
    assert all(0 < c["distinct"] <= 1 and 0 < c["mode_share"] <= 1 and 0 <= c["unk_share"] <= 1 for c in greedy)
    assert all(c["degenerate"] == (c["mode_share"] > 0.5) for c in greedy)

    # a second run reuses every model and cell: training or decoding anything would fail here
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(words_module, "train_lm", forbidden)
    monkeypatch.setattr(cells_module, "decode_cell", forbidden)
    again = _run(tmp_path, models, decoders="greedy,beam-*")
    assert [(c.model, c.decoder) for c in again.cells] == [
        (m, d) for m in models.split(",") for d in ("greedy", "beam-2", "beam-4")
    ]
    assert again.cells[0].lengths == cells["rnn-vanilla", "greedy"].lengths


@needs_data
def test_smollm2_pipeline_with_a_tiny_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smol_module, "load_smollm2", tiny_smollm2)
    monkeypatch.setattr(smol_module, "smollm2_problems", lambda: [])  # CI need not have the real model
    result = _run(tmp_path, "smollm2*")
    names = ["smollm2", "smollm2-ft-vanilla", "smollm2-ft-st-2e-1", "smollm2-ft-nmst-2e-1"]
    assert [c.model for c in result.cells] == [n for n in names for _ in range(2)]
    cells = {(c.model, c.decoder): c for c in result.cells}
    for name in names[2:]:  # greedy stops within T(0.2) = 4
        assert cells[name, "greedy"].nontermination == [0.0]
        assert max(cells[name, "greedy"].lengths) <= 4
    assert set(result.records) == set(names)
    finetuned = result.records["smollm2-ft-st-2e-1"]
    assert finetuned["finetune_tokens"] >= 300 and finetuned["trained_layers"] == 1
    assert result.records["smollm2"]["finetune_tokens"] == 0
    # the vanilla fine-tune started from the pretrained weights and changed them
    assert result.records["smollm2-ft-vanilla"]["test_perplexity"] != result.records["smollm2"]["test_perplexity"]


def test_report_flags_a_model_worse_than_uniform() -> None:
    common = {"epochs": 1, "train_tokens_per_epoch": 10, "parameters": 5, "vocab_size": 3002}
    records = {
        "rnn-st-1e-3": {**common, "valid_perplexity": 5e15, "test_perplexity": 6e15, "worse_than_uniform": True},
        "rnn-vanilla": {**common, "valid_perplexity": 170.0, "test_perplexity": 171.0, "worse_than_uniform": False},
    }
    rows = report_module._model_rows(records)
    assert "**worse than uniform**" in rows[2] and "**worse than uniform**" not in rows[3]
