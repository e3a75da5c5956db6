"""End to end: the Multi30k benchmark on a few hundred pairs with a tiny model writes a well-formed table,
and a second call reuses every cached stage instead of redoing it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import mt_bleu

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
