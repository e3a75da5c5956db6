"""The contenders :mod:`benchmarks.speed` times against each other, and how their outputs are compared.

Every contender is a no-argument callable returning ``[B, P + G]`` prompt and generated tokens: ours
(:func:`decoding.generate`), transformers' ``model.generate`` (or, for the LSTM, our loop keeping finished
rows), a minimal hand-written cached loop (the floor, greedy only) and CTranslate2 fp32. Outputs are compared
after :func:`normalise`, which pads everything after a row's first eos.
"""

from __future__ import annotations

from typing import Any, Callable

import torch

from benchmarks.speed_models import Subject
from decoding.adapters import _cache_argument
from decoding.generate import generate
from training.decode import eos_lengths

__all__ = ["STRATEGIES", "WORKLOAD_STRATEGIES", "hand_loop", "hand_loop_recurrent", "ct2_contender", "normalise",
           "generated_stats", "generated_rows", "fixed_length_contenders", "workload_contenders"]

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
    keyword = _cache_argument(model)
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
    """CTranslate2 fp32 on the same prompts and settings, on the GPU when they are (its own sampler: samples
    differ)."""
    if subject.ct2_dir is None:
        return None
    import ctranslate2

    device = "cuda" if input_ids.device.type == "cuda" else "cpu"
    generator = ctranslate2.Generator(str(subject.ct2_dir), device=device, compute_type="float32",
                                      intra_threads=threads, inter_threads=1)  # fmt: skip
    prompts = [subject.tokenizer.convert_ids_to_tokens(row) for row in input_ids.tolist()]
    settings: dict[str, Any] = {"beam_size": options.get("num_beams", 1), "max_length": steps,
                                "min_length": steps, "include_prompt_in_result": False}
    if options.get("do_sample"):
        settings.update(sampling_topk=0, sampling_topp=options["top_p"])

    def run() -> torch.LongTensor:
        results = generator.generate_batch(prompts, **settings)
        return torch.tensor([result.sequences_ids[0] for result in results], device=input_ids.device)

    return run


def normalise(sequences: torch.LongTensor, prefix_len: int, eos: int, pad: int) -> torch.LongTensor:
    """Pad every generated position after a row's first eos and drop all-pad trailing columns, so that
    outputs that differ only in what fills finished rows compare equal."""
    generated = sequences[:, prefix_len:]
    lengths, _ = eos_lengths(generated, eos)  # [B]
    after = torch.arange(generated.shape[1], device=generated.device)[None, :] >= lengths[:, None]
    generated = generated.masked_fill(after, pad)
    width = int(lengths.max()) if lengths.numel() else 0
    return torch.cat([sequences[:, :prefix_len], generated[:, :width]], dim=1)


def generated_stats(sequences: torch.LongTensor, prefix_len: int, eos: int) -> tuple[int, int]:
    """``(generated tokens, rows that stopped with eos)`` of a ``[B, P + G]`` output."""
    lengths, stopped = eos_lengths(sequences[:, prefix_len:], eos)
    return int(lengths.sum()), int(stopped.sum())


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


def generated_rows(sequences: torch.LongTensor, prefix_len: int, subject: Subject) -> list[list[int]]:
    """Each row's generated tokens up to its eos (prompt padding and what fills finished rows dropped)."""
    rows = normalise(sequences, prefix_len, subject.eos_token_id, subject.pad_token_id)[:, prefix_len:].tolist()
    for row in rows:
        while row and row[-1] == subject.pad_token_id:
            row.pop()
    return rows
