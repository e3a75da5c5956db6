"""Speed and memory of ``decoding.generate`` against ``model.generate``, a hand-written loop and CTranslate2.

``python -m benchmarks.speed [--quick]`` writes ``benchmarks/results/speed.{md,json}``. Every comparison
runs the contenders on the same model, the same inputs and the same settings, alternating them (A, B, A,
B, ... with the order rotated every repeat) in one process, and reports the median and the spread
(min..max) of wall time and of process CPU time. CPU time is the steadier figure on a shared machine:
other jobs stretch wall time but barely change the CPU time a single-threaded run needs.

Two sections:

1. Fixed length (eos disabled with ``min_new_tokens``): greedy, nucleus (top-p 0.9) and beam 4 at batch 1
   and 16 on SmolLM2-135M, a GPT-2-small config, a tiny GPT-2 config and the library's LSTM LM, plus a
   minimal hand-written cache loop around the same forward pass (greedy) as the floor, and CTranslate2
   fp32 where it is installed and can run the model.
2. The non-termination workload: WikiText-2 test prompts (first 10 words), long ``max_new_tokens``,
   greedy / nucleus 0.4 / beam 4 in batches of 32: wall time, generated tokens per second, the share of
   rows that stopped with eos, and whether the tokens are identical. The LSTM has no ``model.generate``:
   there ``drop_finished=True`` is compared with ``drop_finished=False`` of the same loop. With more prompts
   than one batch, ours also decodes all of them in one call with ``max_batch_size`` = the batch size
   (continuous batching), timed against the sum of the baseline's batches. ``--models smollm2-st`` /
   ``smollm2-nmst`` time the quick non-termination benchmark's self-terminating fine-tunes, with
   ``model.generate`` running the same head as a logits processor.

Peak resident memory (the kernel's ``VmHWM``, reset before every run) is recorded for every run.
"""

from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import inspect
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from decoding.generate import generate

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT.parent / "shared" / "data"
RESULTS = ROOT / "benchmarks" / "results"
CACHE = Path(os.environ.get("CONSISTENT_DECODING_CACHE", Path.home() / ".cache" / "consistent-decoding"))
STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "nucleus": {"do_sample": True, "top_p": 0.9},
    "beam4": {"num_beams": 4},
}
WORKLOAD_STRATEGIES: dict[str, dict[str, Any]] = {
    "greedy": {},
    "nucleus0.4": {"do_sample": True, "top_p": 0.4},
    "beam4": {"num_beams": 4},
}


# ------------------------------------------------------------------------------------------- measuring


def _peak_rss_reset() -> bool:
    """Reset the kernel's peak-RSS counter of this process (Linux ``clear_refs`` 5); False if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def _rss_mb(field_name: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (current) of this process in MiB."""
    with open("/proc/self/status") as handle:
        match = re.search(rf"{field_name}:\s+(\d+) kB", handle.read())
    return int(match.group(1)) / 1024 if match else float("nan")


def _release_free_memory() -> None:
    """Collect garbage and hand the allocator's free pages back to the OS (glibc ``malloc_trim``), so that a
    run's peak RSS is not hidden by memory an earlier run freed but the process kept."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


@dataclass
class Run:
    """One timed call."""

    wall_s: float
    cpu_s: float
    peak_rss_mb: float       # the process's peak RSS during the call
    extra_rss_mb: float      # that peak minus the RSS just before the call: what the call itself added
    output: Any = field(repr=False, default=None)


def timed(fn: Callable[[], Any]) -> Run:
    """Call ``fn`` once and record wall time, process CPU time and peak RSS during the call."""
    _release_free_memory()
    before = _rss_mb("VmRSS")
    _peak_rss_reset()
    wall, cpu = time.perf_counter(), time.process_time()
    output = fn()
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    peak = _rss_mb("VmHWM")
    return Run(wall_s=wall, cpu_s=cpu, peak_rss_mb=peak, extra_rss_mb=peak - before, output=output)


def alternate(contenders: dict[str, Callable[[], Any]], *, repeats: int, start: int = 0) -> dict[str, list[Run]]:
    """Run every contender ``repeats`` times, interleaved, the order rotated each repeat (A B C, B C A, ...);
    ``start`` rotates the first repeat too."""
    names = list(contenders)
    runs: dict[str, list[Run]] = {name: [] for name in names}
    for repeat in range(start, start + repeats):
        shift = repeat % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(timed(contenders[name]))
    return runs


def summary(runs: Sequence[Run], *, per: float = 1.0) -> dict[str, float]:
    """Median and min/max of wall and CPU time (divided by ``per``), and the largest peak RSS."""
    walls = [r.wall_s / per for r in runs]
    cpus = [r.cpu_s / per for r in runs]
    return {
        "wall_median": statistics.median(walls), "wall_min": min(walls), "wall_max": max(walls),
        "cpu_median": statistics.median(cpus), "cpu_min": min(cpus), "cpu_max": max(cpus),
        "peak_rss_mb": max(r.peak_rss_mb for r in runs), "extra_rss_mb": max(r.extra_rss_mb for r in runs),
        "repeats": len(runs),
    }


# ------------------------------------------------------------------------------------------------ models


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


def load_smollm2() -> Subject:
    from decoding.pretrained import load_pretrained

    model, tokenizer = load_pretrained()
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
    from benchmarks.nontermination import QUICK, cache_key, default_cache_dir
    from benchmarks.smollm2 import EosHead
    from decoding.self_terminating import make_self_terminating

    folder = folder or default_cache_dir() / cache_key(QUICK) / "models"
    weights = folder / f"smollm2-ft-{kind}.pt"
    if not weights.is_file():
        raise FileNotFoundError(f"{weights}: no SmolLM2 {kind} fine-tune; run python -m benchmarks.nontermination "
                                "--quick first (or pass --smollm2-finetunes)")
    subject = load_smollm2()
    model, eos = subject.model, subject.eos_token_id
    model.lm_head = EosHead(model.model.embed_tokens.weight, eos)
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
    target = CACHE / f"ct2-{subject.name}-fp32"
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


# ----------------------------------------------------------------------------------- decoding contenders


def _cache_keyword(model: torch.nn.Module) -> str:
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _greedy_without_eos(logits: torch.Tensor, eos: int) -> torch.LongTensor:
    """argmax of ``logits [B, V]`` with eos banned (what min_new_tokens does), in place on a fresh tensor."""
    logits[:, eos] = float("-inf")
    return logits.argmax(dim=-1)


@torch.no_grad()
def hand_loop(model: torch.nn.Module, input_ids: torch.LongTensor, steps: int, eos: int) -> torch.LongTensor:
    """The floor: prefill, then ``steps - 1`` cached forward passes with an eos-banned argmax, nothing else.

    Args:
        input_ids: ``[B, T]`` prompts without padding.

    Returns:
        ``[B, T + steps]`` prompt and greedy tokens.
    """
    keyword = _cache_keyword(model)
    outputs = model(input_ids=input_ids, use_cache=True, logits_to_keep=1)
    token = _greedy_without_eos(outputs.logits[:, -1], eos)
    tokens = [token]
    for _ in range(steps - 1):
        cache = outputs.get("cache") or outputs.get("past_key_values")
        outputs = model(input_ids=token[:, None], use_cache=True, **{keyword: cache})
        token = _greedy_without_eos(outputs.logits[:, -1], eos)
        tokens.append(token)
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


@torch.no_grad()
def hand_loop_recurrent(model: Any, input_ids: torch.LongTensor, steps: int, eos: int) -> torch.LongTensor:
    """The floor for the LSTM: ``model.run`` over the prompt, then one step and an argmax per token."""
    hidden, state = model.run(input_ids)
    token = _greedy_without_eos(model.output_logits(hidden[:, -1]), eos)
    tokens = [token]
    for _ in range(steps - 1):
        hidden, state = model.run(token[:, None], None, state)
        token = _greedy_without_eos(model.output_logits(hidden[:, -1]), eos)
        tokens.append(token)
    return torch.cat([input_ids, torch.stack(tokens, dim=1)], dim=1)


def ct2_contender(subject: Subject, input_ids: torch.LongTensor, options: dict[str, Any], *, steps: int,
                  threads: int) -> Callable[[], Any] | None:
    """CTranslate2 fp32 on the same prompts and settings (its own sampler: samples differ)."""
    if subject.ct2_dir is None:
        return None
    import ctranslate2

    generator = ctranslate2.Generator(str(subject.ct2_dir), device="cpu", compute_type="float32",
                                      intra_threads=threads, inter_threads=1)
    prompts = [subject.tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()]
    settings: dict[str, Any] = {"beam_size": options.get("num_beams", 1), "max_length": steps,
                                "min_length": steps, "include_prompt_in_result": False}
    if options.get("do_sample"):
        settings.update(sampling_topk=0, sampling_topp=options["top_p"])

    def run() -> torch.LongTensor:
        results = generator.generate_batch(prompts, **settings)
        return torch.tensor([result.sequences_ids[0] for result in results])

    return run


def normalise(sequences: torch.LongTensor, prefix_len: int, eos: int, pad: int) -> torch.LongTensor:
    """Pad every generated position after a row's first eos and drop all-pad trailing columns, so that
    outputs that differ only in what fills finished rows compare equal."""
    generated = sequences[:, prefix_len:]
    is_eos = generated == eos
    after = (is_eos.long().cumsum(dim=1) - is_eos.long()) > 0
    generated = generated.masked_fill(after, pad)
    lengths = torch.where(is_eos.any(dim=1), is_eos.long().argmax(dim=1) + 1, generated.shape[1])
    width = int(lengths.max()) if lengths.numel() else 0
    return torch.cat([sequences[:, :prefix_len], generated[:, :width]], dim=1)


def generated_stats(sequences: torch.LongTensor, prefix_len: int, eos: int) -> tuple[int, int]:
    """``(generated tokens, rows that stopped with eos)`` of a ``[B, P + G]`` output."""
    generated = sequences[:, prefix_len:]
    is_eos = generated == eos
    stopped = is_eos.any(dim=1)
    lengths = torch.where(stopped, is_eos.long().argmax(dim=1) + 1, generated.shape[1])
    return int(lengths.sum()), int(stopped.sum())


# ------------------------------------------------------------------------------- section 1: fixed length


def fixed_length_contenders(subject: Subject, input_ids: torch.LongTensor, strategy: str, steps: int,
                            threads: int) -> dict[str, Callable[[], Any]]:
    """Our generate, model.generate, the hand-written floor (greedy) and CTranslate2, same settings."""
    model, mask = subject.model, torch.ones_like(input_ids)
    options = dict(STRATEGIES[strategy], max_new_tokens=steps, min_new_tokens=steps,
                   eos_token_id=subject.eos_token_id, pad_token_id=subject.pad_token_id)
    contenders: dict[str, Callable[[], Any]] = {
        "ours": lambda: generate(model, input_ids, mask, generator=torch.Generator().manual_seed(0), **options),
    }
    if subject.is_hf:
        contenders["transformers"] = lambda: model.generate(input_ids, attention_mask=mask, **options)
    if strategy == "greedy":
        floor = hand_loop if subject.is_hf else hand_loop_recurrent
        contenders["floor"] = lambda: floor(model, input_ids, steps, subject.eos_token_id)
    ct2 = ct2_contender(subject, input_ids, options, steps=steps, threads=threads)
    if ct2 is not None:
        contenders["ctranslate2"] = ct2
    return contenders


def fixed_length_cell(subject: Subject, fixed_ids: torch.LongTensor, *, strategy: str, batch: int, steps: int,
                      repeats: int, threads: int) -> dict[str, Any]:
    """Time one (model, strategy, batch) cell: ms per decoding step, ratios and identical-output checks."""
    input_ids = fixed_ids[:batch]
    for warm in fixed_length_contenders(subject, input_ids, strategy, 2, threads).values():
        warm()
    contenders = fixed_length_contenders(subject, input_ids, strategy, steps, threads)
    load = os.getloadavg()[0]
    runs = alternate(contenders, repeats=repeats)
    cell: dict[str, Any] = {"model": subject.name, "strategy": strategy, "batch": batch, "new_tokens": steps,
                            "loadavg_1min": load, "ms_per_step": {}, "ratio": {}, "identical": {}}
    for name, name_runs in runs.items():
        cell["ms_per_step"][name] = {k: (v * 1000 if k[:3] in ("wal", "cpu") else v)
                                     for k, v in summary(name_runs, per=steps).items()}
    ours = runs["ours"][0].output
    prefix = input_ids.shape[1]
    for name in runs:
        if name == "ours":
            continue
        mine, theirs = cell["ms_per_step"]["ours"], cell["ms_per_step"][name]
        cell["ratio"][name] = {"wall": mine["wall_median"] / theirs["wall_median"],
                               "cpu": mine["cpu_median"] / theirs["cpu_median"]}
        if not STRATEGIES[strategy].get("do_sample"):
            other = runs[name][0].output
            if name == "ctranslate2":
                other = torch.cat([input_ids, other], dim=1)
            a = normalise(ours, prefix, subject.eos_token_id, subject.pad_token_id)
            b = normalise(other, prefix, subject.eos_token_id, subject.pad_token_id)
            cell["identical"][name] = a.shape == b.shape and bool(torch.equal(a, b))
    return cell


# ------------------------------------------------------------------------- section 2: the long workload


def workload_contenders(subject: Subject, input_ids: torch.LongTensor, mask: torch.LongTensor, strategy: str,
                        max_new: int, seed: int, *, refill_rows: int | None = None) -> dict[str, Callable[[], Any]]:
    """transformers' generate (or, for the LSTM, our loop keeping finished rows) against ours.

    With ``refill_rows``: only our contenders, decoding all of ``input_ids`` at most ``refill_rows`` rows
    at a time, refilling finished rows with the next prompts (``generate(max_batch_size=...)``).
    """
    options = dict(WORKLOAD_STRATEGIES[strategy], max_new_tokens=max_new, eos_token_id=subject.eos_token_id,
                   pad_token_id=subject.pad_token_id)
    sampling = bool(options.get("do_sample"))

    def ours(*, drop_finished: bool = True, consistent: bool = False) -> Callable[[], Any]:
        return lambda: generate(subject.model, input_ids, mask, generator=torch.Generator().manual_seed(seed),
                                drop_finished=drop_finished, consistent=consistent, max_batch_size=refill_rows,
                                **options)

    if refill_rows is not None:
        contenders = {"ours-refill": ours()}
        if sampling:
            contenders["ours-consistent-refill"] = ours(consistent=True)
        return contenders
    if subject.is_hf:
        contenders = {"transformers": lambda: subject.hf_generate(input_ids, mask, **options), "ours": ours()}
    else:
        contenders = {"ours-keep-finished": ours(drop_finished=False), "ours": ours()}
    if sampling:
        contenders["ours-consistent"] = ours(consistent=True)
        if not subject.is_hf:
            contenders["ours-consistent-keep-finished"] = ours(drop_finished=False, consistent=True)
        if subject.is_hf:  # the same consistent sampler inside transformers' loop, which keeps finished rows
            from decoding.processors import ConsistentTopPLogitsWarper

            plain = dict(options, top_p=1.0, top_k=0)
            contenders["transformers-consistent"] = lambda: subject.hf_generate(
                input_ids, mask, logits_processor=[ConsistentTopPLogitsWarper(options["top_p"], subject.eos_token_id)],
                **plain)
    return contenders


def _generated_rows(sequences: torch.LongTensor, prefix_len: int, subject: Subject) -> list[list[int]]:
    """Each row's generated tokens up to its eos (prompt padding and what fills finished rows dropped)."""
    rows = normalise(sequences, prefix_len, subject.eos_token_id, subject.pad_token_id)[:, prefix_len:].tolist()
    for row in rows:
        while row and row[-1] == subject.pad_token_id:
            row.pop()
    return rows


def _add_total(totals: dict[str, dict[str, float]], name: str, runs: Sequence[Run], *, prefix: int,
               rows: int, eos: int) -> dict[str, float]:
    """Add one batch's median time, tokens and stopped rows of contender ``name`` to its totals."""
    medians = summary(runs)
    tokens, stopped = generated_stats(runs[0].output, prefix, eos)
    total = totals.setdefault(name, {"wall_s": 0.0, "cpu_s": 0.0, "tokens": 0, "rows": 0, "stopped": 0,
                                     "peak_rss_mb": 0.0, "extra_rss_mb": 0.0})
    total["wall_s"] += medians["wall_median"]
    total["cpu_s"] += medians["cpu_median"]
    total["tokens"] += tokens
    total["rows"] += rows
    total["stopped"] += stopped
    total["peak_rss_mb"] = max(total["peak_rss_mb"], medians["peak_rss_mb"])
    total["extra_rss_mb"] = max(total["extra_rss_mb"], medians["extra_rss_mb"])
    return medians


def workload_cell(subject: Subject, prompts: list[list[str]], *, strategy: str, max_new: int, batch_size: int,
                  repeats: int, refill: bool = True) -> dict[str, Any]:
    """Decode all prompts in batches, contenders alternating within each batch (``repeats`` rounds, median
    time per batch); totals over batches and per-batch ratios.

    With ``refill`` (more prompts than one batch): then also all prompts in one call of ours with
    ``max_batch_size`` = the rows of one batch (continuous batching), its contenders alternating with each
    other; its tokens are checked against the baseline's batches (greedy and beam).
    """
    from benchmarks.datasets import prompt_batch

    baseline = "transformers" if subject.is_hf else "ours-keep-finished"
    sampling = bool(WORKLOAD_STRATEGIES[strategy].get("do_sample"))
    totals: dict[str, dict[str, float]] = {}
    batch_ratios: list[dict[str, float]] = []
    identical, row_steps = True, 0
    baseline_rows: list[list[int]] = []
    load = os.getloadavg()[0]
    for index, start in enumerate(range(0, len(prompts), batch_size)):
        ids = [subject.encode(words) for words in prompts[start:start + batch_size]]
        input_ids, mask = prompt_batch(ids, pad_id=subject.pad_token_id)
        runs = alternate(workload_contenders(subject, input_ids, mask, strategy, max_new, seed=index),
                         repeats=repeats, start=index)
        prefix = input_ids.shape[1]
        medians = {name: _add_total(totals, name, name_runs, prefix=prefix, rows=input_ids.shape[0],
                                    eos=subject.eos_token_id) for name, name_runs in runs.items()}
        baseline_output = runs[baseline][0].output
        baseline_rows += _generated_rows(baseline_output, prefix, subject)
        row_steps += baseline_output.shape[0] * (baseline_output.shape[1] - prefix)
        batch_ratios.append({key: medians["ours"][f"{key}_median"] / medians[baseline][f"{key}_median"]
                             for key in ("wall", "cpu")})
        if not sampling or not subject.is_hf:
            a, b = (normalise(runs[n][0].output, prefix, subject.eos_token_id, subject.pad_token_id)
                    for n in ("ours", baseline))
            identical = identical and a.shape == b.shape and bool(torch.equal(a, b))
    refill_identical = None
    if refill and len(prompts) > batch_size:
        input_ids, mask = prompt_batch([subject.encode(words) for words in prompts], pad_id=subject.pad_token_id)
        rows = batch_size * WORKLOAD_STRATEGIES[strategy].get("num_beams", 1)   # the baseline's batch, in rows
        runs = alternate(workload_contenders(subject, input_ids, mask, strategy, max_new, seed=0,
                                             refill_rows=rows), repeats=repeats)
        for name, name_runs in runs.items():
            _add_total(totals, name, name_runs, prefix=input_ids.shape[1], rows=input_ids.shape[0],
                       eos=subject.eos_token_id)
        if not sampling:
            refill_identical = _generated_rows(runs["ours-refill"][0].output, input_ids.shape[1], subject) == baseline_rows
    for total in totals.values():
        total["tokens_per_s"] = total["tokens"] / total["wall_s"]
        total["stopped_share"] = total["stopped"] / total["rows"]
    comparable = not sampling or not subject.is_hf
    consistent_baseline = "transformers-consistent" if subject.is_hf else "ours-consistent-keep-finished"

    def ratio(mine: str, theirs: str) -> dict[str, float] | None:
        if mine not in totals or theirs not in totals:
            return None
        return {key: totals[mine][f"{key}_s"] / totals[theirs][f"{key}_s"] for key in ("wall", "cpu")}

    return {
        "model": subject.name, "strategy": strategy, "prompts": len(prompts), "batch_size": batch_size,
        "max_new_tokens": max_new, "repeats": repeats, "baseline": baseline, "loadavg_1min": load,
        "totals": totals,
        # the ratio if a step cost were proportional to the rows in it: ours' tokens over the baseline's
        # rows x steps (beam search: its rows are prompts, each step costs num_beams rows)
        "row_step_share": totals["ours"]["tokens"] / row_steps,
        "ratio_total": {"wall": totals["ours"]["wall_s"] / totals[baseline]["wall_s"],
                        "cpu": totals["ours"]["cpu_s"] / totals[baseline]["cpu_s"]},
        # consistent sampling: ours against the same warper inside model.generate, or inside our loop keeping
        # finished rows (the LSTM); different RNG streams
        "consistent_baseline": consistent_baseline,
        "ratio_consistent": ratio("ours-consistent", consistent_baseline),
        # continuous batching: all prompts in one call, at most batch_size rows at once, against the baseline's
        # batches
        "ratio_refill": ratio("ours-refill", baseline),
        "ratio_consistent_refill": ratio("ours-consistent-refill", consistent_baseline),
        "refill_identical": refill_identical,
        "ratio_per_batch": {key: {"median": statistics.median(r[key] for r in batch_ratios),
                                  "min": min(r[key] for r in batch_ratios),
                                  "max": max(r[key] for r in batch_ratios)} for key in ("wall", "cpu")},
        "identical": identical if comparable else None,
    }


# ------------------------------------------------------------------------------------------------ report


def machine_info(threads: int) -> dict[str, Any]:
    """Where and when the figures were taken: commit, CPU, threads, library versions, load."""
    import transformers

    def git(*args: str) -> str:
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return "unknown"

    cpu = "unknown"
    if Path("/proc/cpuinfo").exists():
        found = re.search(r"model name\s*:\s*(.+)", Path("/proc/cpuinfo").read_text())
        cpu = found.group(1) if found else cpu
    try:
        import ctranslate2
        ct2_version = ctranslate2.__version__
    except ImportError:
        ct2_version = None
    return {
        "command": "python -m benchmarks.speed " + " ".join(sys.argv[1:]),
        "commit": git("rev-parse", "--short", "HEAD"),
        "decoding_files_dirty": bool(git("status", "--porcelain", "decoding")),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": f"{cpu}, {os.cpu_count()} logical CPUs, {platform.system()} {platform.release()}",
        "torch_threads": threads, "python": platform.python_version(), "torch": torch.__version__,
        "transformers": transformers.__version__, "ctranslate2": ct2_version,
        "loadavg_start": os.getloadavg(),
    }


def _spread(stats: dict[str, float], key: str) -> str:
    return f"{stats[key + '_median']:.2f} ({stats[key + '_min']:.2f}..{stats[key + '_max']:.2f})"


def _number(values: dict[str, float] | None, key: str) -> str:
    return "" if values is None else f"{values[key]:.2f}"


def markdown(meta: dict[str, Any], fixed: list[dict[str, Any]], workload: list[dict[str, Any]]) -> str:
    """The results as Markdown tables."""
    lines = [
        "# Decoding speed: decoding.generate vs model.generate", "",
        f"Command: `{meta['command']}`  ", f"Commit: {meta['commit']}  ", f"Date: {meta['date']}  ",
        f"Machine: {meta['machine']}; torch threads: {meta['torch_threads']}; load average at start "
        f"{meta['loadavg_start'][0]:.1f}, at end {meta['loadavg_end'][0]:.1f} (a machine shared with other jobs: "
        "read the CPU-time columns first)  ",
        f"torch {meta['torch']}, transformers {meta['transformers']}, ctranslate2 {meta['ctranslate2']}", "",
        "## 1. Fixed length (eos disabled by min_new_tokens)", "",
        "ms per decoding step, median (min..max) over alternating repeats; ratio = ours / other on the medians "
        "(< 1: ours faster); same = identical tokens.", "",
        "| model | strategy | batch | contender | wall ms/step | CPU ms/step | ratio wall | ratio CPU | same | "
        "peak RSS MiB (+ added by the run) |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in fixed:
        for name, stats in cell["ms_per_step"].items():
            ratio = cell["ratio"].get(name)
            same = cell["identical"].get(name)
            lines.append(
                f"| {cell['model']} | {cell['strategy']} | {cell['batch']} | {name} | {_spread(stats, 'wall')} | "
                f"{_spread(stats, 'cpu')} | {_number(ratio, 'wall')} | {_number(ratio, 'cpu')} | "
                f"{'' if same is None else same} | "
                f"{stats['peak_rss_mb']:.0f} (+{stats['extra_rss_mb']:.0f}) |")
    lines += [
        "", "## 2. Non-termination workload (WikiText-2 test prompts, first 10 words)", "",
        "Totals over all batches; ratio = ours / baseline on total time, and the per-batch ratio median "
        "(min..max). The LSTM baseline is our own loop with drop_finished=False (it has no model.generate). "
        "The -refill contenders decode all prompts in one call with max_batch_size = the batch size (continuous "
        "batching: rows that finish are refilled with the next prompts), timed against the sum of the "
        "baseline's batches.", "",
        "| model | strategy | prompts x L | contender | wall s | CPU s | tokens | tokens/s | stopped | "
        "peak RSS MiB (+ added by the run) |", "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for cell in workload:
        for name, total in cell["totals"].items():
            lines.append(
                f"| {cell['model']} | {cell['strategy']} | {cell['prompts']} x {cell['max_new_tokens']} | {name} | "
                f"{total['wall_s']:.1f} | {total['cpu_s']:.1f} | {total['tokens']} | {total['tokens_per_s']:.1f} | "
                f"{total['stopped_share']:.0%} | {total['peak_rss_mb']:.0f} (+{total['extra_rss_mb']:.0f}) |")
    lines += ["", "Row-step share: our generated tokens over the baseline's rows x steps, the time ratio a decoder "
              "whose step cost is proportional to its rows would reach.", "",
              "| model | strategy | baseline | ratio wall (total) | ratio CPU (total) | per-batch wall | "
              "per-batch CPU | row-step share | identical tokens |", "|---|---|---|---|---|---|---|---|---|"]
    for cell in workload:
        per = cell["ratio_per_batch"]
        lines.append(
            f"| {cell['model']} | {cell['strategy']} | {cell['baseline']} | {cell['ratio_total']['wall']:.2f} | "
            f"{cell['ratio_total']['cpu']:.2f} | {per['wall']['median']:.2f} ({per['wall']['min']:.2f}.."
            f"{per['wall']['max']:.2f}) | {per['cpu']['median']:.2f} ({per['cpu']['min']:.2f}..{per['cpu']['max']:.2f})"
            f" | {cell['row_step_share']:.2f} | "
            f"{'n/a (sampling, different RNG)' if cell['identical'] is None else cell['identical']} |")
        extra = [("consistent-", "ours-consistent", cell.get("consistent_baseline", "transformers-consistent"),
                  cell.get("ratio_consistent"), None),
                 ("refill ", "ours-refill", cell["baseline"], cell.get("ratio_refill"), cell.get("refill_identical")),
                 ("refill consistent-", "ours-consistent-refill", cell.get("consistent_baseline"),
                  cell.get("ratio_consistent_refill"), None)]
        for label, _, against, values, same in extra:
            if values is not None:
                lines.append(
                    f"| {cell['model']} | {label}{cell['strategy']} | {against} | {values['wall']:.2f} | "
                    f"{values['cpu']:.2f} | | | | {'n/a (sampling, different RNG)' if same is None else same} |")
    return "\n".join(lines) + "\n"


# -------------------------------------------------------------------------------------------------- main


@dataclass(frozen=True)
class Plan:
    """How much to run: the full plan took 33 minutes on 2 idle cores (2 threads), --quick ~8."""

    repeats: int
    small_steps: int            # new tokens per fixed-length run, tiny GPT-2 and LSTM
    large_steps: int            # ... SmolLM2 and GPT-2 small
    smollm2_prompts: int        # workload prompts, greedy and nucleus
    smollm2_length: int
    smollm2_beam_prompts: int   # ... beam 4 (each prompt is 4 rows)
    lstm_prompts: int
    lstm_length: int
    smollm2_repeats: int = 2    # alternating rounds per workload batch (the LSTM's gaps are wide: 1)
    batch_size: int = 32


PLANS = {
    "full": Plan(repeats=3, small_steps=48, large_steps=12, smollm2_prompts=16, smollm2_length=1000,
                 smollm2_beam_prompts=4, lstm_prompts=64, lstm_length=1000, smollm2_repeats=1),
    "quick": Plan(repeats=3, small_steps=24, large_steps=6, smollm2_prompts=32, smollm2_length=24,
                  smollm2_beam_prompts=8, lstm_prompts=64, lstm_length=200, smollm2_repeats=1),
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (~8 minutes)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: steadier on a shared machine)")
    parser.add_argument("--sections", default="fixed,workload", help="comma list of: fixed, workload")
    parser.add_argument("--models", default="smollm2,gpt2-small,gpt2-tiny,lstm",
                        help="comma list of: smollm2, gpt2-small, gpt2-tiny, lstm, smollm2-st, smollm2-nmst (the "
                             "last two: the quick non-termination benchmark's fine-tunes, workload section only)")
    parser.add_argument("--smollm2-finetunes", type=Path,
                        help="folder with smollm2-ft-{st,nmst}.pt (default: the quick non-termination cache)")
    parser.add_argument("--no-refill", action="store_true",
                        help="skip the continuous-batching (max_batch_size) contenders of the workload")
    parser.add_argument("--strategies", default=",".join(WORKLOAD_STRATEGIES),
                        help="comma list of workload strategies: greedy, nucleus0.4, beam4")
    parser.add_argument("--workload-prompts", type=int, help="override the number of workload prompts (spec: 256)")
    parser.add_argument("--workload-length", type=int, help="override max_new_tokens of the workload (spec: 1000)")
    parser.add_argument("--lstm-checkpoint", help="a trained LSTM (save_recurrent_lm file) instead of random weights")
    parser.add_argument("--repeats", type=int, help="alternating repeats per fixed-length cell (default: the plan's)")
    parser.add_argument("--no-ctranslate2", action="store_true", help="skip the CTranslate2 column")
    parser.add_argument("--out", type=Path, default=RESULTS, help="folder for speed.md and speed.json")
    args = parser.parse_args(argv)
    args.strategies = args.strategies.split(",")
    unknown = set(args.strategies) - set(WORKLOAD_STRATEGIES)
    if unknown:
        parser.error(f"--strategies: unknown {sorted(unknown)}; choose from {', '.join(WORKLOAD_STRATEGIES)}")
    if args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    return args


def load_subjects(names: list[str], args: argparse.Namespace) -> list[Subject]:
    """Build the requested models; SmolLM2 also provides the tokenizer the GPT-2 configs' prompts use."""
    subjects: list[Subject] = []
    smol = load_smollm2() if any(n in names for n in ("smollm2", "gpt2-small", "gpt2-tiny")) else None
    if "smollm2" in names:
        if not args.no_ctranslate2:
            smol.ct2_dir, note = ct2_model_dir(smol)
            args.notes.append(note)
        subjects.append(smol)
    if "gpt2-small" in names:
        subjects.append(gpt2_config_model("GPT-2-small-config", n_embd=768, n_layer=12, n_head=12,
                                          encode=smol.encode))
    if "gpt2-tiny" in names:
        subjects.append(gpt2_config_model("GPT-2-tiny-config", n_embd=96, n_layer=2, n_head=2, encode=smol.encode))
    if "lstm" in names:
        subjects.append(load_lstm(args.lstm_checkpoint))
    for kind in ("st", "nmst"):
        if f"smollm2-{kind}" in names:
            subjects.append(load_smollm2_self_terminating(kind, args.smollm2_finetunes))
    return subjects


def fixed_ids(subject: Subject, prompts: list[list[str]], *, rows: int, width: int = 10) -> torch.LongTensor:
    """``[rows, width]`` prompts without padding: the first ``width`` ids of the first long-enough prompts."""
    encoded = [ids[:width] for ids in map(subject.encode, prompts) if len(ids) >= width]
    return torch.tensor(encoded[:rows])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    from tqdm.auto import tqdm

    args = parse_args(argv)
    args.notes = []
    torch.set_num_threads(args.threads)
    plan = PLANS["quick" if args.quick else "full"]
    sections = set(args.sections.split(","))
    meta = machine_info(args.threads)
    subjects = load_subjects(args.models.split(","), args)
    fixed: list[dict[str, Any]] = []
    if "fixed" in sections:
        prompts = wikitext_prompts(64)
        cells = [(s, strategy, batch) for s in subjects if s.baseline_model is None for strategy in STRATEGIES
                 for batch in (1, 16)]
        for subject, strategy, batch in tqdm(cells, desc="fixed-length cells"):
            large = subject.name in ("SmolLM2-135M", "GPT-2-small-config")
            fixed.append(fixed_length_cell(
                subject, fixed_ids(subject, prompts, rows=16), strategy=strategy, batch=batch,
                steps=plan.large_steps if large else plan.small_steps,
                repeats=args.repeats or (max(3, plan.repeats - 2) if large else plan.repeats), threads=args.threads))
            tqdm.write(json.dumps({k: fixed[-1][k] for k in ("model", "strategy", "batch", "ratio", "identical")}))
    workload: list[dict[str, Any]] = []
    if "workload" in sections:
        jobs = [(s, strategy) for s in subjects if s.name.startswith("SmolLM2-135M") or s.name == "LSTM-LM"
                for strategy in WORKLOAD_STRATEGIES if strategy in args.strategies
                # the head's processor in model.generate keeps per-row state: wrong once beams reorder rows
                and not (strategy == "beam4" and s.baseline_processors is not None)]
        for subject, strategy in tqdm(jobs, desc="workload cells"):
            is_lstm = not subject.is_hf
            smol_count = plan.smollm2_beam_prompts if strategy == "beam4" else plan.smollm2_prompts
            count = args.workload_prompts or (plan.lstm_prompts if is_lstm else smol_count)
            length = args.workload_length or (plan.lstm_length if is_lstm else plan.smollm2_length)
            workload.append(workload_cell(subject, wikitext_prompts(count), strategy=strategy, max_new=length,
                                          batch_size=plan.batch_size, repeats=1 if is_lstm else plan.smollm2_repeats,
                                          refill=not args.no_refill))
            tqdm.write(json.dumps({k: workload[-1][k] for k in ("model", "strategy", "ratio_total", "identical")}))
    meta["loadavg_end"] = os.getloadavg()
    meta["notes"] = args.notes
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"meta": meta, "fixed_length": fixed, "workload": workload}
    (args.out / "speed.json").write_text(json.dumps(report, indent=1, default=float) + "\n")
    (args.out / "speed.md").write_text(markdown(meta, fixed, workload))
    return report


if __name__ == "__main__":
    main()
