"""``export``: the best mask of a study within a size budget, exported as a smaller model.

``--target T`` takes the study's recommended mask of budget target T (``recommended.csv``: picked on validation
text, see :mod:`search.selection`). ``--max-params N`` keeps masks with at most N parameters and takes the best
one. ``--max-removed K`` takes the masks removing the most sublayers allowed (K sublayers, or the fraction K of all
sublayers when K < 1; fewer only when no scored mask removes exactly that many) and the best one among them.
"Best" is the lowest validation value (default for a study with validation text: among the masks scored on it,
so a budget equal to a target's gives its recommended mask), the lowest held-out perplexity (default otherwise;
among the masks the study scored on held-out text: every strategy's result and the calibration Pareto front) or
the lowest calibration objective (among every evaluated mask).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import pandas as pd

from search.studydir.reader import VALIDATION_COLUMN, StudyData, read_study, recommended
from search.record import PRIMARY_COLUMN
from surgery.errors import UserError


class ExportError(UserError):
    """No mask meets the export budget, or a bad budget value."""


def removal_limit(max_removed: float, num_sublayers: int) -> int:
    """Sublayer count from ``--max-removed``: a count, or a fraction of ``num_sublayers`` when below 1."""
    if max_removed <= 0:
        raise ExportError(f"--max-removed must be positive (got {max_removed:g})")
    if max_removed < 1:
        return math.floor(max_removed * num_sublayers + 1e-9)
    if max_removed != int(max_removed) or max_removed > num_sublayers:
        raise ExportError(f"--max-removed {max_removed:g}: a count must be a whole number <= {num_sublayers}")
    return int(max_removed)


def candidates(data: StudyData, *, max_params=None, max_removed=None, scored: str = "objective") -> pd.DataFrame:
    """Distinct evaluated masks within the budget that have a value in column ``scored``."""
    masks = data.trials.drop_duplicates("mask").dropna(subset=[scored])
    if masks.empty:
        raise ExportError("no evaluated mask was scored on held-out text; use --objective calibration")
    if max_params is not None:
        if "params" not in masks:
            raise ExportError("this study recorded no parameter counts; use --max-removed")
        within = masks[masks["params"] <= max_params]
        if within.empty:
            raise ExportError(f"no evaluated mask has at most {max_params:g} parameters "
                              f"(smallest: {masks['params'].min():g})")
        return within
    limit = removal_limit(max_removed, 2 * data.meta.num_layers)
    within = masks[masks["removed"] <= limit]
    if within.empty:
        raise ExportError(f"no evaluated mask removes at most {limit} sublayers")
    return within[within["removed"] == within["removed"].max()]


COLUMNS = {"validation": VALIDATION_COLUMN, PRIMARY_COLUMN: PRIMARY_COLUMN, "calibration": "objective"}


def default_objective(data: StudyData) -> str:
    """Validation where the study scored validation text (the recommended masks), else held-out perplexity."""
    return "validation" if data.validation.get("windows") else PRIMARY_COLUMN


def select(data: StudyData, *, max_params=None, max_removed=None, objective: str | None = None) -> pd.Series:
    """The best mask within the budget by ``objective``; its row of trials.csv (first finder as strategy)."""
    objective = objective or default_objective(data)
    if objective == "validation" and not data.validation.get("windows"):
        raise ExportError("this study scored no validation text (no `validation:` in its config); "
                          "use --objective heldout_ppl")
    column = COLUMNS[objective]
    pool = candidates(data, max_params=max_params, max_removed=max_removed, scored=column)
    return pool.sort_values([column, "trial"], kind="stable").iloc[0]


def select_target(data: StudyData, target: float) -> tuple[pd.Series, str]:
    """The recommended mask of a study target (its trials.csv row) and the reason it was picked."""
    chosen = recommended(data)
    if chosen.empty:
        raise ExportError("this study has no recommended masks (no `validation:` in its config); use --max-params")
    match = chosen[(chosen["target"] - target).abs() < 1e-9]
    if match.empty:
        raise ExportError(f"--target {target:g}: not a target of this study (targets: "
                          f"{', '.join(format(t, 'g') for t in chosen['target'])})")
    row = match.iloc[0]
    trial = data.trials[data.trials["mask"] == row["mask"]].sort_values("trial").iloc[0].copy()
    trial["strategy"] = row["strategy"]
    return trial, row["reason"]


def main(args: argparse.Namespace) -> int:
    from search.config import calibration_sources, model_source
    from search.studydir import open_study, study_model
    from surgery.cli import load_checked
    from surgery.export import check_target, export_gguf_file, export_options, export_pruned, fitted_repair
    from surgery.mask import KeepMask

    study_dir = Path(args.study_dir)
    study = open_study(study_dir)
    data, config = read_study(study), study.config
    name, trust = study_model(study_dir, config, data.meta, trust_remote_code=args.trust_remote_code)
    if args.target is not None:
        best, why = select_target(data, args.target)
    else:
        best = select(data, max_params=args.max_params, max_removed=args.max_removed, objective=args.objective)
        why = _why(data, best, args.objective or default_objective(data))
    options = export_options(args, name)
    local = model_source(config)[1]
    protect = (("the study", study_dir), ("the source model", Path(name) if local else None))
    check_target(Path(args.out), args.force, protect=protect)  # before the model is loaded
    metrics = {key: _plain(best[key]) for key in ("strategy", "objective", PRIMARY_COLUMN, VALIDATION_COLUMN, "removed_attn",
                                                    "removed_ffn", *data.meta.dense) if key in best}
    metrics.update(calibration_objective=data.meta.objective, study=str(args.study_dir), selected_because=why)
    mask = KeepMask.parse(best["mask"])
    if options.source_file is not None and options.outtype is None:  # tensors copied: no model to load
        out = export_gguf_file(options.source_file, mask, Path(args.out), source=config.model.name,
                               metrics=metrics, force=args.force, protect=protect)
    else:
        model, tokenizer = load_checked(name, dtype=config.model.dtype, device="cpu", trust_remote_code=trust)
        texts = args.calibration or calibration_sources(config)  # default: the study's
        repair, line = fitted_repair(options, model, tokenizer, mask, texts)
        out = export_pruned(model, tokenizer, mask, Path(args.out), source=config.model.name,
                            metrics={**metrics, **line}, force=args.force, protect=protect, options=options,
                            repair=repair)
    ppl = "-" if pd.isna(best[PRIMARY_COLUMN]) else f"{best[PRIMARY_COLUMN]:.4g}"
    size = int(best['params']) if 'params' in best else '?'
    print(f"exported {best['mask']} (found by {best['strategy']}, {size} params, "
          f"held-out ppl {ppl}) to {out} as {args.format}\n  chosen: {why}")
    return 0


def _why(data: StudyData, best: pd.Series, objective: str) -> str:
    """Why ``best`` was exported: the recommended mask's reason where it is one, else the ranking used."""
    chosen = recommended(data) if objective == "validation" else pd.DataFrame()
    same = chosen[chosen["mask"] == best["mask"]] if not chosen.empty else chosen
    if not same.empty:
        return f"the recommended mask of target {same.iloc[0]['target']:g}: {same.iloc[0]['reason']}"
    ranking = {"validation": "validation value", PRIMARY_COLUMN: "held-out perplexity",
               "calibration": "calibration objective"}[objective]
    return f"the lowest {ranking} among the masks within the budget"


def _plain(value):
    """numpy / pandas scalars as plain JSON values."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    return value.item() if hasattr(value, "item") else value
