"""``confirm``'s outputs: ``confirm.csv`` (one row per candidate and task or held-out text), ``confirm.md`` (per
candidate: each variant's value +- standard error, held-out perplexity, wall time, share of the pruning loss won
back) and ``confirm.png`` (mean percent of dense retained per variant versus parameters removed)."""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from search.commands.variants import LABELS, VARIANTS
from surgery.files import atomic_write, atomic_write_text


def _retained(value, dense, higher: bool) -> float:
    if value is None or dense is None or (higher and not dense) or (not higher and not value):
        return float("nan")
    return 100.0 * (value / dense if higher else dense / value)


def _rows(dense: dict, records: list[dict]) -> list[tuple[str, str, str, bool]]:
    """(kind, task or held-out column, metric, higher is better) of every measured row, tasks first (from the
    dense record, else from the first measured variant)."""
    measured = [dense, *(v for rec in records for v in rec.get("variants", {}).values())]
    first = next((m for m in measured if m.get("scores")), {"scores": {}})
    tasks = [("task", task, d["metric"], d["higher_is_better"]) for task, d in first["scores"].items()]
    return tasks + [("heldout", column, "perplexity", False) for column in first.get("heldout_ppl", {})]


def _value(measured: dict | None, row: str) -> tuple[float | None, float | None]:
    """(value, standard error) of one task or held-out column in a measured record."""
    if not measured:
        return None, None
    if row in measured.get("heldout_ppl", {}):
        return measured["heldout_ppl"][row], None
    task = measured.get("scores", {}).get(row)
    return (task["value"], task.get("stderr")) if task else (None, None)


def results_frame(dense: dict, records: list[dict]) -> pd.DataFrame:
    """One row per candidate and task (or held-out text): dense and each variant's value, standard error,
    percent of dense retained, and each variant's build and evaluation seconds."""
    rows = []
    for rec in records:
        cand, variants = rec["candidate"], rec.get("variants", {})
        base = {"candidate": rec["name"], "mask": cand["mask"], "strategy": cand["strategy"],
                "removed_fraction": cand["removed_fraction"], "params": rec.get("params"), "status": rec["status"]}
        for variant in VARIANTS:
            done = variants.get(variant) or {}
            base[f"{variant}_build_s"], base[f"{variant}_eval_s"] = done.get("build_seconds"), done.get("eval_seconds")
        for kind, row, metric, higher in _rows(dense, records):
            values = {"kind": kind, "task": row, "metric": metric, "higher_is_better": higher}
            values["dense"], values["dense_stderr"] = _value(dense, row)
            for variant in VARIANTS:
                value, stderr = _value(variants.get(variant), row)
                values |= {variant: value, f"{variant}_stderr": stderr,
                           f"{variant}_retained_pct": _retained(value, values["dense"], higher)}
            rows.append({**base, **values})
    return pd.DataFrame(rows)


def recovered(frame: pd.DataFrame, tasks: list[str], variant: str) -> float:
    """Share of what pruning lost that ``variant`` wins back, on the mean of ``tasks``' values (for perplexity
    rows, on log-perplexity): (variant - pruned) / (dense - pruned)."""
    rows = frame[frame["task"].isin(tasks)]
    if rows.empty or rows[variant].isna().any() or rows["pruned"].isna().any():
        return float("nan")
    transform = (lambda s: s.map(math.log)) if not rows["higher_is_better"].any() else (lambda s: s)
    dense, pruned, mine = (transform(rows[c].astype(float)).mean() for c in ("dense", "pruned", variant))
    return (mine - pruned) / (dense - pruned) if dense != pruned else float("nan")


def _cell(value, stderr=None) -> str:
    if value is None or (isinstance(value, float) and pd.isna(value)):
        return "-"
    text = f"{value:.4g}" if isinstance(value, float) else str(value)
    return text if stderr is None or pd.isna(stderr) else f"{text} ± {stderr:.2g}"


def _removed_text(mask: str) -> str:
    from surgery.mask import KeepMask

    keep = KeepMask.parse(mask)
    return (f"{keep.num_removed} of {len(keep.bits)} sublayers removed ({keep.removed_attn} attention, "
            f"{keep.removed_ffn} FFN)")


def _candidate_table(mine: pd.DataFrame, variants: list[str], rec: dict) -> list[str]:
    heads = ["dense", *variants]
    lines = ["| task | metric | " + " | ".join(LABELS[v] for v in heads) + " |",
             "|---|---|" + "---|" * len(heads)]
    for r in mine.to_dict("records"):
        cells = [_cell(r[v], r.get(f"{v}_stderr")) for v in heads]
        lines.append(f"| {r['task']} | {r['metric']} | " + " | ".join(cells) + " |")
    times = [rec["variants"].get(v, {}) for v in variants]
    lines.append("| wall s (build + evaluation) | | - | "
                 + " | ".join(f"{t.get('build_seconds', 0):.0f} + {t.get('eval_seconds', 0):.0f}" for t in times) + " |")
    return lines


def _recovery_lines(mine: pd.DataFrame, variants: list[str], tasks: list[str]) -> list[str]:
    heldout = list(mine.loc[mine["kind"] == "heldout", "task"])
    parts = []
    for variant in variants[1:]:
        acc, ppl = recovered(mine, tasks, variant), recovered(mine, heldout, variant)
        parts.append(f"{LABELS[variant]} {_pct(acc)} of the accuracy, {_pct(ppl)} of the held-out log-perplexity")
    return [f"Won back of what pruning lost (mean of {', '.join(tasks)}; held-out log-perplexity: mean over "
            f"{', '.join(heldout) or 'none'}): " + "; ".join(parts) + ".", ""] if parts else []


def _pct(share: float) -> str:
    return "-" if pd.isna(share) else f"{100 * share:.0f}%"


def markdown(title: str, frame: pd.DataFrame, records: list[dict], settings, variants: list[str]) -> str:
    heal = settings.heal
    tasks = [] if frame.empty else settings.recovery_tasks or list(frame.loc[(frame["kind"] == "task") & frame["higher_is_better"].astype(bool),
                                                      "task"].drop_duplicates())
    lines = [f"# Confirm: {title}", "",
             f"Tasks: {', '.join(settings.tasks)} (limit {settings.limit or 'all'} per task"
             + (f", overrides {settings.limits}" if settings.limits else "") + "); value ± standard error. "
             f"Repair: {settings.repair}. Healing: LoRA rank {heal.rank}, alpha {heal.alpha:g}, {heal.steps} steps, "
             f"lr {heal.lr:g}, batch {heal.batch_size} x {heal.seq_len} tokens, distill {heal.distill:g}, "
             f"quantize {heal.quantize}; repaired+LoRA heals the repaired weights.", "",
             "Wall time: building the variant from the dense model (repair fit, LoRA training) + its benchmarks and "
             "held-out perplexity.", ""]
    for rec in records:
        cand = rec["candidate"]
        lines += [f"## {rec['name']}: `{cand['mask']}`", "",
                  f"strategy {cand['strategy']} ({cand['why']}); {_removed_text(cand['mask'])}, "
                  + (f"{rec['params']:,} of {rec['dense_params']:,} parameters kept"
                     f" ({1 - rec['params'] / rec['dense_params']:.1%} removed)" if rec.get("params") else "")
                  + ("" if rec["status"] == "ok" else f"; FAILED: {rec['error']}"), ""]
        mine = frame[frame["candidate"] == rec["name"]]
        if rec["status"] == "ok" and not mine.empty:
            lines += _candidate_table(mine, variants, rec) + [""] + _recovery_lines(mine, variants, tasks)
    return "\n".join(lines)


def plot(frame: pd.DataFrame, path: Path, variants: list[str]) -> Path:
    """Mean percent of dense retained over the tasks versus parameters removed, one marker per variant."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [f"{v}_retained_pct" for v in variants]
    fig, axis = plt.subplots(figsize=(6.5, 4.5))
    ok = frame[frame["status"] == "ok"] if not frame.empty else None
    mean = ok.groupby(["candidate", "removed_fraction"], as_index=False)[columns].mean() if ok is not None else None
    for i, variant in enumerate(variants if mean is not None else []):
        axis.scatter(100 * mean["removed_fraction"], mean[f"{variant}_retained_pct"], color=f"C{i}",
                     label=LABELS[variant])
    axis.axhline(100, color="k", lw=0.8, ls="--", label="dense")
    axis.set(xlabel="parameters removed (%)", ylabel="mean % of dense score retained",
             title="benchmarks and held-out perplexity per variant")
    axis.grid(alpha=0.3)
    axis.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def write_outputs(title: str, out: Path, dense: dict, records: list[dict], settings, variants) -> dict[str, Path]:
    frame = results_frame(dense, records)
    variants = list(variants)
    return {"csv": atomic_write(out / "confirm.csv", lambda tmp: frame.to_csv(tmp, index=False)),
            "md": atomic_write_text(out / "confirm.md", markdown(title, frame, records, settings, variants)),
            "png": plot(frame, out / "confirm.png", variants)}
