"""``run``: validate a study config, run every strategy into one Optuna study, score held-out text, report.

Everything that can be checked is checked before anything is written: the config (file, key and value of
each problem, all at once), the device, storage and output directory, then what needs the model (positions,
budget feasibility, enough text, held-out text that differs from the calibration text) and the stored study's
fingerprint. Only then is the directory created and locked (``search.studydir``). Re-running the same command
resumes: strategies marked done are skipped, evaluated masks come back from the storage, held-out perplexities
are cached in the study's user attrs.
"""

from __future__ import annotations

import argparse
import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm.auto import tqdm

from objectives.budgets import BUDGETS, BudgetError, CostTable
from objectives.calibration import DataError, interleave, token_batch
from search.checks import absolute_storage, device_problem, positions_problems, storage_problems
from search.config import (
    ConfigError,
    StudyConfig,
    calibration_sections,
    config_problems,
    format_problems,
    heldout_sets,
    load_config,
    model_source,
    storage_url,
    text_source,
    validation_sections,
)
from search.studydir import CONFIG_COPY, output_dir_problem
from search import studydir
from search.evaluation.context import SearchContext
from search.commands.report import write_report
from search.selection import finish_on_validation
from search.record import PRIMARY_COLUMN, StudyInUseError, StudyRecord, open_record, strategy_problems
from search.writers import writer_claim, writer_problem
from surgery.files import atomic_write_text
from surgery.mask import KeepMask

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

    prepared = _probe(config)
    current = studydir.fingerprint(config, resolve_device(config.model.device).type)
    check_stored_study(config, storage_url(config.storage, config.output_dir), current)
    print(describe_plan(config, prepared))
    return 0


def environment_problems(config: StudyConfig) -> list[str]:
    """What the config points at on this machine: the device, the storage and the output directory. Reads only."""
    out, url = Path(config.output_dir), storage_url(config.storage, config.output_dir)
    problems = [device_problem("model.device", config.model.device)]
    problems += [*storage_problems(url, out), output_dir_problem(out),
                 studydir.storage_change_problem(out, url, config.study_name)]
    return [p for p in problems if p]


# validation that needs the model ---------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the model-dependent checks produce: cost tables and the two token batches."""

    costs: dict[str, CostTable]
    calibration: torch.Tensor | None = None
    heldout: torch.Tensor | None = None
    extra_heldout: dict[str, torch.Tensor] = field(default_factory=dict)  # report column -> token batch
    validation: dict[str, torch.Tensor] = field(default_factory=dict)  # validation domain -> token batch


def budget_names(config: StudyConfig) -> list[str]:
    """The budget metric first, then every other cheap budget and the constrained ones (recorded on trials)."""
    names = [config.budget.metric, *config.budget.constraints]
    names += [n for n in BUDGETS.names() if not n.startswith("latency")]
    return list(dict.fromkeys(names))


def build_cost(name: str, model, config: StudyConfig, study_dir: Path | None = None) -> CostTable:
    """The cost table of budget ``name``; measured budgets keep their profile in ``study_dir`` (once it is ours)."""
    builder = BUDGETS.get(name)
    if "settings" in inspect.signature(builder).parameters:
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
    batches = {}
    calibration = calibration_sections(config)
    later = [*((h.key, h.section) for h in heldout_sets(config)), *validation_sections(config)]
    for key, section in [*calibration, *later]:
        try:
            batches[key] = token_batch(text_source(config, section), tokenizer)
        except DataError as error:
            problems.append(f"{key}: {error}")
    keys = [key for key, _ in calibration]
    cal = prepared.calibration = interleave([batches[k] for k in keys]) if set(keys) <= set(batches) else None
    prepared.heldout = batches.get("heldout")
    prepared.extra_heldout = {h.column: batches[h.key] for h in heldout_sets(config)[1:] if h.key in batches}
    prepared.validation = {key.split(".", 1)[1]: batches[key] for key, _ in validation_sections(config) if key in batches}
    for key, held in batches.items():
        if key not in keys and cal is not None and cal.shape[1] == held.shape[1]:
            same = int((held[:, None, :] == cal[None, :, :]).all(-1).any(-1).sum())
            if same:
                problems.append(f"{key}: {same} of {len(held)} sequences equal calibration sequences; use other text")
    return problems


def _shape_problems(config: StudyConfig, model) -> list[str]:
    """A model without decoder layers; token windows longer than the model's positions."""
    from surgery.families import family_for, get_path

    name = model_source(config)[0]
    if not len(get_path(model, family_for(model.config).layers)):
        return [f"model.name: model {name} has no decoder layers (num_hidden_layers: 0)"]
    lengths = {f"{key}.seq_len": section.seq_len for key, section in calibration_sections(config)}
    lengths.update({f"{h.key}.seq_len": h.section.seq_len for h in heldout_sets(config)})
    lengths.update({f"{key}.seq_len": section.seq_len for key, section in validation_sections(config)})
    return positions_problems(model.config, lengths, f"model {name}")


def prepare(config: StudyConfig, model, tokenizer, *, skip_latency: bool = False) -> Prepared:
    """Cost tables and token batches; every model-dependent problem raised at once as a ConfigError.
    Measured budgets are profiled but not saved (the study directory is not ours yet)."""
    problems = _shape_problems(config, model)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
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
    from transformers import AutoModelForCausalLM

    from surgery.cli import LOAD_ERRORS, remote_code_problem
    from surgery.errors import UserError
    from surgery.load import load_model_config, load_tokenizer

    remote = config.model.trust_remote_code
    problem = remote_code_problem(name, remote, "model.trust_remote_code: true")
    if problem:
        raise ConfigError(format_problems(config.source, [f"model.name: {problem}"]))
    try:
        model_config = load_model_config(name, trust_remote_code=remote)  # a .gguf file: from its header, no weights
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(model_config, trust_remote_code=remote)
        tokenizer = load_tokenizer(name, trust_remote_code=remote)
    except UserError:
        raise
    except LOAD_ERRORS as error:
        first = (str(error).strip().splitlines() or [""])[0]
        raise ConfigError(format_problems(config.source, [
            f"model.name: cannot load the model config or tokenizer of {name} ({type(error).__name__}: {first})"]))
    model = model.to(getattr(torch, config.model.dtype))
    return prepare(config, model, tokenizer, skip_latency=True)


def describe_plan(config: StudyConfig, prepared: Prepared | None) -> str:
    name, local = model_source(config)
    out = Path(config.output_dir)
    lines = [f"study {config.source}: valid", f"  model: {name} ({'local' if local else 'hub id, not loaded'})"]
    lines.append(f"  device: {config.model.device}")
    held = [(h.key, h.section) for h in heldout_sets(config)]
    for key, section in [*calibration_sections(config), *held, *validation_sections(config)]:
        spec = text_source(config, section)
        lines.append(f"  {key}: {spec.source.describe()}, {spec.num_sequences} x {spec.seq_len} tokens, seed {spec.seed}")
    lines.append(f"  objective: {config.objective}; budget: {config.budget.metric}, targets removed {config.budget.targets}")
    if prepared is not None:
        table = prepared.costs[config.budget.metric]
        layers = len(table.per_sublayer) // 2
        lines.append(f"  dense {table.name}: {table.dense:g} {table.unit}; {layers} layers, 2^{2 * layers} masks")
        lines += [f"    target {t:.1%}: {table.name} <= {table.limit(t):g}" for t in config.budget.targets]
    for entry in config.strategies:
        lines.append(f"  strategy {entry.tag}: {entry.name} {entry.settings or ''}".rstrip())
    lines.append(f"  storage: {storage_url(config.storage, out)}, study {config.study_name!r}")
    lines.append(f"  output: {out}" + (" (exists: re-running resumes it)" if out.exists() else ""))
    return "\n".join(lines + [f"  not checked: {what}" for what in unchecked(config, prepared)])


def unchecked(config: StudyConfig, prepared: Prepared | None) -> list[str]:
    """What a dry run cannot check without the weights (``run`` checks it before it writes)."""
    what = ["the weights themselves (a damaged weight file shows when run loads it)"]
    if prepared is None:
        what.append("the hub model's config, positions, budgets and token windows (a hub id is not fetched)")
    if any(n.startswith("latency") for n in budget_names(config)):
        what.append("the latency budgets (profiled on the device by run)")
    return what


# the study directory ---------------------------------------------------------------------------------------
def save_config_copy(config: StudyConfig, out: Path) -> Path:
    """The config with local paths made absolute, so report/export work from the study directory alone."""
    return atomic_write_text(out / CONFIG_COPY, yaml.safe_dump(portable_config(config), sort_keys=False))


def portable_config(config: StudyConfig) -> dict:
    """The config as plain data with its local paths (model, text files, storage) made absolute, so it means the
    same from any folder."""
    data = config.model_dump(mode="json")
    data["storage"] = absolute_storage(config.storage)
    name, local = model_source(config)
    data["model"]["name"] = str(Path(name).resolve()) if local else name
    for key in ("calibration", "heldout"):
        data[key]["files"] = list(text_source(config, getattr(config, key)).source.files)
    for key in ("extra_calibration", "extra_heldout", "validation"):
        for name, section in getattr(config, key).items():
            data[key][name]["files"] = list(text_source(config, section).source.files)
    return data


# running ---------------------------------------------------------------------------------------------------
def _poll(bar, run, stop: threading.Event) -> None:
    while not stop.wait(0.25):
        bar.n = run.evaluations
        bar.refresh()


def run_strategy(ctx: SearchContext, entry, *, progress: bool = True) -> dict:
    """Run one strategy entry unless the study marks it done; store its results and counters."""
    from search.strategies import STRATEGIES

    record = ctx.record.strategy_record(entry.tag)
    if record and record.get("done"):
        return record
    strategy = STRATEGIES.get(entry.name).from_settings(dict(entry.settings))
    run = ctx.strategy_run(entry.tag, selection_only=strategy.selection_only)
    strategy.note_objective(run)
    total = strategy.expected_evaluations(ctx)
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
    ctx.record.set_strategy_record(entry.tag, record)
    return record


HELDOUT_FRONT_POINTS = 32  # calibration-front masks scored on held-out text, spread evenly over size


def _heldout_masks(record: StudyRecord, results: list[dict], num_layers: int, *, front: bool = True) -> list[str]:
    """The dense mask, every strategy result and (``front``) up to ``HELDOUT_FRONT_POINTS`` calibration-front masks."""
    masks = {str(KeepMask.dense(num_layers))}
    for done in results:
        masks.update(m for m in done["results"].values() if m)
    if front:
        points = record.front()
        step = max(1, -(-len(points) // HELDOUT_FRONT_POINTS))
        masks.update(point.mask for point in points[::step])
    return sorted(masks)


def heldout_scores(record: StudyRecord, config: StudyConfig, model, prepared: Prepared, results, *, progress=True,
                   more: list[str] = ()):
    """Held-out perplexity on every held-out set of every strategy result, the validation candidates (``more``), the
    front and the dense model (cached)."""
    batches = {PRIMARY_COLUMN: prepared.heldout, **prepared.extra_heldout}
    layers = record.meta()["num_layers"]
    for held in heldout_sets(config):  # extra sets: no front masks
        masks = sorted({*_heldout_masks(record, results, layers, front=held.column == PRIMARY_COLUMN), *more})
        _score_heldout_set(record, config, model, held, batches[held.column], masks, progress)


def _score_heldout_set(record: StudyRecord, config: StudyConfig, model, held, ids: torch.Tensor, masks: list[str],
                       progress: bool):
    from objectives.scorer import MaskScorer

    spec = text_source(config, held.section)
    key = [spec.source.describe(), spec.num_sequences, spec.seq_len, spec.seed, studydir.text_identity(spec)["sha256"]]
    cache = record.heldout_cache(held.column)
    if cache.get("spec") != key:
        cache = {"spec": key, "ppl": {}}
    todo = [m for m in masks if m not in cache["ppl"]]
    if todo:
        scorer = MaskScorer(model, ids, "ppl", batch_size=config.reference.batch_size)
        for mask in tqdm(todo, desc=f"{held.key} ppl", unit="mask", disable=not progress, leave=False):
            cache["ppl"][mask] = scorer.score(KeepMask.parse(mask))
            record.set_heldout_cache(held.column, cache)


def _store_meta(config: StudyConfig, ctx: SearchContext, costs: dict[str, CostTable], fingerprint: dict) -> None:
    meta = ctx.record.meta()
    if "dense_objective" not in meta:
        meta["dense_objective"] = ctx.scorer.score(ctx.dense())
    meta.update(
        fingerprint=fingerprint,
        model=config.model.name,
        objective=config.objective,
        budget_metric=config.budget.metric,
        targets=list(config.budget.targets),
        num_layers=ctx.num_layers,
        dense={name: table.dense for name, table in costs.items()},
        units={name: table.unit for name, table in costs.items()},
        strategies=[entry.tag for entry in config.strategies],
    )
    ctx.record.set_meta(meta)


def execute(config: StudyConfig, *, progress: bool = True) -> int:
    """Check everything that needs the model and the stored study, then (only then) write: create the directory,
    take its lock, copy the config, run the strategies, score held-out text, report."""
    from surgery.cli import load_checked

    if config.model.threads:
        torch.set_num_threads(config.model.threads)
    if not progress:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    _probe(config)  # local models: budgets and text checked before any weight is read
    model, tokenizer = load_checked(model_source(config)[0], dtype=config.model.dtype, device=config.model.device,
                                    trust_remote_code=config.model.trust_remote_code,
                                    flag="model.trust_remote_code: true")
    prepared = prepare(config, model, tokenizer)
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
                return _search(config, record, url, model, prepared, current, progress=progress)
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


def _search(config: StudyConfig, record: StudyRecord, url: str, model, prepared: Prepared, fingerprint: dict,
            *, progress: bool) -> int:
    from objectives.scorer import MaskScorer
    from search.evaluation.executors import context_options

    out = Path(config.output_dir)
    latency = [n for n in prepared.costs if n.startswith("latency")]
    prepared.costs.update({n: build_cost(n, model, config, study_dir=out) for n in latency})
    torch.manual_seed(config.seed)
    scorer = MaskScorer(model, prepared.calibration, config.objective,
                        batch_size=config.reference.batch_size, topk=config.reference.topk)
    costs = prepared.costs
    ctx = SearchContext(
        scorer=scorer, costs=costs[config.budget.metric], targets=tuple(config.budget.targets), record=record,
        seed=config.seed, extra_costs=tuple(t for n, t in costs.items() if n != config.budget.metric),
        constraints=tuple((costs[n], kept) for n, kept in config.budget.constraints.items()),
        **context_options(config, scorer),
    )
    _store_meta(config, ctx, costs, fingerprint)
    outer = tqdm(config.strategies, desc="strategies", unit="strategy", disable=not progress)
    results = []
    for entry in outer:
        outer.set_postfix_str(entry.tag)
        results.append(run_strategy(ctx, entry, progress=progress))
    pool = finish_on_validation(ctx, config, model, prepared.validation, results, progress=progress)
    heldout_scores(record, config, model, prepared, results, progress=progress, more=pool)
    paths = write_report(out, quiet=True)
    trials = len(record.evaluations())
    print(f"done: {trials} trials from {len(results)} strategies; report {paths['summary']}, "
          f"front {paths['front']}, plots {paths['pareto_png']}; storage {url}")
    return 0
