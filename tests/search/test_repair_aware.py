"""Repair-aware scoring (``engine.repair: linear``): every mask's objective is that of its linearly repaired model,
exactly ``fit_linear_repair`` + ``folded`` + plain scoring, in the plain loop, the prefix engine and the
strategies; the setting is part of the fingerprint, the plan and the summary."""

from __future__ import annotations

import random

import pytest

from objectives.scorer import MaskScorer
from search.config import EngineSection, load_config
from search.evaluation.workers import build_scorer
from search.evaluation.engine import PlainBackend, PrefixEngine
from search.studydir.fingerprint import fingerprint_problems, repair_identity
from search.study import main as study_main
from surgery.mask import KeepMask
from surgery.repair import fit_linear_repair, folded, removed_runs
from tests.search.test_study_cli import study_config, write_config
from tests.strategy_runs import make_context, make_scorer, run_strategy

FIT = 3  # calibration sequences each repair is fitted on (of the 4 in stories_ids)


def _masks(num_layers: int) -> list[KeepMask]:
    """A greedy step's candidates after removing A1 and M3, random masks with several runs, duplicates."""
    rng = random.Random(0)
    parent = KeepMask.dense(num_layers).without(2).without(7)
    masks = [parent.without(i) for i in parent.kept]
    masks += [KeepMask(tuple(rng.random() < 0.6 for _ in range(2 * num_layers))) for _ in range(8)]
    return masks + [parent, masks[0], KeepMask.dense(num_layers)]


def _expected(model, plain: MaskScorer, ids, mask: KeepMask, sequences: int | None = None) -> float:
    """The definition: the mask's repair fitted on the first FIT sequences, folded, scored by the plain loop."""
    with folded(model, fit_linear_repair(model, mask, ids[:FIT])):
        return plain.score(mask, sequences=sequences)


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol * max(abs(y), 1e-6) for x, y in zip(a, b, strict=True))


@pytest.fixture
def scorers(stories, stories_ids):
    """(repair-aware scorer, plain scorer) of stories260k on the same batch, micro-batches of 2."""
    aware, _ = make_scorer(stories, stories_ids, "kl", batch_size=2, repair="linear", repair_sequences=FIT)
    plain = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    return aware, plain


def test_plain_loop_scores_the_repaired_model(stories, stories_ids, scorers):
    aware, plain = scorers
    model = stories[0]
    masks = _masks(aware.num_layers)
    expected = [_expected(model, plain, stories_ids, m) for m in masks]
    assert _close(PlainBackend(aware).score_many(masks), expected)
    assert _close([aware.score(m, sequences=2) for m in masks[:5]],
                  [_expected(model, plain, stories_ids, m, sequences=2) for m in masks[:5]])
    assert aware.score(KeepMask.dense(aware.num_layers)) == plain.score(KeepMask.dense(aware.num_layers))
    repaired = [m for m in masks if removed_runs(m)]
    assert any(abs(aware.score(m) - plain.score(m)) > 1e-3 * plain.score(m) for m in repaired)  # repair matters
    weights = {n: p.clone() for n, p in model.named_parameters()}
    aware.score(masks[0])
    assert all((p == weights[n]).all() for n, p in model.named_parameters())  # no fold left behind


def test_engine_reuses_only_unrepaired_prefixes_and_matches_the_definition(stories, stories_ids, scorers):
    aware, plain = scorers
    model = stories[0]
    masks = _masks(aware.num_layers)
    expected = [_expected(model, plain, stories_ids, m) for m in masks]
    engine = PrefixEngine(aware)
    assert _close(engine.score_many(masks), expected)
    # a second greedy step reuses cached prefix states across batches; still the definition
    child = masks[3]
    step = [child.without(i) for i in child.kept]
    assert _close(engine.score_many(step), [_expected(model, plain, stories_ids, m) for m in step])
    assert engine.cache.hits > 0
    # staged partial scores and racing
    assert _close(PrefixEngine(aware).score_many(masks[:6], sequences=2),
                  [_expected(model, plain, stories_ids, m, sequences=2) for m in masks[:6]])
    raced = PrefixEngine(aware).race(step)
    best = min(range(len(step)), key=lambda i: raced[i])
    full = [_expected(model, plain, stories_ids, m) for m in step]
    assert abs(raced[best] - min(full)) <= 1e-5 * min(full)
    # the fits were kept: the engine fitted each distinct mask once at most
    assert aware.repair_fits <= len({m.bits for m in masks + step if removed_runs(m)})


@pytest.mark.parametrize("name,settings", [
    ("greedy_finercut", {}),
    ("evolutionary", {"generations": 2, "offspring": 4, "survivors": 2, "stage_sequences": 2, "seed": 0}),
])
def test_strategies_search_on_repaired_scores(stories, stories_ids, name, settings):
    aware, costs = make_scorer(stories, stories_ids, "kl", batch_size=2, repair="linear", repair_sequences=FIT)
    plain = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    ctx = make_context(None, aware, costs, [0.3], evaluator=PrefixEngine(aware))
    _, run, results = run_strategy(ctx, name, **settings)
    mask = results[0.3]
    assert mask is not None and ctx.feasible(mask, 0.3)
    assert _close([ctx.values[str(mask)]], [_expected(stories[0], plain, stories_ids, mask)])
    assert aware.repair_fits > 0


def test_config_fingerprint_plan_and_summary(tmp_path, capsys):
    assert EngineSection().repair == "none"
    assert EngineSection(repair="linear", repair_sequences=4).repair_sequences == 4
    with pytest.raises(Exception):
        EngineSection(repair="lora")
    base = study_config(tmp_path / "out", strategies=[{"name": "greedy_finercut"}], budget={"targets": [0.4]})
    aware = {**base, "engine": {"repair": "linear", "repair_sequences": 2}}
    config = write_config(tmp_path / "aware.yaml", aware)
    worker = build_scorer(load_config(config))  # what process-pool and Ray workers score with
    assert (worker.repair, worker.repair_sequences) == ("linear", 2)
    assert study_main(["run", str(config), "--dry-run"]) == 0
    assert "repair-aware scoring: every mask scored after its linear repair" in capsys.readouterr().out
    assert study_main(["run", str(config), "--no-progress"]) == 0
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "Repair-aware scoring" in summary
    capsys.readouterr()
    # resuming the same study without repair-aware scoring (or with another fit size) is refused
    for engine in ({}, {"repair": "linear", "repair_sequences": 1}):
        other = write_config(tmp_path / "other.yaml", {**base, "engine": engine})
        assert study_main(["run", str(other), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and "repair" in err


def test_fingerprint_entry_is_absent_without_repair():
    class Config:
        engine = EngineSection()

    assert repair_identity(Config) == {}
    Config.engine = EngineSection(repair="linear", repair_sequences=3)
    assert repair_identity(Config) == {"repair": {"method": "linear", "sequences": 3}}
    assert fingerprint_problems({"version": 3, "seed": 0}, {"version": 3, "seed": 0, **repair_identity(Config)}, "x")
