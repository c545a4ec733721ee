"""SmolLM2-135M-Instruct on CPU: float32 vs bfloat16 mask scoring, and the plain loop vs the engine on greedy steps.

    python benchmarks/smollm2.py --repeats 5 --steps 2 --engine-repeats 1

One process, 1 torch thread (``--threads``); the GGUF model is loaded once in float32 (dequantized) and cast to
bfloat16 for the second copy. Calibration is WikiText-2 (first half of ``wikitext2_test.raw``, seed 0).

1. dtype: one ``MaskScorer`` evaluation (KL to the dense model of the same dtype, full vocabulary) of a fixed
   pruned mask (``--prune-fraction`` of the sublayers, seeded) on ``--sequences`` x ``--seq-len`` tokens,
   float32 and bfloat16 interleaved, ``--repeats`` times (median); the bf16 value's relative distance from the
   fp32 one; and the ranking agreement (Spearman, same argmin) of ``--rank-masks`` single-sublayer removals.
2. engine: the first ``--steps`` greedy FinerCut steps (the project's ``greedy_finercut`` through a
   SearchContext, budget = that many sublayers) on ``--engine-sequences`` x ``--engine-seq-len`` tokens in
   ``--engine-dtype``, per ``--modes``: ``plain`` (MaskScorer per candidate), ``exact`` (prefix reuse, every
   candidate finished), ``raced`` (exact racing), ``staged`` (all candidates on ``--stage-sequences``, the best
   ``--stage-keep`` finished). Modes are interleaved (order rotated per repeat); every run gets a fresh engine.
Prints medians and ratios as markdown tables; ``--json`` also writes every measurement.

    python benchmarks/smollm2.py --smoke     # seconds: stories260k unless --model is given, the sizes of SMOKE
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, fraction, non_negative_int, output_file, positive_int  # noqa: E402
ASSETS = ROOT / "studies" / "assets"
MODEL = ASSETS / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
TEXT = ASSETS / "text" / "wikitext2_test.raw"
MODES = ("plain", "exact", "raced", "staged")
# --smoke: these sizes replace the given ones; without --model, the bundled stories260k stands in for the GGUF
SMOKE = {"repeats": 1, "sequences": 2, "seq_len": 32, "rank_masks": 3, "steps": 1, "engine_sequences": 2,
         "engine_seq_len": 32}
SMOKE_MODEL = ASSETS / "models" / "stories260k"


def load(args):
    """(float32 model, bfloat16 copy, tokenizer)."""
    import torch

    from surgery.load import load_model

    model, tokenizer = load_model(str(args.model), dtype="float32", device="cpu")
    return model, copy.deepcopy(model).to(torch.bfloat16).eval(), tokenizer


def batch(tokenizer, sequences: int, seq_len: int):
    from objectives.calibration import BatchSpec, TextSource, token_batch

    source = TextSource(files=(str(TEXT),), end=0.5)
    return token_batch(BatchSpec(source, num_sequences=sequences, seq_len=seq_len, seed=0), tokenizer)


def _timed(fn):
    wall, cpu = time.perf_counter(), time.process_time()
    value = fn()
    return value, time.perf_counter() - wall, time.process_time() - cpu


def pruned_mask(num_layers: int, fraction: float, seed: int):
    import torch

    from surgery.mask import KeepMask

    count = round(fraction * 2 * num_layers)
    removed = torch.randperm(2 * num_layers, generator=torch.Generator().manual_seed(seed))[:count]
    return KeepMask.from_removed(num_layers, sorted(removed.tolist()))


def single_removals(num_layers: int, count: int):
    """``count`` single-sublayer removals at evenly spaced flat indices (attention and FFN mixed)."""
    from surgery.mask import KeepMask

    last = 2 * num_layers - 1
    return [KeepMask.from_removed(num_layers, [round(i * last / (count - 1))]) for i in range(count)]


def dtype_part(models: dict, tokenizer, args) -> dict:
    """Timed MaskScorer evaluations per dtype (interleaved), the KL values and the ranking of single removals."""
    from scipy.stats import spearmanr

    from objectives.scorer import MaskScorer

    ids = batch(tokenizer, args.sequences, args.seq_len)
    scorers, out = {}, {"wall": {d: [] for d in models}, "cpu": {d: [] for d in models}, "reference_s": {}}
    for name, model in models.items():
        scorers[name], out["reference_s"][name], _ = _timed(
            lambda: MaskScorer(model, ids, "kl", batch_size=args.batch_size))
    mask = pruned_mask(scorers["float32"].num_layers, args.prune_fraction, args.seed)
    out["mask"], values = str(mask), {}
    for repeat in range(args.repeats):
        for name in list(models)[:: 1 if repeat % 2 == 0 else -1]:
            values[name], wall, cpu = _timed(lambda: scorers[name].score(mask))
            out["wall"][name].append(wall)
            out["cpu"][name].append(cpu)
            print(f"dtype repeat {repeat} {name}: wall {wall:.2f} s, KL {values[name]:.6g}", file=sys.stderr,
                  flush=True)
    out["kl"] = values
    masks = single_removals(scorers["float32"].num_layers, args.rank_masks)
    ranks = {name: [] for name in models}
    for k, single in enumerate(masks):
        for name in list(models)[:: 1 if k % 2 == 0 else -1]:
            ranks[name].append(scorers[name].score(single))
    fp32, bf16 = ranks["float32"], ranks["bfloat16"]
    out["ranking"] = {
        "masks": [str(m) for m in masks], "float32": fp32, "bfloat16": bf16,
        "spearman": float(spearmanr(fp32, bf16).statistic),
        "same_argmin": min(range(len(fp32)), key=fp32.__getitem__) == min(range(len(bf16)), key=bf16.__getitem__),
        "max_rel_diff": max(abs(b - f) / abs(f) for f, b in zip(fp32, bf16)),
    }
    return out


def greedy_run(scorer, mode: str, args) -> dict:
    """The first ``args.steps`` greedy FinerCut steps in one mode: per-step wall/CPU, order, finished values."""
    from objectives.budgets import sublayer_costs
    from search.evaluation.context import SearchContext
    from search.record import StudyRecord
    from search.evaluation.engine import Staging, make_scoring_backend
    from search.strategies import STRATEGIES

    evaluator = make_scoring_backend(scorer, prefix_reuse=mode != "plain")
    costs = sublayer_costs(scorer.model)
    ctx = SearchContext(scorer=scorer, costs=costs, targets=(args.steps / len(costs.per_sublayer),),
                        record=StudyRecord(), evaluator=evaluator,
                        staging=Staging(args.stage_sequences, args.stage_keep) if mode == "staged" else None,
                        racing=mode == "raced")
    strategy = STRATEGIES.get("greedy_finercut")()
    run = ctx.strategy_run("greedy_finercut", selection_only=strategy.selection_only)
    steps: list[tuple[float, float]] = []
    evaluate_many = run.evaluate_many

    def timed_step(masks, target=None):  # the strategy calls evaluate_many once per greedy step
        values, wall, cpu = _timed(lambda: evaluate_many(masks, target))
        steps.append((wall, cpu))
        return values

    run.evaluate_many = timed_step
    strategy.search(run)
    return {
        "mode": mode, "step_wall": [s[0] for s in steps], "step_cpu": [s[1] for s in steps],
        "order": [list(u) for u in strategy.order], "sublayer_forwards": evaluator.counters.sublayer_forwards,
        "values": {done.mask: done.objective for done in ctx.record.evaluations()},
    }


def engine_part(model, tokenizer, args) -> list[dict]:
    import optuna

    from objectives.scorer import MaskScorer

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ids = batch(tokenizer, args.engine_sequences, args.engine_seq_len)
    scorer = MaskScorer(model, ids, args.engine_objective, batch_size=args.batch_size)
    runs = []
    for repeat in range(args.engine_repeats):
        shift = repeat % len(args.modes)
        for mode in args.modes[shift:] + args.modes[:shift]:
            runs.append(greedy_run(scorer, mode, args) | {"repeat": repeat})
            print(f"engine repeat {repeat} {mode}: step wall "
                  f"{', '.join(f'{s:.1f}' for s in runs[-1]['step_wall'])} s", file=sys.stderr, flush=True)
    return runs


def dtype_summary(out: dict) -> list[str]:
    med = {key: {d: statistics.median(v) for d, v in out[key].items()} for key in ("wall", "cpu")}
    rank = out["ranking"]
    lines = [f"dtype: mask {out['mask']}, medians of {len(out['wall']['float32'])}; {len(rank['float32'])} single "
             f"removals ranked: Spearman {rank['spearman']:.3f}, same argmin {rank['same_argmin']}, max relative KL "
             f"difference {rank['max_rel_diff']:.3%}", "",
             "| dtype | score wall s | score CPU s | KL of the mask | reference s | single-removal KL |",
             "|---|---|---|---|---|---|"]
    for name in ("float32", "bfloat16"):
        lines.append(f"| {name} | {med['wall'][name]:.2f} | {med['cpu'][name]:.2f} | {out['kl'][name]:.6g} "
                     f"| {out['reference_s'][name]:.2f} | {[round(v, 4) for v in rank[name]]} |")
    f32, b16 = out["kl"]["float32"], out["kl"]["bfloat16"]
    return lines + [f"bf16/fp32 wall {med['wall']['bfloat16'] / med['wall']['float32']:.3f}, CPU "
                    f"{med['cpu']['bfloat16'] / med['cpu']['float32']:.3f}; KL relative difference "
                    f"{abs(b16 - f32) / abs(f32):.3%}", ""]


def _step_medians(runs: list[dict], key: str) -> list[float]:
    return [statistics.median(r[key][i] for r in runs) for i in range(len(runs[0][key]))]


def engine_summary(runs: list[dict], modes: list[str]) -> list[str]:
    by = {mode: [r for r in runs if r["mode"] == mode] for mode in modes}
    wall = {m: _step_medians(rs, "step_wall") for m, rs in by.items()}
    cpu = {m: _step_medians(rs, "step_cpu") for m, rs in by.items()}
    plain = by["plain"][0]
    lines = [f"engine: medians of {len(by['plain'])}; plain order {plain['order']}", "",
             "| mode | step wall s | wall ratios | CPU ratios | CPU total ratio | sublayer-forward ratio | finished "
             "| same order | max abs(value - plain) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for mode in modes:
        run = by[mode][0]
        diff = max(abs(r["values"][m] - plain["values"][m]) for r in by[mode] for m in r["values"]
                   if m in plain["values"])  # masks both evaluated
        same = all(r["order"] == plain["order"] for r in by[mode])
        lines.append(
            f"| {mode} | {[round(s, 2) for s in wall[mode]]} "
            f"| {[round(s / p, 3) for s, p in zip(wall[mode], wall['plain'])]} "
            f"| {[round(s / p, 3) for s, p in zip(cpu[mode], cpu['plain'])]} | {sum(cpu[mode]) / sum(cpu['plain']):.3f} "
            f"| {run['sublayer_forwards'] / plain['sublayer_forwards']:.3f} "
            f"| {len(run['values'])} / {len(plain['values'])} | {same}" + ("" if same else f" ({run['order']})")
            + f" | {diff:.3g} |")
    return lines + [""]


def parse_args(argv=None) -> argparse.Namespace:
    parser = Parser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help=f"the .gguf file (default {MODEL.name})")
    parser.add_argument("--parts", default="dtype,engine", help="comma list: dtype, engine")
    parser.add_argument("--repeats", type=positive_int, default=5, help="dtype part: timed evaluations per dtype")
    parser.add_argument("--sequences", type=positive_int, default=4, help="dtype part: calibration sequences")
    parser.add_argument("--seq-len", type=positive_int, default=256)
    parser.add_argument("--prune-fraction", type=fraction, default=0.25, help="sublayers removed in the timed mask")
    parser.add_argument("--rank-masks", type=positive_int, default=8, help="single-sublayer removals ranked in both dtypes")
    parser.add_argument("--seed", type=non_negative_int, default=0)
    parser.add_argument("--steps", type=positive_int, default=2, help="engine part: greedy steps")
    parser.add_argument("--engine-repeats", type=positive_int, default=1)
    parser.add_argument("--modes", type=lambda s: s.split(","), default=["plain", "exact", "staged"],
                        help=f"comma list of {', '.join(MODES)} (plain first)")
    parser.add_argument("--engine-sequences", type=positive_int, default=4)
    parser.add_argument("--engine-seq-len", type=positive_int, default=64)
    parser.add_argument("--engine-dtype", default="bfloat16", choices=("float32", "bfloat16"))
    parser.add_argument("--engine-objective", default="js")
    parser.add_argument("--stage-sequences", type=positive_int, default=2)
    parser.add_argument("--stage-keep", type=positive_int, default=2)
    parser.add_argument("--batch-size", type=positive_int, default=2, help="micro-batch (sequences per forward)")
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--json", type=output_file, help="also write every measurement as JSON here")
    parser.add_argument("--smoke", action="store_true", help="seconds: the sizes of SMOKE (model: SMOKE_MODEL)")
    args = parser.parse_args(argv)
    if args.smoke:
        args = argparse.Namespace(**(vars(args) | SMOKE))
    args.model = args.model or (SMOKE_MODEL if args.smoke else MODEL)
    if args.modes[0] != "plain" or not set(args.modes) <= set(MODES):
        parser.error(f"--modes must start with plain and name only {', '.join(MODES)}: {','.join(args.modes)}")
    return args


def main(argv=None) -> int:
    import torch

    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    (fp32, bf16, tokenizer), load_s, _ = _timed(lambda: load(args))
    print(f"loaded {args.model.name} in {load_s:.1f} s; torch threads {torch.get_num_threads()}", flush=True)
    models, result = {"float32": fp32, "bfloat16": bf16}, {"args": {k: str(v) for k, v in vars(args).items()}}
    if "dtype" in args.parts.split(","):
        result["dtype"] = dtype_part(models, tokenizer, args)
        print("\n".join(dtype_summary(result["dtype"])), flush=True)
    if "engine" in args.parts.split(","):
        result["engine"] = engine_part(models[args.engine_dtype], tokenizer, args)
        print("\n".join(engine_summary(result["engine"], args.modes)), flush=True)
    if args.json:
        from surgery.files import atomic_write_text

        atomic_write_text(args.json, json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
