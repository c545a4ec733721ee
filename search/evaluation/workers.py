"""The worker side of the executors: a process that loads the model once and scores many masks, and the Ray
session its Ray workers (actors and Ray Tune trials) run in."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch

from search.config import StudyConfig
from search.evaluation.engine import make_scoring_backend
from search.evaluation.evaluator import Evaluator
from surgery.mask import KeepMask

def build_scorer(config: StudyConfig, *, device: str | None = None):
    """The study's MaskScorer: model, calibration batch, objective and reference exactly as ``run`` builds them."""
    from objectives.calibration import mixed_batch
    from objectives.scorer import MaskScorer
    from search.config import calibration_specs, model_source
    from surgery.load import load_model

    name, _ = model_source(config)
    model, tokenizer = load_model(name, dtype=config.model.dtype, device=device or config.model.device,
                                  trust_remote_code=config.model.trust_remote_code)
    ids = mixed_batch(calibration_specs(config), tokenizer)
    torch.manual_seed(config.seed)
    return MaskScorer(model, ids, config.objective, batch_size=config.reference.batch_size,
                      topk=config.reference.topk, **scorer_repair(config))


def scorer_repair(config: StudyConfig) -> dict:
    """The MaskScorer keywords of the config's repair-aware scoring (``engine.repair``)."""
    return {"repair": config.engine.repair, "repair_sequences": config.engine.repair_sequences,
            "repair_ridge": config.engine.repair_ridge}


def scoring_backend(config: StudyConfig, scorer) -> Evaluator:
    """The backend that scores masks in one process (in process or in a worker), per the config's ``engine``."""
    return make_scoring_backend(scorer, prefix_reuse=config.engine.prefix_reuse,
                                state_cache_mb=config.engine.state_cache_mb)


class WorkerState:
    """What one worker process holds: the scorer and its backend, built once."""

    def __init__(self, config: StudyConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        self.scorer = build_scorer(config)
        self.backend = scoring_backend(config, self.scorer)

    def score(self, masks: Sequence[str], sequences: int | None) -> tuple[list[float], int, int]:
        """(values, sublayer forwards, head forwards) for masks given as text."""
        counters = self.backend.counters
        before = counters.sublayer_forwards, counters.head_forwards
        values = self.backend.score_many([KeepMask.parse(m) for m in masks], sequences)
        return values, counters.sublayer_forwards - before[0], counters.head_forwards - before[1]


def ray_options(resources: dict[str, float]) -> dict[str, Any]:
    """Ray actor/task options from ``resources_per_worker`` (CPU, GPU, or custom resources)."""
    resources = dict(resources)
    options: dict[str, Any] = {"num_cpus": resources.pop("CPU", 1), "num_gpus": resources.pop("GPU", 0)}
    if resources:
        options["resources"] = resources
    return options


def runtime_env() -> dict[str, Any]:
    """Ray's ``runtime_env`` for the study's workers: the project's packages, as this process imports them, shipped
    with ``py_modules`` (Ray's way for clusters), so a worker on any node runs this code whatever its PYTHONPATH,
    working directory or installed copy."""
    return {"py_modules": [str(Path(package.__file__).parent) for package in _packages()],
            "excludes": ["__pycache__", "*.pyc"]}


def _packages() -> list:
    """The project's packages a worker imports (``studies`` holds data only the driver reads)."""
    import objectives
    import search
    import surgery

    return [search, surgery, objectives]


def ray_session(address: str | None):
    """Ray, initialised once with :func:`runtime_env`: joins ``address`` or starts a small local cluster."""
    import ray

    if not ray.is_initialized():
        cpus = None if address else max(2, os.cpu_count() or 2)
        ray.init(address=address, num_cpus=cpus, include_dashboard=False, log_to_driver=False,
                 runtime_env=runtime_env())
    return ray
