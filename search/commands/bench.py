"""``python -m search.study bench EXPORT_DIR --against MODEL``: an exported model's speed and memory vs the dense one.

Both models get the same seeded inputs; prefill (``batch x seq_len``) and decode (one token on a ``context``-token
KV cache) are timed side by side, round-robin, and the medians of the repeats are compared. Memory is the
weights plus the peak working memory of each phase (CPU: the process's resident high-water mark, reset before
each phase; CUDA: the allocator's peak); the KV cache is measured from the cache tensors themselves.

    python -m search.study bench runs/study/export --against studies/assets/models/tinystories-l12
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import os
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from objectives.budgets import kv_cache_costs
from objectives.latency import LatencySettings, interleaved_ms, model_device, phase_runner
from surgery.errors import UserError
from surgery.families import family_for, get_path
from surgery.compat import output_cache
from surgery.files import atomic_write_text
from surgery.mask import KeepMask
from surgery.params import num_params
from surgery.pruned_modeling import SkippedAttention, SkippedFFN

MIB = 2**20


class BenchError(UserError):
    """A flag or model the benchmark cannot use."""


# measurements ------------------------------------------------------------------------------------------------
def structure_mask(model: nn.Module) -> KeepMask:
    """The keep-mask a (possibly exported) model computes: stand-in sublayers count as removed.

    Stand-ins are recognised by class name: a ``trust_remote_code`` load uses the export's own copy of them.
    """
    family = family_for(model.config)
    bits: list[bool] = []
    for layer in get_path(model, family.layers):
        bits.append(type(getattr(layer, family.attn)).__name__ != SkippedAttention.__name__)
        bits.append(type(getattr(layer, family.ffn[-1])).__name__ != SkippedFFN.__name__)
    return KeepMask(tuple(bits))


def weight_bytes(model: nn.Module) -> int:
    tensors = {t.data_ptr(): t for t in [*model.parameters(), *model.buffers()]}
    return sum(t.numel() * t.element_size() for t in tensors.values())


def cache_bytes(cache, keep_attn: list[bool]) -> int:
    """Bytes of keys and values a transformers KV cache holds for the kept attentions (tensors shared between
    layers counted once); the length placeholders of removed attentions are not keys or values."""
    tensors = {}
    for layer, kept in zip(getattr(cache, "layers", []), keep_attn):
        for name in ("keys", "values") if kept else ():
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor) and tensor.numel():
                tensors[tensor.data_ptr()] = tensor
    return sum(t.numel() * t.element_size() for t in tensors.values())


def _status_kib(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _fixed_mmap_threshold() -> None:
    """glibc: serve every allocation over 64 KiB by mmap, so freed tensors leave the resident set at once.

    (By default the threshold grows after frees and freed memory stays resident, hiding later peaks.)
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 16)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def transient_peak(run: Callable[[], Any], device: torch.device) -> int | None:
    """Peak bytes above the level before ``run()`` while it runs (None where the platform cannot tell)."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        base = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        run()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base
    _fixed_mmap_threshold()
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the resident high-water mark (Linux)
    except OSError:
        return None
    run()
    peak = _status_kib("VmHWM")
    return None if base is None or peak is None else max(peak - base, 0) * 1024


def memory_profile(model: nn.Module, settings: LatencySettings) -> dict[str, Any]:
    """Weights, prefill peak, KV cache (total and per token) and decode peak of one model, in bytes."""
    device = model_device(model)
    weights = weight_bytes(model)
    with torch.inference_mode():
        prefill = transient_peak(phase_runner(model, "prefill", settings), device)
        decode = phase_runner(model, "decode", settings)
        out = decode()
        kv = cache_bytes(output_cache(out), list(structure_mask(model).bits[0::2]))
        step = transient_peak(decode, device)
    tokens = settings.decode_batch_size * settings.context
    return {
        "weights_bytes": weights,
        "prefill_peak_bytes": None if prefill is None else weights + prefill,
        "kv_cache_bytes": kv,
        "kv_bytes_per_token": kv / tokens,
        "kv_bytes_per_token_predicted": kv_cache_costs(model).cost(structure_mask(model)),
        "decode_peak_bytes": None if step is None else weights + kv + step,
    }


def compare(export: nn.Module, dense: nn.Module, settings: LatencySettings) -> dict[str, Any]:
    """Timings side by side, then each model's memory; every figure for both models plus export/dense ratios."""
    device = model_device(dense)
    timings = {}
    for phase in ("prefill", "decode"):
        runners = {"export": phase_runner(export, phase, settings), "dense": phase_runner(dense, phase, settings)}
        timings[phase] = interleaved_ms(
            runners, warmup=settings.warmup, repeats=settings.repeats, device=device, steps=settings.steps(phase)
        )
    rows: dict[str, dict[str, float | None]] = {}
    prefill_tokens = settings.batch_size * settings.seq_len
    for who, model in (("export", export), ("dense", dense)):
        memory = memory_profile(model, settings)
        rows[who] = {
            "prefill_ms": timings["prefill"][who],
            "prefill_tokens_per_s": prefill_tokens / timings["prefill"][who] * 1e3,
            "decode_ms": timings["decode"][who],
            "decode_tokens_per_s": settings.decode_batch_size / timings["decode"][who] * 1e3,
            "parameters": num_params(model),
            **memory,
        }
    ratios = {k: _ratio(rows["export"][k], rows["dense"][k]) for k in rows["export"]}
    return {"settings": settings.shape("prefill") | {"decode": settings.shape("decode")}, **rows, "ratio": ratios}


def _ratio(a, b) -> float | None:
    return None if a is None or b in (None, 0) else a / b


# output ------------------------------------------------------------------------------------------------------
_ROWS = [
    ("prefill_ms", "prefill ms", 1.0), ("prefill_tokens_per_s", "prefill tokens/s", 1.0),
    ("decode_ms", "decode ms/step", 1.0), ("decode_tokens_per_s", "decode tokens/s", 1.0),
    ("parameters", "parameters", 1.0), ("weights_bytes", "weights MiB", 1 / MIB),
    ("prefill_peak_bytes", "prefill peak MiB", 1 / MIB), ("kv_bytes_per_token", "KV bytes/token", 1.0),
    ("kv_bytes_per_token_predicted", "KV bytes/token (predicted)", 1.0),
    ("kv_cache_bytes", "KV cache MiB", 1 / MIB), ("decode_peak_bytes", "decode peak MiB", 1 / MIB),
]


def format_table(result: dict[str, Any]) -> str:
    def cell(value, scale):
        return "n/a" if value is None else f"{value * scale:,.4g}" if scale != 1.0 else f"{value:,.6g}"

    lines = [f"{'metric':<28}{'export':>14}{'dense':>14}{'export/dense':>14}"]
    for key, label, scale in _ROWS:
        ratio = result["ratio"].get(key)
        lines.append(
            f"{label:<28}{cell(result['export'][key], scale):>14}{cell(result['dense'][key], scale):>14}"
            f"{'n/a' if ratio is None else f'{ratio:.3f}x':>14}"
        )
    speed = result["ratio"]
    lines.append(
        f"speedup: prefill {1 / speed['prefill_ms']:.3f}x, decode {1 / speed['decode_ms']:.3f}x "
        f"(dense ms / export ms, medians of {result['repeats']} side-by-side repeats)"
    )
    return "\n".join(lines)


def _json_problem(path: str | None) -> str | None:
    """Why the ``--json`` file could not be written (checked before the benchmark runs)."""
    if path is None:
        return None
    target = Path(path)
    if target.is_dir():
        return f"--json {path}: is a directory"
    parent = target.absolute().parent
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir() or not os.access(parent, os.W_OK | os.X_OK):
        return f"--json {path}: cannot write into {parent}"
    return None


SHAPE_KEYS = ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads",
              "head_dim")  # what an export shares with the dense model it was pruned from


def _model_config(name: str, trust_remote_code: bool):
    """A model's config, read without its weights; every way it can be unreadable is one user error."""
    from surgery.cli import LOAD_ERRORS, remote_code_problem
    from surgery.load import ModelLoadError, check_model_source, load_model_config

    problem = remote_code_problem(name, trust_remote_code, "--trust-remote-code")
    if problem:
        raise ModelLoadError(problem)
    check_model_source(name)
    try:
        return load_model_config(name, trust_remote_code=trust_remote_code)
    except UserError:
        raise
    except LOAD_ERRORS as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ModelLoadError(f"cannot load the config of model {name}: {type(error).__name__}: {first}") from None


def pair_problems(export, dense, export_name: str, dense_name: str) -> list[str]:
    """Why ``dense`` is not the model ``export`` was pruned from: another family, vocabulary or layer shape, or
    fewer layers (configs or tokenizers; ratios between unrelated models mean nothing)."""
    if hasattr(export, "get_vocab"):
        same = export.get_vocab() == dense.get_vocab()
        return [] if same else [f"--against {dense_name}: its tokenizer's vocabulary ({len(dense)} tokens) differs "
                                f"from {export_name}'s ({len(export)} tokens); bench an export against its own model"]
    problems = []
    families = family_for(export).name, family_for(dense).name
    if families[0] != families[1]:
        return [f"--against {dense_name}: a {families[1]} model, but {export_name} is {families[0]}"]
    for key in SHAPE_KEYS:
        mine, theirs = getattr(export, key, None), getattr(dense, key, None)
        if mine != theirs:
            problems.append(f"--against {dense_name}: {key} {theirs}, but {export_name} has {mine}")
    if export.num_hidden_layers > dense.num_hidden_layers:
        problems.append(f"--against {dense_name}: {dense.num_hidden_layers} layers, fewer than the "
                        f"{export.num_hidden_layers} of {export_name}")
    return problems


def _load_both(args: argparse.Namespace):
    """(export, dense): every problem with the flags or the models named before anything is timed; the models
    must be an export and the dense model it was pruned from (same family, vocabulary and layer shapes)."""
    from search.checks import device_problem, positions_problems
    from surgery.cli import load_checked

    problems = [p for p in (device_problem("--device", args.device), _json_problem(args.json)) if p]
    if problems:
        raise BenchError("; ".join(problems))
    configs = [_model_config(name, args.trust_remote_code) for name in (args.export_dir, args.against)]
    lengths = {"--seq-len": args.seq_len, "--context (+1 decoded token)": args.context + 1}
    problems = pair_problems(*configs, args.export_dir, args.against)
    problems += positions_problems(configs[1], lengths, args.against)
    problems += positions_problems(configs[0], lengths, args.export_dir)
    if problems:
        raise BenchError("; ".join(problems))
    dense, dense_tokenizer = load_checked(args.against, dtype=args.dtype, device=args.device,
                                          trust_remote_code=args.trust_remote_code)
    export, tokenizer = load_checked(args.export_dir, dtype=args.dtype, device=args.device,
                                     trust_remote_code=args.trust_remote_code)
    problems = pair_problems(tokenizer, dense_tokenizer, args.export_dir, args.against)
    if problems:
        raise BenchError("; ".join(problems))
    return export, dense


def main(args: argparse.Namespace) -> int:
    if args.threads:
        torch.set_num_threads(args.threads)
    settings = LatencySettings.from_mapping(
        {"batch_size": args.batch_size, "seq_len": args.seq_len, "context": args.context,
         "decode_batch_size": args.decode_batch_size, "decode_steps": args.decode_steps, "warmup": args.warmup, "repeats": args.repeats}
    )
    export, dense = _load_both(args)
    result = compare(export, dense, settings) | {"export_dir": args.export_dir, "against": args.against,
                                                 "repeats": settings.repeats, "device": str(model_device(dense))}
    print(f"bench {args.export_dir} against {args.against} on {result['device']}: prefill "
          f"{args.batch_size}x{args.seq_len} tokens, decode {args.decode_batch_size} x 1 token on {args.context} cached")
    print(format_table(result))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0
