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


def _table(title: str, columns: Sequence[str], rows: list[list[Any]]) -> dict[str, Any]:
    return {"title": title, "columns": list(columns), "rows": rows}


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
        rows = []
        if ref_setting in tstr.get(REAL, {}):
            rows.append([f"{REAL} ({ref_setting})", *_cols(tstr[REAL][ref_setting])])
        rows += [
            [lab, *_cols(tstr[lab][syn_setting])]
            for lab in labels
            if syn_setting in tstr.get(lab, {})
        ]
        if rows:
            out.append(_table(title, ["", *CLASSIFIER_COLUMNS], rows))
    return out


def _cols(m: dict[str, float]) -> list[float]:
    return [m.get(c, float("nan")) for c in CLASSIFIER_COLUMNS]


def plausibility_tables(plaus: dict[str, dict], labels: Sequence[str]) -> list[dict[str, Any]]:
    """Per source: plausible rate with its Wilson interval, per class (rows) and label (columns)."""
    out = []
    for source, by_label in plaus.items():
        present = [lab for lab in labels if lab in by_label]
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


def metric_tables(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Every table of an evaluation result (see ``evaluate.evaluate_models``), paper layout."""
    labels = result["labels"]  # baselines first, then the model
    tables = [fidelity_table(result["fidelity"], [REAL, *labels])]
    tables += classifier_tables(result["tstr"], labels)
    tables += plausibility_tables(result["plausibility"], [REAL, *labels])
    return tables


def print_tables(tables: list[dict[str, Any]]) -> None:
    """The tables in the terminal (rich)."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    for t in tables:
        rt = Table(title=t["title"])
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
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def image_png(image: Any) -> bytes:
    """A PIL image as PNG bytes."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


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
    fig, ax = plt.subplots(figsize=(max(6.0, 0.6 * len(codes) * max(len(labels), 1) ** 0.5), 3.6))
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
    ax.set_ylabel("plausible rate")
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
    fig, axes = plt.subplots(nrows, cols, figsize=(3.4 * cols, 2.8 * nrows), squeeze=False)
    xs = [float(r[x]) for r in rows]
    for ax, name in zip(axes.flat, names, strict=False):
        ax.plot(xs, [float(r.get(name, np.nan)) for r in rows], marker="o")
        ax.set_xlabel(x)
        ax.set_title(name, fontsize=9)
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


def plot_paired_classes(
    rows: Sequence[dict[str, Any]], control: str = "control", down_by: float = 0.05
) -> Any:
    """Per class, each arm's paired difference to the control with its 95 % interval (rows of
    ``stats.compare_arms`` with ``per_class``); the dashed line is -``down_by``."""
    plt = _pyplot()
    others = [r for r in rows if r["arm"] != control]
    codes = list(rows[0]["per_class"])
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(codes)), 3.6))
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
    head = "".join(f"<th>{html.escape(c)}</th>" for c in t["columns"])
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in t["rows"]
    )
    return f"<h3>{html.escape(t['title'])}</h3><table><tr>{head}</tr>{body}</table>"


def sample_grid_html(grids: dict[str, dict[str, list[np.ndarray]]], scale: int = 2) -> str:
    """Sample grids per class side by side: rows = classes, columns = labels (real, baseline,
    model), each cell a strip of that class's images. ``grids`` maps class → label → images."""
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
            strip = image_grid(ims, 1, len(ims), scale) if ims else None
            cells.append(f"<td>{_img_tag(image_png(strip), f'{cls} {lab}') if strip else '–'}</td>")
        rows.append(f"<tr><th>{html.escape(cls)}</th>{''.join(cells)}</tr>")
    return f"<table class='grid'>{head}{''.join(rows)}</table>"


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:1400px;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}td,th{border:1px solid #ccc;padding:3px 8px;
text-align:right;font-size:13px}td:first-child,th:first-child{text-align:left}
table.grid td{text-align:left}img{image-rendering:pixelated}code{background:#f4f4f4}"""


def render_report(result: dict[str, Any], out: str | Path) -> Path:
    """Write the self-contained HTML report of an evaluation ``result`` (``evaluate_models``):
    models, fidelity and classifier tables, plausibility bars and tables, sample grids, and the
    feedback-amount curve when ``result['curve']`` holds ablation rows."""
    parts = [f"<h1>{html.escape(result.get('title', 'pathloop evaluation'))}</h1>"]
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
        fig = plot_plausibility(by_label, f"plausibility per class: {source}")
        parts.append(_img_tag(figure_png(fig), f"plausibility {source}"))
    parts += [_html_table(t) for t in tables if t["title"].startswith("Plausibility")]
    if result.get("curve"):
        parts.append("<h2>Feedback-amount ablation</h2>")
        parts.append(_img_tag(figure_png(plot_metric_curve(result["curve"])), "ablation curve"))
    if result.get("grids"):
        parts.append("<h2>Samples per class</h2>" + sample_grid_html(result["grids"]))
    page = (
        "<!doctype html><html><head><meta charset='utf-8'><title>pathloop evaluation</title>"
        f"<style>{CSS}</style></head><body>{''.join(parts)}</body></html>"
    )
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page)
    return out
