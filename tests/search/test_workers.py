"""Executors: process and Ray workers score masks with the in-process numbers; a killed Ray worker loses nothing."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
import yaml

from objectives.budgets import sublayer_costs
from search.config import load_config
from search.evaluation.executors import ProcessEvaluator, RayEvaluator, context_options, split_batch
from search.evaluation.workers import build_scorer
from surgery.mask import KeepMask
from tests.strategy_runs import make_context, run_strategy

ROOT = Path(__file__).resolve().parents[2]
# A driver on a two-node cluster (ray.cluster_utils: a head and a second node, one CPU each): it imports this
# checkout through sys.path only, so its workers can import the project only from what Ray ships them.
CLUSTER_DRIVER = """
import json, sys
sys.path.insert(0, sys.argv[1])
import ray
from ray.cluster_utils import Cluster
from search.config import load_config
from search.evaluation.executors import RayEvaluator
from surgery.mask import KeepMask

cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
cluster.add_node(num_cpus=1)
cluster.wait_for_nodes()
pool = RayEvaluator(load_config(sys.argv[2]), workers=2, address=cluster.address, resources={"CPU": 1})
try:
    values = pool.score_many([KeepMask.from_removed(5, [i]) for i in range(10)])
    where = ray.get([actor.where.remote() for actor in pool.actors])
    nodes = sorted(node["NodeID"] for node in ray.nodes() if node["Alive"])
finally:
    pool.close()
    ray.shutdown()
    cluster.shutdown()
print(json.dumps({"values": values, "where": where, "nodes": nodes}))
"""


@pytest.fixture
def config(tmp_path, stories_path, text_path):
    """A small stories260k study: 4 calibration sequences of 32 tokens, greedy FinerCut to 20% of sublayers."""
    text = {"files": [str(text_path)], "num_sequences": 4, "seq_len": 32}
    data = {
        "model": {"name": str(stories_path), "device": "cpu"},
        "calibration": {**text, "end": 0.8},
        "heldout": {**text, "start": 0.8},
        "objective": "js",
        "reference": {"batch_size": 2},
        "budget": {"metric": "sublayers", "targets": [0.2]},
        "strategies": [{"name": "greedy_finercut"}],
        "executor": {"kind": "ray", "workers": 2},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def _greedy_trials(scorer, evaluator) -> tuple[list[tuple[str, float]], dict]:
    ctx = make_context(None, scorer, sublayer_costs(scorer.model), (0.2,), evaluator=evaluator)
    _, _, results = run_strategy(ctx, "greedy_finercut")
    return [(t.user_attrs["mask"], t.values[0]) for t in ctx.study.trials], results


def test_split_batch_keeps_prefix_order_and_every_mask():
    masks = [KeepMask.dense(3).without(i) for i in (5, 0, 3, 1, 4, 2, 0)]
    runs = split_batch(masks, 4)
    assert [len(r) for r in runs] == [2, 2, 1, 1]
    flat = [m for r in runs for m in r]
    assert flat == sorted(set(masks), key=lambda m: m.bits)
    assert split_batch(masks[:1], 4) == [masks[:1]]


def test_context_options_build_the_in_process_engine(config):
    config.executor.kind = "inprocess"
    config.engine.staged = True
    scorer = build_scorer(config)
    options = context_options(config, scorer)
    assert type(options["evaluator"]).__name__ == "PrefixEngine"
    assert (options["staging"].sequences, options["staging"].keep) == (2, 4)
    assert scorer.input_ids.shape == (4, 32)


@pytest.mark.slow
def test_process_workers_give_the_in_process_trials(config):
    scorer = build_scorer(config)
    expected = _greedy_trials(scorer, None)
    pool = ProcessEvaluator(config, workers=2)
    try:
        assert _greedy_trials(scorer, pool) == expected
        assert pool.counters.head_forwards > 0
    finally:
        pool.close()


@pytest.mark.slow
def test_ray_workers_give_the_in_process_trials_and_survive_a_killed_worker(config):
    scorer = build_scorer(config)
    trials, results = _greedy_trials(scorer, None)
    assert len(trials) == 10 + 9  # two greedy steps over 10 sublayers of stories260k
    pool = RayEvaluator(config, workers=2, resources={"CPU": 1})
    try:
        assert _greedy_trials(scorer, pool) == (trials, results)
        # a large batch; one worker process is killed while it scores its half
        masks = [KeepMask.from_removed(5, [i, j]) for i in range(10) for j in range(i + 1, 10)]
        victim = pool.pids()[1]
        killer = threading.Timer(0.5, os.kill, (victim, signal.SIGKILL))
        killer.start()
        started = time.perf_counter()
        values = pool.score_many(masks)
        killer.join()
        assert victim not in pool.pids()  # Ray restarted that worker and retried its task
        assert values == [scorer.score(m) for m in masks]
        assert time.perf_counter() - started > 0.5
    finally:
        pool.close()


@pytest.mark.slow
def test_ray_tune_optuna_search_trials_are_recorded_with_in_process_values(config, tmp_path):
    from search.evaluation.tune import TuneBudget, record_working_trials, tune_sampler

    scorer = build_scorer(config)
    costs = sublayer_costs(scorer.model)
    warm = [KeepMask.parse("AM,AM,AM,A-,A-")]
    ctx = make_context(None, scorer, costs, (0.2,))
    run = ctx.strategy_run("random")
    working = run.working_study("random:0.2", optuna.samplers.RandomSampler(seed=0), ["minimize"])
    results = tune_sampler(config, budget=TuneBudget(costs, 0.2), sampler=optuna.samplers.RandomSampler(seed=0),
                           n_trials=4, warm_start=warm, storage_path=str(tmp_path / "tune"), study=working,
                           storage=ctx.record.storage)
    assert len(results) == 4
    assert any(r["mask"] == str(warm[0]) for r in results)  # the warm start was evaluated
    told = working.get_trials(deepcopy=False)
    assert len(told) == 4 and all(t.state == optuna.trial.TrialState.COMPLETE for t in told)  # told as they finished
    assert sorted(t.values[0] for t in told) == sorted(r["objective"] for r in results)
    finished = record_working_trials(run, working, lambda mask: 0.2)
    assert run.forwards == 0 and len(ctx.study.trials) == len(finished) >= 1
    assert record_working_trials(run, working, lambda mask: 0.2) == []  # recorded once
    for mask, value in finished:
        assert value == scorer.score(mask)


@pytest.mark.slow
def test_ray_workers_on_two_nodes_run_the_code_ray_ships_them(config, tmp_path):
    """Nodes started with no PYTHONPATH in another directory: each worker imports the project from Ray's
    runtime_env (py_modules), not from the checkout or an installed copy, and scores the in-process values."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    away = tmp_path / "elsewhere"
    away.mkdir()
    out = subprocess.run([sys.executable, "-c", CLUSTER_DRIVER, str(ROOT), str(config.source)], cwd=away, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-4000:]
    found = json.loads(out.stdout.strip().splitlines()[-1])
    assert len(found["nodes"]) == 2 and sorted(w["node"] for w in found["where"]) == found["nodes"]  # one per node
    for where in found["where"]:
        assert "runtime_resources" in where["code"] and not where["code"].startswith(str(ROOT)), where
        assert Path(where["cwd"]) != ROOT and str(ROOT) not in where["pythonpath"].split(os.pathsep), where
    scorer = build_scorer(config)
    assert found["values"] == [scorer.score(KeepMask.from_removed(5, [i])) for i in range(10)]
