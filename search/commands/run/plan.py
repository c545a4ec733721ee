"""The plan of a run and every check it makes before it writes: the config against this machine, then what needs
the model (positions, budget feasibility, enough text, held-out text that differs from the calibration text), the
dry run's plan, and the portable config copy a study directory keeps."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from objectives.budgets import BUDGETS, BudgetError, CostTable
from objectives.calibration import DataError, interleave, token_batch
from search.checks import device_problem, positions_problems
from search.storage import absolute_storage, storage_problems, storage_url
from search.config import (
    ConfigError,
    StudyConfig,
    calibration_sections,
    calibration_sequences,
    format_problems,
    heldout_sets,
    model_source,
    text_source,
    validation_sections,
)
from search.studydir import CONFIG_COPY, output_dir_problem, storage_change_problem
from surgery.files import atomic_write_text


def environment_problems(config: StudyConfig) -> list[str]:
    """What the config points at on this machine: the device, the storage and the output directory. Reads only."""
    out, url = Path(config.output_dir), storage_url(config.storage, config.output_dir)
    problems = [device_problem("model.device", config.model.device)]
    problems += [*storage_problems(url, out), output_dir_problem(out),
                 storage_change_problem(out, url, config.study_name)]
    return [p for p in problems if p]


# validation that needs the model ---------------------------------------------------------------------------
@dataclass
class Prepared:
    """What the model-dependent checks produce: cost tables and the token batches."""

    costs: dict[str, CostTable]
    calibration: torch.Tensor | None = None
    heldout: torch.Tensor | None = None
    extra_heldout: dict[str, torch.Tensor] = field(default_factory=dict)  # report column -> token batch
    validation: dict[str, torch.Tensor] = field(default_factory=dict)  # validation domain -> token batch

    def take_text(self, other: Prepared) -> None:
        """Reuse another check's token batches (the same tokenizer and config): the text is tokenized once."""
        self.calibration, self.heldout = other.calibration, other.heldout
        self.extra_heldout, self.validation = other.extra_heldout, other.validation


def budget_names(config: StudyConfig) -> list[str]:
    """The budget metric first, then every other cheap budget and the constrained ones (recorded on trials)."""
    names = [config.budget.metric, *config.budget.constraints]
    names += [n for n in BUDGETS.names() if not BUDGETS.get(n).measured]
    return list(dict.fromkeys(names))


def measured_names(names) -> list[str]:
    """The budgets among ``names`` measured on the device (profiled by ``run``, not by a dry run)."""
    return [n for n in names if BUDGETS.get(n).measured]


def build_cost(name: str, model, config: StudyConfig, study_dir: Path | None = None) -> CostTable:
    """The cost table of budget ``name``; measured budgets keep their profile in ``study_dir`` (once it is ours)."""
    budget = BUDGETS.get(name)
    if budget.measured:
        return budget(model, settings=dict(config.latency), study_dir=study_dir)
    return budget(model)


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


def _shape_problems(config: StudyConfig, model, name: str) -> list[str]:
    """A model without decoder layers; token windows longer than the model's positions."""
    from surgery.families import family_for, get_path

    if not len(get_path(model, family_for(model.config).layers)):
        return [f"model.name: model {name} has no decoder layers (num_hidden_layers: 0)"]
    lengths = {f"{key}.seq_len": section.seq_len for key, section in calibration_sections(config)}
    lengths.update({f"{h.key}.seq_len": h.section.seq_len for h in heldout_sets(config)})
    lengths.update({f"{key}.seq_len": section.seq_len for key, section in validation_sections(config)})
    return positions_problems(model.config, lengths, f"model {name}")


def prepare(config: StudyConfig, model, tokenizer, name: str, *, measure: bool = True,
            text: Prepared | None = None) -> Prepared:
    """Cost tables and token batches (``text``'s when given: already checked); every model-dependent problem raised
    at once as a ConfigError. Measured budgets (``measure``) are profiled but not saved (the study directory is not
    ours yet)."""
    problems = _shape_problems(config, model, name)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
    names = [n for n in budget_names(config) if measure or not BUDGETS.get(n).measured]
    prepared = Prepared({n: build_cost(n, model, config) for n in names})
    problems = _budget_problems(config, prepared.costs)
    if text is None:
        problems += _text_problems(config, tokenizer, prepared)
    else:
        prepared.take_text(text)
    if problems:
        raise ConfigError(format_problems(config.source, problems))
    return prepared


def probe(config: StudyConfig) -> Prepared | None:
    """For a local model, build it on the meta device from its config (no weights) and check what needs it."""
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
    return prepare(config, model, tokenizer, name, measure=False)


# the plan a dry run prints -----------------------------------------------------------------------------------
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
    if config.engine.repair != "none":
        total = calibration_sequences(config)
        lines.append(f"  repair-aware scoring: every mask scored after its {config.engine.repair} repair, fitted on "
                     f"the first {config.engine.repair_sequences} calibration sequences (ridge "
                     f"{config.engine.repair_ridge:g}) and scored on the other "
                     f"{total - config.engine.repair_sequences} (held-out and validation scores: the masked model "
                     "without repair)")
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
    if measured_names(budget_names(config)):
        what.append("the latency budgets (profiled on the device by run)")
    return what


# the config copy -------------------------------------------------------------------------------------------
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
