"""The experiment's results: the tables (arms, per class, per criterion, the classes the scenario
changes, colour drift), ``results.md`` / ``results.json``, the figures, and the terminal view.

``experiment.run_experiment`` computes the rows (``stats.compare_arms``); this module only
presents them, so a finished workdir's tables can be rewritten without touching the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pathloop import drift
from pathloop.experiment import BASE, CONTROL, REAL, _mean_fidelity

console = Console()


def _f(v: Any, nd: int = 3) -> str:
    return "–" if v is None or (isinstance(v, float) and not np.isfinite(v)) else f"{v:.{nd}f}"


def _diff(row: dict[str, Any]) -> str:
    if row.get("diff") is None:
        return "–"
    return f"{row['diff']:+.3f} [{row['lo']:+.3f}, {row['hi']:+.3f}]"


MAIN_COLUMNS = (
    "arm|judge rate|paired diff to control [95 % CI]|McNemar p|classes down|PRDC precision|"
    "PRDC coverage|TSTR macro F1"
).split("|") + [drift.COLUMN]
NAMES = {BASE: "base (pretrained)", REAL: "real (test split)"}


def main_rows(results: dict[str, Any]) -> list[list[str]]:
    """The headline table: one row per arm, the pretrained model, and the real test split."""
    real = {"arm": REAL, "rate": results["real"]["rate"], **_mean_fidelity([results["real"]])}
    out = []
    for r in [*results["rows"], real]:
        down = "–" if r["arm"] in (CONTROL, REAL) else ", ".join(r["classes_down"]) or "none"
        keys = ("rate", "prdc_precision", "prdc_coverage", "tstr_macro_f1")
        rate, prec, cov, f1 = (_f(r[k]) for k in keys)
        p = _f(r.get("mcnemar_p"), 4)
        colour = drift.worst_cell(results.get("colour"), r["arm"])
        out.append([NAMES.get(r["arm"], r["arm"]), rate, _diff(r), p, down, prec, cov, f1, colour])
    return out


def class_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per class: the control's rate, then each other arm's paired difference [95 % CI]."""
    others = [r for r in rows if r["arm"] != CONTROL]
    ctl = rows[0]
    head = ["class", "control rate", *(f"{r['arm']} diff" for r in others)]
    body = [
        [code, _f(cell["rate"]), *(_diff(r["per_class"][code]) for r in others)]
        for code, cell in ctl["per_class"].items()
    ]
    return head, body


def focus_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Over the classes the scenario changes: each arm's rate and paired difference [95 % CI];
    None when the rows have no focus (the scenario changes every class)."""
    if "focus" not in rows[0]:
        return None
    head = ["arm", "judge rate", "paired diff to control [95 % CI]"]
    body = [
        [NAMES.get(r["arm"], r["arm"]), _f(r["focus"]["rate"]), _diff(r["focus"])] for r in rows
    ]
    return head, body


def focus_title(results: dict[str, Any]) -> str:
    return f"Over the classes the scenario changes ({', '.join(results['focus_classes'])})"


def _focus_md(results: dict[str, Any]) -> list[str]:
    """The markdown section of ``focus_rows``; [] without a focus."""
    from pathloop import viz

    table = focus_rows(results["rows"])
    return (
        [] if table is None else [f"## {focus_title(results)}", "", viz.markdown_table(*table), ""]
    )


def criteria_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    """Per criterion: each arm's fail rate, and its paired difference to the control."""
    head = ["criterion", *(f"{r['arm']} fail rate" for r in rows)]
    body = []
    for crit in rows[0]["criteria"]:
        cells = []
        for r in rows:
            c = r["criteria"][crit]
            cells.append(_f(c["rate"]) + (f" ({c['diff']:+.3f})" if c["diff"] is not None else ""))
        body.append([crit, *cells])
    return head, body


def write_outputs(results: dict[str, Any], wd: Path) -> dict[str, str]:
    """results.json, results.md, and the plots; {name: path}."""
    from pathloop import report, viz

    a = results["arithmetic"]
    md = [
        "# Experiment: does expert feedback make samples more plausible than the data alone?",
        "",
        f"Expert: the judge ({results['expert']} profile). Every arm is paired with the control "
        f"on the same {a['eval_images_per_model']} evaluation images (same seed and class) over "
        f"{results['rows'][0]['n_seeds']} finetuning seeds; intervals: two-way bootstrap over "
        "images and seeds; McNemar: exact, seeds pooled.",
        "",
        viz.markdown_table(MAIN_COLUMNS, main_rows(results)),
        "",
        *_focus_md(results),
        "## Per class: paired difference to the control [95 % CI]",
        "",
        viz.markdown_table(*class_rows(results["rows"])),
        "",
        "## Per criterion: fail rate (paired difference to the control)",
        "",
        viz.markdown_table(*criteria_rows(results["rows"])),
        "",
        *drift.markdown(results["colour"]),
        "## Arithmetic",
        "",
        viz.markdown_table(["quantity", "value"], [[k, str(v)] for k, v in a.items()]),
        "",
    ]
    files = {"json": wd / "results.json", "md": wd / "results.md"}
    files["md"].write_text("\n".join(md))
    rows, down_by = results["rows"], results["config"]["evaluation"]["down_by"]
    title = "arms on the same evaluation images (95 % interval over images and seeds)"
    figs = {
        "plot_arms": report.plot_paired_arms(rows, title),
        "plot_classes": report.plot_paired_classes(rows, CONTROL, down_by),
        "plot_colour": viz.plot_class_colour(results["colour"]),
    }
    for name, fig in figs.items():
        files[name] = wd / f"{name}.png"
        files[name].write_bytes(report.figure_png(fig))
    out = {k: str(v) for k, v in files.items()}
    files["json"].write_text(json.dumps({**results, "files": out}, indent=2, default=str))
    return out


def print_results(results: dict[str, Any]) -> None:
    """The headline and per-criterion tables, where the outputs and the MLflow store are."""
    from pathloop.report import print_tables

    head, body = criteria_rows(results["rows"])
    main = {"title": "arms against the control, on the same images", "columns": MAIN_COLUMNS[:-1]}
    criteria = {"title": "fail rate per criterion (paired difference to the control)"}
    main["rows"] = [r[:-1] for r in main_rows(results)]  # colour drift: a narrow table of its own
    focus = []
    if (table := focus_rows(results["rows"])) is not None:
        focus = [{"title": focus_title(results), "columns": table[0], "rows": table[1]}]
    print_tables([main, *focus, criteria | {"columns": head, "rows": body}, *drift.tables(results)])
    uri, files = results["tracking_uri"], results["files"]
    console.print(
        f"results: {files['md']}, {files['json']}\nplots: {Path(files['md']).parent}/plot_*.png\n"
        f"MLflow store: {uri} (parent run {results['parent_run_id']})\n"
        f"  open it:   mlflow ui --backend-store-uri {uri}\n"
        f"step times (s): {results['step_seconds']}"
    )
