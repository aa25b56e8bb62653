"""Calibration of the judge's accepted intervals: run after changing the renderer, never at import.

``python -m pathloop.judge_calibration`` renders phantoms of the tuning seeds, measures them and
prints fresh ``ACCEPT`` and ``ACCEPT_STRICT`` tables to paste into ``judge.py``; the tests check
the tables on other seeds.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from pathloop.judge import ACCEPT, MEASURE_CRITERION, Range, measure_image
from pathloop.phantoms import SPECS, STRICT_SPECS, class_code, generate
from pathloop.vocab import BONE_MARROW_16

# Per feature: the least margin added on each side (about its measurement resolution at 32 px)
# and the decimals the interval is rounded outwards to.
_MARGIN: dict[str, tuple[float, int]] = {
    "cell_diam": (0.02, 2),
    "cell_solidity": (0.03, 2),
    "cell_edge": (0.1, 2),  # 3 px at 32 px: a cell grazing the frame still has its size
    "cell_notch": (0.02, 2),
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


_DEFECTS = ("cell_edge", "cell_notch")  # lower bound 0: a perfect outline is never a fault


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
    if name in _DEFECTS:
        a = 0.0
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


# The feature a narrowed ``CellSpec`` field shows in, and the margin the strict expert adds to
# the narrowed renders' range (small: a wider one would let the other half back in).
_STRICT_FEATURE: dict[str, tuple[str, float]] = {
    "diameter": ("cell_diam", 0.003),
    "nc_ratio": ("nc_ratio", 0.003),
    "nucleus": ("nuc_lobes", 0.0),
}


def _narrowed_sides(broad: object, strict: object) -> tuple[bool, bool]:
    """Whether a strict spec field raises the lower end, lowers the upper end (both for a kind)."""
    if isinstance(broad, tuple):
        return strict[0] > broad[0], strict[1] < broad[1]  # type: ignore[index]
    return True, True


def _strict_interval(accept: Range, values: np.ndarray, margin: float, sides: tuple) -> Range:
    """``accept`` with the narrowed sides moved to the values' range plus ``margin``."""
    lo, hi = accept
    if sides[0]:
        lo = max(lo, math.floor((values.min() - margin) * 1000) / 1000)
    if sides[1]:
        hi = min(hi, math.ceil((values.max() + margin) * 1000) / 1000)
    return lo, hi


def calibrate_strict(
    seeds: Sequence[int] = (5000, 6000),
    sizes: Sequence[tuple[int, int]] = ((32, 150), (64, 60)),
) -> dict[str, dict[str, Range]]:
    """``ACCEPT_STRICT`` from renders of ``phantoms.STRICT_SPECS`` on tuning ``seeds``.

    Each field a strict spec narrows (``_STRICT_FEATURE``) moves the matching ``ACCEPT``
    interval to the range its renders measure, on the narrowed side only.
    """
    table: dict[str, dict[str, Range]] = {}
    for code, strict in STRICT_SPECS.items():
        cid = BONE_MARROW_16.lookup(code).id
        rows = [
            measure_image(image)
            for seed in seeds
            for size, n in sizes
            for image, _, _ in generate(n, size, seed + size, [cid], specs={code: strict})
        ]
        table[code] = {}
        for field, (name, margin) in _STRICT_FEATURE.items():
            broad, narrow = getattr(SPECS[code], field), getattr(strict, field)
            if narrow != broad:
                values = np.array([r[name] for r in rows])
                sides = _narrowed_sides(broad, narrow)
                table[code][name] = _strict_interval(ACCEPT[code][name], values, margin, sides)
    return table


def format_accept(table: dict[str, dict[str, Range]]) -> str:
    """Python source for an ``ACCEPT`` table, wrapped at 100 columns."""
    lines = ["# fmt: off", "ACCEPT: dict[str, dict[str, Range]] = {"]
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
    print(calibrate_strict())
