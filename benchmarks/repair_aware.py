"""Repair-aware search vs plain search: do masks scored after their linear repair hold up better on held-out text?

    python benchmarks/repair_aware.py                       # tinystories-l12, greedy_finercut + evolutionary
    python benchmarks/repair_aware.py --smoke               # seconds: stories260k, tiny settings
    python benchmarks/repair_aware.py --model studies/assets/models/smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf \
        --dtype bfloat16 --no-greedy --seed-strategies shortgpt gromov --init study --generations 4 --offspring 8 \
        --fit-sequences 32 --sequences 8 --calibration studies/assets/text/wikitext2_test.raw:0:0.5 \
        --heldout studies/assets/text/wikitext2_valid.tokens --out runs/repair_aware_smollm2_xfit

Two studies are run with the study machinery (``python -m search.study run`` on a config written under ``--out``),
the same in everything but ``engine.repair``, on one calibration batch of ``--fit-sequences`` + ``--sequences``
windows: ``none`` (masks scored as masked, on all of them) and ``linear`` (repair-aware, cross-fitted: each mask
scored after its linear repair, fitted on the batch's first ``--fit-sequences`` windows, on the other
``--sequences`` windows only). Then for every mask a strategy picked at each target it reports the calibration
objective on the scored windows and the held-out perplexity (``--heldout``, text disjoint from calibration) of
(a) the pruned model and (b) the repaired model, the repair fitted on the fit windows, and whether the two
scorings picked different masks. Prints one markdown table and writes
it, with the wall times and evaluation counts, as JSON (``--json``, default ``<out>/repair_aware.json``).
"""

from __future__ import annotations

import json
import math
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from surgery.cli import Parser, output_dir, output_file, positive_int  # noqa: E402

TEXT = ROOT / "studies" / "assets" / "text"
MODELS = ROOT / "studies" / "assets" / "models"
SMOKE = {"model": str(MODELS / "stories260k"), "sequences": 4, "fit_sequences": 4, "windows": 4, "seq_len": 32,
         "generations": 2, "offspring": 4, "targets": [0.25, 0.375]}
MODES = ("none", "linear")


def study_yaml(args, mode: str, out: Path) -> dict:
    """The study config of one scoring mode (absolute paths: the file may live anywhere)."""
    def text(spec: str, count: int, seed: int) -> dict:
        path, *bounds = spec.rsplit(":", 2) if spec.count(":") >= 2 else (spec,)
        section = {"files": [str(Path(path).resolve())], "num_sequences": count, "seq_len": args.seq_len, "seed": seed}
        if bounds:
            section.update(start=float(bounds[0]), end=float(bounds[1]))
        return section

    evolutionary = {"generations": args.generations, "offspring": args.offspring, "survivors": 2,
                    "stage_sequences": 2, "init": args.init, "seed": 0}
    strategies = [{"name": name} for name in args.seed_strategies]
    strategies += [] if args.no_greedy else [{"name": "greedy_finercut"}]
    strategies += [{"name": "evolutionary", "settings": evolutionary}]
    return {
        "model": {"name": str(Path(args.model).resolve()), "dtype": args.dtype, "device": "cpu", "threads": args.threads},
        "calibration": text(args.calibration, args.fit_sequences + args.sequences, 0),
        "heldout": text(args.heldout, args.windows, 1),
        "objective": args.objective,
        "reference": {"batch_size": args.batch_size},
        "budget": {"metric": "params", "targets": list(args.targets)},
        "strategies": strategies,
        "engine": {"repair": mode, "repair_sequences": args.fit_sequences},
        "selection": {"candidates": 0},
        "seed": 0,
        "output_dir": str(out / mode),
    }


def run_studies(args, out: Path) -> dict[str, Path]:
    """Run (or resume) the study of each scoring mode; its config file by mode."""
    from search.study import main as study_main

    configs = {}
    for mode in MODES:
        path = out / f"{mode}.yaml"
        path.write_text(yaml.safe_dump(study_yaml(args, mode, out)), encoding="utf-8")
        start = time.perf_counter()
        code = study_main(["run", str(path), "--no-progress"])
        if code != 0:
            raise SystemExit(f"study {path} failed (exit {code})")
        print(f"study repair={mode}: {time.perf_counter() - start:.0f} s", file=sys.stderr)
        configs[mode] = path
    return configs


def measure(args, configs: dict[str, Path]) -> dict:
    import torch

    from objectives.budgets import BUDGETS
    from objectives.calibration import mixed_batch, token_batch
    from objectives.scorer import MaskScorer
    from search.config import calibration_specs, load_config, model_source, text_source
    from search.studydir.reader import read_study
    from surgery.load import load_model
    from surgery.mask import KeepMask
    from surgery.repair import fit_linear_repair, folded

    config = load_config(configs["none"])
    name, _ = model_source(config)
    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(name, dtype=config.model.dtype, device="cpu")
    calibration = mixed_batch(calibration_specs(config), tokenizer)  # the studies' windows, as run cuts them
    fit_ids, scored_ids = calibration[: args.fit_sequences], calibration[args.fit_sequences :]  # as the scorer splits
    heldout = token_batch(text_source(config, config.heldout), tokenizer)
    params = BUDGETS.get("params")(model)
    objective = MaskScorer(model, scored_ids, config.objective, batch_size=args.batch_size)
    ppl = MaskScorer(model, heldout, "ppl", batch_size=args.batch_size)
    dense = KeepMask.dense(objective.num_layers)
    studies = {mode: read_study(Path(load_config(path).output_dir)) for mode, path in configs.items()}
    picked: dict[tuple[str, str], dict[str, str | None]] = {}
    runs = {}
    for mode, data in studies.items():
        for tag, record in data.records.items():
            runs[f"{tag}/{mode}"] = {"evaluations": record.evaluations, "forwards": record.forwards,
                                     "wall_s": record.wall_s}
            for target, mask in record.results.items():
                picked.setdefault((tag, target), {})[mode] = mask
    rows, cache = [], {}
    for (tag, target), masks in sorted(picked.items(), key=lambda kv: (kv[0][0], float(kv[0][1]))):
        differ = len({m for m in masks.values()}) > 1
        for mode in MODES:
            text = masks.get(mode)
            if text is None:
                continue
            if text not in cache:
                mask = KeepMask.parse(text)
                start = time.perf_counter()
                repair = fit_linear_repair(model, mask, fit_ids)
                fit_s = time.perf_counter() - start
                with folded(model, repair):
                    repaired = (objective.score(mask), ppl.score(mask))
                cache[text] = {"calibration_pruned": objective.score(mask), "calibration_repaired": repaired[0],
                               "heldout_ppl_pruned": ppl.score(mask), "heldout_ppl_repaired": repaired[1],
                               "removed": 1 - params.cost(mask) / params.dense, "fit_s": fit_s}
            rows.append({"strategy": tag, "target": float(target), "scoring": "repair-aware" if mode == "linear"
                         else "plain", "mask": text, "masks_differ": differ, **cache[text]})
    return {"model": name, "objective": config.objective, "dense_heldout_ppl": ppl.score(dense),
            "calibration": args.calibration, "heldout": args.heldout, "sequences": args.sequences,
            "fit_sequences": args.fit_sequences,
            "windows": args.windows, "seq_len": args.seq_len, "rows": rows, "runs": runs}


def table(result: dict) -> str:
    obj = result["objective"]
    head = ["strategy", "target", "scoring", "mask", "removed", f"cal {obj} pruned", f"cal {obj} repaired",
            "held-out ppl pruned", "held-out ppl repaired", "masks differ"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in result["rows"]:
        cells = [r["strategy"], f"{r['target']:.1%}", r["scoring"], f"`{r['mask']}`", f"{r['removed']:.1%}",
                 f"{r['calibration_pruned']:.4f}", f"{r['calibration_repaired']:.4f}",
                 f"{r['heldout_ppl_pruned']:.2f}", f"{r['heldout_ppl_repaired']:.2f}", "yes" if r["masks_differ"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    runs = ", ".join(f"{k}: {v['evaluations']} evaluations, {v['wall_s']:.0f} s" for k, v in result["runs"].items()
                     if v["wall_s"] is not None)
    return "\n".join([f"model {result['model']}; dense held-out ppl {result['dense_heldout_ppl']:.2f}", "", *lines, "",
                      f"search cost: {runs}"])


def main(argv: list[str] | None = None) -> int:
    parser = Parser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=str(MODELS / "tinystories-l12"))
    parser.add_argument("--targets", type=float, nargs="+", default=[0.25, 0.375], help="fractions of params removed")
    parser.add_argument("--calibration", default=f"{TEXT / 'tinystories_valid.txt'}:0:0.8", help="PATH[:START:END]")
    parser.add_argument("--heldout", default=f"{TEXT / 'tinystories_valid.txt'}:0.8:1",
                        help="PATH[:START:END], disjoint from the calibration text")
    parser.add_argument("--sequences", type=positive_int, default=8, help="calibration windows masks are scored on")
    parser.add_argument("--fit-sequences", type=positive_int, default=16,
                        help="more calibration windows, before those: each repair is fitted on them (never scored "
                        "by the repair-aware study)")
    parser.add_argument("--windows", type=positive_int, default=32, help="held-out windows")
    parser.add_argument("--seq-len", type=positive_int, default=128)
    parser.add_argument("--objective", default="kl", choices=["kl", "js", "ppl"])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--batch-size", type=positive_int, default=8)
    parser.add_argument("--threads", type=positive_int, default=1)
    parser.add_argument("--generations", type=positive_int, default=30)
    parser.add_argument("--offspring", type=positive_int, default=16)
    parser.add_argument("--init", default="random", choices=["random", "study"], help="evolutionary's start")
    parser.add_argument("--no-greedy", action="store_true", help="skip greedy_finercut (large models)")
    parser.add_argument("--seed-strategies", nargs="*", default=[], help="strategies run first (e.g. shortgpt)")
    parser.add_argument("--out", type=output_dir, help="study folders and configs (default runs/repair_aware; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--json", type=output_file, help="write the table here (default <out>/repair_aware.json)")
    parser.add_argument("--smoke", action="store_true", help="stories260k and tiny settings")
    args = parser.parse_args(argv)
    if args.smoke:
        vars(args).update(SMOKE)
    if args.out is None:
        args.out = Path(tempfile.mkdtemp(prefix="repair_aware_")) if args.smoke else ROOT / "runs" / "repair_aware"
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    result = measure(args, run_studies(args, out))
    print(table(result))
    path = Path(args.json) if args.json else out / "repair_aware.json"
    path.write_text(json.dumps(result, indent=1, default=lambda v: None if isinstance(v, float) and math.isnan(v)
                               else str(v)), encoding="utf-8")
    print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
