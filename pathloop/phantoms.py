"""Procedural bone-marrow phantom cells: the renderer of the embedded default data set.

``render_cell`` draws a stylised cell of one of the 16 ``BONE_MARROW_16`` classes from its
class spec (``SPECS``): signed-distance shapes on a supersampled grid (cell, nucleus, granules,
nucleoli, vacuoles), random pose, stain and background jitter and 0-3 neighbouring red cells,
then an antialiased downsample. The simulated expert that grades these cells (and diffusion
samples of them) is ``judge.py``; ``scenarios.write_phantoms`` renders a shard set.

The slide artifacts (``ARTIFACTS``) and the narrowed specs of the strict expert
(``STRICT_SPECS``) are drawn here; ``scenarios.py`` decides which cells get them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from pathloop.vocab import BONE_MARROW_16

Range = tuple[float, float]
RGB = tuple[int, int, int]
SDF = Callable[[np.ndarray, np.ndarray], np.ndarray]

_HI_RES = 128  # minimum supersampled canvas side (px) the renderer draws on

# ---------------------------------------------------------------------------------------------
# Class specs: how to draw each class
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CellSpec:
    """Morphology of one class along the 7 criteria (``judge.ACCEPT`` holds what is accepted)."""

    code: str
    diameter: Range  # cell diameter, fraction of the image side (sampled uniformly)
    # round | oval | kidney | indented | bilobed | lobed | absent, or for M5 band_or_segmented
    # (about half each) or only band or segmented
    nucleus: str
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


def _spec(code: str, **kw: object) -> CellSpec:
    return CellSpec(code=code, **kw)  # type: ignore[arg-type]


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

# What the strict expert (``judge`` profile "strict") calls typical of a class, where it
# accepts less than the annotation covers: the data stay drawn from ``SPECS``. The narrowed
# ranges are chosen so that about half the cells ``SPECS`` draws fall outside them.
# fmt: off
STRICT_SPECS: dict[str, CellSpec] = {
    "ER1": replace(SPECS["ER1"], diameter=(0.729, 0.76)),  # proerythroblasts: large cells only
    "E1": replace(SPECS["E1"], nc_ratio=(0.30, 0.318)),  # eosinophil myelocytes: ample cytoplasm
    "M1": replace(SPECS["M1"], diameter=(0.561, 0.58)),  # myeloblasts: large cells only
    "M3": replace(SPECS["M3"], diameter=(0.56, 0.579)),  # myelocytes: smaller than promyelocytes
    "M5": replace(SPECS["M5"], nucleus="segmented"),  # neutrophils: bands are another stage
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


def _band_or_segmented(
    rng: np.random.Generator, radius: float, kind: str = "band_or_segmented"
) -> tuple[SDF, float, str]:
    """M5: a C/U-shaped band or 2-5 segments, about 50/50 (or only the ``kind`` asked for)."""
    if kind == "band_or_segmented":
        kind = "band" if rng.random() < 0.5 else "segmented"
    if kind == "band":
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
    if kind in ("band_or_segmented", "band", "segmented"):
        return _band_or_segmented(rng, radius, kind)
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
) -> tuple[str | None, SDF | None]:
    """Cytoplasm (or red-cell disc) and contents of the main cell.

    Returns the subtype and the nucleus SDF in the cell frame (None for red cells).
    """
    n = img.shape[0]
    u, v = cell.local(x, y)
    cell_d = cell.sdf(u, v)
    if spec.nucleus == "absent":  # red cells: a disc paling towards the centre
        colour = _rgb(spec.cytoplasm) + rng.normal(0, 4, 3).astype(np.float32) / 255.0
        pallor = spec.pallor * rng.uniform(0.8, 1.1)
        paper = np.median(img.reshape(-1, 3), axis=0)  # the smear, whatever red cells lie on it
        _, col = _red_cell_alpha_colour(u, v, 0.0, 0.0, cell.radius, pallor, colour, paper, px)
        _paint(img, _coverage(cell_d, px), col)
        return None, None
    _paint(img, _coverage(cell_d, px), _cyto_colour(spec, rng, cell_d, n))
    nuc_sdf, extent, subtype = _make_nucleus(spec, rng, cell.radius)
    room = max(0.0, min(spec.eccentric * cell.radius, 0.9 * cell.radius - extent))
    off = room * math.sqrt(rng.random())
    th, rot = rng.uniform(0, 2 * math.pi), rng.uniform(0, 2 * math.pi)
    ox, oy = off * math.cos(th), off * math.sin(th)

    def nuc(uu: np.ndarray, vv: np.ndarray) -> np.ndarray:
        return nuc_sdf(*_rotate(uu - ox, vv - oy, rot))

    _draw_contents(img, x, y, u, v, cell, nuc, spec, rng, px)
    return subtype, nuc


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


# ---------------------------------------------------------------------------------------------
# Slide artifacts: what the expert rejects and the class label does not mention
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Artifact:
    """A slide artifact, aimed to fail one criterion of the judge on any class it applies to."""

    criterion: str  # the ``vocab.CRITERIA`` entry it is aimed to fail
    looks: str  # what a pathologist would see
    applies: Callable[[CellSpec], bool]  # which class specs it can be drawn on


def _rim(spec: CellSpec) -> float:
    """Least width of cytoplasm around the nucleus (image fraction); lobed nuclei (no N:C
    target) and red cells count as all cytoplasm."""
    return 0.5 * spec.diameter[0] * (1.0 - math.sqrt(spec.nc_ratio[1]))


ARTIFACTS: dict[str, Artifact] = {
    # Not on red cells (their pallor reads as pale holes) nor on monocytes (vacuoles are theirs).
    "vacuoles": Artifact(
        "inclusions",
        "large clear vacuoles in the cell (a degenerating cell, or blood stored too long)",
        lambda s: s.nucleus != "absent" and s.vacuoles == (0, 0),
    ),
    # Not where the cell's own granules are dark specks (the two look alike at 32 px), nor
    # where the rim of cytoplasm is too thin for a speck to lie clear of the nucleus.
    "precipitate": Artifact(
        "granules",
        "near-black specks of stain precipitate lying on the cell",
        lambda s: s.granules not in ("few_dark", "dark_large", "azurophilic") and _rim(s) >= 0.075,
    ),
    # Only on cells big enough to reach the centre of the crop while the edge cuts them.
    "cut_off": Artifact(
        "cell_size", "the cell is cut off by the edge of the field", lambda s: s.diameter[0] >= 0.45
    ),
    "overlap": Artifact(
        "cell_size", "a red cell overlaps the cell and merges with its outline", lambda s: True
    ),
}


@dataclass(frozen=True)
class _Debris:
    """Vacuoles or stain specks painted on the cell; lengths are image fractions."""

    colour: RGB
    radius: Range
    count: tuple[int, int]
    inset: float  # clearance inside the membrane (negative: may overhang it)
    spacing: float  # least centre spacing
    clear: float | None  # clearance from the nucleus; None: may lie over it


_DEBRIS: dict[str, _Debris] = {
    # Vacuoles may lie over the nucleus: most cells have too thin a rim of cytoplasm for them.
    "vacuoles": _Debris(_VACUOLE, (0.05, 0.065), (2, 3), 0.035, 0.13, None),
    # Specks under 3 px at 32 px, kept apart and off the nucleus: the judge must not read them
    # as nuclear lobes, and on the nucleus they would not show.
    "precipitate": _Debris((34, 22, 44), (0.018, 0.023), (10, 16), -0.01, 0.075, 0.045),
}


def artifact_kinds(code: str) -> list[str]:
    """The ``ARTIFACTS`` that can be drawn on class ``code``, in ``ARTIFACTS`` order."""
    return [name for name, a in ARTIFACTS.items() if a.applies(SPECS[code])]


def _artifact_rng(
    spec: CellSpec, artifact: str | None, rng: np.random.Generator
) -> np.random.Generator | None:
    """A child stream for the artifact's own draws; None without an artifact."""
    if artifact is None:
        return None
    if artifact not in ARTIFACTS:
        raise ValueError(f"unknown artifact {artifact!r}; valid artifacts: {', '.join(ARTIFACTS)}")
    if artifact not in artifact_kinds(spec.code):
        raise ValueError(
            f"artifact {artifact!r} is not drawn on class {spec.code}; "
            f"valid there: {', '.join(artifact_kinds(spec.code))}"
        )
    return rng.spawn(1)[0]


def _cut_off(cell: _Cell, rng: np.random.Generator) -> None:
    """Move the cell towards one side of the frame so that the edge cuts up to 30-60 % of its
    radius off, as far as it still covers the centre of the crop."""
    depth = cell.radius * rng.uniform(0.3, 0.6)
    c = min(0.5 - cell.radius + depth, cell.radius + 0.08)  # reach 0.08 into the centre
    side = int(rng.integers(4))
    if side < 2:
        cell.cx = c if side == 0 else -c
    else:
        cell.cy = c if side == 2 else -c


def _paint_overlap(
    img: np.ndarray, x: np.ndarray, y: np.ndarray, cell: _Cell, rng: np.random.Generator, px: float
) -> None:
    """A red cell under the main cell, its disc overlapping 50-80 % of its radius."""
    r = rng.uniform(0.12, 0.155)
    th = rng.uniform(0, 2 * math.pi)
    d = cell.radius + r * rng.uniform(0.5, 0.85)
    colour = _rgb(_RED_CELL) + rng.normal(0, 4, 3).astype(np.float32) / 255.0
    cx, cy = cell.cx + d * math.cos(th), cell.cy + d * math.sin(th)
    bg = img.mean(axis=(0, 1))
    alpha, col = _red_cell_alpha_colour(x, y, cx, cy, r, rng.uniform(0.5, 0.8), colour, bg, px)
    _paint(img, alpha, col)


def _paint_debris(
    img: np.ndarray,
    x: np.ndarray,
    y: np.ndarray,
    cell: _Cell,
    nuc: SDF | None,
    kind: str,
    rng: np.random.Generator,
    px: float,
) -> None:
    """Vacuoles or precipitate specks on the cell (see ``_DEBRIS``)."""
    d = _DEBRIS[kind]

    def keep(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        inside = cell.sdf(a, b) < -(d.inset + d.radius[1])
        if nuc is None or d.clear is None:
            return inside
        return inside & (nuc(a, b) > d.clear + d.radius[1])

    n = int(rng.integers(*d.count, endpoint=True))
    pts = _scatter(rng, n, 1.1 * cell.radius, keep, spacing=d.spacing)
    _paint_dots(img, x, y, cell, pts, d.radius, _rgb(d.colour), 1.0, px, rng)


def render_cell(
    class_id: int,
    rng: np.random.Generator,
    size: int = 32,
    artifact: str | None = None,
    spec: CellSpec | None = None,
) -> tuple[np.ndarray, str | None]:
    """Render one phantom cell of ``class_id``: (uint8 size x size x 3 image, subtype or None).

    The subtype is "band"/"segmented" for M5 (about 50/50) and None for every other class.
    ``artifact`` (an ``ARTIFACTS`` name) adds that slide artifact; ``spec`` replaces the class's
    ``SPECS`` entry (e.g. a ``STRICT_SPECS`` one).
    """
    spec = spec or SPECS[class_code(class_id)]
    # Artifact draws come from a child stream, so the cell itself is drawn as it would be clean.
    arng = _artifact_rng(spec, artifact, rng)
    ss = max(2, math.ceil(_HI_RES / size))  # supersampling factor
    n = size * ss
    x, y = _canvas(n)
    px = 1.0 / n
    img = _background(rng, n)
    cell = _random_cell(spec, rng)
    if artifact == "cut_off":
        _cut_off(cell, arng)
    _paint_red_cells(img, x, y, cell, rng, px)  # first: the main cell is painted over them
    if artifact == "overlap":
        _paint_overlap(img, x, y, cell, arng, px)
    subtype, nuc = _draw_main_cell(img, x, y, spec, cell, rng, px)
    if artifact in ("vacuoles", "precipitate"):
        _paint_debris(img, x, y, cell, nuc, artifact, arng, px)
    return _finish(img, rng, ss, size), subtype


def generate(
    per_class: int,
    size: int = 32,
    seed: int = 0,
    classes: list[int] | None = None,
    artifacts: Mapping[tuple[int, int], str] | None = None,
    specs: Mapping[str, CellSpec] | None = None,
) -> Iterator[tuple[np.ndarray, int, str | None]]:
    """Yield (image, class_id, subtype) for ``per_class`` phantoms of each class, class by class.

    Image i of class c depends only on (seed, c, i), so a larger ``per_class`` extends a smaller
    one and a class subset gives the same images as the full set. ``artifacts`` maps (class id,
    index) to the artifact that image carries (``artifact_plan``); ``specs`` replaces the
    ``SPECS`` entries of some class codes.
    """
    ids = list(range(len(BONE_MARROW_16))) if classes is None else [int(c) for c in classes]
    artifacts, specs = artifacts or {}, specs or {}
    for cid in ids:
        spec = specs.get(class_code(cid))
        for i in range(per_class):
            rng = np.random.default_rng(np.random.SeedSequence(seed, spawn_key=(cid, i)))
            image, subtype = render_cell(cid, rng, size, artifacts.get((cid, i)), spec)
            yield image, cid, subtype


def shuffle_classes(
    class_ids: Sequence[int] | np.ndarray, seed: int, num_classes: int = len(BONE_MARROW_16)
) -> np.ndarray:
    """Map each id to a uniformly random *different* id (the wrong-class control of the judge)."""
    ids = np.asarray(class_ids, dtype=np.int64)
    shift = np.random.default_rng(seed).integers(1, num_classes, size=ids.shape)
    return (ids + shift) % num_classes
