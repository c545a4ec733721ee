"""Would more calibration text have picked other masks? Each strategy's result of a study, re-scored on more tokens.

    python benchmarks/calibration_kl.py runs/smollm2-135m --sequences 128 --seed 7 [--targets 0.25 0.375]

Reads the study's config copy and its strategy results, loads the model as the study did (dtype, threads), draws
``--sequences`` windows of the study's ``calibration.seq_len`` tokens from the same calibration text (split between
its parts as the study's are) with another ``--seed``, and scores every distinct result mask with the study's
objective on them. Prints one markdown table per target: the strategies that found each mask, the study's
calibration value, the value on the larger sample, and the study's held-out perplexities, so the rankings can be
compared side by side.

    python benchmarks/calibration_kl.py --smoke     # seconds: a tiny study of stories260k (SMOKE_STUDY), 2 windows
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, fraction, non_negative_int, positive_int  # noqa: E402
# --smoke: these sizes replace the given ones; without a study directory, the shipped study below is run first
# into a temporary directory with the overrides of SMOKE_STUDY
SMOKE = {"sequences": 2}
SMOKE_STUDY = ROOT / "studies" / "stories260k.yaml", {
    "strategies": [{"name": "sleb"}, {"name": "shortgpt"}], "budget": {"targets": [0.2, 0.4]},
    "calibration": {"num_sequences": 2, "seq_len": 32}, "heldout": {"num_sequences": 2, "seq_len": 32}}


def smoke_study(out: Path) -> Path:
    """Run SMOKE_STUDY's config, shrunk by its overrides, into ``out``."""
    import yaml

    from search.commands.run.plan import portable_config
    from search.config import load_config
    from search.study import main as study_main

    path, overrides = SMOKE_STUDY
    config = portable_config(load_config(path))
    for key, value in overrides.items():
        config[key] = config[key] | value if isinstance(value, dict) else value
    config["output_dir"], config["storage"] = str(out), None
    (out.parent / "smoke.yaml").write_text(yaml.safe_dump(config), encoding="utf-8")
    if study_main(["run", str(out.parent / "smoke.yaml"), "--no-progress"]) != 0:
        raise SystemExit("the smoke study failed")
    return out


def result_masks(data, targets: list[float] | None) -> dict[float, dict[str, list[str]]]:
    """target -> mask text -> the strategy tags whose result it is."""
    found: dict[float, dict[str, list[str]]] = {}
    for tag, record in sorted(data.records.items()):
        for target, mask in record.results.items():
            if mask and (targets is None or float(target) in targets):
                found.setdefault(float(target), {}).setdefault(mask, []).append(tag)
    return found


def larger_sample(config, sequences: int, seed: int) -> list:
    """The study's calibration parts (BatchSpecs) with ``sequences`` windows in all, split between the parts as
    the study splits its own, drawn with ``seed``."""
    from search.config import calibration_sections, text_source

    sections = calibration_sections(config)
    total = sum(section.num_sequences for _, section in sections)
    counts = [max(1, round(sequences * section.num_sequences / total)) for _, section in sections]
    return [text_source(config, section.model_copy(update={"num_sequences": count, "seed": seed}))
            for (_, section), count in zip(sections, counts)]


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path, nargs="?", help="a study's directory (required without --smoke)")
    parser.add_argument("--sequences", type=positive_int, default=128, help="windows in the larger calibration sample")
    parser.add_argument("--seed", type=non_negative_int, default=7, help="seed of the larger sample (the study's is another)")
    parser.add_argument("--targets", type=fraction, nargs="+", help="only these targets (default: all)")
    parser.add_argument("--smoke", action="store_true", help="seconds: the sizes of SMOKE (study: SMOKE_STUDY)")
    args = parser.parse_args(argv)
    if args.smoke:
        args = argparse.Namespace(**(vars(args) | SMOKE))
        if args.study_dir is None:
            with tempfile.TemporaryDirectory() as tmp:
                return rescore(args, smoke_study(Path(tmp) / "study"))
    if args.study_dir is None:
        parser.error("the study directory is required (or --smoke)")
    return rescore(args, args.study_dir)


def rescore(args: argparse.Namespace, study_dir: Path) -> int:
    """Print one table per target: the study's result masks re-scored on the larger sample."""

    import torch

    from objectives.calibration import mixed_batch
    from objectives.scorer import MaskScorer
    from search.studydir.reader import read_study
    from search.config import load_config, model_source
    from surgery.cli import load_checked
    from surgery.mask import KeepMask

    data = read_study(study_dir)
    config = load_config(study_dir / "config.yaml")
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    model, tokenizer = load_checked(model_source(config)[0], dtype=config.model.dtype, device=config.model.device)
    sample = larger_sample(config, args.sequences, args.seed)
    sequences = sum(spec.num_sequences for spec in sample)
    scorer = MaskScorer(model, mixed_batch(sample, tokenizer), config.objective,
                        batch_size=config.reference.batch_size, topk=config.reference.topk)
    extra = list(data.extra_heldout)
    for target, masks in sorted(result_masks(data, args.targets).items()):
        print(f"\n## {target:g} removed: {config.objective} on {sequences} x {config.calibration.seq_len} tokens\n")
        header = ["strategies", f"study {config.objective}", f"{config.objective} x{sequences}", "held-out ppl",
                  *extra, "s"]
        print("| " + " | ".join(header) + " |")
        print("|---" * (5 + len(extra)) + "|")
        for mask, tags in masks.items():
            started = time.perf_counter()
            value = scorer.score(KeepMask.parse(mask))
            study_value = data.trials.loc[data.trials["mask"] == mask, "objective"].min()
            held = [data.heldout.get(mask)] + [data.extra_heldout[c].get(mask) for c in extra]
            cells = " | ".join("-" if v is None else f"{v:.4g}" for v in held)
            print(f"| {'+'.join(tags)} | {study_value:.4g} | {value:.4g} | {cells} | {time.perf_counter() - started:.0f} |",
                  flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
