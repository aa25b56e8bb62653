"""Colour drift of samples against the real data.

Finetuning, with negative-aware losses most of all, can move a model's colours while its cells stay
plausible: images grow brighter, a stain shifts hue. The expert's checklist need not notice, so
the experiment measures it beside the verdicts, per class: the mean colour of the evaluation
images, and how far it sits from the real training images' class mean in units of the real
per-image spread.

Units: pixel values in [0, 1]. An image's colour is its mean RGB (3,) and its intensity the mean of
that. A class's spread is the total std of its real images' colours, sqrt(var_R + var_G + var_B),
so a set moved by k standard deviations in every channel (or by k spreads in any one direction)
drifts by k; a sample of the real images themselves drifts by about 1/sqrt(n) of them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

MIN_SPREAD = 1 / 255  # one grey level: a class whose real images share one colour exactly
REAL = "real"  # the real test split's label, as the experiment's
PREVIEW = "preview/colour"  # MLflow metric prefix of the training previews' colours
CHANNELS = ("r", "g", "b")


def image_colours(images: Sequence[np.ndarray] | np.ndarray) -> np.ndarray:
    """Mean RGB of each uint8 (H, W, 3) image: (N, 3) in [0, 1]."""
    out = [np.asarray(im, dtype=np.float64).reshape(-1, 3).mean(0) / 255.0 for im in images]
    return np.array(out, dtype=np.float64).reshape(-1, 3)


def shard_colours(shards: str | Path, split: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean RGB (N, 3) and class code (N,) of every image of a shard set, one image at a time."""
    from pathloop.data import iter_records, read_vocab

    code = {c.id: c.code for c in read_vocab(shards).classes}
    rgb, codes = [], []
    for r in iter_records(shards, split=split, columns=["image", "class_id"]):
        rgb.append(image_colours([r["image"]])[0])
        codes.append(code[r["class_id"]])
    return np.array(rgb, dtype=np.float64).reshape(-1, 3), np.array(codes, dtype=str)


def class_colours(rgb: np.ndarray, codes: np.ndarray) -> dict[str, dict[str, Any]]:
    """Per class code, in order of first appearance: mean RGB, mean intensity, their spreads
    (``spread``: total std of the image colours; ``intensity_std``) and the image count."""
    out = {}
    for c in dict.fromkeys(codes.tolist()):
        x = rgb[codes == c]  # (n, 3)
        out[c] = {
            "rgb": x.mean(0).tolist(),
            "intensity": float(x.mean()),
            "spread": float(np.sqrt(x.var(0).sum())),
            "intensity_std": float(x.mean(1).std()),
            "n": len(x),
        }
    return out


def drift(cell: dict[str, Any], ref: dict[str, Any]) -> dict[str, float]:
    """How far a class's mean colour sits from the real class mean: ``drift``, the distance of
    the mean RGB in real spreads (>= 0); ``brightening``, the signed intensity shift in real
    intensity stds (> 0: brighter)."""
    d = np.linalg.norm(np.subtract(cell["rgb"], ref["rgb"]))
    up = cell["intensity"] - ref["intensity"]
    return {
        "drift": float(d / max(ref["spread"], MIN_SPREAD)),
        "brightening": float(up / max(ref["intensity_std"], MIN_SPREAD)),
    }


def colour_report(
    sets: dict[str, tuple[np.ndarray, np.ndarray]], reference: tuple[np.ndarray, np.ndarray]
) -> dict[str, Any]:
    """Every set's per-class colour and drift against ``reference`` (mean RGB (N, 3), codes
    (N,) of the real training images): {"reference": class_colours, "labels": {label:
    {"per_class", "worst_class", "worst", "mean"}}}; classes the reference lacks are left out."""
    ref = class_colours(*reference)
    labels = {}
    for label, (rgb, codes) in sets.items():
        own = class_colours(rgb, codes)
        cells = {c: {**own[c], **drift(own[c], ref[c])} for c in ref if c in own}
        worst = max(cells, key=lambda c: cells[c]["drift"]) if cells else None
        labels[label] = {
            "per_class": cells,
            "worst_class": worst,
            "worst": cells[worst]["drift"] if worst else None,
            "mean": float(np.mean([v["drift"] for v in cells.values()])) if cells else None,
        }
    return {"reference": ref, "labels": labels}


def eval_colour(
    root: Path, shards: Path, arms: Mapping[str, Sequence[str]], base: str = "base"
) -> dict[str, Any]:
    """``colour_report`` of an experiment's evaluation sets (``root/<label>/samples``): each arm
    pools its models' samples (``arms``: {arm: labels}, one per seed), then the pretrained model
    (``base``), and ``real``, the real test split; the reference is the real train split. Reads
    only the saved images: cheap enough for every rerun."""

    def pooled(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
        parts = [shard_colours(root / lab / "samples") for lab in labels]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    sets = {a: pooled(list(labels)) for a, labels in arms.items()}
    sets[base] = pooled([base])
    sets[REAL] = shard_colours(shards, split="test")
    return colour_report(sets, shard_colours(shards, split="train"))


def metrics(colour: dict[str, Any]) -> dict[str, float]:
    """The parent run's metrics: ``<label>/colour_drift`` (worst class) and ``_mean``."""
    out = {}
    for label, v in colour["labels"].items():
        if v["worst"] is not None:
            out[f"{label}/colour_drift"] = v["worst"]
            out[f"{label}/colour_drift_mean"] = v["mean"]
    return out


def preview_metrics(images: Sequence[np.ndarray], ids: Sequence[int], vocab: Any) -> dict:
    """Mean intensity and RGB of preview samples, overall and per class code, as MLflow metrics
    ``preview/colour/<intensity|r|g|b>`` and ``preview/colour/class/<code>/<...>``."""
    if not len(images):
        return {}
    rgb = image_colours(images)  # (N, 3)
    code = {c.id: c.code for c in vocab.classes}
    codes = np.array([code[int(i)] for i in ids], dtype=str)
    out = _named(PREVIEW, rgb.mean(0))
    for c, cell in class_colours(rgb, codes).items():
        out |= _named(f"{PREVIEW}/class/{c}", cell["rgb"])
    return out


def _named(prefix: str, rgb: Sequence[float]) -> dict[str, float]:
    return {f"{prefix}/intensity": float(np.mean(rgb))} | {
        f"{prefix}/{ch}": float(v) for ch, v in zip(CHANNELS, rgb, strict=True)
    }


# ----------------------------------------------------------------------------- tables


COLUMN = "colour drift (worst class, real-spread units)"


def worst_cell(colour: dict[str, Any] | None, label: str) -> str:
    """The table cell of a label: its worst class's drift and the class, e.g. ``1.42 (M5)``."""
    v = (colour or {}).get("labels", {}).get(label)
    return "–" if not v or v["worst"] is None else f"{v['worst']:.2f} ({v['worst_class']})"


def tables(results: dict[str, Any]) -> list[dict[str, Any]]:
    """The terminal table (``report.print_tables``) of an experiment's colour drift per model:
    its worst class, that class's drift and the mean over the classes; [] without one."""
    labels = (results.get("colour") or {}).get("labels", {})
    rows = [[lab, v["worst_class"], v["worst"], v["mean"]] for lab, v in labels.items()]
    head = ["model", "worst class", "drift (real spreads)", "mean over classes"]
    title = "colour drift from the real training images (real: its test split)"
    return [{"title": title, "columns": head, "rows": rows}] if rows else []


def markdown(colour: dict[str, Any], figure: str = "plot_colour.png") -> list[str]:
    """The results.md section: per class the real train mean RGB and spread, and each label's
    mean RGB with its drift in real spreads (brightening in real intensity stds)."""
    from pathloop.viz import markdown_table

    labels = colour["labels"]
    head = ["class", "real train RGB (spread)", *labels]
    body = []
    for c, ref in colour["reference"].items():
        cells = [_rgb(ref["rgb"]) + f" ({ref['spread']:.3f})"]
        for v in labels.values():
            x = v["per_class"].get(c)
            cells.append(
                "–"
                if x is None
                else f"{_rgb(x['rgb'])}: {x['drift']:.2f} ({x['brightening']:+.2f})"
            )
        body.append([c, *cells])
    return [
        "## Colour per class: drift from the real training images",
        "",
        "Mean RGB of each model's evaluation images (arms pooled over seeds) and its distance from "
        "the real training images' class mean, in units of the real per-image spread (std of "
        "per-image mean RGB); in brackets the intensity shift in real intensity stds (+ brighter). "
        "The real test split shows the drift sampling alone gives.",
        "",
        f"![mean intensity per class]({figure})",
        "",
        markdown_table(head, body),
        "",
    ]


def _rgb(rgb: Sequence[float]) -> str:
    return "/".join(f"{v:.2f}" for v in rgb)
