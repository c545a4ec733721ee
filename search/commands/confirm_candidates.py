"""``confirm``'s candidate masks: the study front's best (per budget, or the K lowest held-out perplexities), or
the rows of a masks CSV (columns ``target``, ``mask``, optionally ``strategy``: a study's ``recommended.csv``)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from search.record import PRIMARY_COLUMN
from surgery.errors import UserError


class ConfirmError(UserError):
    """A study with nothing to confirm, a budget no front mask meets, or a masks CSV that cannot be used."""


@dataclass(frozen=True)
class Candidate:
    mask: str
    strategy: str
    removed_fraction: float  # of the size metric (parameters)
    size: float
    heldout_ppl: float
    why: str

    @property
    def name(self) -> str:
        digest = hashlib.sha1(self.mask.encode()).hexdigest()[:8]
        return f"removed{round(100 * self.removed_fraction):02d}-{digest}"


def study_front(study) -> tuple[pd.DataFrame, str]:
    """(front frame, size metric) of an opened study (:class:`search.studydir.Study`); a clear error when it has no
    completed trials."""
    from search.studydir.reader import front_frame, read_study

    if not study.record.evaluations():
        raise ConfirmError(f"{study.directory}: the study has no completed trials; run `python -m search.study run` "
                           "first")
    data = read_study(study)
    front = front_frame(data)
    front = front[front["mask"] != data.dense_mask] if not front.empty else front
    if front.empty:
        raise ConfirmError(f"{study.directory}: the study's front holds no pruned mask scored on held-out text")
    return front, data.size_metric


def pick_candidates(front: pd.DataFrame, size: str, *, top_k: int, budgets: list[float]) -> list[Candidate]:
    """Per budget, the front mask with the lowest held-out perplexity removing at least that fraction;
    without budgets, the ``top_k`` front masks with the lowest held-out perplexity."""

    def row_to(row, why: str) -> Candidate:
        return Candidate(row["mask"], str(row["strategy"]), float(row["removed_fraction"]), float(row[size]),
                         float(row[PRIMARY_COLUMN]), why)

    if not budgets:
        best = front.sort_values(PRIMARY_COLUMN, kind="stable").head(top_k)
        return [row_to(row, f"front, held-out ppl rank {i + 1}") for i, (_, row) in enumerate(best.iterrows())]
    picked: dict[str, Candidate] = {}
    for budget in budgets:
        meets = front[front["removed_fraction"] >= budget - 1e-9]
        if meets.empty:
            most = front["removed_fraction"].max()
            raise ConfirmError(f"--budgets {budget:g}: no front mask removes >= {budget:.0%} of {size} "
                               f"(the front reaches {most:.1%})")
        row = meets.sort_values(PRIMARY_COLUMN, kind="stable").iloc[0]
        picked.setdefault(row["mask"], row_to(row, f"budget {budget:g}"))
    return list(picked.values())


def read_masks(path: Path, num_layers: int) -> list[Candidate]:
    """Candidates from a CSV with columns ``target`` (fraction removed) and ``mask``, optionally ``strategy``
    (a study's ``recommended.csv``); every bad row named at once. Repeated masks are confirmed once."""
    if not path.is_file():
        raise ConfirmError(f"--masks {path}: no such file")
    try:
        frame = pd.read_csv(path, dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as error:
        raise ConfirmError(f"--masks {path}: not a readable CSV ({type(error).__name__}: "
                           f"{str(error).strip().splitlines()[0] if str(error).strip() else 'empty'})") from None
    missing = [c for c in ("target", "mask") if c not in frame.columns]
    if missing or frame.empty:
        why = f"needs the columns target and mask (it has: {', '.join(frame.columns) or 'none'})" if missing \
            else "has no rows"
        raise ConfirmError(f"--masks {path}: {why}")
    candidates, problems = {}, []
    for line, row in zip(range(2, len(frame) + 2), frame.to_dict("records")):
        try:
            cand = _csv_candidate(row, num_layers, f"{path.name} line {line}")
        except (UserError, ValueError) as error:
            problems.append(f"line {line}: {error}")
            continue
        candidates.setdefault(cand.mask, cand)
    if problems:
        raise ConfirmError(f"--masks {path}: " + "; ".join(problems))
    return list(candidates.values())


def _csv_candidate(row: dict, num_layers: int, why: str) -> Candidate:
    from surgery.mask import KeepMask

    try:
        target = float(row["target"])
    except ValueError:
        raise ValueError(f"target {row['target']!r} is not a number") from None
    if not 0.0 < target < 1.0:
        raise ValueError(f"target {row['target']!r} is not a fraction in (0, 1)")
    mask = str(KeepMask.parse(row["mask"], num_layers))
    return Candidate(mask, row.get("strategy") or "csv", target, float("nan"), float("nan"), why)
