"""Would more calibration text have picked other masks? Each strategy's result of a study, re-scored on more tokens.

    python benchmarks/calibration_kl.py runs/smollm2-135m --sequences 128 --seed 7 [--targets 0.25 0.375]

Reads the study's config copy and its strategy results, loads the model as the study did (dtype, threads), draws
``--sequences`` windows of the study's ``calibration.seq_len`` tokens from the same calibration text (split between
its parts as the study's are) with another ``--seed``, and scores every distinct result mask with the study's
objective on them. Prints one markdown table per target: the strategies that found each mask, the study's
calibration value, the value on the larger sample, and the study's held-out perplexities, so the rankings can be
compared side by side.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def result_masks(data, targets: list[float] | None) -> dict[float, dict[str, list[str]]]:
    """target -> mask text -> the strategy tags whose result it is."""
    found: dict[float, dict[str, list[str]]] = {}
    for tag, record in sorted(data.records.items()):
        for target, mask in record.get("results", {}).items():
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study_dir", type=Path)
    parser.add_argument("--sequences", type=int, default=128, help="windows in the larger calibration sample")
    parser.add_argument("--seed", type=int, default=7, help="seed of the larger sample (the study's is another)")
    parser.add_argument("--targets", type=float, nargs="+", help="only these targets (default: all)")
    args = parser.parse_args(argv)

    import torch

    from objectives.calibration import mixed_batch
    from objectives.scorer import MaskScorer
    from search.commands.report import read_study
    from search.config import load_config, model_source
    from surgery.cli import load_checked
    from surgery.mask import KeepMask

    data = read_study(args.study_dir)
    config = load_config(args.study_dir / "config.yaml")
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
        print(f"| strategies | study {config.objective} | {config.objective} x{sequences} | held-out ppl | "
              + " | ".join(extra) + " | s |")
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
