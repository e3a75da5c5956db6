"""The library's own word-level language models: tanh-RNN and LSTM, each with a vanilla, ST or NMST head.

As in the self-terminating papers (Welleck et al. 2020; Choi et al. 2023): 2 layers, tied input and
output embeddings (embedding size = hidden size); the RNN has 256 hidden units and dropout 0.3, the LSTM
512 and 0.5. The output layer's eos row gives the ST / NMST sigmoid's logit; the math is
:mod:`decoding.heads`'s, shared with the transformers wrapper.

``forward`` returns log-probabilities ``[B, T, V]`` for every head and, given labels, the mean NLL (the
same shifted loss as a transformers causal LM), so :func:`training.lm.train_lm` trains it. Decoding goes
through ``as_step_model()``: a :class:`RecurrentStepModel` (raw logits) for the vanilla head, wrapped in
a :class:`~decoding.models.self_terminating.SelfTerminatingStepModel` for st / nmst.

Example::

    model = lstm_lm(vocab_size=33_278, eos_token_id=0, head="nmst", epsilon=1e-4)
    out = decoding.generate(model.eval(), prompts, attention_mask=mask, max_new_tokens=1500)
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from ..heads import check_eos_token_id, check_epsilon, context_mask_from_labels, self_terminating_log_probs
from ..protocol import StepModelBase
from .self_terminating import SelfTerminatingStepModel

__all__ = [
    "RecurrentLM",
    "RecurrentLMConfig",
    "RecurrentLMOutput",
    "RecurrentStepModel",
    "load_recurrent_lm",
    "lstm_lm",
    "rnn_lm",
    "save_recurrent_lm",
]

CELLS = ("rnn", "lstm")
HEADS = ("vanilla", "st", "nmst")


@dataclass(frozen=True)
class RecurrentLMConfig:
    """Everything needed to rebuild a :class:`RecurrentLM`.

    Attributes:
        vocab_size: number of tokens ``V``.
        eos_token_id: the end token, in ``[0, V)``.
        pad_token_id: token used to pad batches (defaults to ``eos_token_id``).
        cell: ``"rnn"`` (tanh) or ``"lstm"``.
        hidden_size: hidden units per layer, also the (tied) embedding size.
        num_layers: stacked recurrent layers.
        dropout: on the embeddings, between layers and before the output layer, in [0, 1).
        head: ``"vanilla"`` (softmax), ``"st"`` or ``"nmst"``.
        epsilon: in (0, 1) for st / nmst; must be None for vanilla.
    """

    vocab_size: int
    eos_token_id: int
    pad_token_id: int | None = None
    cell: str = "lstm"
    hidden_size: int = 512
    num_layers: int = 2
    dropout: float = 0.5
    head: str = "vanilla"
    epsilon: float | None = None

    def __post_init__(self) -> None:
        if self.vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {self.vocab_size}")
        check_eos_token_id(self.eos_token_id, self.vocab_size)
        if self.pad_token_id is not None and not 0 <= self.pad_token_id < self.vocab_size:
            raise ValueError(f"pad_token_id must be in [0, {self.vocab_size}), got {self.pad_token_id}")
        if self.cell not in CELLS:
            raise ValueError(f"cell must be one of {CELLS}, got {self.cell!r}")
        if self.hidden_size < 1 or self.num_layers < 1:
            raise ValueError(f"hidden_size and num_layers must be >= 1, got {self.hidden_size}, {self.num_layers}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.head not in HEADS:
            raise ValueError(f"head must be one of {HEADS}, got {self.head!r}")
        if self.head == "vanilla" and self.epsilon is not None:
            raise ValueError("epsilon is only used by the st and nmst heads; leave it None for head='vanilla'")
        if self.head != "vanilla":
            if self.epsilon is None:
                raise ValueError(f"head={self.head!r} needs epsilon in (0, 1)")
            check_epsilon(self.epsilon)

    @property
    def is_encoder_decoder(self) -> bool:
        return False


class RecurrentLMOutput(NamedTuple):
    """``logits``: log-probabilities ``[B, T, V]``; ``loss``: mean NLL of the labelled tokens or None."""

    logits: torch.Tensor
    loss: torch.Tensor | None


def _final_top_hidden(state: Any) -> torch.Tensor:
    """Top layer's hidden state ``[B, H]`` from an RNN ``h [L, B, H]`` or LSTM ``(h, c)`` state."""
    hidden = state[0] if isinstance(state, tuple) else state
    return hidden[-1]


class RecurrentLM(nn.Module):
    """A word-level tanh-RNN or LSTM language model with tied embeddings and a vanilla / ST / NMST head.

    Build it with :func:`rnn_lm` or :func:`lstm_lm`, or from a :class:`RecurrentLMConfig`.
    """

    def __init__(self, config: RecurrentLMConfig) -> None:
        super().__init__()
        from transformers import GenerationConfig  # local import: decoding's defaults for generate

        self.config = config
        size = config.hidden_size
        self.embedding = nn.Embedding(config.vocab_size, size)
        recurrent = nn.LSTM if config.cell == "lstm" else nn.RNN
        between_layers = config.dropout if config.num_layers > 1 else 0.0
        self.rnn = recurrent(size, size, num_layers=config.num_layers, dropout=between_layers, batch_first=True)
        self.dropout = nn.Dropout(config.dropout)
        self.output = nn.Linear(size, config.vocab_size)
        self.output.weight = self.embedding.weight  # tied embeddings
        nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        nn.init.zeros_(self.output.bias)
        pad = config.eos_token_id if config.pad_token_id is None else config.pad_token_id
        self.generation_config = GenerationConfig(eos_token_id=config.eos_token_id, pad_token_id=pad)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    def output_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Raw output-layer logits ``[..., V]`` from top-layer hidden states ``[..., H]``."""
        return self.output(self.dropout(hidden))

    def run(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor | None = None, state: Any = None
    ) -> tuple[torch.Tensor, Any]:
        """Run the recurrence over ``input_ids [B, T]``, skipping padding.

        Positions with ``attention_mask == 0`` (left or right padding) are left out of the recurrence
        by packing, so a row's result does not depend on how much padding it has.

        Returns:
            ``(hidden [B, T, H], state)``: top-layer outputs (zeros at padding) and the state after each
            row's last real token.
        """
        embedded = self.dropout(self.embedding(input_ids))  # [B, T, H]
        if attention_mask is None or bool(attention_mask.all()):
            return self.rnn(embedded, state)
        real = attention_mask.to(torch.bool)
        lengths = real.sum(dim=1)
        if bool((lengths == 0).any()):
            raise ValueError("attention_mask must have at least one real token in every row")
        # stable sort puts each row's real positions first, in order
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # [B, T]
        gather_index = order.unsqueeze(-1).expand(-1, -1, embedded.shape[-1])
        packed = pack_padded_sequence(
            embedded.gather(1, gather_index), lengths.cpu(), batch_first=True, enforce_sorted=False
        )
        packed_hidden, state = self.rnn(packed, state)
        hidden, _ = pad_packed_sequence(packed_hidden, batch_first=True, total_length=input_ids.shape[1])
        return torch.zeros_like(hidden).scatter(1, gather_index, hidden), state

    def head_log_probs(self, logits: torch.Tensor, *, context_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Raw logits ``[B, T, V]`` -> log-probabilities ``[B, T, V]`` of this model's head."""
        if self.config.head == "vanilla":
            return torch.log_softmax(logits.float(), dim=-1)
        log_probs, _ = self_terminating_log_probs(
            logits,
            kind=self.config.head,
            epsilon=self.config.epsilon,
            eos_token_id=self.config.eos_token_id,
            context_mask=context_mask,
        )
        return log_probs

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        *,
        labels: torch.LongTensor | None = None,
        context_mask: torch.Tensor | None = None,
    ) -> RecurrentLMOutput:
        """Log-probabilities of the next token at every position, and the MLE loss given labels.

        Args:
            input_ids: ``[B, T]`` tokens (left or right padded).
            attention_mask: ``[B, T]``, 0 on padding (padding positions are context).
            labels: ``[B, T]`` with -100 on tokens not to predict; position ``i`` predicts
                ``labels[:, i + 1]`` and is context when that is -100.
            context_mask: ``[B, T]`` bool, aligned with the positions; overrides the one from labels.

        Returns:
            :class:`RecurrentLMOutput`: ``logits [B, T, V]`` log-probabilities, ``loss`` (mean NLL).
        """
        hidden, _ = self.run(input_ids, attention_mask)
        if context_mask is None and labels is not None:
            context_mask = context_mask_from_labels(labels, shifted=True)
        if attention_mask is not None:
            padding = attention_mask == 0
            context_mask = padding if context_mask is None else context_mask.to(torch.bool) | padding
        log_probs = self.head_log_probs(self.output_logits(hidden), context_mask=context_mask)
        loss = None
        if labels is not None:
            targets = labels[:, 1:].reshape(-1)
            loss = F.nll_loss(log_probs[:, :-1].reshape(-1, self.vocab_size), targets, ignore_index=-100)
        return RecurrentLMOutput(logits=log_probs, loss=loss)

    def scored_loss(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor, labels: torch.LongTensor
    ) -> torch.Tensor:
        """``forward(...).loss`` computed on the scored positions only: the same mean NLL, cheaper.

        The output layer dominates a word-level model's cost, and with context-masked labels (the papers'
        protocol) a third or more of the positions predict nothing. The vanilla head runs the output layer
        on the scored positions alone; a self-terminating head needs every position from the first scored
        one on (its running product), and none before it, where ``p(eos) = 0`` and the clock stands still.

        Args:
            input_ids, attention_mask, labels: ``[B, T]``, as :meth:`forward` takes them.

        Returns:
            The mean NLL of the labelled tokens (a scalar).
        """
        hidden, _ = self.run(input_ids, attention_mask)  # [B, T, H]
        targets = labels[:, 1:]  # position i predicts labels[:, i + 1]
        scored = targets != -100  # [B, T - 1]
        if not bool(scored.any()):
            raise ValueError("labels hold no token to predict")
        if self.config.head == "vanilla":
            logits = self.output_logits(hidden[:, :-1][scored])  # [N, V]
            return F.cross_entropy(logits.float(), targets[scored])
        first = int(scored.any(dim=0).nonzero()[0])
        logits = self.output_logits(hidden[:, first:-1])  # [B, T - 1 - first, V]
        log_probs = self.head_log_probs(logits, context_mask=~scored[:, first:])
        return F.nll_loss(log_probs.reshape(-1, self.vocab_size), targets[:, first:].reshape(-1), ignore_index=-100)

    def as_step_model(self) -> RecurrentStepModel | SelfTerminatingStepModel:
        """The step model ``decoding.generate`` drives: raw logits, under the ST / NMST head if any."""
        inner = RecurrentStepModel(self)
        if self.config.head == "vanilla":
            return inner
        return SelfTerminatingStepModel(
            inner, kind=self.config.head, epsilon=self.config.epsilon, eos_token_id=self.config.eos_token_id
        )


class RecurrentStepModel(StepModelBase):
    """:class:`~decoding.protocol.StepModel` over a :class:`RecurrentLM`, returning raw logits ``[B, V]``.

    State: the recurrent state, ``h [L, B, H]`` (RNN) or ``(h, c)`` (LSTM). Prefill packs away left
    padding, so a batched prefill equals prefilling each prompt alone.
    """

    fresh_logits = True  # output_logits makes a new tensor at every call
    can_merge = True     # recurrent states concatenate along the batch dimension

    def __init__(self, model: RecurrentLM) -> None:
        self.model = model
        self.vocab_size = model.vocab_size

    def prefill(
        self, input_ids: torch.LongTensor, attention_mask: torch.Tensor
    ) -> tuple[torch.Tensor, Any, torch.LongTensor]:
        """Consume the prompts ``[B, T]``; returns ``(logits [B, V], state, prefix = input_ids)``."""
        _, state = self.model.run(input_ids, attention_mask)
        return self.model.output_logits(_final_top_hidden(state)), state, input_ids

    def step(self, tokens: torch.LongTensor, state: Any) -> tuple[torch.Tensor, Any]:
        """Feed ``tokens [B]``; returns ``(logits [B, V], state)``."""
        hidden, state = self.model.run(tokens.unsqueeze(1), None, state)
        return self.model.output_logits(hidden[:, -1]), state

    def select(self, state: Any, index: torch.LongTensor) -> Any:
        """Rows ``index [B']`` of the state (batch is dimension 1 of ``h`` and ``c``)."""
        if isinstance(state, tuple):
            return tuple(part.index_select(1, index.to(part.device)) for part in state)
        return state.index_select(1, index.to(state.device))

    def merge(self, state: Any, other: Any) -> Any:
        """The rows of ``state`` followed by the rows of ``other`` (continuous batching)."""
        if isinstance(state, tuple):
            return tuple(torch.cat([mine, theirs], dim=1) for mine, theirs in zip(state, other))
        return torch.cat([state, other], dim=1)


def rnn_lm(
    vocab_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int | None = None,
    head: str = "vanilla",
    epsilon: float | None = None,
    hidden_size: int = 256,
    num_layers: int = 2,
    dropout: float = 0.3,
) -> RecurrentLM:
    """A 2-layer tanh-RNN LM, 256 hidden units, dropout 0.3, tied embeddings (the papers' defaults)."""
    config = RecurrentLMConfig(
        vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, cell="rnn",
        hidden_size=hidden_size, num_layers=num_layers, dropout=dropout, head=head, epsilon=epsilon,
    )  # fmt: skip
    return RecurrentLM(config)


def lstm_lm(
    vocab_size: int,
    *,
    eos_token_id: int,
    pad_token_id: int | None = None,
    head: str = "vanilla",
    epsilon: float | None = None,
    hidden_size: int = 512,
    num_layers: int = 2,
    dropout: float = 0.5,
) -> RecurrentLM:
    """A 2-layer LSTM LM, 512 hidden units, dropout 0.5, tied embeddings (the papers' defaults)."""
    config = RecurrentLMConfig(
        vocab_size=vocab_size, eos_token_id=eos_token_id, pad_token_id=pad_token_id, cell="lstm",
        hidden_size=hidden_size, num_layers=num_layers, dropout=dropout, head=head, epsilon=epsilon,
    )  # fmt: skip
    return RecurrentLM(config)


def save_recurrent_lm(model: RecurrentLM, path: str | os.PathLike) -> None:
    """Write the config and weights of ``model`` to one file, atomically (tmp file + rename)."""
    if not isinstance(model, RecurrentLM):
        raise TypeError(f"model must be a RecurrentLM, got {type(model).__name__}")
    payload = {"config": dataclasses.asdict(model.config), "state_dict": model.state_dict()}
    tmp = f"{os.fspath(path)}.tmp"
    torch.save(payload, tmp)
    os.replace(tmp, path)


def load_recurrent_lm(path: str | os.PathLike, *, map_location: str | torch.device = "cpu") -> RecurrentLM:
    """Rebuild the model :func:`save_recurrent_lm` wrote."""
    payload = torch.load(path, map_location=map_location, weights_only=True)
    model = RecurrentLM(RecurrentLMConfig(**payload["config"]))
    model.load_state_dict(payload["state_dict"])
    return model
