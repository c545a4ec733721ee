"""Search strategies on the bundled stories260k (5 layers, 1024 masks) with real SQLite Optuna storage.

The default tests use 4 x 64 calibration tokens and tight budget targets (few feasible masks) to stay fast;
``-m slow`` runs every strategy at targets 0.1..0.5 on 8 x 128 tokens and prints each one's optimality gap.
"""

from __future__ import annotations

import itertools

import optuna
import pytest

from objectives.calibration import BatchSpec, TextSource, token_batch
from objectives.proxy import angular_distances, block_influence
from search.strategies import STRATEGIES, StrategySettingsError
from surgery.mask import KeepMask
from tests.strategy_runs import make_context, make_scorer, run_strategy

OWN = ("greedy_finercut", "blockpruner", "sleb", "gromov", "shortgpt", "shortened_llama", "evolutionary",
       "tpe", "random", "nsga2", "exhaustive")
CHEAP = {"evolutionary": {"generations": 2, "offspring": 4}, "tpe": {"n_trials": 3}, "random": {"n_trials": 3},
         "nsga2": {"n_trials": 3, "population_size": 2}}


def brute_force(scorer, costs, targets):
    """Plain reference: score every mask that meets a target, keep the best per target."""
    values = {}
    for bits in itertools.product((True, False), repeat=2 * scorer.num_layers):
        mask = KeepMask(bits)
        if any(costs.feasible(mask, t) for t in targets):
            values[mask] = scorer.score(mask)
    return {t: min((m for m in values if costs.feasible(m, t)), key=values.get) for t in targets}, values


@pytest.fixture(scope="module")
def scored(stories, stories_ids):
    return make_scorer(stories, stories_ids)


def test_exhaustive_is_the_true_optimum_and_warm_starts_tpe(tmp_path, scored):
    scorer, costs = scored
    targets = (0.7, 0.8)
    ctx = make_context(tmp_path, scorer, costs, targets)
    _, run, found = run_strategy(ctx, "exhaustive")
    reference, values = brute_force(scorer, costs, targets)
    assert found == reference
    assert run.evaluations == len(values) == 31  # masks removing >= 70% of parameters
    assert len(ctx.study.trials) == 31
    # TPE warm-started from the study: the exhaustive optimum is enqueued first and comes back as its answer
    _, tpe_run, tpe_found = run_strategy(ctx, "tpe", n_trials=2, warm_start=1)
    assert tpe_found == reference
    assert tpe_run.forwards == 0  # every mask it tried was already evaluated


def test_exhaustive_refuses_a_large_space(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.5,))
    with pytest.raises(StrategySettingsError, match=r"2\^10 = 1024 masks.*'max_masks' = 512"):
        run_strategy(ctx, "exhaustive", max_masks=512)
    assert ctx.study.trials == []


@pytest.mark.parametrize(
    "name, settings, key",
    [("exhaustive", {"max_masks": 0}, "max_masks"), ("greedy_finercut", {"kinds": "heads"}, "kinds"),
     ("greedy_finercut", {"exclude_front": 1.5}, "exclude_front"), ("evolutionary", {"offspring": 0}, "offspring"),
     ("tpe", {"n_trials": "many"}, "n_trials"), ("nsga2", {"population_size": 1}, "population_size"),
     ("gromov", {"last_token_only": "yes"}, "last_token_only"), ("sleb", {"kinds": "attn"}, "kinds")],
)
def test_bad_settings_name_the_setting(name, settings, key):
    with pytest.raises(StrategySettingsError, match=key):
        STRATEGIES.get(name).from_settings(settings)


def test_greedy_finercut_matches_a_plain_reference_loop(tmp_path, scored):
    scorer, costs = scored
    targets = (0.1, 0.2)
    strategy, run, found = run_strategy(make_context(tmp_path, scorer, costs, targets), "greedy_finercut")
    mask, order, path = KeepMask.dense(5), [], [KeepMask.dense(5)]
    while not costs.feasible(mask, max(targets)):
        candidates = [i for i in range(10) if mask.bits[i]]
        scores = [scorer.score(mask.without(i)) for i in candidates]
        best = candidates[scores.index(min(scores))]
        order.append(best)
        mask = mask.without(best)
        path.append(mask)
    assert [unit[0] for unit in strategy.order] == order
    assert found == {t: next(m for m in path if costs.feasible(m, t)) for t in targets}
    assert run.evaluations == sum(10 - step for step in range(len(order))) + len(targets)


def test_greedy_options_restrict_candidates(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.1, 0.3))
    front, _, found = run_strategy(ctx, "greedy_finercut", exclude_front=0.4)
    assert all(index >= 4 for unit in front.order for index in unit)  # layers 0 and 1 never removed
    attn, run, found = run_strategy(ctx, "greedy_finercut", kinds="attn")
    assert all(index % 2 == 0 for unit in attn.order for index in unit)
    assert found[0.3] is None  # all 5 attention sublayers are 23.8% of the parameters
    assert any("no mask for target 0.3" in note for note in run.notes)


def test_every_strategy_returns_feasible_recorded_masks(tmp_path, scored):
    scorer, costs = scored
    targets = (0.25,)
    ctx = make_context(tmp_path, scorer, costs, targets)
    for name in OWN[:-1]:
        strategy, run, found = run_strategy(ctx, name, **CHEAP.get(name, {}))
        assert set(found) == set(targets), name
        if hasattr(strategy, "expected_evaluations"):
            assert run.evaluations <= strategy.expected_evaluations(ctx), name
        recorded = {t.user_attrs["mask"] for t in ctx.study.trials if t.user_attrs["strategy"] == name}
        for target, mask in found.items():
            assert mask is not None and ctx.feasible(mask, target), (name, target, mask)
            assert str(mask) in recorded, (name, mask)
        if name == "sleb":
            assert all(m.whole_layers_only for m in found.values())
        if name == "gromov":
            hidden = scorer.hidden_states()
            distances = angular_distances(hidden, 2).tolist()  # 2 layers are the fewest that remove 25%
            start = distances.index(min(distances))
            assert found[0.25] == KeepMask.from_layers(5, [start, start + 1])
        if name == "shortgpt":
            influence = block_influence(scorer.hidden_states())
            assert found[0.25] == KeepMask.from_layers(5, influence.argsort()[:2].tolist())


def test_same_seed_same_results_and_small_spaces_end(tmp_path, scored):
    scorer, costs = scored
    targets = (0.8, 0.85)  # 6 masks, then 1 mask, meet these
    outcomes = []
    for copy in range(2):
        ctx = make_context(tmp_path, scorer, costs, targets, name=f"depthsearch{copy}", seed=3)
        _, evo_run, evo = run_strategy(ctx, "evolutionary", generations=1000)
        _, _, tpe = run_strategy(ctx, "tpe", n_trials=4, warm_start=0)
        _, _, nsga = run_strategy(ctx, "nsga2", n_trials=4, population_size=2, warm_start=0)
        outcomes.append((evo, tpe, nsga, [t.params for t in ctx.study.trials]))
        assert evo_run.evaluations <= 6 + 1  # the space ran out: no endless loop
        assert evo[0.85] == KeepMask.parse("--,--,--,--,--")  # the only mask removing 85%
    assert outcomes[0] == outcomes[1]


def test_optuna_working_study_resumes(tmp_path, scored):
    scorer, costs = scored
    ctx = make_context(tmp_path, scorer, costs, (0.7,))
    run_strategy(ctx, "random", n_trials=4)
    working = optuna.load_study(study_name="depthsearch:random:0.7", storage=ctx.record.storage)
    assert len(working.trials) == 4
    _, run, _ = run_strategy(make_context(tmp_path, scorer, costs, (0.7,)), "random", n_trials=6)
    assert len(working.trials) == 6  # two more, not six
    infeasible = [t for t in working.trials if t.constraints["budget"] > 0]
    assert all(t.value == 1e9 for t in infeasible)


def test_evolutionary_reaches_the_exhaustive_optimum_on_a_small_budget(tmp_path, scored):
    scorer, costs = scored
    targets = (0.7, 0.8)
    reference, _ = brute_force(scorer, costs, targets)
    _, run, found = run_strategy(make_context(tmp_path, scorer, costs, targets), "evolutionary")
    assert found == reference
    assert run.evaluations < 31 + 6


@pytest.mark.slow
def test_optimality_gaps_at_targets_10_to_50_percent(tmp_path, stories, text_path):
    """Every strategy vs exhaustive: params targets 0.1..0.5, KL, 8 x 128 tokens of tinystories_valid[0:0.8]."""
    source = TextSource(files=(str(text_path),), end=0.8)
    ids = token_batch(BatchSpec(source, num_sequences=8, seq_len=128, seed=0), stories[1])
    scorer, costs = make_scorer(stories, ids)
    targets = (0.1, 0.2, 0.3, 0.4, 0.5)
    _, _, optimum = run_strategy(make_context(tmp_path, scorer, costs, targets, name="exhaustive"), "exhaustive")
    best = {t: scorer.score(m) for t, m in optimum.items()}
    hits = {}
    for name in OWN[:-1]:
        ctx = make_context(tmp_path, scorer, costs, targets, name=name)  # own study: no warm start
        _, run, found = run_strategy(ctx, name)
        gaps = {t: None if m is None else ctx.values[str(m)] - best[t] for t, m in found.items()}
        hits[name] = sum(g is not None and g <= 1e-9 for g in gaps.values())
        print(f"{name:16s} evaluations {run.evaluations:4d} optimal {hits[name]}/5 "
              + " ".join(f"{t:g}:{'-' if g is None else f'{g:.4f}'}" for t, g in gaps.items()))
    assert hits["evolutionary"] >= 3 and hits["tpe"] >= 3
