"""The Python examples in README.md and docs/ run as written.

Each file's ```python blocks run in order in one namespace (a later block may use an earlier block's names),
with the names the prose assumes (``model``, ``tokenizer``, ``ids``, ``mask``, ``documents``) bound to a tiny
Llama and a word-level tokenizer, and ``load_pretrained`` returning them instead of SmolLM2.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

import decoding.pretrained

REPO = Path(__file__).resolve().parent.parent
DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# blocks that need files a test cannot have; each is named by a line it contains, with the reason
SKIPPED = {
    'load_seq2seq("my-mle-model")': "needs a trained translation model and parallel text files",
}
WORDS = ("the history of city valkyria chronicles iii is a game it was first released in and on by".split())


def word_tokenizer() -> PreTrainedTokenizerFast:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, **{word: 3 + i for i, word in enumerate(WORDS)}}
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", eos_token="<eos>",
                                   unk_token="<unk>", padding_side="left")  # fmt: skip


def tiny_llama(vocab_size: int) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                         bos_token_id=0, eos_token_id=1, pad_token_id=0)  # fmt: skip
    return LlamaForCausalLM(config).eval()


def python_blocks(path: Path) -> list[str]:
    return re.findall(r"```python\n(.*?)```", path.read_text(), re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_the_examples_run(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    blocks = python_blocks(path)
    if not blocks:
        pytest.skip(f"{path.name} has no Python example")
    tokenizer = word_tokenizer()
    model = tiny_llama(len(tokenizer))
    monkeypatch.setattr(decoding.pretrained, "load_pretrained", lambda *args, **kwargs: (model, tokenizer))
    batch = tokenizer(["the history of the city", "it was first released"], return_tensors="pt", padding=True)
    namespace = {"model": model, "tokenizer": tokenizer, "ids": batch.input_ids, "mask": batch.attention_mask,
                 "documents": ["the game was first released in iii", "it is a city"]}  # fmt: skip
    monkeypatch.chdir(tmp_path)  # examples may save models
    ran = 0
    for block in blocks:
        if any(marker in block for marker in SKIPPED):
            continue
        exec(compile(block, f"{path.name}:python block", "exec"), namespace)  # noqa: S102 - our own docs
        ran += 1
    if not ran:
        pytest.skip(f"every example in {path.name} is in SKIPPED")


def test_every_skip_still_names_a_block() -> None:
    text = "\n".join(block for path in DOCS for block in python_blocks(path))
    assert all(marker in text for marker in SKIPPED)
