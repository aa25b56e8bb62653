"""Paired statistics of experiment arms on cases with known answers: McNemar against statsmodels,
scipy and a published mid-p value; the two-way bootstrap against the plain mean, the normal
paired interval, scipy's bootstrap and a coverage simulation; per-class, criteria and the arms
table."""

import json

import numpy as np
import pytest
from scipy.stats import binomtest, norm
from scipy.stats import bootstrap as scipy_bootstrap

from pathloop import stats as P
from pathloop.metrics import wilson_interval
from pathloop.vocab import BONE_MARROW_16, CRITERIA


def _pairs(b00: int, b01: int, b10: int, b11: int, seed: int = 0) -> tuple[np.ndarray, ...]:
    """Shuffled paired verdicts (a, b) with the given 2x2 counts."""
    a = np.repeat([0, 0, 1, 1], [b00, b01, b10, b11])
    b = np.repeat([0, 1, 0, 1], [b00, b01, b10, b11])
    order = np.random.default_rng(seed).permutation(len(a))
    return a[order], b[order]


# ----------------------------------------------------------------------------- McNemar


@pytest.mark.parametrize(
    "counts", [(40, 3, 11, 46), (10, 7, 7, 6), (5, 0, 9, 20), (12, 0, 0, 8), (300, 41, 62, 97)]
)
def test_mcnemar_matches_statsmodels_and_binomtest(counts):
    from statsmodels.stats.contingency_tables import mcnemar as sm_mcnemar

    a, b = _pairs(*counts)
    ours = P.mcnemar(a, b)
    ref = sm_mcnemar(np.array(counts).reshape(2, 2), exact=True)
    assert (ours.n, ours.b01, ours.b10) == (sum(counts), counts[1], counts[2])
    assert ours.statistic == ref.statistic
    assert ours.p_value == pytest.approx(ref.pvalue, rel=1e-12)
    if counts[1] + counts[2]:
        k, n = counts[2], counts[1] + counts[2]
        assert ours.p_value == pytest.approx(binomtest(k, n, 0.5).pvalue, rel=1e-12)


def test_mcnemar_mid_p_published_value():
    # Fagerland, Lydersen & Laake 2013 (BMC Med Res Methodol 13:91), Table 1: 1 vs 7 discordant
    # pairs: exact p = 0.070, mid-p = 0.039.
    a, b = _pairs(59, 1, 7, 1)
    assert P.mcnemar(a, b).p_value == pytest.approx(0.0703, abs=1e-4)
    assert P.mcnemar(a, b, mid_p=True).p_value == pytest.approx(0.0391, abs=1e-4)
    tie = _pairs(3, 5, 5, 3)
    assert P.mcnemar(*tie).p_value == P.mcnemar(*tie, mid_p=True).p_value == 1.0


def test_mcnemar_pools_seeds_and_drops_unscored_pairs():
    rng = np.random.default_rng(1)
    a, b = rng.integers(0, 2, (3, 40)), rng.integers(0, 2, (3, 40))  # (S, N)
    assert P.mcnemar(a, b) == P.mcnemar(a.ravel(), b.ravel())
    a_nan = a.astype(float)
    a_nan[0, :5] = np.nan
    res = P.mcnemar(a_nan, b)
    assert res == P.mcnemar(a.ravel()[5:], b.ravel()[5:]) and res.n == 115
    with pytest.raises(ValueError, match="binary"):
        P.mcnemar([0, 2, 1], [0, 1, 1])


# ----------------------------------------------------------------------------- paired difference


def test_paired_difference_point_estimate_is_plain_mean():
    rng = np.random.default_rng(2)
    t, c = rng.integers(0, 2, (3, 50)), rng.integers(0, 2, (3, 50))
    out = P.paired_difference(t, c, n_boot=200)
    assert out["diff"] == pytest.approx((t - c).mean())
    assert out["per_seed"] == pytest.approx((t - c).mean(1).tolist())
    assert (out["treated"], out["control"]) == pytest.approx((t.mean(), c.mean()))
    assert (out["n"], out["n_seeds"], out["n_images"]) == (150, 3, 50)
    assert out["lo"] <= out["diff"] <= out["hi"]
    t_nan = t.astype(float)
    t_nan[1, 10:20] = np.nan  # unscored: those pairs are left out
    keep = ~np.isnan(t_nan)
    out = P.paired_difference(t_nan, c, n_boot=200)
    assert out["diff"] == pytest.approx((t - c)[keep].mean()) and out["n"] == 140


def test_one_seed_interval_matches_normal_and_scipy():
    rng = np.random.default_rng(3)
    c = rng.random(4000) < 0.6
    t = np.where(rng.random(4000) < 0.15, ~c, c)  # (N,) paired, correlated with c
    d = t.astype(float) - c
    se = d.std(ddof=1) / np.sqrt(len(d))
    out = P.paired_difference(t, c, n_boot=4000, seed=0)
    assert out["lo"] == pytest.approx(d.mean() - norm.ppf(0.975) * se, abs=0.15 * se)
    assert out["hi"] == pytest.approx(d.mean() + norm.ppf(0.975) * se, abs=0.15 * se)
    ref = scipy_bootstrap((d,), np.mean, n_resamples=4000, method="percentile", random_state=0)
    assert out["lo"] == pytest.approx(ref.confidence_interval.low, abs=0.15 * se)
    assert out["hi"] == pytest.approx(ref.confidence_interval.high, abs=0.15 * se)


def test_interval_widens_when_seeds_disagree():
    rng = np.random.default_rng(4)
    c = (rng.random((4, 200)) < 0.5).astype(float)  # (S, N)
    flips = rng.random(200)  # (N,) one uniform per image, shared by the seeds
    agree = np.where(flips[None] < 0.1, 1.0, c)  # every seed gains about +0.05
    shift = np.array([0.35, -0.15, 0.30, -0.10])[:, None]  # (S, 1) seed-level gains
    disagree = np.clip(c + (flips[None] < np.abs(shift)) * np.sign(shift), 0, 1)
    a = P.paired_difference(agree, c, n_boot=1000)
    b = P.paired_difference(disagree, c, n_boot=1000)
    assert np.ptp(b["per_seed"]) > 5 * np.ptp(a["per_seed"])
    assert b["hi"] - b["lo"] > 2 * (a["hi"] - a["lo"])


def test_two_way_bootstrap_covers_the_seed_spread():
    # Control for the seed stage: when finetuning seeds differ, pooling seeds x images as if they
    # were independent images under-covers; resampling seeds as well brings coverage back up.
    rng = np.random.default_rng(5)
    covered = {"two_way": 0, "pooled": 0}
    reps, s, n = 150, 6, 80
    for r in range(reps):
        gain = 0.05 + rng.normal(0, 0.12, (s, 1))  # (S, 1) seed-level gains; truth: 0.05
        c = (rng.random((s, n)) < 0.5).astype(float)
        t = (rng.random((s, n)) < np.clip(0.5 + gain, 0, 1)).astype(float)
        two = P.paired_difference(t, c, n_boot=300, seed=r)
        pooled = P.paired_difference(t.ravel(), c.ravel(), n_boot=300, seed=r)
        covered["two_way"] += two["lo"] <= 0.05 <= two["hi"]
        covered["pooled"] += pooled["lo"] <= 0.05 <= pooled["hi"]
    assert covered["two_way"] / reps >= 0.85  # 0.96 here
    assert covered["two_way"] - covered["pooled"] >= 0.15 * reps  # pooled: 0.73


def test_two_way_interval_is_conservative_when_seeds_agree():
    # Pure noise is resampled at both stages, so without seed effects the interval is wider than
    # the normal interval of S x N independent pairs (by about sqrt(2.6)), never narrower.
    rng = np.random.default_rng(11)
    c = (rng.random((5, 400)) < 0.5).astype(float)  # (S, N)
    t = (rng.random((5, 400)) < 0.55).astype(float)
    d = t - c
    normal_width = 2 * norm.ppf(0.975) * d.std(ddof=1) / np.sqrt(d.size)
    out = P.paired_difference(t, c)
    assert 1.1 < (out["hi"] - out["lo"]) / normal_width < 2.2


def test_paired_difference_is_seeded_and_broadcasts_one_control_seed():
    rng = np.random.default_rng(6)
    t, c = rng.integers(0, 2, (3, 60)), rng.integers(0, 2, 60)
    one = P.paired_difference(t, c, n_boot=300, seed=7)
    assert one == P.paired_difference(t, c, n_boot=300, seed=7)
    assert one != P.paired_difference(t, c, n_boot=300, seed=8)
    assert one == P.paired_difference(t, np.tile(c, (3, 1)), n_boot=300, seed=7)


@pytest.mark.parametrize(
    "t_shape,c_shape", [((3, 10), (2, 10)), ((10,), (11,)), ((2, 3, 10), (2, 3, 10)), ((0,), (0,))]
)
def test_paired_difference_shape_errors_are_one_line(t_shape, c_shape):
    with pytest.raises(ValueError) as err:
        P.paired_difference(np.zeros(t_shape), np.zeros(c_shape))
    assert "\n" not in str(err.value) and str(t_shape) in str(err.value)


# ----------------------------------------------------------------------------- per class


def test_per_class_paired_and_classes_down():
    rng = np.random.default_rng(7)
    ids = np.repeat([0, 3, 5], 60)  # (N,)
    c = (rng.random((2, 180)) < 0.6).astype(float)
    t = c.copy()
    t[:, ids == 3] = 0.0  # class 3 gets much worse
    t[:, (ids == 5) & (rng.random(180) < 0.3)] = 1.0  # class 5 gets better
    table = P.per_class_paired(t, c, ids, BONE_MARROW_16, n_boot=300)
    codes = [BONE_MARROW_16.lookup(i).code for i in (0, 3, 5)]
    assert list(table) == codes
    for code, cid in zip(codes, (0, 3, 5), strict=True):
        m = ids == cid
        assert table[code]["class_id"] == cid
        assert table[code]["diff"] == pytest.approx((t[:, m] - c[:, m]).mean())
        assert table[code]["n"] == 2 * 60
    assert table[codes[0]]["diff"] == table[codes[0]]["lo"] == table[codes[0]]["hi"] == 0.0
    assert P.classes_down(table, by=0.05) == [codes[1]]
    assert P.classes_down(table, by=0.05, confident=True) == [codes[1]]
    assert P.classes_down(table, by=0.9) == []
    assert list(P.per_class_paired(t, c, ids, n_boot=10)) == ["0", "3", "5"]
    with pytest.raises(ValueError, match="class_ids must be"):
        P.per_class_paired(t, c, ids[:-1])


# ----------------------------------------------------------------------------- criteria


def test_criterion_fail_rates_have_wilson_intervals():
    rng = np.random.default_rng(8)
    fails = rng.random((90, len(CRITERIA))) < np.linspace(0.05, 0.6, len(CRITERIA))
    ids = np.repeat([1, 2], 45)
    out = P.criterion_fail_rates(fails, ids, BONE_MARROW_16)
    assert list(out["overall"]) == list(CRITERIA)
    for j, name in enumerate(CRITERIA):
        row, k = out["overall"][name], int(fails[:, j].sum())
        assert (row["k"], row["n"], row["rate"]) == (k, 90, pytest.approx(k / 90))
        assert (row["lo"], row["hi"]) == pytest.approx(wilson_interval(k, 90))
    code = BONE_MARROW_16.lookup(2).code
    assert out["per_class"][code]["granules"]["k"] == int(fails[45:, -1].sum())
    assert "per_class" not in P.criterion_fail_rates(fails)
    with pytest.raises(ValueError, match="cell_size"):
        P.criterion_fail_rates(fails[:, :6])


def test_criterion_paired_finds_the_fixed_criterion():
    rng = np.random.default_rng(9)
    control = rng.random((3, 150, len(CRITERIA))) < 0.2  # (S, N, 7)
    treated = control.copy()
    j = CRITERIA.index("chromatin")
    treated[..., j] &= rng.random((3, 150)) < 0.2  # most chromatin fails fixed
    out = P.criterion_paired(treated, control, n_boot=300)
    assert out["chromatin"]["hi"] < 0
    assert [k for k, r in out.items() if r["diff"] != 0] == ["chromatin"]


# ----------------------------------------------------------------------------- arms table


def test_compare_arms_table():
    rng = np.random.default_rng(10)
    s, n = 3, 120
    ids = np.repeat([0, 1, 2], n // 3)
    control = (rng.random((s, n)) < 0.5).astype(float)
    feedback = np.where(rng.random((s, n)) < 0.2, 1.0, control)
    feedback[:, ids == 2] = 0.0  # one class down
    oracle = np.ones((s, n))
    oracle[0, 0] = np.nan  # unscored image
    fails = {a: rng.random((s, n, len(CRITERIA))) < 0.3 for a in ("control", "feedback", "oracle")}
    verdicts = {"feedback": feedback, "control": control, "oracle": oracle}
    rows = P.compare_arms(verdicts, class_ids=ids, vocab=BONE_MARROW_16, fails=fails, n_boot=200)
    json.dumps(rows, allow_nan=False)  # plain JSON
    assert [r["arm"] for r in rows] == ["control", "feedback", "oracle"]
    ctl, fb, orc = rows
    assert ctl["rate"] == pytest.approx(control.mean()) and ctl["diff"] is None
    assert ctl["mcnemar_p"] is None and ctl["classes_down"] == []
    assert ctl["per_class"][BONE_MARROW_16.lookup(0).code]["diff"] is None
    ref = P.paired_difference(feedback, control, n_boot=200)
    assert (fb["diff"], fb["lo"], fb["hi"]) == (ref["diff"], ref["lo"], ref["hi"])
    assert fb["per_seed"] == ref["per_seed"] and fb["rate_per_seed"] == feedback.mean(1).tolist()
    test = P.mcnemar(control, feedback)
    assert (fb["mcnemar_p"], fb["fixed"], fb["broken"]) == (test.p_value, test.b01, test.b10)
    down = BONE_MARROW_16.lookup(2).code
    assert fb["classes_down"] == [down] and fb["per_class"][down]["diff"] < -0.05
    assert set(fb["per_class"][down]) == {"class_id", "rate", "diff", "lo", "hi", "n"}
    assert orc["n"] == s * n - 1 and orc["rate"] == 1.0 and orc["mcnemar_p"] < 1e-6
    assert set(orc["criteria"]) == set(CRITERIA) and ctl["criteria"]["nc_ratio"]["diff"] is None
    j = CRITERIA.index("nc_ratio")
    assert orc["criteria"]["nc_ratio"]["diff"] == pytest.approx(
        (fails["oracle"][..., j].astype(float) - fails["control"][..., j]).mean()
    )
    with pytest.raises(ValueError, match="control arm 'base'"):
        P.compare_arms(verdicts, control="base")
    with pytest.raises(ValueError, match="class_ids must be"):
        P.compare_arms(verdicts, class_ids=ids[:10])


def test_compare_arms_focus_classes():
    """The focus row pairs only the focus classes' images: the same as slicing them by hand."""
    rng = np.random.default_rng(11)
    ids = np.repeat([0, 1, 2], 40)
    control = (rng.random((3, 120)) < 0.5).astype(float)
    feedback = control.copy()
    feedback[:, ids == 1] = 1.0  # only class 1 moves
    verdicts = {"control": control, "feedback": feedback}
    rows = P.compare_arms(verdicts, class_ids=ids, focus=[1, 2], n_boot=200)
    keep = ids >= 1
    ref = P.paired_difference(feedback[:, keep], control[:, keep], n_boot=200)
    fb = rows[1]["focus"]
    assert fb["class_ids"] == [1, 2] and fb["n"] == 3 * 80
    assert (fb["diff"], fb["lo"], fb["hi"]) == (ref["diff"], ref["lo"], ref["hi"])
    assert fb["diff"] > rows[1]["diff"] > 0  # diluted over all classes
    assert rows[0]["focus"]["diff"] is None
    assert rows[0]["focus"]["rate"] == pytest.approx(control[:, keep].mean())
    with pytest.raises(ValueError, match=r"focus classes \[7\]"):
        P.compare_arms(verdicts, class_ids=ids, focus=[1, 7])
    with pytest.raises(ValueError, match="focus needs class_ids"):
        P.compare_arms(verdicts, focus=[1])


def test_compare_arms_undefined_values_are_none():
    verdicts = {"control": np.array([[1.0, np.nan]]), "arm": np.array([[np.nan, 1.0]])}
    rows = P.compare_arms(verdicts, n_boot=50)
    json.dumps(rows, allow_nan=False)
    assert rows[1]["n"] == 0 and rows[1]["diff"] is None and rows[1]["lo"] is None
    assert rows[1]["per_seed"] == [None] and rows[1]["mcnemar_p"] == 1.0


def test_seed_difference_is_a_t_interval_over_seeds():
    """PRDC and TSTR give one value per finetuning seed: the paired difference to the control's
    model of the same seed, with Student's t interval (checked against a t interval computed
    by hand from scipy's quantile), a pretrained model broadcast against every control seed."""
    from scipy.stats import t as student_t

    arm, ctl = [0.90, 0.95, 0.92], [0.88, 0.90, 0.91]
    d = np.array(arm) - np.array(ctl)  # 0.02, 0.05, 0.01
    half = student_t.ppf(0.975, 2) * d.std(ddof=1) / np.sqrt(3)
    r = P.seed_difference(arm, ctl)
    assert r["diff"] == pytest.approx(d.mean()) and r["n_seeds"] == 3
    assert (r["lo"], r["hi"]) == pytest.approx((d.mean() - half, d.mean() + half))
    assert r["per_seed"] == pytest.approx(d.tolist())
    base = P.seed_difference([0.9], ctl)  # one model against three control seeds
    assert base["per_seed"] == pytest.approx([0.02, 0.0, -0.01]) and base["n_seeds"] == 3
    one = P.seed_difference([0.9], [0.8])
    assert one["diff"] == pytest.approx(0.1) and np.isnan(one["lo"]) and np.isnan(one["hi"])
    with pytest.raises(ValueError, match="one value per seed on both sides"):
        P.seed_difference([0.9, 0.8], [0.8, 0.7, 0.6])
