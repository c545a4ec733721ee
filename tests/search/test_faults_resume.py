"""Exact resume of the Optuna samplers: a run stopped inside a trial (the trial left RUNNING, as by SIGKILL or
SIGTERM) and re-run gives the same trials, in the same order, with the same values as an uninterrupted run."""

from __future__ import annotations

import signal

import optuna
import pytest

from search.record import PENALTY
from surgery.cli import Interrupted, run_cli
from tests.strategy_runs import make_context, make_scorer, run_strategy

SETTINGS = {
    "tpe": {"n_trials": 9, "n_startup_trials": 3, "warm_start": 2, "seed": 0},
    "random": {"n_trials": 6, "warm_start": 2},
    "nsga2": {"n_trials": 9, "population_size": 3, "warm_start": 2},
}
TARGETS = (0.3, 0.5)


@pytest.fixture(scope="module")
def scored(stories, stories_ids):
    return make_scorer(stories, stories_ids)


def _seeded(tmp_path, scorer, costs, name: str):
    """A context whose main study already holds a few masks (so warm starts enqueue trials)."""
    ctx = make_context(tmp_path, scorer, costs, TARGETS, name=name)
    run_strategy(ctx, "shortgpt")
    return ctx


def _working(ctx) -> list[tuple]:
    rows = []
    for name in ctx.record.study_names():
        if name.startswith(f"{ctx.study.study_name}:"):
            study = optuna.load_study(study_name=name, storage=ctx.record.storage)
            rows += [(name, t.number, t.state.name, tuple(sorted(t.params.items())),
                      tuple(t.values or ())) for t in study.get_trials(deepcopy=False)]
    return sorted(rows)


def _main(ctx) -> list[tuple]:
    return [(t.user_attrs["strategy"], t.user_attrs["mask"], t.values[0]) for t in ctx.study.get_trials(deepcopy=False)]


def _interrupt_after(scorer, calls: int):
    """Fault injection: the scorer's ``calls``-th evaluation raises Interrupted (what SIGTERM does mid-trial)."""
    original, count = scorer.score, [0]

    def score(*args, **kwargs):
        count[0] += 1
        if count[0] == calls:
            raise Interrupted(signal.SIGTERM)
        return original(*args, **kwargs)

    scorer.score = score
    return lambda: scorer.__dict__.pop("score")


@pytest.mark.parametrize("strategy, stop_at", [
    pytest.param("tpe", 2, marks=pytest.mark.slow), ("tpe", 7), ("random", 4),  # during warm start / after it
    pytest.param("nsga2", 3, marks=pytest.mark.slow), ("nsga2", 5),
])
def test_interrupted_sampler_resumes_exactly(tmp_path, scored, strategy, stop_at):
    scorer, costs = scored
    reference = _seeded(tmp_path, scorer, costs, "reference")
    _, _, expected = run_strategy(reference, strategy, **SETTINGS[strategy])

    stopped = _seeded(tmp_path, scorer, costs, "stopped")
    restore = _interrupt_after(scorer, stop_at)
    try:
        with pytest.raises(Interrupted):
            run_strategy(stopped, strategy, **SETTINGS[strategy])
    finally:
        restore()
    assert any(row[2] == "RUNNING" for row in _working(stopped))  # the kill left a trial in flight

    resumed = make_context(tmp_path, scorer, costs, TARGETS, name="stopped")  # as a new process would
    _, _, found = run_strategy(resumed, strategy, **SETTINGS[strategy])
    assert found == expected
    rename = lambda rows: [(r[0].replace("stopped", "reference"), *r[1:]) for r in rows]  # noqa: E731
    assert rename(_working(resumed)) == _working(reference)  # same trials, numbers, params and values
    assert all(row[2] == "COMPLETE" for row in _working(resumed))  # none left RUNNING
    assert _main(resumed) == _main(reference)


def test_signal_inside_optunas_trial_bookkeeping_exits_as_interrupted_and_resumes(tmp_path, scored, monkeypatch,
                                                                                    capsys):
    """A signal landing while Optuna records a trial's result: Optuna's ``finally`` replaces our exception with an
    ``UnboundLocalError``; the command still exits 128 + SIGTERM with its one message, and a re-run is exact."""
    scorer, costs = scored
    reference = _seeded(tmp_path, scorer, costs, "reference")
    _, _, expected = run_strategy(reference, "tpe", **SETTINGS["tpe"])

    stopped = _seeded(tmp_path, scorer, costs, "stopped")
    original, count = optuna.storages.RDBStorage.set_trial_state_values, [0]

    def set_state(self, trial_id, state, values=None):
        count[0] += 1
        if count[0] == 4 and state.is_finished():
            raise Interrupted(signal.SIGTERM)
        return original(self, trial_id, state, values)

    monkeypatch.setattr(optuna.storages.RDBStorage, "set_trial_state_values", set_state)
    assert run_cli(lambda: run_strategy(stopped, "tpe", **SETTINGS["tpe"])) == 128 + signal.SIGTERM
    assert capsys.readouterr().err.startswith("interrupted by SIGTERM")
    monkeypatch.undo()

    resumed = make_context(tmp_path, scorer, costs, TARGETS, name="stopped")
    assert run_strategy(resumed, "tpe", **SETTINGS["tpe"])[2] == expected
    assert all(row[2] == "COMPLETE" for row in _working(resumed))


def test_penalised_trials_are_counted_like_any_other(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.7,))
    run_strategy(ctx, "random", n_trials=5, warm_start=0)
    working = optuna.load_study(study_name="depthsearch:random:0.7", storage=ctx.record.storage)
    values = [t.value for t in working.get_trials(deepcopy=False)]
    assert len(values) == 5 and PENALTY in values  # over-budget masks are trials too (not re-run on resume)
