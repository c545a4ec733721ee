"""``confirm``: heal the front's best masks with LoRA / QLoRA and benchmark them with lm-eval.

    python -m search.study confirm runs/tinystories_l12 --budgets 0.3 --tasks tinystories_ppl tinystories_next

For each candidate mask: benchmark the pruned model, export it, heal it, benchmark the healed model and export
it merged (no peft needed to load it). The dense model is benchmarked once. Settings come from the study
config's ``confirm:`` mapping (or ``--config``). Results go to ``STUDY_DIR/confirm/``: ``confirm.csv``,
``confirm.md``, ``confirm.png`` and one folder per candidate holding ``result.json`` and the two exports; a
candidate whose ``result.json`` matches the current settings is not redone, and a failing candidate is reported
while the others go on.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import traceback
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from search.config import StudyConfig, calibration_specs, load_config, model_source, resolve
from search.confirm_settings import ConfirmSettings, CorpusSection, confirm_settings
from search.record import PRIMARY_COLUMN
from surgery.files import atomic_write, atomic_write_text
from surgery.errors import UserError

OUT_DIR = "confirm"


# settings --------------------------------------------------------------------------------------------------
class ConfirmError(UserError):
    """A study with nothing to confirm, or a budget no front mask meets."""


def corpus_sources(config: StudyConfig, section: CorpusSection | None) -> list:
    """The healing TextSources: the corpus section (files relative to the config, else cwd), or every
    calibration part (``calibration`` and each ``extra_calibration``)."""
    from objectives.calibration import DataError, TextSource

    if section is None:
        return [spec.source for spec in calibration_specs(config)]
    files = []
    for name in section.files:
        tried = [Path(resolve(config, name)), Path(name)]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            raise DataError(f"confirm.heal.corpus.files: {name!r} not found (tried {', '.join(map(str, tried))})")
        files.append(str(found.resolve()))
    return [TextSource(files=tuple(files), dataset=section.dataset, dataset_config=section.dataset_config,
                       split=section.split, field=section.field, start=section.start, end=section.end)]


# reading the study -----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Candidate:
    mask: str
    strategy: str
    removed_fraction: float  # of the size metric (parameters)
    size: float
    heldout_ppl: float
    why: str

    @property
    def name(self) -> str:
        digest = hashlib.sha1(self.mask.encode()).hexdigest()[:8]
        return f"removed{round(100 * self.removed_fraction):02d}-{digest}"


def study_front(study_dir: Path):
    """(front frame, size metric) of a study; a clear error when it has no completed trials."""
    from search.studydir import load_study_dir
    from search.studydir.reader import front_frame, read_study

    record, _, _ = load_study_dir(study_dir)
    if not record.evaluations():
        raise ConfirmError(f"{study_dir}: the study has no completed trials; run `python -m search.study run` first")
    data = read_study(study_dir)
    front = front_frame(data)
    front = front[front["mask"] != data.dense_mask] if not front.empty else front
    if front.empty:
        raise ConfirmError(f"{study_dir}: the study's front holds no pruned mask scored on held-out text")
    return front, data.size_metric


def pick_candidates(front: pd.DataFrame, size: str, *, top_k: int, budgets: list[float]) -> list[Candidate]:
    """Per budget, the front mask with the lowest held-out perplexity removing at least that fraction;
    without budgets, the ``top_k`` front masks with the lowest held-out perplexity."""

    def row_to(row, why: str) -> Candidate:
        return Candidate(row["mask"], str(row["strategy"]), float(row["removed_fraction"]), float(row[size]),
                         float(row[PRIMARY_COLUMN]), why)

    if not budgets:
        best = front.sort_values(PRIMARY_COLUMN, kind="stable").head(top_k)
        return [row_to(row, f"front, held-out ppl rank {i + 1}") for i, (_, row) in enumerate(best.iterrows())]
    picked: dict[str, Candidate] = {}
    for budget in budgets:
        meets = front[front["removed_fraction"] >= budget - 1e-9]
        if meets.empty:
            most = front["removed_fraction"].max()
            raise ConfirmError(f"--budgets {budget:g}: no front mask removes >= {budget:.0%} of {size} "
                               f"(the front reaches {most:.1%})")
        row = meets.sort_values(PRIMARY_COLUMN, kind="stable").iloc[0]
        picked.setdefault(row["mask"], row_to(row, f"budget {budget:g}"))
    return list(picked.values())


# benchmarking and healing ----------------------------------------------------------------------------------
def _bench(model, tokenizer, settings: ConfirmSettings, progress: bool) -> dict[str, dict]:
    from objectives.benchmarks import evaluate

    results = evaluate(model, tokenizer, settings.tasks, limit=settings.limit, limits=settings.limits,
                       batch_size=settings.batch_size, progress=progress)
    return {name: {"metric": r.headline, "value": r.value, "higher_is_better": r.higher_is_better,
                   "samples": r.samples, "metrics": r.metrics} for name, r in results.items()}


def _summary(values: dict[str, dict]) -> dict[str, float]:
    return {f"{task} {v['metric']}": v["value"] for task, v in values.items()}


def run_candidate(cand: Candidate, ctx: dict, out: Path, progress: bool) -> dict:
    """Benchmark pruned, export it, heal, benchmark healed, export the merged healed model; the result record."""
    from search.commands.heal import heal, healed_into_dense
    from surgery.export import export_pruned, num_params, prune_model
    from surgery.mask import KeepMask

    dense, tokenizer, settings = ctx["dense"], ctx["tokenizer"], ctx["settings"]
    mask = KeepMask.parse(cand.mask)
    pruned = prune_model(copy.deepcopy(dense), mask)
    pruned_scores = _bench(pruned, tokenizer, settings, progress)
    pruned_dir = export_pruned(dense, tokenizer, mask, out / "pruned", source=ctx["source"],
                               metrics=_summary(pruned_scores), force=True)
    teacher = dense if settings.heal.distill > 0 else None
    result = heal(pruned, ctx["data"], settings.heal.settings(), teacher=teacher, pretrained_dir=pruned_dir,
                  progress=progress)
    healed_scores = _bench(result.model, tokenizer, settings, progress)
    export_pruned(healed_into_dense(dense, result.model, mask), tokenizer, mask, out / "healed",
                  source=ctx["source"], metrics=_summary(healed_scores), force=True)
    return {"candidate": cand.__dict__, "name": cand.name, "fingerprint": settings.fingerprint(), "status": "ok",
            "params": num_params(pruned), "dense_params": num_params(dense), "pruned": pruned_scores,
            "healed": healed_scores, "heal_seconds": result.seconds, "heal_mode": result.mode,
            "heal_trainable": result.trainable, "heal_loss_first": result.losses[0],
            "heal_loss_last": result.losses[-1], "pruned_dir": str(pruned_dir), "healed_dir": str(out / "healed")}


def _load_done(path: Path, fingerprint: str) -> dict | None:
    if not path.is_file():
        return None
    record = json.loads(path.read_text())
    return record if record.get("fingerprint") == fingerprint and record.get("status") == "ok" else None


def dense_scores(ctx: dict, out: Path, progress: bool) -> dict:
    """The dense model's benchmark results (cached in ``dense.json`` per settings fingerprint)."""
    path = out / "dense.json"
    settings = ctx["settings"]
    done = _load_done(path, settings.fingerprint())
    if done:
        return done["scores"]
    scores = _bench(ctx["dense"], ctx["tokenizer"], settings, progress)
    record = {"fingerprint": settings.fingerprint(), "status": "ok", "scores": scores}
    atomic_write_text(path, json.dumps(record, indent=1))
    return scores


# outputs ---------------------------------------------------------------------------------------------------
def _retained(value, dense, higher: bool) -> float:
    if value is None or (higher and not dense) or (not higher and not value):
        return float("nan")
    return 100.0 * (value / dense if higher else dense / value)


def results_frame(dense: dict, records: list[dict]) -> pd.DataFrame:
    """One row per candidate and task: dense, pruned and healed values and percent of dense retained."""
    rows = []
    for rec in records:
        cand = rec["candidate"]
        base = {"candidate": rec["name"], "mask": cand["mask"], "strategy": cand["strategy"],
                "removed_fraction": cand["removed_fraction"], "params": rec.get("params"), "status": rec["status"],
                "heal_seconds": rec.get("heal_seconds"), "heal_mode": rec.get("heal_mode")}
        for task, d in dense.items():
            pruned = rec.get("pruned", {}).get(task, {}).get("value")
            healed = rec.get("healed", {}).get(task, {}).get("value")
            higher = d["higher_is_better"]
            rows.append({**base, "task": task, "metric": d["metric"], "dense": d["value"], "pruned": pruned,
                         "healed": healed, "pruned_retained_pct": _retained(pruned, d["value"], higher),
                         "healed_retained_pct": _retained(healed, d["value"], higher)})
    return pd.DataFrame(rows)


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _removed_text(mask: str) -> str:
    from surgery.mask import KeepMask

    keep = KeepMask.parse(mask)
    return (f"{keep.num_removed} of {len(keep.bits)} sublayers removed ({keep.removed_attn} attention, "
            f"{keep.removed_ffn} FFN)")


def markdown(study_dir: Path, frame: pd.DataFrame, records: list[dict], settings: ConfirmSettings) -> str:
    heal = settings.heal
    lines = [f"# Confirm: {study_dir}", "",
             f"Tasks: {', '.join(settings.tasks)} (limit {settings.limit or 'all'} per task"
             + (f", overrides {settings.limits}" if settings.limits else "") + "). "
             f"Healing: LoRA rank {heal.rank}, alpha {heal.alpha:g}, {heal.steps} steps, lr {heal.lr:g}, "
             f"batch {heal.batch_size} x {heal.seq_len} tokens, distill {heal.distill:g}, quantize {heal.quantize}.",
             "", "Retained = percent of the dense score (perplexities: dense / value).", ""]
    for rec in records:
        cand = rec["candidate"]
        lines += [f"## {rec['name']}: `{cand['mask']}`", "",
                  f"strategy {cand['strategy']} ({cand['why']}); {_removed_text(cand['mask'])}, "
                  f"{cand['removed_fraction']:.1%} of parameters removed"
                  + (f", {rec['params']:,} of {rec['dense_params']:,} kept" if rec.get("params") else "")
                  + (f"; healing {rec['heal_seconds']:.1f} s ({rec['heal_mode']}, loss {rec['heal_loss_first']:.3f}"
                     f" -> {rec['heal_loss_last']:.3f})" if rec["status"] == "ok" else f"; FAILED: {rec['error']}"), ""]
        mine = frame[frame["candidate"] == rec["name"]]
        if rec["status"] == "ok" and not mine.empty:
            lines += ["| task | metric | dense | pruned | healed | pruned retained % | healed retained % |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r.task} | {r.metric} | {_cell(r.dense)} | {_cell(r.pruned)} | {_cell(r.healed)} | "
                      f"{_cell(r.pruned_retained_pct)} | {_cell(r.healed_retained_pct)} |" for r in mine.itertuples()]
            lines.append("")
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path) -> Path:
    """Mean percent of dense retained over the tasks versus parameters removed, before and after healing."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = frame[frame["status"] == "ok"]
    mean = ok.groupby(["candidate", "removed_fraction"], as_index=False)[["pruned_retained_pct", "healed_retained_pct"]].mean()
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    x = 100 * mean["removed_fraction"]
    axis.scatter(x, mean["pruned_retained_pct"], color="C3", label="pruned")
    axis.scatter(x, mean["healed_retained_pct"], color="C2", label="healed")
    for xi, a, b in zip(x, mean["pruned_retained_pct"], mean["healed_retained_pct"]):
        axis.annotate("", (xi, b), (xi, a), arrowprops={"arrowstyle": "->", "color": "0.5"})
    axis.axhline(100, color="k", lw=0.8, ls="--", label="dense")
    axis.set(xlabel="parameters removed (%)", ylabel="mean % of dense score retained",
             title="benchmarks before and after healing")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def write_outputs(study_dir: Path, out: Path, dense: dict, records: list[dict], settings) -> dict[str, Path]:
    frame = results_frame(dense, records)
    return {"csv": atomic_write(out / "confirm.csv", lambda tmp: frame.to_csv(tmp, index=False)),
            "md": atomic_write_text(out / "confirm.md", markdown(study_dir, frame, records, settings)),
            "png": plot(frame, out / "confirm.png")}


# command ---------------------------------------------------------------------------------------------------
def load_settings(args: argparse.Namespace, config: StudyConfig) -> ConfirmSettings:
    """The confirm settings of the study (or --config), with the command-line overrides applied."""
    if args.config:
        other = load_config(args.config)
        config.confirm, config.source = other.confirm, other.source
    settings = confirm_settings(config)
    overrides = {"tasks": args.tasks, "limit": args.limit, "top_k": args.top, "budgets": args.budgets}
    data = settings.model_dump() | {k: v for k, v in overrides.items() if v is not None}
    if args.steps is not None:
        data["heal"]["steps"] = args.steps
    config.confirm = data
    return confirm_settings(config)


def main(args: argparse.Namespace) -> int:
    from objectives.benchmarks import check_tasks

    from search.checks import device_problem
    from search.studydir import StudyLock, load_study_dir, study_model

    study_dir = Path(args.study_dir)
    record, _, config = load_study_dir(study_dir)
    settings = load_settings(args, config)
    check_tasks(settings.tasks)
    problem = device_problem(f"{study_dir}/config.yaml: model.device", config.model.device)
    if problem:
        raise ConfirmError(problem)
    front, size = study_front(study_dir)
    candidates = pick_candidates(front, size, top_k=settings.top_k, budgets=settings.budgets)
    sources = corpus_sources(config, settings.heal.corpus)
    meta = record.meta()
    _, trust = study_model(study_dir, config, meta, trust_remote_code=args.trust_remote_code)
    with StudyLock(study_dir, "python -m search.study confirm"):
        return confirm(study_dir, config, settings, candidates, sources, progress=not args.no_progress,
                       trust_remote_code=trust)


def confirm(study_dir: Path, config: StudyConfig, settings: ConfirmSettings, candidates: list[Candidate],
            sources: list, *, progress: bool = True, trust_remote_code: bool | None = None) -> int:
    """Run every candidate (skipping finished ones); write the outputs; exit code 1 if any candidate failed.
    ``trust_remote_code``: None takes the config's setting (callers from the command line decide it)."""
    import torch
    from tqdm.auto import tqdm

    from search.commands.heal import corpus_windows
    from surgery.cli import load_checked

    name, _ = model_source(config)
    trust = config.model.trust_remote_code if trust_remote_code is None else trust_remote_code
    dense, tokenizer = load_checked(name, dtype=config.model.dtype, device=config.model.device,
                                    trust_remote_code=trust)
    data = torch.cat([corpus_windows(source, tokenizer, settings.heal.seq_len) for source in sources])
    out = study_dir / OUT_DIR  # created by its first file: a refusal leaves none
    ctx = {"dense": dense, "tokenizer": tokenizer, "settings": settings, "data": data, "source": name}
    dense_result = dense_scores(ctx, out, progress)
    records = []
    for cand in tqdm(candidates, desc="candidates", unit="mask", disable=not progress):
        records.append(_candidate(cand, ctx, out / cand.name, progress))
    paths = write_outputs(study_dir, out, dense_result, records, settings)
    failed = [r["name"] for r in records if r["status"] != "ok"]
    print(f"confirmed {len(records) - len(failed)} of {len(records)} candidates; {paths['md']}, {paths['csv']}, "
          f"{paths['png']}" + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


def _candidate(cand: Candidate, ctx: dict, out: Path, progress: bool) -> dict:
    """One candidate's record: reused when finished with the same settings, else run (failures recorded)."""
    fingerprint = ctx["settings"].fingerprint()
    done = _load_done(out / "result.json", fingerprint)
    if done:
        return done
    out.mkdir(parents=True, exist_ok=True)
    try:
        record = run_candidate(cand, ctx, out, progress)
    except Exception as error:  # noqa: BLE001 - one candidate's failure must not stop the others
        record = {"candidate": cand.__dict__, "name": cand.name, "fingerprint": fingerprint, "status": "failed",
                  "error": f"{type(error).__name__}: {error}", "traceback": traceback.format_exc()}
        print(f"candidate {cand.name} ({cand.mask}) failed: {record['error']}")
    atomic_write_text(out / "result.json", json.dumps(record, indent=1))
    return record
