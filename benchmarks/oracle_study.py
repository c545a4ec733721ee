"""How far can mask search go at all? A study that searches on the evaluation text itself (an upper bound).

    python benchmarks/oracle_study.py --text studies/assets/text/wikitext2_valid.tokens --out runs/oracle-wiki [--targets 0.125]

Takes a shipped study (default ``studies/smollm2-135m.yaml``: its model, dtype, held-out text, budget and engine),
replaces its calibration text by ``--text`` (one or more files, ``--sequences`` windows of ``--seq-len`` tokens
each) and its objective by perplexity, keeps only ``--targets``, and runs SLEB, greedy_per_cost and evolutionary
search from the best mask found. Pointed at the text an independent check scores, the result bounds what any of
these searches could reach there: a goal it misses is out of their reach at that budget. The config is written
beside the study directory (``<out>.yaml``) and run with ``python -m search.study run``; a re-run resumes. Prints
each strategy's mask and perplexity per target as a markdown table.

    python benchmarks/oracle_study.py --smoke     # seconds: stories260k, the sizes of SMOKE, a temporary --out
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, fraction, output_dir, positive_int, run_cli  # noqa: E402
STRATEGIES = [
    {"name": "sleb"},
    {"name": "greedy_per_cost", "settings": {"stage_sequences": 2, "stage_keep": 2}},
    {"name": "evolutionary", "settings": {"init": "study", "generations": 30, "offspring": 12, "survivors": 2,
                                          "stage_sequences": 4, "max_swaps": 2, "seed": 0}},
]

# --smoke: these sizes replace the given ones; SMOKE_INPUTS stand in for --study / --text when they are not given,
# and --out defaults to a temporary directory
SMOKE = {"sequences": 2, "seq_len": 32, "generations": 2}
SMOKE_INPUTS = {"study": ROOT / "studies" / "stories260k.yaml",
                "text": [ROOT / "studies" / "assets" / "text" / "tinystories_train_head.txt"]}


def oracle_config(study: Path, texts: list[Path], out: Path, *, targets: list[float], sequences: int,
                  seq_len: int, threads: int | None, generations: int = 30) -> dict:
    """The study's config (its local paths made absolute) with calibration on ``texts`` (the first as
    ``calibration``, the rest as ``extra_calibration``), objective ppl, only ``targets``, the oracle strategies
    and ``out``."""
    from search.commands.run.plan import portable_config
    from search.config import load_config

    config = portable_config(load_config(study))
    if threads:
        config["model"]["threads"] = threads
    parts = [{"files": [str(t.resolve())], "num_sequences": sequences, "seq_len": seq_len, "seed": 0} for t in texts]
    config["calibration"] = parts[0]
    config["extra_calibration"] = {f"part{i}": part for i, part in enumerate(parts[1:], start=1)}
    config["objective"] = "ppl"
    config["budget"]["targets"] = targets
    config["strategies"] = [entry | {"settings": entry["settings"] | {"generations": generations}}
                            if entry["name"] == "evolutionary" else entry for entry in STRATEGIES]
    config["confirm"] = {}
    config["output_dir"] = str(out.resolve())
    return config


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=None, help="default: studies/smollm2-135m.yaml")
    parser.add_argument("--text", type=Path, action="append", help="evaluation text (repeatable)")
    parser.add_argument("--out", type=output_dir, help="study directory to write (its config: the same path + .yaml)")
    parser.add_argument("--targets", type=fraction, nargs="+", default=[0.125])
    parser.add_argument("--sequences", type=positive_int, default=16, help="windows per text")
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--generations", type=positive_int, default=30, help="evolutionary search's generations")
    parser.add_argument("--threads", type=positive_int, default=None, help="torch threads (default: the study's)")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k and the sizes of SMOKE")
    args = parser.parse_args(argv)
    if args.smoke:
        given = vars(args)
        args = argparse.Namespace(**(given | {k: v for k, v in SMOKE_INPUTS.items() if not given[k]} | SMOKE))
    args.study = args.study or ROOT / "studies" / "smollm2-135m.yaml"
    for flag in ("text",) + (() if args.smoke else ("out",)):
        if not getattr(args, flag):
            parser.error(f"--{flag} is required")
    return args


def results_table(out: Path) -> list[str]:
    """Each strategy's result mask per target, with its objective (perplexity on the text)."""
    from search.studydir.reader import read_study

    data = read_study(out)
    objective = data.trials.groupby("mask")["objective"].min()
    lines = ["| strategy | target | mask | perplexity |", "|---|---|---|---|"]
    for tag, record in data.records.items():
        for target, mask in sorted(record.results.items()):
            lines.append(f"| {tag} | {target} | `{mask}` | {objective[mask]:.4g} |" if mask else
                         f"| {tag} | {target} | none | - |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.out is None:  # --smoke without --out: a temporary study
        with tempfile.TemporaryDirectory() as tmp:
            return run_cli(lambda: run(args, Path(tmp) / "oracle"))
    return run_cli(lambda: run(args, args.out))


def run(args: argparse.Namespace, out: Path) -> int:
    """Write the oracle config beside ``out``, run the study, print its results."""
    from surgery.errors import UserError

    missing = [str(p) for p in [args.study, *args.text] if not p.is_file()]
    if missing:
        raise UserError(f"not a file: {', '.join(missing)}")
    config = oracle_config(args.study, args.text, out, targets=args.targets, sequences=args.sequences,
                           seq_len=args.seq_len, threads=args.threads, generations=args.generations)
    path = out.with_name(out.name + ".yaml")
    if path.is_dir():
        raise UserError(f"--out {out}: its config path {path} is a folder; choose another --out")
    if path.exists() and yaml.safe_load(path.read_text(encoding="utf-8")) != config:
        raise UserError(f"{path} exists with other settings; remove it or choose another --out")
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    code = subprocess.call([sys.executable, "-m", "search.study", "run", str(path.resolve()), "--no-progress"], cwd=ROOT)
    if code == 2 and created:
        path.unlink()  # a config the study refused (its message says why) is not left behind
    if code == 0:
        print("\n".join(results_table(out)), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
