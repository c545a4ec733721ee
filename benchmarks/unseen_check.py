"""A study's recommended masks against the seed methods' masks, on text of styles and domains the study never read.

    python benchmarks/unseen_check.py --study runs/smollm2-135m --json runs/unseen_check.json
    python benchmarks/unseen_check.py --smoke      # seconds: a tiny study of stories260k, the sizes of SMOKE

Texts (``--text NAME=PATH`` or ``NAME=PATH.jsonl:FIELD``; default ``TEXTS``): WikiText-2's tokenized validation
split and TinyStories training stories (the calibration's domains, other splits and preprocessing), LAMBADA's
book passages and ARC-Easy's science questions (styles no calibration domain has). Each is tokenized once and cut
into ``--windows`` windows of ``--seq-len`` tokens spread evenly over it. Per target the table gives each mask's
perplexity per text, the geometric mean over texts, and against the seed mask with the best geometric mean: the
ratio of geometric means and the worst per-text ratio. The goal of a recommendation is a ratio <= ``GOAL_MEAN``
with no text worse than ``GOAL_WORST``.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.independent_ppl import windows  # noqa: E402  (the same evenly spread windows)
from surgery.cli import Parser, output_file, positive_int, run_cli  # noqa: E402

ASSETS = ROOT / "studies" / "assets"
TEXTS = [f"wikitext2_valid={ASSETS / 'text/wikitext2_valid.tokens'}",
         f"tinystories_train={ASSETS / 'text/tinystories_train_head.txt'}",
         f"lambada_books={ASSETS / 'benchmarks/lambada_openai.jsonl'}:context",
         f"arc_questions={ASSETS / 'benchmarks/arc_easy.jsonl'}:query"]
GOAL_MEAN, GOAL_WORST = 0.90, 1.05
SMOKE = {"windows": 2, "seq_len": 32}


def read_text(spec: str) -> tuple[str, str]:
    """(name, text) of ``NAME=PATH`` or ``NAME=PATH.jsonl:FIELD``."""
    from objectives.calibration import TextSource, load_text

    name, _, where = spec.partition("=")
    path, field = where.rsplit(":", 1) if ".jsonl:" in where else (where, "text")
    return name, load_text(TextSource(files=(path,), field=field))


@torch.no_grad()
def log_ppl(model, batch: torch.Tensor, size: int = 8) -> float:
    total = 0.0
    for start in range(0, len(batch), size):
        ids = batch[start : start + size]
        logits = model(input_ids=ids, use_cache=False).logits[:, :-1].float()
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="sum"))
    return total / batch[:, 1:].numel()


def study_masks(study: Path) -> pd.DataFrame:
    """(target, label, mask, seed) rows: the recommended mask and every seed method's result per target."""
    from search.studydir.reader import read_study, recommended
    from search.studydir.report import _is_seed

    data = read_study(study)
    rows = [{"target": r.target, "label": f"recommended ({r.strategy})", "mask": r.mask, "seed": False}
            for r in recommended(data).itertuples()]
    if not rows:
        raise SystemExit(f"{study}: no recommended masks (the study has no validation text)")
    for tag, record in data.records.items():
        if _is_seed(data, tag):
            rows += [{"target": float(t), "label": tag, "mask": m, "seed": True}
                     for t, m in record.results.items() if m]
    return pd.DataFrame(rows)


def compare(frame: pd.DataFrame, texts: list[str]) -> pd.DataFrame:
    """Per target: geometric means and, against the best seed mask by geometric mean, the ratios."""
    frame = frame.copy()
    frame["geomean"] = [math.exp(sum(math.log(row[t]) for t in texts) / len(texts)) for _, row in frame.iterrows()]
    out = []
    for _, group in frame.groupby("target", sort=True):
        seed = group[group["seed"]].sort_values("geomean").iloc[0]
        group = group.assign(best_seed=seed["label"], ratio=group["geomean"] / seed["geomean"],
                             worst_text_ratio=[max(row[t] / seed[t] for t in texts) for _, row in group.iterrows()])
        out.append(group)
    return pd.concat(out, ignore_index=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, help="a study directory with recommended masks (recommended.csv)")
    parser.add_argument("--text", action="append", help="NAME=PATH or NAME=PATH.jsonl:FIELD (default: TEXTS)")
    parser.add_argument("--windows", type=positive_int, default=32)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--json", type=output_file, help="write the table here")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny study of stories260k")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    elif args.study is None:
        parser.error("--study is required (or --smoke)")
    args.text = args.text or TEXTS
    return args


def smoke_study(folder: Path) -> Path:
    """A seconds-long stories260k study (two seed methods) with two validation domains."""
    import yaml

    from search.study import main as study_main

    text, wiki = ASSETS / "text/tinystories_valid.txt", ASSETS / "text/wikitext2_test.raw"
    part = {"num_sequences": 2, "seq_len": 32}
    config = {"model": {"name": str(ASSETS / "models/stories260k"), "device": "cpu", "threads": 1},
              "calibration": {"files": [str(text)], "end": 0.6, **part},
              "validation": {"stories": {"files": [str(text)], "start": 0.6, "end": 0.8, **part},
                             "wiki": {"files": [str(wiki)], "end": 0.1, **part}},
              "heldout": {"files": [str(text)], "start": 0.8, **part},
              "budget": {"targets": [0.3]}, "strategies": [{"name": "shortgpt"}, {"name": "sleb"}],
              "selection": {"candidates": 2}, "output_dir": str(folder / "study")}
    (folder / "s.yaml").write_text(yaml.safe_dump(config))
    if study_main(["run", str(folder / "s.yaml"), "--no-progress"]) != 0:
        raise SystemExit("the smoke study failed")
    return folder / "study"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke and args.study is None:
        with tempfile.TemporaryDirectory() as folder:
            args.study = smoke_study(Path(folder))
            return check(args)
    return check(args)


def check(args: argparse.Namespace) -> int:
    from search.config import load_config, model_source
    from surgery.cli import load_checked
    from surgery.mask import KeepMask
    from surgery.masking import masker_for

    config = load_config(args.study / "config.yaml")
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    model, tokenizer = load_checked(model_source(config)[0], dtype=config.model.dtype, device="cpu")
    masker, frame = masker_for(model), study_masks(args.study)
    texts = dict(read_text(spec) for spec in args.text)
    batches = {name: windows(text, tokenizer, args.windows, args.seq_len) for name, text in texts.items()}
    scores = {}
    for mask in frame["mask"].unique():
        masker.apply(KeepMask.parse(mask))
        scores[mask] = {name: math.exp(log_ppl(model, batch)) for name, batch in batches.items()}
    masker.restore()
    table = compare(pd.concat([frame, pd.DataFrame([scores[m] for m in frame["mask"]])], axis=1), list(batches))
    shown = table.drop(columns=["mask", "seed"])
    print(f"{len(batches)} texts x {args.windows} windows x {args.seq_len} tokens; goal: ratio <= {GOAL_MEAN}, "
          f"worst text ratio <= {GOAL_WORST}")
    print(shown.to_markdown(index=False, floatfmt=".4g"))
    if args.json:
        args.json.write_text(json.dumps(table.to_dict("records"), indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
