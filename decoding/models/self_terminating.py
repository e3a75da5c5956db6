"""Self-terminating wrappers: put an ST / NMST head (:mod:`decoding.heads`) on a model.

- :class:`SelfTerminatingStepModel` wraps any step model that returns raw logits into one that returns the
  head's log-probabilities (the running head state travels in the step state, reordered with it).
- :func:`make_self_terminating` turns a transformers causal LM or encoder-decoder into a
  :class:`SelfTerminatingLM`, whose forward returns normalised log-probabilities (so transformers' loss and
  ``Trainer`` train it unchanged) and whose ``as_step_model()`` plugs into ``decoding.generate``.
- :func:`save_self_terminating` / :func:`load_self_terminating` round-trip it through a folder.
"""

from __future__ import annotations

import inspect
import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from ..heads import (check_eos_token_id, check_epsilon, check_kind, context_mask_from_labels,
                     self_terminating_log_probs, self_terminating_step)
from ..protocol import StepModel, StepModelBase, declared

__all__ = [
    "SelfTerminatingLM",
    "SelfTerminatingState",
    "SelfTerminatingStepModel",
    "load_self_terminating",
    "make_self_terminating",
    "save_self_terminating",
]

CONFIG_NAME = "self_terminating.json"


# ---------------------------------------------------------------------------------------- step model
class SelfTerminatingState(NamedTuple):
    """State of a :class:`SelfTerminatingStepModel`: the inner model's and the head's, ``head [B]``."""

    inner: Any
    head: torch.Tensor


class SelfTerminatingStepModel(StepModelBase):
    """Wrap a step model that returns raw logits into one that returns ST / NMST log-probabilities.

    ``prefill`` starts the head fresh (prompt tokens do not consume the eps budget: ``t = 1`` is the
    first generated token); ``select`` reorders the inner state and the head state together. It can do
    what the inner model can (merge, recompute uncached, reserve cache room, change the decoder start).

    Example::

        step_model = SelfTerminatingStepModel(hf_step_model(gpt2), kind="nmst", epsilon=1e-3,
                                              eos_token_id=50256)
        log_probs, state, prefix = step_model.prefill(input_ids, attention_mask)   # [B, V]
    """

    fresh_logits = True  # the head computes new log-probabilities at every call

    def __init__(self, inner: StepModel, *, kind: str, epsilon: float, eos_token_id: int) -> None:
        self.inner = declared(inner, name="inner")
        self.kind = check_kind(kind)
        self.epsilon = check_epsilon(epsilon)
        self.vocab_size = int(self.inner.vocab_size)
        self.eos_token_id = check_eos_token_id(eos_token_id, self.vocab_size)
        self.guaranteed_eos_token_id = self.eos_token_id
        self.is_encoder_decoder = self.inner.is_encoder_decoder
        self.can_merge = self.inner.can_merge

    def _over(self, inner: StepModel) -> SelfTerminatingStepModel:
        """The same head over another inner step model."""
        return SelfTerminatingStepModel(inner, kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id)

    def uncached(self) -> SelfTerminatingStepModel:
        """The same head over the inner model's uncached variant (``generate(..., use_cache=False)``)."""
        return self._over(self.inner.uncached())

    def reserving(self, new_tokens: int) -> SelfTerminatingStepModel:
        """The same head over the inner model with KV-cache room for ``new_tokens`` (when it reserves)."""
        return self._over(self.inner.reserving(new_tokens))

    def starting_with(self, decoder_start_token_id: int) -> SelfTerminatingStepModel:
        """Encoder-decoders: the same head over the inner model started with ``decoder_start_token_id``."""
        return self._over(self.inner.starting_with(decoder_start_token_id))

    def model_cache(self, state: SelfTerminatingState) -> Any:
        """The inner model's transformers cache, when it has one (None otherwise)."""
        return self.inner.model_cache(state.inner)

    def _head(self, logits: torch.Tensor, head_state: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        return self_terminating_step(
            logits, head_state, kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.LongTensor
    ) -> tuple[torch.Tensor, SelfTerminatingState, torch.LongTensor]:
        """Prefill the inner model; returns ``(log_probs [B, V], state, prefix [B, P])``."""
        logits, inner_state, prefix = self.inner.prefill(input_ids, attention_mask)
        log_probs, head_state = self._head(logits, None)
        return log_probs, SelfTerminatingState(inner_state, head_state), prefix

    def prefill_encoded(
        self, encoder_hidden: torch.Tensor, encoder_mask: torch.LongTensor, decoder_input_ids: torch.LongTensor
    ) -> tuple[torch.Tensor, SelfTerminatingState, torch.LongTensor]:
        """Encoder-decoders: prefill from encoder states ``[B, S, H]`` computed elsewhere."""
        logits, inner_state, prefix = self.inner.prefill_encoded(encoder_hidden, encoder_mask, decoder_input_ids)
        log_probs, head_state = self._head(logits, None)
        return log_probs, SelfTerminatingState(inner_state, head_state), prefix

    def step(self, tokens: torch.LongTensor, state: SelfTerminatingState) -> tuple[torch.Tensor, SelfTerminatingState]:
        """Feed ``tokens [B]``; returns ``(log_probs [B, V], state)``."""
        logits, inner_state = self.inner.step(tokens, state.inner)
        log_probs, head_state = self._head(logits, state.head)
        return log_probs, SelfTerminatingState(inner_state, head_state)

    def select(self, state: SelfTerminatingState, index: torch.LongTensor) -> SelfTerminatingState:
        """Rows ``index [B']`` of both the inner state and the head state."""
        head = state.head.index_select(0, index.to(state.head.device))
        return SelfTerminatingState(self.inner.select(state.inner, index), head)

    def mergeable(self, state: SelfTerminatingState) -> bool:
        """Whether the inner model can merge the inner state."""
        return self.inner.mergeable(state.inner)

    def merge(self, state: SelfTerminatingState, other: SelfTerminatingState) -> SelfTerminatingState:
        """The rows of ``state`` followed by those of ``other``, inner and head state alike."""
        return SelfTerminatingState(self.inner.merge(state.inner, other.inner), torch.cat([state.head, other.head]))


# ------------------------------------------------------------------------------ transformers wrapper
def _output_vocab_size(model: Any) -> int:
    """Rows of the model's output layer (the logits' last dimension), or raise naming ``model``."""
    from transformers import PreTrainedModel  # local import: the step wrapper above needs no transformers

    if isinstance(model, SelfTerminatingLM):
        raise TypeError("model is already self-terminating; pass its .base to convert it again")
    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    output_layer = model.get_output_embeddings()
    weight = getattr(output_layer, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        raise TypeError(
            f"model ({type(model).__name__}) has no output layer with one row per token to split into "
            "eos and non-eos rows; use a causal LM or encoder-decoder with an LM head"
        )
    return int(weight.shape[0])


def _default_eos_token_id(model: Any) -> int:
    """The model's single eos id from its generation config or config, or raise naming ``eos_token_id``."""
    generation_config = getattr(model, "generation_config", None)
    eos = getattr(generation_config, "eos_token_id", None)
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        if len(eos) != 1:
            raise ValueError(f"the model has several eos ids {list(eos)}: pass eos_token_id= to pick one")
        eos = eos[0]
    if eos is None:
        raise ValueError("the model's config names no eos token: pass eos_token_id=")
    return eos


class SelfTerminatingLM(torch.nn.Module):
    """A transformers causal LM or encoder-decoder with an ST / NMST output layer.

    Build it with :func:`make_self_terminating`. The wrapped model is ``.base`` (weights shared, not
    copied); the eos row of its output layer gives the sigmoid's logit, the other rows the softmax.

    ``forward`` returns the base model's output with ``logits`` replaced by normalised log-probabilities
    ``[B, T, V]`` and ``loss`` computed by transformers' own loss on them (their cross-entropy equals the
    NLL), so ``transformers.Trainer`` trains it unchanged. Context positions (``p(eos) = 0``, ``t`` not
    advanced) come from ``labels == -100`` or an explicit ``context_mask``, plus padding.

    ``as_step_model()`` gives the step model ``decoding.generate`` drives: the base model's KV-cached
    adapter under a :class:`SelfTerminatingStepModel`. ``save_pretrained`` / ``from_pretrained`` round-trip
    the base model and the head's kind, epsilon and eos id.
    """

    def __init__(self, base: Any, *, kind: str, epsilon: float, eos_token_id: int) -> None:
        super().__init__()
        vocab_size = _output_vocab_size(base)
        self.base = base
        self.kind = check_kind(kind)
        self.epsilon = check_epsilon(epsilon)
        self.eos_token_id = check_eos_token_id(eos_token_id, vocab_size)
        self.vocab_size = vocab_size
        self.generation_config = self._generation_config()
        self._takes_position_ids = "position_ids" in inspect.signature(base.forward).parameters

    def _generation_config(self) -> Any:
        from transformers import GenerationConfig

        base_config = getattr(self.base, "generation_config", None)
        config = GenerationConfig() if base_config is None else GenerationConfig.from_dict(base_config.to_dict())
        config.eos_token_id = self.eos_token_id
        if config.pad_token_id is None:
            config.pad_token_id = self.eos_token_id
        return config

    @property
    def config(self) -> Any:
        """The base model's ``PretrainedConfig``."""
        return self.base.config

    @property
    def device(self) -> torch.device:
        return self.base.device

    @property
    def is_encoder_decoder(self) -> bool:
        return bool(getattr(self.base.config, "is_encoder_decoder", False))

    def head_log_probs(
        self, logits: torch.Tensor, *, context_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``logits [B, T, V]`` (raw) -> self-terminating log-probabilities ``[B, T, V]``, t from 1."""
        log_probs, _ = self_terminating_log_probs(
            logits, kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id, context_mask=context_mask
        )
        return log_probs

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.LongTensor | None = None,
        *,
        labels: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        decoder_input_ids: torch.LongTensor | None = None,
        decoder_attention_mask: torch.LongTensor | None = None,
    ) -> Any:
        """Run the base model and the head.

        Args:
            input_ids: ``[B, S]`` (the decoder input for a causal LM, the encoder input otherwise).
            attention_mask: ``[B, S]``, 0 on padding.
            labels: ``[B, T]`` targets with -100 on context and padding, as transformers expects (a causal
                LM shifts them inside the loss). Positions predicting a -100 label are context.
            context_mask: ``[B, T]`` bool, aligned with the output positions: True where the position
                predicts a context token. Overrides the context taken from ``labels``.
            position_ids: ``[B, S]``, causal LMs only; by default counted over real tokens
                (``attention_mask.cumsum(-1) - 1``), as generation does, so left-padded rows score as
                they decode.
            decoder_input_ids, decoder_attention_mask: ``[B, T]``, encoder-decoders only; built from
                ``labels`` by the base model when omitted.

        Returns:
            The base model's output type with ``logits`` = log-probabilities ``[B, T, V]`` (float32 or
            wider) and ``loss`` = mean NLL over labelled tokens (None without labels).
        """
        if self.is_encoder_decoder:
            if decoder_input_ids is None and labels is not None:
                decoder_input_ids = self.base.prepare_decoder_input_ids_from_labels(labels=labels)
            outputs = self.base(
                input_ids=input_ids,
                attention_mask=attention_mask,
                decoder_input_ids=decoder_input_ids,
                decoder_attention_mask=decoder_attention_mask,
                use_cache=False,
            )
            padding = decoder_attention_mask
        else:
            if position_ids is None and attention_mask is not None and self._takes_position_ids:
                position_ids = (attention_mask.long().cumsum(-1) - 1).clamp_min(0)
            positions = {} if position_ids is None else {"position_ids": position_ids}
            outputs = self.base(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **positions)
            padding = attention_mask
        context = self._context(outputs.logits, labels=labels, context_mask=context_mask, padding=padding)
        log_probs = self.head_log_probs(outputs.logits, context_mask=context)
        loss = None if labels is None else self._loss(log_probs, labels)
        fields = {key: value for key, value in outputs.items() if key not in ("loss", "logits")}
        return type(outputs)(loss=loss, logits=log_probs, **fields)

    def _context(
        self,
        logits: torch.Tensor,
        *,
        labels: torch.LongTensor | None,
        context_mask: torch.Tensor | None,
        padding: torch.LongTensor | None,
    ) -> torch.Tensor:
        """``[B, T]`` bool: explicit mask, else labels == -100 (shifted for causal LMs); padding too."""
        if context_mask is not None:
            if context_mask.shape != logits.shape[:-1]:
                raise ValueError(
                    f"context_mask must have shape {tuple(logits.shape[:-1])}, got {tuple(context_mask.shape)}"
                )
            context = context_mask.to(device=logits.device, dtype=torch.bool)
        elif labels is not None:
            context = context_mask_from_labels(labels.to(logits.device), shifted=not self.is_encoder_decoder)
        else:
            context = torch.zeros(logits.shape[:-1], dtype=torch.bool, device=logits.device)
        if padding is not None:
            context = context | (padding.to(logits.device) == 0)
        return context

    def _loss(self, log_probs: torch.Tensor, labels: torch.LongTensor) -> torch.Tensor:
        """transformers' own loss on the log-probabilities (= mean NLL of the labelled tokens)."""
        if self.is_encoder_decoder:
            return F.cross_entropy(
                log_probs.reshape(-1, self.vocab_size), labels.to(log_probs.device).reshape(-1), ignore_index=-100
            )
        return self.base.loss_function(logits=log_probs, labels=labels, vocab_size=self.vocab_size)

    def as_step_model(self) -> SelfTerminatingStepModel:
        """The KV-cached step model of the base model under the self-terminating head."""
        from .adapters import hf_step_model  # local import: adapters pulls in transformers

        return SelfTerminatingStepModel(
            hf_step_model(self.base), kind=self.kind, epsilon=self.epsilon, eos_token_id=self.eos_token_id
        )

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Same as :func:`save_self_terminating`."""
        save_self_terminating(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> SelfTerminatingLM:
        """Same as :func:`load_self_terminating`."""
        return load_self_terminating(directory, dtype=dtype)


def make_self_terminating(
    model: Any, *, kind: str, epsilon: float, eos_token_id: int | None = None
) -> SelfTerminatingLM:
    """Turn a transformers causal LM or encoder-decoder into a self-terminating one.

    Args:
        model: a ``PreTrainedModel`` with an LM head (``get_output_embeddings()``); its weights are shared.
        kind: ``"st"`` (monotonic p(eos)) or ``"nmst"`` (non-monotonic).
        epsilon: in (0, 1); greedy decoding stops within ``termination_bound(epsilon)`` new tokens.
        eos_token_id: the token whose output row feeds the sigmoid; defaults to the model's eos.

    Returns:
        A :class:`SelfTerminatingLM`.

    Example::

        model = make_self_terminating(GPT2LMHeadModel(config), kind="nmst", epsilon=1e-2)
        out = decoding.generate(model, input_ids, max_new_tokens=100)   # stops within 69 new tokens
    """
    check_kind(kind)
    check_epsilon(epsilon)
    vocab_size = _output_vocab_size(model)
    eos = _default_eos_token_id(model) if eos_token_id is None else eos_token_id
    check_eos_token_id(eos, vocab_size)
    return SelfTerminatingLM(model, kind=kind, epsilon=epsilon, eos_token_id=eos)


def save_self_terminating(model: SelfTerminatingLM, directory: str | os.PathLike) -> None:
    """Save the base model (``save_pretrained``) and the head's kind, epsilon and eos id
    (``self_terminating.json``) into ``directory``."""
    if not isinstance(model, SelfTerminatingLM):
        raise TypeError(f"model must be a SelfTerminatingLM, got {type(model).__name__}")
    directory = Path(directory)
    model.base.save_pretrained(directory)
    head = {"kind": model.kind, "epsilon": model.epsilon, "eos_token_id": model.eos_token_id}
    tmp = directory / (CONFIG_NAME + ".tmp")
    tmp.write_text(json.dumps(head, indent=2) + "\n")
    os.replace(tmp, directory / CONFIG_NAME)


def load_self_terminating(directory: str | os.PathLike, *, dtype: torch.dtype | None = None) -> SelfTerminatingLM:
    """Load what :func:`save_self_terminating` wrote, from local files only."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    directory = Path(directory)
    head_file = directory / CONFIG_NAME
    if not head_file.is_file():
        raise FileNotFoundError(f"{head_file} not found: directory was not written by save_self_terminating")
    head = json.loads(head_file.read_text())
    config = AutoConfig.from_pretrained(directory, local_files_only=True)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    base = auto.from_pretrained(directory, local_files_only=True, dtype=dtype)
    return make_self_terminating(base, kind=head["kind"], epsilon=head["epsilon"], eos_token_id=head["eos_token_id"])
