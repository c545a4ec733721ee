"""``run``: validate a study config, run every strategy into one Optuna study, score held-out text, report.

Everything that can be checked is checked before anything is written (:mod:`.plan`): the config (file, key and
value of each problem, all at once), the device, storage and output directory, then what needs the model and the
stored study's fingerprint. Only then is the directory created and locked (:mod:`search.studydir`). The strategies
run one after another (:mod:`.loop`), the validation candidates are scored (:mod:`search.selection`), then held-out
text (:mod:`.heldout`), and the report is written from the record the run holds. Re-running the same command
resumes: strategies marked done are skipped, evaluated masks come back from the storage, held-out perplexities are
cached in the study's user attrs.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from tqdm.auto import tqdm

from objectives.budgets import CostTable
from search.commands.run.heldout import heldout_scores
from search.commands.run.loop import run_strategy
from search.commands.run.plan import (
    Prepared, build_cost, describe_plan, environment_problems, measured_names, prepare, probe, save_config_copy,
)
from search.config import (
    ConfigError, StudyConfig, config_problems, format_problems, load_config, model_source,
)
from search import studydir
from search.storage import storage_url
from search.evaluation.context import SearchContext
from search.record import PRIMARY_COLUMN, StudyInUseError, StudyRecord, open_record, strategy_problems
from search.selection import finish_on_validation
from search.stored import StudyMeta
from search.studydir.report import write_report
from search.writers import writer_claim, writer_problem

COMMAND = "python -m search.study run"


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.output_dir is not None:
        config.output_dir = args.output_dir
    if args.storage is not None:
        config.storage = args.storage
    problems = config_problems(config) + environment_problems(config)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
    if args.dry_run:
        return dry_run(config)
    return execute(config, progress=not args.no_progress)


def dry_run(config: StudyConfig) -> int:
    """Every check ``run`` makes before it writes, except those that need the weights: print the plan and what
    was not checked."""
    from surgery.load import resolve_device

    prepared = probe(config)
    current = studydir.fingerprint(config, resolve_device(config.model.device).type)
    check_stored_study(config, storage_url(config.storage, config.output_dir), current)
    print(describe_plan(config, prepared))
    return 0


def execute(config: StudyConfig, *, progress: bool = True) -> int:
    """Check everything that needs the model and the stored study, then (only then) write: create the directory,
    take its lock, copy the config, run the strategies, score held-out text, report."""
    from surgery.cli import load_checked

    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    probed = probe(config)  # local models: budgets and text checked before any weight is read
    name = model_source(config)[0]
    model, tokenizer = load_checked(name, dtype=config.model.dtype, device=config.model.device,
                                    trust_remote_code=config.model.trust_remote_code,
                                    flag="model.trust_remote_code: true")
    prepared = prepare(config, model, tokenizer, name, text=probed)
    out = Path(config.output_dir)
    url = storage_url(config.storage, out)
    current = studydir.fingerprint(config, next(model.parameters()).device.type)
    check_stored_study(config, url, current)
    created = studydir.make_dirs(out)
    try:
        with studydir.StudyLock(out, COMMAND):
            record = open_record(url, create=True, name=config.study_name)
            with writer_claim(record, COMMAND, str(out.resolve())):
                studydir.check_resume(record, current, out, config.source, url)  # again: another run may have started it
                problems = strategy_problems(record, config.strategies)
                if problems:
                    raise ConfigError(format_problems(config.source, problems))
                save_config_copy(config, out)
                study = studydir.Study(out, config, url, record)
                return _search(study, model, prepared, current, progress=progress)
    except BaseException:
        studydir.remove_if_empty(created)
        raise


def check_stored_study(config: StudyConfig, url: str, current: dict) -> None:
    """Read only, before anything is written: a study already stored under this name is undamaged, made with the
    same settings (fingerprint, strategy tags) and written by no other live run."""
    stored = open_record(url, create=False, name=config.study_name)
    if stored is not None:
        stored.check_stored()
    studydir.check_resume(stored, current, Path(config.output_dir), config.source, url)
    problems = strategy_problems(stored, config.strategies)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
    busy = writer_problem(url, config.study_name)
    if busy:
        raise StudyInUseError(busy)


def _store_meta(config: StudyConfig, ctx: SearchContext, costs: dict[str, CostTable], fingerprint: dict) -> None:
    """The study's ``StudyMeta``: the dense objective is scored once (kept from an earlier run), the rest restated."""
    stored = ctx.record.meta()
    kept = stored.model_extra if stored is not None else {}
    dense = stored.dense_objective if stored is not None else None
    ctx.record.set_meta(StudyMeta(
        **kept,
        dense_objective=ctx.scorer.score(ctx.dense()) if dense is None else dense,
        fingerprint=fingerprint,
        model=config.model.name,
        objective=config.objective,
        budget_metric=config.budget.metric,
        targets=list(config.budget.targets),
        num_layers=ctx.num_layers,
        dense={name: table.dense for name, table in costs.items()},
        units={name: table.unit for name, table in costs.items()},
        strategies=[entry.tag for entry in config.strategies],
    ))


def _context(config: StudyConfig, record: StudyRecord, model, prepared: Prepared) -> SearchContext:
    """The search context: the calibration scorer, the budget and other costs, the record and the evaluator."""
    from objectives.scorer import MaskScorer
    from search.evaluation.executors import context_options
    from search.evaluation.workers import scorer_repair

    torch.manual_seed(config.seed)
    scorer = MaskScorer(model, prepared.calibration, config.objective,
                        batch_size=config.reference.batch_size, topk=config.reference.topk, **scorer_repair(config))
    costs = prepared.costs
    return SearchContext(
        scorer=scorer, costs=costs[config.budget.metric], targets=tuple(config.budget.targets), record=record,
        seed=config.seed, extra_costs=tuple(t for n, t in costs.items() if n != config.budget.metric),
        constraints=tuple((costs[n], kept) for n, kept in config.budget.constraints.items()),
        **context_options(config, scorer),
    )


def _search(study: studydir.Study, model, prepared: Prepared, fingerprint: dict, *, progress: bool) -> int:
    config, record, out = study.config, study.record, study.directory
    prepared.costs.update({n: build_cost(n, model, config, study_dir=out) for n in measured_names(prepared.costs)})
    ctx = _context(config, record, model, prepared)
    _store_meta(config, ctx, prepared.costs, fingerprint)
    outer = tqdm(config.strategies, desc="strategies", unit="strategy", disable=not progress)
    results = []
    for entry in outer:
        outer.set_postfix_str(entry.tag)
        results.append(run_strategy(ctx, entry, progress=progress))
    pool = finish_on_validation(ctx, config, model, prepared.validation, results, progress=progress)
    batches = {PRIMARY_COLUMN: prepared.heldout, **prepared.extra_heldout}
    heldout_scores(record, config, model, batches, results, progress=progress, more=pool)
    paths = write_report(study, quiet=True)
    trials = len(record.evaluations())
    print(f"done: {trials} trials from {len(results)} strategies; report {paths['summary']}, "
          f"front {paths['front']}, plots {paths['pareto_png']}; storage {study.url}")
    return 0
