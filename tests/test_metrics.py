"""Evaluation metrics on cases with known answers: PRDC against the reference package, FID on
Gaussians, classifier metrics of perfect and constant classifiers, Wilson intervals, the feature
model and the plausibility sources."""

import numpy as np
import pytest
import torch

from pathloop import metrics as M
from pathloop.vocab import BONE_MARROW_16

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny CNNs on 1 thread


# ----------------------------------------------------------------------------- PRDC


@pytest.mark.parametrize("k,chunk", [(5, 64), (3, 1000)])
def test_prdc_agrees_with_reference_package(k, chunk):
    from prdc import compute_prdc

    rng = np.random.default_rng(k)
    real = rng.normal(size=(300, 16)).astype(np.float32)
    fake = rng.normal(0.4, 1.3, size=(220, 16)).astype(np.float32)
    ref = compute_prdc(real, fake, nearest_k=k)
    ours = M.prdc(real, fake, k=k, chunk=chunk, device="cpu")  # chunk=64: many blocks
    for key in ("precision", "recall", "density", "coverage"):
        assert ours[key] == pytest.approx(float(ref[key]), abs=1e-6), key
    assert 0 < ours["precision"] < 1 and 0 < ours["coverage"] < 1  # a non-trivial case


def test_prdc_identical_and_disjoint_sets():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(100, 8))
    same = M.prdc(x, x, k=5, device="cpu")
    assert same["precision"] == same["recall"] == same["coverage"] == 1.0
    far = M.prdc(x, x + 100.0, k=5, device="cpu")
    assert far == {"precision": 0.0, "recall": 0.0, "density": 0.0, "coverage": 0.0}
    with pytest.raises(ValueError, match="more than k"):
        M.prdc(x[:5], x, k=5, device="cpu")


def test_prdc_equal_subsamples_both_sides_to_the_same_count_per_class():
    rng = np.random.default_rng(3)
    real_y = np.repeat([0, 1, 2], [12, 9, 30])  # class 2 is not in the synthetic set
    fake_y = np.repeat([0, 1], [7, 20])
    real_f, fake_f = rng.normal(size=(len(real_y), 4)), rng.normal(0.3, size=(len(fake_y), 4))
    out = M.prdc_equal((real_f, real_y), (fake_f, fake_y), k=3, seeds=(0, 1, 2), device="cpu")
    assert out["n_per_class"] == 7 and out["n_seeds"] == 3  # min over both sides and classes
    # seed 1 by hand: 7 of each class on both sides; real class 2 left out
    keep = real_y < 2
    ri = M.take_per_class(real_y[keep], 7, 1)
    fi = M.take_per_class(fake_y, 7, 1)
    assert np.bincount(real_y[keep][ri]).tolist() == np.bincount(fake_y[fi]).tolist() == [7, 7]
    want = M.prdc(real_f[keep][ri], fake_f[fi], k=3, device="cpu")
    assert out["precision_per_seed"][1] == pytest.approx(want["precision"])
    assert out["coverage_per_seed"][1] == pytest.approx(want["coverage"])
    per_seed = [out[f"{m}_per_seed"] for m in ("precision", "recall", "density", "coverage")]
    assert any(len(set(v)) > 1 for v in per_seed)  # subsets differ between seeds
    mean, lo, hi = M.seed_interval(out["coverage_per_seed"])
    assert (out["coverage"], out["coverage_lo"], out["coverage_hi"]) == pytest.approx(
        (mean, lo, hi)
    )
    # nothing to subsample: every seed sees the same sets, the interval has no width
    full = M.prdc_equal((real_f[:14], np.repeat([0, 1], 7)), (fake_f[:14], np.repeat([0, 1], 7)),
                        k=3, seeds=(0, 1), device="cpu")  # fmt: skip
    assert full["precision_lo"] == full["precision"] == full["precision_hi"]
    with pytest.raises(ValueError, match="lacks a class"):
        M.prdc_equal((real_f, np.zeros(len(real_y))), (fake_f, fake_y), k=3, device="cpu")


# ----------------------------------------------------------------------------- FID


def test_frechet_distance_known_gaussians():
    # Commuting covariances: FID = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 1.0])
    mu1, mu2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()  # 5 + 1 + 1 + 4
    assert M.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected)


def test_frechet_distance_matches_sqrtm_formula():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = a @ a.T, b @ b.T
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    ref = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * sqrtm(s1 @ s2).real)
    assert M.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(ref, rel=1e-6)


def test_fid_identical_shifted_and_singular_sets():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(400, 10))
    assert M.fid(x, x) == pytest.approx(0.0, abs=1e-8)
    assert M.fid(x, x + 3.0) == pytest.approx(90.0, rel=1e-6)  # 10 dims x 3^2, same covariance
    y = rng.normal(size=(400, 10))
    assert M.fid(x, y) < 1.0  # two draws of one Gaussian
    few = rng.normal(size=(8, 32))  # D > N: singular covariances still give a finite, real value
    assert np.isfinite(M.fid(few, few + 1)) and M.fid(few, few + 1) == pytest.approx(32, rel=1e-6)


# ----------------------------------------------------------------------------- classifiers


def test_classification_metrics_perfect_constant_and_random():
    K, y = 4, np.repeat(np.arange(4), 25)  # balanced, 100 labels
    perfect = M.classification_metrics(y, np.eye(K)[y])
    assert all(v == pytest.approx(1.0) for v in perfect.values())
    # A constant classifier: always class 0 with uniform probabilities.
    const = M.classification_metrics(y, np.full((100, K), 1 / K))
    assert const["accuracy"] == pytest.approx(1 / K)
    assert const["macro_recall"] == pytest.approx(1 / K)  # class 0 recall 1, others 0
    assert const["macro_precision"] == pytest.approx((1 / K) / K)  # class 0 precision 1/K
    assert const["macro_f1"] == pytest.approx(2 / (K * (K + 1)))  # F1_0 = 2/(K+1)
    assert const["auc_ovr"] == pytest.approx(0.5)
    rng = np.random.default_rng(0)
    yr = rng.integers(0, K, 4000)
    rand = M.classification_metrics(yr, rng.dirichlet(np.ones(K), 4000))
    assert abs(rand["accuracy"] - 1 / K) < 0.03 and abs(rand["auc_ovr"] - 0.5) < 0.03


def test_take_per_class_and_training_sets():
    y = np.array([0, 0, 0, 1, 1, 2])
    idx = M.take_per_class(y, 2, seed=0)
    assert np.bincount(y[idx]).tolist() == [2, 2, 1]
    x = torch.arange(6.0)[:, None, None, None].expand(6, 3, 2, 2)
    syn = (x[:3] + 100, np.array([0, 1, 2]))
    cfg = M.TSTRConfig(fewshot_k=1, synthetic_per_class=1)
    xs, ys = M._training_set("fewshot_synthetic", (x, y), syn, cfg)
    assert len(ys) == 6 and (xs[:, 0, 0, 0] >= 100).sum() == 3
    with pytest.raises(ValueError, match="unknown TSTR setting"):
        M.tstr("bogus", (x, y), (x, y), 3, cfg)


def _marked(y: np.ndarray, offset: float = 0.0) -> tuple[torch.Tensor, np.ndarray]:
    """Images whose pixel value is their row index (+ offset): which rows a set took."""
    x = (torch.arange(len(y), dtype=torch.float32) + offset)[:, None, None, None]
    return x.expand(len(y), 3, 2, 2), y


def test_real_equal_takes_exactly_n_real_images_per_class_seeded():
    real = _marked(np.repeat(np.arange(3), 10))  # 10 real train images per class
    syn = _marked(np.repeat(np.arange(3), [6, 2, 5]), offset=1000)
    cfg = M.TSTRConfig(synthetic_per_class=4, seed=7)
    xs, ys = M._training_set("real_equal", real, syn, cfg)
    _, ys_syn = M._training_set("synthetic", real, syn, cfg)
    assert np.bincount(ys).tolist() == np.bincount(ys_syn).tolist() == [4, 2, 4]  # n per class
    rows = xs[:, 0, 0, 0].long().numpy()
    assert rows.max() < 1000 and (real[1][rows] == ys).all()  # real rows of the right class
    again = M._training_set("real_equal", real, syn, cfg)[0][:, 0, 0, 0].long().numpy()
    other = M._training_set("real_equal", real, syn, M.TSTRConfig(synthetic_per_class=4, seed=8))
    assert again.tolist() == rows.tolist()  # the same seed, the same subset
    assert other[0][:, 0, 0, 0].long().tolist() != rows.tolist()  # another seed, another one
    many = _marked(np.zeros(12, dtype=np.int64), offset=1000)  # 12 of class 0, 10 real ones
    with pytest.raises(ValueError, match="lower tstr.synthetic_per_class to 10"):
        M._training_set("real_equal", real, many, M.TSTRConfig(synthetic_per_class=20))


def test_tstr_seeds_runs_each_seed_and_summarises(monkeypatch):
    seen = []

    def fake_tstr(setting, train, test, k, cfg, syn=None, device=None):
        seen.append((setting, cfg.seed))
        return {"macro_f1": 0.1 * cfg.seed, "accuracy": 0.5, "n_train": 12.0}

    monkeypatch.setattr(M, "tstr", fake_tstr)
    out = M.tstr_seeds("real_equal", None, None, 3, M.TSTRConfig(seed=2, seeds=3))
    assert seen == [("real_equal", 2), ("real_equal", 3), ("real_equal", 4)]
    mean, lo, hi = M.seed_interval([0.2, 0.3, 0.4])
    assert (out["macro_f1"], out["macro_f1_lo"], out["macro_f1_hi"]) == pytest.approx(
        (mean, lo, hi)
    )
    assert out["macro_f1_per_seed"] == pytest.approx([0.2, 0.3, 0.4]) and out["n_seeds"] == 3
    assert out["accuracy_lo"] == out["accuracy_hi"] == 0.5 and "n_train_lo" not in out


def test_seed_interval_is_scipys_t_interval():
    from scipy import stats

    # mean 0.6, sd 0.1, sem 0.1 / sqrt(3); t(0.975, df 2) = 4.3027: half-width 0.2484
    assert M.seed_interval([0.5, 0.6, 0.7]) == pytest.approx((0.6, 0.3516, 0.8484), abs=1e-4)
    v = [0.61, 0.55, 0.72, 0.58, 0.66]
    want = stats.t.interval(0.95, 4, loc=np.mean(v), scale=stats.sem(v))
    assert M.seed_interval(v)[1:] == pytest.approx(want, rel=1e-12)
    assert M.seed_interval(v, 0.9)[2] < want[1]  # a 90 % interval is narrower
    one = M.seed_interval([0.4])
    assert one[0] == 0.4 and np.isnan(one[1]) and np.isnan(one[2])
    assert M.seed_interval([0.3, 0.3, 0.3]) == (0.3, 0.3, 0.3)


def test_tstr_config_rejects_unknown_settings_and_no_seeds():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=r"unknown TSTR setting\(s\) \['bogus'\]; valid: "):
        M.TSTRConfig(settings=("synthetic", "bogus"))
    with pytest.raises(ValidationError, match="seeds"):
        M.TSTRConfig(seeds=0)


# ----------------------------------------------------------------------------- plausibility


def test_wilson_interval_known_values():
    assert M.wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert M.wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert M.wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)  # Wilson 1927
    assert all(np.isnan(M.wilson_interval(0, 0)))
    assert M.wilson_interval(10, 10)[1] == 1.0 and M.wilson_interval(0, 3)[0] == 0.0
    lo90, hi90 = M.wilson_interval(5, 10, z=1.645)  # z picks the level: 90 % is narrower
    assert 0.2366 < lo90 < 0.5 < hi90 < 0.7634


def test_rate_difference_is_newcombes_interval():
    # Newcombe (1998), Table II, example (a): 56/70 - 48/80 = 0.2000, 95 % CI 0.0524 to 0.3339
    d, lo, hi = M.rate_difference(56, 70, 48, 80)
    assert (d, lo, hi) == pytest.approx((0.2, 0.0524, 0.3339), abs=1e-4)
    assert all(np.isnan(M.rate_difference(1, 2, 0, 0)))


def test_plausibility_table_counts_and_unscored():
    vocab = BONE_MARROW_16
    p = [1, 0, 1, None, 1, float("nan")]
    c = [0, 0, 0, 0, 3, 3]
    t = M.plausibility_table(p, c, vocab)
    b1 = t["per_class"][vocab.lookup(0).code]
    assert (b1["n"], b1["k"], b1["rate"]) == (3, 2, pytest.approx(2 / 3))
    assert (b1["lo"], b1["hi"]) == pytest.approx(M.wilson_interval(2, 3))
    assert set(t["per_class"]) == {vocab.lookup(0).code, vocab.lookup(3).code}
    assert (t["overall"]["n"], t["overall"]["k"]) == (4, 3)


def test_plausible_by_judge_matches_judge_batch(phantom_shards):
    from pathloop.data import load_arrays
    from pathloop.judge import judge_batch

    x, c = load_arrays(phantom_shards, "test")
    got = M.plausible_by_evaluator("judge", x, c, BONE_MARROW_16)
    want = [float(v.plausible) for v in judge_batch(x, c)]
    assert got.tolist() == want and 0 < np.mean(want)


def test_plausible_from_store_and_export(phantom_shards, tmp_path):
    from pathloop.experts import evaluate_round
    from pathloop.feedback import FeedbackStore

    with FeedbackStore(tmp_path / "fb.db") as store:
        rid = store.create_round(phantom_shards)
        evaluate_round(store, rid, "judge")
        p, c, vocab = M.plausible_from_store(store, rid, ["judge"])
        export = store.export_round(rid, tmp_path / "export")
        with pytest.raises(ValueError, match="unknown label sources"):
            M.plausible_from_store(store, rid, ["oracle"])
    assert len(p) == 160 and vocab.names == BONE_MARROW_16.names
    pe, ce, _ = M.plausible_from_export(export)
    assert pe.tolist() == p.tolist() and ce.tolist() == c.tolist()
    overall = M.plausibility_table(p, c, vocab)["overall"]
    assert overall["n"] == 160 and overall["rate"] == pytest.approx(p.mean())


def test_plausible_by_reward_thresholds_the_score(tmp_path):
    from pathloop.classifiers import build_backbone
    from pathloop.reward import RewardModel, save_reward_model

    torch.manual_seed(0)
    model = RewardModel(build_backbone("tiny", 16, 32), BONE_MARROW_16, hidden=8)
    save_reward_model(tmp_path / "rm", model, step=0, config={}, metrics={})
    x = np.random.default_rng(0).integers(0, 255, (12, 32, 32, 3), dtype=np.uint8)
    c = np.arange(12)
    scores = model.eval().score(x, c)
    thr = float(np.median(scores))
    got = M.plausible_by_reward(str(tmp_path / "rm"), x, c, BONE_MARROW_16, threshold=thr)
    assert got.tolist() == (scores >= thr).astype(float).tolist() and 0 < got.mean() < 1


def test_remap_ids_by_name_and_missing_class():
    from pathloop.vocab import Vocabulary

    small = Vocabulary.from_names([BONE_MARROW_16.lookup(5).name, BONE_MARROW_16.lookup(2).name])
    assert M.remap_ids(np.array([0, 1, 1]), small, BONE_MARROW_16).tolist() == [5, 2, 2]
    with pytest.raises(ValueError, match="not in the reference vocabulary"):
        M.remap_ids(np.array([3]), BONE_MARROW_16, small)


# ----------------------------------------------------------------------------- feature space


def test_feature_model_embeds_and_refuses_reward_backbone(phantom_shards, tmp_path):
    from pathloop.classifiers import BACKBONE_PRESETS, build_backbone, save_backbone

    cfg = M.FeatureConfig(steps=60)
    res = M.train_feature_model(phantom_shards, tmp_path / "fm", cfg)
    assert res["test_accuracy"] > 3 / 16  # chance is 1/16
    fm = M.load_feature_model(tmp_path / "fm")
    assert fm.name == M.FEATURE_PRESETS["tiny"] != BACKBONE_PRESETS["tiny"]  # not the teacher
    x = np.random.default_rng(0).integers(0, 255, (5, 64, 64, 3), dtype=np.uint8)  # resized
    f = M.embed(fm, x, device="cpu")
    assert f.shape == (5, fm.embed_dim) and np.isfinite(f).all()
    save_backbone(tmp_path / "bb", build_backbone("tiny", 16, 32), BONE_MARROW_16)
    with pytest.raises(ValueError, match="expected a 'eval_features'"):
        M.load_feature_model(tmp_path / "bb")


def test_tstr_real_beats_chance(phantom_shards):
    from pathloop.data import load_arrays

    tr, te = load_arrays(phantom_shards, "train"), load_arrays(phantom_shards, "test")
    train, test = (M.as_input(tr[0], 32), tr[1]), (M.as_input(te[0], 32), te[1])
    m = M.tstr("real", train, test, 16, M.TSTRConfig(steps=80), device="cpu")
    assert m["accuracy"] > 3 / 16 and m["auc_ovr"] > 0.7 and m["n_train"] == 128
