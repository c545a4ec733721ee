"""Executors: where masks are scored. In process (the fast engine), a local process pool, or Ray workers.

``context_options(config, scorer)`` gives the SearchContext keywords a study runs with (``evaluator``,
``staging``, ``racing``, ``select_strategies``, ``tune``); the ``run`` command builds the context as
``SearchContext(..., **context_options(config, scorer))``. Every worker loads the model once and scores many
masks with the same engine as the in-process path, so results are the same numbers. A batch is split into
contiguous runs of its masks in prefix order (each worker keeps the prefix reuse). Ray workers are actors that
Ray restarts when their process dies, and the task they had is retried: a killed worker loses no evaluation.
``search.evaluation.tune`` runs an Optuna sampler's trials (TPE, random, NSGA-II) as Ray Tune trials on such
workers.
Ray is imported only when a Ray executor is built.
"""

from __future__ import annotations

import os
from abc import abstractmethod
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from typing import Any, Sequence

from search.config import StudyConfig
from search.evaluation.engine import Staging
from search.evaluation.evaluator import Evaluator
from search.evaluation.workers import WorkerState, ray_options, ray_session, scoring_backend
from surgery.mask import KeepMask
from surgery.errors import UserError


class ExecutorError(UserError):
    """An executor setting that cannot be used (the message names the key)."""


# process pool workers ----------------------------------------------------------------------------------------
_STATE: WorkerState | None = None  # one per process pool worker


def _pool_init(config: StudyConfig, threads: int | None) -> None:
    global _STATE
    _STATE = WorkerState(config, threads)


def _pool_score(masks: Sequence[str], sequences: int | None):
    return _STATE.score(masks, sequences)


# driver side -------------------------------------------------------------------------------------------------
def split_batch(masks: Sequence[KeepMask], parts: int) -> list[list[KeepMask]]:
    """Distinct masks in prefix order, cut into at most ``parts`` contiguous, near-equal runs."""
    ordered = sorted(set(masks), key=lambda m: m.bits)
    parts = max(1, min(parts, len(ordered)))
    size, extra = divmod(len(ordered), parts)
    runs, start = [], 0
    for index in range(parts):
        stop = start + size + (index < extra)
        runs.append(ordered[start:stop])
        start = stop
    return [run for run in runs if run]


class PoolEvaluator(Evaluator):
    """Fans ``score_many`` out over workers; subclasses say how a run of masks reaches a worker."""

    def __init__(self, workers: int):
        super().__init__()
        self.workers = workers

    @abstractmethod
    def submit(self, index: int, masks: list[str], sequences: int | None) -> Any:
        """Send a run of masks (as text) to worker ``index``; a handle for :meth:`gather`."""

    @abstractmethod
    def gather(self, handles: list[Any]) -> list[tuple[list[float], int, int]]:
        """(values, sublayer forwards, head forwards) of each handle's run."""

    def score_many(self, masks: Sequence[KeepMask], sequences: int | None = None) -> list[float]:
        runs = split_batch(masks, self.workers)
        handles = [self.submit(i, [str(m) for m in run], sequences) for i, run in enumerate(runs)]
        values: dict[KeepMask, float] = {}
        for run, (scores, sublayers, heads) in zip(runs, self.gather(handles)):
            values.update(zip(run, scores))
            self.counters.sublayer_forwards += sublayers
            self.counters.head_forwards += heads
        return [values[m] for m in masks]



class ProcessEvaluator(PoolEvaluator):
    """``executor: processes``: local worker processes (spawned), each with the model loaded once."""

    def __init__(self, config: StudyConfig, *, workers: int, threads: int | None = 1):
        super().__init__(workers)
        self.pool = ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn"),
                                        initializer=_pool_init, initargs=(config, threads))

    def submit(self, index, masks, sequences):
        return self.pool.submit(_pool_score, masks, sequences)

    def gather(self, handles):
        return [handle.result() for handle in handles]

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


class RayEvaluator(PoolEvaluator):
    """``executor: ray``: one Ray actor per worker (joins ``address`` or starts a local cluster)."""

    def __init__(self, config: StudyConfig, *, workers: int, address: str | None = None,
                 resources: dict[str, float] | None = None):
        super().__init__(workers)
        self.config, self.address, self.resources = config, address, resources or {"CPU": 1}
        self._actors: list | None = None

    @property
    def actors(self) -> list:
        """The worker actors, started on first use (and again after ``close``)."""
        if self._actors is None:
            ray = ray_session(self.address)
            options = ray_options(self.resources)
            actor = ray.remote(max_restarts=-1, max_task_retries=-1)(RayWorker)
            self._actors = [actor.options(**options).remote(self.config, int(options.get("num_cpus", 1)) or 1)
                            for _ in range(self.workers)]
        return self._actors

    def submit(self, index, masks, sequences):
        return self.actors[index % len(self.actors)].score.remote(masks, sequences)

    def gather(self, handles):
        import ray

        return ray.get(handles)

    def pids(self) -> list[int]:
        import ray

        return ray.get([actor.pid.remote() for actor in self.actors])

    def close(self) -> None:
        """Stop the actors (freeing their resources, e.g. for Ray Tune trials); they restart when needed."""
        import ray

        for actor in self._actors or ():
            ray.kill(actor)
        self._actors = None


class RayWorker(WorkerState):
    """The Ray actor body: a WorkerState that can say where it runs."""

    def pid(self) -> int:
        return os.getpid()

    def where(self) -> dict[str, str]:
        """Its node, working directory, PYTHONPATH and the file this module was imported from (the shipped code)."""
        import ray

        return {"node": ray.get_runtime_context().get_node_id(), "cwd": os.getcwd(), "code": __file__,
                "pythonpath": os.environ.get("PYTHONPATH", "")}


def make_evaluator(config: StudyConfig, scorer) -> Evaluator:
    """The evaluator for the config's executor: the in-process engine, a process pool, or Ray actors."""
    executor = config.executor
    if executor.kind == "inprocess":
        return scoring_backend(config, scorer)
    if executor.kind == "processes":
        return ProcessEvaluator(config, workers=executor.workers,
                                threads=int(executor.resources_per_worker.get("CPU", 1)) or 1)
    if executor.kind == "ray":
        return RayEvaluator(config, workers=executor.workers, address=executor.address,
                            resources=executor.resources_per_worker)
    raise ExecutorError(f"executor.kind: unknown executor {executor.kind!r}")


def context_options(config: StudyConfig, scorer) -> dict[str, Any]:
    """SearchContext keywords for the config's executor and engine sections."""
    engine = config.engine
    evaluator = make_evaluator(config, scorer)
    return {
        "evaluator": evaluator,
        "staging": Staging(engine.stage_sequences, engine.stage_keep) if engine.staged else None,
        "racing": engine.racing and config.executor.kind == "inprocess",
        "select_strategies": None if engine.select_strategies is None else tuple(engine.select_strategies),
        "tune": _tune_runner(config, evaluator) if config.executor.kind == "ray" else None,
    }


def _tune_runner(config: StudyConfig, evaluator: Evaluator):
    from search.evaluation.tune import TuneRunner  # imports Ray Tune's helpers only for executor ray

    return TuneRunner(config, evaluator)
