"""How many tokens rank masks the way held-out text does: the rank agreement of a study's candidates as the windows
per domain grow.

    python benchmarks/calibration_tokens.py --study runs/smollm2-135m --json runs/calibration_tokens.json
    python benchmarks/calibration_tokens.py --smoke      # seconds: a tiny study of stories260k

It reads what the study already scored, so it costs no forward pass: per target, the validation candidates (every
strategy's result and the best other masks by calibration objective, see ``search/selection.py``) with their
per-window values on every validation domain, and their held-out perplexity (mean log-perplexity over the study's
held-out sets). For each number of windows per domain, ``--draws`` random subsets of that size give each candidate
a score (the mean over domains of its subset mean); the table shows the Spearman correlation of that ranking with
the held-out ranking within each target (mean over targets and draws, and the standard deviation over draws), and
the tokens it took (windows x window length x domains). Where the correlation stops rising, more tokens buy little.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.cli import Parser, output_file, positive_int, run_cli  # noqa: E402


def candidates(data) -> dict[str, tuple[list[str], torch.Tensor]]:
    """Per target: the candidates scored on validation and held-out text, and their held-out log-perplexities."""
    from search.record import PRIMARY_COLUMN

    columns = [PRIMARY_COLUMN, *data.extra_heldout]
    out = {}
    for key, pool in data.validation.get("pool", {}).items():
        masks = [m for m in pool if m in data.validation["windows"] and
                 all(data.heldout_columns(m)[c] is not None for c in columns)]
        held = [sum(math.log(data.heldout_columns(m)[c]) for c in columns) / len(columns) for m in masks]
        out[key] = (masks, torch.tensor(held))
    return out


def rank_agreement(data, sizes: list[int], draws: int, seed: int = 0) -> pd.DataFrame:
    """Per windows-per-domain size: mean and sd over draws of the mean over targets of the Spearman correlation."""
    generator = torch.Generator().manual_seed(seed)
    groups = {k: v for k, v in candidates(data).items() if len(v[0]) > 2}
    windows = data.validation["windows"]
    rows = []
    for size in sizes:
        values = []
        for _ in range(draws):
            rhos = []
            for masks, held in groups.values():
                domains = list(windows[masks[0]])
                picks = {d: torch.randperm(len(windows[masks[0]][d]), generator=generator)[:size] for d in domains}
                score = [sum(torch.tensor(windows[m][d])[picks[d]].mean().item() for d in domains) / len(domains)
                         for m in masks]
                rhos.append(pd.Series(score).corr(pd.Series(held.tolist()), method="spearman"))
            values.append(float(pd.Series(rhos).mean()))
        values = pd.Series(values)
        rows.append({"windows per domain": size, "mean rho": values.mean(), "sd rho": values.std()})
    return pd.DataFrame(rows)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--study", type=Path, help="a study directory with validation text")
    parser.add_argument("--draws", type=positive_int, default=50, help="random subsets per size")
    parser.add_argument("--json", type=output_file, help="write the table here")
    parser.add_argument("--smoke", action="store_true", help="seconds: a tiny study of stories260k")
    args = parser.parse_args(argv)
    if args.smoke:
        args.draws = 3
    elif args.study is None:
        parser.error("--study is required (or --smoke)")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.smoke and args.study is None:
        from benchmarks.unseen_check import smoke_study

        with tempfile.TemporaryDirectory() as folder:
            args.study = smoke_study(Path(folder))
            return report(args)
    return report(args)


def report(args: argparse.Namespace) -> int:
    from search.studydir.reader import read_study
    from search.config import load_config, validation_sections

    data = read_study(args.study)
    if not data.validation.get("windows"):
        raise SystemExit(f"{args.study}: the study scored no validation text")
    config = load_config(args.study / "config.yaml")
    sections = [section for _, section in validation_sections(config)]
    most = min(section.num_sequences for section in sections)
    sizes = sorted({*(2 ** i for i in range(int(math.log2(most)) + 1)), most})
    table = rank_agreement(data, sizes, args.draws)
    table.insert(1, "tokens", table["windows per domain"] * sections[0].seq_len * len(sections))
    pools = {k: len(v[0]) for k, v in candidates(data).items()}
    print(f"candidates per target {pools}; {len(sections)} validation domains of {sections[0].seq_len}-token windows")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.json:
        args.json.write_text(json.dumps({"table": table.to_dict("records"), "candidates": pools}, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
