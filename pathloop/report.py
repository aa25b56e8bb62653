"""What people read after an evaluation: paper-style tables (terminal and HTML), plots, and one
self-contained HTML report (every picture inlined as a base64 PNG, no external files).

The tables follow the papers' layout: rows = real data (the reference), baseline(s), the model;
columns = the metrics. ``metric_tables`` builds them once; ``print_tables`` (rich) and
``render_report`` (HTML) only format them.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

REAL = "real"  # the label of the reference rows
BOOKKEEPING = ("step", "segment", "trial_id", "mlflow_run_id")  # ablation columns never plotted

FIDELITY_COLUMNS = ("fid", "precision", "recall", "density", "coverage")
CLASSIFIER_COLUMNS = ("macro_f1", "accuracy", "macro_precision", "macro_recall", "auc_ovr")
PRDC_COLUMNS = FIDELITY_COLUMNS[1:]
EQUAL_COLUMNS = ("TSTR macro_f1", "TRTR-equal macro_f1", "TSTR / TRTR-equal")
METRIC_COLUMNS = (*FIDELITY_COLUMNS, *CLASSIFIER_COLUMNS, *EQUAL_COLUMNS)  # get a direction
COUNT_COLUMN = "images per class"
HIGHER, LOWER = "higher is better", "lower is better"
# Metric names (their last part) where lower is better; every other metric of the report (PRDC,
# classifier scores, plausible rates, AUC) is better higher.
LOWER_IS_BETTER = ("fid", "loss", "ece", "error")
PAGE_PX = 1280  # the report fits a window this wide: plots and sample strips are sized to it
FIG_DPI = 110
# (title, setting of the real reference row, setting of each model's row)
TSTR_TABLES = (
    ("Train on synthetic, test on real (Sun et al. 2023, Table 4)", "real", "synthetic"),
    ("Real + synthetic training images (MAGIC)", "real", "real_synthetic"),
    ("Few-shot: k real images per class + synthetic (MAGIC)", "fewshot", "fewshot_synthetic"),
)


# ----------------------------------------------------------------------------- tables


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return "–" if math.isnan(v) else f"{v:.3f}"
    return str(v)


def _table(
    title: str, columns: Sequence[str], rows: list[list[Any]], explain: str = ""
) -> dict[str, Any]:
    """A table; columns with no value in any row are left out, and ``note`` says which way
    each metric column is better (then ``explain``, when given)."""
    keep = [0] + [i for i in range(1, len(columns)) if any(not _missing(r[i]) for r in rows)]
    columns, rows = [columns[i] for i in keep], [[r[i] for i in keep] for r in rows]
    note = "; ".join(x for x in (directions(columns), explain) if x)
    return {"title": title, "columns": list(columns), "rows": rows, "note": note}


def _missing(v: Any) -> bool:
    return v is None or v == "–" or (isinstance(v, float) and math.isnan(v))


def direction(metric: str) -> str:
    """``LOWER`` for FID, losses and errors, ``HIGHER`` for the rest."""
    name = metric.rsplit("/", 1)[-1]
    return LOWER if name.endswith(LOWER_IS_BETTER) else HIGHER


def directions(columns: Sequence[str]) -> str:
    """One line on which way the metric columns are better, e.g. for the fidelity table:
    "fid: lower is better; precision, recall, density, coverage: higher is better"."""
    metrics = [c for c in columns[1:] if c in METRIC_COLUMNS]
    if not metrics:
        return "plausible rate: higher is better"  # the per-class rate tables
    by = {d: [c for c in metrics if direction(c) == d] for d in (LOWER, HIGHER)}
    return "; ".join(f"{', '.join(cs)}: {d}" for d, cs in by.items() if cs)


def fidelity_table(fidelity: dict[str, dict], labels: Sequence[str]) -> dict[str, Any]:
    """FID and PRDC, one row per label (``real`` = real held-out images vs the reference)."""
    rows = [
        [lab, *(fidelity[lab].get(c, float("nan")) for c in FIDELITY_COLUMNS)] for lab in labels
    ]
    return _table(
        "Fidelity: FID and PRDC on evaluation-classifier features", ["", *FIDELITY_COLUMNS], rows
    )


def classifier_tables(tstr: dict[str, dict], labels: Sequence[str]) -> list[dict[str, Any]]:
    """One table per TSTR comparison whose settings were run: the real reference row first."""
    out = []
    for title, ref_setting, syn_setting in TSTR_TABLES:
        rows = [
            [lab, *_cols(tstr[lab][syn_setting])]
            for lab in labels
            if syn_setting in tstr.get(lab, {})
        ]
        if not rows:  # the reference row alone compares nothing
            continue
        if ref_setting in tstr.get(REAL, {}):
            rows.insert(0, [f"{REAL} ({ref_setting})", *_cols(tstr[REAL][ref_setting])])
        out.append(_table(title, ["", *CLASSIFIER_COLUMNS], rows))
    return out


def _cols(m: dict[str, float]) -> list[float]:
    return [m.get(c, float("nan")) for c in CLASSIFIER_COLUMNS]


def _mean_cell(m: dict[str, Any] | None, key: str) -> str:
    """A metric over seeds as "mean [lo, hi]" ("mean" without an interval, "–" without it)."""
    mean = (m or {}).get(key)
    if _missing(mean):
        return "–"
    lo, hi = m.get(f"{key}_lo"), m.get(f"{key}_hi")
    return f"{mean:.3f}" if _missing(lo) or _missing(hi) else f"{mean:.3f} [{lo:.3f}, {hi:.3f}]"


def equal_count_table(tstr: dict[str, dict], labels: Sequence[str]) -> dict[str, Any] | None:
    """TSTR beside TRTR at the same real images per class (``real_equal``) and their ratio, one
    row per label with both; None when no label has both."""
    rows = []
    for lab in labels:
        m = tstr.get(lab, {})
        if not {"synthetic", "real_equal"} <= set(m):
            continue
        syn, eq = m["synthetic"], m["real_equal"]
        ratio = m.get("ratio", {}).get("macro_f1", float("nan"))
        n = syn.get("n_per_class", float("nan"))
        count = "–" if _missing(n) else int(n)
        rows.append([lab, count, _mean_cell(syn, "macro_f1"), _mean_cell(eq, "macro_f1"), ratio])
    if not rows:
        return None
    seeds = int(tstr[rows[0][0]]["synthetic"].get("n_seeds", 1))
    return _table(
        f"Synthetic vs real at equal counts: TSTR and TRTR-equal macro F1, mean [95 % t "
        f"interval] over {seeds} classifier seeds",
        ["", COUNT_COLUMN, *EQUAL_COLUMNS],
        rows,
        "TRTR-equal trains the same classifier on as many real train images per class as TSTR "
        "has synthetic ones; a ratio of 1 means the synthetic set stands in for that much real "
        "data",
    )


def prdc_test_table(prdc_test: dict[str, dict], labels: Sequence[str]) -> dict[str, Any]:
    """PRDC against the held-out test split at equal counts per class, mean [95 % t interval]
    over subsets; the real row is the real train split subsampled the same way."""
    rows = [
        [lab, int(m["n_per_class"]), *(_mean_cell(m, c) for c in PRDC_COLUMNS)]
        for lab in labels
        if (m := prdc_test.get(lab))
    ]
    seeds = int(next(iter(prdc_test.values()))["n_seeds"]) if prdc_test else 0
    return _table(
        f"PRDC against the held-out test split at equal counts per class, mean [95 % t "
        f"interval] over {seeds} subsets",
        ["", COUNT_COLUMN, *PRDC_COLUMNS],
        rows,
        "both sides are subsampled to the same images per class (the smaller side's least "
        "per-class count)",
    )


def plausibility_tables(plaus: dict[str, dict], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per source: plausible rate with its Wilson interval, per class (rows) and label (columns)."""
    out = []
    for source, by_label in plaus.items():
        present = [lab for lab in labels if by_label.get(lab, {}).get("overall", {}).get("n")]
        if not present:  # e.g. an evaluator that scored nothing
            continue
        codes = list(dict.fromkeys(c for lab in present for c in by_label[lab]["per_class"]))
        rows = [
            [code, *(_rate_cell(by_label[lab]["per_class"].get(code)) for lab in present)]
            for code in codes
        ]
        rows.append(["all", *(_rate_cell(by_label[lab]["overall"]) for lab in present)])
        out.append(
            _table(
                f"Plausibility per class ({source}), 95 % Wilson interval",
                ["class", *present],
                rows,
            )
        )
    return out


def _rate_cell(row: dict | None) -> str:
    if not row or not row["n"]:
        return "–"
    return f"{row['rate']:.2f} [{row['lo']:.2f}, {row['hi']:.2f}] n={row['n']}"


# ----------------------------------------------------------------------------- verdict


def verdict(result: dict[str, Any], classes_shown: int = 5) -> list[str]:
    """The report's first lines: the model against the label just before it (the previous
    round, or the baseline): each plausible rate with the difference and its 95 % interval
    (Newcombe), FID and TSTR macro F1, each with its direction, then the classes whose rate
    fell most (an interval below 0 is marked "clearly"). Without a baseline: the model alone."""
    labels = result["labels"]
    model, ref = labels[-1], (labels[-2] if len(labels) > 1 else None)
    lines = [
        f"{model} vs {ref}:" if ref else f"{model} (no baseline to compare with):",
        *_rate_changes(result["plausibility"], model, ref),
        *_score_changes(result, model, ref),
    ]
    if ref:
        lines += _classes_that_fell(result["plausibility"], model, ref, classes_shown)
    return lines


def _overall(table: dict | None) -> tuple[int, int]:
    row = (table or {}).get("overall") or {}
    return int(row.get("k") or 0), int(row.get("n") or 0)


def _rate_changes(plaus: dict[str, dict], model: str, ref: str | None) -> list[str]:
    from pathloop.metrics import rate_difference

    out = []
    for source, by_label in plaus.items():
        (k1, n1), (k0, n0) = _overall(by_label.get(model)), _overall(by_label.get(ref))
        if not n1:
            continue
        head = f"plausible rate ({source}, {HIGHER}): "
        if not n0:
            row = by_label[model]["overall"]
            out.append(head + f"{k1 / n1:.2f} [{row['lo']:.2f}, {row['hi']:.2f}] of {n1} images")
            continue
        d, lo, hi = rate_difference(k1, n1, k0, n0)
        out.append(
            head + f"{k0 / n0:.3f} → {k1 / n1:.3f}, {_signed(d, '.3f')} [95 % CI "
            f"{_signed(lo, '.3f')}, {_signed(hi, '.3f')}] ({n0} and {n1} images)"
        )
    return out


def _score_changes(result: dict[str, Any], model: str, ref: str | None) -> list[str]:
    """FID and TSTR macro F1 (synthetic only) of the model, and of ``ref`` when it has them."""
    scores = {
        ("FID", "fid"): {lab: m.get("fid") for lab, m in result.get("fidelity", {}).items()},
        ("TSTR macro F1", "macro_f1"): {
            lab: m.get("synthetic", {}).get("macro_f1") for lab, m in result.get("tstr", {}).items()
        },
        ("TSTR / TRTR-equal macro F1", "ratio"): {
            lab: m.get("ratio", {}).get("macro_f1") for lab, m in result.get("tstr", {}).items()
        },
    }
    out = []
    for (name, metric), by_label in scores.items():
        now, before = by_label.get(model), by_label.get(ref) if ref else None
        if _missing(now):
            continue
        text = f"{name} ({direction(metric)}): "
        if _missing(before):
            out.append(text + f"{now:.3g}")
        else:
            out.append(text + f"{before:.3g} → {now:.3g} ({_signed(now - before, '.3g')})")
    return out


def _classes_that_fell(plaus: dict[str, dict], model: str, ref: str, shown: int) -> list[str]:
    from pathloop.metrics import rate_difference

    out = []
    for source, by_label in plaus.items():
        if not (_overall(by_label.get(model))[1] and _overall(by_label.get(ref))[1]):
            continue
        before, now = by_label[ref]["per_class"], by_label[model]["per_class"]
        fell = []
        for code in now:
            a, b = now[code], before.get(code) or {}
            if a.get("n") and b.get("n"):
                d, lo, hi = rate_difference(a["k"], a["n"], b["k"], b["n"])
                if d < 0:
                    fell.append((d, lo, hi, code))
        if not fell:
            out.append(f"no class fell ({source})")
            continue
        fell.sort()
        clearly = sum(hi < 0 for _, _, hi, _ in fell)
        cells = [
            f"{code} {_signed(d)} [{_signed(lo)}, {_signed(hi)}]" + (" clearly" if hi < 0 else "")
            for d, lo, hi, code in fell[:shown]
        ]
        more = f" and {len(fell) - shown} more" if len(fell) > shown else ""
        out.append(
            f"classes that fell ({source}): {len(fell)} of {len(now)}, {clearly} clearly "
            f"(interval below 0): " + ", ".join(cells) + more
        )
    return out


def _signed(v: float, fmt: str = ".2f") -> str:
    return "–" if _missing(v) else f"{v:+{fmt}}".replace("-", "−")


def metric_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every table of an evaluation result (see ``evaluate.evaluate_models``), paper layout."""
    labels = result["labels"]  # baselines first, then the model
    tables = [fidelity_table(result["fidelity"], [REAL, *labels])]
    if result.get("prdc_test"):
        tables.append(prdc_test_table(result["prdc_test"], [REAL, *labels]))
    tables += classifier_tables(result["tstr"], labels)
    equal = equal_count_table(result["tstr"], labels)
    tables += [equal] if equal else []
    tables += plausibility_tables(result["plausibility"], [REAL, *labels])
    return tables


def print_tables(tables: list[dict[str, Any]]) -> None:
    """The tables in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for t in tables:
        rt = Table(title=t["title"], caption=t.get("note"))
        for i, c in enumerate(t["columns"]):
            rt.add_column(c, justify="left" if i == 0 else "right")
        for row in t["rows"]:
            rt.add_row(*(_fmt(v) for v in row))
        console.print(rt)


def write_csv(columns: Sequence[str], rows: list[list[Any]], path: str | Path) -> Path:
    """A table as CSV (header row, then one line per row)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(columns)
        w.writerows(rows)
    return path


# ----------------------------------------------------------------------------- plots


def figure_png(fig: Any) -> bytes:
    """A matplotlib figure as PNG bytes (the figure is closed)."""
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=FIG_DPI, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_png(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def _fig_width(inches: float) -> float:
    """A figure width in inches that fits the page (``PAGE_PX`` less margins) at ``FIG_DPI``."""
    return min(inches, (PAGE_PX - 120) / FIG_DPI)


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # no display: reports are written on servers and in Ray jobs
    import matplotlib.pyplot as plt

    return plt


def plot_plausibility(by_label: dict[str, dict], title: str = "plausibility per class") -> Any:
    """Grouped bars: per class, one bar per label (e.g. before vs after finetuning), with Wilson
    intervals as error bars. ``by_label`` maps label → ``metrics.plausibility_table`` output."""
    plt = _pyplot()
    labels = list(by_label)
    codes = list(dict.fromkeys(c for lab in labels for c in by_label[lab]["per_class"]))
    width = 0.8 / max(len(labels), 1)
    wide = max(6.0, 0.6 * len(codes) * max(len(labels), 1) ** 0.5)
    fig, ax = plt.subplots(figsize=(_fig_width(wide), 3.6))
    x = np.arange(len(codes) + 1)  # the last group is "all"
    for i, lab in enumerate(labels):
        rows = [by_label[lab]["per_class"].get(c) for c in codes] + [by_label[lab]["overall"]]
        rate = np.array([r["rate"] if r and r["n"] else np.nan for r in rows])
        lo = np.array([r["lo"] if r and r["n"] else np.nan for r in rows])
        hi = np.array([r["hi"] if r and r["n"] else np.nan for r in rows])
        # clip: at k = 0 or k = n the Wilson bound can sit 1e-17 past the rate
        err = np.clip(np.nan_to_num(np.vstack([rate - lo, hi - rate])), 0, None)
        ax.bar(
            x + (i - (len(labels) - 1) / 2) * width,
            np.nan_to_num(rate),
            width,
            yerr=err,
            capsize=2,
            label=lab,
        )
    ax.set_xticks(x, [*codes, "all"], rotation=45, ha="right")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel(f"plausible rate ({HIGHER})")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return fig


def plot_metric_curve(
    rows: Sequence[dict[str, Any]],
    x: str = "fraction",
    metrics: Sequence[str] | None = None,
    title: str = "metrics against the amount of feedback",
) -> Any:
    """One panel per metric against ``x`` (the feedback fraction of the ablation, paper Fig. 4a).

    ``rows`` are dicts {x: value, metric: value, ...}; ``metrics`` defaults to every numeric key
    but ``x``. Rows are sorted by ``x``; a row without a metric leaves a gap."""
    if not rows:
        raise ValueError("plot_metric_curve needs at least one row")
    if any(x not in r for r in rows):
        raise ValueError(f"every row needs the column {x!r}; got keys {sorted(rows[0])}")
    rows = sorted(rows, key=lambda r: float(r[x]))
    skip = (x, *BOOKKEEPING)
    names = list(metrics or [k for k in rows[0] if k not in skip and _is_number(rows[0][k])])
    if not names:
        raise ValueError(f"no numeric metric columns besides {x!r} in {sorted(rows[0])}")
    plt = _pyplot()
    cols = min(len(names), 3)
    nrows = math.ceil(len(names) / cols)
    fig, axes = plt.subplots(
        nrows, cols, figsize=(_fig_width(3.4 * cols), 2.8 * nrows), squeeze=False
    )
    xs = [float(r[x]) for r in rows]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(xs, [float(r.get(name, np.nan)) for r in rows], marker="o")
        ax.set_xlabel(x)
        ax.set_title(f"{name} ({direction(name)})", fontsize=9)
    for ax in list(axes.flat)[len(names) :]:
        ax.axis("off")
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def _paired_err(cells: Sequence[dict[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
    """(diff (n,), error bars (2, n)) of ``stats`` cells {diff, lo, hi}; NaN where None."""
    d, lo, hi = (np.array([c[k] if c[k] is not None else np.nan for c in cells]) for k in "dlh")
    return d, np.clip(np.nan_to_num(np.vstack([d - lo, hi - d])), 0, None)


def plot_paired_arms(rows: Sequence[dict[str, Any]], title: str = "arms vs control") -> Any:
    """Rows of ``stats.compare_arms``: left, each arm's rate with its per-seed rates as dots;
    right, its paired difference to the control with the 95 % interval."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    x, names = np.arange(len(rows)), [r["arm"] for r in rows]
    a1.bar(x, [r["rate"] or 0 for r in rows], color="lightgrey")
    for i, r in enumerate(rows):
        a1.scatter([i] * len(r["rate_per_seed"]), r["rate_per_seed"], color="black", s=10)
    a1.set_ylabel("plausible rate")
    d, err = _paired_err([{"d": r["diff"], "l": r["lo"], "h": r["hi"]} for r in rows])
    a2.errorbar(x, d, yerr=err, fmt="o", capsize=3)
    a2.axhline(0, color="grey", lw=0.8)
    a2.set_ylabel("paired difference to control")
    for ax in (a1, a2):
        ax.set_xticks(x, names, rotation=30, ha="right")
    fig.suptitle(title)
    return fig


def plot_rounds(rows: Sequence[dict[str, Any]], control: str = "control") -> Any:
    """Rows {round, arm, rate, diff, lo, hi} (``experiment_results.round_table``): left, each
    arm's rate after every round; right, its paired difference to the control's model of the
    same round with the 95 % interval."""
    plt = _pyplot()
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    arms = list(dict.fromkeys(r["arm"] for r in rows))
    for i, arm in enumerate(arms):
        mine = sorted((r for r in rows if r["arm"] == arm), key=lambda r: r["round"])
        x = np.array([r["round"] for r in mine], dtype=float)
        colour = f"C{i}"  # one colour per arm in both panels
        a1.plot(x, [r["rate"] for r in mine], marker="o", label=arm, color=colour)
        if arm != control:
            d, err = _paired_err([{"d": r["diff"], "l": r["lo"], "h": r["hi"]} for r in mine])
            shift = 0.06 * (i - len(arms) / 2)
            a2.errorbar(x + shift, d, yerr=err, fmt="o-", capsize=3, label=arm, color=colour)
    a2.axhline(0, color="grey", lw=0.8)
    a1.set_ylabel("plausible rate")
    a2.set_ylabel(f"paired difference to {control}")
    for ax in (a1, a2):
        ax.set_xlabel("round")
        ax.set_xticks(sorted({r["round"] for r in rows}))
        ax.legend(fontsize=8)
    fig.suptitle("per round: the same evaluation images (95 % interval over images and seeds)")
    return fig


def plot_paired_classes(
    rows: Sequence[dict[str, Any]], control: str = "control", down_by: float = 0.05
) -> Any:
    """Per class, each arm's paired difference to the control with its 95 % interval (rows of
    ``stats.compare_arms`` with ``per_class``); the dashed line is -``down_by``."""
    plt = _pyplot()
    others = [r for r in rows if r["arm"] != control]
    codes = list(rows[0]["per_class"])
    fig, ax = plt.subplots(figsize=(_fig_width(max(6.0, 0.55 * len(codes))), 3.6))
    x = np.arange(len(codes))
    for i, r in enumerate(others):
        cells = [r["per_class"][c] for c in codes]
        d, err = _paired_err([{"d": c["diff"], "l": c["lo"], "h": c["hi"]} for c in cells])
        shift = (i - (len(others) - 1) / 2) * 0.8 / max(len(others), 1)
        ax.errorbar(x + shift, d, yerr=err, fmt="o", ms=3, capsize=2, label=r["arm"])
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(-down_by, color="red", lw=0.6, ls="--")
    ax.set_xticks(x, codes, rotation=45, ha="right")
    ax.set_ylabel(f"paired difference to {control}")
    ax.set_title("per class, 95 % interval over images and seeds")
    ax.legend(fontsize=8)
    return fig


TRADEOFF = (  # (row key, column): the evaluation sweep's fidelity-diversity table
    ("prdc_test_precision", "precision (test, equal counts)"),
    ("prdc_test_coverage", "coverage (test, equal counts)"),
    ("precision", "precision (train)"),
    ("coverage", "coverage (train)"),
    ("fid", "FID"),
    ("tstr_synthetic_macro_f1", "TSTR macro F1 [95 % CI]"),
    ("plausibility_judge_rate", "judge rate"),
    ("sampling_images_per_s", "sampling images/s"),
)


def tradeoff_table(rows: Sequence[dict[str, Any]], params: Sequence[str]) -> dict[str, Any]:
    """The rows of an evaluation sweep (``trials.json``) as {columns, rows}: the searched
    ``params``, then fidelity (precision), diversity (coverage), TSTR with its interval over
    classifier seeds, and the sampling rate; columns no trial reported are left out, rows
    sorted by test coverage."""
    keys = [(k, c) for k, c in TRADEOFF if any(_is_number(r.get(k)) for r in rows)]
    order = sorted(rows, key=lambda r: -float(r.get("prdc_test_coverage", r.get("coverage", 0))))
    body = []
    for r in order:
        cells = [_param(r.get(p)) for p in params]
        for k, _ in keys:
            v = r.get(k)
            cell = _fmt(v) if _is_number(v) else "–"
            lo, hi = r.get(f"{k}_lo"), r.get(f"{k}_hi")
            if _is_number(lo) and _is_number(hi) and hi > lo:  # equal subsets: no interval
                cell += f" [{lo:.3f}, {hi:.3f}]"
            cells.append(cell)
        body.append(cells)
    return {"columns": [*(p.split(".")[-1] for p in params), *(c for _, c in keys)], "rows": body}


def _param(v: Any) -> str:
    return "none" if v is None else str(v)


def plot_tradeoff(rows: Sequence[dict[str, Any]], params: Sequence[str]) -> Any:
    """Fidelity against diversity of an evaluation sweep: one point per trial at (test
    coverage, test precision), its colour TSTR macro F1, labelled by its searched values."""
    plt = _pyplot()
    x_key = "prdc_test_coverage" if any("prdc_test_coverage" in r for r in rows) else "coverage"
    y_key = x_key.replace("coverage", "precision")
    fig, ax = plt.subplots(figsize=(_fig_width(6.5), 4.6))
    xs = [float(r.get(x_key, np.nan)) for r in rows]
    ys = [float(r.get(y_key, np.nan)) for r in rows]
    f1 = [float(r.get("tstr_synthetic_macro_f1", np.nan)) for r in rows]
    points = ax.scatter(xs, ys, c=f1, cmap="viridis", s=40)
    fig.colorbar(points, ax=ax, label="TSTR macro F1")
    for r, x, y in zip(rows, xs, ys, strict=True):
        label = ", ".join(_param(r.get(p)) for p in params)
        ax.annotate(label, (x, y), fontsize=6, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel(f"{x_key} (diversity, higher better)")
    ax.set_ylabel(f"{y_key} (fidelity, higher better)")
    ax.set_title(f"fidelity against diversity per trial ({', '.join(params)})", fontsize=9)
    fig.tight_layout()
    return fig


def _is_number(v: Any) -> bool:
    try:
        float(v)
    except (TypeError, ValueError):
        return False
    return True


def load_curve_rows(path: str | Path) -> list[dict[str, Any]]:
    """Ablation rows from a CSV (header: fraction, metric, ...) or JSON (a list of rows, or an
    object with ``rows``). Numbers are parsed; other values are kept as text."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"ablation file {str(p)!r} not found; pass a CSV or JSON of rows")
    if p.suffix.lower() == ".json":
        data = json.loads(p.read_text())
        rows = data.get("rows") if isinstance(data, dict) else data
        if not isinstance(rows, list):
            raise ValueError(f"{p}: expected a JSON list of rows or an object with 'rows'")
    else:
        with p.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    return [{k: float(v) if _is_number(v) else v for k, v in r.items()} for r in rows]


# ----------------------------------------------------------------------------- HTML


def _img_tag(png: bytes, alt: str) -> str:
    data = base64.b64encode(png).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def _html_table(t: dict[str, Any]) -> str:
    head = "".join(f"<th>{html.escape(c)}{_arrow(c)}</th>" for c in t["columns"])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in t["rows"]
    )
    note = f"<p class='note'>{html.escape(t['note'])}</p>" if t.get("note") else ""
    return f"<h3>{html.escape(t['title'])}</h3>{note}<table><tr>{head}</tr>{body}</table>"


def _arrow(column: str) -> str:
    if column not in METRIC_COLUMNS:
        return ""
    return " ↓" if direction(column) == LOWER else " ↑"


def _strip_shape(n: int, side: int, n_labels: int, scale: int) -> tuple[int, int]:
    """(rows, cols) of a class's strip of ``n`` images so that ``n_labels`` strips side by
    side, with the class column and margins, fit ``PAGE_PX``."""
    room = (PAGE_PX - 64 - 90) // max(n_labels, 1) - 20  # px of one label's cell
    cols = max(1, min(n, (room - 2) // (side * scale + 2)))
    return math.ceil(n / cols), cols


def sample_grid_html(grids: dict[str, dict[str, list[np.ndarray]]], scale: int = 2) -> str:
    """Sample grids per class side by side: rows = classes, columns = labels (real, baseline,
    model), each cell that class's images, wrapped onto more lines when a strip would make
    the table wider than the page. ``grids`` maps class → label → images."""
    from pathloop.viz import image_grid

    labels = list(dict.fromkeys(lab for by in grids.values() for lab in by))
    head = (
        "<tr><th>class</th>" + "".join(f"<th>{html.escape(lab)}</th>" for lab in labels) + "</tr>"
    )
    rows = []
    for cls, by_label in grids.items():
        cells = []
        for lab in labels:
            ims = by_label.get(lab) or []
            if not ims:
                cells.append("<td>–</td>")
                continue
            shape = _strip_shape(len(ims), ims[0].shape[1], len(labels), scale)
            strip = image_grid(ims, *shape, scale)
            cells.append(f"<td>{_img_tag(image_png(strip), f'{cls} {lab}')}</td>")
        rows.append(f"<tr><th>{html.escape(cls)}</th>{''.join(cells)}</tr>")
    return f"<table class='grid'>{head}{''.join(rows)}</table>"


CSS = f"""body{{font-family:system-ui,sans-serif;margin:2em auto;padding:0 2em;
max-width:{PAGE_PX - 64}px;color:#222}}
table{{border-collapse:collapse;margin:0.5em 0 1.5em}}td,th{{border:1px solid #ccc;
padding:3px 8px;text-align:right;font-size:13px}}td:first-child,th:first-child{{text-align:left}}
table.grid td{{text-align:left}}img{{image-rendering:pixelated;max-width:100%;height:auto}}
code{{background:#f4f4f4;word-break:break-all}}p.note{{color:#555;font-size:13px;margin:0}}
ul.verdict{{background:#f6f8fa;border-left:4px solid #4a7;padding:0.6em 1em 0.6em 2em}}"""


def _header(result: dict[str, Any]) -> list[str]:
    """Title, the verdict and where the run is in MLflow."""
    parts = [f"<h1>{html.escape(title_of(result))}</h1>"]
    lines = verdict(result)
    parts.append(
        f"<p><b>{html.escape(lines[0])}</b></p><ul class='verdict'>"
        + "".join(f"<li>{html.escape(x)}</li>" for x in lines[1:])
        + "</ul>"
    )
    run = result.get("mlflow")
    if run:
        link = f"<a href='{html.escape(run['url'])}'>{html.escape(run['run_name'])}</a>"
        text = f"MLflow run: {link} (<code>{html.escape(run['run_id'])}</code>)"
        if run.get("parent"):
            text += f", a step of run {html.escape(run['parent'])}"
        if run.get("ui"):
            text += f"; the link needs <code>{html.escape(run['ui'])}</code> running"
        parts.append(f"<p>{text}</p>")
    return parts


def render_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write the self-contained HTML report of an evaluation ``result`` (``evaluate_models``):
    title, verdict and MLflow link, models, fidelity and classifier tables (with the data they
    hold, and which way each metric is better), plausibility bars and tables, sample grids, and
    the feedback-amount curve when ``result['curve']`` holds ablation rows. It fits a window
    ``PAGE_PX`` wide."""
    parts = _header(result)
    models = "".join(
        f"<tr><td>{html.escape(lab)}</td><td><code>{html.escape(str(ref))}</code></td></tr>"
        for lab, ref in result["models"].items()
    )
    parts.append(f"<h2>Models</h2><table><tr><th>label</th><th>reference</th></tr>{models}</table>")
    parts.append(f"<p>{html.escape(result.get('notes', ''))}</p>")
    tables = metric_tables(result)
    parts.append("<h2>Fidelity and usefulness</h2>")
    parts += [_html_table(t) for t in tables if not t["title"].startswith("Plausibility")]
    parts.append("<h2>Plausibility per class</h2>")
    for source, by_label in result["plausibility"].items():
        scored = {lab: t for lab, t in by_label.items() if t["overall"]["n"]}
        if scored:
            fig = plot_plausibility(scored, f"plausibility per class: {source}")
            parts.append(_img_tag(figure_png(fig), f"plausibility {source}"))
    parts += [_html_table(t) for t in tables if t["title"].startswith("Plausibility")]
    if result.get("curve"):
        parts.append("<h2>Feedback-amount ablation</h2>")
        parts.append(_img_tag(figure_png(plot_metric_curve(result["curve"])), "ablation curve"))
    if result.get("grids"):
        parts.append("<h2>Samples per class</h2>" + sample_grid_html(result["grids"]))
    page = (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title_of(result))}"
        f"</title><meta name='viewport' content='width=device-width'><style>{CSS}</style></head>"
        f"<body>{''.join(parts)}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out


def title_of(result: dict[str, Any]) -> str:
    return str(result.get("title", "pathloop evaluation"))
