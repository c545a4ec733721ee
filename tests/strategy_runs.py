"""Running a strategy in a test as the ``run`` command does: a SearchContext over a real scorer and a real Optuna
storage, then one strategy run on it (settings through ``from_settings``, ``selection_only`` from its class)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from objectives.budgets import BUDGETS, CostTable
from objectives.scorer import MaskScorer
from search.evaluation.context import SearchContext, StrategyRun
from search.record import MAIN_STUDY, StudyRecord
from search.storage import open_storage
from search.strategies import STRATEGIES, Strategy
from surgery.mask import KeepMask
from surgery.masking import masker_for


def make_scorer(stories, ids, objective: str = "kl", **options) -> tuple[MaskScorer, CostTable]:
    """(scorer, parameter costs) of the session's stories260k model, made dense first."""
    model, _ = stories
    masker_for(model).restore()
    costs = BUDGETS.get("params")(model)  # built on the dense model
    return MaskScorer(model, ids, objective, **options), costs


def make_context(storage: str | Path | None, scorer: MaskScorer, costs: CostTable, targets: Iterable[float], *,
                 name: str = MAIN_STUDY, seed: int = 0, **options) -> SearchContext:
    """A context whose study ``name`` is in ``storage``: a folder (its SQLite file ``study.db``), a journal file
    ending ``.log``, an Optuna URL, or None (in memory); ``options``: other SearchContext fields."""
    record = StudyRecord(_storage(storage), name=name)
    return SearchContext(scorer=scorer, costs=costs, targets=tuple(targets), record=record, seed=seed, **options)


def _storage(storage: str | Path | None):
    if storage is None or "://" in str(storage):
        return storage
    path = Path(storage)
    return open_storage(str(path)) if path.suffix == ".log" else f"sqlite:///{path / 'study.db'}"


def run_strategy(ctx: SearchContext, name: str, *, tag: str | None = None, **settings
                 ) -> tuple[Strategy, StrategyRun, dict[float, KeepMask | None]]:
    """(strategy, its run, its results) of strategy ``name`` with ``settings``, recorded under ``tag`` (default:
    the name)."""
    strategy = STRATEGIES.get(name).from_settings(settings)
    run = ctx.strategy_run(tag or name, selection_only=strategy.selection_only)
    return strategy, run, strategy.search(run)
