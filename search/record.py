"""The study record: the one module that knows how a study is laid out in its Optuna storage.

The main study ``depthsearch`` holds every full evaluation of a mask as a COMPLETE trial: values
``[objective, cost]`` (named after the objective and the budget metric, so optuna-dashboard shows e.g. "kl" and
"params"), params ``keep_<i>`` (0/1 per flat sublayer, one :data:`KEEP_BIT` distribution everywhere) and the
trial attrs of :data:`TRIAL_ATTRS` plus one attr per cost metric. Its study attrs are ``meta`` (the run's
metadata and the fingerprint), ``strategy:<tag>`` (one record per strategy: results, counters, notes) and
``heldout`` / ``heldout:<name>`` (held-out perplexity caches) and ``validation`` (the validation candidates and
their per-window values). A sampler's working studies live beside it in the
same storage, named ``depthsearch:<name>``; the study ``depthsearch:owner`` holds the writer claims (one RUNNING
trial per live writer, see :meth:`StudyRecord.writer_claim`).
"""

from __future__ import annotations

import json
import random
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Iterable

import optuna
from optuna.distributions import CategoricalDistribution

from search.storage import open_storage, shown_url, storage_exists
from search.stored import (HeldoutCache, StrategyRecord, StudyMeta, TrialAttrs, ValidationCache, mask_problem,
                           shape_problem)
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
VALIDATION = "validation"  # candidates per target and their per-window values on each validation domain
OWNER_SUFFIX = ":owner"  # the study of writer claims beside the main study


class StudyStorageError(UserError):
    """A storage that cannot be reached or read (the message names its URL)."""


class StudyInUseError(StudyStorageError):
    """Another live run holds the claim to write this study (the message names it)."""


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
        self.where = storage if isinstance(storage, str) else type(self.storage).__name__  # shown in messages
        self.claim_lost = threading.Event()  # set when another run took this run's writer claim over
        if create:
            self.study = optuna.create_study(study_name=name, storage=self.storage, directions=list(DIRECTIONS),
                                             load_if_exists=True)
        else:
            self.study = optuna.load_study(study_name=name, storage=self.storage)

    # trials ---------------------------------------------------------------------------------------------
    def add_evaluation(self, strategy: str, mask: KeepMask, value: float, target: float | None,
                       costs: dict[str, float], budget_metric: str) -> None:
        self._check_claim()
        attrs = {STRATEGY: strategy, MASK: str(mask), TARGET: target, REMOVED_ATTN: mask.removed_attn,
                 REMOVED_FFN: mask.removed_ffn, **costs}
        self.study.add_trial(optuna.trial.create_trial(
            params=keep_params(mask), distributions=keep_distributions(len(mask.bits)),
            values=[value, costs[budget_metric]], user_attrs=attrs))

    def evaluations(self) -> list[Evaluation]:
        """Every evaluated mask and strategy, in trial order (their attrs checked)."""
        trials = [t for t in completed(self.study) if MASK in t.user_attrs]
        sublayers = 2 * self.num_layers()
        for trial in trials:
            self._check_shape(f"trial {trial.number}", TrialAttrs, trial.user_attrs,
                              sublayers and mask_problem(trial.user_attrs[MASK], sublayers))
        return [self._evaluation(t) for t in trials]

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
    def meta(self) -> StudyMeta | None:
        """The run metadata (None before the first run stored it), its shape checked."""
        meta = self.study.user_attrs.get(META)
        if meta is None:
            return None
        self._check_shape(META, StudyMeta, meta)
        return StudyMeta.model_validate(meta)

    def set_meta(self, meta: StudyMeta) -> None:
        self._check_claim()
        self.study.set_user_attr(META, meta.model_dump())
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            self.study.set_metric_names([meta.objective, meta.budget_metric])

    def fingerprint(self) -> dict | None:
        meta = self.meta()
        return None if meta is None else meta.fingerprint

    def num_layers(self) -> int:
        """The model's decoder layers as stored in the metadata (0 before the first run stored it)."""
        meta = self.meta()
        return 0 if meta is None else meta.num_layers

    def strategy_record(self, tag: str) -> StrategyRecord | None:
        record = self.study.user_attrs.get(STRATEGY_PREFIX + tag)
        return None if record is None else self._checked_record(STRATEGY_PREFIX + tag, record)

    def set_strategy_record(self, tag: str, record: StrategyRecord) -> None:
        self._check_claim()
        self.study.set_user_attr(STRATEGY_PREFIX + tag, record.model_dump())

    def strategy_records(self) -> dict[str, StrategyRecord]:
        attrs = self.study.user_attrs
        return {k[len(STRATEGY_PREFIX):]: self._checked_record(k, v) for k, v in attrs.items()
                if k.startswith(STRATEGY_PREFIX)}

    def _checked_record(self, attr: str, record) -> StrategyRecord:
        self._check_shape(attr, StrategyRecord, record)
        masks = [m for m in record.get("results", {}).values() if m is not None]
        self._check_masks(attr, masks)
        return StrategyRecord.model_validate(record)

    def heldout_cache(self, column: str) -> dict:
        """``{"spec": ..., "ppl": {mask: perplexity}}`` of one held-out set (empty when never scored)."""
        cache = self.study.user_attrs.get(heldout_attr(column))
        return {} if cache is None else self._checked_cache(heldout_attr(column), cache)

    def set_heldout_cache(self, column: str, cache: dict) -> None:
        self._check_claim()
        self.study.set_user_attr(heldout_attr(column), cache)

    def heldout_ppl(self) -> dict[str, dict[str, float]]:
        """Report column -> mask -> held-out perplexity: the primary set first, then each extra set by name."""
        attrs = self.study.user_attrs
        out = {PRIMARY_COLUMN: self.heldout_cache(PRIMARY_COLUMN).get("ppl", {})}
        out.update({heldout_column(k[len(HELDOUT_PREFIX):]): self._checked_cache(k, v).get("ppl", {})
                    for k, v in sorted(attrs.items()) if k.startswith(HELDOUT_PREFIX)})
        return out

    def validation_cache(self) -> dict:
        """``{"spec": ..., "criterion": ..., "pool": {target: [mask]}, "windows": {mask: {domain: [value]}}}``
        (empty when the study has no validation text or it was never scored)."""
        cache = self.study.user_attrs.get(VALIDATION)
        if cache is None:
            return {}
        self._check_shape(VALIDATION, ValidationCache, cache)
        self._check_masks(VALIDATION, [*cache.get("windows", {}), *(m for ms in cache.get("pool", {}).values() for m in ms)])
        return cache

    def set_validation_cache(self, cache: dict) -> None:
        self._check_claim()
        self.study.set_user_attr(VALIDATION, cache)

    def _checked_cache(self, attr: str, cache) -> dict:
        self._check_shape(attr, HeldoutCache, cache)
        self._check_masks(attr, list(cache.get("ppl", {})))
        return cache

    # the stored shapes ------------------------------------------------------------------------------------
    def check_stored(self) -> None:
        """Read every stored attribute once: a damaged one raises :class:`StudyStorageError` naming it."""
        try:
            self.meta()
            self.strategy_records()
            self.heldout_ppl()
            self.validation_cache()
            self.evaluations()
        except StudyStorageError:
            raise
        except (ValueError, TypeError, KeyError) as error:  # a row the storage itself cannot decode
            raise StudyStorageError(f"study {self.study.study_name!r} in {self.where} cannot be read: "
                                    f"{type(error).__name__}: {error}") from None

    def _check_shape(self, attr: str, shape, value, problem: str | None = None) -> None:
        self._damaged(attr, shape_problem(shape, value) or problem)

    def _check_masks(self, attr: str, masks: list) -> None:
        sublayers = 2 * self.num_layers()
        self._damaged(attr, next((p for p in (mask_problem(m, sublayers) for m in masks) if p), None)
                      if sublayers else None)

    def _damaged(self, attr: str, problem: str | None) -> None:
        if problem:
            raise StudyStorageError(f"study {self.study.study_name!r} in {self.where}: the stored {attr!r} is "
                                    f"damaged ({problem}); restore the storage from a copy, or run the study anew")

    # writer claims: RUNNING trials of the study "<name>:owner" (the protocol is search.writers') ----------------
    def claims(self) -> list[tuple[int, dict]]:
        """(number, attrs) of every RUNNING claim; none when no run ever claimed the study."""
        owner = self._owner(create=False)
        running = () if owner is None else owner.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
        return [(t.number, t.user_attrs) for t in running]

    def add_claim(self, attrs: dict) -> None:
        self._owner(create=True).add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.RUNNING,
                                                                     user_attrs=attrs))

    def finish_claim(self, number: int, value: float) -> None:
        """Store a claim as COMPLETE with ``value`` (released, refused, taken over); done already is fine."""
        try:
            self.storage.set_trial_state_values(self._claim_id(number), optuna.trial.TrialState.COMPLETE, [value])
        except optuna.exceptions.UpdateFinishedTrialError:
            pass

    def beat_claim(self, number: int, now: float) -> bool:
        """Store a claim's heartbeat; False when another run finished the claim (took the study over)."""
        try:
            self.storage.set_trial_user_attr(self._claim_id(number), "heartbeat", now)
        except optuna.exceptions.UpdateFinishedTrialError:
            self.claim_lost.set()
            return False
        return True

    def _owner(self, *, create: bool) -> optuna.Study | None:
        name = self.study.study_name + OWNER_SUFFIX
        if create:
            return optuna.create_study(study_name=name, storage=self.storage, load_if_exists=True)
        try:
            return optuna.load_study(study_name=name, storage=self.storage)
        except KeyError:
            return None

    def _claim_id(self, number: int) -> int:
        study_id = self.storage.get_study_id_from_name(self.study.study_name + OWNER_SUFFIX)
        return self.storage.get_trial_id_from_study_id_trial_number(study_id, number)

    def _check_claim(self) -> None:
        if self.claim_lost.is_set():
            raise StudyInUseError(
                f"study {self.study.study_name!r} in {self.where}: another run took this run's writer claim over "
                "(its heartbeat had stopped); stopped, completed trials are kept: run again to resume")


def strategy_problems(record: StudyRecord | None, entries: Iterable) -> list[str]:
    """Strategy tags the study ran with another strategy or other settings (the old results would be reused)."""
    problems = []
    for i, entry in enumerate(entries if record is not None else ()):
        stored = record.strategy_record(entry.tag)
        now = json.loads(json.dumps({"name": entry.name, "settings": dict(entry.settings)}))
        if stored is not None and stored.done and {"name": stored.name, "settings": stored.settings} != now:
            problems.append(f"strategies.{i}: {entry.tag!r} already ran as {stored.name} with settings "
                            f"{stored.settings}; give these settings a new `label` (got {now['settings']})")
    return problems


# opening a study ---------------------------------------------------------------------------------------------
def open_record(url: str, *, create: bool = True, name: str = MAIN_STUDY) -> StudyRecord | None:
    """The main study ``name`` in ``url`` (created when ``create``; else None when absent, creating nothing); a
    storage that cannot be reached or read is one :class:`StudyStorageError` naming it."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    if not create and not storage_exists(url):
        return None
    try:
        record = _first_open(url, create, name)
    except KeyError:
        return None
    except UserError:
        raise
    except Exception as error:  # noqa: BLE001 - SQLAlchemy, journal and version errors: the storage is unusable
        first = (str(error).strip().splitlines() or [""])[0]
        raise StudyStorageError(f"storage {shown_url(url)}: cannot open it ({type(error).__name__}: {first})") from None
    record.where = shown_url(url)
    return record


def _first_open(url: str, create: bool, name: str) -> StudyRecord:
    """``StudyRecord`` of ``url``; a database server's tables created by two runs at once clash once: retried."""
    from sqlalchemy.exc import IntegrityError, ProgrammingError

    for attempt in range(3):
        try:
            return StudyRecord(open_storage(url), create=create, name=name)
        except (IntegrityError, ProgrammingError):
            if attempt == 2:
                raise
            time.sleep(random.uniform(0.5, 1.5))
