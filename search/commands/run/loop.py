"""The strategy loop: each strategy of the config run once into the study (skipped when its record says done),
with a progress bar fed by a polling thread, and its results and counters stored as its ``StrategyRecord``."""

from __future__ import annotations

import threading

from tqdm.auto import tqdm

from search.evaluation.context import SearchContext
from search.stored import StrategyRecord


def _poll(bar, run, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        bar.n = run.evaluations
        bar.refresh()


def _search_with_progress(strategy, run, tag: str, total, progress: bool) -> dict:
    """``strategy.search(run)`` while a thread shows the run's evaluation count."""
    bar = tqdm(total=total, desc=tag, unit="eval", disable=not progress, leave=False)
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(bar, run, stop), daemon=True)
    poller.start()
    try:
        return strategy.search(run)
    finally:
        stop.set()
        poller.join()
        bar.close()


def run_strategy(ctx: SearchContext, entry, *, progress: bool = True) -> StrategyRecord:
    """Run one strategy entry unless the study marks it done; store its results and counters."""
    from search.strategies import STRATEGIES

    record = ctx.record.strategy_record(entry.tag)
    if record is not None and record.done:
        return record
    strategy = STRATEGIES.get(entry.name).from_settings(dict(entry.settings))
    run = ctx.strategy_run(entry.tag, selection_only=strategy.selection_only)
    strategy.note_objective(run)
    results = _search_with_progress(strategy, run, entry.tag, strategy.expected_evaluations(ctx), progress)
    record = StrategyRecord(
        name=entry.name,
        settings=dict(entry.settings),
        done=True,
        results={format(t, "g"): (str(m) if m is not None else None) for t, m in sorted(results.items())},
        evaluations=run.evaluations,
        forwards=run.forwards,
        wall_s=round(run.wall_s, 3),
        notes=list(run.notes),
    )
    ctx.record.set_strategy_record(entry.tag, record)
    return record
