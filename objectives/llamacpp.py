"""Measurements in llama.cpp (through llama-cpp-python, the optional ``llamacpp`` extra): perplexity, prefill and
decode speed of GGUF files, timed side by side, and the matrix work per token a GGUF file's weights imply.

Prefill is one ``eval`` of ``seq_len`` new tokens on an empty KV cache (llama.cpp computes the logits of the last
position only); decode is ``steps`` single-token ``eval`` calls after a ``context``-token prompt. Runs of several
models are interleaved (round-robin per repeat), and medians compared.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from surgery.errors import UserError

REQUIREMENT = "llama-cpp-python>=0.3.36,<0.4"


class LlamaCppError(UserError):
    """llama-cpp-python missing, or a GGUF file llama.cpp cannot load."""


def llama_cpp():
    try:
        import llama_cpp
    except ImportError:
        raise LlamaCppError(f"measuring in llama.cpp needs llama-cpp-python: pip install '{REQUIREMENT}' "
                            "(or the depthsearch[llamacpp] extra)") from None
    return llama_cpp


def open_model(path: str | Path, *, threads: int, n_ctx: int, logits_all: bool = False):
    """A llama.cpp context for ``path`` (quiet, ``threads`` threads for prompt and generation alike)."""
    try:
        return llama_cpp().Llama(str(path), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=logits_all,
                                 n_threads=threads, n_threads_batch=threads, verbose=False)
    except ValueError as error:
        raise LlamaCppError(f"llama.cpp cannot load {path}: {error}") from None


def perplexity(path: str | Path, windows: Sequence[Sequence[int]], *, threads: int = 2) -> float:
    """Perplexity of ``path`` over the next-token predictions inside each token window (each window from an empty
    cache), as the project's own perplexity counts them."""
    size = max(len(w) for w in windows)
    llm = open_model(path, threads=threads, n_ctx=size, logits_all=True)
    total, count = 0.0, 0
    try:
        for window in windows:
            llm.reset()
            llm.eval(list(window))
            logits = np.asarray(llm.scores[: len(window) - 1], dtype=np.float64)
            logits -= logits.max(axis=1, keepdims=True)
            logp = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
            total -= float(logp[np.arange(len(window) - 1), list(window[1:])].sum())
            count += len(window) - 1
    finally:
        llm.close()
    return math.exp(total / count)


@dataclass(frozen=True)
class SpeedSettings:
    seq_len: int = 128  # prefill tokens
    context: int = 128  # decode: tokens in the cache before the timed steps
    steps: int = 32  # decode steps per repeat
    repeats: int = 7
    warmup: int = 1
    threads: int = 2
    seed: int = 0


def _tokens(vocab: int, count: int, seed: int) -> list[int]:
    rng = np.random.default_rng(seed)
    return [int(t) for t in rng.integers(10, vocab, size=count)]


def _prefill_ms(llm, tokens: list[int]) -> float:
    llm.reset()
    start = time.perf_counter()
    llm.eval(tokens)
    return (time.perf_counter() - start) * 1e3


def _decode_ms(llm, prompt: list[int], steps: list[int]) -> float:
    llm.reset()
    llm.eval(prompt)
    start = time.perf_counter()
    for token in steps:
        llm.eval([token])
    return (time.perf_counter() - start) * 1e3 / len(steps)


def speeds(paths: Mapping[str, str | Path], settings: SpeedSettings = SpeedSettings()) -> dict[str, dict[str, float]]:
    """Median prefill and decode milliseconds (and tokens/s) of each GGUF file, timed round-robin."""
    size = max(settings.seq_len, settings.context + settings.steps) + 8
    models = {name: open_model(path, threads=settings.threads, n_ctx=size) for name, path in paths.items()}
    try:
        vocab = min(llm.n_vocab() for llm in models.values())
        prefill = _tokens(vocab, settings.seq_len, settings.seed)
        prompt = _tokens(vocab, settings.context, settings.seed + 1)
        steps = _tokens(vocab, settings.steps, settings.seed + 2)
        times: dict[str, dict[str, list[float]]] = {name: {"prefill": [], "decode": []} for name in models}
        for index in range(settings.warmup + settings.repeats):
            order = list(models) if index % 2 == 0 else list(reversed(models))  # neither always goes first
            for name in order:
                p, d = _prefill_ms(models[name], prefill), _decode_ms(models[name], prompt, steps)
                if index >= settings.warmup:
                    times[name]["prefill"].append(p)
                    times[name]["decode"].append(d)
    finally:
        for llm in models.values():
            llm.close()
    out = {}
    for name, phases in times.items():
        p, d = statistics.median(phases["prefill"]), statistics.median(phases["decode"])
        out[name] = {"prefill_ms": p, "decode_ms": d, "prefill_tok_s": settings.seq_len / p * 1e3,
                     "decode_tok_s": 1e3 / d}
    return out


def matmul_work(path: str | Path) -> dict[str, int]:
    """Multiply-adds per token of a GGUF file's matrices: ``blocks`` (every block matrix) and ``head`` (the output
    matrix, or the tied token embedding)."""
    from gguf import GGUFReader

    reader = GGUFReader(path)
    blocks, head, embedding = 0, 0, 0
    for tensor in reader.tensors:
        elements = int(np.prod([int(x) for x in tensor.shape]))
        if tensor.name.startswith("blk.") and len(tensor.shape) == 2:
            blocks += elements
        elif tensor.name == "output.weight":
            head = elements
        elif tensor.name == "token_embd.weight":
            embedding = elements
    return {"blocks": blocks, "head": head or embedding}


def ideal_speedups(dense: Mapping[str, int], pruned: Mapping[str, int]) -> dict[str, float]:
    """Dense matrix work / pruned matrix work: decode counts the head on every token; prefill (logits of the last
    position only) counts the blocks alone."""
    return {"decode": (dense["blocks"] + dense["head"]) / (pruned["blocks"] + pruned["head"]),
            "prefill": dense["blocks"] / pruned["blocks"]}


# a latency model of llama.cpp --------------------------------------------------------------------------------------
def calibration_masks(num_layers: int) -> dict[str, str]:
    """Masks whose timings separate the fixed cost, an attention sublayer and an FFN sublayer: every second
    layer's attention removed, every second layer's FFN removed, every second layer removed, and the dense model."""
    def every_other(item: str) -> str:
        return ",".join(item if i % 2 else "AM" for i in range(num_layers))

    return {"dense": ",".join(["AM"] * num_layers), "attention/2": every_other("-M"),
            "ffn/2": every_other("A-"), "layers/2": every_other("--")}


def fit_costs(measured: Mapping[str, float], masks: Mapping[str, str]) -> tuple[float, float, float]:
    """(fixed, attention, FFN) milliseconds by least squares: ms = fixed + kept attentions x a + kept FFNs x f."""
    rows, values = [], []
    for name, mask in masks.items():
        items = mask.split(",")
        rows.append([1.0, sum(i[0] == "A" for i in items), sum(i[1] == "M" for i in items)])
        values.append(measured[name])
    fixed, attention, ffn = np.linalg.lstsq(np.asarray(rows), np.asarray(values), rcond=None)[0]
    return float(fixed), float(attention), float(ffn)


def llamacpp_profile(measured: Mapping[str, Mapping[str, float]], masks: Mapping[str, str], *, signature: dict,
                     device: str, settings: SpeedSettings):
    """A :class:`objectives.latency.LatencyProfile` whose tables are llama.cpp milliseconds, fitted on ``masks``'
    medians (``measured[name]["prefill_ms" / "decode_ms"]``): a study given it as ``latency.profile`` budgets
    llama.cpp prefill and decode time. Every layer gets the fitted per-sublayer costs (the layers of a
    Llama-family model have one shape)."""
    from .latency import LatencyProfile, PhaseProfile

    layers = len(next(iter(masks.values())).split(","))
    profile = LatencyProfile(dict(signature), device)
    shapes = {"prefill": {"batch_size": 1, "seq_len": settings.seq_len},
              "decode": {"batch_size": 1, "context": settings.context}}
    for phase, shape in shapes.items():
        fixed, attention, ffn = fit_costs({name: row[f"{phase}_ms"] for name, row in measured.items()}, masks)
        dense = measured["dense"][f"{phase}_ms"]
        profile.phases[phase] = PhaseProfile(phase, shape, fixed, [attention, ffn] * layers, dense, dense,
                                             settings.repeats, settings.warmup)
    return profile


def require_for_script(smoke: bool) -> None:
    """For benchmark scripts: without llama-cpp-python a ``--smoke`` run skips (exit 77, ``skip: ...``) and a full
    run stops with one message (exit 2)."""
    try:
        llama_cpp()
    except LlamaCppError as error:
        import sys

        print(f"skip: {error}" if smoke else f"error: {error}", file=sys.stderr)
        sys.exit(77 if smoke else 2)
