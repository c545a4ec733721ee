"""Cost-aware strategies and warm-started learned gates on the bundled stories260k (real SQLite storage)."""

from __future__ import annotations

import pytest

from surgery.mask import KeepMask

from tests.strategy_runs import make_context, make_scorer, run_strategy


@pytest.fixture(scope="module")
def scored(stories, stories_ids):
    return make_scorer(stories, stories_ids)


def per_cost_path(scorer, costs, target: float) -> list[KeepMask]:
    """Plain reference: remove the sublayer of least (objective increase / parameters saved) until ``target``."""
    mask, value = KeepMask.dense(scorer.num_layers), scorer.score(KeepMask.dense(scorer.num_layers))
    path = [mask]
    while not costs.feasible(mask, target):
        options = [(scorer.score(mask.without(i)), i) for i in mask.kept]
        score, index = min(((v - value) / costs.per_sublayer[i], i) for v, i in options)
        value = next(v for v, i in options if i == index)
        mask = mask.without(index)
        path.append(mask)
    return path


def test_greedy_per_cost_ranks_by_damage_per_parameter(tmp_path, scored):
    scorer, costs = scored
    target = 0.3
    strategy, run, found = run_strategy(make_context(tmp_path, scorer, costs, (target,)), "greedy_per_cost")
    path = per_cost_path(scorer, costs, target)
    assert [unit[0] for unit in strategy.order] == [i for a, b in zip(path, path[1:]) for i in a.kept if not b.bits[i]]
    first = path[-1]
    assert costs.feasible(found[target], target)
    assert set(found[target].removed) <= set(first.removed)  # the refill only re-adds sublayers
    assert costs.cost(found[target]) >= costs.cost(first)
    assert not any(costs.feasible(found[target].with_kept(i), target) for i in found[target].removed)


def test_greedy_per_cost_beats_the_cost_blind_greedy_here(tmp_path, scored):
    scorer, costs = scored
    targets = (0.2, 0.3, 0.4)
    ctx = make_context(tmp_path, scorer, costs, targets)
    _, _, blind = run_strategy(ctx, "greedy_finercut")
    _, _, aware = run_strategy(ctx, "greedy_per_cost")
    assert all(scorer.score(aware[t]) <= scorer.score(blind[t]) + 1e-9 for t in targets)
    assert sum(scorer.score(aware[t]) < scorer.score(blind[t]) - 1e-6 for t in targets) >= 2


def test_staged_greedy_per_cost_records_only_finalists(tmp_path, scored):
    scorer, costs = scored
    strategy, run, found = run_strategy(make_context(tmp_path, scorer, costs, (0.3,)), "greedy_per_cost",
                                        stage_sequences=1, stage_keep=2)
    steps = len(strategy.order)
    assert run.evaluations <= 1 + 2 * steps + 1 + 10  # dense, 2 finalists a step, the target mask, the refill
    assert costs.feasible(found[0.3], 0.3)


def test_oneshot_per_cost_follows_single_removal_scores(tmp_path, scored):
    scorer, costs = scored
    strategy, run, found = run_strategy(make_context(tmp_path, scorer, costs, (0.2,)), "oneshot_per_cost")
    dense = scorer.score(KeepMask.dense(5))
    expected = [(scorer.score(KeepMask.from_removed(5, (i,))) - dense) / costs.per_sublayer[i] for i in range(10)]
    assert strategy.scores == pytest.approx(expected)
    assert costs.feasible(found[0.2], 0.2)


def test_learned_init_study_starts_from_the_best_known_mask(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.3,))
    _, _, greedy = run_strategy(ctx, "greedy_per_cost")
    strategy, run, found = run_strategy(ctx, "learned", init="study", steps=2, batch=2, candidates=2, samples=8,
                                        progress=False)
    assert f"learned target 0.3: starts from {greedy[0.3]}, found by greedy_per_cost" in run.notes
    assert scorer.score(found[0.3]) <= scorer.score(greedy[0.3]) + 1e-9  # the start mask is among the roundings
    assert costs.feasible(found[0.3], 0.3)


def test_evolutionary_init_study_starts_from_the_best_known_mask(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.3,))
    _, _, greedy = run_strategy(ctx, "greedy_per_cost")
    _, run, found = run_strategy(ctx, "evolutionary", init="study", generations=2, offspring=3, seed=0)
    assert f"evolutionary target 0.3: starts from {greedy[0.3]}, found by greedy_per_cost" in run.notes
    assert scorer.score(found[0.3]) <= scorer.score(greedy[0.3]) + 1e-9  # elitist: never worse than its start
    assert costs.feasible(found[0.3], 0.3)
    progress = [n for n in run.notes if n.startswith("evolutionary target 0.3: objective ")]
    assert len(progress) == 1 and " generation(s), " in progress[0]  # start -> end value and this target's time
    start, end = (float(v) for v in progress[0].split("objective ")[1].split(" in ")[0].split(" -> "))
    assert end <= start and abs(end - scorer.score(found[0.3])) <= 1e-3 * max(1.0, end)
