"""A study read back into frames: every evaluation as one row of ``trials.csv``, the strategy records, the held-out
and validation caches, the Pareto front of size versus held-out perplexity and the recommended mask per target.
What report, export and confirm read."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from search.record import PRIMARY_COLUMN
from search.stored import StrategyRecord, StudyMeta
from search.studydir.opened import Study, open_study
from surgery.mask import KeepMask

VALIDATION_COLUMN = "validation"  # trials.csv: the validation value of the masks scored on validation text


@dataclass
class StudyData:
    """A study read back from its storage: trials as a frame plus the run's records."""

    study_dir: Path
    storage: str
    meta: StudyMeta
    records: dict[str, StrategyRecord]  # strategy tag -> results, evaluations, forwards, wall_s, notes
    heldout: dict[str, float]  # mask -> held-out perplexity
    trials: pd.DataFrame = field(default_factory=pd.DataFrame)
    extra_heldout: dict[str, dict[str, float]] = field(default_factory=dict)  # column -> mask -> perplexity
    validation: dict = field(default_factory=dict)  # the validation cache (search.selection), empty without one

    @property
    def criterion(self) -> str:
        return self.validation.get("criterion", "ppl")

    def validation_value(self, mask: str) -> float | None:
        """A mask's validation value as reported (geometric-mean perplexity or mean KL over domains), or None."""
        from search.selection import scored_masks, shown

        scored = scored_masks({**self.validation, "windows": {mask: self.validation.get("windows", {}).get(mask)}})
        return shown(scored[mask].value, self.criterion) if mask in scored else None

    def heldout_columns(self, mask: str) -> dict[str, float | None]:
        """``heldout_ppl`` and each ``heldout_ppl_<name>`` of ``mask`` (None where it was not scored)."""
        return {PRIMARY_COLUMN: self.heldout.get(mask), **{c: ppl.get(mask) for c, ppl in self.extra_heldout.items()}}

    @property
    def size_metric(self) -> str:
        return "params" if "params" in self.meta.dense else self.meta.budget_metric

    @property
    def dense_mask(self) -> str:
        return str(KeepMask.dense(self.meta.num_layers))


def read_study(study: Study | Path | str) -> StudyData:
    """Everything a report needs from a study (opened here when given a directory)."""
    study = study if isinstance(study, Study) else open_study(study)
    record, meta = study.record, study.meta()
    heldout = record.heldout_ppl()
    data = StudyData(Path(study.directory), study.url, meta, record.strategy_records(), heldout.pop(PRIMARY_COLUMN))
    data.extra_heldout = heldout
    data.validation = record.validation_cache()
    data.trials = trials_frame(study, data)
    return data


def trials_frame(study: Study, data: StudyData) -> pd.DataFrame:
    """One row per evaluated mask and strategy, in trial order."""
    rows = []
    for done in study.record.evaluations():
        row = {"trial": done.number, "strategy": done.strategy, "target": done.target, "mask": done.mask,
               "removed_attn": done.cost("removed_attn"), "removed_ffn": done.cost("removed_ffn")}
        row["removed"] = (row["removed_attn"] or 0) + (row["removed_ffn"] or 0)
        row.update({name: done.cost(name) for name in data.meta.dense})
        row["objective"] = done.objective
        row.update(data.heldout_columns(done.mask))
        row[VALIDATION_COLUMN] = data.validation_value(done.mask)
        rows.append(row)
    columns = ["trial", "strategy", "target", "mask", "removed_attn", "removed_ffn", "removed", *data.meta.dense,
               "objective", PRIMARY_COLUMN, *data.extra_heldout, VALIDATION_COLUMN]
    return pd.DataFrame(rows, columns=columns)


def finders(data: StudyData) -> dict[str, str]:
    """mask -> the strategies that returned it as a result, else the first strategy that evaluated it."""
    found: dict[str, list[str]] = {}
    for tag, record in data.records.items():
        for mask in record.masks():
            if tag not in found.setdefault(mask, []):
                found[mask].append(tag)
    first = data.trials.drop_duplicates("mask").set_index("mask")["strategy"].to_dict()
    masks = set(data.heldout) | set(found) | set(data.validation.get("windows", {}))
    return {m: "+".join(found.get(m) or [first.get(m) or ("dense" if m == data.dense_mask else "?")]) for m in masks}


def pareto_mask(size: pd.Series, quality: pd.Series) -> pd.Series:
    """True for points no other point beats on both (smaller size, lower quality value)."""
    order = sorted(range(len(size)), key=lambda i: (size.iloc[i], quality.iloc[i]))
    keep, best = [False] * len(size), float("inf")
    for i in order:
        if quality.iloc[i] < best:
            keep[i], best = True, quality.iloc[i]
    return pd.Series(keep, index=size.index)


def front_frame(data: StudyData) -> pd.DataFrame:
    """Pareto front of size (parameters) versus held-out perplexity over every mask scored on held-out text."""
    size = data.size_metric
    per_mask = data.trials.drop_duplicates("mask").set_index("mask")
    found = finders(data)
    rows = []
    for mask, ppl in data.heldout.items():
        keep = KeepMask.parse(mask)
        cost = per_mask[size].get(mask) if mask in per_mask.index else None
        if mask == data.dense_mask:
            cost = data.meta.dense[size]
        if cost is None:
            continue
        objective = per_mask["objective"].get(mask) if mask in per_mask.index else data.meta.dense_objective
        rows.append({"mask": mask, "strategy": found.get(mask, "?"), size: cost,
                     "removed_fraction": 1 - cost / data.meta.dense[size], "removed_attn": keep.removed_attn,
                     "removed_ffn": keep.removed_ffn, "objective": objective, PRIMARY_COLUMN: ppl})
    frame = pd.DataFrame(rows, columns=["mask", "strategy", size, "removed_fraction", "removed_attn", "removed_ffn",
                                        "objective", PRIMARY_COLUMN])
    if frame.empty:
        return frame
    return frame[pareto_mask(frame[size], frame[PRIMARY_COLUMN])].sort_values(size).reset_index(drop=True)


def recommended(data: StudyData) -> pd.DataFrame:
    """recommended.csv: per target, the mask picked on validation text and why (empty without validation text)."""
    from search.selection import reason, recommended_frame

    if not data.validation:
        return pd.DataFrame()
    sizes = data.trials.drop_duplicates("mask").set_index("mask")[data.size_metric].to_dict()
    frame = recommended_frame(data.validation, finders(data), sizes)
    if frame.empty:
        return frame
    frame = frame.rename(columns={"size": data.size_metric})
    for column in [PRIMARY_COLUMN, *data.extra_heldout]:
        frame[column] = [data.heldout_columns(m)[column] for m in frame["mask"]]
    domains = len(next(iter(data.validation["windows"].values())))
    reduce = data.validation.get("reduce", "mean")
    frame["reason"] = [reason(row, data.criterion, domains, reduce) for _, row in frame.iterrows()]
    return frame
