"""The experiment's results: the paired statistics over the saved verdicts (``stats.compare_arms``
of every arm against the control, per round), the tables (arms, per class, per criterion, per
round, the classes the scenario changes, colour drift), ``results.md`` / ``results.json``, the
figures, and the terminal view. Everything here reads the evaluation sets the runs left, so a
finished workdir's tables can be recomputed without touching the runs.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from rich.console import Console

from pathloop import drift
from pathloop.arms import FEEDBACK_DATA, arm_source
from pathloop.experiment import BASE, CONTROL, REAL, ExperimentConfig, final_labels, model_label

console = Console()


def scenario_classes(shards: Path) -> list[str] | None:
    """The classes the data's scenario changes (``manifest["scenario"]["classes"]``), or None:
    the scenario changes every class (artifacts, label noise) or there is none."""
    from pathloop.data import read_manifest

    return (read_manifest(shards).get("scenario") or {}).get("classes")


def _verdicts(cfg: ExperimentConfig, labels: list[str]) -> dict[str, dict[str, np.ndarray]]:
    """The saved verdicts of the base model and each label, checked to be on the same images."""
    root = Path(cfg.workdir) / "eval"
    v = {lab: dict(np.load(root / lab / "verdicts.npz")) for lab in dict.fromkeys([BASE, *labels])}
    ref = v[BASE]
    for lab, z in v.items():
        if not all(np.array_equal(z[k], ref[k]) for k in ("seed", "class_id")):
            raise ValueError(
                f"the evaluation images of {lab} differ from the base model's (seeds or classes); "
                f"the evaluation settings changed between runs: delete {root} and rerun"
            )
    return v


def _compare(
    cfg: ExperimentConfig,
    v: dict[str, dict[str, np.ndarray]],
    labels: dict[str, list[str]],
    focus: list[str] | None,
    control: str = CONTROL,
) -> list[dict[str, Any]]:
    """``stats.compare_arms`` of {row: its models' labels} against the ``control`` row's, on
    the verdicts ``v`` (``_verdicts``)."""
    from pathloop.data import read_vocab
    from pathloop.stats import compare_arms

    verdicts = {a: np.stack([v[lab]["plausible"] for lab in ls]) for a, ls in labels.items()}
    fails = {a: np.stack([v[lab]["fails"] for lab in ls]) for a, ls in labels.items()}
    vocab = read_vocab(Path(cfg.workdir) / "eval" / BASE / "samples")
    ev, class_id = cfg.evaluation, v[BASE]["class_id"]
    ids = None if focus is None else [vocab.lookup(c).id for c in focus]
    return compare_arms(
        verdicts, control, class_id, vocab, fails, ev.down_by, n_boot=ev.n_boot, focus=ids
    )


def paired_table(
    cfg: ExperimentConfig, evals: dict[str, dict], focus: list[str] | None = None
) -> list[dict[str, Any]]:
    """``stats.compare_arms`` of the arms' last-round models (S seeds x N images) and the
    pretrained model (1 x N) against the control, with each arm's PRDC and TSTR averaged over
    its seeds; ``focus`` (class codes) adds each row's difference over those classes alone."""
    labels = final_labels(cfg) | {BASE: [BASE]}
    rows = _compare(
        cfg, _verdicts(cfg, [lab for ls in labels.values() for lab in ls]), labels, focus
    )
    for row in rows:
        row.update(_mean_fidelity([evals[lab] for lab in labels[row["arm"]]]))
        if row["arm"] != CONTROL:
            ours, ctl = ([evals[lab] for lab in labels[a]] for a in (row["arm"], CONTROL))
            row["fidelity_diff"] = _fidelity_diff(ours, ctl)
    return rows


def round_table(
    cfg: ExperimentConfig, evals: dict[str, dict], focus: list[str] | None = None
) -> list[dict[str, Any]]:
    """Per round and arm: the judge's rate, the paired difference to the control's model of
    the same round [95 % interval] (and over ``focus``), and ``gain``: the paired difference
    to the same arm and seed one round earlier (round 1: to the pretrained model), what the
    round itself added; [] with one round or without every round evaluated."""
    keys = ("rate", "diff", "lo", "hi", "mcnemar_p")
    by_round = {
        rnd: {a: [model_label(a, s, rnd) for s in cfg.seeds] for a in cfg.arms}
        for rnd in range(1, cfg.rounds + 1)
    }
    every = [lab for labels in by_round.values() for ls in labels.values() for lab in ls]
    if cfg.rounds == 1 or not all(lab in evals for lab in every):
        return []
    v, out = _verdicts(cfg, every), []
    for rnd, labels in by_round.items():
        for row in _compare(cfg, v, labels, focus):
            cell = {"round": rnd, "arm": row["arm"], **{k: row.get(k) for k in keys}}
            if "focus" in row:
                cell["focus"] = {k: row["focus"].get(k) for k in keys}
            before = [model_label(row["arm"], s, rnd - 1) if rnd > 1 else BASE for s in cfg.seeds]
            pair = {"before": before, "after": labels[row["arm"]]}
            gain = _compare(cfg, v, pair, None, "before")
            cell["gain"] = {k: gain[1].get(k) for k in ("diff", "lo", "hi")}
            out.append(cell)
    return out


FIDELITY = {"prdc_precision": ("prdc", "precision"), "prdc_coverage": ("prdc", "coverage"),
            "tstr_macro_f1": ("tstr", "macro_f1")}  # fmt: skip


def _mean_fidelity(evals: list[dict]) -> dict[str, float | None]:
    """precision, coverage, TSTR macro F1 and accuracy averaged over seeds (None: not run)."""
    out = {}
    for name, (group, k) in (FIDELITY | {"tstr_accuracy": ("tstr", "accuracy")}).items():
        vals = [e[group][k] for e in evals if group in e]
        out[name] = float(np.mean(vals)) if vals else None
    return out


def _fidelity_diff(ours: list[dict], control: list[dict]) -> dict[str, dict | None]:
    """PRDC precision, coverage and TSTR macro F1: the paired difference to the control's
    model of the same seed, with a t interval over seeds (``stats.seed_difference``); None
    where a metric was not run."""
    from pathloop.stats import seed_difference

    out: dict[str, dict | None] = {}
    for name, (group, k) in FIDELITY.items():
        a, c = ([e[group][k] for e in evals if group in e] for evals in (ours, control))
        ok = a and c and len(a) in (1, len(c))  # one value per seed, or one model (base)
        out[name] = seed_difference(a, c) if ok else None
    return out


def fidelity_rows(rows: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]] | None:
    """Per arm: PRDC precision, coverage and TSTR macro F1 minus the control's, paired by
    seed, [95 % t interval over seeds]; None when no row has them."""
    others = [r for r in rows if r.get("fidelity_diff")]
    if not others or not any(v for r in others for v in r["fidelity_diff"].values()):
        return None
    head = ["arm", "PRDC precision diff", "PRDC coverage diff", "TSTR macro F1 diff"]
    body = [
        [NAMES.get(r["arm"], r["arm"]), *(_fid_cell(r["fidelity_diff"][k]) for k in FIDELITY)]
        for r in others
    ]
    return head, body


def _fid_cell(d: dict[str, Any] | None) -> str:
    if not d:
        return "–"
    return _diff(d) if np.isfinite(d["lo"]) else f"{d['diff']:+.3f} (one seed)"


def _fidelity_md(results: dict[str, Any]) -> list[str]:
    from pathloop import viz

    table = fidelity_rows(results["rows"])
    if table is None:
        return []
    title = "## PRDC and TSTR: paired difference to the control [95 % t interval over seeds]"
    return [title, "", viz.markdown_table(*table), ""]


# ----------------------------------------------------------------------------- the bars


def bar_source(arm: str) -> str:
    """The key of ``evaluation.bars`` an arm answers to: the source of its rewards
    (feedback-data, the reward model drawing the real images, counts as feedback)."""
    source = arm_source(arm)[0]
    return "feedback" if source == FEEDBACK_DATA else source


def _not_below(d: dict[str, Any] | None) -> dict[str, Any] | None:
    """A PRDC difference to the control, checked: it holds when the mean paired difference
    over seeds is at least 0; None when the metric was not run."""
    if not d:
        return None
    return {"diff": d["diff"], "lo": d["lo"], "hi": d["hi"], "holds": bool(d["diff"] >= 0)}


def bar_checks(
    rows: list[dict[str, Any]], bars: dict[str, float], down_by: float
) -> list[dict[str, Any]]:
    """Every arm with a bar (``bars`` by ``bar_source``) against the benchmark's bars: the
    paired gain over the changed classes (``focus``; all classes without one) at least the
    bar, its 95 % interval above 0, no class down by more than ``down_by``, PRDC precision and
    coverage not below the control's. ``holds``: every check holds (one not run does not)."""
    out = []
    for row in rows:
        bar = None if row["arm"] in (CONTROL, BASE) else bars.get(bar_source(row["arm"]))
        if bar is None:
            continue
        gain = row.get("focus") or row
        fid = row.get("fidelity_diff") or {}
        prdc = {k: _not_below(fid.get(f"prdc_{k}")) for k in ("precision", "coverage")}
        down = {c: row["per_class"][c]["diff"] for c in row["classes_down"]}
        checks = {
            "gain": bool(gain["diff"] >= bar - 1e-9),
            "above_0": bool(gain["lo"] > 0),
            "no_class_down": not down,
            **{k: None if v is None else v["holds"] for k, v in prdc.items()},
        }
        out.append(
            {
                "arm": row["arm"],
                "bar": bar,
                "over": "the changed classes" if "focus" in row else "all classes",
                "gain": {k: gain[k] for k in ("diff", "lo", "hi")},
                "down": down,
                "down_by": down_by,
                **prdc,
                "checks": checks,
                "holds": all(v is True for v in checks.values()),
            }
        )
    return out


def parent_metrics(results: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: ``<arm>/<name>`` of every row (None and NaN left out), each
    arm's colour drift, and ``<arm>/bars_hold`` (1 or 0) of every arm with a bar."""
    keys = ("rate", "diff", "lo", "hi", "mcnemar_p", "prdc_precision", "prdc_coverage")
    out = {}
    for row in results["rows"]:
        vals = {k: row.get(k) for k in (*keys, "tstr_macro_f1")}
        vals["classes_down"] = len(row["classes_down"])
        out.update({f"{row['arm']}/{k}": float(v) for k, v in vals.items() if v is not None})
    out = {k: v for k, v in out.items() if np.isfinite(v)} | drift.metrics(results["colour"])
    return out | {f"{b['arm']}/bars_hold": float(b["holds"]) for b in results.get("bars", [])}


def _yes(ok: bool | None) -> str:
    return "yes" if ok else "no"


def _prdc_cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return "not run"
    if not np.isfinite(d["lo"]):
        return f"{d['diff']:+.3f} (one seed): {_yes(d['holds'])}"
    noise = ", within noise" if not d["holds"] and d["hi"] >= 0 else ""
    return f"{d['diff']:+.3f} [{d['lo']:+.3f}, {d['hi']:+.3f}]: {_yes(d['holds'])}{noise}"


def bar_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The bars table: one row per arm with a bar; None when no arm has one."""
    checked = results.get("bars") or []
    if not checked:
        return None
    down_by = checked[0]["down_by"]
    head = [
        "arm",
        f"gain over {checked[0]['over']} (bar)",
        "95 % interval above 0",
        f"no class down by more than {down_by:g}",
        "PRDC precision not below the control",
        "PRDC coverage not below the control",
        "all hold",
    ]
    body = []
    for b in checked:
        g, ok = b["gain"], b["checks"]
        down = ", ".join(f"{c} {d:+.3f}" for c, d in b["down"].items())
        body.append(
            [
                b["arm"],
                f"{g['diff']:+.3f} (bar {b['bar']:+.2f}): {_yes(ok['gain'])}",
                f"[{g['lo']:+.3f}, {g['hi']:+.3f}]: {_yes(ok['above_0'])}",
                "yes" if ok["no_class_down"] else f"no: {down}",
                _prdc_cell(b["precision"]),
                _prdc_cell(b["coverage"]),
                _yes(b["holds"]),
            ]
        )
    return head, body


BARS_TEXT = (
    "Each arm with a bar (`evaluation.bars`) against the control: its paired gain at least the "
    "bar with the 95 % interval above 0, no class down by more than the margin, and PRDC "
    "precision and coverage not below the control's (the mean paired difference over seeds at "
    'least 0; "within noise": below, with an interval that reaches 0).'
)


def _bars_md(results: dict[str, Any]) -> list[str]:
    from pathloop import viz

    table = bar_rows(results)
    if table is None:
        return []
    return ["## Against the benchmark's bars", "", BARS_TEXT, "", viz.markdown_table(*table), ""]


# ----------------------------------------------------------------------------- presentation


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


ROUND_COLUMNS = [
    "round",
    "arm",
    "judge rate",
    "paired diff to control [95 % CI]",
    "McNemar p",
    "gain over the round before [95 % CI]",
]


def round_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]] | None:
    """The per-round table (rate, paired difference to the same round's control, and over the
    scenario's classes when it names them); None with one round."""
    rows = results.get("rounds") or []
    if not rows:
        return None
    focus = "focus" in rows[0]
    head = ROUND_COLUMNS + (["diff over the changed classes"] if focus else [])
    body = []
    for r in rows:
        p = _f(r.get("mcnemar_p"), 4)
        cells = [str(r["round"]), r["arm"], _f(r["rate"]), _diff(r), p, _diff(r["gain"])]
        body.append(cells + ([_diff(r["focus"])] if focus else []))
    return head, body


def _rounds_md(results: dict[str, Any]) -> list[str]:
    from pathloop import viz

    table = round_rows(results)
    if table is None:
        return []
    return [
        "## Per round: each arm's model after every round",
        "",
        "Round r of every arm is paired with the control's round-r model on the same images; "
        "the gain pairs it with the same arm and seed one round earlier (round 1: the "
        "pretrained model). The headline table above compares the last round's models.",
        "",
        "![per round](plot_rounds.png)",
        "",
        viz.markdown_table(*table),
        "",
    ]


def eval_sampler(config: dict[str, Any]) -> str:
    """How the evaluation images were drawn, from the experiment's config (a dump)."""
    sampler, ev = config["round"]["sampler"], config["evaluation"]
    steps = ev.get("steps") or sampler["steps"]
    guidance = sampler["guidance"] if ev.get("guidance") is None else ev["guidance"]
    return f"Evaluation images: {sampler['sampler']}, {steps} steps, CFG {guidance:g}."


def paired_samples(results: dict[str, Any], per_class: int = 2, scale: int = 2) -> Any:
    """The first ``per_class`` evaluation images of every class, one row per model (the
    pretrained one, then each arm's first seed): a column is one sampling seed and class, so it
    reads as the same image under every arm. A red frame marks the images the expert rejects."""
    from pathloop.data import iter_records, read_vocab
    from pathloop.judged import sampling_seed
    from pathloop.viz import image_grid

    root, first = Path(results["workdir"]) / "eval", results["config"]["seeds"][0]
    labels = {NAMES[BASE]: BASE}
    for arm in results["config"]["arms"]:
        labels[f"{arm} (seed {first})"] = model_label(arm, first, results["config"]["rounds"])
    base = np.load(root / BASE / "verdicts.npz")
    vocab = read_vocab(root / BASE / "samples")
    seeds = [  # verdicts are in seed order: the first seeds of each class, class by class
        int(s) for c in vocab.classes for s in base["seed"][base["class_id"] == c.id][:per_class]
    ]
    tiles, marks = [], []
    for label in labels.values():
        v = np.load(root / label / "verdicts.npz")
        rejected = dict(zip(v["seed"].tolist(), (v["plausible"] == 0).tolist(), strict=True))
        cols = ["image", "provenance"]
        images = {
            sampling_seed(r["provenance"]): r["image"]
            for r in iter_records(root / label / "samples", columns=cols)
        }
        tiles += [images[s] for s in seeds]
        marks += [rejected[s] for s in seeds]
    return image_grid(tiles, len(labels), len(seeds), scale, list(labels), pad=3, marks=marks)


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
        f"images and seeds; McNemar: exact, seeds pooled. {eval_sampler(results['config'])}",
        "",
        viz.markdown_table(MAIN_COLUMNS, main_rows(results)),
        "",
        "The same evaluation images under each arm (first seed; red frame: the expert rejects):",
        "",
        "![paired samples](samples_paired.png)",
        "",
        *_bars_md(results),
        *_focus_md(results),
        *_fidelity_md(results),
        *_rounds_md(results),
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
        f"Wall time of the run that wrote this: {results.get('wall_seconds', 0) / 60:.1f} min "
        "(steps found done from an earlier run not counted).",
        *(["", f"By stage: {stage_text(results)}."] if results.get("stage_seconds") else []),
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
    if results.get("rounds"):
        figs["plot_rounds"] = report.plot_rounds(results["rounds"], CONTROL)
    for name, fig in figs.items():
        files[name] = wd / f"{name}.png"
        files[name].write_bytes(report.figure_png(fig))
    files["samples_paired"] = wd / "samples_paired.png"
    paired_samples(results).save(files["samples_paired"])
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
    if (table := fidelity_rows(results["rows"])) is not None:
        title = "PRDC and TSTR minus the control's, paired by seed [95 % t interval]"
        focus.append({"title": title, "columns": table[0], "rows": table[1]})
    if (table := bar_rows(results)) is not None:
        title = f"against the benchmark's bars (evaluation.bars), {table[0][1]}"
        short = ["arm", "gain", "interval > 0", "classes down", "precision", "coverage", "all"]
        focus.insert(0, {"title": title, "columns": short, "rows": table[1]})
    if (table := round_rows(results)) is not None:
        title = "per round, against the same round's control"
        focus.append({"title": title, "columns": table[0], "rows": table[1]})
    print_tables([main, *focus, criteria | {"columns": head, "rows": body}, *drift.tables(results)])
    uri, files = results["tracking_uri"], results["files"]
    console.print(
        f"results: {files['md']}, {files['json']}\nplots: {Path(files['md']).parent}/plot_*.png, "
        f"samples_paired.png\n"
        f"MLflow store: {uri} (parent run {results['parent_run_id']})\n"
        f"  open it:   mlflow ui --backend-store-uri {uri}\n"
        f"step times (s): {results['step_seconds']}\n"
        f"wall time of this run: {results.get('wall_seconds', 0) / 60:.1f} min (steps found "
        "done not counted)"
    )
    if results.get("stage_seconds"):
        console.print(f"by stage: {stage_text(results)}")


def stage_seconds(took: Any, pretraining: float) -> dict[str, float]:
    """Wall seconds by stage from the durations of the four (data, shared steps, arms,
    evaluation), the pretraining step's own (0 when the model was given or found done) split
    out of the shared steps."""
    data, shared, arms, evaluation = (float(v) for v in took)
    out = {"data": data, "pretraining": pretraining, "shared steps": shared - pretraining}
    return {
        k: round(v, 1) for k, v in (out | {"finetuning": arms, "evaluation": evaluation}).items()
    }


def stage_text(results: dict[str, Any]) -> str:
    """The run's wall time by stage, in minutes: data, pretraining (0 when the model was given
    or found done), shared steps (pool, reward model, oracle), finetuning, evaluation."""
    return ", ".join(f"{k} {v / 60:.1f} min" for k, v in results["stage_seconds"].items())
