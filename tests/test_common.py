"""benchmarks.common: cache keys, names, reports and the run metadata every benchmark writes."""

from __future__ import annotations

import json

import pytest

from benchmarks import mt_bleu, nontermination_settings, smollm2_frontier
from benchmarks.common import (CACHE_ENV, cache_root, command_line, format_epsilon, report_header, run_environment,
                               select, settings_key, write_json)


def test_cache_keys_of_the_tiers_never_change():
    """Runs resume from caches named by these keys: a change of a settings field, a default or the hash
    would silently start them again from nothing. Bump a settings ``version`` field on purpose instead."""
    assert settings_key(nontermination_settings.QUICK) == "d3d65ca7b9d3"
    assert settings_key(nontermination_settings.STANDARD) == "7352cb1d093c"
    assert settings_key(mt_bleu.QUICK) == "784d63734602"
    assert mt_bleu.cache_key(mt_bleu.STANDARD, fields=mt_bleu.BASE_FIELDS) == "66faf21c02ce"
    assert settings_key(smollm2_frontier.FrontierSettings()) == "ced9460d5c64"


def test_cache_root_follows_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    assert cache_root() == tmp_path
    monkeypatch.delenv(CACHE_ENV)
    assert cache_root().name == "consistent-decoding"


def test_select_names_globs_and_errors():
    names = ["rnn-vanilla", "lstm-st-1e-3", "lstm-nmst-1e-3"]
    assert select(None, names, what="models") == names
    assert select("lstm-*,rnn-vanilla", names, what="models") == names
    with pytest.raises(ValueError, match="unknown model 'gru'"):
        select("gru", names, what="models")
    with pytest.raises(ValueError, match="--models is empty"):
        select(" , ", names, what="models")
    assert format_epsilon(1e-3) == "1e-3" and format_epsilon(2.5e-4) == "2.5e-4"


def test_reports_open_with_the_run(tmp_path):
    meta = {"command": command_line("benchmarks.speed", ["--quick", "a b"]), **run_environment(), "wall_seconds": 90.0}
    assert meta["command"] == "python -m benchmarks.speed --quick 'a b'"
    header = "\n".join(report_header(meta))
    assert meta["commit"] in header and "1.5 min" in header and meta["machine"] in header
    write_json(tmp_path / "meta.json", meta)
    assert json.loads((tmp_path / "meta.json").read_text())["date"] == meta["date"]
