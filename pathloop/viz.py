"""Pictures and tables people look at: sample grids, per-class grids, rate tables."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def image_grid(
    images: Sequence[np.ndarray],
    rows: int,
    cols: int,
    scale: int = 1,
    labels: Sequence[str] | None = None,
    pad: int = 2,
    marks: Sequence[bool] | None = None,
) -> Any:
    """Tile uint8 (H, W, 3) images row-major into a PIL image, upscaled without smoothing.

    ``labels`` (one per row) are drawn whole in a left margin as wide as the longest, in a font
    sized to the row, so a per-class grid reads at a glance. ``marks`` (one per image): a red
    frame in the padding (pad - 1 wide) around the images marked True (e.g. the ones the
    expert rejects).
    """
    from PIL import Image, ImageDraw, ImageFont

    if not images:
        raise ValueError("image_grid needs at least one image")
    h, w = images[0].shape[:2]
    hs, ws = h * scale, w * scale
    font = ImageFont.load_default(size=max(10, min(16, hs // 3)))  # scalable since Pillow 10.1
    margin = 0 if not labels else 12 + int(max(font.getlength(s) for s in labels))
    grid = Image.new("RGB", (margin + cols * (ws + pad) + pad, rows * (hs + pad) + pad), "white")
    for i, img in enumerate(images[: rows * cols]):
        r, c = divmod(i, cols)
        tile = Image.fromarray(np.asarray(img, dtype=np.uint8)).resize((ws, hs), Image.NEAREST)
        x, y = margin + pad + c * (ws + pad), pad + r * (hs + pad)
        if marks is not None and marks[i] and pad > 1:  # 1 px of white left to the neighbour
            b = pad - 1
            frame = (x - b, y - b, x + ws + b - 1, y + hs + b - 1)
            ImageDraw.Draw(grid).rectangle(frame, outline=(220, 0, 0), width=b)
        grid.paste(tile, (x, y))
    if labels:
        draw = ImageDraw.Draw(grid)
        for r, text in enumerate(labels[:rows]):
            y = pad + r * (hs + pad) + hs // 2  # the row's middle: anchor "lm" centres the text
            draw.text((4, y), text, fill=(0, 0, 0), font=font, anchor="lm")
    return grid


def class_samples(
    unet: Any, noise: Any, vocab: Any, sampler: Any, per_class: int = 4
) -> tuple[list[np.ndarray], list[int]]:
    """``per_class`` samples of every class (the one ``sample()`` loop): uint8 (H, W, 3) images
    in class order, and their class ids."""
    from pathloop.diffusion import sample, to_uint8

    ids = [c.id for c in vocab.classes for _ in range(per_class)]
    x = sample(
        unet,
        noise,
        ids,
        sampler=sampler.sampler,
        steps=sampler.steps,
        guidance=sampler.guidance,
        seed=sampler.seed,
        batch_size=sampler.batch_size,
    )
    return list(to_uint8(x)), ids


def samples_grid(images: list[np.ndarray], vocab: Any, per_class: int, scale: int = 2) -> Any:
    """``class_samples`` output as a grid: one row per class."""
    return image_grid(
        images,
        len(vocab),
        per_class,
        scale,
        labels=[f"{c.code} {c.name}" for c in vocab.classes],
    )


def class_grid(
    unet: Any, noise: Any, vocab: Any, sampler: Any, per_class: int = 4, scale: int = 2
) -> Any:
    """One row per class of ``per_class`` samples from ``unet``."""
    images, _ = class_samples(unet, noise, vocab, sampler, per_class)
    return samples_grid(images, vocab, per_class, scale)


def shard_grid(shard_dir: Any, per_class: int = 8, scale: int = 2, split: str | None = None) -> Any:
    """A per-class grid of the first ``per_class`` images of each class in a shard set."""
    from pathloop.data import iter_records, read_vocab

    vocab = read_vocab(shard_dir)
    rows: dict[int, list[np.ndarray]] = {c.id: [] for c in vocab.classes}
    for r in iter_records(shard_dir, split=split, columns=["image", "class_id"]):
        if len(rows[r["class_id"]]) < per_class:
            rows[r["class_id"]].append(r["image"])
    present = [c for c in vocab.classes if rows[c.id]]
    blank = np.full_like(next(iter(rows[present[0].id])), 255)
    tiles = [(rows[c.id] + [blank] * per_class)[i] for c in present for i in range(per_class)]
    return image_grid(
        tiles, len(present), per_class, scale, labels=[f"{c.code} {c.name}" for c in present]
    )


def _rate_style(v: float) -> str:
    return "green" if v >= 0.85 else "yellow" if v >= 0.5 else "red"


def print_rate_table(report: dict, title: str = "plausibility per class") -> None:
    """A rich table of a judge/plausibility report: per-class rates and per-criterion passes."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title)
    t.add_column("class")
    t.add_column("plausible", justify="right")
    for name, rate in report.get("per_class", {}).items():
        t.add_row(name, f"[{_rate_style(rate)}]{rate:.2f}")
    t.add_row("[bold]all", f"[bold]{report['plausible_rate']:.3f}")
    Console().print(t)
    crit = report.get("per_criterion")
    if crit:
        c = Table(title="criteria passed")
        for k in crit:
            c.add_column(k, justify="right")
        c.add_row(*[f"{v:.2f}" for v in crit.values()])
        Console().print(c)


def print_comparison(a: dict, b: dict, name_a: str, name_b: str, title: str = "") -> None:
    """Per-class plausibility of two reports side by side, with the change."""
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title or f"judge plausibility: {name_a} vs {name_b}")
    for col in ("class", name_a, name_b, "change"):
        t.add_column(col, justify="left" if col == "class" else "right")
    for cls in a.get("per_class", {}):
        va, vb = a["per_class"][cls], b["per_class"].get(cls, float("nan"))
        t.add_row(cls, f"{va:.2f}", f"[{_rate_style(vb)}]{vb:.2f}", f"{vb - va:+.2f}")
    ra, rb = a["plausible_rate"], b["plausible_rate"]
    t.add_row("[bold]all", f"{ra:.3f}", f"[bold]{rb:.3f}", f"[bold]{rb - ra:+.3f}")
    Console().print(t)


def print_blinded(stats: dict) -> None:
    """A rich table of a blinded real-vs-synthetic round (``review_stats.blinded_stats``): per
    rater and pooled accuracy with its interval, the test against guessing, agreement."""
    from rich.console import Console
    from rich.table import Table

    level = round(100 * stats["confidence"])
    t = Table(title=f"real vs synthetic: accuracy ({level} % interval, chance {stats['chance']})")
    for col in ("rater", "answers", "accuracy", f"{level} % CI", "p vs chance", "unsure", "skip"):
        t.add_column(col, justify="left" if col == "rater" else "right")
    rows = [(n, r) for n, r in stats["raters"].items()] + [("[bold]pooled", stats["pooled"])]
    for name, r in rows:
        acc = "-" if r["accuracy"] is None else f"{r['accuracy']:.3f}"
        ci = "-" if r["ci"] is None else f"{r['ci'][0]:.3f}-{r['ci'][1]:.3f}"
        p = "-" if r["p_value"] is None else f"{r['p_value']:.3g}"
        extra = (str(r.get("n_unsure", "")), str(r.get("n_skipped", "")))
        t.add_row(name, str(r["n"]), acc, ci, p, *extra)
    Console(stderr=True).print(t)
    a = stats["agreement"]
    kappa = "-" if a["kappa"] is None else f"{a['kappa']:.3f}"
    Console(stderr=True).print(
        f"agreement between raters: {a['method'] or 'n/a'} kappa {kappa} over {a['n_items']} images"
    )


def plot_class_colour(colour: dict[str, Any]) -> Any:
    """``drift.colour_report`` as two panels over the classes: above, the real training images'
    mean intensity with one real intensity std as a band and one marker per label (arm, base,
    real test); below, each label's drift in real spreads."""
    import matplotlib

    matplotlib.use("Agg")  # no display: plots are written on servers and in Ray jobs
    import matplotlib.pyplot as plt

    ref, labels = colour["reference"], colour["labels"]
    codes = list(ref)
    x = np.arange(len(codes))
    mean = np.array([ref[c]["intensity"] for c in codes])
    std = np.array([ref[c]["intensity_std"] for c in codes])
    fig, (top, low) = plt.subplots(2, 1, figsize=(max(6.0, 0.55 * len(codes)), 5.6), sharex=True)
    top.bar(x, 2 * std, bottom=mean - std, width=0.8, color="lightgrey", label="real ± 1 std")
    top.hlines(mean, x - 0.4, x + 0.4, color="grey", lw=0.8)
    for i, (label, v) in enumerate(labels.items()):
        shift = (i - (len(labels) - 1) / 2) * 0.7 / max(len(labels), 1)
        cells = [v["per_class"].get(c) for c in codes]
        y = [np.nan if p is None else p["intensity"] for p in cells]
        d = [np.nan if p is None else p["drift"] for p in cells]
        top.plot(x + shift, y, "o", ms=3, label=label)
        low.plot(x + shift, d, "o", ms=3, label=label)
    top.set_ylabel("mean intensity")
    top.set_title("per class: mean intensity of the evaluation images (real train: band)")
    top.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    low.axhline(1, color="red", lw=0.6, ls="--")
    low.set_ylabel("colour drift (real spreads)")
    low.set_xticks(x, codes, rotation=45, ha="right")
    return fig


def markdown_table(head: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    """A Markdown table: the header row, its rule, one line per row."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in body])
