"""The contract every registered strategy meets, on the bundled stories260k (5 layers) with a journal-file study.

Parametrized over ``STRATEGIES.names()``: a new strategy is tested without editing this file (its settings
default to ``{}``; ``SETTINGS`` only makes the slow ones small). Per strategy: every result meets its budget
target (or is None with a note naming the target), every mask scored on the full calibration set is a trial
recorded under the strategy and none is scored twice, the evaluations stay within ``expected_evaluations``, the
same seed gives the same results and trials, and a re-run on the same study evaluates nothing. Strategies that
declare ``selection_only`` find the same masks with exact racing.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import pytest

from objectives.budgets import BUDGETS
from objectives.proxy import OBJECTIVES
from objectives.scorer import MaskScorer
from search.evaluation.context import StrategyRun
from search.evaluation.engine import PrefixEngine
from search.strategies import STRATEGIES, Strategy, StrategySettingsError
from surgery.mask import KeepMask
from surgery.masking import masker_for
from tests.strategy_runs import make_context, run_strategy

NAMES = STRATEGIES.names()
SETTINGS = {  # small settings for the costly strategies; any other strategy runs with its defaults
    "evolutionary": {"generations": 3, "offspring": 4},
    "learned": {"steps": 5, "batch": 2, "samples": 16, "candidates": 2, "progress": False},
    "tpe": {"n_trials": 16},
    "random": {"n_trials": 16},
    "nsga2": {"n_trials": 16, "population_size": 4},
}
TARGETS = (0.7, 0.8)  # params removed: 31 masks meet 0.7, so exhaustive search stays cheap
SEED = 3


class RecordingScorer(MaskScorer):
    """The real scorer; notes every mask it scores on the full calibration set (what an evaluation is)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.full: list[str] = []

    def score(self, mask: KeepMask, sequences: int | None = None) -> float:
        if sequences is None or sequences >= len(self.input_ids):
            self.full.append(str(mask))
        return super().score(mask, sequences)


@dataclass
class Outcome:
    strategy: Strategy
    run: StrategyRun
    results: dict
    scored: list[str]  # masks scored on the full calibration set during the run, in order
    trials: list[tuple[str, float]]  # (mask, objective) of the run's trials in the main study, in order


@pytest.fixture(scope="module")
def scored(stories, stories_ids):
    model, _ = stories
    masker_for(model).restore()
    return RecordingScorer(model, stories_ids, "kl"), BUDGETS.get("params")(model)


def observe(scored, storage: Path, name: str, tag: str | None = None, **context) -> Outcome:
    """One run of strategy ``name`` (recorded under ``tag``, default the name) on the study in the journal file
    ``storage`` (created or resumed); ``context``: SearchContext options."""
    scorer, costs = scored
    ctx = make_context(storage, scorer, costs, TARGETS, seed=SEED, **context)
    scorer.full.clear()
    strategy, run, results = run_strategy(ctx, name, tag=tag, **SETTINGS.get(name, {}))
    trials = [(t.user_attrs["mask"], t.values[0]) for t in ctx.study.get_trials() if t.user_attrs["strategy"] == run.strategy]
    return Outcome(strategy, run, results, list(scorer.full), trials)


@pytest.fixture(scope="module", params=NAMES)
def first(request, scored, tmp_path_factory) -> tuple[str, Path, Outcome]:
    """Each registered strategy's first run: (name, its study's journal file, outcome)."""
    storage = tmp_path_factory.mktemp(request.param) / "study.log"
    return request.param, storage, observe(scored, storage, request.param)


def test_declarations(first):
    name, _, outcome = first
    cls = type(outcome.strategy)
    assert issubclass(cls, Strategy) and cls.name == name and not inspect.isabstract(cls)
    assert inspect.signature(cls.search).parameters["run"].annotation == "StrategyRun"
    assert isinstance(cls.selection_only, bool) and isinstance(cls.seed_method, bool)
    assert cls.own_objective is None or cls.own_objective in OBJECTIVES
    with pytest.raises(StrategySettingsError, match=rf"'{name}'.*no_such_setting"):
        cls.from_settings({"no_such_setting": 1})


def test_a_strategy_without_search_cannot_be_made():
    class Nothing(Strategy):
        pass

    with pytest.raises(TypeError, match="abstract"):
        Nothing()


def test_every_result_meets_its_budget(first, scored):
    name, _, outcome = first
    _, costs = scored
    assert set(outcome.results) == set(TARGETS), name
    for target, mask in outcome.results.items():
        if mask is None:
            assert any(f"{target:g}" in note for note in outcome.run.notes), (name, target, outcome.run.notes)
        else:
            assert outcome.run.ctx.feasible(mask, target), (name, target, mask)
            assert costs.removed_fraction(mask) >= target - 1e-9


def test_every_evaluated_mask_is_a_recorded_trial(first):
    name, _, outcome = first
    recorded = [mask for mask, _ in outcome.trials]
    assert outcome.scored or all(mask is None for mask in outcome.results.values()), name
    assert len(set(outcome.scored)) == len(outcome.scored), f"{name} scored a mask twice"
    assert set(outcome.scored) <= set(recorded), name
    assert len(set(recorded)) == len(recorded), f"{name} recorded a mask twice"
    assert {str(m) for m in outcome.results.values() if m is not None} <= set(recorded), name
    expected = outcome.strategy.expected_evaluations(outcome.run.ctx)
    assert len(outcome.scored) <= outcome.run.evaluations <= (expected if expected is not None else float("inf")), name


def test_same_seed_same_results(first, scored, tmp_path):
    name, _, outcome = first
    again = observe(scored, tmp_path / "other.log", name)  # a fresh study, the same seed
    assert again.results == outcome.results, name
    assert again.trials == outcome.trials, name


def test_rerun_evaluates_nothing_again(first, scored):
    name, storage, outcome = first
    again = observe(scored, storage, name)  # the same study, resumed
    assert again.scored == [], name
    assert again.results == outcome.results, name
    assert again.trials == outcome.trials, name


@pytest.mark.parametrize("name", [n for n in NAMES if STRATEGIES.get(n).selection_only])
def test_selection_only_strategies_keep_their_results_under_racing(name, scored, tmp_path):
    scorer, _ = scored
    plain = observe(scored, tmp_path / "plain.log", name)
    raced = observe(scored, tmp_path / "raced.log", name, tag=f"{name}-label", evaluator=PrefixEngine(scorer),
                         racing=True)
    assert raced.run.selection_only  # declared by the class, whatever the label
    assert raced.results == plain.results, name
    assert set(raced.trials) <= set(plain.trials), name  # racing only leaves masks unfinished
