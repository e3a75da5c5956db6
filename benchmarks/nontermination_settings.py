"""The settings of :mod:`benchmarks.nontermination`: what decides its numbers, its tiers, and where its
cache keeps them (``<cache root>/nontermination/<settings hash>``).

Kept apart from the script so that other benchmarks (:mod:`benchmarks.speed` times the quick tier's
SmolLM2 fine-tunes) find its cache without importing the script.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.common import cache_root, settings_key
from benchmarks.nontermination_cells import DECODERS
from benchmarks.nontermination_words import WordSettings
from benchmarks.smollm2 import SmolSettings

__all__ = ["Settings", "QUICK", "STANDARD", "cache_key", "default_cache_dir"]


@dataclass(frozen=True)
class Settings:
    """Everything that decides the numbers (hashed into the cache key)."""

    words: WordSettings = WordSettings()
    smol: SmolSettings = SmolSettings()
    epsilons: tuple[float, ...] = (1e-3, 1e-4, 1e-5)
    word_max_new_tokens: int = 1500
    smol_max_new_tokens: int = 1000
    smol_decoders: tuple[str, ...] = tuple(DECODERS)
    sample_sets: int = 3
    batch_prompts: int = 256
    smollm2: bool = True  # the SmolLM2 half of the benchmark
    seed: int = 0
    version: int = 4  # bump when a code change alters the numbers, so cached results are not reused


QUICK = Settings(
    words=WordSettings(
        vocab_size=10_000, train_tokens=1_000_000, eval_sentences=1000, prompts=400, rnn_hidden=256,
        lstm_hidden=256, rnn_dropout=0.1, lstm_dropout=0.1, epochs=2, head_epochs=1, patience=2, lr=2e-3,
        batch_sentences=32, valid_prompts=200, autocast="bfloat16",
    ),
    epsilons=(1e-3,),
    smol=SmolSettings(prompts=16, eval_lines=32, finetune_tokens=100_000, train_layers=2, batch_tokens=1024, lr=1e-4),
    smol_decoders=("greedy", "consistent-nucleus-0.4"),
    sample_sets=2,
)  # fmt: skip

STANDARD = Settings(
    words=WordSettings(
        vocab_size=None, train_tokens=None, eval_sentences=None, prompts=1000, rnn_hidden=256, lstm_hidden=256,
        rnn_dropout=0.2, lstm_dropout=0.2, epochs=3, head_epochs=1, patience=3, lr=2e-3, batch_sentences=32,
        valid_prompts=300, autocast="bfloat16",
    ),
    epsilons=(1e-3,),
    sample_sets=2,
    smollm2=False,
)  # fmt: skip


def cache_key(settings: Settings) -> str:
    """The name of the cache folder that holds the numbers of ``settings``."""
    return settings_key(settings)


def default_cache_dir() -> Path:
    """``<cache root>/nontermination`` (:func:`benchmarks.common.cache_root`): the folder of every tier's cache."""
    return cache_root() / "nontermination"
