"""The study record: the one module that knows how a study is laid out in its Optuna storage.

The main study ``depthsearch`` holds every full evaluation of a mask as a COMPLETE trial: values
``[objective, cost]`` (named after the objective and the budget metric, so optuna-dashboard shows e.g. "kl" and
"params"), params ``keep_<i>`` (0/1 per flat sublayer, one :data:`KEEP_BIT` distribution everywhere) and the
trial attrs of :data:`TRIAL_ATTRS` plus one attr per cost metric. Its study attrs are ``meta`` (the run's
metadata and the fingerprint), ``strategy:<tag>`` (one record per strategy: results, counters, notes) and
``heldout`` / ``heldout:<name>`` (held-out perplexity caches). A sampler's working studies live beside it in the
same storage, named ``depthsearch:<name>``.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import optuna
from optuna.distributions import CategoricalDistribution

from surgery.errors import UserError
from surgery.mask import KeepMask

MAIN_STUDY = "depthsearch"
DIRECTIONS = ("minimize", "minimize")  # objective, cost on the budget metric
KEEP_BIT = CategoricalDistribution((0, 1))  # the distribution of every keep_<i> param
BUDGET_CONSTRAINT = "budget"  # a working-study trial's constraint: budget excess (<= 0: feasible)
PENALTY = 1e9  # the objective stored for a working-study trial over the budget (never evaluated)
STRATEGY, MASK, TARGET, REMOVED_ATTN, REMOVED_FFN = "strategy", "mask", "target", "removed_attn", "removed_ffn"
TRIAL_ATTRS = (STRATEGY, MASK, TARGET, REMOVED_ATTN, REMOVED_FFN)
META = "meta"
STRATEGY_PREFIX = "strategy:"
HELDOUT, HELDOUT_PREFIX = "heldout", "heldout:"  # the primary held-out set's cache, then each extra set's
PRIMARY_COLUMN, EXTRA_COLUMN_PREFIX = "heldout_ppl", "heldout_ppl_"  # report columns of held-out perplexity


class StudyStorageError(UserError):
    """A storage that cannot be reached or read (the message names its URL)."""


# the keep-bit encoding -------------------------------------------------------------------------------------
def keep_name(index: int) -> str:
    return f"keep_{index}"


def keep_params(mask: KeepMask) -> dict[str, int]:
    return {keep_name(i): int(bit) for i, bit in enumerate(mask.bits)}


def keep_distributions(sublayers: int) -> dict[str, CategoricalDistribution]:
    return {keep_name(i): KEEP_BIT for i in range(sublayers)}


def mask_from_params(params: dict[str, Any], sublayers: int) -> KeepMask | None:
    """The mask a param dict encodes; None when a keep bit is missing."""
    if any(keep_name(i) not in params for i in range(sublayers)):
        return None
    return KeepMask(tuple(bool(params[keep_name(i)]) for i in range(sublayers)))


def suggest_mask(trial, sublayers: int) -> KeepMask:
    """A mask drawn by an Optuna (or OptunaSearch) trial, one keep bit per sublayer."""
    return KeepMask(tuple(bool(trial.suggest_categorical(keep_name(i), KEEP_BIT.choices))
                          for i in range(sublayers)))


def planned_mask(trial: optuna.trial.FrozenTrial, sublayers: int) -> KeepMask | None:
    """The mask a trial evaluated or will evaluate: its parameters, or an enqueued trial's fixed ones."""
    return mask_from_params({**trial.system_attrs.get("fixed_params", {}), **trial.params}, sublayers)


def completed(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    return study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))


def heldout_attr(column: str) -> str:
    """Study attr caching one held-out set's perplexities: ``heldout`` for the primary set."""
    return HELDOUT if column == PRIMARY_COLUMN else HELDOUT_PREFIX + heldout_set_name(column)


def heldout_column(name: str | None) -> str:
    """Report column of the held-out set ``name`` (None: the primary set)."""
    return PRIMARY_COLUMN if name is None else EXTRA_COLUMN_PREFIX + name


def heldout_set_name(column: str) -> str:
    """The ``extra_heldout`` name of a report column ("" for the primary set): the inverse of :func:`heldout_column`."""
    return "" if column == PRIMARY_COLUMN else column[len(EXTRA_COLUMN_PREFIX):]


# one evaluated mask ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Evaluation:
    """One COMPLETE trial of the main study, read back."""

    number: int
    strategy: str | None
    mask: str
    target: float | None
    objective: float
    attrs: dict[str, Any]  # removed_attn, removed_ffn and one value per cost metric

    def cost(self, metric: str) -> float | None:
        return self.attrs.get(metric)


class StudyRecord:
    """The main study of one storage (created when absent), with typed access to what it stores."""

    def __init__(self, storage: str | optuna.storages.BaseStorage | None = None, *, create: bool = True,
                 name: str = MAIN_STUDY):
        """``storage``: a URL or storage (None: in memory); ``name``: the main study's (tests keep several)."""
        self.storage = optuna.storages.get_storage(storage)
        if create:
            self.study = optuna.create_study(study_name=name, storage=self.storage, directions=list(DIRECTIONS),
                                             load_if_exists=True)
        else:
            self.study = optuna.load_study(study_name=name, storage=self.storage)

    # trials ---------------------------------------------------------------------------------------------
    def add_evaluation(self, strategy: str, mask: KeepMask, value: float, target: float | None,
                       costs: dict[str, float], budget_metric: str) -> None:
        attrs = {STRATEGY: strategy, MASK: str(mask), TARGET: target, REMOVED_ATTN: mask.removed_attn,
                 REMOVED_FFN: mask.removed_ffn, **costs}
        self.study.add_trial(optuna.trial.create_trial(
            params=keep_params(mask), distributions=keep_distributions(len(mask.bits)),
            values=[value, costs[budget_metric]], user_attrs=attrs))

    def evaluations(self) -> list[Evaluation]:
        """Every evaluated mask and strategy, in trial order."""
        return [self._evaluation(t) for t in completed(self.study) if MASK in t.user_attrs]

    @staticmethod
    def _evaluation(trial: optuna.trial.FrozenTrial) -> Evaluation:
        attrs = trial.user_attrs
        rest = {k: v for k, v in attrs.items() if k not in (STRATEGY, MASK, TARGET)}
        return Evaluation(trial.number, attrs.get(STRATEGY), attrs[MASK], attrs.get(TARGET), trial.values[0], rest)

    def front(self) -> list[Evaluation]:
        """The calibration Pareto front (objective vs cost), by ascending cost."""
        trials = sorted((t for t in self.study.best_trials if MASK in t.user_attrs),
                        key=lambda t: (t.values[1], t.number))
        return [self._evaluation(t) for t in trials]

    def working_study(self, name: str, sampler: optuna.samplers.BaseSampler, directions: list[str]) -> optuna.Study:
        """The working study ``depthsearch:<name>`` in the same storage (created when absent)."""
        return optuna.create_study(storage=self.storage, study_name=f"{self.study.study_name}:{name}", sampler=sampler,
                                   directions=directions, load_if_exists=True)

    def running_trials(self, study: optuna.Study) -> list[optuna.Trial]:
        """The RUNNING trials of a study in this storage (left by a killed run), as live trials to finish."""
        study_id = self.storage.get_study_id_from_name(study.study_name)
        frozen = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [optuna.trial.Trial(study, self.storage.get_trial_id_from_study_id_trial_number(study_id, t.number))
                for t in frozen]

    def study_names(self) -> list[str]:
        """The main study and every working study in the storage."""
        return [s.study_name for s in optuna.get_all_study_summaries(self.storage)]

    # study attrs ------------------------------------------------------------------------------------------
    def meta(self) -> dict:
        return dict(self.study.user_attrs.get(META) or {})

    def set_meta(self, meta: dict) -> None:
        self.study.set_user_attr(META, meta)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([meta["objective"], meta["budget_metric"]])

    def fingerprint(self) -> dict | None:
        return self.meta().get("fingerprint")

    def strategy_record(self, tag: str) -> dict | None:
        return self.study.user_attrs.get(STRATEGY_PREFIX + tag)

    def set_strategy_record(self, tag: str, record: dict) -> None:
        self.study.set_user_attr(STRATEGY_PREFIX + tag, record)

    def strategy_records(self) -> dict[str, dict]:
        attrs = self.study.user_attrs
        return {k[len(STRATEGY_PREFIX):]: v for k, v in attrs.items() if k.startswith(STRATEGY_PREFIX)}

    def heldout_cache(self, column: str) -> dict:
        """``{"spec": ..., "ppl": {mask: perplexity}}`` of one held-out set (empty when never scored)."""
        return self.study.user_attrs.get(heldout_attr(column)) or {}

    def set_heldout_cache(self, column: str, cache: dict) -> None:
        self.study.set_user_attr(heldout_attr(column), cache)

    def heldout_ppl(self) -> dict[str, dict[str, float]]:
        """Report column -> mask -> held-out perplexity: the primary set first, then each extra set by name."""
        attrs = self.study.user_attrs
        out = {PRIMARY_COLUMN: (attrs.get(HELDOUT) or {}).get("ppl", {})}
        out.update({heldout_column(k[len(HELDOUT_PREFIX):]): (v or {}).get("ppl", {})
                    for k, v in sorted(attrs.items()) if k.startswith(HELDOUT_PREFIX)})
        return out


def strategy_problems(record: StudyRecord | None, entries: Iterable) -> list[str]:
    """Strategy tags the study ran with another strategy or other settings (the old results would be reused)."""
    problems = []
    for i, entry in enumerate(entries if record is not None else ()):
        stored = record.strategy_record(entry.tag) or {}
        now = json.loads(json.dumps({"name": entry.name, "settings": dict(entry.settings)}))
        if stored.get("done") and {"name": stored.get("name"), "settings": stored.get("settings")} != now:
            problems.append(f"strategies.{i}: {entry.tag!r} already ran as {stored.get('name')} with settings "
                            f"{stored.get('settings')}; give these settings a new `label` (got {now['settings']})")
    return problems


# opening a storage -----------------------------------------------------------------------------------------
def storage_exists(url: str) -> bool:
    """Whether ``url``'s storage is already there (a local file), so opening it creates nothing new."""
    from pathlib import Path

    from search.checks import is_journal

    if is_journal(url):
        return Path(url).is_file()
    if url.split("://", 1)[0].split("+", 1)[0] == "sqlite":
        from sqlalchemy.engine import make_url

        return Path(make_url(url).database or "").is_file()
    return True


def open_record(url: str, *, create: bool = True, name: str = MAIN_STUDY) -> StudyRecord | None:
    """The main study ``name`` in ``url`` (created when ``create``; else None when absent, creating nothing); a
    storage that cannot be reached or read is one :class:`StudyStorageError` naming it."""
    from search.checks import shown_url
    from search.config import open_storage

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create and not storage_exists(url):
        return None
    try:
        return StudyRecord(open_storage(url), create=create, name=name)
    except KeyError:
        return None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, journal and version errors: the storage is unusable
        first = (str(error).strip().splitlines() or [""])[0]
        raise StudyStorageError(f"storage {shown_url(url)}: cannot open it ({type(error).__name__}: {first})") from None
