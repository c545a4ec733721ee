"""The recommended mask per budget: candidates re-scored on validation text and picked by their mean over domains.

Multi-fidelity finishing. Per target, every strategy's result and the best ``selection.candidates`` other feasible
masks by calibration objective (the pool) are scored on each domain of the config's ``validation:`` text, which is
disjoint from calibration and held-out text. The values per window are cached in the study
(:meth:`search.record.StudyRecord.validation_cache`), so a resumed study scores only new candidates. Everything
else is computed from that cache: a mask's validation value is the mean over domains of its per-domain mean
(log-perplexity, or KL to the dense model), so every domain weighs the same whatever its size, or with
``selection.reduce: worst`` its worst domain's; the recommended mask of a target is the pool's lowest; its lead
over the runner-up has a standard error from the paired per-window differences, so a lead within noise is flagged.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import pandas as pd

from search.stored import StrategyRecord

NOISE_SE = 2.0  # a lead smaller than this many standard errors is within noise


# scoring (during ``run``) ---------------------------------------------------------------------------------
def candidate_pool(ctx, results: list[StrategyRecord], extra: int) -> dict[str, list[str]]:
    """Per target (``format(t, "g")``): every strategy's result, then the ``extra`` best other feasible masks."""
    from surgery.mask import KeepMask

    ranked = sorted((value, mask) for mask, value in ctx.values.items() if math.isfinite(value))
    pool = {}
    for target in ctx.targets:
        key = format(target, "g")
        found = list(dict.fromkeys(m for done in results if (m := done.results.get(key))))
        others = [m for _, m in ranked if m not in found and ctx.feasible(KeepMask.parse(m), target)]
        pool[key] = found + others[:extra]
    return pool


def _spec(config) -> list:
    from search.config import text_source, validation_sections
    from search.studydir.fingerprint import text_identity

    parts = []
    for key, section in validation_sections(config):
        spec = text_source(config, section)
        parts.append([key, spec.source.describe(), spec.num_sequences, spec.seq_len, spec.seed,
                      text_identity(spec)["sha256"]])
    return [config.selection.criterion, config.reference.topk, parts]  # not ``reduce``: the windows stay valid


def finish_on_validation(ctx, config, model, batches: dict, results: list[StrategyRecord], *,
                         progress: bool = True) -> list[str]:
    """Score the pool and the dense mask on every validation domain (cached); the masks scored. No validation text:
    nothing to do."""
    from tqdm.auto import tqdm

    from objectives.scorer import MaskScorer
    from surgery.mask import KeepMask

    if not batches:
        return []
    record, spec = ctx.record, _spec(config)
    cache = record.validation_cache()
    if cache.get("spec") != spec:
        cache = {"spec": spec, "criterion": config.selection.criterion, "pool": {}, "windows": {}, "wall_s": 0.0}
    cache["reduce"] = config.selection.reduce
    cache["pool"] = candidate_pool(ctx, results, config.selection.candidates)
    masks = list(dict.fromkeys([str(ctx.dense()), *(m for ms in cache["pool"].values() for m in ms)]))
    todo = [m for m in masks if m not in cache["windows"]]
    record.set_validation_cache(cache)
    if not todo:
        return masks
    scorers = {name: MaskScorer(model, ids, config.selection.criterion, batch_size=config.reference.batch_size,
                                topk=config.reference.topk) for name, ids in batches.items()}
    for mask in tqdm(todo, desc="validation", unit="mask", disable=not progress, leave=False):
        start = time.perf_counter()
        cache["windows"][mask] = {name: scorer.window_values(KeepMask.parse(mask)) for name, scorer in scorers.items()}
        cache["wall_s"] += time.perf_counter() - start
        record.set_validation_cache(cache)  # after each mask: a killed run keeps what it scored
    return masks


# reading (report, export) ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Scored:
    """One mask's validation values: per domain, the mean over its windows and the windows themselves."""

    windows: dict[str, list[float]]
    reduce: str = "mean"

    @property
    def domains(self) -> dict[str, float]:
        return {name: sum(values) / len(values) for name, values in self.windows.items()}

    @property
    def value(self) -> float:
        """Mean over domains of the per-domain mean (``reduce="worst"``: the worst domain's mean)."""
        if self.reduce == "worst":
            return self.worst[1]
        return sum(self.domains.values()) / len(self.domains)

    @property
    def worst(self) -> tuple[str, float]:
        return max(self.domains.items(), key=lambda item: item[1])

    def lead_se(self, other: Scored) -> float:
        """Standard error of ``other.value - self.value`` from the paired per-window differences of each domain
        (``reduce="worst"``: of the two worst domains' means, paired where it is the same domain)."""
        if self.reduce == "worst":
            mine, theirs = self.worst[0], other.worst[0]
            if mine != theirs:
                return math.hypot(_se(self.windows[mine]), _se(other.windows[theirs]))
            return _se([b - a for a, b in zip(self.windows[mine], other.windows[mine])])
        variance = 0.0
        for name, mine in self.windows.items():
            diffs = [b - a for a, b in zip(mine, other.windows[name])]
            n = len(diffs)
            mean = sum(diffs) / n
            spread = sum((d - mean) ** 2 for d in diffs) / (n - 1) if n > 1 else 0.0
            variance += spread / n / len(self.windows) ** 2
        return math.sqrt(variance)


def _se(values: list[float]) -> float:
    """Standard error of the mean of ``values``."""
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else 0.0


def shown(value: float, criterion: str) -> float:
    """A validation value as reported: log-perplexity as (geometric-mean) perplexity, KL as it is."""
    return math.exp(value) if criterion == "ppl" else value


def scored_masks(cache: dict) -> dict[str, Scored]:
    reduce = cache.get("reduce", "mean")
    return {mask: Scored(windows, reduce) for mask, windows in cache.get("windows", {}).items() if windows}


def recommended_frame(cache: dict, finders: dict[str, str], sizes: dict[str, float]) -> pd.DataFrame:
    """Per target: the recommended mask (lowest validation value in the pool), why, and the runner-up's distance."""
    scored, criterion = scored_masks(cache), cache.get("criterion", "ppl")
    rows = []
    for key, pool in sorted(cache.get("pool", {}).items(), key=lambda item: float(item[0])):
        ranked = sorted((scored[m].value, m) for m in pool if m in scored)
        if not ranked:
            continue
        best = scored[ranked[0][1]]
        row = {"target": float(key), "mask": ranked[0][1], "strategy": finders.get(ranked[0][1], "?"),
               "size": sizes.get(ranked[0][1]), f"validation_{criterion}": shown(best.value, criterion),
               "worst_domain": best.worst[0], f"worst_domain_{criterion}": shown(best.worst[1], criterion),
               "candidates": len(ranked), "runner_up": None, "runner_up_strategy": None, "lead": None, "lead_se": None,
               "within_noise": False}
        if len(ranked) > 1:
            second = scored[ranked[1][1]]
            row.update(runner_up=ranked[1][1], runner_up_strategy=finders.get(ranked[1][1], "?"),
                       lead=second.value - best.value, lead_se=best.lead_se(second))
            row["within_noise"] = bool(row["lead"] < NOISE_SE * row["lead_se"])
        rows.append(row)
    return pd.DataFrame(rows)


def reason(row, criterion: str, domains: int, reduce: str = "mean") -> str:
    """One sentence: why this mask is the recommended one."""
    what = "log-perplexity" if criterion == "ppl" else "KL to the dense model"
    over = f"mean {what} over {domains} validation domains" if reduce == "mean" else \
        f"{what} on the worst of {domains} validation domains"
    text = f"lowest {over} among {row['candidates']} candidates ({row['strategy']})"
    if row["runner_up"] is None:
        return text
    lead = f"leads {row['runner_up_strategy']} by {row['lead']:.4g} ± {row['lead_se']:.2g}"
    return f"{text}; {lead}" + (" (within noise: either is a fair choice)" if row["within_noise"] else "")


def rank_frame(results: pd.DataFrame, columns: dict[str, str]) -> pd.DataFrame:
    """Each strategy's rank per target on each of ``columns`` (label -> column of ``results``), ties sharing
    the best rank."""
    frames = []
    for target, group in results.groupby("target", sort=True):
        ranks = pd.DataFrame({"target": target, "strategy": group["strategy"]})
        for label, column in columns.items():
            ranks[label] = group[column].rank(method="min")
        frames.append(ranks)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def rank_correlations(ranks: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
    """Per target: Spearman correlation between each pair of rankings."""
    rows = []
    for target, group in ranks.groupby("target", sort=True):
        row = {"target": target}
        for i, a in enumerate(labels):
            for b in labels[i + 1:]:
                row[f"{a} vs {b}"] = group[a].corr(group[b], method="spearman")
        rows.append(row)
    return pd.DataFrame(rows)
