"""Training-free linear repair on held-out text: perplexity of the dense, the pruned and the repaired model.

    python benchmarks/repair.py --model studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --mask 25=AM,AM,AM,A-,--,--,... --calibration studies/assets/text/wikitext2_test.raw:0:0.5 \
        --calibration studies/assets/text/tinystories_valid.txt:0:0.8 \
        --text wikitext2_valid=studies/assets/text/wikitext2_valid.tokens \
        --text tinystories_train=studies/assets/text/tinystories_train_head.txt
    python benchmarks/repair.py --smoke      # seconds: stories260k, one mask, a few windows

The maps are fitted (surgery/repair.py) on ``--sequences`` x ``--seq-len`` tokens of each calibration text
(interleaved), then the masked model is scored with and without them on ``--windows`` x ``--seq-len`` tokens of
each held-out text. Prints one markdown table: perplexity per text, the geometric mean, the share of the pruning's
log-perplexity the repair won back, and the fit's wall time.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, positive_int  # noqa: E402

from objectives.calibration import BatchSpec, TextSource, mixed_batch, token_batch  # noqa: E402
from surgery.load import load_model  # noqa: E402
from surgery.masking import masked  # noqa: E402
from surgery.repair import fit_linear_repair, folded  # noqa: E402

TEXT = ROOT / "studies" / "assets" / "text"
SMOKE = {"sequences": 4, "windows": 2, "seq_len": 32}
SMOKE_INPUTS = {"model": str(ROOT / "studies/assets/models/stories260k"), "mask": ["30=AM,-M,A-,--,AM"],
                "calibration": [f"{TEXT / 'tinystories_valid.txt'}:0:0.8"],
                "text": [f"tinystories_valid_tail={TEXT / 'tinystories_valid.txt'}:0.8:1"]}


@torch.no_grad()
def perplexity(model, batch: torch.Tensor) -> float:
    total = 0.0
    for ids in batch.split(4):
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(torch.nn.functional.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten(), reduction="sum"))
    return math.exp(total / batch[:, 1:].numel())


def geomean(values: list[float]) -> float:
    return math.exp(sum(map(math.log, values)) / len(values))


def measure(args: argparse.Namespace) -> list[list[str]]:
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    specs = [BatchSpec(TextSource.parse(c), args.sequences, args.seq_len, seed=0) for c in args.calibration]
    calibration = mixed_batch(specs, tokenizer)
    texts = {name: token_batch(BatchSpec(TextSource.parse(path), args.windows, args.seq_len, seed=1), tokenizer)
             for name, path in (t.split("=", 1) for t in args.text)}
    dense = {name: perplexity(model, ids) for name, ids in texts.items()}
    rows = [["dense", "-", *(f"{v:.2f}" for v in dense.values()), f"{geomean(list(dense.values())):.2f}", "-", "-"]]
    for name, mask in (m.split("=", 1) for m in args.mask):
        start = time.perf_counter()
        repair = fit_linear_repair(model, mask, calibration)
        fit_s = time.perf_counter() - start
        with masked(model, mask):
            pruned = {t: perplexity(model, ids) for t, ids in texts.items()}
            with folded(model, repair):
                repaired = {t: perplexity(model, ids) for t, ids in texts.items()}
        gm = [geomean(list(d.values())) for d in (dense, pruned, repaired)]
        won = (math.log(gm[1]) - math.log(gm[2])) / max(math.log(gm[1]) - math.log(gm[0]), 1e-9)
        for label, values in (("pruned", pruned), ("repaired", repaired)):
            rows.append([label, name, *(f"{v:.2f}" for v in values.values()), f"{geomean(list(values.values())):.2f}",
                         f"{won:.0%}" if label == "repaired" else "-", f"{fit_s:.1f}" if label == "repaired" else "-"])
    return [["model", "mask", *texts, "geometric mean", "log-ppl won back", "fit s"], *rows]


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--mask", action="append", default=[], help="NAME=MASK (repeatable)")
    parser.add_argument("--calibration", action="append", default=[], help="PATH[:START:END] (repeatable)")
    parser.add_argument("--text", action="append", default=[], help="NAME=PATH[:START:END] held-out text (repeatable)")
    parser.add_argument("--sequences", type=positive_int, default=32, help="calibration windows per text (default 32)")
    parser.add_argument("--windows", type=positive_int, default=16, help="held-out windows per text (default 16)")
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and the bundled stories260k")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        for key, value in SMOKE_INPUTS.items():
            vars(args)[key] = vars(args)[key] or value
    missing = [flag for flag in ("model", "mask", "calibration", "text") if not vars(args)[flag]]
    if missing:
        parser.error("missing " + ", ".join("--" + m for m in missing))
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
