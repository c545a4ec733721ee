"""Study configuration: YAML validated on load, every error reported at once with file, key and value."""

from __future__ import annotations

import functools
import hashlib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import ConfigDict, Field, ValidationError, field_validator

from objectives.text_source import TextSource
from search.record import MAIN_STUDY
from search.storage import url_form_problem
from search.schema import (  # noqa: F401 - the schema's parts, also read from here
    BATCH_MAX, CACHE_MB_MAX, COUNT_MAX, SEED_MAX, TOKENS_MAX, WORKERS_MAX, ConfigError, Fraction, Ridge, Section, Seed,
    format_problems, unbounded_numbers, validation_problems,
)
from surgery.files import read_utf8
from surgery.formats import DEFAULT_RIDGE as REPAIR_RIDGE

from surgery.gguf_source import GgufError, is_gguf, read_header

MAX_ALIASES = 32  # YAML aliases allowed in a config: enough to share a few values, too few to expand a bomb
MAX_NODES = 100_000  # nodes of the document with every alias expanded


def _no_nul(value):
    """Paths and names: a NUL character is never part of one (the OS would refuse it later, less clearly)."""
    for text in value if isinstance(value, (list, tuple)) else [value]:
        if isinstance(text, str) and "\0" in text:
            raise ValueError("contains a NUL character")
    return value


class ModelSection(Section):
    name: str  # local path (relative to the config file) or hub id
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    device: str = "auto"
    trust_remote_code: bool = False
    threads: int | None = Field(None, ge=1, le=1024)  # torch CPU threads (None: torch's default); 1: no contention

    _names = field_validator("name")(_no_nul)


class TextSection(Section, TextSource):
    """Calibration, held-out or validation text: a :class:`TextSource` (files relative to the config file) and the
    windows drawn from it."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False, frozen=False)

    files: list[str] = Field(default_factory=list)  # local .txt / .jsonl, relative to the config file
    num_sequences: int = Field(8, ge=1, le=COUNT_MAX)
    seq_len: int = Field(256, ge=2, le=TOKENS_MAX)
    seed: Seed = 0

    _paths = field_validator("files")(_no_nul)


class ReferenceSection(Section):
    topk: int | None = Field(None, ge=1, le=COUNT_MAX)  # None: full-vocabulary reference (exact); k: top-k + tail
    batch_size: int = Field(8, ge=1, le=BATCH_MAX)


class BudgetSection(Section):
    metric: str = "params"  # a registered budget: params, kv_cache_bytes, sublayers, latency_*
    targets: list[Annotated[float, Field(gt=0.0, lt=1.0)]] = Field(  # fractions removed
        default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5])
    constraints: dict[str, Annotated[float, Field(gt=0.0, le=1.0)]] = Field(default_factory=dict)  # other metric ->
    # max fraction of its dense cost kept

    @field_validator("targets")
    @classmethod
    def _fractions(cls, targets: list[float]) -> list[float]:
        bad = [t for t in targets if not 0.0 < t < 1.0]
        if bad or not targets:
            raise ValueError(f"targets must be fractions removed in (0, 1), got {targets}")
        return sorted(set(targets))


class StrategyEntry(Section):
    name: str  # registered strategy
    label: str | None = None  # distinct tag when one strategy runs twice with other settings
    settings: dict[str, Any] = Field(default_factory=dict)

    @property
    def tag(self) -> str:
        return self.label or self.name


class ExecutorSection(Section):
    kind: Literal["inprocess", "processes", "ray"] = "inprocess"
    workers: int = Field(1, ge=1, le=WORKERS_MAX)
    address: str | None = None  # ray: join an existing cluster
    resources_per_worker: dict[str, Annotated[float, Field(ge=0, le=COUNT_MAX)]] = Field(
        default_factory=lambda: {"CPU": 1})


class EngineSection(Section):
    """How masks are scored: prefix reuse (exact) and optional staged selection (not exact)."""

    prefix_reuse: bool = True  # reuse hidden states of shared mask prefixes; same numbers as the plain loop
    state_cache_mb: float = Field(1024, ge=0, le=CACHE_MB_MAX)  # prefix states kept across batches (per worker)
    staged: bool = False  # score batches on a few sequences first, fully evaluate only the best
    stage_sequences: int = Field(2, ge=1, le=COUNT_MAX)
    stage_keep: int = Field(4, ge=1, le=COUNT_MAX)
    racing: bool = False  # exact racing: candidates proven worse than the best are not finished (fewer trials)
    repair: Literal["none", "linear"] = "none"  # linear: repair-aware scoring, every mask's objective is that of
    # the masked model with its training-free linear repair (surgery/repair.py) fitted and folded in
    repair_sequences: int = Field(8, ge=1, le=COUNT_MAX)  # repair-aware: the calibration batch's first sequences,
    # which fit each repair and are not scored (cross-fitting); masks are scored on the batch's other sequences
    repair_ridge: Ridge = REPAIR_RIDGE  # repair-aware: each map's pull
    # towards the identity (surgery/repair.py; confirm.repair_ridge and export --repair-ridge for the models)
    select_strategies: list[str] | None = None  # tags racing/staging apply to (empty: all; default: every strategy
    # whose class declares selection_only: greedy_finercut, blockpruner, sleb, evolutionary, under any label)


class SelectionSection(Section):
    """How the recommended mask per budget is picked on the validation text (multi-fidelity finishing)."""

    candidates: int = Field(8, ge=0, le=COUNT_MAX)  # per target, besides every strategy's result: the best masks by
    # calibration objective, re-scored on the validation text
    criterion: Literal["ppl", "kl"] = "ppl"  # per domain: mean log-perplexity, or mean KL to the dense model
    reduce: Literal["mean", "worst"] = "mean"  # over domains: their mean, or the worst domain's value


class StudyConfig(Section):
    model: ModelSection
    calibration: TextSection
    extra_calibration: dict[str, TextSection] = Field(default_factory=dict)  # more calibration text (other domains),
    # its sequences interleaved with calibration's into one batch
    heldout: TextSection
    extra_heldout: dict[str, TextSection] = Field(default_factory=dict)  # more held-out text, scored like heldout
    validation: dict[str, TextSection] = Field(default_factory=dict)  # named domains that pick the recommended mask
    # per budget; disjoint from calibration and held-out text (none: no recommendation)
    selection: SelectionSection = Field(default_factory=SelectionSection)
    objective: Literal["kl", "js", "ppl"] = "kl"
    reference: ReferenceSection = Field(default_factory=ReferenceSection)
    budget: BudgetSection = Field(default_factory=BudgetSection)
    strategies: list[StrategyEntry]
    storage: str | None = None  # Optuna storage URL; default: sqlite file in the output directory
    study_name: str = Field(MAIN_STUDY, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")  # the study's name in its
    # storage: studies sharing one storage need different names
    executor: ExecutorSection = Field(default_factory=ExecutorSection)
    engine: EngineSection = Field(default_factory=EngineSection)
    confirm: dict[str, Any] = Field(default_factory=dict)  # validated by search.confirm_settings
    latency: dict[str, Any] = Field(default_factory=dict)  # validated by objectives.latency
    seed: Seed = 0
    output_dir: str = "runs/study"

    _paths = field_validator("storage", "output_dir")(_no_nul)

    source: Path | None = Field(None, exclude=True)  # the YAML file this came from


class _BoundedLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys, more than ``MAX_ALIASES`` aliases and documents that expand past
    ``MAX_NODES`` nodes (alias bombs, recursive aliases)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            self.aliases = getattr(self, "aliases", 0) + 1
            if self.aliases > MAX_ALIASES:
                raise yaml.YAMLError(f"more than {MAX_ALIASES} aliases (*name), at {self.peek_event().start_mark}")
        return super().compose_node(parent, index)

    def construct_document(self, node):
        if _expanded_size(node, {}) > MAX_NODES:
            raise yaml.YAMLError(f"the document expands to more than {MAX_NODES} nodes through its aliases")
        return super().construct_document(node)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key, _ in node.value:
            if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                if key.value in seen:
                    raise yaml.YAMLError(f"duplicate key {key.value!r}, at {key.start_mark}")
                seen.add(key.value)
        return super().construct_mapping(node, deep)


def _expanded_size(node, memo: dict[int, int]) -> int:
    if id(node) in memo:
        return memo[id(node)]
    memo[id(node)] = MAX_NODES + 1  # a node met again while counting it: a recursive alias
    if isinstance(node, yaml.SequenceNode):
        size = 1 + sum(_expanded_size(item, memo) for item in node.value)
    elif isinstance(node, yaml.MappingNode):
        size = 1 + sum(_expanded_size(k, memo) + _expanded_size(v, memo) for k, v in node.value)
    else:
        size = 1
    memo[id(node)] = min(size, MAX_NODES + 1)
    return memo[id(node)]


def read_yaml(path: Path):
    """The YAML document of ``path`` (UTF-8; bounded aliases, no duplicate keys), errors naming the file."""
    if "\0" in str(path):
        raise ConfigError(f"config path {str(path)!r} contains a NUL character")
    text = read_utf8(path, ConfigError, "YAML config file")
    try:
        return yaml.load(text, Loader=_BoundedLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as error:
        raise ConfigError(f"{path}: not valid YAML: {error}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None


def load_config(path: str | Path) -> StudyConfig:
    """Parse and validate a study YAML; relative paths stay relative to the YAML's folder (see resolve)."""
    path = Path(path)
    raw = read_yaml(path)
    if raw is None:
        raise ConfigError(f"{path}: the file is empty; a study config is a mapping (model:, calibration:, ...)")
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    try:
        config = StudyConfig.model_validate(raw)
    except ValidationError as error:
        raise ConfigError(format_problems(path, validation_problems(error))) from None
    config.source = path
    return config


def resolve(config: StudyConfig, relative: str) -> str:
    """A path from the config, taken relative to the config file's folder when it is not absolute."""
    if config.source is None or Path(relative).is_absolute():
        return relative
    candidate = config.source.parent / relative
    return str(candidate) if candidate.exists() or relative.startswith(".") else relative


# checks that need no model weights ---------------------------------------------------------------------------
def _looks_like_path(name: str) -> bool:
    """Hub ids are ``name`` or ``org/name``; anything else (``./x``, ``/x``, ``a/b/c``, ``x\\y``, ``x.gguf``) is a path."""
    return (name.startswith((".", "/", "~")) or name.count("/") > 1 or "\\" in name or is_gguf(name)
            or Path(name).exists())


def model_source(config: StudyConfig) -> tuple[str, bool]:
    """(path or hub id, is_local) of the config's model; local paths are resolved against the config file."""
    name = resolve(config, config.model.name)
    local = _looks_like_path(name) or (config.source is not None and (config.source.parent / name).exists())
    return (str(Path(name).expanduser()), True) if local else (name, False)


def text_source(config: StudyConfig, section: TextSection):
    """The calibration/held-out section as an ``objectives.calibration.BatchSpec`` with resolved files."""
    from objectives.calibration import BatchSpec

    return BatchSpec(resolved_source(config, section), num_sequences=section.num_sequences, seq_len=section.seq_len,
                     seed=section.seed)


def resolved_source(config: StudyConfig, source: TextSource) -> TextSource:
    """``source`` as a plain :class:`TextSource` with its files resolved against the config file."""
    files = tuple(str(Path(resolve(config, f)).resolve()) for f in source.files)
    return TextSource(**source.model_dump(include=set(TextSource.model_fields)) | {"files": files})


def _check_model(config: StudyConfig) -> list[str]:
    name, local = model_source(config)
    if local and is_gguf(name):
        try:
            read_header(name)
        except GgufError as error:
            return [f"model.name: {error}"]
        return []
    if local and not (Path(name) / "config.json").is_file():
        what = "does not exist" if not Path(name).exists() else "has no config.json"
        return [f"model.name: model path {config.model.name!r} {what} (resolved to {name})"]
    from surgery.load import pickle_problem

    problem = pickle_problem(name) if local else None
    return [f"model.name: {problem}"] if problem else []


def _check_text(config: StudyConfig, key: str, section: TextSection) -> list[str]:
    problems = []
    if not section.files and not section.dataset:
        problems.append(f"{key}: needs `files` or `dataset`")
    if not 0.0 <= section.start < section.end <= 1.0:
        problems.append(f"{key}: slice start={section.start}, end={section.end} needs 0 <= start < end <= 1")
    for i, name in enumerate(section.files):
        path = Path(resolve(config, name))
        if not path.is_file():
            what = "is a directory, not a text file" if path.is_dir() else "not a regular file" if path.exists() \
                else "text file not found"
            problems.append(f"{key}.files.{i}: {what} (got {name!r})")
    return problems


@dataclass(frozen=True)
class HeldoutSet:
    """One held-out text: its config key, its perplexity column in the report, and its section."""

    key: str  # "heldout" or "extra_heldout.<name>"
    column: str  # "heldout_ppl" or "heldout_ppl_<name>"
    section: TextSection


def heldout_sets(config: StudyConfig) -> list[HeldoutSet]:
    """The held-out text sets: ``heldout`` first (the report's front uses it), then ``extra_heldout`` by name."""
    from search.record import heldout_column  # the report's column names are part of the storage layout

    extra = [HeldoutSet(f"extra_heldout.{name}", heldout_column(name), section)
             for name, section in config.extra_heldout.items()]
    return [HeldoutSet("heldout", heldout_column(None), config.heldout), *extra]


def calibration_sections(config: StudyConfig) -> list[tuple[str, TextSection]]:
    """The calibration text parts with their config keys: ``calibration``, then ``extra_calibration.<name>``."""
    return [("calibration", config.calibration),
            *((f"extra_calibration.{name}", section) for name, section in config.extra_calibration.items())]


def validation_sections(config: StudyConfig) -> list[tuple[str, TextSection]]:
    """The validation domains with their config keys ``validation.<name>``, in config order."""
    return [(f"validation.{name}", section) for name, section in config.validation.items()]


def calibration_specs(config: StudyConfig) -> list:
    """Each calibration part as a ``BatchSpec`` (see :func:`objectives.calibration.mixed_batch`)."""
    return [text_source(config, section) for _, section in calibration_sections(config)]


def calibration_sources(config: StudyConfig) -> list[TextSource]:
    """Each calibration part's text (files resolved against the config): what healing and repair fit on by default."""
    return [spec.source for spec in calibration_specs(config)]


def calibration_sequences(config: StudyConfig) -> int:
    """The sequences of the calibration batch, every part together."""
    return sum(section.num_sequences for _, section in calibration_sections(config))


@functools.lru_cache(maxsize=64)
def _digest(path: str, *_version) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _content(source) -> set[str]:
    """What a text source reads, by content: its files' digests (a copy under another name is the same text), or
    the dataset it names."""
    if source.files:
        return {_digest(f, Path(f).stat().st_size, Path(f).stat().st_mtime_ns) for f in source.files}
    return {f"dataset {source.dataset}:{source.dataset_config}:{source.split}"}


def _slice_digest(source) -> str | None:
    """sha256 of the characters a file source selects (None for a dataset: not fetched to check)."""
    from objectives.calibration import DataError, load_text

    try:
        return hashlib.sha256(load_text(source).encode("utf-8")).hexdigest() if source.files else None
    except DataError:  # unreadable text: reported with its key when the text is tokenized
        return None


def _overlaps(cal, held) -> bool:
    """Same content (file digests) with overlapping slices, or the same selected characters."""
    if _content(cal) & _content(held) and cal.start < held.end and held.start < cal.end:
        return True
    digest = _slice_digest(held)
    return digest is not None and digest == _slice_digest(cal)


def _check_disjoint(config: StudyConfig) -> list[str]:
    """Held-out and validation text must not overlap calibration text, nor each other, compared by content: the
    same files (by digest) with overlapping slices, or the same selected characters."""
    source = lambda section: text_source(config, section).source  # noqa: E731
    calibration = [(key, source(section)) for key, section in calibration_sections(config)]
    validation = [(key, source(section)) for key, section in validation_sections(config)]
    held = [(held_set.key, source(held_set.section)) for held_set in heldout_sets(config)]
    pairs = [(a, b) for a in calibration for b in [*validation, *held]] + [(a, b) for a in validation for b in held]
    return [f"{later_key}: text {later.describe()} overlaps {key} text {first.describe()}; use disjoint slices "
            "(e.g. calibration end: 0.8, heldout start: 0.8) or other files"
            for (key, first), (later_key, later) in pairs if _overlaps(first, later)]


def _check_extra_sections(config: StudyConfig) -> list[str]:
    """The ``extra_heldout`` and ``extra_calibration`` names, and every calibration part's ``seq_len``."""
    named = [("extra_heldout", name) for name in config.extra_heldout]
    named += [("extra_calibration", name) for name in config.extra_calibration]
    named += [("validation", name) for name in config.validation]
    problems = [f"{key}.{name}: names are letters, digits and underscores (got {name!r})"
                for key, name in named if not re.fullmatch(r"[A-Za-z0-9_]+", name)]
    length = config.calibration.seq_len
    problems += [f"{key}.seq_len: every calibration part has calibration.seq_len ({length}) tokens per sequence "
                 f"(got {section.seq_len})"
                 for key, section in calibration_sections(config)[1:] if section.seq_len != length]
    return problems


def _check_strategies(config: StudyConfig) -> list[str]:
    from search.strategies import STRATEGIES, StrategySettingsError

    problems, seen = [], set()
    for i, entry in enumerate(config.strategies):
        if entry.tag in seen:
            problems.append(f"strategies.{i}: tag {entry.tag!r} used twice; give one a distinct `label`")
        seen.add(entry.tag)
        if entry.name not in STRATEGIES:
            problems.append(f"strategies.{i}.name: {_unknown(STRATEGIES, entry.name)}")
            continue
        try:
            STRATEGIES.get(entry.name).from_settings(dict(entry.settings))
        except (StrategySettingsError, ValueError, TypeError) as error:
            problems.append(f"strategies.{i}.settings: {error} (got {entry.settings!r})")
    if not config.strategies:
        problems.append("strategies: at least one strategy is needed")
    return problems


def _check_engine(config: StudyConfig) -> list[str]:
    """Repair-aware scoring splits the calibration batch: some sequences must be left to score on."""
    total = calibration_sequences(config)
    fit = config.engine.repair_sequences
    if config.engine.repair == "none" or fit < total:
        return []
    return [f"engine.repair_sequences: {fit} leaves none of the {total} calibration sequences to score masks on "
            "(repair-aware scoring fits each repair on the calibration batch's first engine.repair_sequences "
            "sequences and scores on the rest only); lower it or raise calibration.num_sequences"]


def _unknown(registry, name: str) -> str:
    try:
        registry.get(name)
    except KeyError as error:
        return str(error)
    return ""


def _check_budget(config: StudyConfig) -> list[str]:
    from objectives.budgets import BUDGETS

    problems = []
    if config.budget.metric not in BUDGETS:
        problems.append(f"budget.metric: {_unknown(BUDGETS, config.budget.metric)}")
    for name in config.budget.constraints:
        if name not in BUDGETS:
            problems.append(f"budget.constraints.{name}: {_unknown(BUDGETS, name)}")
    return problems


def _check_storage(config: StudyConfig) -> list[str]:
    problem = None if config.storage is None else url_form_problem(config.storage)
    return [problem] if problem else []


def _check_sections(config: StudyConfig) -> list[str]:
    """The free-form ``latency:`` and ``confirm:`` mappings, validated by their owners."""
    from objectives.latency import LatencyError, LatencySettings

    problems = []
    try:
        LatencySettings.from_mapping(config.latency)
    except LatencyError as error:
        problems.append(str(error))
    if config.confirm:
        from search.confirm_settings import confirm_settings

        try:
            confirm_settings(config)
        except ConfigError as error:
            problems += [line.strip() for line in str(error).splitlines()[1:]]
    return problems


def _check_benchmark_rows(config: StudyConfig) -> list[str]:
    """Calibration and validation text must not read the benchmark rows the ``confirm:`` tasks evaluate."""
    from objectives.benchmarks import evaluated_rows_problems

    settings = config.confirm
    tasks, limit, limits = settings.get("tasks"), settings.get("limit"), settings.get("limits")
    if not isinstance(tasks, list) or not (limit is None or isinstance(limit, int)) or not isinstance(limits or {}, dict):
        return []  # no benchmark tasks, or settings the confirm section's own check reports
    sources = [(key, text_source(config, section).source)
               for key, section in [*calibration_sections(config), *validation_sections(config)]]
    return evaluated_rows_problems(sources, tasks, limit, limits)


def config_problems(config: StudyConfig) -> list[str]:
    """Every problem found without loading weights or touching the disk beyond reading."""
    text = [problem for key, section in calibration_sections(config) for problem in _check_text(config, key, section)]
    text += _check_extra_sections(config)
    text += [problem for held in heldout_sets(config) for problem in _check_text(config, held.key, held.section)]
    text += [problem for key, section in validation_sections(config) for problem in _check_text(config, key, section)]
    return [
        *_check_model(config),
        *(text or [*_check_disjoint(config), *_check_benchmark_rows(config)]),
        *_check_strategies(config),
        *_check_engine(config),
        *_check_budget(config),
        *_check_storage(config),
        *_check_sections(config),
    ]


def check_config(config: StudyConfig) -> None:
    """Every problem of :func:`config_problems`, raised at once as one :class:`ConfigError`."""
    problems = config_problems(config)
    if problems:
        raise ConfigError(format_problems(config.source, problems))

