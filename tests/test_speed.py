"""benchmarks.speed's workload cell on a tiny model (contenders, identical-token checks, ratios), its command
line, report and the self-terminating baseline processor."""

from __future__ import annotations

import pytest

from benchmarks.speed import workload_cell
from benchmarks.speed_models import Subject
from benchmarks.speed_report import markdown
from tests.tiny_models import EOS, PAD, VOCAB, tiny_model


def _subject() -> Subject:
    return Subject(name="tiny-gpt2", model=tiny_model("gpt2"), eos_token_id=EOS, pad_token_id=PAD, is_hf=True,
                   encode=lambda words: [3 + (sum(map(ord, word)) % (VOCAB - 3)) for word in words])


META = {"command": "x", "commit": "c", "dirty": False, "date": "d", "machine": "m", "torch_threads": 1,
        "wall_seconds": 1.0, "loadavg_start": (0.0,), "loadavg_end": (0.0,), "torch": "t", "transformers": "t",
        "ctranslate2": None}
PROMPTS = [f"w{i} x{i * 7} y{i % 3} z".split()[: 2 + i % 3] for i in range(6)]


@pytest.mark.parametrize("strategy", ["greedy", "beam4"])
def test_workload_search_matches_transformers(strategy):
    cell = workload_cell(_subject(), PROMPTS, strategy=strategy, max_new=12, batch_size=4, repeats=1)
    assert cell["identical"] is True
    assert set(cell["totals"]) == {"transformers", "ours", "ours-refill"}
    assert cell["totals"]["ours"]["rows"] == cell["totals"]["ours-refill"]["rows"] == len(PROMPTS)
    assert cell["ratio_consistent"] is None
    assert cell["refill_identical"] is True
    assert set(cell["ratio_refill"]) == {"wall", "cpu"}
    assert 0 < cell["row_step_share"] <= 1


def test_workload_sampling_times_the_consistent_sampler_in_both_loops():
    cell = workload_cell(_subject(), PROMPTS, strategy="nucleus0.4", max_new=12, batch_size=4, repeats=1)
    assert set(cell["totals"]) == {"transformers", "ours", "ours-consistent", "transformers-consistent",
                                   "ours-refill", "ours-consistent-refill"}
    assert cell["identical"] is None  # different random streams: not comparable token for token
    assert set(cell["ratio_consistent"]) == {"wall", "cpu"}
    assert set(cell["ratio_consistent_refill"]) == {"wall", "cpu"}
    assert "consistent-nucleus0.4 | transformers-consistent" in markdown(META, [], [cell])


def test_parse_args_checks_repeats_and_strategies(capsys):
    from benchmarks.speed import parse_args

    assert parse_args(["--repeats", "7"]).repeats == 7
    assert parse_args([]).repeats is None
    for bad in (["--repeats", "0"], ["--strategies", "greedy,topk"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert "--repeats must be >= 1" in capsys.readouterr().err


def test_device_is_checked_and_every_model_goes_there(capsys, monkeypatch):
    from benchmarks import speed, speed_models

    monkeypatch.setattr(speed.torch.cuda, "is_available", lambda: False)
    assert parse_args_device([]) == parse_args_device(["--device", "cpu"]) == speed.torch.device("cpu")
    with pytest.raises(SystemExit):
        parse_args_device(["--device", "cuda"])
    assert "--device cuda: no CUDA device is available" in capsys.readouterr().err
    subjects = speed_models.load_subjects(["lstm"], ctranslate2=False, lstm_checkpoint=None, smollm2_finetunes=None,
                                          notes=[], device="meta")  # meta stands for a GPU: shapes, no values
    assert [subject.device.type for subject in subjects] == ["meta"]


def parse_args_device(argv: list[str]):
    from benchmarks.speed import parse_args

    return parse_args(argv).device


def test_the_report_names_a_gpu_and_timing_records_no_device_memory_on_the_cpu():
    from benchmarks.speed_report import device_name
    from benchmarks.timing import summary, timed

    run = timed(lambda: sum(range(1000)))
    assert run.output == 499500 and run.peak_device_mb is None and "peak_device_mb" not in summary([run])
    assert device_name("cpu") == "cpu" and "Device:" not in markdown({**META, "device": "cpu"}, [], [])
    assert "Device: cuda:0 (a GPU)" in markdown({**META, "device": "cuda:0 (a GPU)"}, [], [])


def test_self_terminating_processor_reproduces_the_head_inside_model_generate():
    """The baseline for self-terminating fine-tunes: model.generate with the head as a logits processor
    gives the tokens our generate gives on the wrapped model (greedy), batch by batch and refilled."""
    from benchmarks.speed_models import SelfTerminatingProcessor
    from decoding.self_terminating import make_self_terminating

    def sharpen(module, inputs, logits):  # peaked next-token choices, a low eos logit: rows end after 1-10 tokens
        logits = logits * 8.0
        logits[..., EOS] -= 4.0
        return logits

    base = tiny_model("gpt2", seed=2, eos_boost=1.0)
    base.lm_head.register_forward_hook(sharpen)
    subject = _subject()
    subject.model = make_self_terminating(base, kind="nmst", epsilon=0.05, eos_token_id=EOS)
    subject.baseline_model = base
    subject.baseline_processors = lambda: [SelfTerminatingProcessor(kind="nmst", epsilon=0.05, eos_token_id=EOS)]
    cell = workload_cell(subject, PROMPTS, strategy="greedy", max_new=40, batch_size=4, repeats=1)
    assert cell["identical"] is True and cell["refill_identical"] is True
    assert cell["totals"]["ours"]["stopped"] == len(PROMPTS)     # the head ends every row within the bound
    subject.baseline_processors = None                           # without the head: different tokens
    assert workload_cell(subject, PROMPTS, strategy="greedy", max_new=40, batch_size=4, repeats=1)["identical"] is False
