"""The decode loops: one for greedy/sampling, one for beam search, both over a step model.

Both loops own the per-row bookkeeping (tokens, finished flags, lengths) and drop finished rows from the
batch and from the model state as soon as they finish, so the cost of a decode follows the tokens actually
generated, not rows x max_new_tokens. Selection is the only thing that differs between strategies.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm

from .options import DecodeOptions
from .protocol import StepModel
from .records import StepRecord
from .streaming import StreamSink
from .transforms import apply_temperature, truncate

__all__ = ["SearchResult", "Refill", "Uniforms", "PromptNoise", "sample_search", "beam_search", "Processor",
           "refill_blocker"]

# A logits processor inside the loop: (history [B, T], scores [B, V], prompt_index [B]) -> scores [B, V].
# prompt_index says which prompt each row decodes, so processors with per-prompt data (e.g. how much left
# padding to ignore) stay correct while rows are expanded into beams and finished rows leave the batch.
Processor = Callable[[torch.LongTensor, torch.Tensor, torch.LongTensor], torch.Tensor]
_BIG_NEGATIVE = -1.0e9  # transformers' "impossible" score in beam search
# Generated-token columns (and steps of random numbers) allocated before the first token; storage then
# doubles when a decode outgrows it, so it follows the tokens generated, not max_new_tokens.
FIRST_CAPACITY = 1024


@dataclass(frozen=True)
class SearchResult:
    """Decoded rows, ``N = prompts x num_return_sequences``, grouped by prompt."""

    sequences: torch.LongTensor        # [N, P + G] prefix + generated tokens, pad after eos
    lengths: torch.LongTensor          # [N] generated tokens per row, eos included
    terminated: torch.BoolTensor       # [N] the row ended with eos (not cut by max_new_tokens)
    scores: torch.Tensor | None        # [N] length-penalised beam scores (beam search only)
    state: Any = None                  # the model state after the last fed token, every row in output order
    #                                    (None when rows left the batch, were refilled, or in beam search)
    # output_scores / output_logits: per step [N, V] (beam search: [prompts x num_beams, V]), -inf off the batch
    step_scores: tuple[torch.Tensor, ...] | None = None
    step_logits: tuple[torch.Tensor, ...] | None = None
    beam_indices: torch.Tensor | None = None   # [N, G] beam (0..num_beams-1) each token extended, -1 after the end


def _apply(processors: Sequence[Processor], history: torch.LongTensor, scores: torch.Tensor,
           prompt_index: torch.LongTensor) -> torch.Tensor:
    for processor in processors:
        scores = processor(history, scores, prompt_index)
    return scores


def _warp(scores: torch.Tensor, options: DecodeOptions, eos: torch.LongTensor | None) -> torch.Tensor:
    """The end of the chain: temperature then truncation (consistent if asked) when sampling, then
    ``renormalize_logits``'s log-softmax."""
    if options.do_sample and options.temperature != 1.0:
        scores = apply_temperature(scores, options.temperature)
    if options.do_sample and options.truncation.active:
        scores = truncate(scores, options.truncation, eos_token_ids=eos, consistent=options.consistent)
    if options.token_rules.renormalize_logits:
        scores = scores.log_softmax(dim=-1)
    return scores


def _stopped(options: DecodeOptions, history: torch.LongTensor, scores: torch.Tensor | None) -> torch.BoolTensor:
    """``[n]`` rows that a stopping criterion ends, called as transformers calls them (``history [n, T]``
    includes this step's token)."""
    done = torch.zeros(history.shape[0], dtype=torch.bool, device=history.device)
    for criterion in options.stopping_criteria:
        verdict = torch.as_tensor(criterion(history, scores), device=history.device).to(torch.bool)
        if verdict.shape not in ((), (history.shape[0],)):
            raise ValueError(f"stopping criterion {criterion!r} returned shape {tuple(verdict.shape)}; expected "
                             f"({history.shape[0]},), one flag per row")
        done = done | verdict
    return done


def _end_codes(ended: torch.BoolTensor, capped: torch.BoolTensor, stopped: torch.BoolTensor | None) -> torch.LongTensor:
    """``[n]`` why each row ends now: 0 it goes on, 1 eos, 2 ``max_new_tokens``, 3 a stopping criterion."""
    codes = torch.where(capped, 2, 0)
    if stopped is not None:
        codes = torch.where(stopped & ~capped, 3, codes)
    return torch.where(ended, 1, codes)


def _records(options: DecodeOptions) -> tuple[StepRecord | None, StepRecord | None]:
    """Records for the processed scores and the raw logits, where the call returns them."""
    asked = options.return_dict_in_generate
    return (StepRecord() if asked and options.output_scores else None,
            StepRecord() if asked and options.output_logits else None)


def _check_step(step: int, row_values: Sequence[torch.Tensor], extra: torch.Tensor,
                explain: Callable[[], Exception]) -> int:
    """One host sync per step: raise ``explain()`` unless every value is ``> -inf`` (NaN fails); return ``extra``.

    Args:
        row_values: ``[B]`` vectors that are ``> -inf`` exactly when a row is healthy: the maxima of the
            model's logits and of the processed scores (max propagates NaN), the chosen token's score or the
            sampled row's probability mass (NaN or -inf when no token is left).
        extra: a scalar integer tensor to bring to the host in the same transfer.
        explain: builds the error, on the error path only (it may recompute the step to find the culprit).
    """
    values = torch.cat([*(v.float() for v in row_values), extra.reshape(1).float()]).tolist()
    if not all(value > float("-inf") for value in values[:-1]):
        raise explain()
    return int(values[-1])


def _processor_name(processor: Processor) -> str:
    return getattr(processor, "name", None) or getattr(processor, "__name__", None) or type(processor).__name__


def _explain(step: int, logits: torch.Tensor, processors: Sequence[Processor], history: torch.LongTensor,
             prompt_index: torch.LongTensor, options: DecodeOptions, *, normalise: bool) -> Exception:
    """Why step ``step`` failed, blaming the first stage whose output holds the fault: the model (NaN logits),
    a logits processor (NaN scores), the temperature (scores overflowed to inf), or the scores themselves
    (+inf, or no token left)."""
    if bool(logits.isnan().any()):
        return FloatingPointError(f"the model returned NaN logits at generation step {step}")
    scores = torch.log_softmax(logits.float(), dim=-1) if normalise else logits.clone()
    for processor in processors:
        scores = processor(history, scores, prompt_index)
        if bool(scores.isnan().any()):
            return FloatingPointError(f"the logits processor {_processor_name(processor)} returned NaN scores at "
                                      f"generation step {step}")
    if options.do_sample and options.temperature != 1.0:
        overflowed = apply_temperature(scores, options.temperature).isinf() & scores.isfinite()
        if bool(overflowed.any()):
            return FloatingPointError(
                f"temperature={options.temperature!r} overflows the scores to inf at generation step {step} "
                "(scores / temperature); use a larger temperature, or greedy search")
    if options.do_sample and bool((scores == float("inf")).any()):
        return FloatingPointError(f"a score is +inf at generation step {step}: sampling needs finite scores")
    return RuntimeError(
        f"no token left to choose at generation step {step}: every token of some row has score -inf "
        "after the logits processors and truncation"
    )


def _sample_rows(scores: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.LongTensor, torch.Tensor]:
    """Draw one token per row by inverting the CDF with the row's own uniform number.

    Each row consumes exactly one number of a draw made for *all* rows of the batch, so which rows are
    still in the batch never changes what any row samples.

    Returns:
        ``(tokens [B], mass [B])``: the draws, and each row's total probability mass (1 up to rounding;
        NaN when the row has no token left or NaN scores), for :func:`_check_step`.
    """
    probs = torch.softmax(scores.float(), dim=-1)
    cdf = probs.double().cumsum(dim=-1)                                   # [B, V]
    target = uniforms.double().unsqueeze(1) * cdf[:, -1:]                 # [B, 1], < total
    tokens = torch.searchsorted(cdf, target, right=True).squeeze(1).clamp_max(scores.shape[-1] - 1)
    return tokens, cdf[:, -1]


def _is_eos(tokens: torch.LongTensor, eos: torch.LongTensor | None) -> torch.BoolTensor:
    """``[*]`` whether each token is an eos token (one comparison when there is a single eos id)."""
    if eos is None:
        return torch.zeros_like(tokens, dtype=torch.bool)
    return tokens == eos if eos.numel() == 1 else torch.isin(tokens, eos)


def _progress(total: int, enabled: bool, unit: str = "tok") -> tqdm:
    """A bar over decoding steps ("tok"), or over finished rows or prompts when refilling."""
    return tqdm(total=total, disable=not enabled, desc="decoding", unit=unit, leave=False)


@dataclass
class Refill:
    """Prompts still waiting for a row of the batch (continuous batching); a search consumes it.

    ``admit(k)`` prefills the next ``k`` prompts and returns their ``(logits [k, V], state, prefix [k, P])``;
    ``merge(state, other)`` is the step model's: the rows of ``state`` followed by those of ``other``.
    """

    admit: Callable[[int], tuple[torch.Tensor, Any, torch.LongTensor]]
    merge: Callable[[Any, Any], Any]
    prompts: int     # prompts not admitted yet
    capacity: int    # most rows decoding at once
    threshold: int   # admit once at least this many rows are free (fewer, larger prefills)

    def due(self, running_rows: int, rows_per_prompt: int) -> int:
        """How many prompts to admit now (0: wait): as many as the free rows hold, once at least
        ``threshold`` rows are free, every waiting prompt fits, or the batch is empty."""
        count = min(self.prompts, (self.capacity - running_rows) // rows_per_prompt)
        if count and (count * rows_per_prompt >= self.threshold or count == self.prompts or not running_rows):
            return count
        return 0

    def take(self, count: int) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        """Prefill the next ``count`` prompts (no longer waiting)."""
        self.prompts -= count
        return self.admit(count)


def refill_blocker(options: DecodeOptions, *, batch_wide_processors: bool) -> str | None:
    """Why finished rows cannot be refilled with new prompts in this call, or None when they can.

    The one place this is decided. Refilled rows are at different lengths, so nothing may read the batch as
    one (logits processors, stopping criteria); finished rows must leave the batch (``drop_finished``); and
    beam sampling decodes its prompts in chunks instead.
    """
    if not options.drop_finished:
        return "drop_finished=False keeps finished rows in the batch"
    if batch_wide_processors or options.stopping_criteria:
        return "logits processors and stopping criteria need every row at the same length"
    if options.is_beam_search and options.do_sample:
        return "beam sampling decodes its prompts in chunks"
    return None


def _check_refill(refill: Refill | None, options: DecodeOptions, processors: Sequence[Processor]) -> None:
    blocker = None if refill is None else refill_blocker(options, batch_wide_processors=bool(processors))
    if blocker is not None:
        raise ValueError(f"refill: rows cannot be refilled here: {blocker}")


class Uniforms:
    """The uniform numbers sampling draws, one ``torch.rand(N)`` per decoding step over all ``N`` output rows
    of a ``generate`` call, drawn in step order into a table that doubles as the decode gets longer.

    Output row ``r`` uses ``table[t, r]`` for its ``t``-th generated token, however the batch is composed:
    dropping finished rows, admitting new prompts, or decoding the prompts in chunks (each chunk a view
    :meth:`rows_from` its first row) never changes what any row samples.
    """

    def __init__(self, rows: int, *, generator: torch.Generator | None, device: torch.device | str) -> None:
        self.rows, self.generator, self.first_row = rows, generator, 0
        self._shared = {"table": torch.empty(0, rows, device=device), "drawn": 0}

    def rows_from(self, first_row: int) -> "Uniforms":
        """The same numbers, row 0 being output row ``first_row`` of this view."""
        view = object.__new__(Uniforms)
        view.rows, view.generator, view._shared = self.rows, self.generator, self._shared
        view.first_row = self.first_row + first_row
        return view

    def take(self, steps: torch.LongTensor, rows: torch.LongTensor, *, upto: int) -> torch.Tensor:
        """``[n]`` the numbers of ``rows`` (of this view) at their ``steps``, all of which are below ``upto``."""
        table, drawn = self._shared["table"], self._shared["drawn"]
        if upto > table.shape[0]:
            grown = table.new_empty(max(upto, 2 * table.shape[0], min(upto, FIRST_CAPACITY)), self.rows)
            grown[:drawn] = table[:drawn]
            self._shared["table"] = table = grown
        source = table.device if self.generator is None else self.generator.device  # a host generator: same
        for t in range(drawn, upto):                                                 # numbers on any device
            table[t] = torch.rand(self.rows, generator=self.generator, device=source)
        self._shared["drawn"] = max(drawn, upto)
        return table[steps, rows + self.first_row]


class PromptNoise:
    """Beam sampling's noise, from one random stream per prompt (seeded once from the call's generator), so
    a prompt's beams draw the same numbers whichever prompts decode next to it (chunks included)."""

    def __init__(self, prompts: int, *, generator: torch.Generator | None, device: torch.device | str) -> None:
        seeds = torch.randint(0, 2**62, (prompts,), generator=generator, device=generator.device if generator else "cpu")
        self._seeds, self._device, self.first_prompt = seeds.tolist(), torch.device(device), 0
        self._streams: dict[int, torch.Generator] = {}

    def prompts_from(self, first_prompt: int) -> "PromptNoise":
        """The same streams, prompt 0 being prompt ``first_prompt`` of this view."""
        view = object.__new__(PromptNoise)
        view._seeds, view._device, view._streams = self._seeds, self._device, self._streams
        view.first_prompt = self.first_prompt + first_prompt
        return view

    def draw(self, prompts: torch.LongTensor, size: int) -> torch.Tensor:
        """``[A, size]`` the next ``size`` uniform numbers of each prompt's stream."""
        rows = []
        for prompt in (prompts + self.first_prompt).tolist():
            stream = self._streams.get(prompt)
            if stream is None:
                stream = self._streams[prompt] = torch.Generator(self._device).manual_seed(self._seeds[prompt])
            rows.append(torch.rand(size, generator=stream, device=self._device))
        return torch.stack(rows)


def _widen(tensor: torch.Tensor, width: int, fill: int) -> torch.Tensor:
    """``tensor [..., w]`` -> ``[..., width]``, ``fill`` in the new columns (one copy)."""
    wider = tensor.new_full((*tensor.shape[:-1], width), fill)
    wider[..., : tensor.shape[-1]] = tensor
    return wider


def _grown_capacity(capacity: int, needed: int, cap: int) -> int:
    """The next capacity in generated tokens once ``needed`` columns are needed: doubled, at most ``cap``."""
    return min(cap, max(needed, 2 * capacity))


def _check_vocab(model: StepModel, logits: torch.Tensor) -> None:
    if logits.shape[-1] != int(model.vocab_size):
        raise ValueError(f"the step model returned logits over {logits.shape[-1]} tokens but its vocab_size is "
                         f"{model.vocab_size}: it could choose tokens outside the vocabulary")


def _prefer_eos(scores: torch.Tensor, best: torch.Tensor, tokens: torch.LongTensor,
                eos: torch.LongTensor | None) -> torch.LongTensor:
    """Greedy's choice with an exact tie between eos and another best token broken toward eos (argmax takes
    the lowest id): a self-terminating head whose ``p(eos)`` reaches 1/2 then stops within its bound even
    where float32 rounds ``p(eos)`` and the top token's probability to the same number."""
    if eos is None:
        return tokens
    ties = scores.index_select(1, eos) == best.unsqueeze(1)                # [B, E]
    first_tied = eos[ties.to(torch.uint8).argmax(dim=1)]                   # [B]
    return torch.where(ties.any(dim=1), first_tied, tokens)


@dataclass(frozen=True)
class _Active:
    """The rows still decoding; every field has them as its first dimension."""

    rows: torch.LongTensor    # [n] their output row
    work: torch.LongTensor    # [n, P + L] prefix, the tokens so far, pad
    steps: torch.LongTensor   # [n] tokens generated so far

    def take(self, keep: torch.LongTensor) -> "_Active":
        return _Active(self.rows[keep], self.work[keep], self.steps[keep])

    def join(self, other: "_Active") -> "_Active":
        return _Active(torch.cat([self.rows, other.rows]), torch.cat([self.work, other.work]),
                       torch.cat([self.steps, other.steps]))


def _start(model: StepModel, logits: torch.Tensor, state: Any, prefix: torch.LongTensor, *, first_row: int,
           expand: int, out: torch.LongTensor) -> tuple[torch.Tensor, Any, _Active]:
    """Prefilled prompts as active rows ``first_row, first_row + 1, ...``, each repeated ``expand`` times."""
    if expand > 1:
        index = torch.arange(prefix.shape[0], device=prefix.device).repeat_interleave(expand)
        state, logits, prefix = model.select(state, index), logits[index], prefix[index]
    rows = first_row + torch.arange(prefix.shape[0], device=prefix.device)
    work = out[rows].clone()
    work[:, : prefix.shape[1]] = prefix
    return logits, state, _Active(rows, work, torch.zeros_like(rows))


def sample_search(
    model: StepModel,
    logits: torch.Tensor,
    state: Any,
    prefix: torch.LongTensor,
    *,
    options: DecodeOptions,
    processors: Sequence[Processor],
    progress: bool = False,
    refill: Refill | None = None,
    stream: StreamSink | None = None,
    draws: Uniforms | None = None,
) -> SearchResult:
    """Greedy decoding or ancestral sampling (with the options' warpers), one row per output sequence.

    Args:
        logits: ``[B, V]`` the prefill logits, ``B`` = prompts (the first ones, with ``refill``).
        state: the model state after prefill, ``B`` rows.
        prefix: ``[B, P]`` the tokens each output row starts with.
        refill: more prompts, admitted into the rows that finished rows free (then ``processors`` and stopping
            criteria must be absent: rows are at different lengths). Every row gets the tokens it would get
            without it.
        stream: where each running row's token and each row's end go, step by step.
        draws: the random numbers of these rows (a view of a whole call's, when it decodes in chunks);
            drawn from ``options.generator`` for these rows alone when None.
    """
    _check_refill(refill, options, processors)
    _check_vocab(model, logits)
    expand, max_new = options.num_return_sequences, options.max_new_tokens
    device, prefix_len = prefix.device, prefix.shape[1]
    n_prompts = prefix.shape[0] + (refill.prompts if refill is not None else 0)
    n_rows = n_prompts * expand
    eos = torch.tensor(options.eos_token_ids, device=device) if options.eos_token_ids else None
    capacity = min(max_new, FIRST_CAPACITY)  # generated columns held; doubles when a row outgrows it
    out = prefix.new_full((n_rows, prefix_len + capacity), options.pad_token_id)
    lengths = torch.full((n_rows,), max_new, dtype=torch.long, device=device)
    terminated = torch.zeros(n_rows, dtype=torch.bool, device=device)
    if options.do_sample and draws is None:
        draws = Uniforms(n_rows, generator=options.generator, device=device)
    score_record, logit_record = _records(options)

    logits, state, active = _start(model, logits, state, prefix, first_row=0, expand=expand, out=out)
    n_running = prefix.shape[0] * expand
    alive = None if options.drop_finished else torch.ones(n_running, dtype=torch.bool, device=device)
    prompt_index = torch.div(active.rows, expand, rounding_mode="floor")   # [n_active], follows active.rows
    bar = _progress(max_new, progress) if refill is None else _progress(n_rows, progress, unit="seq")
    whole_batch = True  # the state holds every output row, in order
    step = 0
    while True:
        if step == capacity:
            capacity = _grown_capacity(capacity, step + 1, max_new)
            out = _widen(out, prefix_len + capacity, options.pad_token_id)
            active = replace(active, work=_widen(active.work, prefix_len + capacity, options.pad_token_id))
        history = active.work[:, :prefix_len + step]
        if logit_record is not None:  # before the processors: a min-length ban may write into the logits
            logit_record.add(active.rows, active.steps, logits)
        processed = _apply(processors, history, logits, prompt_index)
        scores = _warp(processed, options, eos)
        if score_record is not None:
            score_record.add(active.rows, active.steps, scores)
        tokens, checks = _next_tokens(logits, processed if processors else None, scores, active, options=options,
                                      eos=eos, draws=draws, step=step)
        if alive is not None:  # finished rows stay in the batch and are fed pad, as transformers does
            tokens = torch.where(alive, tokens, options.pad_token_id)
        active.work.scatter_(1, (prefix_len + active.steps).unsqueeze(1), tokens.unsqueeze(1))
        active.steps.add_(1)
        ended, capped = _is_eos(tokens, eos), active.steps == max_new
        stopped = (_stopped(options, active.work[:, :prefix_len + step + 1], scores)
                   if options.stopping_criteria else None)
        finished = ended | capped if stopped is None else ended | capped | stopped
        if alive is not None:
            finished = finished & alive
        n_finished = _check_step(step, checks, finished.sum(), lambda: _explain(
            step, logits, processors, history, prompt_index, options, normalise=False))
        if stream is not None:
            running = slice(None) if alive is None else alive
            stream.step(active.rows[running], tokens[running], _end_codes(ended, capped, stopped)[running])
        bar.update(1 if refill is None else n_finished)
        if n_finished:
            _store_finished(finished, ended, active, out=out, lengths=lengths, terminated=terminated)
            n_running -= n_finished
            if alive is not None:
                alive = alive & ~finished
            elif n_running:
                keep = (~finished).nonzero().squeeze(1)
                active, tokens, state = active.take(keep), tokens[keep], model.select(state, keep)
                whole_batch = False
        if n_running:
            logits, state = model.step(tokens, state)
        count = refill.due(n_running, expand) if refill is not None else 0
        if count:
            first_row = (n_prompts - refill.prompts) * expand
            new_logits, new_state, new_active = _start(model, *refill.take(count), first_row=first_row,
                                                       expand=expand, out=out)
            if n_running:
                logits, state = torch.cat([logits, new_logits]), refill.merge(state, new_state)
                active = active.join(new_active)
            else:
                logits, state, active = new_logits, new_state, new_active
            n_running += count * expand
            whole_batch = False
        elif not n_running:
            break
        prompt_index = torch.div(active.rows, expand, rounding_mode="floor") if expand > 1 else active.rows
        step += 1
    bar.close()
    width = prefix_len + int(lengths.max()) if n_rows else prefix_len
    return SearchResult(sequences=out[:, :width], lengths=lengths, terminated=terminated, scores=None,
                        state=state if whole_batch else None,
                        step_scores=None if score_record is None else score_record.assemble(n_rows),
                        step_logits=None if logit_record is None else logit_record.assemble(n_rows))


def _next_tokens(logits: torch.Tensor, processed: torch.Tensor | None, scores: torch.Tensor, active: _Active, *,
                 options: DecodeOptions, eos: torch.LongTensor | None, draws: Uniforms | None,
                 step: int) -> tuple[torch.LongTensor, list[torch.Tensor]]:
    """``[n]`` one token per active row from its final ``scores``: sampled with the row's own uniform number,
    or greedy with ties broken toward eos; and the row values :func:`_check_step` checks (``processed``: the
    scores after the logits processors, None when there are none)."""
    if options.do_sample:
        checks = [logits.amax(dim=-1)] + ([processed.amax(dim=-1)] if processed is not None else [])
        tokens, mass = _sample_rows(scores, draws.take(active.steps, active.rows, upto=step + 1))
        return tokens, checks + [mass]
    best, tokens = scores.max(dim=-1)   # max propagates NaN: the maxima double as the NaN check
    tokens = _prefer_eos(scores, best, tokens, eos)
    return tokens, [best] if scores is logits else [logits.amax(dim=-1), best]


def _store_finished(finished: torch.BoolTensor, ended: torch.BoolTensor, active: _Active, *, out: torch.LongTensor,
                    lengths: torch.LongTensor, terminated: torch.BoolTensor) -> None:
    """Write the rows that finished this step into the outputs ``out [N, P + L]``, ``lengths [N]`` and
    ``terminated [N]`` (``ended``: by eos)."""
    gone = finished.nonzero().squeeze(1)
    out[active.rows[gone]] = active.work[gone]
    lengths[active.rows[gone]] = active.steps[gone]
    terminated[active.rows[gone]] = ended[gone]


@dataclass
class _Beams:
    """Per-prompt beam search tensors; every field has the active prompts as its first dimension."""

    prompts: torch.LongTensor    # [A] index of the prompt in the batch
    run_seq: torch.LongTensor    # [A, nb, P + L] running hypotheses
    run_score: torch.Tensor      # [A, nb] their summed log-probabilities
    fin_seq: torch.LongTensor    # [A, nb, P + L] finished hypotheses, best first
    fin_score: torch.Tensor      # [A, nb] their length-penalised scores
    fin_flag: torch.BoolTensor   # [A, nb] slot holds a real finished hypothesis
    fin_len: torch.LongTensor    # [A, nb] generated length of each finished hypothesis
    open: torch.BoolTensor       # [A, 1] the best finished list may still improve
    steps: torch.LongTensor      # [A] tokens generated so far (prompts admitted later are behind)
    run_parents: torch.Tensor    # [A, nb, W] per generated token, the beam it extended (-1: none yet);
    fin_parents: torch.Tensor    # [A, nb, W] the same for the finished hypotheses (W = 0: not tracked)

    @classmethod
    def start(cls, prefix: torch.LongTensor, *, first_prompt: int, num_beams: int, capacity: int,
              pad_token_id: int, track_parents: bool = False) -> "_Beams":
        """Fresh beams for prompts ``first_prompt, first_prompt + 1, ...`` with ``prefix [A, P]`` and room for
        ``capacity`` generated tokens."""
        count, prefix_len = prefix.shape
        device = prefix.device
        run_seq = prefix.new_full((count, num_beams, prefix_len + capacity), pad_token_id)
        run_seq[:, :, :prefix_len] = prefix[:, None, :]
        run_score = torch.zeros(count, num_beams, device=device)
        run_score[:, 1:] = _BIG_NEGATIVE  # one live beam per prompt until the first expansion
        parents = torch.full((count, num_beams, capacity if track_parents else 0), -1, dtype=torch.int32,
                             device=device)
        return cls(
            prompts=first_prompt + torch.arange(count, device=device), run_seq=run_seq, run_score=run_score,
            fin_seq=run_seq.clone(), fin_score=torch.full((count, num_beams), _BIG_NEGATIVE, device=device),
            fin_flag=torch.zeros(count, num_beams, dtype=torch.bool, device=device),
            fin_len=torch.zeros(count, num_beams, dtype=torch.long, device=device),
            open=torch.ones(count, 1, dtype=torch.bool, device=device),
            steps=torch.zeros(count, dtype=torch.long, device=device),
            run_parents=parents, fin_parents=parents.clone(),
        )

    def take(self, keep: torch.LongTensor) -> "_Beams":
        return _Beams(*(getattr(self, name)[keep] for name in self.__dataclass_fields__))

    def join(self, other: "_Beams") -> "_Beams":
        return _Beams(*(torch.cat([getattr(self, name), getattr(other, name)]) for name in self.__dataclass_fields__))

    def widen(self, width: int, pad_token_id: int) -> None:
        """Room for ``width`` columns (prefix + generated) in the running and finished hypotheses, and for
        their parents where tracked."""
        if self.run_parents.shape[-1]:
            generated = self.run_parents.shape[-1] + width - self.run_seq.shape[-1]
            self.run_parents = _widen(self.run_parents, generated, -1)
            self.fin_parents = _widen(self.fin_parents, generated, -1)
        self.run_seq = _widen(self.run_seq, width, pad_token_id)
        self.fin_seq = _widen(self.fin_seq, width, pad_token_id)


def _gather(tensor: torch.Tensor, index: torch.LongTensor) -> torch.Tensor:
    """``tensor[a, index[a, k], ...]`` for ``tensor [A, n, ...]`` and ``index [A, k]``."""
    while index.dim() < tensor.dim():
        index = index.unsqueeze(-1)
    return torch.take_along_dim(tensor, index, dim=1)


def _length_divisor(generated: torch.LongTensor, length_penalty: float) -> torch.Tensor:
    """``[A, 1]`` ``generated ** length_penalty`` in double precision, rounded once to float32, as the Python
    scalar transformers divides by."""
    return (generated.double() ** length_penalty).float().unsqueeze(1)


def beam_search(
    model: StepModel,
    logits: torch.Tensor,
    state: Any,
    prefix: torch.LongTensor,
    *,
    options: DecodeOptions,
    processors: Sequence[Processor],
    progress: bool = False,
    refill: Refill | None = None,
    stream: StreamSink | None = None,
    draws: PromptNoise | None = None,
) -> SearchResult:
    """Beam search (or beam sampling with ``do_sample``) with transformers' scoring and stopping rules.

    Hypotheses are scored by ``sum log p / generated_length ** length_penalty`` when they finish;
    ``early_stopping`` True stops a prompt once ``num_beams`` hypotheses finished, False stops it when the
    best running beam at its current length cannot beat the worst finished one, "never" uses the maximum
    length for that bound when ``length_penalty > 0``. A prompt that is done leaves the batch; with
    ``refill`` (not with sampling, processors or stopping criteria) the next prompts take its rows. ``stream``
    gets each prompt's returned sequences when it is done. Beam sampling draws from ``draws`` (the prompts'
    own random streams; made from ``options.generator`` when None).

    ``options.beam_rule == "papers"``: the self-terminating papers' rule instead. A prompt stops at the
    first step where one of its ``num_beams`` best candidates ends in eos and returns the best of those
    finished hypotheses by their summed log-probability (no length penalty); a prompt with none by
    ``max_new_tokens`` returns its best running beam, unfinished.
    """
    _check_refill(refill, options, processors)
    _check_vocab(model, logits)
    nb, max_new = options.num_beams, options.max_new_tokens
    capacity = min(max_new, FIRST_CAPACITY)  # generated columns held; doubles when a beam outgrows it
    prefix_len, device = prefix.shape[1], prefix.device
    n_prompts = prefix.shape[0] + (refill.prompts if refill is not None else 0)
    if options.do_sample and draws is None:
        draws = PromptNoise(n_prompts, generator=options.generator, device=device)
    eos = torch.tensor(options.eos_token_ids, device=device) if options.eos_token_ids else None
    keep_k = max(2, 1 + len(options.eos_token_ids)) * nb
    top_nb = torch.arange(keep_k, device=device) < nb                        # [K]

    def start(logits, state, prefix, first_prompt):
        expand = torch.arange(prefix.shape[0], device=device).repeat_interleave(nb)
        beams = _Beams.start(prefix, first_prompt=first_prompt, num_beams=nb, capacity=capacity,
                             pad_token_id=options.pad_token_id, track_parents=options.return_dict_in_generate)
        return logits[expand], model.select(state, expand), beams

    logits, state, beams = start(logits, state, prefix, 0)
    score_record, logit_record = _records(options)
    beam_slot = torch.arange(nb, device=device)
    results: list[tuple[torch.LongTensor, _Beams]] = []
    bar = _progress(max_new, progress) if refill is None else _progress(n_prompts, progress, unit="prompt")
    step = 0
    while True:
        if step == capacity:
            capacity = _grown_capacity(capacity, step + 1, max_new)
            beams.widen(prefix_len + capacity, options.pad_token_id)
        n_active = beams.prompts.numel()
        history = beams.run_seq.reshape(n_active * nb, -1)[:, :prefix_len + step]  # processors: never when refilling
        beam_prompts = beams.prompts.repeat_interleave(nb)
        beam_rows, beam_steps = (beams.prompts[:, None] * nb + beam_slot).view(-1), beams.steps.repeat_interleave(nb)
        if logit_record is not None:
            logit_record.add(beam_rows, beam_steps, logits)
        log_probs, checks = _beam_log_probs(logits, processors, history, beam_prompts, options, eos)
        if score_record is not None:
            score_record.add(beam_rows, beam_steps, log_probs)
        top_lp, parent, token = _top_candidates(log_probs, beams, keep_k, options=options, draws=draws)
        cand_seq, cand_parents = _extend(beams, parent, token, prefix_len=prefix_len)
        generated = beams.steps + 1                                           # [A] length after this token
        hits = _is_eos(token, eos) | (generated >= max_new)[:, None]
        if options.stopping_criteria:  # candidates judged as transformers judges them (no scores)
            hits = hits | _stopped(options, cand_seq[:, :, :prefix_len + step + 1].reshape(n_active * keep_k, -1),
                                   None).view(n_active, keep_k)
        run_parent = _advance(beams, top_lp, parent, cand_seq, cand_parents, hits, top_nb, options=options)
        done = _prompts_done(beams, token, hits, top_nb, options=options, eos=eos)
        n_done = _check_step(step, checks, done.sum(), lambda: _explain(
            step, logits, processors, history, beam_prompts, options, normalise=True))
        bar.update(1 if refill is None else n_done)

        rows = (run_parent + torch.arange(n_active, device=device)[:, None] * nb).view(-1)
        if n_done == n_active or (n_done and options.drop_finished):
            results.append((beams.prompts[done], beams.take(done.nonzero().squeeze(1))))
            if stream is not None:
                _stream_finished(stream, results[-1][1], options, eos, prefix_len)
            keep = (~done).nonzero().squeeze(1)
            beams = beams.take(keep)
            rows = rows.view(n_active, nb)[keep].view(-1)
        n_active = beams.prompts.numel()
        if n_active:
            last = beams.run_seq.gather(2, (prefix_len + beams.steps - 1)[:, None, None].expand(-1, nb, 1))
            logits, state = model.step(last.reshape(-1), model.select(state, rows))
        count = refill.due(n_active * nb, nb) if refill is not None else 0
        if count:
            first_prompt = n_prompts - refill.prompts
            new_logits, new_state, new_beams = start(*refill.take(count), first_prompt)
            if n_active:
                logits, state = torch.cat([logits, new_logits]), refill.merge(state, new_state)
                beams = beams.join(new_beams)
            else:
                logits, state, beams = new_logits, new_state, new_beams
        elif not n_active:
            break
        step += 1
    bar.close()
    collected = _collect_beams(results, n_prompts, options, eos, prefix_len)
    return replace(collected, step_scores=None if score_record is None else score_record.assemble(n_prompts * nb),
                   step_logits=None if logit_record is None else logit_record.assemble(n_prompts * nb))


def _beam_log_probs(logits: torch.Tensor, processors: Sequence[Processor], history: torch.LongTensor,
                    beam_prompts: torch.LongTensor, options: DecodeOptions,
                    eos: torch.LongTensor | None) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """``[A x nb, V]`` the beams' processed (and, when sampling, warped) log-probabilities, and the row
    maxima :func:`_check_step` checks."""
    log_probs = _apply(processors, history, torch.log_softmax(logits.float(), dim=-1), beam_prompts)
    checks = [log_probs.amax(dim=-1)]  # log_softmax spreads a NaN logit over its whole row
    warped = _warp(log_probs, options, eos)
    if warped is not log_probs:  # sampling's warpers or renormalize_logits
        checks.append(warped.amax(dim=-1))
    return warped, checks


def _top_candidates(log_probs: torch.Tensor, beams: _Beams, keep_k: int, *, options: DecodeOptions,
                    draws: PromptNoise | None) -> tuple[torch.Tensor, torch.LongTensor, torch.LongTensor]:
    """The ``keep_k`` best continuations of each prompt's beams, best first: ``(summed log-probability,
    parent beam, token)``, each ``[A, K]``. Beam sampling draws them without replacement instead (Gumbel
    top-k), with noise from each prompt's own stream."""
    n_active, nb, vocab = beams.prompts.numel(), options.num_beams, log_probs.shape[-1]
    accumulated = (log_probs.view(n_active, nb, vocab) + beams.run_score[:, :, None]).view(n_active, -1)
    if options.do_sample:
        uniform = draws.draw(beams.prompts, nb * vocab)
        keys = accumulated - torch.log(-torch.log(uniform.clamp_min(1e-20)))
        top_index = keys.topk(keep_k, dim=-1).indices
        top_lp, order = accumulated.gather(1, top_index).sort(dim=-1, descending=True)
        top_index = top_index.gather(1, order)
    else:
        top_lp, top_index = accumulated.topk(keep_k, dim=-1)             # [A, K]
    return top_lp, top_index // vocab, top_index % vocab


def _extend(beams: _Beams, parent: torch.LongTensor, token: torch.LongTensor, *,
            prefix_len: int) -> tuple[torch.LongTensor, torch.Tensor]:
    """The candidates' sequences ``[A, K, P + L]`` (parent beam + token) and parent records ``[A, K, W]``."""
    keep_k = token.shape[1]
    cand_seq = _gather(beams.run_seq, parent)                             # [A, K, P + L]
    column = (prefix_len + beams.steps)[:, None, None].expand(-1, keep_k, 1)
    cand_seq.scatter_(2, column, token.unsqueeze(-1))
    cand_parents = _gather(beams.run_parents, parent)                     # [A, K, W]
    if cand_parents.shape[-1]:
        cand_parents.scatter_(2, beams.steps[:, None, None].expand(-1, keep_k, 1),
                              parent.unsqueeze(-1).to(cand_parents.dtype))
    return cand_seq, cand_parents


def _advance(beams: _Beams, top_lp: torch.Tensor, parent: torch.LongTensor, cand_seq: torch.LongTensor,
             cand_parents: torch.Tensor, hits: torch.BoolTensor, top_nb: torch.BoolTensor, *,
             options: DecodeOptions) -> torch.LongTensor:
    """One step of every prompt's beams, in place: the best ``nb`` candidates that did not finish run on;
    candidates among the top ``nb`` that finished enter the finished list if they beat what it holds.
    Returns ``[A, nb]`` the beam each running beam extended."""
    nb, generated = options.num_beams, beams.steps + 1
    running_lp = top_lp + hits.to(torch.float32) * _BIG_NEGATIVE
    next_index = running_lp.topk(nb, dim=-1).indices                     # [A, nb]
    beams.run_seq = _gather(cand_seq, next_index)
    beams.run_score = _gather(running_lp, next_index)
    beams.run_parents = _gather(cand_parents, next_index)

    just = hits & top_nb[None, :]
    papers = options.beam_rule == "papers"
    fin_cand = top_lp if papers else top_lp / _length_divisor(generated, options.length_penalty)
    full = beams.fin_flag.all(dim=-1, keepdim=True) & (options.early_stopping is True)
    fin_cand = fin_cand + full.to(torch.float32) * _BIG_NEGATIVE
    fin_cand = fin_cand + (~beams.open).to(torch.float32) * _BIG_NEGATIVE
    fin_cand = fin_cand + (~just) * _BIG_NEGATIVE
    merged_score = torch.cat([beams.fin_score, fin_cand], dim=1)
    best = merged_score.topk(nb, dim=-1).indices
    beams.fin_seq = _gather(torch.cat([beams.fin_seq, cand_seq], dim=1), best)
    beams.fin_score = _gather(merged_score, best)
    beams.fin_flag = _gather(torch.cat([beams.fin_flag, just], dim=1), best)
    beams.fin_len = _gather(torch.cat([beams.fin_len, generated[:, None].expand_as(just)], dim=1), best)
    beams.fin_parents = _gather(torch.cat([beams.fin_parents, cand_parents], dim=1), best)
    beams.steps = generated
    return _gather(parent, next_index)


def _prompts_done(beams: _Beams, token: torch.LongTensor, hits: torch.BoolTensor, top_nb: torch.BoolTensor, *,
                  options: DecodeOptions, eos: torch.LongTensor | None) -> torch.BoolTensor:
    """``[A]`` the prompts whose search ends now; updates ``beams.open`` (can the best running beam still
    beat the worst finished one?) in place."""
    never = options.early_stopping == "never" and options.length_penalty > 0.0
    best_len = torch.full_like(beams.steps, options.max_new_tokens) if never else beams.steps
    best_running = beams.run_score[:, :1] / _length_divisor(best_len, options.length_penalty)
    worst_finished = torch.where(beams.fin_flag, beams.fin_score.min(dim=1, keepdim=True).values, _BIG_NEGATIVE)
    beams.open = beams.open & (best_running > worst_finished).any(dim=-1, keepdim=True)
    if options.beam_rule == "papers":  # the first step where one of the nb best candidates ends in eos, or L
        return (_is_eos(token, eos) & top_nb[None, :]).any(dim=-1) | hits.all(dim=-1)
    done = ~beams.open.squeeze(1) | hits.all(dim=-1)
    if options.early_stopping is True:
        done = done | beams.fin_flag.all(dim=-1)
    return done


def _stream_finished(stream: StreamSink, beams: _Beams, options: DecodeOptions, eos: torch.LongTensor | None,
                     prefix_len: int) -> None:
    """The returned sequences of prompts that are done, with why each ended."""
    r = options.num_return_sequences
    lengths = beams.fin_len[:, :r]                                           # [D, r]
    last = beams.fin_seq[:, :r].gather(2, (prefix_len + lengths - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
    codes = _end_codes(_is_eos(last, eos), lengths == options.max_new_tokens, torch.ones_like(last, dtype=torch.bool))
    rows = (beams.prompts[:, None] * r + torch.arange(r, device=lengths.device)).view(-1).tolist()
    tokens = [seq[prefix_len:prefix_len + n] for seq, n in zip(beams.fin_seq[:, :r].flatten(0, 1).tolist(),
                                                                 lengths.reshape(-1).tolist())]
    stream.finished(rows, tokens, codes.reshape(-1).tolist())


def _collect_beams(results, n_prompts: int, options: DecodeOptions, eos, prefix_len: int) -> SearchResult:
    """Assemble the best ``num_return_sequences`` finished hypotheses of every prompt, in prompt order."""
    r = options.num_return_sequences
    prompts = torch.cat([p for p, _ in results])
    order = torch.argsort(prompts)
    width = max(b.fin_seq.shape[2] for _, b in results)  # storage grew during the decode: widen earlier ones
    seq = torch.cat([_widen(b.fin_seq[:, :r], width, options.pad_token_id) for _, b in results])
    seq = seq[order].flatten(0, 1)                                                     # [N, P + L]
    score = torch.cat([b.fin_score[:, :r] for _, b in results])[order].flatten()
    length = torch.cat([b.fin_len[:, :r] for _, b in results])[order].flatten()
    parents = torch.cat([_widen(b.fin_parents[:, :r], b.fin_parents.shape[2] + width - b.fin_seq.shape[2], -1)
                         for _, b in results])[order].flatten(0, 1)                   # [N, W]
    assert prompts.numel() == n_prompts, "every prompt must finish exactly once"
    last = seq.gather(1, (prefix_len + length - 1).clamp_min(0)[:, None]).squeeze(1)
    terminated = torch.isin(last, eos) if eos is not None else torch.zeros_like(last, dtype=torch.bool)
    width = prefix_len + int(length.max())
    sequences = seq[:, :width].clone()
    beyond = torch.arange(width, device=seq.device)[None, :] >= (prefix_len + length)[:, None]
    sequences[beyond] = options.beam_fill_token_id
    beam_indices = parents[:, :width - prefix_len] if options.return_dict_in_generate else None
    return SearchResult(sequences=sequences, lengths=length, terminated=terminated, scores=score,
                        beam_indices=beam_indices)
