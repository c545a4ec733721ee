"""How many calibration tokens a study needs: the rank agreement of calibration KL with held-out perplexity, as
the calibration windows per domain grow.

    python benchmarks/calibration_tokens.py --config studies/smollm2-135m.yaml \
        --masks studies/results/smollm2-135m/summary.md --json runs/calibration_tokens.json
    python benchmarks/calibration_tokens.py --smoke      # seconds: stories260k, the sizes of SMOKE

Candidates: the masks of ``--masks`` (a study's ``summary.md`` or a CSV with ``target`` and ``mask`` columns), each
with ``--neighbours`` random feasible one-swap variants of the best-known mask at its target, so that the ranking is
tested among close competitors, as a search meets them. Every candidate is scored once on ``--max-windows`` windows
of every calibration domain of the config (KL to the dense model per window) and on the config's held-out sets
(perplexity on ``--heldout-windows`` windows of ``--heldout-len`` tokens). Then, for each number of windows per
domain, ``--draws`` random subsets of that size give the calibration objective (mean over domains), and the table
shows the Spearman correlation of its ranking with the held-out ranking within each target (mean over targets and
draws, and its standard deviation over draws).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from surgery.cli import Parser, output_file, positive_int, run_cli  # noqa: E402

MASK = re.compile(r"^(?:AM|A-|-M|--)(?:,(?:AM|A-|-M|--))+$")
SMOKE = {"max_windows": 4, "heldout_windows": 2, "heldout_len": 32, "neighbours": 2, "draws": 3}
SMOKE_INPUTS = {"config": ROOT / "studies/stories260k.yaml"}


def read_masks(path: Path) -> pd.DataFrame:
    """(target, mask) rows of a CSV, or of the per-budget tables of a study's summary.md."""
    if path.suffix == ".csv":
        frame = pd.read_csv(path)
        if not {"target", "mask"} <= set(frame.columns):
            raise SystemExit(f"{path}: a CSV of masks needs the columns target and mask")
        return frame[["target", "mask"]].drop_duplicates()
    rows, target = [], None
    for line in path.read_text(encoding="utf-8").splitlines():
        heading = re.match(r"## Budget: (\d+)%", line)
        if heading:
            target = int(heading.group(1)) / 100
        elif line.startswith("## "):
            target = None
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows += [{"target": target, "mask": c} for c in cells if target is not None and MASK.match(c)]
    if not rows:
        raise SystemExit(f"{path}: no masks under '## Budget:' headings")
    return pd.DataFrame(rows).drop_duplicates()


def neighbours(mask, costs, limit: float, count: int, generator: torch.Generator) -> list:
    """Up to ``count`` distinct feasible masks that keep one removed sublayer and remove one kept sublayer."""
    from surgery.mask import KeepMask

    bits, found = list(mask.bits), {}
    removed = [i for i, b in enumerate(bits) if not b]
    kept = [i for i, b in enumerate(bits) if b]
    for _ in range(50 * count):
        if len(found) >= count or not removed or not kept:
            break
        back = removed[int(torch.randint(len(removed), (1,), generator=generator))]
        out = kept[int(torch.randint(len(kept), (1,), generator=generator))]
        new = list(bits)
        new[back], new[out] = True, False
        candidate = KeepMask(tuple(new))
        if costs.cost(candidate) <= limit:
            found[str(candidate)] = candidate
    return list(found.values())


@torch.no_grad()
def window_kl(model, masker, masks: list, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[masks, windows] mean KL(dense || masked) per window."""
    out = torch.zeros(len(masks), len(ids))
    for start in range(0, len(ids), batch):
        chunk = ids[start : start + batch]
        masker.restore()
        dense = F.log_softmax(model(input_ids=chunk, use_cache=False).logits[:, :-1].float(), -1)
        for row, mask in enumerate(masks):
            masker.apply(mask)
            logq = F.log_softmax(model(input_ids=chunk, use_cache=False).logits[:, :-1].float(), -1)
            out[row, start : start + len(chunk)] = (dense.exp() * (dense - logq)).sum(-1).mean(-1)
    masker.restore()
    return out


@torch.no_grad()
def heldout_logppl(model, masker, masks: list, ids: torch.Tensor, batch: int) -> torch.Tensor:
    """[masks] mean next-token loss over all windows."""
    out = torch.zeros(len(masks))
    for row, mask in enumerate(masks):
        masker.apply(mask)
        total = 0.0
        for start in range(0, len(ids), batch):
            chunk = ids[start : start + batch]
            logits = model(input_ids=chunk, use_cache=False).logits[:, :-1].float()
            total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), chunk[:, 1:].reshape(-1), reduction="sum"))
        out[row] = total / ids[:, 1:].numel()
    masker.restore()
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = Parser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, help="a study config (its calibration and held-out texts)")
    parser.add_argument("--masks", type=Path, help="a study's summary.md or a CSV with target and mask columns")
    parser.add_argument("--neighbours", type=positive_int, default=6, help="one-swap variants of each target's best mask")
    parser.add_argument("--max-windows", type=positive_int, default=64, help="calibration windows per domain, at most")
    parser.add_argument("--heldout-windows", type=positive_int, default=32)
    parser.add_argument("--heldout-len", type=positive_int, default=256)
    parser.add_argument("--draws", type=positive_int, default=20, help="random subsets per size")
    parser.add_argument("--batch", type=positive_int, default=8)
    parser.add_argument("--json", type=output_file, help="write the table and the inputs here")
    parser.add_argument("--smoke", action="store_true", help="seconds: stories260k and the sizes of SMOKE")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
        args.config = args.config or SMOKE_INPUTS["config"]
    if args.config is None:
        parser.error("--config is required (or --smoke)")
    return args


def candidates(args, costs) -> tuple[list, dict]:
    """Masks to rank and, per target, their row indices."""
    from surgery.mask import KeepMask

    layers = len(costs.per_sublayer) // 2
    if args.masks is None:  # --smoke: one mask of its own, with its neighbours
        frame = pd.DataFrame({"target": [0.25], "mask": [str(KeepMask.dense(layers).without(1).without(3))]})
    else:
        frame = read_masks(args.masks)
    generator = torch.Generator().manual_seed(0)
    masks, groups = {}, {}
    for target, group in frame.groupby("target"):
        mine = [KeepMask.parse(m) for m in group["mask"]]
        limit = costs.limit(float(target))
        mine += neighbours(mine[0], costs, limit, args.neighbours, generator)
        for mask in mine:
            masks.setdefault(str(mask), mask)
        groups[float(target)] = list(dict.fromkeys(str(m) for m in mine))
    order = list(masks)
    return [masks[m] for m in order], {t: [order.index(m) for m in ms] for t, ms in groups.items()}


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from objectives.budgets import param_costs
    from objectives.calibration import BatchSpec, token_batch
    from search.config import calibration_sections, heldout_sets, load_config, model_source, text_source
    from surgery.cli import load_checked
    from surgery.masking import masker_for

    config = load_config(args.config)
    torch.set_num_threads(config.model.threads or torch.get_num_threads())
    model, tokenizer = load_checked(model_source(config)[0], dtype=config.model.dtype, device="cpu")
    masker, costs = masker_for(model), param_costs(model)
    masks, groups = candidates(args, costs)
    kl: dict[str, torch.Tensor] = {}
    for key, section in calibration_sections(config):
        spec = text_source(config, section)
        ids = token_batch(BatchSpec(spec.source, args.max_windows, spec.seq_len, seed=7), tokenizer)
        kl[key] = window_kl(model, masker, masks, ids, args.batch)
    held = torch.zeros(len(masks))
    for held_set in heldout_sets(config):
        spec = text_source(config, held_set.section)
        ids = token_batch(BatchSpec(spec.source, args.heldout_windows, args.heldout_len, seed=7), tokenizer)
        held += heldout_logppl(model, masker, masks, ids, args.batch) / len(heldout_sets(config))
    sizes = [s for s in (1, 2, 4, 8, 16, 32, 64, 128) if s <= args.max_windows]
    table = rank_agreement(kl, held, {t: torch.tensor(i) for t, i in groups.items()}, sizes, args.draws)
    seq_len = config.calibration.seq_len
    table.insert(1, "calibration tokens", table["windows per domain"] * seq_len * len(kl))
    print(f"{len(masks)} masks over {len(groups)} targets; {len(kl)} calibration domains of {seq_len}-token windows")
    print(table.to_markdown(index=False, floatfmt=".3f"))
    if args.json:
        args.json.write_text(json.dumps({"table": table.to_dict("records"), "masks": [str(m) for m in masks],
                                         "targets": {str(t): i for t, i in groups.items()}}, indent=1))
    return 0


def rank_agreement(kl, held, groups, sizes, draws) -> pd.DataFrame:
    """Per windows-per-domain size: the Spearman correlation, within each target, of the calibration objective
    (mean over domains of a random subset of windows) with held-out log-perplexity; mean and sd over draws."""
    generator = torch.Generator().manual_seed(0)
    rows = []
    for size in sizes:
        values = []
        for _ in range(draws):
            score = sum(k[:, torch.randperm(k.shape[1], generator=generator)[:size]].mean(1) for k in kl.values())
            rhos = [pd.Series(score[i].tolist()).corr(pd.Series(held[i].tolist()), method="spearman")
                    for i in groups.values() if len(i) > 2]
            values.append(float(pd.Series(rhos).mean()))
        values = pd.Series(values)
        rows.append({"windows per domain": size, "mean rho": values.mean(), "sd rho": values.std()})
    return pd.DataFrame(rows)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
