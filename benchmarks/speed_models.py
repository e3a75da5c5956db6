"""The models :mod:`benchmarks.speed` times, each a :class:`Subject` with its prompts' tokenisation.

SmolLM2-135M-Instruct (:func:`benchmarks.smollm2.load_smollm2`), GPT-2-small and tiny GPT-2 configs with
random weights, the library's LSTM LM (trained, or random weights in a chaotic regime), the quick
non-termination benchmark's self-terminating SmolLM2 fine-tunes (with :class:`SelfTerminatingProcessor`,
the same head inside ``model.generate``), and SmolLM2 converted to CTranslate2 (:func:`ct2_model_dir`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from benchmarks import smollm2
from benchmarks.common import REPO, cache_root
from benchmarks.nontermination_settings import QUICK, cache_key, default_cache_dir

__all__ = ["MODELS", "Subject", "wikitext_prompts", "smollm2_subject", "gpt2_config_model", "load_lstm",
           "SelfTerminatingProcessor", "load_smollm2_self_terminating", "ct2_model_dir", "load_subjects"]

DATA_DIR = REPO.parent / "shared" / "data"
MODELS = ("smollm2", "gpt2-small", "gpt2-tiny", "lstm", "smollm2-st", "smollm2-nmst")


@dataclass
class Subject:
    """A model under test with its prompts (equal-length rows for section 1, word-level lines for 2)."""

    name: str
    model: Any
    eos_token_id: int
    pad_token_id: int
    is_hf: bool
    tokenizer: Any = None
    encode: Callable[[list[str]], list[int]] | None = None   # words -> ids (the model's own tokenisation)
    ct2_dir: Path | None = None
    # what model.generate runs when that is not ``model`` itself (a self-terminating fine-tune: the base
    # model, plus fresh logits processors per call that apply the same head)
    baseline_model: Any = None
    baseline_processors: Callable[[], list] | None = None

    @property
    def device(self) -> torch.device:
        """Where the model is (inputs go there)."""
        return next(self.model.parameters()).device

    def hf_generate(self, input_ids: torch.LongTensor, mask: torch.LongTensor, *, logits_processor: Sequence = (),
                    **options: Any) -> torch.LongTensor:
        """``model.generate`` on the same inputs (the base model with the head's processor first, if any)."""
        model = self.baseline_model if self.baseline_model is not None else self.model
        head = self.baseline_processors() if self.baseline_processors is not None else []
        return model.generate(input_ids, attention_mask=mask, logits_processor=[*head, *logits_processor], **options)


def wikitext_prompts(count: int, *, words: int = 10) -> list[list[str]]:
    """The first ``words`` whitespace tokens of the first ``count`` non-empty, non-heading test lines."""
    prompts = []
    with open(DATA_DIR / "wikitext-2" / "test.txt", encoding="utf-8") as handle:
        for line in handle:
            tokens = line.split()
            if not tokens or (tokens[0] == "=" and tokens[-1] == "="):
                continue
            prompts.append(tokens[:words])
            if len(prompts) == count:
                break
    return prompts


def smollm2_subject() -> Subject:
    """SmolLM2-135M-Instruct (:func:`benchmarks.smollm2.load_smollm2`), prompts in its own tokens."""
    model, tokenizer = smollm2.load_smollm2()
    return Subject(
        name="SmolLM2-135M", model=model, eos_token_id=int(tokenizer.eos_token_id),
        pad_token_id=int(tokenizer.pad_token_id), is_hf=True, tokenizer=tokenizer,
        encode=lambda words: tokenizer(" ".join(words), add_special_tokens=False)["input_ids"],
    )


def gpt2_config_model(name: str, *, n_embd: int, n_layer: int, n_head: int, encode) -> Subject:
    """A GPT-2 with random weights (seeded) and GPT-2's vocabulary size, prompts in SmolLM2's token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_embd=n_embd, n_layer=n_layer, n_head=n_head, bos_token_id=50256, eos_token_id=50256,
                        pad_token_id=50256)
    return Subject(name=name, model=GPT2LMHeadModel(config).eval(), eos_token_id=50256, pad_token_id=50256,
                   is_hf=True, encode=encode)


def load_lstm(checkpoint: str | None) -> Subject:
    """The library's 2-layer 512-unit LSTM LM over the WikiText-2 vocabulary.

    With ``checkpoint`` (a :func:`decoding.models.save_recurrent_lm` file) the trained model; otherwise
    random weights scaled into a chaotic regime (embeddings x10, recurrent weights x5) with an eos output
    bias of +5, so that greedy rows stop after a roughly geometric number of steps (mean ~100) instead of
    all collapsing onto one fixed point, as an untouched random LSTM does.
    """
    from benchmarks.datasets import Vocabulary, load_wikitext
    from decoding.models import load_recurrent_lm, lstm_lm

    vocab = Vocabulary.build(load_wikitext(DATA_DIR, splits=("train",))["train"])
    if checkpoint:
        model = load_recurrent_lm(checkpoint).eval()
    else:
        torch.manual_seed(0)
        model = lstm_lm(len(vocab), eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id).eval()
        with torch.no_grad():
            model.embedding.weight.mul_(10.0)
            for name, weight in model.rnn.named_parameters():
                if "weight" in name:
                    weight.mul_(5.0)
            model.output.bias[vocab.eos_id] = 5.0
    return Subject(name="LSTM-LM", model=model, eos_token_id=vocab.eos_id, pad_token_id=vocab.pad_id,
                   is_hf=False, encode=vocab.encode)


class SelfTerminatingProcessor:
    """A self-terminating head inside ``model.generate`` (the baseline for ST/NMST fine-tunes): turns each
    step's raw logits into the head's log-probabilities, keeping every row's running state between calls.

    Only for greedy decoding and sampling, where transformers never reorders rows; one instance per call.
    """

    def __init__(self, *, kind: str, epsilon: float, eos_token_id: int) -> None:
        self.kind, self.epsilon, self.eos_token_id = kind, epsilon, eos_token_id
        self.state: torch.Tensor | None = None   # [B] the head's running state

    def __call__(self, input_ids: torch.LongTensor, scores: torch.Tensor) -> torch.Tensor:
        from decoding.self_terminating import self_terminating_step

        log_probs, self.state = self_terminating_step(scores, self.state, kind=self.kind, epsilon=self.epsilon,
                                                      eos_token_id=self.eos_token_id)
        return log_probs


def load_smollm2_self_terminating(kind: str, folder: Path | None) -> Subject:
    """SmolLM2-135M with the ``kind`` ("st"/"nmst") fine-tune of the quick non-termination benchmark.

    The fine-tune (top layers and eos head) is read from ``folder`` (default: that benchmark's cache for
    its quick settings); run ``python -m benchmarks.nontermination --quick`` first to make it.
    """
    from decoding.self_terminating import make_self_terminating

    folder = folder or default_cache_dir() / cache_key(QUICK) / "models"
    weights = folder / f"smollm2-ft-{kind}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no SmolLM2 {kind} fine-tune; run python -m benchmarks.nontermination "
                                "--quick first (or pass --smollm2-finetunes)")
    subject = smollm2_subject()
    model, eos = subject.model, subject.eos_token_id
    model.lm_head = smollm2.EosHead(model.model.embed_tokens.weight, eos)
    state = torch.load(weights, map_location="cpu", weights_only=True)
    _, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or not set(state) <= {name for name, _ in model.named_parameters()}:
        raise RuntimeError(f"{weights} does not fit SmolLM2: unexpected {sorted(unexpected)[:5]}")
    epsilon = QUICK.smol.epsilon
    subject.name = f"SmolLM2-135M-{kind.upper()}"
    subject.baseline_model = model
    subject.model = make_self_terminating(model, kind=kind, epsilon=epsilon, eos_token_id=eos)
    subject.baseline_processors = lambda: [SelfTerminatingProcessor(kind=kind, epsilon=epsilon, eos_token_id=eos)]
    return subject


def ct2_model_dir(subject: Subject) -> tuple[Path | None, str]:
    """Convert a transformers model to CTranslate2 fp32 once (cached outside the repo).

    Returns:
        ``(folder, note)``: the converted model, or None with the reason it cannot run.
    """
    try:
        import ctranslate2  # noqa: F401
        from ctranslate2.converters import TransformersConverter
    except ImportError:
        return None, "ctranslate2 is not installed (pip install ctranslate2): column skipped"
    if subject.tokenizer is None:
        return None, f"{subject.name}: no tokenizer to convert with"
    target = cache_root() / f"ct2-{subject.name}-fp32"
    try:
        if not (target / "model.bin").exists():
            with tempfile.TemporaryDirectory() as folder:
                _plain_copy(subject.model).save_pretrained(folder)
                subject.tokenizer.save_pretrained(folder)
                TransformersConverter(folder).convert(str(target), quantization="float32", force=True)
    except Exception as error:  # an optional column: report why and go on
        return None, f"{subject.name}: CTranslate2 conversion failed: {error!r}"
    return target, f"{subject.name}: converted to CTranslate2 float32 at {target}"


def _plain_copy(model: torch.nn.Module) -> torch.nn.Module:
    """The same weights in a fresh model without the GGUF quantisation tag (which blocks save_pretrained)."""
    from transformers import AutoModelForCausalLM

    config = model.config.__class__.from_dict(
        {k: v for k, v in model.config.to_dict().items() if k != "quantization_config"})
    fresh = AutoModelForCausalLM.from_config(config)
    fresh.load_state_dict(model.state_dict())
    return fresh.eval()


def load_subjects(names: list[str], *, ctranslate2: bool, lstm_checkpoint: str | None, smollm2_finetunes: Path | None,
                  notes: list[str], device: torch.device | str = "cpu") -> list[Subject]:
    """Build the requested models (``names`` from :data:`MODELS`) on ``device``; SmolLM2 also provides the
    tokenizer the GPT-2 configs' prompts use. With ``ctranslate2``, SmolLM2 is converted too and a note on
    how that went is appended to ``notes``."""
    subjects: list[Subject] = []
    smol = smollm2_subject() if any(n in names for n in ("smollm2", "gpt2-small", "gpt2-tiny")) else None
    if "smollm2" in names:
        if ctranslate2:
            smol.ct2_dir, note = ct2_model_dir(smol)
            notes.append(note)
        subjects.append(smol)
    if "gpt2-small" in names:
        subjects.append(gpt2_config_model("GPT-2-small-config", n_embd=768, n_layer=12, n_head=12,
                                          encode=smol.encode))
    if "gpt2-tiny" in names:
        subjects.append(gpt2_config_model("GPT-2-tiny-config", n_embd=96, n_layer=2, n_head=2, encode=smol.encode))
    if "lstm" in names:
        subjects.append(load_lstm(lstm_checkpoint))
    for kind in ("st", "nmst"):
        if f"smollm2-{kind}" in names:
            subjects.append(load_smollm2_self_terminating(kind, smollm2_finetunes))
    for subject in subjects:
        subject.model.to(device)
        if subject.baseline_model is not None:
            subject.baseline_model.to(device)
    return subjects
