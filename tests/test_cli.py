"""The command line: a local model folder, decoding options, the terminated line, clear errors."""

from __future__ import annotations

import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from decoding.cli import main
from tests.tiny_models import VOCAB, tiny_model


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-gpt2")
    words = ["<bos>", "<eos>", "<pad>"] + [f"w{i}" for i in range(3, VOCAB)]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<eos>", pad_token="<pad>",
                                        bos_token="<bos>")
    tokenizer.save_pretrained(folder)
    tiny_model("gpt2").save_pretrained(folder)
    return folder


def test_cli_decodes_and_reports_termination(model_dir, capsys):
    code = main(["--prompt", "w5 w6 w7", "--prompt", "w9", "--model", str(model_dir), "--max-new-tokens", "6",
                 "--do-sample", "--top-k", "3", "--consistent", "--seed", "1"])
    out = capsys.readouterr().out
    assert code == 0
    assert out.count("--- prompt") == 2
    assert out.count("terminated: ") == 2
    assert "w5 w6 w7" in out


def test_cli_beam_search_with_several_sequences(model_dir, capsys):
    assert main(["--prompt", "w5 w6", "--model", str(model_dir), "--max-new-tokens", "4", "--num-beams", "3",
                 "--num-return-sequences", "2"]) == 0
    assert capsys.readouterr().out.count("sequence ") == 2


def test_cli_missing_model_is_a_clear_error(tmp_path, capsys):
    assert main(["--prompt", "x", "--model", str(tmp_path / "nope")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_streams_by_default_and_no_stream_prints_the_same(model_dir, capsys):
    argv = ["--prompt", "w5 w6 w7", "--model", str(model_dir), "--max-new-tokens", "6", "--do-sample", "--seed", "2"]
    assert main(argv) == 0
    streamed = capsys.readouterr().out
    assert main(argv + ["--no-stream"]) == 0
    assert streamed == capsys.readouterr().out
    assert "terminated: " in streamed


def test_cli_streams_each_row_when_it_ends(model_dir, capsys, monkeypatch):
    import decoding.cli as cli
    calls = []
    original = cli.generate

    def spy(*args, stream=None, **kwargs):
        calls.append(stream)
        return original(*args, stream=stream, **kwargs)

    monkeypatch.setattr(cli, "generate", spy)
    assert main(["--prompt", "w5 w6", "--prompt", "w9", "--model", str(model_dir), "--max-new-tokens", "4"]) == 0
    assert calls[0] is not None
    assert capsys.readouterr().out.count("terminated: ") == 2
