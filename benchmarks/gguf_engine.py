"""Pruned GGUF files in llama.cpp: perplexity against the project's masked model, and speed against the dense file.

    python benchmarks/gguf_engine.py --out benchmarks/RESULTS-gguf.md
    python benchmarks/gguf_engine.py --smoke        # stories260k, one repeat, seconds

For each mask (default: the SmolLM2 study's best masks at 12.5%, 25% and 37.5% of parameters removed) the model
is exported with ``--format gguf`` from its ``.gguf`` file (kept tensors copied in their quantization). Then:
1. perplexity on ``--windows`` x ``--seq-len`` tokens of ``--text`` (default: WikiText-2 validation, which no
   shipped study reads): llama.cpp on the pruned file against the masked model in transformers (the same file
   dequantized to float32), and the dense file against the dense model, side by side;
2. speed: prefill (``--prefill`` tokens) and decode (``--steps`` tokens after ``--context``) of the dense and every
   pruned file in one round-robin of ``--repeats`` repeats, medians, ratios to dense, and the ideal ratio (dense
   matrix work / pruned matrix work: decode counts the LM head on every token, prefill only the blocks).
With ``--f16`` the dense model and the first mask are also written in f16 from the dequantized model (tokenizer
copied from the file): their gap shows the pruned graph without llama.cpp's quantized arithmetic.
Needs llama-cpp-python (``pip install 'depthsearch[llamacpp]'``).
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, output_file, positive_int  # noqa: E402

from objectives.llamacpp import require_for_script, SpeedSettings, ideal_speedups, matmul_work, perplexity, speeds  # noqa: E402
from surgery.export import ExportOptions, export_pruned  # noqa: E402
from surgery.files import atomic_write_text  # noqa: E402
from surgery.gguf_export import FILE_NAME  # noqa: E402
from surgery.load import load_model  # noqa: E402
from surgery.mask import KeepMask  # noqa: E402
from surgery.masking import masked  # noqa: E402

SMOLLM2 = ROOT / "studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ROOT / "studies/assets/text/wikitext2_valid.tokens"
MASKS = {  # the best masks of studies/smollm2-135m.yaml (studies/results/smollm2-135m-two-domains/summary.md)
    "12.5%": "AM,AM,AM,AM,AM,--,A-,-M,AM,AM,AM,AM,AM,AM,AM,AM,A-,--,--,AM,AM,AM,AM,AM,AM,AM,AM,AM,AM,AM",
    "25%": "AM,AM,AM,A-,--,--,A-,-M,AM,AM,AM,AM,AM,A-,--,--,--,--,-M,AM,AM,AM,AM,AM,AM,AM,A-,AM,AM,AM",
    "37.5%": "AM,AM,AM,A-,--,A-,--,--,-M,AM,AM,AM,-M,--,--,--,--,--,--,AM,AM,AM,AM,AM,A-,A-,--,A-,AM,AM",
}
SMOKE_MASKS = {"mixed": "AM,A-,-M,AM,--", "whole layers": "AM,--,AM,AM,AM"}


def torch_perplexity(model, mask: str, windows: list[list[int]]) -> float:
    """The masked model's perplexity over the same predictions :func:`objectives.llamacpp.perplexity` counts."""
    total, count = 0.0, 0
    with torch.inference_mode(), masked(model, KeepMask.parse(mask)):
        for window in windows:
            ids = torch.tensor([window])
            logp = torch.log_softmax(model(ids).logits[0, :-1].double(), dim=-1)
            total -= float(logp.gather(1, ids[0, 1:, None]).sum())
            count += len(window) - 1
    return math.exp(total / count)


def token_windows(tokenizer, text: Path, count: int, size: int) -> list[list[int]]:
    """``count`` consecutive windows of ``size`` tokens from the start of ``text``."""
    ids = tokenizer(text.read_text(encoding="utf-8")[: count * size * 8])["input_ids"]
    if len(ids) < count * size:
        raise SystemExit(f"{text}: {len(ids)} tokens, fewer than {count} x {size}")
    return [ids[i * size : (i + 1) * size] for i in range(count)]


def smoke_source(tmp: Path) -> Path:
    """stories260k as a dense f16 GGUF file (the smoke run's quantized source)."""
    model, tokenizer = load_model(str(ROOT / "studies/assets/models/stories260k"), device="cpu")
    layers = model.config.num_hidden_layers
    out = export_pruned(model, tokenizer, KeepMask.dense(layers), tmp / "dense", options=ExportOptions("gguf"))
    return out / FILE_NAME


def run(args, tmp: Path) -> dict:
    source = smoke_source(tmp) if args.smoke else Path(args.model)
    masks = dict(SMOKE_MASKS if args.smoke else MASKS)
    model, tokenizer = load_model(str(source), dtype="float32", device="cpu")
    dense = ",".join(["AM"] * model.config.num_hidden_layers)
    plan = {"dense": (dense, None), **{label: (mask, None) for label, mask in masks.items()}}
    if args.f16:  # the same masks written in f16 from the dequantized model: the pruned graph without quantization
        first = next(iter(masks))
        plan.update({"dense f16": (dense, "f16"), f"{first} f16": (masks[first], "f16")})
    files, start = {"dense": source}, time.time()
    for label, (mask, outtype) in plan.items():
        if label != "dense":
            folder = tmp / label.replace("%", "pct").replace(" ", "_")
            options = ExportOptions("gguf", outtype, source)
            files[label] = export_pruned(model, tokenizer, mask, folder, options=options) / FILE_NAME
    export_s = (time.time() - start) / (len(plan) - 1)
    windows = token_windows(tokenizer, Path(args.text), args.windows, args.seq_len)
    rows = {}
    for label, path in files.items():
        mask = plan[label][0]
        rows[label] = {"mask": mask, "llamacpp_ppl": perplexity(path, windows, threads=args.threads),
                       "torch_ppl": torch_perplexity(model, mask, windows), "work": matmul_work(path),
                       "bytes": path.stat().st_size}
    settings = SpeedSettings(seq_len=args.prefill, context=args.context, steps=args.steps, repeats=args.repeats,
                             threads=args.threads)
    timed = speeds(files, settings)
    for label, row in rows.items():
        base = rows["dense f16" if label.endswith("f16") else "dense"]
        row.update(timed[label])
        row["ideal"] = ideal_speedups(base["work"], row["work"])
    return {"rows": rows, "settings": settings, "export_s": export_s, "source": source}


def markdown(result: dict, args, command: str) -> str:
    rows, s = result["rows"], result["settings"]
    dense = rows["dense"]
    dense_gap = dense["llamacpp_ppl"] / dense["torch_ppl"] - 1
    lines = [
        "# Pruned GGUF files in llama.cpp", "", f"Command: `{command}`", "",
        f"Source `{result['source'].name}`; perplexity on {args.windows} x {args.seq_len} tokens of "
        f"`{Path(args.text).name}`; speed: prefill {s.seq_len} tokens, decode {s.steps} tokens after {s.context}, "
        f"{s.threads} threads, {s.repeats} interleaved repeats (medians). Export took {result['export_s']:.1f} s "
        "per mask.", "",
        "| model | mask | file MB | ppl llama.cpp | ppl masked model (transformers) | gap | prefill tok/s | "
        "decode tok/s | prefill x | decode x | ideal prefill x | ideal decode x | prefill / ideal | decode / ideal |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for label, r in rows.items():
        base = rows["dense f16" if label.endswith("f16") else "dense"]
        gap = r["llamacpp_ppl"] / r["torch_ppl"] - 1
        px, dx = base["prefill_ms"] / r["prefill_ms"], base["decode_ms"] / r["decode_ms"]
        ip, idd = r["ideal"]["prefill"], r["ideal"]["decode"]
        lines.append(f"| {label} | `{r['mask']}` | {r['bytes'] / 2**20:.1f} | {r['llamacpp_ppl']:.2f} | "
                     f"{r['torch_ppl']:.2f} | {gap:+.2%} | {r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | "
                     f"{px:.3f} | {dx:.3f} | {ip:.3f} | {idd:.3f} | {px / ip:.0%} | {dx / idd:.0%} |")
    lines += ["", f"Gap = llama.cpp perplexity / transformers perplexity - 1; the dense file's own gap "
              f"(quantized kernels against the dequantized float32 model) is {dense_gap:+.2%}. Speed ratios are to the dense "
              "file of the same type (the f16 rows: to `dense f16`).", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2), help="the dense .gguf file")
    parser.add_argument("--text", default=str(TEXT))
    parser.add_argument("--windows", type=positive_int, default=4)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--prefill", type=positive_int, default=128)
    parser.add_argument("--context", type=positive_int, default=128)
    parser.add_argument("--steps", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--f16", action="store_true",
                        help="also write the dense model and the first mask in f16 (from the dequantized model)")
    parser.add_argument("--smoke", action="store_true", help="stories260k, one repeat: checks the script in seconds")
    parser.add_argument("--out", type=output_file, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    require_for_script(args.smoke)
    if args.smoke:
        args.text = str(ROOT / "studies/assets/text/tinystories_valid.txt")
        args.windows, args.seq_len, args.prefill, args.context, args.steps, args.repeats = 2, 64, 32, 32, 4, 1
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    command = "python benchmarks/gguf_engine.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(result, args, command.strip())
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
