"""Greedy FinerCut with the plain loop (one full forward per candidate) versus the fast engine, same calibration.

    python benchmarks/greedy_engine.py --repeats 3
    python benchmarks/greedy_engine.py --smoke     # seconds: the small sizes of SMOKE, one repeat

For each model (the bundled tinystories-l12 and a random-weight Llama of ``--big-layers`` x ``--big-hidden``), the
``greedy_finercut`` strategy runs through a SearchContext four ways: ``plain`` (MaskScorer per candidate),
``exact`` (prefix reuse: every candidate finished, the plain loop's trials), ``raced`` (prefix reuse + exact
racing: candidates proven worse than the step's best are not finished) and ``staged`` (prefix reuse + staged
selection on ``--stage-sequences``, keeping ``--stage-keep``). Every run is a fresh process (so peak
memory is its own); modes are interleaved per repeat and the medians are printed. The exact engine must give the
plain loop's removal order (exact and raced), and staged selection the plain loop's masks at every target.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, output_file, positive_int  # noqa: E402
ASSETS = ROOT / "studies" / "assets"
MODES = ("plain", "exact", "raced", "staged")
# --smoke: these sizes replace the given ones (the models chosen are kept; `big` shrinks to 4 x 64)
SMOKE = {"repeats": 1, "targets": [0.25], "sequences": 2, "seq_len": 32, "big_layers": 4, "big_hidden": 64}


def _model(name: str, args):
    import torch
    import transformers as tf

    from surgery.load import load_model

    _, tokenizer = load_model(str(ASSETS / "models" / "tinystories-l12"), device="cpu")
    if name == "tinystories-l12":
        return load_model(str(ASSETS / "models" / name), dtype=args.dtype, device=args.device)[0], tokenizer
    config = tf.LlamaConfig(vocab_size=tokenizer.vocab_size, hidden_size=args.big_hidden, num_hidden_layers=args.big_layers,
                            intermediate_size=int(args.big_hidden * 8 / 3), num_attention_heads=args.big_hidden // 32,
                            num_key_value_heads=args.big_hidden // 64, max_position_embeddings=1024, initializer_range=0.1)
    torch.manual_seed(0)
    model = tf.AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype))
    return model.to(args.device).eval(), tokenizer


def _rss_mb() -> float:
    return int(Path("/proc/self/statm").read_text().split()[1]) * 4096 / 2**20


def measure(name: str, mode: str, args) -> dict:
    """One greedy FinerCut run in this (fresh) process: wall time, order, masks, sublayer forwards, memory."""
    import optuna
    import torch

    from objectives.budgets import sublayer_costs
    from objectives.calibration import BatchSpec, TextSource, token_batch
    from objectives.scorer import MaskScorer
    from search.evaluation.context import SearchContext
    from search.record import StudyRecord
    from search.evaluation.engine import PlainBackend, PrefixEngine, Staging
    from search.strategies import STRATEGIES

    torch.set_num_threads(args.threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    model, tokenizer = _model(name, args)
    source = TextSource(files=(str(ASSETS / "text" / "tinystories_valid.txt"),), end=0.8)
    ids = token_batch(BatchSpec(source, num_sequences=args.sequences, seq_len=args.seq_len, seed=0), tokenizer)
    scorer = MaskScorer(model, ids, args.objective, batch_size=args.batch_size)
    evaluator = PlainBackend(scorer) if mode == "plain" else PrefixEngine(scorer)
    staging = Staging(args.stage_sequences, args.stage_keep) if mode == "staged" else None
    ctx = SearchContext(scorer=scorer, costs=sublayer_costs(model), targets=tuple(args.targets), record=StudyRecord(),
                        evaluator=evaluator, staging=staging, racing=mode == "raced")
    strategy = STRATEGIES.get("greedy_finercut")()
    base_rss = _rss_mb()
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    start, cpu = time.perf_counter(), time.process_time()
    results = strategy.search(ctx.strategy_run("greedy_finercut", selection_only=strategy.selection_only))
    wall, cpu = time.perf_counter() - start, time.process_time() - cpu
    peak = (torch.cuda.max_memory_allocated() / 2**20 if args.device.startswith("cuda")
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
    return {
        "model": name, "mode": mode, "wall_s": wall, "cpu_s": cpu, "order": strategy.order,
        "masks": {format(t, "g"): str(m) for t, m in results.items()},
        "sublayer_forwards": evaluator.counters.sublayer_forwards, "trials": len(ctx.record.evaluations()),
        "peak_mb": peak, "base_mb": base_rss,
    }


def _summary(name: str, runs: list[dict]) -> list[str]:
    """One markdown table per model: each mode's medians against the plain loop's, and whether it agrees."""
    by = {mode: [r for r in runs if r["mode"] == mode] for mode in MODES}
    wall = {mode: statistics.median(r["wall_s"] for r in rs) for mode, rs in by.items()}
    cpu = {mode: statistics.median(r["cpu_s"] for r in rs) for mode, rs in by.items()}
    peak = {mode: statistics.median(r["peak_mb"] for r in rs) for mode, rs in by.items()}
    plain = by["plain"][0]
    lines = [f"{name}: medians of {len(by['plain'])}; plain removal order {[u[0] for u in plain['order']]}, "
             f"masks {plain['masks']}", "",
             "| mode | wall s | wall ratio | CPU s | CPU ratio | sublayer forwards | forward ratio | trials "
             "| peak RSS MB | same order | same masks |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for mode in MODES:
        run = by[mode][0]
        same_order = all(r["order"] == plain["order"] for r in by[mode])
        same_masks = all(r["masks"] == plain["masks"] for r in by[mode])
        lines.append(
            f"| {mode} | {wall[mode]:.2f} | {wall[mode] / wall['plain']:.3f} | {cpu[mode]:.2f} "
            f"| {cpu[mode] / cpu['plain']:.3f} | {run['sublayer_forwards']} "
            f"| {run['sublayer_forwards'] / plain['sublayer_forwards']:.3f} | {run['trials']} | {peak[mode]:.0f} "
            f"| {same_order} | {same_masks} |")
    return lines + [""]


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tinystories-l12,big", help="comma list: tinystories-l12, big")
    parser.add_argument("--repeats", type=positive_int, default=3)
    parser.add_argument("--targets", type=lambda s: [float(x) for x in s.split(",")], default=[0.25, 0.5],
                        help="fractions of sublayers removed")
    parser.add_argument("--objective", default="js")
    parser.add_argument("--sequences", type=positive_int, default=8)
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--batch-size", type=positive_int, default=2)
    parser.add_argument("--stage-sequences", type=positive_int, default=2)
    parser.add_argument("--stage-keep", type=positive_int, default=3)
    parser.add_argument("--big-layers", type=positive_int, default=16)
    parser.add_argument("--big-hidden", type=positive_int, default=256)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--json", type=output_file, help="also write every run as JSON here")
    parser.add_argument("--smoke", action="store_true", help="seconds: the sizes of SMOKE, one repeat")
    args = parser.parse_args(argv)
    return argparse.Namespace(**(vars(args) | SMOKE)) if args.smoke else args


def _measured(args):
    """Every (model, repeat, mode) run in turn, each in a fresh spawned process (smoke: all in this one)."""
    jobs = [(name, mode) for name in args.models.split(",") for _ in range(args.repeats) for mode in MODES]
    if args.smoke:
        yield from (measure(name, mode, args) for name, mode in jobs)
        return
    with ProcessPoolExecutor(max_workers=1, mp_context=get_context("spawn"), max_tasks_per_child=1) as pool:
        yield from (pool.submit(measure, name, mode, args).result() for name, mode in jobs)


def main(argv=None) -> int:
    args = parse_args(argv)
    runs = []
    for run in _measured(args):
        runs.append(run)
        print(f"{run['model']} {run['mode']}: wall {run['wall_s']:.2f} s, CPU {run['cpu_s']:.2f} s",
              file=sys.stderr, flush=True)
        if len(runs) % (args.repeats * len(MODES)) == 0:  # the model's last run
            print("\n".join(_summary(run["model"], [r for r in runs if r["model"] == run["model"]])), flush=True)
    if args.json:
        from surgery.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(runs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
