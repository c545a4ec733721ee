"""How far can mask search go at all? A study that searches on the evaluation text itself (an upper bound).

    python benchmarks/oracle_study.py --text studies/assets/text/wikitext2_valid.tokens --out runs/oracle-wiki [--targets 0.125]

Takes a shipped study (default ``studies/smollm2-135m.yaml``: its model, dtype, held-out text, budget and engine),
replaces its calibration text by ``--text`` (one or more files, ``--sequences`` windows of ``--seq-len`` tokens
each) and its objective by perplexity, keeps only ``--targets``, and runs SLEB, greedy_per_cost and evolutionary
search from the best mask found. Pointed at the text an independent check scores, the result bounds what any of
these searches could reach there: a goal it misses is out of their reach at that budget. The config is written
beside the study directory (``<out>.yaml``) and run with ``python -m search.study run``; a re-run resumes.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
STRATEGIES = [
    {"name": "sleb"},
    {"name": "greedy_per_cost", "settings": {"stage_sequences": 2, "stage_keep": 2}},
    {"name": "evolutionary", "settings": {"init": "study", "generations": 30, "offspring": 12, "survivors": 2,
                                          "stage_sequences": 4, "max_swaps": 2, "seed": 0}},
]


def oracle_config(study: Path, texts: list[Path], out: Path, *, targets: list[float], sequences: int,
                  seq_len: int, threads: int | None) -> dict:
    """The study's config (its local paths made absolute) with calibration on ``texts`` (the first as
    ``calibration``, the rest as ``extra_calibration``), objective ppl, only ``targets``, the oracle strategies
    and ``out``."""
    from search.commands.run import portable_config
    from search.config import load_config

    config = portable_config(load_config(study))
    if threads:
        config["model"]["threads"] = threads
    parts = [{"files": [str(t.resolve())], "num_sequences": sequences, "seq_len": seq_len, "seed": 0} for t in texts]
    config["calibration"] = parts[0]
    config["extra_calibration"] = {f"part{i}": part for i, part in enumerate(parts[1:], start=1)}
    config["objective"] = "ppl"
    config["budget"]["targets"] = targets
    config["strategies"] = STRATEGIES
    config["confirm"] = {}
    config["output_dir"] = str(out.resolve())
    return config


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--study", type=Path, default=ROOT / "studies" / "smollm2-135m.yaml")
    parser.add_argument("--text", type=Path, action="append", required=True, help="evaluation text (repeatable)")
    parser.add_argument("--out", type=Path, required=True, help="study directory to write")
    parser.add_argument("--targets", type=float, nargs="+", default=[0.125])
    parser.add_argument("--sequences", type=int, default=16, help="windows per text")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the study's)")
    args = parser.parse_args(argv)
    missing = [str(p) for p in [args.study, *args.text] if not p.is_file()]
    if missing:
        print(f"error: not a file: {', '.join(missing)}", file=sys.stderr)
        return 2
    from surgery.errors import UserError

    try:
        config = oracle_config(args.study, args.text, args.out, targets=args.targets, sequences=args.sequences,
                               seq_len=args.seq_len, threads=args.threads)
    except UserError as error:  # the study's own config is invalid: its message names the problem
        print(f"error: {error}", file=sys.stderr)
        return 2
    path = args.out.with_suffix(".yaml")
    if path.exists() and yaml.safe_load(path.read_text(encoding="utf-8")) != config:
        print(f"error: {path} exists with other settings; remove it or choose another --out", file=sys.stderr)
        return 2
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    code = subprocess.call([sys.executable, "-m", "search.study", "run", str(path), "--no-progress"], cwd=ROOT)
    if code == 2 and created:
        path.unlink()  # a config the study refused (its message says why) is not left behind
    return code


if __name__ == "__main__":
    sys.exit(main())
