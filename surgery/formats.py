"""The export formats and their command-line flags (no torch import: ``--help`` stays fast)."""

from __future__ import annotations

import argparse

from .cli import positive_float

FORMATS = ("hf", "gguf", "decilm")
GGUF_OUTTYPES = ("f16", "bf16", "q8_0")


def add_format_arguments(parser: argparse.ArgumentParser) -> None:
    """``--format`` and ``--outtype``, shared by ``python -m surgery.export`` and ``python -m search.study export``."""
    parser.add_argument("--format", default="hf", choices=FORMATS,
                        help="hf: transformers checkpoint (default); gguf: one model.gguf for llama.cpp; "
                             "decilm: DeciLM checkpoint with block_configs for vLLM")
    parser.add_argument("--outtype", default=None, choices=GGUF_OUTTYPES,
                        help="--format gguf: weight type (default f16); a .gguf source keeps its own "
                             "quantization unless this is given (then its dequantized weights are written in "
                             "this type, its tokenizer copied)")


REPAIRS = ("none", "linear")
DEFAULT_RIDGE = 0.1  # the linear repair's pull of each map towards the identity, relative to its Gram diagonal
# (benchmarks/repair.py on SmolLM2-135M: 0.1 and 1 won back the most validation log-perplexity, 1e-3 the least)


def add_repair_arguments(parser: argparse.ArgumentParser) -> None:
    """``--repair`` and ``--calibration``, shared by both export commands."""
    parser.add_argument("--repair", default="none", choices=REPAIRS,
                        help="linear: fold a least-squares map per run of removed sublayers into the kept sublayer "
                             "before it (training-free, no new parameters; surgery/repair.py); default none")
    parser.add_argument("--calibration", action="append", metavar="PATH[:START:END]",
                        help="--repair: text to fit on, repeatable (default: a study's calibration text; without "
                             "a study the bundled WikiText-2 test text [0:0.5] and TinyStories validation stories "
                             "[0:0.8])")
    parser.add_argument("--repair-ridge", type=positive_float, metavar="R",
                        help="--repair: pull of each map towards the identity, relative to its data's scale "
                             f"(default {DEFAULT_RIDGE:g}; larger: closer to plain pruning)")
