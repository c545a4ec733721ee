"""The fast engine gives the plain loop's numbers (every family), counts its savings, and plugs into StrategyRun."""

from __future__ import annotations

import math
import random

import pytest
import torch

from objectives.budgets import sublayer_costs
from objectives.scorer import MaskScorer
from search.config import EngineSection
from search.evaluation.context import SearchContext
from search.evaluation.engine import PlainBackend, PrefixEngine, Staging, make_scoring_backend, staged_survivors
from search.evaluation.evaluator import Evaluator
from surgery.mask import KeepMask
from tests.families import input_ids
from tests.strategy_runs import make_context


def _masks(num_layers: int, seed: int = 0, count: int = 10) -> list[KeepMask]:
    """Random masks plus a greedy step's candidates (one more sublayer removed from a parent)."""
    rng = random.Random(seed)
    masks = [KeepMask(tuple(rng.random() < 0.7 for _ in range(2 * num_layers))) for _ in range(count)]
    parent = KeepMask.dense(num_layers).without(1)
    return masks + [parent.without(i) for i in parent.kept] + [parent, masks[0]]  # duplicates on purpose


def _relative(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a, b))


@pytest.mark.parametrize("objective", ["kl", "js", "ppl"])
def test_engine_equals_plain_scorer_on_every_family(case, tiny, objective):
    model = tiny(case)
    scorer = MaskScorer(model, input_ids(batch=3, seq=10), objective, batch_size=2)
    masks = _masks(scorer.num_layers, seed=len(case.name))
    plain = [scorer.score(m) for m in masks]
    engine, before = PrefixEngine(scorer), scorer.masker.current
    assert _relative(engine.score_many(masks), plain) < 1e-6
    first_two = [scorer.score(m, sequences=2) for m in masks]
    assert _relative(engine.score_many(masks, sequences=2), first_two) < 1e-6
    assert scorer.masker.current == before  # the model is left as found


def test_engine_is_bit_exact_and_halves_greedy_sublayer_work(stories, stories_ids):
    model, _ = stories
    scorer = MaskScorer(model, stories_ids, "js", batch_size=2)
    parent = KeepMask.parse("AM,A-,AM,AM,AM")
    candidates = [parent.without(i) for i in parent.kept]
    plain, engine = PlainBackend(scorer), PrefixEngine(scorer)
    assert engine.score_many(candidates) == plain.score_many(candidates)  # bit for bit
    # n = 9 kept sublayers: plain computes 8 per candidate, the engine each candidate from the previous
    # candidate's removed sublayer on (sorted order): n(n-1)/2 + (n-1) sublayers, a ratio of 1/2 + 1/n
    assert plain.counters.sublayer_forwards == 9 * 8 * 4
    assert engine.counters.sublayer_forwards == (9 * 8 // 2 + 8) * 4
    assert engine.counters.captures == 2  # one dense forward per micro-batch, done once


def test_staged_chunks_are_reused_by_the_full_evaluation(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    engine = PrefixEngine(scorer)
    masks = [KeepMask.dense(5).without(i) for i in range(10)]
    engine.score_many(masks, sequences=2)
    before = engine.counters.sublayer_forwards
    full = engine.score_many(masks[:3])
    assert full == [scorer.score(m) for m in masks[:3]]
    # the first micro-batch (sequences 0-1) comes from the staged pass: only sequences 2-3 are computed now
    assert 0 < engine.counters.sublayer_forwards - before <= sum(len(m.kept) for m in masks[:3]) * 2


def _context(scorer: MaskScorer, **options) -> SearchContext:
    return make_context(None, scorer, sublayer_costs(scorer.model), (0.2,), **options)


def _trials(ctx: SearchContext) -> list[tuple[str, float, str]]:
    return [(t.user_attrs["mask"], t.values[0], t.user_attrs["strategy"]) for t in ctx.study.trials]


def test_strategy_run_with_engine_records_the_plain_trials(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    masks = _masks(5, seed=3)
    plain_ctx = _context(scorer)
    plain_values = plain_ctx.strategy_run("s").evaluate_many(masks)
    fast_ctx = _context(scorer, evaluator=make_scoring_backend(scorer, prefix_reuse=True))
    run = fast_ctx.strategy_run("s")
    assert run.evaluate_many(masks) == plain_values
    assert _trials(fast_ctx) == _trials(plain_ctx)
    assert run.partial_many(masks[:3], 2) == [scorer.score(m, sequences=2) for m in masks[:3]]
    assert run.forwards == 4 * len(set(masks))  # the partial scores reuse the first micro-batch's sums


def test_staged_selection_keeps_the_best_and_marks_the_rest_inf(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    candidates = [KeepMask.dense(5).without(i) for i in range(10)]
    ctx = _context(scorer, evaluator=PrefixEngine(scorer), staging=Staging(sequences=2, keep=3))
    values = ctx.strategy_run("greedy_finercut", selection_only=True).evaluate_many(candidates)
    partial = [scorer.score(m, sequences=2) for m in candidates]
    survivors = staged_survivors(partial, 3)
    assert [i for i, v in enumerate(values) if math.isfinite(v)] == survivors
    assert [values[i] for i in survivors] == [scorer.score(candidates[i]) for i in survivors]
    assert len(ctx.study.trials) == 3  # only full evaluations are trials
    other = _context(scorer, evaluator=PrefixEngine(scorer), staging=Staging(2, 3))
    assert all(math.isfinite(v) for v in other.strategy_run("exhaustive").evaluate_many(candidates))  # not selecting


def test_selection_comes_from_the_strategy_class_and_the_config_overrides_it(stories, stories_ids):
    from search.strategies import STRATEGIES

    scorer = MaskScorer(stories[0], stories_ids, "kl", batch_size=2)
    greedy, exhaustive = (STRATEGIES.get(n).selection_only for n in ("greedy_finercut", "exhaustive"))
    assert greedy and not exhaustive
    declared = _context(scorer, staging=Staging(2, 3))
    assert declared.strategy_run("greedy-js", selection_only=greedy)._selects()  # any label keeps the class's
    assert not declared.strategy_run("exhaustive", selection_only=exhaustive)._selects()
    listed = _context(scorer, staging=Staging(2, 3), select_strategies=("exhaustive",))  # the config's override
    assert listed.strategy_run("exhaustive")._selects()
    assert not listed.strategy_run("greedy-js", selection_only=greedy)._selects()
    everything = _context(scorer, staging=Staging(2, 3), select_strategies=())
    assert everything.strategy_run("tpe")._selects()
    assert EngineSection().select_strategies is None


@pytest.mark.parametrize("objective", ["js", "ppl"])
def test_racing_finds_the_plain_best_with_less_work(stories, stories_ids, objective):
    scorer = MaskScorer(stories[0], stories_ids, objective, batch_size=1)
    parent = KeepMask.parse("AM,A-,AM,AM,AM")
    candidates = [parent.without(i) for i in parent.kept]
    plain = [scorer.score(m) for m in candidates]
    engine = PrefixEngine(scorer)
    raced = engine.race(candidates)
    best = min(range(len(plain)), key=plain.__getitem__)
    assert min(range(len(raced)), key=raced.__getitem__) == best and raced[best] == plain[best]
    assert all(r == p for r, p in zip(raced, plain) if math.isfinite(r))
    assert sum(map(math.isfinite, raced)) < len(candidates)  # some candidates were never finished
    ctx = _context(scorer, evaluator=PrefixEngine(scorer), racing=True)
    run = ctx.strategy_run("greedy_finercut", selection_only=True)
    assert run.evaluate_many(candidates) == raced
    assert run.forwards < 4 * len(candidates)  # sequences forwarded (head passes), fewer than the plain loop's
    assert len(ctx.study.trials) == sum(map(math.isfinite, raced))


def test_the_plain_loop_is_an_evaluator_that_does_not_race(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "js", batch_size=2)
    parent = KeepMask.parse("AM,A-,AM,AM,AM")
    candidates = [parent.without(i) for i in parent.kept]
    plain, engine = PlainBackend(scorer), PrefixEngine(scorer)
    assert isinstance(plain, Evaluator) and isinstance(engine, Evaluator)
    assert (plain.races, engine.races) == (False, True)
    assert plain.race(candidates) == [scorer.score(m) for m in candidates]  # every mask finished
    ctx = _context(scorer, evaluator=plain, racing=True)  # racing asked for: the plain path, every mask recorded
    run = ctx.strategy_run("greedy_finercut", selection_only=True)
    assert run.evaluate_many(candidates) == plain.race(candidates)
    assert len(ctx.study.trials) == len(candidates) and run.forwards == 4 * len(candidates)
    plain.close()
    with pytest.raises(TypeError, match="abstract"):
        Evaluator()


def test_engine_section_defaults_are_exact():
    section = EngineSection()
    assert (section.prefix_reuse, section.staged, section.stage_sequences, section.stage_keep) == (True, False, 2, 4)
    with pytest.raises(ValueError):
        EngineSection(stage_keep=0)
    with pytest.raises(ValueError):
        Staging(sequences=0)


def test_state_cache_resumes_the_next_greedy_step_from_the_previous_candidates(stories, stories_ids):
    scorer = MaskScorer(stories[0], stories_ids, "js", batch_size=2)
    cached, uncached = PrefixEngine(scorer), PrefixEngine(scorer, state_cache_mb=0)
    parent = KeepMask.parse("AM,A-,AM,AM,AM")
    step1 = [parent.without(i) for i in parent.kept]
    assert cached.score_many(step1) == uncached.score_many(step1)
    assert cached.counters.sublayer_forwards == uncached.counters.sublayer_forwards
    chosen = parent.without(6)  # layer 3's attention: candidates removing an earlier sublayer resume from there
    step2 = [chosen.without(i) for i in chosen.kept]
    before = cached.counters.sublayer_forwards, uncached.counters.sublayer_forwards
    values = cached.score_many(step2)
    assert values == uncached.score_many(step2) == PlainBackend(scorer).score_many(step2)  # bit for bit
    saved = (uncached.counters.sublayer_forwards - before[1]) - (cached.counters.sublayer_forwards - before[0])
    assert saved > 0 and cached.cache.hits > 0
    assert 0 < cached.cache.bytes <= cached.cache.limit_bytes


def test_state_cache_stays_within_its_byte_limit():
    from search.evaluation.engine import StateCache

    cache = StateCache(limit_bytes=3 * 4 * 10)
    for i in range(5):
        cache.put(((0, 1), (True,) * i), torch.zeros(10))
    assert cache.bytes == 120 and len(cache) == 3
    assert [cache.get(((0, 1), (True,) * i)) is not None for i in range(5)] == [False, False, True, True, True]
    assert cache.get(((1, 1), (True,) * 4)) is None  # another micro-batch
