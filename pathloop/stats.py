"""Paired statistics for experiment arms that share their evaluation images.

Arms of an experiment (control, feedback, oracle, ...) are evaluated on the SAME images: the same
per-image sampling seed and class in every arm and every finetuning seed. Verdicts are arrays
(S, N): S finetuning seeds x N evaluation images, 1/0 per image (plausible), NaN where an image
got no verdict. A pair with NaN on either side is left out. A (1, N) or (N,) side, e.g. a base
model without finetuning seeds, is paired with every seed of the other side.

- ``mcnemar``: exact test of paired binary verdicts (the discordant pairs).
- ``paired_difference``: mean difference with a two-way (seeds x images) bootstrap interval.
- ``per_class_paired`` / ``classes_down``: the same per class, and which classes got worse.
- ``criterion_fail_rates`` / ``criterion_paired``: the 7 criteria (which one feedback fixed).
- ``compare_arms``: one JSON-ready row per arm, the table an experiment prints.

Pure numpy/scipy; the Wilson rows come from ``metrics`` so that per-class tables look alike.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from pathloop.vocab import CRITERIA, Vocabulary

# ----------------------------------------------------------------------------- McNemar


@dataclass(frozen=True)
class McNemar:
    """Exact McNemar test: ``b01`` pairs are 0 in ``a`` and 1 in ``b``, ``b10`` the reverse."""

    n: int  # pairs compared (both sides scored)
    b01: int
    b10: int
    statistic: int  # min(b01, b10), as statsmodels reports it
    p_value: float


def mcnemar(a: Any, b: Any, mid_p: bool = False) -> McNemar:
    """Two-sided exact McNemar test of paired binary verdicts ``a`` and ``b``, (S, N) or (N,):
    binomial(b01 + b10, 1/2) on the discordant pairs. (S, N) pools the seeds, pairing seed by
    seed, and treats all S x N pairs as independent (the bootstrap interval of
    ``paired_difference`` is the one that carries the seed-to-seed spread). ``mid_p`` takes off
    half the probability of the observed count (less conservative; Fagerland et al. 2013)."""
    from scipy.stats import binom, binomtest

    x, y = _paired_arrays(a, b)  # (S, N) each
    keep = ~(np.isnan(x) | np.isnan(y))
    x, y = x[keep], y[keep]  # (P,)
    if not (np.isin(x, (0, 1)).all() and np.isin(y, (0, 1)).all()):
        raise ValueError("McNemar needs binary verdicts (0/1, NaN for unscored)")
    b01, b10 = int(((x == 0) & (y == 1)).sum()), int(((x == 1) & (y == 0)).sum())
    n_disc, k = b01 + b10, min(b01, b10)
    if n_disc == 0:
        p = 1.0
    elif mid_p:
        p = min(1.0, 2 * binom.cdf(k, n_disc, 0.5) - binom.pmf(k, n_disc, 0.5))
    else:
        p = binomtest(k, n_disc, 0.5).pvalue  # symmetric at 1/2: twice the smaller tail, <= 1
    return McNemar(n=int(x.size), b01=b01, b10=b10, statistic=k, p_value=float(p))


# ----------------------------------------------------------------------------- paired difference


def _paired_arrays(treated: Any, control: Any) -> tuple[np.ndarray, np.ndarray]:
    """Both sides as float (S, N); (N,) is one seed, and a one-seed side repeats over seeds."""
    t, c = np.asarray(treated, dtype=np.float64), np.asarray(control, dtype=np.float64)
    t, c = (x[None] if x.ndim == 1 else x for x in (t, c))  # (S, N)
    same_n = t.ndim == c.ndim == 2 and t.shape[1] == c.shape[1]
    if not same_n or (t.shape[0] != c.shape[0] and 1 not in (t.shape[0], c.shape[0])):
        raise ValueError(
            "paired verdicts must be (S, N) or (N,) on the same N images and seeds, got shapes "
            f"{np.shape(treated)} and {np.shape(control)}"
        )
    t, c = np.broadcast_arrays(t, c)
    return t, c


def _two_way_bootstrap(d: np.ndarray, n_boot: int, seed: Any, chunk: int = 256) -> np.ndarray:
    """(n_boot,) means of paired differences d (S, N) (NaN: no pair) when seeds are drawn with
    replacement and images are drawn with replacement, one image draw shared by all seeds.

    Seeds and images are crossed, not nested: image i is the same sampling seed and class in
    every finetuning seed, so both factors are resampled (Owen 2007, the pigeonhole bootstrap).
    scipy.stats.bootstrap resamples one axis of independent observations (``paired=True`` only
    shares that draw between samples), which would miss the seed-to-seed spread; hence this.
    Its variance is conservative when seeds agree (pure noise is counted at both stages: about
    2.6x the true variance at S = 4) and about (S - 1) / S of the truth when seed effects
    dominate, the usual shortfall of resampling few clusters."""
    rng = np.random.default_rng(seed)

    def draws(k: int, b: int) -> np.ndarray:  # (b, k) times each of k items is drawn
        idx = rng.integers(0, k, (b, k)) + k * np.arange(b)[:, None]  # faster than multinomial
        return np.bincount(idx.ravel(), minlength=b * k).reshape(b, k)

    s, n = d.shape
    valid = (~np.isnan(d)).astype(np.float64)  # (S, N)
    dv = np.nan_to_num(d)  # (S, N), 0 where no pair
    out = []
    for start in range(0, n_boot, chunk):  # chunks keep memory at O(chunk x N)
        b = min(chunk, n_boot - start)
        ws, wi = draws(s, b), draws(n, b)  # (b, S) seed counts, (b, N) image counts
        num = ((ws @ dv) * wi).sum(1)  # (b,)
        den = ((ws @ valid) * wi).sum(1)  # (b,) pairs drawn
        out.append(np.divide(num, den, out=np.full(b, np.nan), where=den > 0))
    return np.concatenate(out)


def _mean(x: np.ndarray) -> float:
    """Mean of the non-NaN entries; NaN when there are none."""
    x = x[~np.isnan(x)]
    return float(x.mean()) if x.size else math.nan


def paired_difference(
    treated: Any,
    control: Any,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int | Sequence[int] = 0,
) -> dict[str, Any]:
    """Mean paired difference treated - control, each (S, N) or (N,), with its 1 - ``alpha``
    percentile interval from the two-way bootstrap over seeds and images.

    Returns {diff, lo, hi, treated, control (mean rates over the pairs), per_seed (S mean
    differences), n (pairs), n_seeds, n_images}. With S = 1 the interval is the usual paired
    bootstrap over images. With S > 1 it is wider than an interval that pools seeds x images as
    independent (which under-covers when seeds differ); with few seeds (S < 5) the seed draw has
    few distinct outcomes and the interval is rough, so report per_seed beside it."""
    t, c = _paired_arrays(treated, control)  # (S, N) each
    if t.shape[1] == 0:
        raise ValueError(f"no images to pair: shapes {np.shape(treated)}, {np.shape(control)}")
    if not 0 < alpha < 1 or n_boot < 1:
        raise ValueError(f"need 0 < alpha < 1 and n_boot >= 1, got {alpha=}, {n_boot=}")
    d = t - c  # (S, N), NaN where either side is unscored
    pair = ~np.isnan(d)
    boot = _two_way_bootstrap(d, n_boot, seed) if pair.any() else np.full(1, np.nan)
    lo, hi = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2]) if pair.any() else (math.nan,) * 2
    return {
        "diff": _mean(d),
        "lo": float(lo),
        "hi": float(hi),
        "treated": _mean(np.where(pair, t, np.nan)),
        "control": _mean(np.where(pair, c, np.nan)),
        "per_seed": [_mean(row) for row in d],
        "n": int(pair.sum()),
        "n_seeds": int(d.shape[0]),
        "n_images": int(d.shape[1]),
    }


def seed_difference(
    treated: Sequence[float], control: Sequence[float], alpha: float = 0.05
) -> dict[str, Any]:
    """Mean paired difference of a per-model score (PRDC, TSTR: one value per finetuning seed)
    treated - control, paired by seed, with its Student t interval over the seeds (scipy).

    Either side may hold one value for all seeds (the pretrained model: one model against each
    control seed). Returns {diff, lo, hi, per_seed, n_seeds}; with one seed the
    interval is NaN. Over 3 seeds t has 2 degrees of freedom: the interval is wide, by design."""
    from scipy import stats as st

    t = np.asarray(treated, dtype=float)
    c = np.asarray(control, dtype=float)
    if t.size == 1 and c.size > 1:
        t = np.repeat(t, c.size)
    if c.size == 1 and t.size > 1:
        c = np.repeat(c, t.size)
    if t.shape != c.shape or t.ndim != 1 or not t.size:
        raise ValueError(f"need one value per seed on both sides, got {t.shape} and {c.shape}")
    d = t - c
    m = float(d.mean())
    if d.size < 2:
        lo = hi = math.nan
    elif np.ptp(d) == 0:
        lo = hi = m
    else:
        lo, hi = st.t.interval(1 - alpha, d.size - 1, loc=m, scale=st.sem(d))
    return {"diff": m, "lo": float(lo), "hi": float(hi), "per_seed": d.tolist(), "n_seeds": d.size}


# ----------------------------------------------------------------------------- per class


def _class_key(cid: int, vocab: Vocabulary | None) -> str:
    return vocab.lookup(int(cid)).code if vocab is not None else str(int(cid))


def per_class_paired(
    treated: Any,
    control: Any,
    class_ids: Any,
    vocab: Vocabulary | None = None,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
) -> dict[str, dict[str, Any]]:
    """``paired_difference`` within each class present in ``class_ids`` (N,), the class of each
    evaluation image (the same in every seed). Keys are class codes (``vocab``) or ids as
    strings; each row adds ``class_id``. Each class has its own bootstrap stream."""
    t, c = _paired_arrays(treated, control)  # (S, N) each
    ids = np.asarray(class_ids, dtype=np.int64)  # (N,)
    if ids.shape != (t.shape[1],):
        raise ValueError(f"class_ids must be (N,) = ({t.shape[1]},), got shape {ids.shape}")
    out = {}
    for cid in np.unique(ids):
        m = ids == cid
        row = paired_difference(t[:, m], c[:, m], alpha, n_boot, seed=[seed, int(cid)])
        out[_class_key(cid, vocab)] = {"class_id": int(cid), **row}
    return out


def classes_down(
    per_class: dict[str, dict[str, Any]], by: float = 0.05, confident: bool = False
) -> list[str]:
    """Classes whose paired difference is below -``by`` (``confident``: its whole interval is,
    i.e. ``hi`` < -by), from a ``per_class_paired`` or ``compare_arms`` table; NaN or None
    rows never count."""
    key = "hi" if confident else "diff"
    return [k for k, r in per_class.items() if r[key] is not None and r[key] < -by]  # NaN: False


# ----------------------------------------------------------------------------- criteria


def _check_criteria(fails: np.ndarray) -> None:
    if fails.ndim not in (2, 3) or fails.shape[-1] != len(CRITERIA):
        raise ValueError(
            f"criterion fails must be (N, {len(CRITERIA)}) or (S, N, {len(CRITERIA)}) "
            f"({', '.join(CRITERIA)}), got shape {fails.shape}"
        )


def criterion_fail_rates(
    fails: Any, class_ids: Any = None, vocab: Vocabulary | None = None, z: float = 1.96
) -> dict[str, Any]:
    """Fail rate of each criterion (``vocab.CRITERIA``) from fails (N, 7) (1/0, NaN: not
    judged), with Wilson intervals: {"overall": {criterion: row}, "per_class": {class: {criterion:
    row}}} (per_class only with ``class_ids`` (N,)); rows as in ``metrics.plausibility_table``."""
    from pathloop.metrics import _rate_row  # the Wilson row of plausibility tables

    f = np.asarray(fails, dtype=np.float64)  # (N, 7)
    _check_criteria(f)
    if f.ndim != 2:
        raise ValueError(f"criterion_fail_rates takes one seed, (N, 7); got shape {f.shape}")

    def rows(x: np.ndarray) -> dict[str, Any]:  # x (n, 7)
        return {k: _rate_row(x[~np.isnan(x[:, j]), j] >= 0.5, z) for j, k in enumerate(CRITERIA)}

    out: dict[str, Any] = {"overall": rows(f)}
    if class_ids is not None:
        ids = np.asarray(class_ids, dtype=np.int64)
        if ids.shape != (len(f),):
            raise ValueError(f"class_ids must be (N,) = ({len(f)},), got shape {ids.shape}")
        out["per_class"] = {_class_key(c, vocab): rows(f[ids == c]) for c in np.unique(ids)}
    return out


def criterion_paired(
    treated: Any, control: Any, alpha: float = 0.05, n_boot: int = 2000, seed: int = 0
) -> dict[str, dict[str, Any]]:
    """Paired difference of fail rates treated - control per criterion, fails (S, N, 7) or
    (N, 7) each: a negative ``diff`` is a criterion the treatment fixed."""
    t, c = np.asarray(treated, dtype=np.float64), np.asarray(control, dtype=np.float64)
    _check_criteria(t)
    _check_criteria(c)
    return {
        k: paired_difference(t[..., j], c[..., j], alpha, n_boot, seed)  # (S, N) slices
        for j, k in enumerate(CRITERIA)
    }


# ----------------------------------------------------------------------------- arms table


def _json_safe(x: Any) -> Any:
    """NaN → None, recursively, so the table passes ``json.dumps(..., allow_nan=False)``."""
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_json_safe(v) for v in x]
    if isinstance(x, float) and math.isnan(x):
        return None
    return x


_SLIM = ("diff", "lo", "hi", "n")  # what a table cell keeps of a paired_difference


def _cell(rate: float, d: dict[str, Any] | None) -> dict[str, Any]:
    """{rate, diff, lo, hi, n}; the paired fields are None without a difference (the control)."""
    return {"rate": rate, **({k: d[k] for k in _SLIM} if d else dict.fromkeys(_SLIM))}


def _versus(v: np.ndarray, ctl: np.ndarray, boot: dict[str, Any]) -> dict[str, Any]:
    """Paired difference (interval, per-seed values) and McNemar of an arm v (S, N) against the
    control; ``fixed`` pairs are control 0 -> arm 1, ``broken`` the reverse."""
    d, test = paired_difference(v, ctl, **boot), mcnemar(ctl, v)
    slim = {k: d[k] for k in (*_SLIM, "per_seed")}
    return {**slim, "mcnemar_p": test.p_value, "fixed": test.b01, "broken": test.b10}


def _per_class_cells(
    v: np.ndarray, ctl: np.ndarray | None, ids: np.ndarray, vocab: Any, boot: dict
) -> dict[str, dict[str, Any]]:
    """{class: {class_id, rate, diff, lo, hi, n}} of an arm v (S, N); ctl None: no difference."""
    paired = per_class_paired(v, ctl, ids, vocab, **boot) if ctl is not None else {}
    return {
        _class_key(c, vocab): {
            "class_id": int(c),
            **_cell(_mean(v[:, ids == c]), paired.get(_class_key(c, vocab))),
        }
        for c in np.unique(ids)
    }


def _focus_mask(ids: np.ndarray | None, focus: Any) -> np.ndarray:
    """(N,) True on the images of the ``focus`` classes; every one must be present."""
    if ids is None:
        raise ValueError("focus needs class_ids: which images belong to the focus classes")
    missing = sorted(set(int(c) for c in focus) - set(ids.tolist()))
    if not len(focus) or missing:
        raise ValueError(f"focus classes {missing or list(focus)} have no images to compare")
    return np.isin(ids, np.asarray(list(focus), dtype=np.int64))


def compare_arms(
    verdicts: dict[str, Any],
    control: str = "control",
    class_ids: Any = None,
    vocab: Vocabulary | None = None,
    fails: dict[str, Any] | None = None,
    down_by: float = 0.05,
    alpha: float = 0.05,
    n_boot: int = 2000,
    seed: int = 0,
    focus: Any = None,
) -> list[dict[str, Any]]:
    """One row per arm, control first, each arm against ``control`` on the same images.

    ``verdicts``: arm -> (S, N) plausible 1/0 (NaN: unscored). A row is {arm, n_seeds, n_images,
    rate, rate_per_seed, diff, lo, hi, per_seed, n, mcnemar_p, fixed, broken}; with
    ``class_ids`` (N,) also classes_down (diff < -``down_by``) and per_class {class: {class_id,
    rate, diff, lo, hi, n}}; with ``fails`` (arm -> (S, N, 7)) also criteria {criterion: {rate,
    diff, lo, hi, n}} of fail rates; with ``focus`` (class ids, e.g. the classes a scenario
    changes) also focus {class_ids, rate, diff, lo, hi, n}: the same over those classes' images
    only. The control's paired fields are None, and so is any NaN: the list is plain JSON."""
    if control not in verdicts:
        raise ValueError(f"control arm {control!r} is not among the arms: {', '.join(verdicts)}")
    if fails is not None and set(fails) != set(verdicts):
        raise ValueError(f"fails must cover the same arms as verdicts: {', '.join(verdicts)}")
    boot = {"alpha": alpha, "n_boot": n_boot, "seed": seed}
    ctl = np.atleast_2d(np.asarray(verdicts[control], dtype=np.float64))  # (S or 1, N)
    ids = None if class_ids is None else np.asarray(class_ids, dtype=np.int64)  # (N,)
    if ids is not None and ids.shape != (ctl.shape[1],):
        raise ValueError(f"class_ids must be (N,) = ({ctl.shape[1]},), got shape {ids.shape}")
    keep = None if focus is None else _focus_mask(ids, focus)  # (N,) bool
    rows = []
    for arm in [control, *(a for a in verdicts if a != control)]:
        v = np.atleast_2d(np.asarray(verdicts[arm], dtype=np.float64))  # (S, N)
        is_ctl = arm == control
        row: dict[str, Any] = {"arm": arm, "n_seeds": v.shape[0], "n_images": v.shape[1]}
        row.update(rate=_mean(v), rate_per_seed=[_mean(r) for r in v])
        none = dict.fromkeys((*_SLIM, "per_seed", "mcnemar_p", "fixed", "broken"))
        row.update(none if is_ctl else _versus(v, ctl, boot))
        if ids is not None:
            cells = _per_class_cells(v, None if is_ctl else ctl, ids, vocab, boot)
            row["classes_down"] = classes_down(cells, down_by) if not is_ctl else []
            row["per_class"] = cells
        if keep is not None:
            d = None if is_ctl else paired_difference(v[:, keep], ctl[:, keep], **boot)
            row["focus"] = {
                "class_ids": sorted(int(c) for c in focus),
                **_cell(_mean(v[:, keep]), d),
            }
        if fails is not None:
            f, fc = (np.asarray(fails[a], dtype=np.float64) for a in (arm, control))
            paired = {} if is_ctl else criterion_paired(f, fc, **boot)
            row["criteria"] = {
                k: _cell(_mean(f[..., j]), paired.get(k)) for j, k in enumerate(CRITERIA)
            }
        rows.append(row)
    return _json_safe(rows)
