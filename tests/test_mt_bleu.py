"""End to end: the Multi30k benchmark on a few hundred pairs with a tiny model writes a well-formed table,
and a second call reuses every cached stage instead of redoing it."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from benchmarks import mt_bleu
from benchmarks import mt_bleu_report as report
from training.seq2seq import load_seq2seq

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def arguments(tmp_path: Path) -> list[str]:
    return ["--tiny", "--data-dir", str(DATA), "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / "out"), "--name", "tiny", "--train-pairs", "200", "--val-pairs", "12",
            "--test-pairs", "12", "--vocab-size", "300", "--base-seconds", "2", "--finetune-seconds", "0.5",
            "--finetune-validate-seconds", "0.2", "--seeds", "0", "--no-progress"]


def test_end_to_end_writes_table_and_json_and_resumes(tmp_path):
    payload = mt_bleu.main(arguments(tmp_path))
    out = tmp_path / "out"
    table = (out / "tiny.md").read_text()
    lines = [line for line in table.splitlines() if line.startswith("|")]
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    assert header[:4] == ["method", "seeds", "BLEU greedy", "BLEU beam4"] and "s / update" in header
    assert [line.split("|")[1].strip() for line in lines[2:]] == ["base (MLE)", "mle", "mgs", "mrt", "pg"]
    assert all(len(line.strip("|").split("|")) == len(header) for line in lines)
    assert "nrefs:1|case:mixed|eff:no|tok:13a" in table and "Command: `python -m benchmarks.mt_bleu" in table

    stored = json.loads((out / "tiny.json").read_text())
    assert {"command", "commit", "machine", "date", "rows", "runs", "base", "settings"} <= set(stored)
    assert [run["method"] for run in stored["runs"]] == ["mle", "mgs", "mrt", "pg"]
    for run in stored["runs"]:
        assert run["updates"] >= 1 and run["history"][0]["update"] == 0      # curve starts at the base
        for decoder in ("greedy", "beam4"):
            scores = run["test"][decoder]
            assert 0.0 <= scores["bleu"] <= 100.0 and 0.0 <= scores["nontermination"] <= 1.0
    assert stored["runs"] == payload["runs"]

    cached = sorted((tmp_path / "cache").glob("*/finetune-*/*-seed0/result.json"))
    assert len(cached) == 4
    stamps = [path.stat().st_mtime_ns for path in cached]
    again = mt_bleu.main(arguments(tmp_path))
    assert [path.stat().st_mtime_ns for path in cached] == stamps and again["runs"] == payload["runs"]


def test_bad_method_is_rejected():
    with pytest.raises(SystemExit):
        mt_bleu.parse_args(["--methods", "ppo"])
    with pytest.raises(ValueError, match="unknown method"):
        mt_bleu.make_step("ppo", task=None, settings=mt_bleu.QUICK)


# ------------------------------------------------------------------------------------------ standard tier

def standard_arguments(tmp_path: Path) -> list[str]:
    return ["--standard", "--tiny", "--data-dir", str(DATA), "--cache-dir", str(tmp_path / "cache"), "--out",
            str(tmp_path / "out"), "--name", "tiny-standard", "--train-pairs", "64", "--val-pairs", "6",
            "--test-pairs", "3", "--vocab-size", "1000", "--base-seconds", "1", "--finetune-seconds", "0.3",
            "--finetune-validate-seconds", "0.15", "--seeds", "0", "--no-progress",
            "--length-factor", "0.5"]   # L = source length / 2 keeps the untrained model's decodes short


def test_standard_tier_smoke_on_a_few_sentences(tmp_path):
    payload = mt_bleu.main(standard_arguments(tmp_path))
    base, runs = payload["base"], payload["runs"]
    assert [run["method"] for run in runs] == ["mle", "mgs", "mrt", "pg", "mle-base-lr"]
    assert payload["settings"]["val_beams"] == 4 and payload["settings"]["base_bf16"]
    assert set(base["test_sets"]) == set(mt_bleu.TEST_SETS) and base["plateau_rule"]["min_gain"] == 0.3
    for run in runs:
        assert set(run["test_sets"]) == set(mt_bleu.TEST_SETS) and run["test"] == run["test_sets"]["test_2016_flickr"]
        assert run["history"][0] == {**run["history"][0], "update": 0, "score": base["best_val_bleu"]}
        assert run["budget_seconds"] == 0.3 and run["base"] == Path(payload["cache"]).name
    lrs = {run["method"]: run["lr"] for run in runs}
    assert lrs["mle"] == lrs["mgs"] == lrs["mrt"] == lrs["pg"] == 1e-4
    assert lrs["mle-base-lr"] == pytest.approx(base["continue_lr"]) and base["continue_lr"] != 1e-4
    mgs = next(run for run in runs if run["method"] == "mgs")
    assert [s["update"] for s in mgs["step_logs"]] == list(range(1, mgs["updates"] + 1))
    assert all({"ess", "weight_mle", "cosine_mle"} <= set(s) for s in mgs["step_logs"])

    out = tmp_path / "out"
    table = (out / "tiny-standard.md").read_text()
    assert "beam 4, 6 validation pairs" in table and "ceil(0.5 × source tokens)" in table
    assert "| test_2018_flickr | mle @ base lr (" in table and "MGS − MLE (test_2016_flickr, beam 4)" in table
    try:
        import matplotlib  # noqa: F401  (the bench extra; CI installs only dev)
    except ImportError:
        assert "the validation-BLEU plot was skipped" in table
    else:
        assert (out / "tiny-standard_val_bleu.png").stat().st_size > 0
    cached = sorted((tmp_path / "cache").glob("*/finetune-*/*-seed0/result.json"))
    assert len(cached) == 5
    stamps = [path.stat().st_mtime_ns for path in cached]
    again = mt_bleu.main(standard_arguments(tmp_path))
    assert [path.stat().st_mtime_ns for path in cached] == stamps and again["runs"] == payload["runs"]


class Killed(Exception):
    pass


def tiny_standard_settings():
    from training.seq2seq import Seq2SeqSize
    from training.plateau import PlateauRule

    return replace(mt_bleu.STANDARD, size=Seq2SeqSize(d_model=32, layers=1, heads=2, ffn_dim=64),
                   train_pairs=96, val_pairs=6, vocab_size=200, base_seconds=1e6, base_epochs=4, base_batch=16,
                   base_warmup=4, base_validate_every=4, base_plateau=PlateauRule(min_validations=4))


def test_resuming_the_base_after_a_kill_gives_the_same_state(tmp_path, monkeypatch):
    settings = tiny_standard_settings()
    splits = mt_bleu.load_splits(mt_bleu.data_folder(str(DATA), settings), settings)
    straight = mt_bleu.train_base(tmp_path / "straight", splits, settings, progress=False)

    calls = []

    class DiesAtUpdate10(mt_bleu.MLEStep):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            if len(calls) == 10:            # after the validation (and checkpoint) at update 8
                raise Killed
            return super().__call__(*args, **kwargs)

    class Counting(mt_bleu.MLEStep):
        def __call__(self, *args, **kwargs):
            calls.append(1)
            return super().__call__(*args, **kwargs)

    monkeypatch.setattr(mt_bleu, "MLEStep", DiesAtUpdate10)
    with pytest.raises(Killed):
        mt_bleu.train_base(tmp_path / "killed", splits, settings, progress=False)
    assert not (tmp_path / "killed" / "base" / "info.json").exists()
    calls.clear()
    monkeypatch.setattr(mt_bleu, "MLEStep", Counting)
    torch.manual_seed(123)                  # the resumed process starts with another global random state
    resumed = mt_bleu.train_base(tmp_path / "killed", splits, settings, progress=False)
    assert len(calls) == resumed["updates"] - 8                     # resumed at update 8, not from scratch

    def without_times(info: dict) -> dict:
        timeless = {k: v for k, v in info.items() if k != "train_seconds"}
        timeless["history"] = [{k: v for k, v in h.items() if "seconds" not in k} for h in info["history"]]
        return timeless

    assert resumed["stop_reason"] == "plateau" and without_times(resumed) == without_times(straight)
    first, second = (load_seq2seq(path / "base" / "model")[0].state_dict() for path in
                     (tmp_path / "straight", tmp_path / "killed"))
    assert all(torch.equal(first[name], second[name]) for name in first)


# ----------------------------------------------------------------------------------------------- report

def record(method: str, seed: int = 0, **changes) -> dict:
    scores = {"bleu": 30.0 + seed, "chrf": 50.0, "length_ratio": 1.0, "nontermination": 0.0}
    test = {"greedy": scores, "beam4": scores}
    return {"method": method, "seed": seed, "lr": 1e-4, "batch_size": 32, "budget_seconds": 150.0, "base": "b0",
            "updates": 10, "train_seconds": 150.0, "seconds_per_update": 15.0, "best_val_bleu": 30.0,
            "history": [], "test": test, "test_sets": {"test_2016_flickr": test}, **changes}


def test_the_report_refuses_runs_of_different_update_time_or_learning_rate():
    runs = [record(m, seed) for seed in (0, 1) for m in report.METHODS]
    report.check_comparable(runs + [record("mle-base-lr", lr=3e-4)])   # the rate control may differ in lr
    base = {"test": runs[0]["test"], "test_sets": runs[0]["test_sets"], "best_val_bleu": 29.0, "updates": 100,
            "train_seconds": 1000.0}
    assert [row["method"] for row in report.summary_rows(base, runs)] == ["base (MLE)", *report.METHODS]
    for changed, message in ((record("mgs", 1, lr=3e-4), "different lr"),
                             (record("mrt", 1, budget_seconds=300.0), "different budget_seconds"),
                             (record("mle-base-lr", budget_seconds=300.0), "different budget_seconds"),
                             (record("pg", 1, batch_size=64), "different batch_size"),
                             (record("mgs", 1, processes=2), "different processes"),
                             (record("mle", 1, base="b1"), "different base")):
        mixed = [run for run in runs if (run["method"], run["seed"]) != (changed["method"], 1)] + [changed]
        with pytest.raises(ValueError, match=message):
            report.check_comparable(mixed)
        with pytest.raises(ValueError, match=message):
            report.summary_rows(base, mixed)
        with pytest.raises(ValueError, match=message):
            report.test_set_rows(base, mixed)


def test_comparison_note_judges_the_difference_against_the_seed_spread():
    runs = [record("mle", s) for s in (0, 1, 2)] + [record("mgs", s, test_sets={"t": {}}) for s in (0, 1, 2)]
    for run, bleu in zip(runs, (30.0, 30.5, 31.0, 31.4, 31.6, 31.8)):
        run["test_sets"] = {"t": {"beam4": {"bleu": bleu}}}
    # MGS mean 31.6 - MLE mean 30.5 = +1.1; seed sd MLE 0.5, MGS 0.2
    assert "+1.10 BLEU, which exceeds the larger seed sd (0.50" in report.comparison_note(runs, "t")
    runs[5]["test_sets"]["t"]["beam4"]["bleu"] = 29.0     # MGS 31.4, 31.6, 29.0: mean 30.67, sd 1.45
    assert "+0.17 BLEU, which does not exceed the larger seed sd (1.45" in report.comparison_note(runs, "t")


def test_base_note_says_whether_the_base_plateaued():
    base = {"updates": 3000, "epochs": 6, "train_seconds": 2700.0, "best_val_bleu": 35.2, "best_update": 2800,
            "plateau_rule": {"window_share": 0.2, "min_gain": 0.3, "min_validations": 5}}
    plateaued = report.base_note({**base, "stop_reason": "plateau", "plateau_gain": 0.12})
    assert "stopped by the plateau rule (gain 0.12 BLEU over the last 20% of training, at most 0.3)" in plateaued
    capped = report.base_note({**base, "stop_reason": "max_seconds", "plateau_gain": 0.9})
    assert "max_seconds **before the validation curve plateaued** (last-window gain 0.90)" in capped
