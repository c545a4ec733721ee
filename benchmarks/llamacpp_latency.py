"""A latency model of llama.cpp: fitted on a few pruned GGUF files, checked on the study's exported masks.

    python benchmarks/llamacpp_latency.py --profile-out runs/smollm2-llamacpp-latency.json --out benchmarks/RESULTS-llamacpp-latency.md
    python benchmarks/llamacpp_latency.py --smoke          # stories260k, one repeat, seconds

1. Calibration: the dense GGUF file and three pruned copies (every second layer's attention, FFN, or whole layer
   removed; written by ``surgery.gguf_export.copy_from_gguf``, tensors copied) are timed in llama.cpp side by side
   (``objectives.llamacpp.speeds``); least squares gives fixed, attention and FFN milliseconds per phase
   (``objectives.llamacpp.llamacpp_profile``).
2. Check: the masks of ``benchmarks/gguf_engine.py`` are exported the same way and timed beside the dense file in a
   second run; predicted (fixed + kept sublayers) against measured milliseconds, and predicted against measured
   speedup over dense.
With ``--profile-out`` the fitted model is saved as a latency profile: a study whose config sets
``latency.profile`` to that file (with ``latency.seq_len`` / ``latency.context`` as given here, batch sizes 1,
the same ``model.name`` and ``model.dtype`` and ``model.threads`` = ``--threads``) budgets ``latency_prefill_ms`` /
``latency_decode_ms`` as llama.cpp time on this machine.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, output_file, positive_int  # noqa: E402

from benchmarks.gguf_engine import MASKS, SMOKE_MASKS, SMOLLM2, smoke_source  # noqa: E402
from objectives.llamacpp import require_for_script, SpeedSettings, calibration_masks, llamacpp_profile, speeds  # noqa: E402
from surgery.files import atomic_write_text  # noqa: E402
from surgery.gguf_export import copy_from_gguf  # noqa: E402
from surgery.mask import KeepMask  # noqa: E402


def block_count(path: Path) -> int:
    from gguf import GGUFReader

    return int(GGUFReader(path).get_field("llama.block_count").contents())


def files_for(source: Path, masks: dict[str, str], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    files = {}
    for name, mask in masks.items():
        if name == "dense":
            files[name] = source
            continue
        files[name] = folder / f"{name.replace('/', '-').replace('%', 'pct').replace(' ', '_')}.gguf"
        copy_from_gguf(source, KeepMask.parse(mask), files[name])
    return files


def signature(args) -> tuple[dict, str]:
    import torch

    from objectives.latency import device_name, model_signature
    from surgery.load import load_model

    torch.set_num_threads(args.threads)
    model, _ = load_model(args.model, dtype=args.dtype, device="cpu")
    return model_signature(model), device_name(torch.device("cpu"))


def run(args, tmp: Path) -> dict:
    source = smoke_source(tmp) if args.smoke else Path(args.model)
    if args.smoke:
        args.model = str(source)
    layers = block_count(source)
    settings = SpeedSettings(seq_len=args.seq_len, context=args.context, steps=args.steps, repeats=args.repeats,
                             threads=args.threads)
    calibration = calibration_masks(layers)
    fitted = speeds(files_for(source, calibration, tmp / "calibration"), settings)
    sig, device = signature(args) if args.profile_out else ({"name": str(source)}, "llama.cpp cpu")
    profile = llamacpp_profile(fitted, calibration, signature=sig, device=device, settings=settings)
    checks = {"dense": calibration["dense"], **(SMOKE_MASKS if args.smoke else MASKS)}
    measured = speeds(files_for(source, checks, tmp / "check"), settings)
    rows = []
    for name, mask in checks.items():
        row = {"name": name, "mask": mask}
        for phase in ("prefill", "decode"):
            table = profile.table(phase)
            predicted, got = table.cost(KeepMask.parse(mask)), measured[name][f"{phase}_ms"]
            speedup = measured["dense"][f"{phase}_ms"] / got
            row[phase] = (predicted, got, predicted / got - 1, table.dense / predicted, speedup)
        rows.append(row)
    if args.profile_out:
        profile.save(args.profile_out)
    return {"profile": profile, "rows": rows, "fitted": fitted, "settings": settings}


def markdown(result: dict, command: str) -> str:
    s, profile = result["settings"], result["profile"]
    lines = ["# A latency model of llama.cpp", "", f"Command: `{command}`", "",
             f"Prefill {s.seq_len} tokens; decode {s.steps} tokens after {s.context}; {s.threads} threads; "
             f"{s.repeats} interleaved repeats (medians).", "", "| phase | fixed ms | attention ms | FFN ms |",
             "|---|---|---|---|"]
    for phase in ("prefill", "decode"):
        p = profile.phases[phase]
        lines.append(f"| {phase} | {p.fixed_ms:.3f} | {p.per_sublayer_ms[0]:.4f} | {p.per_sublayer_ms[1]:.4f} |")
    lines += ["", "| mask | prefill ms pred / meas (error) | prefill speedup pred / meas | decode ms pred / meas "
              "(error) | decode speedup pred / meas |", "|---|---|---|---|---|"]
    for r in result["rows"]:
        cells = []
        for phase in ("prefill", "decode"):
            pred, got, err, psx, msx = r[phase]
            cells += [f"{pred:.2f} / {got:.2f} ({err:+.1%})", f"{psx:.3f}x / {msx:.3f}x"]
        lines.append(f"| {r['name']} | " + " | ".join(cells) + " |")
    lines += ["", "Error = predicted / measured - 1, the check run timed separately from the calibration run.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(SMOLLM2), help="the dense .gguf file")
    parser.add_argument("--dtype", default="bfloat16", help="the study's model.dtype (for the profile's signature)")
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--context", type=positive_int, default=256)
    parser.add_argument("--steps", type=positive_int, default=32)
    parser.add_argument("--repeats", type=positive_int, default=7)
    parser.add_argument("--threads", type=positive_int, default=2)
    parser.add_argument("--profile-out", type=output_file, default=None, help="save the fitted latency profile (JSON) here")
    parser.add_argument("--smoke", action="store_true", help="stories260k, one repeat: checks the script in seconds")
    parser.add_argument("--out", type=output_file, default=None, help="also write the markdown table here")
    args = parser.parse_args(argv)
    require_for_script(args.smoke)
    if args.smoke:
        args.seq_len, args.context, args.steps, args.repeats = 32, 32, 4, 1
    with tempfile.TemporaryDirectory() as tmp:
        result = run(args, Path(tmp))
    command = "python benchmarks/llamacpp_latency.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    text = markdown(result, command.strip())
    print(text)
    if args.out:
        atomic_write_text(args.out, text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
