"""The pixel-level criteria judge: a simulated expert for the phantom cells.

The judge measures an image from pixels alone (colour segmentation, connected components,
areas, lobes, colours, texture) and checks each of the 7 criteria of ``vocab.CRITERIA`` against
the accepted intervals (``ACCEPT``) of the *declared* class. It never sees generator parameters,
so it grades diffusion samples exactly like phantoms (``phantoms.py`` draws those). Images of any
size are judged at ``JUDGE_SIZE`` px (area-downsampled), so one set of intervals serves 32 and
64 px data.

Expert profiles (``EXPERTS``) say what is accepted: "default" is ``ACCEPT``, fitted to the
renderer, so it passes nearly every phantom; "strict" (``ACCEPT_STRICT``) accepts only part of
what the annotation of a few classes covers, the strict-expert scenario of ``write_phantoms``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage as ndi

from pathloop.phantoms import Range, class_code, shuffle_classes
from pathloop.vocab import BONE_MARROW_16, CRITERIA, Vocabulary

if TYPE_CHECKING:
    from scipy.spatial import ConvexHull

JUDGE_SIZE = 32  # px side the judge works at; its intervals are calibrated there


# ----------------------------------------------------------------- what the judge accepts per class


# Which criterion each measured feature belongs to (a criterion fails if any of its features
# falls outside the declared class's interval).
MEASURE_CRITERION: dict[str, str] = {
    "cell_diam": "cell_size",  # equivalent-circle diameter / image side
    "cell_solidity": "cell_size",  # area / convex-hull area: cells are smooth, noise is not
    "cell_edge": "cell_size",  # cell pixels on the frame border / side: a cut-off cell has no size
    "cell_notch": "cell_size",  # deepest dent of the outline / radius: overlapping cells
    "bg_light": "cell_size",  # background lightness: a cell is only measurable on a pale smear
    "nuc_area": "nucleus_shape_size",  # nucleus area / image area
    "nuc_lobes": "nucleus_shape_size",  # separate nuclear lobes
    "nuc_solidity": "nucleus_shape_size",  # round ~1, kidney ~0.85, band/segmented lower
    "nuc_elong": "nucleus_shape_size",  # major/minor axis of the whole nucleus
    "nc_ratio": "nc_ratio",  # nucleus area / cell area
    "cyto_light": "cytoplasm",  # cytoplasm lightness relative to background
    "cyto_blue": "cytoplasm",  # mean (B - R): basophilic blue > 0 > eosinophilic pink
    "cyto_red": "cytoplasm",  # mean (R - G): pink/lilac > 0 > blue-grey
    "pallor": "cytoplasm",  # centre minus rim lightness: the red-cell central pallor
    "chrom_light": "chromatin",  # nucleus lightness: pyknotic nuclei are darkest
    "chrom_texture": "chromatin",  # lightness std inside the nucleus: fine < coarse < clumped
    "nucleoli": "inclusions",  # pale holes inside the nucleus, fraction of nuclear area
    "vacuoles": "inclusions",  # near-white holes in the cytoplasm, fraction of cell area
    "gran_dark": "granules",  # dark specks off the nucleus, fraction of cell area
    "gran_orange": "granules",  # orange (eosinophil) pixels, fraction of cell area
    "cyto_texture": "granules",  # high-pass std of the cytoplasm: fine granules speckle it
}


# The judge's accepted intervals, written by ``judge_calibration.calibrate_accept()`` from
# phantoms of tuning seeds 5000 and 6000; the tests check them on other seeds.
# fmt: off
ACCEPT: dict[str, dict[str, Range]] = {
    "B1": {
        "cell_diam": (0.55, 0.67), "cell_solidity": (0.89, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.08), "bg_light": (0.81, 1.05), "nuc_area": (0.073, 0.139),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.81, 1), "nuc_elong": (1, 1.4),
        "nc_ratio": (0.26, 0.44), "cyto_light": (0.65, 0.78), "cyto_blue": (0.1, 0.34),
        "cyto_red": (-0.13, 0.08), "pallor": (-0.36, -0.11), "chrom_light": (0.25, 0.42),
        "chrom_texture": (0.013, 0.059), "nucleoli": (0, 0.03), "vacuoles": (0, 0.01),
        "gran_dark": (0.008, 0.104), "gran_orange": (0, 0.02), "cyto_texture": (0.031, 0.127),
    },
    "B2": {
        "cell_diam": (0.47, 0.6), "cell_solidity": (0.87, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.14), "bg_light": (0.8, 1.05), "nuc_area": (0.028, 0.095),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.54, 1), "nuc_elong": (1, 3),
        "nc_ratio": (0.13, 0.43), "cyto_light": (0.71, 0.85), "cyto_blue": (-0.04, 0.18),
        "cyto_red": (-0.06, 0.15), "pallor": (-0.46, 0.15), "chrom_light": (0.13, 0.31),
        "chrom_texture": (0, 0.102), "nucleoli": (0, 0.05), "vacuoles": (0, 0.025),
        "gran_dark": (0.011, 0.141), "gran_orange": (0, 0.02), "cyto_texture": (0.075, 0.197),
    },
    "E1": {
        "cell_diam": (0.6, 0.72), "cell_solidity": (0.89, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.07), "bg_light": (0.8, 1.05), "nuc_area": (0.071, 0.136),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.83, 1), "nuc_elong": (1, 1.5),
        "nc_ratio": (0.22, 0.38), "cyto_light": (0.7, 0.82), "cyto_blue": (-0.35, -0.14),
        "cyto_red": (0.1, 0.3), "pallor": (-0.48, -0.22), "chrom_light": (0.26, 0.42),
        "chrom_texture": (0.011, 0.062), "nucleoli": (0, 0.03), "vacuoles": (0, 0.016),
        "gran_dark": (0, 0.01), "gran_orange": (0.04, 0.24), "cyto_texture": (0.022, 0.053),
    },
    "E4": {
        "cell_diam": (0.54, 0.66), "cell_solidity": (0.89, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.1), "bg_light": (0.8, 1.05), "nuc_area": (0.019, 0.059),
        "nuc_lobes": (1, 2), "nuc_solidity": (0.47, 0.85), "nuc_elong": (1.8, 4.3),
        "nc_ratio": (0.07, 0.2), "cyto_light": (0.68, 0.79), "cyto_blue": (-0.43, -0.23),
        "cyto_red": (0.15, 0.35), "pallor": (-0.07, 0.19), "chrom_light": (0.2, 0.42),
        "chrom_texture": (0, 0.077), "nucleoli": (0, 0.02), "vacuoles": (0, 0.021),
        "gran_dark": (0, 0.014), "gran_orange": (0.12, 0.48), "cyto_texture": (0.024, 0.056),
    },
    "ER1": {
        "cell_diam": (0.69, 0.83), "cell_solidity": (0.9, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.07), "bg_light": (0.81, 1.05), "nuc_area": (0.167, 0.296),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.86, 1.01), "nuc_elong": (1, 1.4),
        "nc_ratio": (0.4, 0.59), "cyto_light": (0.6, 0.73), "cyto_blue": (0.2, 0.41),
        "cyto_red": (-0.21, -0.01), "pallor": (-0.21, 0.01), "chrom_light": (0.31, 0.45),
        "chrom_texture": (0.005, 0.044), "nucleoli": (0, 0.11), "vacuoles": (0, 0.01),
        "gran_dark": (0, 0.019), "gran_orange": (0, 0.02), "cyto_texture": (0.007, 0.05),
    },
    "ER2": {
        "cell_diam": (0.51, 0.63), "cell_solidity": (0.88, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.07), "bg_light": (0.82, 1.05), "nuc_area": (0.082, 0.151),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1.01), "nuc_elong": (1, 1.5),
        "nc_ratio": (0.36, 0.54), "cyto_light": (0.65, 0.78), "cyto_blue": (0.16, 0.38),
        "cyto_red": (-0.19, 0.01), "pallor": (-0.33, -0.09), "chrom_light": (0.27, 0.41),
        "chrom_texture": (0.017, 0.06), "nucleoli": (0, 0.02), "vacuoles": (0, 0.01),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0, 0.046),
    },
    "ER3": {
        "cell_diam": (0.4, 0.51), "cell_solidity": (0.87, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.09), "bg_light": (0.81, 1.05), "nuc_area": (0.032, 0.077),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.8, 1), "nuc_elong": (1, 1.5),
        "nc_ratio": (0.24, 0.42), "cyto_light": (0.68, 0.82), "cyto_blue": (-0.05, 0.18),
        "cyto_red": (-0.09, 0.13), "pallor": (-0.52, -0.22), "chrom_light": (0.21, 0.4),
        "chrom_texture": (0.009, 0.063), "nucleoli": (0, 0.02), "vacuoles": (0, 0.01),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.001, 0.038),
    },
    "ER4": {
        "cell_diam": (0.33, 0.44), "cell_solidity": (0.86, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.09), "bg_light": (0.83, 1.05), "nuc_area": (0, 0.033),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.74, 1.05), "nuc_elong": (1, 1.6),
        "nc_ratio": (0.06, 0.22), "cyto_light": (0.72, 0.86), "cyto_blue": (-0.24, -0.03),
        "cyto_red": (0.06, 0.28), "pallor": (-0.66, -0.15), "chrom_light": (0.14, 0.3),
        "chrom_texture": (0, 0.083), "nucleoli": (0, 0.02), "vacuoles": (0, 0.01),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.01, 0.039),
    },
    "ER5": {
        "cell_diam": (0.31, 0.42), "cell_solidity": (0.85, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.1), "bg_light": (0.81, 1.05), "nuc_area": (0, 0.01),
        "nuc_lobes": (0, 0), "nc_ratio": (0, 0.03), "cyto_light": (0.72, 0.85),
        "cyto_blue": (-0.1, 0.13), "cyto_red": (0, 0.22), "pallor": (-0.07, 0.08),
        "nucleoli": (0, 0.02), "vacuoles": (0, 0.01), "gran_dark": (0, 0.01),
        "gran_orange": (0, 0.02), "cyto_texture": (0.012, 0.033),
    },
    "ER6": {
        "cell_diam": (0.26, 0.37), "cell_solidity": (0.84, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.11), "bg_light": (0.81, 1.05), "nuc_area": (0, 0.01),
        "nuc_lobes": (0, 0), "nc_ratio": (0, 0.03), "cyto_light": (0.71, 0.87),
        "cyto_blue": (-0.28, -0.07), "cyto_red": (0.1, 0.33), "pallor": (-0.1, 0.23),
        "nucleoli": (0, 0.02), "vacuoles": (0, 0.096), "gran_dark": (0, 0.01),
        "gran_orange": (0, 0.02), "cyto_texture": (0.016, 0.056),
    },
    "M1": {
        "cell_diam": (0.52, 0.65), "cell_solidity": (0.89, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.08), "bg_light": (0.8, 1.05), "nuc_area": (0.122, 0.201),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.86, 1), "nuc_elong": (1, 1.5),
        "nc_ratio": (0.51, 0.68), "cyto_light": (0.68, 0.8), "cyto_blue": (0.13, 0.33),
        "cyto_red": (-0.17, 0.03), "pallor": (-0.16, 0.09), "chrom_light": (0.32, 0.46),
        "chrom_texture": (0.007, 0.051), "nucleoli": (0.01, 0.13), "vacuoles": (0, 0.014),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
    },
    "M2": {
        "cell_diam": (0.72, 0.86), "cell_solidity": (0.9, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.07), "bg_light": (0.82, 1.05), "nuc_area": (0.132, 0.223),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1), "nuc_elong": (1.1, 2.1),
        "nc_ratio": (0.28, 0.43), "cyto_light": (0.64, 0.76), "cyto_blue": (0.12, 0.35),
        "cyto_red": (-0.16, 0.05), "pallor": (-0.35, -0.13), "chrom_light": (0.27, 0.41),
        "chrom_texture": (0.017, 0.06), "nucleoli": (0, 0.02), "vacuoles": (0, 0.013),
        "gran_dark": (0.002, 0.07), "gran_orange": (0, 0.02), "cyto_texture": (0.034, 0.082),
    },
    "M3": {
        "cell_diam": (0.55, 0.68), "cell_solidity": (0.89, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.08), "bg_light": (0.81, 1.05), "nuc_area": (0.086, 0.151),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1), "nuc_elong": (1, 1.5),
        "nc_ratio": (0.31, 0.47), "cyto_light": (0.68, 0.82), "cyto_blue": (-0.02, 0.17),
        "cyto_red": (-0.02, 0.18), "pallor": (-0.41, -0.15), "chrom_light": (0.26, 0.41),
        "chrom_texture": (0.014, 0.062), "nucleoli": (0, 0.02), "vacuoles": (0, 0.014),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.015, 0.057),
    },
    "M4": {
        "cell_diam": (0.51, 0.63), "cell_solidity": (0.88, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.11), "bg_light": (0.8, 1.05), "nuc_area": (0.048, 0.102),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.74, 0.95), "nuc_elong": (1.1, 2),
        "nc_ratio": (0.21, 0.38), "cyto_light": (0.73, 0.86), "cyto_blue": (-0.11, 0.1),
        "cyto_red": (-0.01, 0.2), "pallor": (-0.48, -0.15), "chrom_light": (0.25, 0.42),
        "chrom_texture": (0.012, 0.065), "nucleoli": (0, 0.02), "vacuoles": (0, 0.019),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.025, 0.068),
    },
    "M5": {
        "cell_diam": (0.47, 0.62), "cell_solidity": (0.88, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.14), "bg_light": (0.81, 1.05), "nuc_area": (0.004, 0.061),
        "nuc_lobes": (1, 5), "nuc_solidity": (0.14, 0.81), "nuc_elong": (1, 5.9),
        "nc_ratio": (0.03, 0.25), "cyto_light": (0.73, 0.88), "cyto_blue": (-0.13, 0.11),
        "cyto_red": (-0.01, 0.2), "pallor": (-0.12, 0.23), "chrom_light": (0.19, 0.47),
        "chrom_texture": (0, 0.117), "nucleoli": (0, 0.02), "vacuoles": (0, 0.019),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.025, 0.071),
    },
    "MO2": {
        "cell_diam": (0.74, 0.88), "cell_solidity": (0.9, 1), "cell_edge": (0, 0.1),
        "cell_notch": (0, 0.07), "bg_light": (0.82, 1.05), "nuc_area": (0.108, 0.194),
        "nuc_lobes": (1, 1), "nuc_solidity": (0.78, 0.98), "nuc_elong": (1.1, 1.9),
        "nc_ratio": (0.21, 0.37), "cyto_light": (0.69, 0.84), "cyto_blue": (0.02, 0.25),
        "cyto_red": (-0.17, 0.06), "pallor": (-0.45, -0.19), "chrom_light": (0.31, 0.44),
        "chrom_texture": (0.001, 0.026), "nucleoli": (0, 0.02), "vacuoles": (0, 0.056),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.02, 0.051),
    },
}
# fmt: on


# The strict expert's overrides of ``ACCEPT`` for the classes of ``phantoms.STRICT_SPECS``,
# where it accepts less than the annotation covers; written by ``calibrate_strict()`` from
# renders of those narrowed specs on the tuning seeds.
# fmt: off
ACCEPT_STRICT: dict[str, dict[str, Range]] = {
    "ER1": {"cell_diam": (0.76, 0.83)},
    "E1": {"nc_ratio": (0.22, 0.295)},
    "M1": {"cell_diam": (0.584, 0.65)},
    "M3": {"cell_diam": (0.55, 0.618)},
    "M5": {"nuc_lobes": (2, 5)},
}
# fmt: on

# Expert profiles by name: what each accepts per class (the default is the annotation's
# expert, fitted to the renderer; "strict" narrows ``ACCEPT_STRICT``'s classes).
EXPERTS: tuple[str, ...] = ("default", "strict")


def check_expert(expert: str) -> str:
    """``expert`` if it names a profile; else a ValueError listing the valid ones."""
    if expert not in EXPERTS:
        raise ValueError(f"unknown expert profile {expert!r}; valid profiles: {', '.join(EXPERTS)}")
    return expert


@lru_cache(maxsize=len(EXPERTS))
def accept_table(expert: str = "default") -> dict[str, dict[str, Range]]:
    """The accepted intervals of an expert profile, per class code and feature."""
    if check_expert(expert) == "default":
        return ACCEPT
    return {code: {**acc, **ACCEPT_STRICT.get(code, {})} for code, acc in ACCEPT.items()}


# ----------------------------------------------------------------------------- measuring an image


class Verdict(BaseModel):
    """The judge's decision on one image for its declared class."""

    model_config = ConfigDict(frozen=True)

    plausible: bool  # all 7 criteria pass
    criteria: dict[str, bool]  # criterion -> passes
    measures: dict[str, float]  # measured features (NaN where undefined, e.g. no nucleus)
    subtype: str | None = None  # "band"/"segmented" for classes with subtypes, read from pixels

    @property
    def failed(self) -> list[str]:
        """The criteria that failed, in ``CRITERIA`` order."""
        return [c for c in CRITERIA if not self.criteria[c]]


_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


_FG_DIST = 0.1  # RGB distance from the background (0..1 units) that counts as stained


_DARK = 0.52  # lightness relative to background below which a pixel is nuclear/granular


_NAN = float("nan")


def _working_image(image: np.ndarray) -> np.ndarray:
    """float32 JUDGE_SIZE x JUDGE_SIZE x 3 in 0..1; other sizes are area-resampled."""
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    arr = arr[..., :3]
    if arr.dtype != np.uint8:  # floats in 0..1 (e.g. decoded model samples)
        arr = (np.clip(np.nan_to_num(arr.astype(np.float32)), 0, 1) * 255 + 0.5).astype(np.uint8)
    if arr.shape[:2] != (JUDGE_SIZE, JUDGE_SIZE):
        from PIL import Image

        big = arr.shape[0] > JUDGE_SIZE
        mode = Image.Resampling.BOX if big else Image.Resampling.BILINEAR
        arr = np.asarray(Image.fromarray(arr).resize((JUDGE_SIZE, JUDGE_SIZE), mode))
    return arr.astype(np.float32) / 255.0


def _background_colour(img: np.ndarray, light: np.ndarray) -> np.ndarray:
    """Median colour of the lightest 15 % of pixels: the smear background around the cell."""
    flat = light.ravel()
    k = int(0.85 * flat.size)
    cut = np.partition(flat, k)[k]
    return np.median(img.reshape(-1, 3)[flat >= cut], axis=0)


@lru_cache(maxsize=1)
def _centre_disc() -> np.ndarray:
    c = np.arange(JUDGE_SIZE) + 0.5 - JUDGE_SIZE / 2
    return (c[:, None] ** 2 + c[None, :] ** 2) <= (0.15 * JUDGE_SIZE) ** 2


def _main_cell(img: np.ndarray, bg: np.ndarray) -> np.ndarray | None:
    """Filled mask of the stained component covering the image centre (neighbours excluded)."""
    stained = np.sqrt(((img - bg) ** 2).sum(axis=2)) > _FG_DIST
    labels, n = ndi.label(stained)
    if n == 0:
        return None
    hits = np.bincount(labels[_centre_disc()], minlength=n + 1)
    hits[0] = 0
    if hits.max() == 0:
        return None
    return ndi.binary_fill_holes(labels == int(hits.argmax()))


def _hull(mask: np.ndarray) -> ConvexHull | None:
    """scipy ConvexHull of the mask's pixel squares (x = column); None if degenerate."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(axis=1))
    sub = mask[rows]
    left = sub.argmax(axis=1)
    right = sub.shape[1] - 1 - sub[:, ::-1].argmax(axis=1)
    # Corners of each row's extreme pixels are enough to span the hull of all pixel squares.
    pts = np.concatenate(
        [
            np.stack([left, rows], 1),
            np.stack([left, rows + 1], 1),
            np.stack([right + 1, rows], 1),
            np.stack([right + 1, rows + 1], 1),
        ]
    )
    try:
        return ConvexHull(pts.astype(np.float64))
    except QhullError:
        return None


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of the pixel squares; NaN for tiny masks."""
    if mask.sum() < 3:
        return _NAN
    hull = _hull(mask)
    return 1.0 if hull is None else float(mask.sum() / hull.volume)


def _notch(mask: np.ndarray) -> float:
    """Depth of the deepest dent in the outline (from its convex hull) / equivalent radius.

    Two overlapping round outlines meet in a waist that a single cell's outline never has.
    """
    hull = _hull(mask) if mask.sum() >= 3 else None
    if hull is None:
        return 0.0
    yy, xx = _grid_yx()
    centres = np.stack([xx.ravel(), yy.ravel()])  # (2, P) pixel centres
    # Distance inside the hull to its nearest facet; Qhull's facet normals point outwards.
    depth = -(hull.equations[:, :2] @ centres + hull.equations[:, 2:]).max(axis=0)
    dent = depth.reshape(mask.shape)[~mask]
    return float(max(dent.max(initial=0.0), 0.0) / math.sqrt(mask.sum() / math.pi))


def _elongation(mask: np.ndarray) -> float:
    """Major/minor axis ratio from second moments; NaN for tiny masks."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 3:
        return _NAN
    cov = np.cov(np.stack([xs, ys]).astype(np.float64)) + np.eye(2) / 12.0  # pixel extent
    lo, hi = np.linalg.eigvalsh(cov)
    return float(math.sqrt(hi / max(lo, 1e-6)))


def _nucleus(dark: np.ndarray) -> tuple[np.ndarray, int, np.ndarray]:
    """(nucleus mask, lobe count, granule mask) from the dark pixels inside the cell.

    Dark components at least a fifth of the largest are nuclear lobes (segments are similar in
    size); smaller dark specks are granules.
    """
    labels, n = ndi.label(dark)
    if n == 0:
        return np.zeros_like(dark), 0, np.zeros_like(dark)
    areas = np.bincount(labels.ravel())
    areas[0] = 0
    is_lobe = areas >= max(3, 0.2 * areas.max())
    is_lobe[0] = False
    nucleus = ndi.binary_fill_holes(is_lobe[labels])
    granules = dark & ~is_lobe[labels]
    return nucleus, int(is_lobe.sum()), granules


@lru_cache(maxsize=1)
def _grid_yx() -> tuple[np.ndarray, np.ndarray]:
    c = np.arange(JUDGE_SIZE, dtype=np.float32) + 0.5
    return c[:, None] * np.ones((1, JUDGE_SIZE), np.float32), c[None, :] * np.ones(
        (JUDGE_SIZE, 1), np.float32
    )


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else _NAN


def _cell_measures(cell: np.ndarray) -> dict[str, float]:
    area = float(cell.sum()) / cell.size
    border = np.count_nonzero(cell[[0, -1], :]) + np.count_nonzero(cell[1:-1, [0, -1]])
    return {
        "cell_diam": 2.0 * math.sqrt(area / math.pi),
        "cell_solidity": _solidity(cell),
        "cell_edge": border / JUDGE_SIZE,
        "cell_notch": _notch(cell),
    }


def _nucleus_measures(nucleus: np.ndarray, lobes: int, cell: np.ndarray) -> dict[str, float]:
    area = float(nucleus.sum())
    big = area >= 3  # below a few pixels there is no shape to measure
    return {
        "nuc_area": area / nucleus.size,
        "nuc_lobes": float(lobes),
        "nuc_solidity": _solidity(nucleus) if big else _NAN,
        "nuc_elong": _elongation(nucleus) if big else _NAN,
        "nc_ratio": area / max(float(cell.sum()), 1.0),
    }


def _pallor(rel: np.ndarray, cell: np.ndarray) -> float:
    """Lightness of the cell centre minus that of its outer ring (red-cell central pallor)."""
    yy, xx = _grid_yx()
    n = cell.sum()
    cy, cx = yy[cell].mean(), xx[cell].mean()
    r = math.sqrt(n / math.pi)
    dist = np.hypot(yy - cy, xx - cx) / max(r, 1e-6)
    inner, ring = cell & (dist <= 0.35), cell & (dist > 0.55) & (dist <= 0.85)
    return _mean(rel[inner]) - _mean(rel[ring])


def _cytoplasm_measures(
    wb: np.ndarray, rel: np.ndarray, cell: np.ndarray, cyto: np.ndarray
) -> dict[str, float]:
    """Colour of the cytoplasm, white-balanced against the background (stain-invariant)."""
    pix = wb[cyto]
    if len(pix) == 0:
        return {"cyto_light": _NAN, "cyto_blue": _NAN, "cyto_red": _NAN, "pallor": _NAN}
    return {
        "cyto_light": float(rel[cyto].mean()),
        "cyto_blue": float((pix[:, 2] - pix[:, 0]).mean()),
        "cyto_red": float((pix[:, 0] - pix[:, 1]).mean()),
        "pallor": _pallor(rel, cell),
    }


def _chromatin_measures(rel: np.ndarray, nucleus: np.ndarray, dark: np.ndarray) -> dict[str, float]:
    """Lightness and texture of the nuclear interior (edge pixels mix with the cytoplasm)."""
    inner = ndi.binary_erosion(nucleus) & dark
    if inner.sum() < 3:
        inner = nucleus & dark
    if inner.sum() < 2:
        return {"chrom_light": _NAN, "chrom_texture": _NAN}
    vals = rel[inner]
    return {"chrom_light": float(vals.mean()), "chrom_texture": float(vals.std())}


def _vacuoles(rel: np.ndarray, cell: np.ndarray, nucleus: np.ndarray) -> float:
    """Near-white pixels inside the cell (membrane excluded) / cell area.

    Counted over the nucleus too: a vacuole lying on it is as light as the bare slide, which
    pale blue-grey nucleoli never are.
    """
    inner = ndi.binary_erosion(cell)
    cyto = inner & ~ndi.binary_dilation(nucleus)
    # Relative to the cytoplasm itself: pale cytoplasm has light gaps that are not vacuoles.
    cut = max(0.85, float(np.median(rel[cyto])) + 0.12) if cyto.any() else 0.85
    return float((inner & (rel > cut)).sum()) / max(float(cell.sum()), 1.0)


def _granule_measures(
    wb: np.ndarray, rel: np.ndarray, cell: np.ndarray, nucleus: np.ndarray, granules: np.ndarray
) -> dict[str, float]:
    area = max(float(cell.sum()), 1.0)
    r, g, b = wb[..., 0], wb[..., 1], wb[..., 2]
    orange = cell & (r - b > 0.38) & (g - b > 0.08)
    core = ndi.binary_erosion(cell & ~ndi.binary_dilation(nucleus))
    highpass = rel - ndi.gaussian_filter(rel, 1.0)
    return {
        "gran_dark": float(granules.sum()) / area,
        "gran_orange": float(orange.sum()) / area,
        "cyto_texture": float(highpass[core].std()) if core.sum() >= 4 else _NAN,
    }


def measure_image(image: np.ndarray) -> dict[str, float]:
    """Every judge feature of one image (see ``MEASURE_CRITERION``), from pixels alone.

    Features are NaN where undefined: all but ``bg_light`` when no cell covers the centre,
    nuclear ones when there is no nucleus.
    """
    img = _working_image(image)
    bg = _background_colour(img, img @ _LUMA)
    out = dict.fromkeys(MEASURE_CRITERION, _NAN)
    out["bg_light"] = float(bg @ _LUMA)
    # Outline and vacuoles are read from a lightly smoothed copy so sensor/sampling noise does
    # not fray them; colours, chromatin and granules use the raw pixels.
    smooth = ndi.gaussian_filter(img, (0.5, 0.5, 0))
    cell = _main_cell(smooth, bg)
    if cell is None:
        return out
    wb = img / np.maximum(bg, 0.05)  # white balance: divides out the stain/illumination gains
    rel = wb @ _LUMA
    dark = cell & (rel < _DARK)
    nucleus, lobes, granules = _nucleus(dark)
    cyto = cell & ~nucleus & ~dark
    out.update(_cell_measures(cell))
    out.update(_nucleus_measures(nucleus, lobes, cell))
    out.update(_cytoplasm_measures(wb, rel, cell, cyto))
    out.update(_chromatin_measures(rel, nucleus, dark))
    nuc_area = max(float(nucleus.sum()), 1.0)
    out["nucleoli"] = float((nucleus & ~dark).sum()) / nuc_area
    out["vacuoles"] = _vacuoles((smooth / np.maximum(bg, 0.05)) @ _LUMA, cell, nucleus)
    out.update(_granule_measures(wb, rel, cell, nucleus, granules))
    return out


# ----------------------------------------------------------------------------- verdicts


def _criteria(code: str, measures: dict[str, float], expert: str = "default") -> dict[str, bool]:
    """Check each measure against the class's accepted interval; NaN never passes."""
    ok = dict.fromkeys(CRITERIA, True)
    for name, (lo, hi) in accept_table(expert).get(code, {}).items():
        if not lo <= measures[name] <= hi:
            ok[MEASURE_CRITERION[name]] = False
    return ok


def _read_subtype(code: str, measures: dict[str, float]) -> str | None:
    """Band (one curved nucleus) or segmented (two or more lobes), for classes with subtypes."""
    if not BONE_MARROW_16.lookup(code).subtypes or not measures["nuc_lobes"] >= 1:
        return None
    return "segmented" if measures["nuc_lobes"] >= 2 else "band"


def judge_image(image: np.ndarray, class_id: int, expert: str = "default") -> Verdict:
    """Is ``image`` (H x W x 3, uint8 or float 0..1) a plausible cell of ``class_id``?

    Plausible iff all 7 criteria pass for the ``expert`` profile (``EXPERTS``); the verdict
    carries the measures behind each decision.
    """
    code = class_code(class_id)
    measures = measure_image(image)
    criteria = _criteria(code, measures, expert)
    return Verdict(
        plausible=all(criteria.values()),
        criteria=criteria,
        measures=measures,
        subtype=_read_subtype(code, measures),
    )


def judge_batch(
    images: Iterable[np.ndarray] | np.ndarray,
    class_ids: Iterable[int] | np.ndarray,
    expert: str = "default",
) -> list[Verdict]:
    """``judge_image`` over paired images (N x H x W x 3 array or list) and declared classes."""
    check_expert(expert)
    return [judge_image(im, int(c), expert) for im, c in zip(images, class_ids, strict=True)]


def judge_report(
    verdicts: Sequence[Verdict],
    class_ids: Sequence[int] | np.ndarray,
    true_subtypes: Sequence[str | None] | None = None,
) -> dict:
    """Aggregate verdicts: overall, per-class and per-criterion pass rates (+ subtype accuracy).

    ``per_class`` maps class name -> plausible rate for classes present; ``subtype_accuracy``
    (only with ``true_subtypes``) is over images whose true subtype is not None.
    """
    ids = np.asarray(class_ids, dtype=np.int64)
    ok = np.array([v.plausible for v in verdicts], dtype=bool)
    report: dict = {
        "n": len(verdicts),
        "plausible_rate": float(ok.mean()) if len(ok) else 0.0,
        "per_class": {
            BONE_MARROW_16.lookup(int(c)).name: float(ok[ids == c].mean()) for c in np.unique(ids)
        },
        "per_criterion": {
            c: float(np.mean([v.criteria[c] for v in verdicts])) if verdicts else 0.0
            for c in CRITERIA
        },
    }
    if true_subtypes is not None:
        pairs = [
            (v.subtype, t) for v, t in zip(verdicts, true_subtypes, strict=True) if t is not None
        ]
        report["subtype_n"] = len(pairs)
        report["subtype_accuracy"] = (
            float(np.mean([p == t for p, t in pairs])) if pairs else float("nan")
        )
    return report


# ----------------------------------------------------------------------------- judging a shard set


def _judge_ids(vocab: Vocabulary, class_ids: np.ndarray) -> np.ndarray:
    """Map a shard set's class ids to the judge's (BONE_MARROW_16) by class code."""
    known = {c.code for c in BONE_MARROW_16.classes}
    unknown = sorted({c.code for c in vocab.classes} - known)
    if unknown:
        raise ValueError(
            f"the judge knows only the 16 phantom classes ({sorted(known)}); "
            f"this shard set has {unknown}"
        )
    table = np.array([BONE_MARROW_16.lookup(c.code).id for c in vocab.classes])
    return table[class_ids]


def judge_shards(
    shard_dir: str | Path,
    shuffle_seed: int | None = None,
    split: str | None = None,
    expert: str = "default",
) -> dict:
    """Judge every image of a shard set against its declared class; the report dict.

    ``shuffle_seed`` first replaces each declared class with a different random class (the
    judge should then call nearly everything implausible). ``expert`` names the profile
    (``EXPERTS``); a strict-expert set's manifest names its own in ``scenario.expert``.
    """
    from pathloop.data import load_image_table, read_vocab

    check_expert(expert)
    images, class_ids, cols = load_image_table(shard_dir)
    if split is not None:
        keep = cols["split"] == split
        images, class_ids, cols = (
            images[keep],
            class_ids[keep],
            {k: v[keep] for k, v in cols.items()},
        )
    ids = _judge_ids(read_vocab(shard_dir), class_ids)
    if shuffle_seed is not None:
        ids = shuffle_classes(ids, shuffle_seed)
    verdicts = judge_batch(list(images), ids, expert)
    subtypes = cols.get("subtype")
    has_sub = subtypes is not None and any(t is not None for t in subtypes)
    true_sub = list(subtypes) if has_sub and shuffle_seed is None else None
    report = judge_report(verdicts, ids, true_subtypes=true_sub)
    report.update(shards=str(shard_dir), split=split, shuffled_with=shuffle_seed, expert=expert)
    return report
