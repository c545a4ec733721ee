"""Training-free linear repair on held-out text: perplexity of the dense, the pruned and the repaired model.

    python benchmarks/repair.py --model studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --mask 25=AM,AM,AM,A-,--,--,... --calibration studies/assets/text/wikitext2_test.raw:0:0.5 \
        --calibration studies/assets/text/tinystories_valid.txt:0:0.8 \
        --text wikitext2_valid=studies/assets/text/wikitext2_valid.tokens \
        --text tinystories_train=studies/assets/text/tinystories_train_head.txt
    python benchmarks/repair.py --config studies/smollm2-135m.yaml \
        --masks studies/results/smollm2-135m/recommended.csv \
        --sequences 16 --windows 8 --ridge 1e-3 --ridge 1e-2 --ridge 0.1 --ridge 1
    python benchmarks/repair.py --smoke      # seconds: stories260k, one mask, a few windows

The maps are fitted (surgery/repair.py) on ``--sequences`` x ``--seq-len`` tokens of each calibration text
(interleaved), then the masked model is scored with and without them on ``--windows`` x ``--seq-len`` tokens of
each held-out text, once per ``--ridge`` (each map's pull towards the identity; default the repair's own). Prints
one markdown table: perplexity per text, the geometric mean, the share of the pruning's log-perplexity the repair
won back, and the fit's wall time (the dense model's streams are computed once and shared by every fit).
``--config`` takes a study's model, fits on ``--sequences`` windows of each of its calibration parts and scores
on ``--windows`` windows of each of its validation parts (text chosen to pick settings, not to report results);
``--masks`` reads ``target,mask`` rows (a study's ``recommended.csv``).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, positive_float, positive_int  # noqa: E402

from objectives.calibration import BatchSpec, TextSource, mixed_batch, token_batch  # noqa: E402
from surgery.load import load_model  # noqa: E402
from surgery.masking import masked  # noqa: E402
from surgery.formats import DEFAULT_RIDGE  # noqa: E402
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


def study_texts(args: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The calibration batch and the scored texts of ``--config``: its calibration and validation parts."""
    from search.config import calibration_sections, text_source, validation_sections

    config = args.study
    fit = [replace(text_source(config, section), num_sequences=args.sequences)
           for _, section in calibration_sections(config)]
    texts = {key.removeprefix("validation."): token_batch(replace(text_source(config, section),
                                                                  num_sequences=args.windows), tokenizer)
             for key, section in validation_sections(config)}
    return mixed_batch(fit, tokenizer), texts


def plain_texts(args: argparse.Namespace, tokenizer) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The calibration batch of ``--calibration`` and the held-out texts of ``--text``."""
    specs = [BatchSpec(TextSource.parse(c), args.sequences, args.seq_len, seed=0) for c in args.calibration]
    texts = {name: token_batch(BatchSpec(TextSource.parse(path), args.windows, args.seq_len, seed=1), tokenizer)
             for name, path in (t.split("=", 1) for t in args.text)}
    return mixed_batch(specs, tokenizer), texts


def measure(args: argparse.Namespace) -> list[list[str]]:
    model, tokenizer = load_model(args.model, dtype=args.dtype, device="cpu")
    calibration, texts = (study_texts if args.config else plain_texts)(args, tokenizer)
    dense = {name: perplexity(model, ids) for name, ids in texts.items()}
    rows = [["dense", "-", *row(dense), "-", "-"]]
    ridges = args.ridge or [DEFAULT_RIDGE]
    streams: dict = {}  # the dense model's streams on the calibration batch, shared by every fit
    for name, mask in (m.split("=", 1) for m in args.mask):
        with masked(model, mask):
            pruned = {t: perplexity(model, ids) for t, ids in texts.items()}
        rows.append(["pruned", name, *row(pruned), "-", "-"])
        for ridge in ridges:
            start = time.perf_counter()
            repair = fit_linear_repair(model, mask, calibration, ridge=ridge, dense_streams=streams)
            fit_s = time.perf_counter() - start
            with masked(model, mask), folded(model, repair):
                repaired = {t: perplexity(model, ids) for t, ids in texts.items()}
            gm = [geomean(list(d.values())) for d in (dense, pruned, repaired)]
            won = (math.log(gm[1]) - math.log(gm[2])) / max(math.log(gm[1]) - math.log(gm[0]), 1e-9)
            label = "repaired" if len(ridges) == 1 else f"repaired (ridge {ridge:g})"
            rows.append([label, name, *row(repaired), f"{won:.0%}", f"{fit_s:.1f}"])
    return [["model", "mask", *texts, "geometric mean", "log-ppl won back", "fit s"], *rows]


def row(values: dict[str, float]) -> list[str]:
    """Perplexity per text, then their geometric mean."""
    return [*(f"{v:.2f}" for v in values.values()), f"{geomean(list(values.values())):.2f}"]


def table(rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
    return "\n".join(lines + ["| " + " | ".join(r) + " |" for r in rows[1:]])


def study_inputs(args: argparse.Namespace, parser: Parser) -> None:
    """``--config``: the loaded study config (``args.study``), its model (unless ``--model``) and dtype."""
    from search.config import ConfigError, load_config, model_source

    try:
        config = load_config(args.config)
    except ConfigError as error:
        parser.error(str(error))
    if not config.validation:
        parser.error(f"--config {args.config}: the study has no validation text to score the repairs on")
    args.study, args.model, args.dtype = config, args.model or model_source(config)[0], config.model.dtype


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--config", help="a study config: its model, calibration and validation texts")
    parser.add_argument("--mask", action="append", default=[], help="NAME=MASK (repeatable)")
    parser.add_argument("--masks", help="CSV with target and mask columns (a study's recommended.csv)")
    parser.add_argument("--calibration", action="append", default=[], help="PATH[:START:END] (repeatable)")
    parser.add_argument("--text", action="append", default=[], help="NAME=PATH[:START:END] held-out text (repeatable)")
    parser.add_argument("--sequences", type=positive_int, default=32, help="calibration windows per text (default 32)")
    parser.add_argument("--windows", type=positive_int, default=16, help="held-out windows per text (default 16)")
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--ridge", type=positive_float, action="append", metavar="R",
                        help=f"fit once per value (repeatable; default {DEFAULT_RIDGE:g})")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes and the bundled stories260k")
    args = parser.parse_args(argv)
    if args.smoke:  # tiny sizes; with --config its model and texts stay (only the window counts shrink)
        vars(args).update(SMOKE)
        for key, value in SMOKE_INPUTS.items() if not args.config else ():
            vars(args)[key] = vars(args)[key] or value
    if args.config:
        study_inputs(args, parser)
    if args.masks:
        args.mask += [f"{row['target']}={row['mask']}" for row in csv.DictReader(open(args.masks, encoding="utf-8"))]
    needed = ("model", "mask") if args.config else ("model", "mask", "calibration", "text")  # --config: its texts
    missing = [flag for flag in needed if not vars(args)[flag]]
    if missing:
        parser.error("missing " + ", ".join("--" + m for m in missing))
    print(table(measure(args)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
