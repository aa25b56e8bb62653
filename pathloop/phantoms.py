"""Procedural bone-marrow phantom cells and the pixel-level criteria judge.

Two halves that share only the class specs (``SPECS``):

* the **renderer** draws a stylised cell of one of the 16 ``BONE_MARROW_16`` classes:
  signed-distance shapes on a supersampled grid (cell, nucleus, granules, nucleoli, vacuoles),
  random pose, stain and background jitter and 0-3 neighbouring red cells, then an
  antialiased downsample;
* the **judge**, a simulated expert, measures an image from pixels alone (colour segmentation,
  connected components, areas, lobes, colours, texture) and checks each of the 7 criteria of
  ``vocab.CRITERIA`` against the accepted intervals of the *declared* class.

The judge never sees generator parameters, so it grades diffusion samples exactly like phantoms.
Images of any size are judged at ``JUDGE_SIZE`` px (area-downsampled), so one set of intervals
serves 32 and 64 px data.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
from pydantic import BaseModel, ConfigDict
from scipy import ndimage as ndi

from pathloop.vocab import BONE_MARROW_16, CRITERIA, Vocabulary

Range = tuple[float, float]
RGB = tuple[int, int, int]
SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]

JUDGE_SIZE = 32  # px side the judge works at; its intervals are calibrated there
_HI_RES = 128  # minimum supersampled canvas side (px) the renderer draws on

# ---------------------------------------------------------------------------------------------
# Class specs: how to draw each class, and what the judge accepts for it
# ---------------------------------------------------------------------------------------------

# Which criterion each measured feature belongs to (a criterion fails if any of its features
# falls outside the declared class's interval).
MEASURE_CRITERION: dict[str, str] = {
    "cell_diam": "cell_size",  # equivalent-circle diameter / image side
    "cell_solidity": "cell_size",  # area / convex-hull area: cells are smooth, noise is not
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


@dataclass(frozen=True)
class CellSpec:
    """Morphology of one class along the 7 criteria, plus the judge's accepted intervals."""

    code: str
    diameter: Range  # cell diameter, fraction of the image side (sampled uniformly)
    nucleus: str  # round | oval | kidney | indented | band_or_segmented | bilobed | lobed | absent
    nc_ratio: Range  # target nucleus/cell area for compact nuclei (lobed shapes set their own)
    cytoplasm: RGB  # cytoplasm colour at the reference stain: blue (basophilic) to pink
    chromatin: str  # fine | coarse | clumped | pyknotic | none
    granules: str = "none"  # none | few_dark | dark_large | orange | azurophilic | fine
    n_granules: tuple[int, int] = (0, 0)
    nucleoli: tuple[int, int] = (0, 0)
    vacuoles: tuple[int, int] = (0, 0)
    eccentric: float = 0.1  # max nucleus offset from the cell centre, fraction of cell radius
    rim: float = 0.04  # darkening of the cytoplasm towards the membrane (ER1's deep-blue rim)
    pallor: float = 0.0  # strength of the central pallor (red cells)
    accept: dict[str, Range] = field(default_factory=dict)  # judge: measure -> interval


def _spec(code: str, **kw: object) -> CellSpec:
    return CellSpec(code=code, accept=_ACCEPT.get(code, {}), **kw)  # type: ignore[arg-type]


# The judge's accepted intervals, written by ``calibrate_accept()`` (python -m pathloop.phantoms)
# from phantoms of tuning seeds 5000 and 6000; the tests check them on other seeds.
# fmt: off
_ACCEPT: dict[str, dict[str, Range]] = {
    "B1": {
        "cell_diam": (0.55, 0.67), "cell_solidity": (0.89, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0.073, 0.139), "nuc_lobes": (1, 1), "nuc_solidity": (0.81, 1),
        "nuc_elong": (1, 1.4), "nc_ratio": (0.26, 0.44), "cyto_light": (0.65, 0.78),
        "cyto_blue": (0.1, 0.34), "cyto_red": (-0.13, 0.08), "pallor": (-0.36, -0.11),
        "chrom_light": (0.25, 0.42), "chrom_texture": (0.013, 0.059), "nucleoli": (0, 0.03),
        "vacuoles": (0, 0.01), "gran_dark": (0.008, 0.104), "gran_orange": (0, 0.02),
        "cyto_texture": (0.031, 0.127),
    },
    "B2": {
        "cell_diam": (0.47, 0.6), "cell_solidity": (0.87, 1), "bg_light": (0.8, 1.05),
        "nuc_area": (0.028, 0.095), "nuc_lobes": (1, 1), "nuc_solidity": (0.54, 1),
        "nuc_elong": (1, 3), "nc_ratio": (0.13, 0.43), "cyto_light": (0.71, 0.85),
        "cyto_blue": (-0.04, 0.18), "cyto_red": (-0.06, 0.15), "pallor": (-0.46, 0.15),
        "chrom_light": (0.13, 0.31), "chrom_texture": (0, 0.102), "nucleoli": (0, 0.05),
        "vacuoles": (0, 0.025), "gran_dark": (0.011, 0.141), "gran_orange": (0, 0.02),
        "cyto_texture": (0.075, 0.197),
    },
    "E1": {
        "cell_diam": (0.6, 0.72), "cell_solidity": (0.89, 1), "bg_light": (0.8, 1.05),
        "nuc_area": (0.071, 0.136), "nuc_lobes": (1, 1), "nuc_solidity": (0.83, 1),
        "nuc_elong": (1, 1.5), "nc_ratio": (0.22, 0.38), "cyto_light": (0.7, 0.82),
        "cyto_blue": (-0.35, -0.14), "cyto_red": (0.1, 0.3), "pallor": (-0.48, -0.22),
        "chrom_light": (0.26, 0.42), "chrom_texture": (0.011, 0.062), "nucleoli": (0, 0.03),
        "vacuoles": (0, 0.016), "gran_dark": (0, 0.01), "gran_orange": (0.04, 0.24),
        "cyto_texture": (0.022, 0.053),
    },
    "E4": {
        "cell_diam": (0.54, 0.66), "cell_solidity": (0.89, 1), "bg_light": (0.8, 1.05),
        "nuc_area": (0.019, 0.059), "nuc_lobes": (1, 2), "nuc_solidity": (0.47, 0.85),
        "nuc_elong": (1.8, 4.3), "nc_ratio": (0.07, 0.2), "cyto_light": (0.68, 0.79),
        "cyto_blue": (-0.43, -0.23), "cyto_red": (0.15, 0.35), "pallor": (-0.07, 0.19),
        "chrom_light": (0.2, 0.42), "chrom_texture": (0, 0.077), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.021), "gran_dark": (0, 0.014), "gran_orange": (0.12, 0.48),
        "cyto_texture": (0.024, 0.056),
    },
    "ER1": {
        "cell_diam": (0.69, 0.83), "cell_solidity": (0.9, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0.167, 0.296), "nuc_lobes": (1, 1), "nuc_solidity": (0.86, 1.01),
        "nuc_elong": (1, 1.4), "nc_ratio": (0.4, 0.59), "cyto_light": (0.6, 0.73),
        "cyto_blue": (0.2, 0.41), "cyto_red": (-0.21, -0.01), "pallor": (-0.21, 0.01),
        "chrom_light": (0.31, 0.45), "chrom_texture": (0.005, 0.044), "nucleoli": (0, 0.11),
        "vacuoles": (0, 0.01), "gran_dark": (0, 0.019), "gran_orange": (0, 0.02),
        "cyto_texture": (0.007, 0.05),
    },
    "ER2": {
        "cell_diam": (0.51, 0.63), "cell_solidity": (0.88, 1), "bg_light": (0.82, 1.05),
        "nuc_area": (0.082, 0.151), "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1.01),
        "nuc_elong": (1, 1.5), "nc_ratio": (0.36, 0.54), "cyto_light": (0.65, 0.78),
        "cyto_blue": (0.16, 0.38), "cyto_red": (-0.19, 0.01), "pallor": (-0.33, -0.09),
        "chrom_light": (0.27, 0.41), "chrom_texture": (0.017, 0.06), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.01), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0, 0.046),
    },
    "ER3": {
        "cell_diam": (0.4, 0.51), "cell_solidity": (0.87, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0.032, 0.077), "nuc_lobes": (1, 1), "nuc_solidity": (0.8, 1),
        "nuc_elong": (1, 1.5), "nc_ratio": (0.24, 0.42), "cyto_light": (0.68, 0.82),
        "cyto_blue": (-0.05, 0.18), "cyto_red": (-0.09, 0.13), "pallor": (-0.52, -0.22),
        "chrom_light": (0.21, 0.4), "chrom_texture": (0.009, 0.063), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.01), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.001, 0.038),
    },
    "ER4": {
        "cell_diam": (0.33, 0.44), "cell_solidity": (0.86, 1), "bg_light": (0.83, 1.05),
        "nuc_area": (0, 0.033), "nuc_lobes": (1, 1), "nuc_solidity": (0.74, 1.05),
        "nuc_elong": (1, 1.6), "nc_ratio": (0.06, 0.22), "cyto_light": (0.72, 0.86),
        "cyto_blue": (-0.24, -0.03), "cyto_red": (0.06, 0.28), "pallor": (-0.66, -0.15),
        "chrom_light": (0.14, 0.3), "chrom_texture": (0, 0.083), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.01), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.01, 0.039),
    },
    "ER5": {
        "cell_diam": (0.31, 0.42), "cell_solidity": (0.85, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0, 0.01), "nuc_lobes": (0, 0), "nc_ratio": (0, 0.03),
        "cyto_light": (0.72, 0.85), "cyto_blue": (-0.1, 0.13), "cyto_red": (0, 0.22),
        "pallor": (-0.07, 0.08), "nucleoli": (0, 0.02), "vacuoles": (0, 0.01),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.012, 0.033),
    },
    "ER6": {
        "cell_diam": (0.26, 0.37), "cell_solidity": (0.84, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0, 0.01), "nuc_lobes": (0, 0), "nc_ratio": (0, 0.03),
        "cyto_light": (0.71, 0.87), "cyto_blue": (-0.28, -0.07), "cyto_red": (0.1, 0.33),
        "pallor": (-0.1, 0.23), "nucleoli": (0, 0.02), "vacuoles": (0, 0.096),
        "gran_dark": (0, 0.01), "gran_orange": (0, 0.02), "cyto_texture": (0.016, 0.056),
    },
    "M1": {
        "cell_diam": (0.52, 0.65), "cell_solidity": (0.89, 1), "bg_light": (0.8, 1.05),
        "nuc_area": (0.122, 0.201), "nuc_lobes": (1, 1), "nuc_solidity": (0.86, 1),
        "nuc_elong": (1, 1.5), "nc_ratio": (0.51, 0.68), "cyto_light": (0.68, 0.8),
        "cyto_blue": (0.13, 0.33), "cyto_red": (-0.17, 0.03), "pallor": (-0.16, 0.09),
        "chrom_light": (0.32, 0.46), "chrom_texture": (0.007, 0.051), "nucleoli": (0.01, 0.13),
        "vacuoles": (0, 0.014), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
    },
    "M2": {
        "cell_diam": (0.72, 0.86), "cell_solidity": (0.9, 1), "bg_light": (0.82, 1.05),
        "nuc_area": (0.132, 0.223), "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1),
        "nuc_elong": (1.1, 2.1), "nc_ratio": (0.28, 0.43), "cyto_light": (0.64, 0.76),
        "cyto_blue": (0.12, 0.35), "cyto_red": (-0.16, 0.05), "pallor": (-0.35, -0.13),
        "chrom_light": (0.27, 0.41), "chrom_texture": (0.017, 0.06), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.013), "gran_dark": (0.002, 0.07), "gran_orange": (0, 0.02),
        "cyto_texture": (0.034, 0.082),
    },
    "M3": {
        "cell_diam": (0.55, 0.68), "cell_solidity": (0.89, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0.086, 0.151), "nuc_lobes": (1, 1), "nuc_solidity": (0.85, 1),
        "nuc_elong": (1, 1.5), "nc_ratio": (0.31, 0.47), "cyto_light": (0.68, 0.82),
        "cyto_blue": (-0.02, 0.17), "cyto_red": (-0.02, 0.18), "pallor": (-0.41, -0.15),
        "chrom_light": (0.26, 0.41), "chrom_texture": (0.014, 0.062), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.014), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.015, 0.057),
    },
    "M4": {
        "cell_diam": (0.51, 0.63), "cell_solidity": (0.88, 1), "bg_light": (0.8, 1.05),
        "nuc_area": (0.048, 0.102), "nuc_lobes": (1, 1), "nuc_solidity": (0.74, 0.95),
        "nuc_elong": (1.1, 2), "nc_ratio": (0.21, 0.38), "cyto_light": (0.73, 0.86),
        "cyto_blue": (-0.11, 0.1), "cyto_red": (-0.01, 0.2), "pallor": (-0.48, -0.15),
        "chrom_light": (0.25, 0.42), "chrom_texture": (0.012, 0.065), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.019), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.025, 0.068),
    },
    "M5": {
        "cell_diam": (0.47, 0.62), "cell_solidity": (0.88, 1), "bg_light": (0.81, 1.05),
        "nuc_area": (0.004, 0.061), "nuc_lobes": (1, 5), "nuc_solidity": (0.14, 0.81),
        "nuc_elong": (1, 5.9), "nc_ratio": (0.03, 0.25), "cyto_light": (0.73, 0.88),
        "cyto_blue": (-0.13, 0.11), "cyto_red": (-0.01, 0.2), "pallor": (-0.12, 0.23),
        "chrom_light": (0.19, 0.47), "chrom_texture": (0, 0.117), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.019), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.025, 0.071),
    },
    "MO2": {
        "cell_diam": (0.74, 0.88), "cell_solidity": (0.9, 1), "bg_light": (0.82, 1.05),
        "nuc_area": (0.108, 0.194), "nuc_lobes": (1, 1), "nuc_solidity": (0.78, 0.98),
        "nuc_elong": (1.1, 1.9), "nc_ratio": (0.21, 0.37), "cyto_light": (0.69, 0.84),
        "cyto_blue": (0.02, 0.25), "cyto_red": (-0.17, 0.06), "pallor": (-0.45, -0.19),
        "chrom_light": (0.31, 0.44), "chrom_texture": (0.001, 0.026), "nucleoli": (0, 0.02),
        "vacuoles": (0, 0.056), "gran_dark": (0, 0.01), "gran_orange": (0, 0.02),
        "cyto_texture": (0.02, 0.051),
    },
}
# fmt: on

# fmt: off
SPECS: dict[str, CellSpec] = {
    "B1": _spec("B1", diameter=(0.54, 0.60), nucleus="round", nc_ratio=(0.36, 0.44),
                      cytoplasm=(150, 156, 216), chromatin="coarse", granules="few_dark",
                      n_granules=(5, 9), eccentric=0.18),
    "B2": _spec("B2", diameter=(0.48, 0.54), nucleus="lobed", nc_ratio=(0.30, 0.36),
                      cytoplasm=(206, 184, 218), chromatin="clumped", granules="dark_large",
                      n_granules=(26, 34)),
    "E1": _spec("E1", diameter=(0.60, 0.66), nucleus="round", nc_ratio=(0.30, 0.38),
                      cytoplasm=(226, 172, 170), chromatin="coarse", granules="orange",
                      n_granules=(28, 40), eccentric=0.2),
    "E4": _spec("E4", diameter=(0.54, 0.60), nucleus="bilobed", nc_ratio=(0.25, 0.30),
                      cytoplasm=(228, 170, 168), chromatin="clumped", granules="orange",
                      n_granules=(70, 95)),
    "ER1": _spec("ER1", diameter=(0.68, 0.76), nucleus="round", nc_ratio=(0.50, 0.58),
                        cytoplasm=(118, 150, 214), chromatin="fine", nucleoli=(1, 3), rim=0.1),
    "ER2": _spec("ER2", diameter=(0.50, 0.56), nucleus="round", nc_ratio=(0.46, 0.54),
                        cytoplasm=(128, 154, 214), chromatin="coarse"),
    "ER3": _spec("ER3", diameter=(0.40, 0.45), nucleus="round", nc_ratio=(0.34, 0.42),
                        cytoplasm=(178, 166, 196), chromatin="clumped"),
    "ER4": _spec("ER4", diameter=(0.34, 0.38), nucleus="round", nc_ratio=(0.13, 0.18),
                        cytoplasm=(224, 164, 176), chromatin="pyknotic", eccentric=0.3),
    "ER5": _spec("ER5", diameter=(0.32, 0.36), nucleus="absent", nc_ratio=(0.00, 0.00),
                        cytoplasm=(204, 162, 202), chromatin="none", pallor=0.15),
    "ER6": _spec("ER6", diameter=(0.26, 0.30), nucleus="absent", nc_ratio=(0.00, 0.00),
                        cytoplasm=(224, 146, 158), chromatin="none", pallor=0.9),
    "M1": _spec("M1", diameter=(0.52, 0.58), nucleus="round", nc_ratio=(0.66, 0.72),
                      cytoplasm=(140, 166, 220), chromatin="fine", nucleoli=(2, 3),
                      eccentric=0.05),
    "M2": _spec("M2", diameter=(0.72, 0.80), nucleus="oval", nc_ratio=(0.36, 0.42),
                      cytoplasm=(146, 166, 218), chromatin="coarse", granules="azurophilic",
                      n_granules=(22, 34), eccentric=0.15),
    "M3": _spec("M3", diameter=(0.56, 0.62), nucleus="round", nc_ratio=(0.42, 0.48),
                      cytoplasm=(200, 174, 216), chromatin="coarse", granules="fine",
                      n_granules=(50, 80), eccentric=0.18),
    "M4": _spec("M4", diameter=(0.52, 0.58), nucleus="kidney", nc_ratio=(0.23, 0.28),
                      cytoplasm=(222, 192, 206), chromatin="coarse", granules="fine",
                      n_granules=(40, 65), eccentric=0.12),
    "M5": _spec("M5", diameter=(0.50, 0.56), nucleus="band_or_segmented", nc_ratio=(0.00, 0.00),
                      cytoplasm=(224, 194, 210), chromatin="clumped", granules="fine",
                      n_granules=(40, 65)),
    "MO2": _spec("MO2", diameter=(0.74, 0.82), nucleus="indented", nc_ratio=(0.26, 0.32),
                        cytoplasm=(172, 180, 204), chromatin="fine", vacuoles=(3, 6),
                        eccentric=0.15),
}
# fmt: on

# Colour (RGB), radius range (image fraction), opacity, fraction lying over the nucleus, and
# least centre spacing (dark granules stay separate specks at 32 px instead of fusing into
# something the judge would read as a nuclear lobe).
_GRANULE_STYLE: dict[str, tuple[RGB, Range, float, float, float]] = {
    "few_dark": ((66, 28, 98), (0.022, 0.028), 0.95, 0.0, 0.09),
    "dark_large": ((52, 20, 80), (0.028, 0.034), 0.97, 0.5, 0.1),
    "orange": ((228, 118, 58), (0.020, 0.026), 0.92, 0.0, 0.0),
    "azurophilic": ((160, 40, 104), (0.018, 0.024), 0.92, 0.0, 0.06),
    "fine": ((150, 98, 172), (0.012, 0.015), 0.8, 0.0, 0.0),
}

# Nuclear base colour, texture scale (image fraction), multiplicative amplitude, clump sharpening.
_CHROMATIN_STYLE: dict[str, tuple[RGB, float, float, float]] = {
    "fine": ((112, 66, 152), 0.008, 0.06, 1.0),
    "coarse": ((102, 58, 142), 0.018, 0.14, 1.0),
    "clumped": ((94, 50, 132), 0.026, 0.22, 2.5),
    "pyknotic": ((60, 30, 86), 0.020, 0.04, 1.0),
}

_BACKGROUND: RGB = (242, 231, 236)  # pale pinkish smear background
_RED_CELL: RGB = (224, 146, 158)  # erythrocyte pink, also the neighbouring red cells
_NUCLEOLUS: RGB = (150, 150, 206)  # pale blue-grey nucleoli
_VACUOLE: RGB = (238, 234, 242)  # near-white vacuoles


def class_code(class_id: int) -> str:
    """The vocabulary code (``SPECS`` key) of a ``BONE_MARROW_16`` class id."""
    return BONE_MARROW_16.lookup(int(class_id)).code


# ---------------------------------------------------------------------------------------------
# Geometry: signed distances in image units (negative inside)
# ---------------------------------------------------------------------------------------------


def _rotate(x: np.ndarray, y: np.ndarray, angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates in a frame rotated by ``angle`` (radians)."""
    c, s = math.cos(angle), math.sin(angle)
    return c * x + s * y, -s * x + c * y


def _sd_ellipse(x: np.ndarray, y: np.ndarray, a: float, b: float) -> np.ndarray:
    # Scaled-circle approximation: exact on the axes, close enough for near-round shapes.
    return (np.sqrt((x / a) ** 2 + (y / b) ** 2) - 1.0) * min(a, b)


def _sd_capsule(
    x: np.ndarray, y: np.ndarray, p: Sequence[float], q: Sequence[float], r: float
) -> np.ndarray:
    """Distance to the segment p-q minus r (a sausage of radius r)."""
    px, py, qx, qy = p[0], p[1], q[0], q[1]
    vx, vy = qx - px, qy - py
    t = np.clip(((x - px) * vx + (y - py) * vy) / (vx * vx + vy * vy + 1e-12), 0.0, 1.0)
    return np.hypot(x - px - t * vx, y - py - t * vy) - r


def _sd_arc(x: np.ndarray, y: np.ndarray, rho: float, half: float, thick: float) -> np.ndarray:
    """A C-shaped sausage on a circle of radius rho spanning +-half radians around +x.

    The thickness tapers by a quarter towards the rounded ends, like a band neutrophil nucleus.
    """
    ang = np.arctan2(y, x)
    inside = np.abs(ang) <= half
    taper = 1.0 - 0.25 * np.clip(np.abs(ang) / half, 0.0, 1.0) ** 2
    d_body = np.abs(np.hypot(x, y) - rho) - 0.5 * thick * taper
    ex, ey = rho * math.cos(half), rho * math.sin(half)
    d_end = np.minimum(np.hypot(x - ex, y - ey), np.hypot(x - ex, y + ey)) - 0.375 * thick
    return np.where(inside, np.minimum(d_body, d_end), d_end)


def _coverage(d: np.ndarray, px: float) -> np.ndarray:
    """Antialiased coverage of a shape from its signed distance, one canvas pixel wide."""
    return np.clip(0.5 - d / px, 0.0, 1.0)


def _paint(img: np.ndarray, alpha: np.ndarray, colour: np.ndarray | Sequence[float]) -> None:
    """Alpha-composite ``colour`` (RGB in 0..1, or an HxWx3 field) over ``img`` in place."""
    img += alpha[..., None] * (np.asarray(colour, dtype=np.float32) - img)


def _smooth_noise(rng: np.random.Generator, n: int, sigma: float) -> np.ndarray:
    """Unit-std Gaussian random field on an n x n canvas, correlation ``sigma`` canvas px."""
    f = ndi.gaussian_filter(rng.standard_normal((n, n)).astype(np.float32), sigma, mode="wrap")
    return f / (f.std() + 1e-6)


def _rgb(c: Sequence[float]) -> np.ndarray:
    return np.asarray(c, dtype=np.float32) / 255.0


# ---------------------------------------------------------------------------------------------
# Nucleus shapes: each returns (sdf in the nucleus frame, extent from its origin, subtype)
# ---------------------------------------------------------------------------------------------


def _lobes_sdf(
    rng: np.random.Generator, k: int, r_lobe: float, spacing: float, rho: float, strand: float
) -> tuple[SDF, float]:
    """k elliptical lobes along an arc, consecutive ones joined by thin chromatin strands."""
    step = 2.0 * math.asin(min(0.99, spacing / (2.0 * rho)))
    angles = (np.arange(k) - (k - 1) / 2.0) * step + rng.normal(0, 0.06, k)
    radii = rho * (1.0 + rng.normal(0, 0.06, k))
    centres = np.stack([radii * np.cos(angles), radii * np.sin(angles)], axis=1)
    shapes = [(c, rng.uniform(0, math.pi), rng.uniform(1.0, 1.2)) for c in centres]

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = None
        for (cx, cy), rot, e in shapes:
            u, v = _rotate(x - cx, y - cy, rot)
            dl = _sd_ellipse(u, v, r_lobe * e, r_lobe / e)
            d = dl if d is None else np.minimum(d, dl)
        for a, b in zip(centres[:-1], centres[1:], strict=True):
            d = np.minimum(d, _sd_capsule(x, y, a, b, strand))
        return d

    extent = float(np.max(np.hypot(centres[:, 0], centres[:, 1]))) + 1.25 * r_lobe
    return sdf, extent


def _band_or_segmented(rng: np.random.Generator, radius: float) -> tuple[SDF, float, str]:
    """M5: a C/U-shaped band or 2-5 segments, about 50/50."""
    if rng.random() < 0.5:
        rho, half = radius * rng.uniform(0.5, 0.58), rng.uniform(1.25, 1.75)
        thick = radius * rng.uniform(0.34, 0.38)
        return (lambda x, y: _sd_arc(x, y, rho, half, thick)), rho + thick, "band"
    k = int(rng.integers(2, 6))
    r_lobe = radius * (0.27 - 0.02 * k)
    sdf, extent = _lobes_sdf(
        rng, k, r_lobe, 2 * r_lobe + 0.22 * radius, radius * rng.uniform(0.5, 0.6), strand=0.007
    )
    return sdf, extent, "segmented"


def _compact_nucleus(kind: str, rng: np.random.Generator, rn: float) -> tuple[SDF, float]:
    """Round, oval, kidney or indented nucleus of equivalent radius ``rn``."""
    if kind == "round":
        e = rng.uniform(0.0, 0.06)
        return (lambda x, y: _sd_ellipse(x, y, rn * (1 + e), rn * (1 - e))), rn * (1 + e)
    if kind == "oval":
        e = rng.uniform(1.18, 1.28)
        return (lambda x, y: _sd_ellipse(x, y, rn * e, rn / e)), rn * e
    if kind == "kidney":  # one deep central bite: a bean
        a, b, bite_r = rn * 1.25, rn * 1.0, rn * rng.uniform(0.55, 0.65)
        bites = [(0.0, b + 0.1 * bite_r, bite_r)]
    else:  # monocyte: a deep off-centre indent and a shallow fold on the other side
        a, b = rn * 1.2, rn * 0.95
        side = rng.choice([-1.0, 1.0]) * rng.uniform(0.25, 0.4) * a
        bites = [
            (side, b + 0.1 * rn, rn * rng.uniform(0.5, 0.6)),
            (-side, -b - 0.2 * rn, rn * rng.uniform(0.35, 0.45)),
        ]

    def sdf(x: np.ndarray, y: np.ndarray) -> np.ndarray:
        d = _sd_ellipse(x, y, a, b)
        for bx, by, br in bites:
            d = np.maximum(d, br - np.hypot(x - bx, y - by))
        return d

    return sdf, a


def _make_nucleus(
    spec: CellSpec, rng: np.random.Generator, radius: float
) -> tuple[SDF, float, str | None]:
    """The nucleus of a cell of ``radius`` (image units), in its own frame."""
    kind = spec.nucleus
    if kind == "band_or_segmented":
        return _band_or_segmented(rng, radius)
    if kind == "bilobed":
        r_lobe = radius * rng.uniform(0.27, 0.3)
        sdf, ext = _lobes_sdf(rng, 2, r_lobe, 2 * r_lobe + 0.2 * radius, radius * 0.6, 0.008)
        return sdf, ext, None
    if kind == "lobed":
        r_lobe = radius * rng.uniform(0.3, 0.34)
        k = int(rng.integers(2, 4))
        sdf, ext = _lobes_sdf(rng, k, r_lobe, 1.5 * r_lobe, radius * 0.4, 0.02)
        return sdf, ext, None
    rn = radius * math.sqrt(rng.uniform(*spec.nc_ratio))
    kind_area = {"kidney": 1.1, "indented": 1.05}.get(kind, 1.0)  # bites remove some area
    sdf, ext = _compact_nucleus(kind, rng, rn * kind_area)
    return sdf, ext, None


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


@dataclass
class _Cell:
    """Pose of the main cell on the canvas: centre, rotation, axes, boundary wobble."""

    cx: float
    cy: float
    angle: float
    radius: float
    sx: float
    sy: float
    wobble: np.ndarray  # (3, 2): amplitude and phase of angular harmonics 2..4

    def local(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Image coordinates to the cell frame (rotated and de-stretched)."""
        u, v = _rotate(x - self.cx, y - self.cy, self.angle)
        return u / self.sx, v / self.sy

    def to_image(self, u: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        x, y = _rotate(u * self.sx, v * self.sy, -self.angle)
        return x + self.cx, y + self.cy

    def sdf(self, u: np.ndarray, v: np.ndarray) -> np.ndarray:
        phi = np.arctan2(v, u)
        r = self.radius * (
            1.0 + sum(a * np.cos((k + 2) * phi + p) for k, (a, p) in enumerate(self.wobble))
        )
        return np.hypot(u, v) - r

    @property
    def outer(self) -> float:
        return self.radius * max(self.sx, self.sy) * (1.0 + float(self.wobble[:, 0].sum()))


def _random_cell(spec: CellSpec, rng: np.random.Generator) -> _Cell:
    radius = rng.uniform(*spec.diameter) / 2.0
    e = rng.uniform(0.0, 0.07)  # slight ellipticity
    jitter = min(0.04, max(0.0, 0.47 - radius * (1 + e)))  # big cells stay inside the frame
    wobble = np.stack([rng.uniform(0, 0.018, 3), rng.uniform(0, 2 * math.pi, 3)], axis=1)
    return _Cell(
        cx=rng.uniform(-jitter, jitter),
        cy=rng.uniform(-jitter, jitter),
        angle=rng.uniform(0, 2 * math.pi),
        radius=radius,
        sx=1 + e,
        sy=1 - e,
        wobble=wobble,
    )


def _background(rng: np.random.Generator, n: int) -> np.ndarray:
    base = _rgb(_BACKGROUND) + rng.normal(0, 3, 3).astype(np.float32) / 255.0
    mottle = 0.012 * _smooth_noise(rng, n, n / 10)
    return np.clip(base[None, None, :] * (1.0 + mottle[..., None]), 0, 1)


def _red_cell_alpha_colour(
    x: np.ndarray,
    y: np.ndarray,
    cx: float,
    cy: float,
    r: float,
    pallor: float,
    colour: np.ndarray,
    bg: np.ndarray,
    px: float,
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage and colour field of a red-cell disc whose centre pales towards ``bg``."""
    d = np.hypot(x - cx, y - cy)
    centre = np.clip(1.0 - (d / (0.6 * r)) ** 2, 0.0, 1.0)[..., None]
    col = colour + pallor * 0.8 * centre * (bg - colour)
    return _coverage(d - r, px), col


def _paint_red_cells(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, cell: _Cell, rng: np.random.Generator, px: float
) -> None:
    """0-3 neighbouring red cells near the edges, kept clear of the main cell."""
    placed: list[tuple[float, float, float]] = []
    bg = img.mean(axis=(0, 1))  # their pallor pales towards the bare smear
    for _ in range(int(rng.integers(0, 4))):
        r = rng.uniform(0.12, 0.155)
        for _try in range(25):
            edge = rng.choice([-1.0, 1.0]) * rng.uniform(0.42, 0.62)
            cx, cy = (edge, rng.uniform(-0.55, 0.55))[:: 1 if rng.random() < 0.5 else -1]
            clear = math.hypot(cx - cell.cx, cy - cell.cy) > cell.outer + r + 0.09
            apart = all(math.hypot(cx - a, cy - b) > 0.85 * (r + rr) for a, b, rr in placed)
            if clear and apart:
                placed.append((cx, cy, r))
                colour = _rgb(_RED_CELL) + rng.normal(0, 4, 3).astype(np.float32) / 255.0
                a, col = _red_cell_alpha_colour(
                    x, y, cx, cy, r, rng.uniform(0.5, 0.8), colour, bg, px
                )
                _paint(img, a, col)
                break


def _scatter(
    rng: np.random.Generator, count: int, r_max: float, keep: Callable, spacing: float = 0.0
) -> np.ndarray:
    """Up to ``count`` uniform points in a disc of radius r_max where ``keep(u, v)`` holds,
    greedily kept at least ``spacing`` apart (so dots stay separate at 32 px)."""
    n = 16 * count + 16  # generous: the keep() region can be a thin annulus
    rr = r_max * np.sqrt(rng.random(n))
    th = rng.uniform(0, 2 * math.pi, n)
    u, v = rr * np.cos(th), rr * np.sin(th)
    ok = keep(u, v)
    pts = np.stack([u[ok], v[ok]], axis=1)
    if spacing <= 0:
        return pts[:count]
    chosen: list[np.ndarray] = []
    for p in pts:
        if len(chosen) == count:
            break
        if not chosen or np.min(np.hypot(*(np.asarray(chosen) - p).T)) >= spacing:
            chosen.append(p)
    return np.asarray(chosen).reshape(-1, 2)


def _discs_coverage(
    x: np.ndarray, y: np.ndarray, cx: np.ndarray, cy: np.ndarray, r: np.ndarray, px: float
) -> np.ndarray:
    """Coverage of a union of small discs (vectorised over discs)."""
    if len(cx) == 0:
        return np.zeros_like(x)
    d = np.hypot(x[None] - cx[:, None, None], y[None] - cy[:, None, None]) - r[:, None, None]
    return _coverage(d.min(axis=0), px)


def _paint_dots(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cell: _Cell,
    pts: np.ndarray,
    radius: Range,
    colour: np.ndarray,
    opacity: float,
    px: float,
    rng: np.random.Generator,
) -> None:
    """Paint dots given in cell-frame coordinates (granules, vacuoles, nucleoli)."""
    if len(pts) == 0:
        return
    gx, gy = cell.to_image(pts[:, 0], pts[:, 1])
    r = rng.uniform(*radius, len(pts))
    _paint(img, opacity * _discs_coverage(x, y, gx, gy, r, px), colour)


def _nucleus_colour(spec: CellSpec, rng: np.random.Generator, n: int, px: float) -> np.ndarray:
    """Nucleus colour field: base purple modulated by the chromatin texture."""
    base, scale, amp, sharp = _CHROMATIN_STYLE[spec.chromatin]
    tex = _smooth_noise(rng, n, scale / px)
    if sharp > 1.0:  # clumps: push the field towards two levels (dark clumps, paler gaps)
        tex = np.tanh(sharp * tex) / math.tanh(sharp)
    col = _rgb(base) * (1.0 + rng.normal(0, 0.03)) * (1.0 + amp * tex[..., None])
    return np.clip(col, 0, 1)


def _cyto_colour(
    spec: CellSpec, rng: np.random.Generator, cell_d: np.ndarray, n: int
) -> np.ndarray:
    """Cytoplasm colour field: class colour, per-image jitter, mottling, darker rim."""
    base = _rgb(spec.cytoplasm) + rng.normal(0, 4, 3).astype(np.float32) / 255.0
    mottle = 0.03 * _smooth_noise(rng, n, n / 24)
    rim = spec.rim * np.clip(1.0 + cell_d / (0.25 * spec.diameter[0]), 0.0, 1.0) ** 2
    return np.clip(base * (1.0 + mottle - rim)[..., None], 0, 1)


def _draw_main_cell(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    spec: CellSpec,
    cell: _Cell,
    rng: np.random.Generator,
    px: float,
) -> str | None:
    """Cytoplasm (or red-cell disc) and contents of the main cell; returns the subtype."""
    n = img.shape[0]
    u, v = cell.local(x, y)
    cell_d = cell.sdf(u, v)
    if spec.nucleus == "absent":  # red cells: a disc paling towards the centre
        colour = _rgb(spec.cytoplasm) + rng.normal(0, 4, 3).astype(np.float32) / 255.0
        pallor = spec.pallor * rng.uniform(0.8, 1.1)
        paper = np.median(img.reshape(-1, 3), axis=0)  # the smear, whatever red cells lie on it
        _, col = _red_cell_alpha_colour(u, v, 0.0, 0.0, cell.radius, pallor, colour, paper, px)
        _paint(img, _coverage(cell_d, px), col)
        return None
    _paint(img, _coverage(cell_d, px), _cyto_colour(spec, rng, cell_d, n))
    nuc_sdf, extent, subtype = _make_nucleus(spec, rng, cell.radius)
    room = max(0.0, min(spec.eccentric * cell.radius, 0.9 * cell.radius - extent))
    off = room * math.sqrt(rng.random())
    th, rot = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
    ox, oy = off * math.cos(th), off * math.sin(th)

    def nuc(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        return nuc_sdf(*_rotate(uu - ox, vv - oy, rot))

    _draw_contents(img, x, y, u, v, cell, nuc, spec, rng, px)
    return subtype


def _draw_contents(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    u: np.ndarray,
    v: np.ndarray,
    cell: _Cell,
    nuc: SDF,
    spec: CellSpec,
    rng: np.random.Generator,
    px: float,
) -> None:
    """Granules, nucleus, nucleoli and vacuoles of a nucleated cell, back to front."""
    n = img.shape[0]
    colour, radius, opacity, over, spacing = _GRANULE_STYLE.get(
        spec.granules, ((0, 0, 0), (0.0, 0.0), 0.0, 0.0, 0.0)
    )
    n_gran = int(rng.integers(*spec.n_granules, endpoint=True))
    n_over = int(round(over * n_gran))
    if n_gran - n_over:  # cytoplasmic granules, clear of the nucleus
        pts = _scatter(
            rng,
            n_gran - n_over,
            0.9 * cell.radius,
            lambda a, b: nuc(a, b) > radius[1] + 0.03,  # ~1 px clear at 32 px
            spacing=spacing,
        )
        _paint_dots(img, x, y, cell, pts, radius, _rgb(colour), opacity, px, rng)
    _paint(img, _coverage(nuc(u, v), px), _nucleus_colour(spec, rng, n, px))
    n_nucleoli = int(rng.integers(*spec.nucleoli, endpoint=True))
    if n_nucleoli:
        pts = _scatter(
            rng, n_nucleoli, 0.5 * cell.radius, lambda a, b: nuc(a, b) < -0.06, spacing=0.1
        )
        _paint_dots(img, x, y, cell, pts, (0.034, 0.044), _rgb(_NUCLEOLUS), 0.95, px, rng)
    if n_over:  # basophil granules also lie over (and hide) the nucleus
        pts = _scatter(rng, n_over, 0.9 * cell.radius, lambda a, b: nuc(a, b) < 0.01)
        _paint_dots(img, x, y, cell, pts, radius, _rgb(colour), opacity, px, rng)
    n_vac = int(rng.integers(*spec.vacuoles, endpoint=True))
    if n_vac:
        pts = _scatter(
            rng, n_vac, 0.8 * cell.radius - 0.04, lambda a, b: nuc(a, b) > 0.06, spacing=0.1
        )
        _paint_dots(img, x, y, cell, pts, (0.034, 0.046), _rgb(_VACUOLE), 1.0, px, rng)


def _finish(img: np.ndarray, rng: np.random.Generator, ss: int, size: int) -> np.ndarray:
    """Stain jitter, slight optical blur, antialiased downsample, sensor noise -> uint8."""
    from PIL import Image

    img = ndi.gaussian_filter(img, (0.35 * ss, 0.35 * ss, 0))
    gains = (1.0 + rng.normal(0, 0.02, 3)) * (1.0 + rng.normal(0, 0.02))
    img = np.clip(img * gains.astype(np.float32), 0, 1)
    hi = Image.fromarray((img * 255.0 + 0.5).astype(np.uint8))
    out = np.asarray(hi.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    out = out + rng.normal(0, 1.5, out.shape)
    return np.clip(out + 0.5, 0, 255).astype(np.uint8)


@lru_cache(maxsize=8)
def _canvas(n: int) -> tuple[np.ndarray, np.ndarray]:
    c = (np.arange(n, dtype=np.float32) + 0.5) / n - 0.5
    y, x = np.meshgrid(c, c, indexing="ij")
    return x, y


def render_cell(
    class_id: int, rng: np.random.Generator, size: int = 32
) -> tuple[np.ndarray, str | None]:
    """Render one phantom cell of ``class_id``: (uint8 size x size x 3 image, subtype or None).

    The subtype is "band"/"segmented" for M5 (about 50/50) and None for every other class.
    """
    spec = SPECS[class_code(class_id)]
    ss = max(2, math.ceil(_HI_RES / size))  # supersampling factor
    n = size * ss
    x, y = _canvas(n)
    px = 1.0 / n
    img = _background(rng, n)
    cell = _random_cell(spec, rng)
    _paint_red_cells(img, x, y, cell, rng, px)  # first: the main cell is painted over them
    subtype = _draw_main_cell(img, x, y, spec, cell, rng, px)
    return _finish(img, rng, ss, size), subtype


def generate(
    per_class: int, size: int = 32, seed: int = 0, classes: list[int] | None = None
) -> Iterator[tuple[np.ndarray, int, str | None]]:
    """Yield (image, class_id, subtype) for ``per_class`` phantoms of each class, class by class.

    Image i of class c depends only on (seed, c, i), so a larger ``per_class`` extends a smaller
    one and a class subset gives the same images as the full set.
    """
    ids = list(range(len(BONE_MARROW_16))) if classes is None else [int(c) for c in classes]
    for cid in ids:
        for i in range(per_class):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(cid, i)))
            image, subtype = render_cell(cid, rng, size)
            yield image, cid, subtype


def shuffle_classes(
    class_ids: Sequence[int] | np.ndarray, seed: int, num_classes: int = len(BONE_MARROW_16)
) -> np.ndarray:
    """Map each id to a uniformly random *different* id (the wrong-class control of the judge)."""
    ids = np.asarray(class_ids, dtype=np.int64)
    shift = np.random.default_rng(seed).integers(1, num_classes, size=ids.shape)
    return (ids + shift) % num_classes


# ---------------------------------------------------------------------------------------------
# The judge: pixel measurements -> per-criterion verdicts
# ---------------------------------------------------------------------------------------------


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


def _solidity(mask: np.ndarray) -> float:
    """Area over convex-hull area of the pixel squares; NaN for tiny masks."""
    from scipy.spatial import ConvexHull, QhullError

    rows = np.flatnonzero(mask.any(axis=1))
    if mask.sum() < 3 or len(rows) == 0:
        return _NAN
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
        return float(mask.sum() / ConvexHull(pts.astype(np.float64)).volume)
    except QhullError:
        return 1.0


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
    return {"cell_diam": 2.0 * math.sqrt(area / math.pi), "cell_solidity": _solidity(cell)}


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
    """Near-white pixels inside the cytoplasm (membrane and nucleus edges excluded) / cell area."""
    core = ndi.binary_erosion(cell) & ~ndi.binary_dilation(nucleus)
    if not core.any():
        return 0.0
    # Relative to the cytoplasm itself: pale cytoplasm has light gaps that are not vacuoles.
    cut = max(0.85, float(np.median(rel[core])) + 0.12)
    return float((core & (rel > cut)).sum()) / max(float(cell.sum()), 1.0)


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


def _criteria(code: str, measures: dict[str, float]) -> dict[str, bool]:
    """Check each measure against the class's accepted interval; NaN never passes."""
    ok = dict.fromkeys(CRITERIA, True)
    for name, (lo, hi) in SPECS[code].accept.items():
        if not lo <= measures[name] <= hi:
            ok[MEASURE_CRITERION[name]] = False
    return ok


def _read_subtype(code: str, measures: dict[str, float]) -> str | None:
    """Band (one curved nucleus) or segmented (two or more lobes), for classes with subtypes."""
    if not BONE_MARROW_16.lookup(code).subtypes or not measures["nuc_lobes"] >= 1:
        return None
    return "segmented" if measures["nuc_lobes"] >= 2 else "band"


def judge_image(image: np.ndarray, class_id: int) -> Verdict:
    """Is ``image`` (H x W x 3, uint8 or float 0..1) a plausible cell of ``class_id``?

    Plausible iff all 7 criteria pass; the verdict carries the measures behind each decision.
    """
    code = class_code(class_id)
    measures = measure_image(image)
    criteria = _criteria(code, measures)
    return Verdict(
        plausible=all(criteria.values()),
        criteria=criteria,
        measures=measures,
        subtype=_read_subtype(code, measures),
    )


def judge_batch(
    images: Iterable[np.ndarray] | np.ndarray, class_ids: Iterable[int] | np.ndarray
) -> list[Verdict]:
    """``judge_image`` over paired images (N x H x W x 3 array or list) and declared classes."""
    return [judge_image(im, int(c)) for im, c in zip(images, class_ids, strict=True)]


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


# ---------------------------------------------------------------------------------------------
# Calibration of the accepted intervals (run after changing the renderer; never at import)
# ---------------------------------------------------------------------------------------------

# Per feature: the least margin added on each side (about its measurement resolution at 32 px)
# and the decimals the interval is rounded outwards to.
_MARGIN: dict[str, tuple[float, int]] = {
    "cell_diam": (0.02, 2),
    "cell_solidity": (0.03, 2),
    "bg_light": (0.05, 2),
    "nuc_area": (0.01, 3),
    "nuc_lobes": (0.0, 0),
    "nuc_solidity": (0.04, 2),
    "nuc_elong": (0.12, 1),
    "nc_ratio": (0.03, 2),
    "cyto_light": (0.03, 2),
    "cyto_blue": (0.04, 2),
    "cyto_red": (0.04, 2),
    "pallor": (0.05, 2),
    "chrom_light": (0.03, 2),
    "chrom_texture": (0.008, 3),
    "nucleoli": (0.02, 2),
    "vacuoles": (0.01, 3),
    "gran_dark": (0.01, 3),
    "gran_orange": (0.02, 2),
    "cyto_texture": (0.004, 3),
}
_SIGNED = ("cyto_blue", "cyto_red", "pallor")  # may be negative; all other features are >= 0
_PRESENCE = ("gran_dark", "gran_orange", "nucleoli", "vacuoles")  # lower bound: half the least


def _interval(name: str, values: np.ndarray) -> Range:
    """[min, max] widened by max(floor, 20 % of the span), clamped to the feature's domain."""
    lo, hi = float(values.min()), float(values.max())
    if name == "nuc_lobes":  # a count: accept exactly what the class shows
        return lo, hi
    floor, decimals = _MARGIN[name]
    margin = max(floor, 0.2 * (hi - lo))
    a, b = lo - margin, hi + margin
    if name not in _SIGNED:
        a = 0.5 * lo if (name in _PRESENCE and lo > 0) else max(a, 0.0)
    if name == "nuc_elong":
        a = max(a, 1.0)
    if name in ("cell_solidity", "bg_light"):
        b = max(b, 1.0)
    scale = 10.0**decimals
    return math.floor(a * scale) / scale, math.ceil(b * scale) / scale


def calibrate_accept(
    seeds: Sequence[int] = (5000, 6000),
    sizes: Sequence[tuple[int, int]] = ((32, 150), (64, 60)),
) -> dict[str, dict[str, Range]]:
    """Accepted intervals per class code from phantoms of tuning ``seeds``.

    For each seed and (size, per_class) it renders phantoms (seed + size gives the stream),
    measures them and fits one interval per feature that is defined on every image of the class
    (a feature that is sometimes NaN, e.g. cytoplasm texture under a thin rim, is not checked).
    """
    values: dict[int, list[dict[str, float]]] = {c: [] for c in range(len(BONE_MARROW_16))}
    for seed in seeds:
        for size, per_class in sizes:
            for image, cid, _ in generate(per_class, size, seed + size):
                values[cid].append(measure_image(image))
    table: dict[str, dict[str, Range]] = {}
    for cid, rows in values.items():
        accept = {}
        for name in MEASURE_CRITERION:
            col = np.array([r[name] for r in rows])
            if not np.isnan(col).any():
                accept[name] = _interval(name, col)
        table[class_code(cid)] = accept
    return table


def format_accept(table: dict[str, dict[str, Range]]) -> str:
    """Python source for an ``_ACCEPT`` table, wrapped at 100 columns."""
    lines = ["# fmt: off", "_ACCEPT: dict[str, dict[str, Range]] = {"]
    for code, accept in table.items():
        lines.append(f'    "{code}": {{')
        line = "       "
        for name, (lo, hi) in accept.items():
            item = f' "{name}": ({lo:g}, {hi:g}),'
            if len(line) + len(item) > 99:
                lines.append(line)
                line = "       "
            line += item
        lines += [line, "    },"]
    return "\n".join([*lines, "}", "# fmt: on"])


if __name__ == "__main__":
    print(format_accept(calibrate_accept()))


# ---------------------------------------------------------------------------------------------
# Shard sets: write phantoms, judge a shard set
# ---------------------------------------------------------------------------------------------


def write_phantoms(
    out: str | Path,
    per_class: int,
    test_per_class: int = 0,
    size: int = 32,
    seed: int = 0,
    label_noise: float = 0.0,
) -> dict:
    """Render phantoms into a shard set (train, then test from a disjoint seed); the manifest.

    ``label_noise`` redraws that fraction of the *training* labels as a different class, as
    annotation errors in a real data set would (test labels stay clean). The images are those
    of ``label_noise=0``; which labels change depends only on ``seed``.
    """
    from rich.progress import track

    from pathloop.data import ShardWriter

    if not 0 <= label_noise < 1:
        raise ValueError(f"label_noise is a fraction in [0, 1), got {label_noise}")
    total = 16 * (per_class + test_per_class)
    note = f"phantoms seed={seed} size={size}" + (
        f" label_noise={label_noise}" if label_noise else ""
    )
    flip = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(1_000_003,)))
    with ShardWriter(out, BONE_MARROW_16, source_note=note) as w:
        parts = [("train", per_class, seed), ("test", test_per_class, seed + 7919)]
        stream = ((split, item) for split, n, s in parts if n for item in generate(n, size, s))
        for split, (img, cid, subtype) in track(stream, total=total, description="phantoms"):
            if split == "train" and label_noise and flip.random() < label_noise:
                cid = int(shuffle_classes([cid], int(flip.integers(2**31)))[0])
                subtype = None  # the new class's sub-types do not apply to this cell
            w.add(img, cid, split=split, source="phantom", subtype=subtype)
    return w.manifest


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
    shard_dir: str | Path, shuffle_seed: int | None = None, split: str | None = None
) -> dict:
    """Judge every image of a shard set against its declared class; the report dict.

    ``shuffle_seed`` first replaces each declared class with a different random class (the
    judge should then call nearly everything implausible).
    """
    from pathloop.data import load_image_table, read_vocab

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
    verdicts = judge_batch(list(images), ids)
    subtypes = cols.get("subtype")
    has_sub = subtypes is not None and any(t is not None for t in subtypes)
    true_sub = list(subtypes) if has_sub and shuffle_seed is None else None
    report = judge_report(verdicts, ids, true_subtypes=true_sub)
    report.update(shards=str(shard_dir), split=split, shuffled_with=shuffle_seed)
    return report
