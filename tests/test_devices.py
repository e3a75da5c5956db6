"""``--device`` / ``--dtype`` on the benchmarks: resolution, validation, and the CPU default kept as it was."""

from __future__ import annotations

import pytest
import torch

import benchmarks.nontermination as nt
from benchmarks import mt_bleu
from benchmarks.devices import resolve_device, training_autocast


@pytest.fixture
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """A CUDA device that supports bfloat16, as far as the resolution code asks."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)


def test_default_device_is_cuda_when_available_else_cpu(no_cuda, monkeypatch):
    assert resolve_device(None) == torch.device("cpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device(None) == torch.device("cuda")


def test_unusable_devices_are_refused(no_cuda):
    with pytest.raises(ValueError, match="no CUDA device"):
        resolve_device("cuda")
    with pytest.raises(ValueError, match="not a torch device"):
        resolve_device("gpu-please")
    with pytest.raises(ValueError, match="expected cpu"):
        resolve_device("meta")


def test_cuda_index_beyond_the_devices_is_refused(cuda):
    assert resolve_device("cuda:0") == torch.device("cuda:0")
    with pytest.raises(ValueError, match="only 1 CUDA"):
        resolve_device("cuda:1")


def test_training_autocast_auto_keeps_the_tier_on_cpu_and_uses_bfloat16_on_cuda(cuda, monkeypatch):
    cpu = torch.device("cpu")
    assert training_autocast("auto", cpu, tier="bfloat16") == "bfloat16"
    assert training_autocast("auto", cpu, tier=None) is None
    assert training_autocast("float32", cpu, tier="bfloat16") is None
    assert training_autocast("bfloat16", cpu, tier=None) == "bfloat16"
    assert training_autocast("auto", torch.device("cuda"), tier=None) == "bfloat16"
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert training_autocast("auto", torch.device("cuda"), tier="bfloat16") is None
    with pytest.raises(ValueError, match="does not support bfloat16"):
        training_autocast("bfloat16", torch.device("cuda"), tier=None)
    with pytest.raises(ValueError, match="--dtype must be one of"):
        training_autocast("float16", cpu, tier=None)


def _report_only(tmp_path, *flags: str) -> nt.RunResult:
    return nt.main(["--quick", "--report-only", "--no-progress", "--cache-dir", str(tmp_path / "cache"),
                    "--out", str(tmp_path / "out"), "--models", "rnn-vanilla", *flags])


def test_nontermination_dtype_sets_the_word_models_autocast_and_device_keeps_the_key(tmp_path, no_cuda):
    default = _report_only(tmp_path)
    assert default.settings.words.autocast == "bfloat16" == nt.QUICK.words.autocast
    assert nt.cache_key(default.settings) == nt.cache_key(nt.QUICK)  # CPU default: the tier's cache
    assert nt.cache_key(_report_only(tmp_path, "--device", "cpu").settings) == nt.cache_key(nt.QUICK)
    float32 = _report_only(tmp_path, "--dtype", "float32").settings
    assert float32.words.autocast is None and nt.cache_key(float32) != nt.cache_key(nt.QUICK)
    assert default.settings.smol.train_bf16 and not float32.smol.train_bf16  # --dtype covers SmolLM2 too


def test_nontermination_refuses_a_missing_device_and_a_bad_dtype(tmp_path, no_cuda, capsys):
    with pytest.raises(SystemExit):
        _report_only(tmp_path, "--device", "cuda")
    assert "no CUDA device" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        _report_only(tmp_path, "--dtype", "float16")
    assert "invalid choice" in capsys.readouterr().err


def test_mt_bleu_dtype_overrides_both_phases_and_auto_keeps_the_tier(no_cuda, capsys):
    standard = mt_bleu.settings_from_args(mt_bleu.parse_args(["--standard"]))
    assert standard.base_bf16 and not standard.finetune_bf16
    forced = mt_bleu.settings_from_args(mt_bleu.parse_args(["--standard", "--dtype", "float32", "--device", "cpu"]))
    assert not forced.base_bf16 and not forced.finetune_bf16
    everything = mt_bleu.settings_from_args(mt_bleu.parse_args(["--dtype", "bfloat16"]))
    assert everything.base_bf16 and everything.finetune_bf16
    with pytest.raises(SystemExit):
        mt_bleu.parse_args(["--bf16", "all", "--dtype", "float32"])
    assert "give one" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        mt_bleu.parse_args(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err


def test_mt_bleu_auto_on_cuda_trains_every_phase_in_bfloat16(cuda):
    settings = mt_bleu.settings_from_args(mt_bleu.parse_args(["--quick"]))
    assert settings.base_bf16 and settings.finetune_bf16
