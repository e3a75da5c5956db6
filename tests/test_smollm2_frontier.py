"""benchmarks.smollm2_frontier: the whole code path on a tiny Llama standing in for SmolLM2 (fine-tunes,
continuations, MGS, cells, report, resume), and the report's refusal to mix budgets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import benchmarks.nontermination_cells as cells_module
import benchmarks.smollm2 as smol_module
import benchmarks.smollm2_frontier as frontier
from benchmarks.smollm2 import SmolSettings
from benchmarks.smollm2_frontier_report import check_budgets
from training.mgs import MGSConfig

from .tiny_models import tiny_smollm2

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2" / "test.txt").is_file(), reason="WikiText-2 not found")

TINY = frontier.FrontierSettings(
    smol=SmolSettings(prompts=3, eval_lines=4, finetune_tokens=300, train_layers=1, batch_tokens=256,
                      checkpoint_every=2),
    epsilons=(0.2,),  # T(0.2) = 4 <= L = 12
    continuation=frontier.ContinuationSettings(cpu_seconds=1e6, max_updates=2, mgs=MGSConfig(num_candidates=2),
                                               decode_rows=3, max_reference_tokens=40),
    max_new_tokens=12,
)  # fmt: skip


def _run(tmp_path: Path, *extra: str) -> frontier.FrontierResult:
    argv = ["--data-dir", str(DATA), "--out", str(tmp_path / "out"), "--cache-dir", str(tmp_path / "cache"),
            "--no-progress", *extra]  # fmt: skip
    return frontier.main(argv, settings=TINY)


@needs_data
def test_frontier_code_path_with_a_tiny_llama(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smol_module, "load_smollm2", tiny_smollm2)
    result = _run(tmp_path)
    names = ["ft-vanilla", "ft-st-2e-1", "ft-nmst-2e-1", "ft-vanilla+mle", "ft-vanilla+mgs"]
    assert list(result.records) == names and not result.missing
    assert [(c.model, c.decoder) for c in result.cells] == [(n, d) for n in names for d in TINY.decoders]
    cells = {(c.model, c.decoder): c for c in result.cells}
    for name in ("ft-st-2e-1", "ft-nmst-2e-1"):  # greedy stops within T(0.2) = 4
        assert cells[name, "greedy"].nontermination == [0.0] and max(cells[name, "greedy"].lengths) <= 4
    tokens = {record["finetune_tokens"] for record in result.records.values()}
    assert len(tokens) == 1 and tokens.pop() >= 300  # every model: the same fine-tuning tokens
    for name in ("ft-vanilla+mle", "ft-vanilla+mgs"):
        continuation = result.records[name]["continuation"]
        assert continuation["updates"] == 2 and continuation["stopped_by"] == "order"
    logs = result.records["ft-vanilla+mgs"]["continuation"]["mgs_logs"]
    assert len(logs) == 2 and all(0.0 <= log["cost_before"] <= 1.0 for log in logs)
    # the continuations moved away from ft-vanilla, differently
    perplexities = {name: result.records[name]["test_perplexity"] for name in names}
    assert len({perplexities["ft-vanilla"], perplexities["ft-vanilla+mle"], perplexities["ft-vanilla+mgs"]}) == 3
    report = json.loads((tmp_path / "out" / "smollm2-frontier.json").read_text())
    assert report["command"].startswith("python -m benchmarks.smollm2_frontier")
    assert [row["model"] for row in report["frontier"]] == names
    assert report["frontier"][1]["termination_bound"] == 4
    assert report["frontier"][1]["predicted_perplexity_factor"] > 1.0
    markdown = (tmp_path / "out" / "smollm2-frontier.md").read_text()
    assert "## Frontier" in markdown and "Moonshot" in markdown and "MGS vs the MLE continuation" in markdown

    # a second run recomputes nothing: fine-tuning or decoding would fail here
    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("recomputed a cached result")

    monkeypatch.setattr(smol_module, "load_smollm2", forbidden)
    monkeypatch.setattr(cells_module, "decode_cell", forbidden)
    again = _run(tmp_path, "--models", "ft-vanilla*")
    assert list(again.records) == ["ft-vanilla", "ft-vanilla+mle", "ft-vanilla+mgs"]
    assert again.records["ft-vanilla+mgs"] == result.records["ft-vanilla+mgs"]


def test_cli_rejects_unknown_models(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        frontier.main(["--models", "ft-gpt9"], settings=TINY)
    assert "unknown model 'ft-gpt9'" in capsys.readouterr().err
    with pytest.raises(ValueError, match="token-level"):
        frontier.ContinuationSettings(cost=("bleu",))


def _record(tokens: int, *, layers: int = 4, budget: float | None = None) -> dict:
    record = {"test_perplexity": 20.0, "finetune_tokens": tokens, "trained_layers": layers, "finetune_seconds": 1.0}
    if budget is not None:
        record["continuation"] = {"budget_cpu_seconds": budget, "max_updates": None, "seconds": 1.0}
    return record


def test_report_refuses_to_mix_budgets() -> None:
    check_budgets({"ft-vanilla": _record(200_000), "ft-st-1e-3": _record(200_000)})  # equal: fine
    with pytest.raises(ValueError, match="different finetune_tokens"):
        check_budgets({"ft-vanilla": _record(200_000), "ft-st-1e-3": _record(100_000)})
    with pytest.raises(ValueError, match="different trained_layers"):
        check_budgets({"ft-vanilla": _record(200_000), "ft-st-1e-3": _record(200_000, layers=2)})
    with pytest.raises(ValueError, match="different update budgets"):
        check_budgets({"ft-vanilla+mle": _record(200_000, budget=600.0),
                       "ft-vanilla+mgs": _record(200_000, budget=1200.0)})  # fmt: skip


def test_report_refuses_continuations_on_different_devices() -> None:
    on = {device: _record(200_000, budget=600.0) for device in ("cpu", "cuda")}
    on["cuda"]["continuation"]["device"] = "cuda"
    check_budgets({"ft-vanilla+mle": on["cpu"], "ft-vanilla+mgs": _record(200_000, budget=600.0)})  # old: the CPU
    with pytest.raises(ValueError, match="different update budgets"):
        check_budgets({"ft-vanilla+mle": on["cpu"], "ft-vanilla+mgs": on["cuda"]})


def test_cli_refuses_a_missing_device_before_any_work(capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.setattr(frontier.torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit):
        frontier.main(["--device", "cuda", "--list"], settings=TINY)
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err


def test_dtype_float32_turns_the_fine_tunes_bf16_off_and_changes_the_cache_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # fmt: skip
    seen = []
    monkeypatch.setattr(frontier, "run_frontier", lambda settings, **kwargs: seen.append((settings, kwargs)))
    import benchmarks.smollm2_frontier_report as report_module

    monkeypatch.setattr(report_module, "write_report", lambda *args, **kwargs: [])
    for dtype in ("auto", "float32", "bfloat16"):
        _run(tmp_path, "--device", "cpu", "--dtype", dtype)
    (auto, auto_kw), (f32, _), (bf16, _) = seen
    assert auto.smol.train_bf16 and bf16.smol.train_bf16 and not f32.smol.train_bf16  # auto: the tier's own
    assert auto_kw["device"] == frontier.torch.device("cpu")
    assert frontier.cache_key(auto) == frontier.cache_key(bf16) != frontier.cache_key(f32)


def test_report_refuses_a_result_that_mixes_budgets(tmp_path: Path) -> None:
    result = frontier.FrontierResult(TINY, records={"ft-vanilla": _record(300), "ft-nmst-2e-1": _record(600)})
    env = {"commit": "x", "dirty": False, "machine": "m", "torch": "t", "torch_threads": 1, "date": "d"}
    from benchmarks.smollm2_frontier_report import write_report

    with pytest.raises(ValueError, match="different finetune_tokens"):
        write_report(tmp_path, result, command="c", env=env, wall_seconds=0.0)
    assert not list(tmp_path.iterdir())  # nothing written
