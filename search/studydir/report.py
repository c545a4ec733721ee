"""The Pareto report of a study directory (tables, plots, a markdown summary), written atomically.

Files: ``trials.csv`` (one row per evaluated mask and strategy), ``front.csv`` (Pareto front of parameters
versus held-out perplexity, with the strategy that found each point), ``pareto.png`` / ``pareto.html``
(fronts per strategy, dense model marked), ``layers.png`` (which sublayers each front mask removes) and
``summary.md`` (strategies compared at each budget, with the optimality gap against exhaustive search) and, for a
study with validation text, ``recommended.csv`` (the recommended mask per budget, see :mod:`search.selection`) with
the strategies' ranks on calibration, validation and held-out text in ``summary.md``.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from search.record import PRIMARY_COLUMN, heldout_set_name
from search.stored import StrategyRecord
from search.studydir.opened import Study
from search.studydir.reader import (
    VALIDATION_COLUMN, StudyData, front_frame, pareto_mask, read_study, recommended,
)
from surgery.files import atomic_write, atomic_write_text
from surgery.mask import KeepMask, sublayer_name


# tables ----------------------------------------------------------------------------------------------------
def results_frame(data: StudyData) -> pd.DataFrame:
    """Each strategy's result at each budget target, with its objective, held-out ppl and optimality gap."""
    metric = data.meta.budget_metric
    objective = data.trials.drop_duplicates("mask").set_index("mask")["objective"].to_dict()
    costs = data.trials.drop_duplicates("mask").set_index("mask")[metric].to_dict()
    rows = []
    for tag, record in data.records.items():
        for key, mask in record.results.items():
            rows.append({"target": float(key), "strategy": tag, "mask": mask, metric: costs.get(mask),
                         "objective": objective.get(mask), **data.heldout_columns(mask),
                         VALIDATION_COLUMN: data.validation_value(mask)})
    frame = pd.DataFrame(rows, columns=["target", "strategy", "mask", metric, "objective", PRIMARY_COLUMN,
                                        *data.extra_heldout, VALIDATION_COLUMN])
    exhaustive = _exhaustive(data)
    optimum = {float(k): objective.get(m) for k, m in (exhaustive.results if exhaustive else {}).items() if m}
    frame["optimum"] = frame["target"].map(optimum)
    frame["gap"] = frame["objective"] - frame["optimum"]
    return frame.sort_values(["target", "strategy"], kind="stable").reset_index(drop=True)


def _exhaustive(data: StudyData) -> StrategyRecord | None:
    return next((r for r in data.records.values() if r.name == "exhaustive" and r.done), None)


# summary.md ------------------------------------------------------------------------------------------------
def _md_table(frame: pd.DataFrame) -> str:
    def cell(value) -> str:
        if value is None or (isinstance(value, float) and pd.isna(value)):
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if value.is_integer() and abs(value) >= 1e4 else f"{value:.4g}"
        return str(value).replace("|", "\\|")

    head = "| " + " | ".join(frame.columns) + " |\n|" + "---|" * len(frame.columns)
    body = ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([head, *body])


def _gap_text(row) -> str:
    if pd.isna(row.optimum) or pd.isna(row.objective):
        return "-"
    if abs(row.gap) < 1e-9:
        return "0 (optimum)"
    return f"+{row.gap:.4g} ({row.gap / row.optimum:+.1%})" if row.optimum > 0 else f"+{row.gap:.4g}"


def _strategy_table(data: StudyData, results: pd.DataFrame) -> pd.DataFrame:
    rows = []
    for tag, record in data.records.items():
        mine = results[results["strategy"] == tag]
        reached = int(((mine["gap"].abs() < 1e-9)).sum()) if mine["optimum"].notna().any() else None
        rows.append({"strategy": tag, "evaluations": record.evaluations, "forwards": record.forwards,
                     "wall s": record.wall_s, "masks found": f"{int(mine['mask'].notna().sum())}/{len(mine)}",
                     "at optimum": "-" if reached is None else f"{reached}/{int(mine['optimum'].notna().sum())}",
                     "notes": "; ".join(record.notes)})
    return pd.DataFrame(rows)


def _is_seed(data: StudyData, tag: str) -> bool:
    """Whether a strategy tag ran one of the published baselines (``Strategy.seed_method``)."""
    from search.strategies import STRATEGIES

    record = data.records.get(tag)
    name = record.name if record is not None else tag
    return name in STRATEGIES and bool(getattr(STRATEGIES.get(name), "seed_method", False))


def _best(group: pd.DataFrame, column: str):
    """(value, the strategies whose result is that mask, the mask) of the lowest ``column`` in ``group``."""
    group = group.dropna(subset=[column])
    if group.empty:
        return None
    best = group.sort_values(column, kind="stable").iloc[0]
    return best[column], "+".join(group.loc[group["mask"] == best["mask"], "strategy"]), best["mask"]


def comparison_frame(data: StudyData, results: pd.DataFrame) -> pd.DataFrame:
    """Per target and held-out set: the best seed method against the best of the project's own strategies
    ("same mask" where a warm-started own strategy returned the seed's mask unchanged)."""
    seeds = results["strategy"].map(lambda tag: _is_seed(data, tag))
    rows = []
    for target, group in results.groupby("target", sort=True):
        for column in [PRIMARY_COLUMN, *data.extra_heldout]:
            seed, own = _best(group[seeds[group.index]], column), _best(group[~seeds[group.index]], column)
            if seed is None or own is None:
                continue
            rows.append({"target": target, "held-out set": column, "best seed": seed[1], "seed ppl": seed[0],
                         "best own": own[1], "own ppl": own[0],
                         "change": f"{own[0] / seed[0] - 1:+.1%}" + (" (same mask)" if own[2] == seed[2] else "")})
    return pd.DataFrame(rows)


def _dense_heldout_text(data: StudyData) -> str:
    parts = [f"{heldout_set_name(c) + ' ' if heldout_set_name(c) else ''}{'-' if v is None else f'{v:.4g}'}"
             for c, v in data.heldout_columns(data.dense_mask).items()]
    return ", ".join(parts)


def _repair_lines(meta) -> list[str]:
    """The summary's note on repair-aware scoring (``engine.repair``), empty without it."""
    repair = (meta.fingerprint or {}).get("repair")
    if not isinstance(repair, dict):
        return []
    ridge = f" (ridge {repair['ridge']:g})" if "ridge" in repair else ""
    return [f"Repair-aware scoring: every calibration objective is that of the masked model after its "
            f"`{repair.get('method')}` repair, fitted on the first {repair.get('fit_sequences')} calibration "
            f"sequences{ridge} and scored on the others only; held-out and validation perplexities are of the "
            "masked model without repair.", ""]


def summary_markdown(data: StudyData, results: pd.DataFrame, front: pd.DataFrame) -> str:
    meta, metric = data.meta, data.meta.budget_metric
    lines = [f"# Study {data.study_dir}", "",
             f"model `{meta.model}`, {meta.num_layers} layers; objective `{meta.objective}` on calibration "
             f"text; budget `{metric}` (dense {meta.dense[metric]:g} {meta.units.get(metric, '')}); "
             f"{len(data.trials)} trials. Dense model: held-out perplexity {_dense_heldout_text(data)}.", "",
             *_repair_lines(meta),
             "## Strategies", "", _md_table(_strategy_table(data, results)), ""]
    for target, group in results.groupby("target", sort=True):
        limit = (1 - target) * meta.dense[metric]
        table = pd.DataFrame({"strategy": group["strategy"], "mask": group["mask"], metric: group[metric],
                              "objective": group["objective"], "gap vs exhaustive": [_gap_text(r) for r in group.itertuples()],
                              "held-out ppl": group[PRIMARY_COLUMN],
                              **{f"held-out ppl {heldout_set_name(c)}": group[c] for c in data.extra_heldout}})
        if data.validation:
            table[f"validation {data.criterion}"] = group[VALIDATION_COLUMN]
        lines += [f"## Budget: {target:.0%} of {metric} removed ({metric} <= {limit:g})", "", _md_table(table), ""]
    comparison = comparison_frame(data, results)
    if not comparison.empty:
        lines += ["## Seed methods vs the project's own search (best of each at each target, on held-out text)", "",
                  _md_table(comparison), ""]
    lines += selection_markdown(data, results)
    lines += ["## Pareto front: size vs held-out perplexity", "", _md_table(front) if not front.empty else "(empty)", ""]
    return "\n".join(lines)


def selection_markdown(data: StudyData, results: pd.DataFrame) -> list[str]:
    """The recommended masks, then each strategy's rank on calibration, validation and held-out text per target
    with the rank correlations: where the search fitted its calibration text, the ranks disagree."""
    import numpy as np

    from search.selection import rank_correlations, rank_frame

    chosen = recommended(data)
    if chosen.empty:
        return []
    criterion, windows = data.criterion, data.validation["windows"]
    domains = ", ".join(next(iter(windows.values())))
    lines = ["## Recommended mask per budget (picked on validation text)", "",
             f"Validation domains: {domains}; {len(windows)} masks scored in {data.validation.get('wall_s', 0):.0f} s. "
             f"`export` takes these masks by default.", "",
             _md_table(chosen.drop(columns=["reason"])), ""]
    lines += [f"- {row.target:.1%}: {row.reason}" for row in chosen.itertuples()]
    noisy = chosen[chosen["within_noise"]]
    lines += [f"- **warning** {row.target:.1%}: the lead over {row.runner_up_strategy} ({row.lead:.3g}) is within "
              f"{2:g} standard errors ({row.lead_se:.2g}); more validation text would separate them"
              for row in noisy.itertuples()]
    held = [PRIMARY_COLUMN, *data.extra_heldout]
    scored = results.copy()
    scored["heldout"] = np.log(scored[held].astype(float)).mean(axis=1)
    columns = {"calibration": "objective", "validation": VALIDATION_COLUMN, "held-out": "heldout"}
    ranks = rank_frame(scored, columns)
    lines += ["", "### Ranks on calibration, validation and held-out text", "",
              f"Each strategy's result ranked per target (1 = best; held-out: mean log-perplexity over "
              f"{len(held)} held-out set(s)). Spearman correlations between the rankings:", "",
              _md_table(rank_correlations(ranks, list(columns))), "", _md_table(ranks), ""]
    return lines


# plots -----------------------------------------------------------------------------------------------------
def _dense_objective(data: StudyData) -> float:
    return 0.0 if data.meta.dense_objective is None else data.meta.dense_objective


def _own_front(frame: pd.DataFrame, size: str, quality: str) -> pd.DataFrame:
    frame = frame.dropna(subset=[size, quality]).drop_duplicates("mask")
    return frame[pareto_mask(frame[size], frame[quality])].sort_values(size) if len(frame) else frame


def plot_pareto_png(data: StudyData, results: pd.DataFrame, front: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    size, dense = data.size_metric, data.meta.dense[data.size_metric]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
    sizes = data.trials.drop_duplicates("mask").set_index("mask")[size].to_dict()
    for i, (tag, group) in enumerate(data.trials.groupby("strategy", sort=False)):
        color = f"C{i % 10}"
        left.scatter(group[size], group["objective"], s=6, alpha=0.25, color=color)
        own = _own_front(group, size, "objective")
        left.plot(own[size], own["objective"], marker="o", ms=3, color=color, label=tag)
        mine = results[results["strategy"] == tag].dropna(subset=[PRIMARY_COLUMN]).copy()
        mine[size] = mine["mask"].map(sizes)
        mine = mine.sort_values(size)
        right.plot(mine[size], mine[PRIMARY_COLUMN], marker="o", ms=4, alpha=0.8, color=color, label=tag)
    left.scatter([dense], [_dense_objective(data)], marker="*", s=200, color="k", label="dense", zorder=5)
    if not front.empty:
        right.step(front[size], front[PRIMARY_COLUMN], where="post", color="k", lw=1.5, label="overall front")
    if data.dense_mask in data.heldout:
        right.scatter([dense], [data.heldout[data.dense_mask]], marker="*", s=200, color="k", label="dense", zorder=5)
        right.set_yscale("log")
    left.set(xlabel=size, ylabel=f"calibration {data.meta.objective}", title="calibration: every trial, per-strategy fronts")
    right.set(xlabel=size, ylabel="held-out perplexity", title="held-out: each strategy's results, overall front")
    for axis in (left, right):
        axis.grid(alpha=0.3)
        axis.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def plot_pareto_html(data: StudyData, front: pd.DataFrame, path: Path) -> Path:
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    size = data.size_metric
    fig = make_subplots(rows=1, cols=2, subplot_titles=("calibration objective (every trial)", "held-out perplexity"))
    for tag, group in data.trials.groupby("strategy", sort=False):
        text = group["mask"] + " | " + group["strategy"]
        fig.add_trace(go.Scatter(x=group[size], y=group["objective"], mode="markers", name=tag, text=text,
                                 legendgroup=tag, marker={"size": 5}), row=1, col=1)
        held = group.dropna(subset=[PRIMARY_COLUMN]).drop_duplicates("mask")
        fig.add_trace(go.Scatter(x=held[size], y=held[PRIMARY_COLUMN], mode="markers", name=tag, text=held["mask"],
                                 legendgroup=tag, showlegend=False, marker={"size": 8}), row=1, col=2)
    if not front.empty:
        fig.add_trace(go.Scatter(x=front[size], y=front[PRIMARY_COLUMN], mode="lines+markers", name="front",
                                 text=front["mask"] + " | " + front["strategy"], line={"shape": "hv", "color": "black"}),
                      row=1, col=2)
    dense = data.meta.dense[size]
    fig.add_trace(go.Scatter(x=[dense], y=[_dense_objective(data)], mode="markers", name="dense",
                             marker={"symbol": "star", "size": 14, "color": "black"}), row=1, col=1)
    fig.update_xaxes(title_text=size)
    fig.update_layout(title=f"Study {data.study_dir}: size vs quality", hovermode="closest")
    return atomic_write(path, lambda tmp: fig.write_html(tmp, include_plotlyjs=True))


def plot_layers_png(data: StudyData, front: pd.DataFrame, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    layers = data.meta.num_layers
    rows = front if not front.empty else pd.DataFrame({"mask": [data.dense_mask], "strategy": ["dense"]})
    grid = np.array([[0.0 if keep else 1.0 for keep in KeepMask.parse(m).bits] for m in rows["mask"]])
    fig, axis = plt.subplots(figsize=(max(6, 0.35 * 2 * layers + 3), max(2.5, 0.35 * len(rows) + 1.5)))
    axis.imshow(grid, cmap="Reds", vmin=0, vmax=1.4, aspect="auto")
    axis.set_xticks(range(2 * layers), [sublayer_name(i) for i in range(2 * layers)], rotation=90, fontsize=7)
    size = data.size_metric
    labels = [f"{_short(r.strategy)} | {getattr(r, size):.4g} {size} | ppl {r.heldout_ppl:.3g}" if size in rows
              else r.strategy for r in rows.itertuples()]
    axis.set_yticks(range(len(rows)), labels, fontsize=7)
    axis.set(xlabel="sublayer (A attention, M FFN); red = removed", title="removed sublayers of each front mask")
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    plt.close(fig)
    return path


def _short(finders: str) -> str:
    names = finders.split("+")
    return finders if len(names) <= 2 else f"{names[0]}+{len(names) - 1} more"


# everything ------------------------------------------------------------------------------------------------
def dashboard_command(storage: str) -> str:
    return f"optuna-dashboard {storage}"


def write_report(study: Study | Path, *, quiet: bool = False) -> dict[str, Path]:
    """Write every report file of a study (an opened one, e.g. ``run``'s, or its directory); their paths by name."""
    data = read_study(study)
    out = data.study_dir
    front, results = front_frame(data), results_frame(data)
    paths = {
        "trials": atomic_write(out / "trials.csv", lambda tmp: data.trials.to_csv(tmp, index=False)),
        "front": atomic_write(out / "front.csv", lambda tmp: front.to_csv(tmp, index=False)),
        "pareto_png": plot_pareto_png(data, results, front, out / "pareto.png"),
        "pareto_html": plot_pareto_html(data, front, out / "pareto.html"),
        "layers_png": plot_layers_png(data, front, out / "layers.png"),
        "summary": atomic_write_text(out / "summary.md", summary_markdown(data, results, front)),
    }
    chosen = recommended(data)
    if not chosen.empty:
        paths["recommended"] = atomic_write(out / "recommended.csv", lambda tmp: chosen.to_csv(tmp, index=False))
    print(f"inspect the study: {dashboard_command(data.storage)}")
    if not quiet:
        print(f"summary: {paths['summary']}")
    return paths
