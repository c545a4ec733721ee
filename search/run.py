"""``run``: validate a study config, run every strategy into one Optuna study, score held-out text, report.

Everything that can be checked is checked before anything is written: the config (file, key and value of
each problem, all at once), then what needs the model (budget feasibility, enough text, held-out text that
differs from the calibration text). Re-running the same command resumes: strategies marked done are skipped,
evaluated masks come back from the storage, held-out perplexities are cached in the study's user attrs.
"""

from __future__ import annotations

import argparse
import inspect
import threading
from dataclasses import dataclass
from pathlib import Path

import optuna
import torch
import yaml
from tqdm.auto import tqdm

from objectives.budgets import BUDGETS, BudgetError, CostTable
from objectives.calibration import DataError, token_batch
from search.config import (
    ConfigError,
    StudyConfig,
    check_config,
    format_problems,
    load_config,
    model_source,
    open_storage,
    storage_url,
    text_source,
)
from search.context import MAIN_STUDY, SearchContext
from search.report import atomic_write_text, write_report
from surgery.mask import KeepMask

CONFIG_COPY = "config.yaml"
STRATEGY_ATTR = "strategy:"  # study user attr prefix: one record per strategy tag


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="study YAML (see studies/)")
    parser.add_argument("--dry-run", action="store_true", help="validate and print the plan; load no weights")
    parser.add_argument("--output-dir", help="override the config's output_dir")
    parser.add_argument("--storage", help="override the config's Optuna storage (URL, or a journal file *.log)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def main(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.output_dir:
        config.output_dir = args.output_dir
    if args.storage:
        config.storage = args.storage
    check_config(config)
    if args.dry_run:
        print(describe_plan(config, _probe(config)))
        return 0
    return execute(config, progress=not args.no_progress)


# validation that needs the model ---------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the model-dependent checks produce: cost tables and the two token batches."""

    costs: dict[str, CostTable]
    calibration: torch.Tensor | None = None
    heldout: torch.Tensor | None = None


def budget_names(config: StudyConfig) -> list[str]:
    """The budget metric first, then every other cheap budget and the constrained ones (recorded on trials)."""
    names = [config.budget.metric, *config.budget.constraints]
    names += [n for n in BUDGETS.names() if not n.startswith("latency")]
    return list(dict.fromkeys(names))


def build_cost(name: str, model, config: StudyConfig) -> CostTable:
    builder = BUDGETS.get(name)
    if "settings" in inspect.signature(builder).parameters:  # measured budgets: profile kept in the study dir
        study_dir = config.output_dir if Path(config.output_dir).is_dir() else None
        return builder(model, settings=dict(config.latency), study_dir=study_dir)
    return builder(model)


def _budget_problems(config: StudyConfig, costs: dict[str, CostTable]) -> list[str]:
    problems = []
    table = costs.get(config.budget.metric)
    for i, target in enumerate(config.budget.targets if table else ()):
        try:
            table.limit(target)
        except BudgetError as error:
            problems.append(f"budget.targets.{i}: {error} (got {target})")
    for name, kept in config.budget.constraints.items():
        if name in costs and costs[name].fixed > kept * costs[name].dense + 1e-9:
            floor = costs[name].fixed / costs[name].dense
            problems.append(f"budget.constraints.{name}: no mask keeps at most {kept:.1%} (the floor is {floor:.1%}) (got {kept})")
    return problems


def _text_problems(config: StudyConfig, tokenizer, prepared: Prepared) -> list[str]:
    problems = []
    for key in ("calibration", "heldout"):
        try:
            setattr(prepared, key, token_batch(text_source(config, getattr(config, key)), tokenizer))
        except DataError as error:
            problems.append(f"{key}: {error}")
    cal, held = prepared.calibration, prepared.heldout
    if cal is not None and held is not None and cal.shape[1] == held.shape[1]:
        same = int((held[:, None, :] == cal[None, :, :]).all(-1).any(-1).sum())
        if same:
            problems.append(f"heldout: {same} of {len(held)} held-out sequences equal calibration sequences; use other text")
    return problems


def prepare(config: StudyConfig, model, tokenizer, *, skip_latency: bool = False) -> Prepared:
    """Cost tables and token batches; every model-dependent problem raised at once as a ConfigError."""
    names = [n for n in budget_names(config) if not (skip_latency and n.startswith("latency"))]
    prepared = Prepared({name: build_cost(name, model, config) for name in names})
    problems = _budget_problems(config, prepared.costs) + _text_problems(config, tokenizer, prepared)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
    return prepared


def _probe(config: StudyConfig) -> Prepared | None:
    """Dry run: for a local model, build it on the meta device from its config (no weights) and check."""
    name, local = model_source(config)
    if not local:
        return None
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    model_config = AutoConfig.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=config.model.trust_remote_code)
    model = model.to(getattr(torch, config.model.dtype))
    tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=config.model.trust_remote_code)
    return prepare(config, model, tokenizer, skip_latency=True)


def describe_plan(config: StudyConfig, prepared: Prepared | None) -> str:
    name, local = model_source(config)
    out = Path(config.output_dir)
    lines = [f"study {config.source}: valid", f"  model: {name} ({'local' if local else 'hub id, not loaded'})"]
    for key in ("calibration", "heldout"):
        spec = text_source(config, getattr(config, key))
        lines.append(f"  {key}: {spec.source.describe()}, {spec.num_sequences} x {spec.seq_len} tokens, seed {spec.seed}")
    lines.append(f"  objective: {config.objective}; budget: {config.budget.metric}, targets removed {config.budget.targets}")
    if prepared is not None:
        table = prepared.costs[config.budget.metric]
        layers = len(table.per_sublayer) // 2
        lines.append(f"  dense {table.name}: {table.dense:g} {table.unit}; {layers} layers, 2^{2 * layers} masks")
        lines += [f"    target {t:.0%}: {table.name} <= {table.limit(t):g}" for t in config.budget.targets]
    for entry in config.strategies:
        lines.append(f"  strategy {entry.tag}: {entry.name} {entry.settings or ''}".rstrip())
    lines.append(f"  storage: {storage_url(config.storage, out)}")
    lines.append(f"  output: {out}" + (" (exists: re-running resumes it)" if out.exists() else ""))
    return "\n".join(lines)


# storage and study -----------------------------------------------------------------------------------------
def open_study(url: str) -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(
        study_name=MAIN_STUDY, storage=open_storage(url), directions=["minimize", "minimize"], load_if_exists=True
    )


def fingerprint(config: StudyConfig) -> dict:
    """What stored objective values depend on: a study resumed with another of these would mix numbers."""
    spec = text_source(config, config.calibration)
    return {
        "model": config.model.name,
        "dtype": config.model.dtype,
        "objective": config.objective,
        "calibration": [spec.source.describe(), spec.num_sequences, spec.seq_len, spec.seed],
        "topk": config.reference.topk,
        "budget": config.budget.metric,
    }


def _check_resume(study: optuna.Study, config: StudyConfig) -> None:
    stored = study.user_attrs.get("meta", {}).get("fingerprint")
    current = fingerprint(config)
    if stored is not None and stored != current:
        diff = [f"{k}: stored {stored.get(k)!r}, config {v!r}" for k, v in current.items() if stored.get(k) != v]
        raise ConfigError(f"{config.output_dir} holds a study made with other settings ({'; '.join(diff)}); "
                          "use another output_dir")


def save_config_copy(config: StudyConfig, out: Path) -> Path:
    """The config with local paths made absolute, so report/export work from the study directory alone."""
    data = config.model_dump(mode="json")
    name, local = model_source(config)
    data["model"]["name"] = str(Path(name).resolve()) if local else name
    for key in ("calibration", "heldout"):
        data[key]["files"] = list(text_source(config, getattr(config, key)).source.files)
    return atomic_write_text(out / CONFIG_COPY, yaml.safe_dump(data, sort_keys=False))


# running ---------------------------------------------------------------------------------------------------
def _poll(bar, run, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        bar.n = run.evaluations
        bar.refresh()


def run_strategy(ctx: SearchContext, entry, *, progress: bool = True) -> dict:
    """Run one strategy entry unless the study marks it done; store its results and counters."""
    from search.strategies import STRATEGIES

    key = STRATEGY_ATTR + entry.tag
    record = ctx.study.user_attrs.get(key)
    if record and record.get("done"):
        return record
    strategy = STRATEGIES.get(entry.name).from_settings(dict(entry.settings))
    run = ctx.strategy_run(entry.tag)
    expected = getattr(strategy, "expected_evaluations", None)
    total = expected(ctx) if callable(expected) else None
    bar = tqdm(total=total, desc=entry.tag, unit="eval", disable=not progress, leave=False)
    stop = threading.Event()
    poller = threading.Thread(target=_poll, args=(bar, run, stop), daemon=True)
    poller.start()
    try:
        results = strategy.search(run)
    finally:
        stop.set()
        poller.join()
        bar.close()
    record = {
        "name": entry.name,
        "settings": dict(entry.settings),
        "done": True,
        "results": {format(t, "g"): (str(m) if m is not None else None) for t, m in sorted(results.items())},
        "evaluations": run.evaluations,
        "forwards": run.forwards,
        "wall_s": round(run.wall_s, 3),
        "notes": list(run.notes),
    }
    ctx.study.set_user_attr(key, record)
    return record


def _heldout_masks(study: optuna.Study, records: list[dict], num_layers: int) -> list[str]:
    masks = {str(KeepMask.dense(num_layers))}
    for record in records:
        masks.update(m for m in record["results"].values() if m)
    masks.update(trial.user_attrs["mask"] for trial in study.best_trials if "mask" in trial.user_attrs)
    return sorted(masks)


def heldout_scores(study: optuna.Study, config: StudyConfig, model, ids: torch.Tensor, records, *, progress=True):
    """Held-out perplexity of every strategy result, the calibration front and the dense model (cached)."""
    from objectives.scorer import MaskScorer

    spec = text_source(config, config.heldout)
    key = [spec.source.describe(), spec.num_sequences, spec.seq_len, spec.seed]
    cache = study.user_attrs.get("heldout") or {}
    if cache.get("spec") != key:
        cache = {"spec": key, "ppl": {}}
    todo = [m for m in _heldout_masks(study, records, study.user_attrs["meta"]["num_layers"]) if m not in cache["ppl"]]
    if todo:
        scorer = MaskScorer(model, ids, "ppl", batch_size=config.reference.batch_size)
        for mask in tqdm(todo, desc="held-out ppl", unit="mask", disable=not progress, leave=False):
            cache["ppl"][mask] = scorer.score(KeepMask.parse(mask))
            study.set_user_attr("heldout", cache)
    return cache["ppl"]


def _store_meta(study: optuna.Study, config: StudyConfig, ctx: SearchContext, costs: dict[str, CostTable]) -> None:
    meta = study.user_attrs.get("meta") or {}
    if "dense_objective" not in meta:
        meta["dense_objective"] = ctx.scorer.score(ctx.dense())
    meta.update(
        fingerprint=fingerprint(config),
        model=config.model.name,
        objective=config.objective,
        budget_metric=config.budget.metric,
        targets=list(config.budget.targets),
        num_layers=ctx.num_layers,
        dense={name: table.dense for name, table in costs.items()},
        units={name: table.unit for name, table in costs.items()},
        strategies=[entry.tag for entry in config.strategies],
    )
    study.set_user_attr("meta", meta)


def execute(config: StudyConfig, *, progress: bool = True) -> int:
    from objectives.scorer import MaskScorer
    from search.workers import context_options
    from surgery.load import load_model

    name, _ = model_source(config)
    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _probe(config)  # local models: budgets and text checked before any weight is read
    model, tokenizer = load_model(name, dtype=config.model.dtype, device=config.model.device,
                                  trust_remote_code=config.model.trust_remote_code)
    prepared = prepare(config, model, tokenizer)
    out = Path(config.output_dir)
    url = storage_url(config.storage, out)
    out.mkdir(parents=True, exist_ok=True)
    save_config_copy(config, out)
    prepared.costs.update({n: build_cost(n, model, config) for n in prepared.costs if n.startswith("latency")})
    study = open_study(url)
    _check_resume(study, config)
    torch.manual_seed(config.seed)
    scorer = MaskScorer(model, prepared.calibration, config.objective,
                        batch_size=config.reference.batch_size, topk=config.reference.topk)
    costs = prepared.costs
    ctx = SearchContext(
        scorer=scorer, costs=costs[config.budget.metric], targets=tuple(config.budget.targets), study=study,
        seed=config.seed, extra_costs=tuple(t for n, t in costs.items() if n != config.budget.metric),
        constraints=tuple((costs[n], kept) for n, kept in config.budget.constraints.items()),
        **context_options(config, scorer),
    )
    _store_meta(study, config, ctx, costs)
    outer = tqdm(config.strategies, desc="strategies", unit="strategy", disable=not progress)
    records = []
    for entry in outer:
        outer.set_postfix_str(entry.tag)
        records.append(run_strategy(ctx, entry, progress=progress))
    heldout_scores(study, config, model, prepared.heldout, records, progress=progress)
    paths = write_report(out, quiet=True)
    trials = len(study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,)))
    print(f"done: {trials} trials from {len(records)} strategies; report {paths['summary']}, "
          f"front {paths['front']}, plots {paths['pareto_png']}; storage {url}")
    return 0
