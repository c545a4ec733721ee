"""Repair-aware scoring (``engine.repair: linear``), cross-fitted: every mask's objective is that of its linearly
repaired model, the repair fitted on the calibration batch's first ``repair_sequences`` sequences and the mask scored
on the others only -- exactly ``fit_linear_repair`` on the fit sequences + ``folded`` + plain scoring on the scored
ones, in the plain loop, the prefix engine and the strategies; the split is part of the fingerprint, the plan and
the summary, and a split that leaves nothing to score is refused."""

from __future__ import annotations

import random

import pytest
import torch

from objectives.calibration import BatchSpec, TextSource, token_batch
from objectives.scorer import MaskScorer
from search.config import EngineSection, load_config
from search.evaluation.workers import build_scorer
from search.evaluation.engine import PlainBackend, PrefixEngine
from search.studydir.fingerprint import fingerprint_problems, repair_identity
from search.study import main as study_main
from surgery.mask import KeepMask
from surgery.repair import fit_linear_repair, folded, removed_runs
from tests.search.test_study_cli import TEXT, study_config, write_config
from tests.strategy_runs import make_context, make_scorer, run_strategy

FIT = 3  # calibration sequences each repair is fitted on (the batch's first), never scored
SCORED = 4  # the batch's other sequences, which masks are scored on: two micro-batches of 2


@pytest.fixture
def ids(stories) -> torch.Tensor:
    """FIT + SCORED calibration sequences of 64 tokens (non-overlapping windows of the bundled text)."""
    source = TextSource(files=(str(TEXT),), end=0.8)
    return token_batch(BatchSpec(source, num_sequences=FIT + SCORED, seq_len=64, seed=0), stories[1])


def _masks(num_layers: int) -> list[KeepMask]:
    """A greedy step's candidates after removing A1 and M3, random masks with several runs, duplicates."""
    rng = random.Random(0)
    parent = KeepMask.dense(num_layers).without(2).without(7)
    masks = [parent.without(i) for i in parent.kept]
    masks += [KeepMask(tuple(rng.random() < 0.6 for _ in range(2 * num_layers))) for _ in range(8)]
    return masks + [parent, masks[0], KeepMask.dense(num_layers)]


def _expected(model, plain: MaskScorer, ids, mask: KeepMask, sequences: int | None = None) -> float:
    """The definition: the mask's repair fitted on the first FIT sequences, folded, scored by the plain loop on the
    other sequences (``plain`` scores ``ids[FIT:]``)."""
    with folded(model, fit_linear_repair(model, mask, ids[:FIT])):
        return plain.score(mask, sequences=sequences)


def _close(a: list[float], b: list[float], tol: float = 1e-5) -> bool:
    return all(abs(x - y) <= tol * max(abs(y), 1e-6) for x, y in zip(a, b, strict=True))


@pytest.fixture
def scorers(stories, ids):
    """(repair-aware scorer on the whole batch, plain scorer on its scored part) of stories260k, micro-batches of 2."""
    aware, _ = make_scorer(stories, ids, "kl", batch_size=2, repair="linear", repair_sequences=FIT)
    plain = MaskScorer(stories[0], ids[FIT:], "kl", batch_size=2)
    return aware, plain


def test_the_batch_is_split_into_fit_and_scored_sequences(stories, ids, scorers):
    aware, plain = scorers
    assert torch.equal(aware.repair_ids, ids[:FIT]) and torch.equal(aware.input_ids, ids[FIT:])
    assert torch.equal(aware.reference.logp, plain.reference.logp)  # the dense reference of the scored sequences
    with pytest.raises(ValueError, match="must be less than the calibration sequences"):
        MaskScorer(stories[0], ids[:FIT], "kl", repair="linear", repair_sequences=FIT)
    unsplit = MaskScorer(stories[0], ids, "kl", repair_sequences=FIT)  # without repair nothing is held back
    assert unsplit.repair_ids is None and torch.equal(unsplit.input_ids, ids)


def test_plain_loop_scores_the_repaired_model(stories, ids, scorers):
    aware, plain = scorers
    model = stories[0]
    masks = _masks(aware.num_layers)
    expected = [_expected(model, plain, ids, m) for m in masks]
    assert _close(PlainBackend(aware).score_many(masks), expected)
    assert _close([aware.score(m, sequences=2) for m in masks[:5]],
                  [_expected(model, plain, ids, m, sequences=2) for m in masks[:5]])
    assert aware.score(KeepMask.dense(aware.num_layers)) == plain.score(KeepMask.dense(aware.num_layers))
    ridged = MaskScorer(model, ids, "kl", batch_size=2, repair="linear", repair_sequences=FIT, repair_ridge=0.5)
    with folded(model, fit_linear_repair(model, masks[0], ids[:FIT], ridge=0.5)):
        by_definition = plain.score(masks[0])
    assert _close([ridged.score(masks[0])], [by_definition])  # the scorer fits with its ridge
    assert not _close([ridged.score(masks[0])], [aware.score(masks[0])], tol=1e-3)
    # cross-fitted: scoring on the fit sequences themselves (in-sample) gives other values
    with folded(model, fit_linear_repair(model, masks[0], ids[:FIT])):
        in_sample = MaskScorer(model, ids[:FIT], "kl", batch_size=2).score(masks[0])
    assert abs(in_sample - expected[0]) > 1e-3 * expected[0]
    repaired = [m for m in masks if removed_runs(m)]
    assert any(abs(aware.score(m) - plain.score(m)) > 1e-3 * plain.score(m) for m in repaired)  # repair matters
    weights = {n: p.clone() for n, p in model.named_parameters()}
    aware.score(masks[0])
    assert all((p == weights[n]).all() for n, p in model.named_parameters())  # no fold left behind


def test_engine_reuses_only_unrepaired_prefixes_and_matches_the_definition(stories, ids, scorers):
    aware, plain = scorers
    model = stories[0]
    masks = _masks(aware.num_layers)
    expected = [_expected(model, plain, ids, m) for m in masks]
    engine = PrefixEngine(aware)
    assert _close(engine.score_many(masks), expected)
    # a second greedy step reuses cached prefix states across batches; still the definition
    child = masks[3]
    step = [child.without(i) for i in child.kept]
    assert _close(engine.score_many(step), [_expected(model, plain, ids, m) for m in step])
    assert engine.cache.hits > 0
    # staged partial scores and racing
    assert _close(PrefixEngine(aware).score_many(masks[:6], sequences=2),
                  [_expected(model, plain, ids, m, sequences=2) for m in masks[:6]])
    raced = PrefixEngine(aware).race(step)
    best = min(range(len(step)), key=lambda i: raced[i])
    full = [_expected(model, plain, ids, m) for m in step]
    assert abs(raced[best] - min(full)) <= 1e-5 * min(full)
    # the fits were kept: the engine fitted each distinct mask once at most
    assert aware.repair_fits <= len({m.bits for m in masks + step if removed_runs(m)})


@pytest.mark.parametrize("name,settings", [
    ("greedy_finercut", {}),
    ("evolutionary", {"generations": 2, "offspring": 4, "survivors": 2, "stage_sequences": 2, "seed": 0}),
])
def test_strategies_search_on_repaired_scores(stories, ids, name, settings):
    aware, costs = make_scorer(stories, ids, "kl", batch_size=2, repair="linear", repair_sequences=FIT)
    plain = MaskScorer(stories[0], ids[FIT:], "kl", batch_size=2)
    ctx = make_context(None, aware, costs, [0.3], evaluator=PrefixEngine(aware))
    _, run, results = run_strategy(ctx, name, **settings)
    mask = results[0.3]
    assert mask is not None and ctx.feasible(mask, 0.3)
    assert _close([ctx.values[str(mask)]], [_expected(stories[0], plain, ids, mask)])
    assert aware.repair_fits > 0


def test_config_fingerprint_plan_and_summary(tmp_path, capsys):
    assert EngineSection().repair == "none"
    assert EngineSection(repair="linear", repair_sequences=4).repair_sequences == 4
    with pytest.raises(Exception):
        EngineSection(repair="lora")
    base = study_config(tmp_path / "out", strategies=[{"name": "greedy_finercut"}], budget={"targets": [0.4]},
                        calibration={"num_sequences": 4})
    aware = {**base, "engine": {"repair": "linear", "repair_sequences": 2}}
    config = write_config(tmp_path / "aware.yaml", aware)
    worker = build_scorer(load_config(config))  # what process-pool and Ray workers score with
    assert (worker.repair, worker.repair_sequences, len(worker.repair_ids), len(worker.input_ids)) == ("linear", 2, 2, 2)
    assert study_main(["run", str(config), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "repair-aware scoring: every mask scored after its linear repair, fitted on the first 2 calibration " \
           "sequences (ridge 0.1) and scored on the other 2" in " ".join(out.split())
    assert study_main(["run", str(config), "--no-progress"]) == 0
    summary = " ".join((tmp_path / "out" / "summary.md").read_text().split())
    assert "Repair-aware scoring" in summary and "sequences (ridge 0.1) and scored on the others only" in summary
    capsys.readouterr()
    # a split that leaves no sequence to score: one config message, exit 2, before any model is loaded
    for fit in (4, 5):
        bad = write_config(tmp_path / "bad.yaml", {**base, "engine": {"repair": "linear", "repair_sequences": fit}})
        assert study_main(["run", str(bad), "--dry-run"]) == 2
        assert f"engine.repair_sequences: {fit} leaves none of the 4 calibration sequences" in capsys.readouterr().err
    # resuming the same study without repair-aware scoring (or with another fit/score split or ridge) is refused
    for engine in ({}, {"repair": "linear", "repair_sequences": 1},
                   {"repair": "linear", "repair_sequences": 2, "repair_ridge": 0.5}):
        other = write_config(tmp_path / "other.yaml", {**base, "engine": engine})
        assert study_main(["run", str(other), "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert "other settings" in err and "repair" in err


def test_fingerprint_entry_is_absent_without_repair():
    class Config:
        engine = EngineSection()

    assert repair_identity(Config) == {}
    Config.engine = EngineSection(repair="linear", repair_sequences=3)
    assert repair_identity(Config) == {"repair": {"method": "linear", "fit_sequences": 3, "cross_fitted": True,
                                                  "ridge": 0.1}}
    in_sample = {"repair": {"method": "linear", "sequences": 3}}  # a study of the earlier, in-sample scoring
    assert fingerprint_problems({"version": 3, "seed": 0, **in_sample},
                                {"version": 3, "seed": 0, **repair_identity(Config)}, "x")
    assert fingerprint_problems({"version": 3, "seed": 0}, {"version": 3, "seed": 0, **repair_identity(Config)}, "x")
