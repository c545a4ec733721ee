"""Validate the latency model against exported models, and measure what removing 25% of the compute buys.

For each model: profile the dense model (objectives.latency), export several masks (surgery.export), load the
exports back with ``from_pretrained`` and time them side by side with the dense model (round-robin, medians).
Reports predicted vs measured prefill/decode milliseconds with the error, and for the masks that remove 25% of
the prefill FLOPs the measured speedup against the FLOP-proportional one.

    python benchmarks/latency.py --threads 1 --out benchmarks/RESULTS-latency.md
    python benchmarks/latency.py --smoke     # seconds: the sizes of SMOKE, one repeat
"""

from __future__ import annotations

import argparse
import random
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from surgery.cli import Parser, non_negative_int, output_file, positive_int  # noqa: E402

from objectives.budgets import CostTable, kv_cache_costs  # noqa: E402
from objectives.latency import LatencySettings, interleaved_ms, phase_runner, prefill_flop_costs, profile_model  # noqa: E402
from surgery.export import export_pruned  # noqa: E402
from surgery.files import atomic_write_text  # noqa: E402
from surgery.load import load_model  # noqa: E402
from surgery.mask import KeepMask  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "tinystories-l12": {"path": "studies/assets/models/tinystories-l12", "batch_size": 8, "seq_len": 256},
    "llama-24x512 (random)": {
        "config": dict(num_hidden_layers=24, hidden_size=512, intermediate_size=1376, num_attention_heads=8,
                       num_key_value_heads=4, vocab_size=32000, max_position_embeddings=1024),
        "batch_size": 1, "seq_len": 256,
    },
}

# --smoke: these sizes replace the given ones and each model's (the models chosen are kept; the random one shrinks)
SMOKE = {"repeats": 1, "warmup": 0, "context": 16, "decode_steps": 2, "batch_size": 1, "seq_len": 16,
         "config": dict(num_hidden_layers=4, hidden_size=64, intermediate_size=172, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=512, max_position_embeddings=64)}


def build(spec: dict):
    if "path" in spec:
        return load_model(str(ROOT / spec["path"]), device="cpu")
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**spec["config"])).eval(), None


def remove_until(flops: CostTable, order: list[list[int]], fraction: float) -> KeepMask:
    """Remove groups of flat sublayer indices in ``order`` until the removed FLOPs are closest to ``fraction``."""
    mask = KeepMask.dense(len(flops.per_sublayer) // 2)
    for group in order:
        bigger = mask
        for index in group:
            bigger = bigger.without(index)
        if abs(flops.removed_fraction(bigger) - fraction) >= abs(flops.removed_fraction(mask) - fraction):
            break
        mask = bigger
    return mask


def candidate_masks(flops: CostTable, seed: int = 0) -> dict[str, KeepMask]:
    """Masks of several shapes: 25% of the FLOPs as whole layers / attention / FFN / mixed; mixed 10% and 45%."""
    layers = len(flops.per_sublayer) // 2
    back = list(range(layers - 2, 0, -1))  # deepest first, first and last layer kept
    shuffled = list(range(2, 2 * layers - 2))
    random.Random(seed).shuffle(shuffled)
    return {
        "whole layers 25%": remove_until(flops, [[2 * i, 2 * i + 1] for i in back], 0.25),
        "attention 25%": remove_until(flops, [[2 * i] for i in back], 0.25),
        "ffn 25%": remove_until(flops, [[2 * i + 1] for i in back], 0.25),
        "mixed 25%": remove_until(flops, [[i] for i in shuffled], 0.25),
        "mixed 10%": remove_until(flops, [[i] for i in shuffled], 0.10),
        "mixed 45%": remove_until(flops, [[i] for i in shuffled], 0.45),
    }


def measure(models: dict, settings: LatencySettings) -> dict[str, dict[str, float]]:
    out = {}
    for phase in ("prefill", "decode"):
        runners = {name: phase_runner(model, phase, settings) for name, model in models.items()}
        out[phase] = interleaved_ms(
            runners, warmup=settings.warmup, repeats=settings.repeats, device="cpu", steps=settings.steps(phase)
        )
    return out


def run_model(name: str, spec: dict, args) -> dict:
    if args.smoke:
        spec = spec | {key: value for key, value in SMOKE.items() if key in spec}
    model, tokenizer = build(spec)
    settings = LatencySettings.from_mapping(
        {"batch_size": spec["batch_size"], "seq_len": spec["seq_len"], "context": args.context,
         "warmup": args.warmup, "repeats": args.repeats, "decode_steps": args.decode_steps}
    )
    start = time.time()
    profile = profile_model(model, settings)
    profile_s = time.time() - start
    flops = prefill_flop_costs(model, batch_size=settings.batch_size, seq_len=settings.seq_len)
    masks = candidate_masks(flops)
    with tempfile.TemporaryDirectory() as tmp:
        exports = {"dense": model}
        for label, mask in masks.items():
            path = export_pruned(model, tokenizer, mask, Path(tmp) / label.replace(" ", "_"), source=name)
            exports[label] = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
        measured = measure(exports, settings)
    kv = kv_cache_costs(model)
    rows = []
    for label, mask in {"dense": KeepMask.dense(len(flops.per_sublayer) // 2), **masks}.items():
        row = {"label": label, "mask": str(mask), "flops_removed": flops.removed_fraction(mask),
               "flop_speedup": 1 / (1 - flops.removed_fraction(mask)), "kv_per_token": kv.cost(mask)}
        for phase in ("prefill", "decode"):
            table, got = profile.table(phase), measured[phase][label]
            predicted = table.cost(mask)
            row[phase] = {"predicted": predicted, "measured": got, "error": predicted / got - 1,
                          "predicted_speedup": table.dense / predicted, "speedup": measured[phase]["dense"] / got}
            row[phase]["relative_error"] = row[phase]["speedup"] / row[phase]["predicted_speedup"] - 1
        rows.append(row)
    return {"name": name, "settings": settings, "profile_s": profile_s, "rows": rows, "profile": profile}


def markdown(results: list[dict], command: str, threads: int) -> str:
    lines = ["# Latency model: predicted vs measured, and the speed of exports", "",
             f"Command: `{command}`", "",
             f"CPU, {threads} torch thread(s), float32; medians of side-by-side (round-robin) repeats. "
             "Predicted = dense-model profile (fixed + kept sublayers); measured = the export loaded back with "
             "`from_pretrained`. FLOP speedup = dense prefill FLOPs / export prefill FLOPs.", ""]
    for result in results:
        s = result["settings"]
        lines += [f"## {result['name']}", "",
                  f"prefill {s.batch_size}x{s.seq_len} tokens; decode 1 token on a {s.context}-token KV cache; "
                  f"{s.repeats} repeats after {s.warmup} warm-up; profiling took {result['profile_s']:.0f} s.", "",
                  "| mask | removed FLOPs | prefill ms pred / meas (error) | prefill speedup pred / meas (error) "
                  "| FLOP speedup | meas / FLOP | decode ms pred / meas (error) | decode speedup pred / meas (error) "
                  "| KV B/token |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in result["rows"]:
            p, d = r["prefill"], r["decode"]
            lines.append(
                f"| {r['label']} `{r['mask']}` | {r['flops_removed']:.1%} | {_pair(p, 'predicted', 'measured', 'error')} "
                f"| {_pair(p, 'predicted_speedup', 'speedup', 'relative_error', 'x')} | {r['flop_speedup']:.3f}x "
                f"| {p['speedup'] / r['flop_speedup']:.0%} | {_pair(d, 'predicted', 'measured', 'error')} "
                f"| {_pair(d, 'predicted_speedup', 'speedup', 'relative_error', 'x')} | {r['kv_per_token']:.0f} |")
        lines += ["", *(_summary(result["rows"][1:], phase) for phase in ("prefill", "decode")), ""]
    lines += ["Error = predicted / measured - 1. The ms error includes any drift of the shared machine's load "
              "between profiling and measuring; the speedup error (export vs dense timed side by side) does not. "
              "meas / FLOP = measured prefill speedup / FLOP-proportional speedup.", ""]
    return "\n".join(lines)


def _pair(row: dict, predicted: str, measured: str, error: str, unit: str = "") -> str:
    digits = 3 if unit else 2
    return f"{row[predicted]:.{digits}f}{unit} / {row[measured]:.{digits}f}{unit} ({row[error]:+.1%})"


def _summary(rows: list[dict], phase: str) -> str:
    raw = [abs(r[phase]["error"]) for r in rows]
    rel = [abs(r[phase]["relative_error"]) for r in rows]
    return (f"- {phase}: |error| of exports max {max(raw):.1%}, mean {sum(raw) / len(raw):.1%}; "
            f"speedup |error| max {max(rel):.1%}, mean {sum(rel) / len(rel):.1%}")


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated names from MODELS")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--repeats", type=positive_int, default=9)
    parser.add_argument("--warmup", type=non_negative_int, default=2)
    parser.add_argument("--context", type=positive_int, default=256)
    parser.add_argument("--decode-steps", type=positive_int, default=8, help="decode steps per timed repeat")
    parser.add_argument("--out", type=output_file, default=None, help="write the markdown table here")
    parser.add_argument("--smoke", action="store_true", help="seconds: the sizes of SMOKE, one repeat")
    args = parser.parse_args(argv)
    if args.smoke:
        args = argparse.Namespace(**(vars(args) | {k: v for k, v in SMOKE.items() if k in vars(args)}))
    torch.set_num_threads(args.threads)
    results = [run_model(name, MODELS[name], args) for name in args.models.split(",")]
    command = "python benchmarks/latency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(results, command.strip(), args.threads)
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
