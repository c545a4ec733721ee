"""Benchmarks with lm-eval, in memory: the model object is wrapped by ``HFLM``, nothing is written to disk.

Local tasks (YAML in ``objectives/tasks`` over the JSON-lines files in ``studies/assets/benchmarks``) run
offline. Any other name goes to lm-eval's own task index (``include_defaults=True``), for users with the hub;
``hub:NAME`` forces lm-eval's definition of a name that also exists locally. Each task reports a headline
metric: the first metric its definition lists.
"""

from __future__ import annotations

import contextlib
import filecmp
import functools
import logging
import math
import os
import re
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Mapping, Sequence

from surgery.errors import UserError

from .registry import did_you_mean

TASKS_DIR = Path(str(files("objectives.tasks")))  # lm-eval task YAMLs (package data)
HUB_PREFIX = "hub:"


class UnknownTaskError(UserError):
    """A task name that neither the local task folder nor lm-eval's index knows."""


class TaskDataError(UserError):
    """A known task whose data cannot be loaded on this machine."""


@dataclass(frozen=True)
class TaskResult:
    """One task's metrics; ``value`` is the headline metric."""

    task: str
    metrics: dict[str, float]
    headline: str
    higher_is_better: bool
    samples: int
    stderr: dict[str, float] = field(default_factory=dict)

    @property
    def value(self) -> float:
        return self.metrics[self.headline]

    def retained(self, dense: float) -> float:
        """Percent of the dense score kept (perplexities: dense / this, so 100 means no loss either way)."""
        value = self.value
        if self.higher_is_better:
            return 100.0 * value / dense if dense else float("nan")
        return 100.0 * dense / value if value else float("nan")


@functools.cache
def _manager(hub: bool):
    from lm_eval.tasks import TaskManager

    if hub:
        return TaskManager(include_defaults=True)
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=False)


def local_tasks() -> list[str]:
    """Names of the tasks defined in ``objectives/tasks``."""
    return list(_manager(False).all_tasks)


def _unknown(name: str, known: Sequence[str]) -> UnknownTaskError:
    hint = did_you_mean(name, known, n=5, cutoff=0.5, list_known=False)
    return UnknownTaskError(f"unknown benchmark task {name!r}{hint} (local tasks: {', '.join(local_tasks())})")


def resolve_task(name: str, *, hub: bool = True) -> tuple[str, Any]:
    """(lm-eval task name, the TaskManager that knows it); UnknownTaskError lists close matches.

    Names not defined locally are looked up in lm-eval's own index (built on first use: a minute on a slow
    machine); ``hub=False`` accepts local tasks only.
    """
    if not name.startswith(HUB_PREFIX) and name in _manager(False).all_tasks:
        return name, _manager(False)
    if not hub:
        raise _unknown(name, local_tasks())
    bare = name.removeprefix(HUB_PREFIX)
    if bare in _manager(True).all_tasks:
        return bare, _manager(True)
    raise _unknown(name, [*local_tasks(), *_manager(True).all_tasks])


def check_tasks(names: Sequence[str], *, hub: bool = True) -> None:
    """Fail early on an unknown name (the local index is cheap; lm-eval's own is built only when needed) and on a
    hub task whose data cannot be loaded here (no network and no cached copy)."""
    for name in names:
        task, manager = resolve_task(name, hub=hub)
        if manager is not _manager(False):
            _check_data(name, task, manager)


def _check_data(name: str, task: str, manager) -> None:
    from lm_eval.tasks import get_task_dict

    try:
        get_task_dict([task], manager)
    except Exception as error:  # noqa: BLE001 - hub, network and dataset errors alike: the task cannot run here
        first = (str(error).strip().splitlines() or [""])[0][:200]
        raise TaskDataError(f"benchmark task {name!r}: cannot load its data ({type(error).__name__}: {first}); "
                            "a hub task needs network access or its dataset in the local cache") from None


def task_limit(task: str, limit: int | None, limits: Mapping[str, int | None] | None) -> int | None:
    """Samples for one task: its entry in ``limits`` if any, else ``limit`` (None: every sample)."""
    if limits and task in limits:
        return limits[task]
    return limit


def task_files() -> dict[str, Path]:
    """Local task name -> the bundled JSON-lines file it evaluates (read from the task YAMLs, no lm-eval import)."""
    from objectives.tasks.utils import benchmark_dir

    found = {}
    for spec in sorted(TASKS_DIR.glob("*.yaml")):
        text = spec.read_text(encoding="utf-8")
        task, file = re.search(r"^task:\s*(\S+)", text, re.M), re.search(r"^\s+file:\s*(\S+)", text, re.M)
        if task and file:
            found[task.group(1)] = benchmark_dir() / file.group(1)
    return found


def evaluated_rows_problems(sources: Sequence[tuple[str, Any]], tasks: Sequence[str], limit: int | None,
                            limits: Mapping[str, int | None] | None) -> list[str]:
    """Text sources (config key, ``TextSource``) that read rows a benchmark task evaluates: lm-eval's ``limit``
    takes a task's first rows, so calibration and validation text must start after them."""
    from objectives.calibration import row_span

    files = {name: path for name, path in task_files().items() if name in tasks and path.is_file()}
    problems = []
    for key, source in sources:
        for name, path in files.items():
            if not any(_same_file(f, path) for f in source.files):
                continue
            first, last = row_span(source)
            evaluated = task_limit(name, limit, limits)
            if evaluated is None or first < evaluated:
                rows = "every row" if evaluated is None else f"its first {evaluated} rows"
                problems.append(f"{key}: reads rows {first}-{last} of {path.name}, and confirm task {name!r} evaluates "
                                f"{rows}; start the text after them or lower the task's limit")
    return problems


def _same_file(a: str, b: Path) -> bool:
    try:
        return Path(a).resolve().samefile(b) or filecmp.cmp(a, b, shallow=False)
    except OSError:
        return False


def _headline(task: str, results: dict) -> tuple[str, bool]:
    config = results.get("configs", {}).get(task, {})
    metrics = [m["metric"] for m in config.get("metric_list", []) if isinstance(m.get("metric"), str)]
    values = results["results"][task]
    names = [m for m in metrics if f"{m},none" in values] or [
        k.split(",")[0] for k in values if "," in k and "_stderr" not in k
    ]
    headline = names[0]
    higher = results.get("higher_is_better", {}).get(task, {}).get(headline, True)
    return headline, bool(higher)


def _task_result(name: str, task: str, results: dict) -> TaskResult:
    values = results["results"][task]
    metrics = {k.split(",")[0]: float(v) for k, v in values.items() if "," in k and "_stderr" not in k}
    stderr = {
        k.split(",")[0].removesuffix("_stderr"): float(v)
        for k, v in values.items()
        if "_stderr," in k and isinstance(v, (int, float))
    }
    headline, higher = _headline(task, results)
    samples = int(results.get("n-samples", {}).get(task, {}).get("effective", 0))
    return TaskResult(name, metrics, headline, higher, samples, stderr)


def evaluate(
    model,
    tokenizer,
    tasks: Sequence[str],
    *,
    limit: int | None = None,
    limits: Mapping[str, int | None] | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 100,
    progress: bool = True,
) -> dict[str, TaskResult]:
    """Run each task on the in-memory ``model``; ``{task: TaskResult}`` in the order asked.

    Standard errors: lm-eval's closed form for means (``acc``: sqrt(p(1-p)/(n-1))), ``bootstrap_iters`` resamples
    (in this process) for its bootstrappable metrics such as perplexity; 0 computes none."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from tqdm.auto import tqdm

    resolved = {name: resolve_task(name) for name in tasks}
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    if not progress:
        import datasets

        datasets.disable_progress_bars()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    out: dict[str, TaskResult] = {}
    for name in tqdm(tasks, desc="benchmarks", disable=not progress, leave=False):
        task, manager = resolved[name]
        with _serial_bootstrap():
            results = simple_evaluate(
                model=lm,
                tasks=[task],
                task_manager=manager,
                limit=task_limit(name, limit, limits),
                log_samples=False,
                bootstrap_iters=bootstrap_iters,
                verbosity="ERROR",
            )
        out[name] = _task_result(name, task, results)
    return out


@contextlib.contextmanager
def _serial_bootstrap():
    """lm-eval bootstraps in a process pool of one worker per CPU unless ``DISABLE_MULTIPROC`` is set: keep it in
    this process (a pool would copy the model's process on a busy machine for a few hundred resamples)."""
    before = os.environ.get("DISABLE_MULTIPROC")
    os.environ["DISABLE_MULTIPROC"] = "1"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("DISABLE_MULTIPROC", None)
        else:
            os.environ["DISABLE_MULTIPROC"] = before


def perplexity(model, ids, *, batch_size: int = 8) -> float:
    """Perplexity of ``model`` on token windows ``ids [n, seq_len]``: exp of the mean next-token NLL over every
    predicted position (the study's held-out perplexity, computed on a plain model)."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    device = next(model.parameters()).device
    with torch.no_grad():
        for start in range(0, len(ids), batch_size):
            batch = ids[start:start + batch_size].to(device)
            logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
            total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1),
                                     reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(total / count)
