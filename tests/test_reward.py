"""Reward model (Eq. 2), its backbone, the subtype and guidance classifiers, and the Ray job."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pathloop import classifiers as C
from pathloop import reward as R
from pathloop.vocab import BONE_MARROW_16

M5, ER6, M1 = 14, 9, 10  # neutrophil (band/segmented), erythrocyte, myeloblast


def _write_phantoms(
    out: Path, per_class: int, test_per_class: int, seed: int, classes: list[int] | None = None
) -> Path:
    """Phantom shard set written with ShardWriter (train rows first, then test, per class)."""
    from pathloop.data import ShardWriter
    from pathloop.phantoms import generate

    n = per_class + test_per_class
    with ShardWriter(out, BONE_MARROW_16) as w:
        for i, (img, cid, sub) in enumerate(generate(n, size=32, seed=seed, classes=classes)):
            split = "train" if i % n < per_class else "test"
            w.add(img, cid, split=split, source="phantom", subtype=sub)
    return out


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny CNNs gain little from a second thread, and on a shared 2-core box two spinning
    threads can cost 10x; restore the setting for the other test modules."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(request, tmp_path_factory) -> Path:
    """conftest's phantom_shards (16 classes × (8 + 2), 32 px); the same set written here while
    phantoms.write_phantoms does not exist yet."""
    from pathloop import phantoms

    if hasattr(phantoms, "write_phantoms"):
        return request.getfixturevalue("phantom_shards")
    return _write_phantoms(tmp_path_factory.mktemp("phantoms"), 8, 2, seed=11)


@pytest.fixture(scope="module")
def extra_shards(tmp_path_factory) -> Path:
    """More images of 3 classes (32 train + 16 test each): M5 for subtypes, ER6/M1 for guidance."""
    return _write_phantoms(tmp_path_factory.mktemp("extra"), 32, 16, seed=3, classes=[ER6, M1, M5])


@pytest.fixture(scope="module")
def backbone_dir(shards, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("backbone") / "bb"
    torch.manual_seed(0)
    C.train_backbone(shards, out, C.ClassifierConfig(steps=100))
    return out


@pytest.fixture(scope="module")
def feedback() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Simulated feedback on 192 phantoms: a quarter kept as drawn, a quarter with heavy noise, a
    quarter with R and B swapped, a quarter declared as another class; targets from the judge."""
    from pathloop.judge import judge_batch
    from pathloop.phantoms import generate, shuffle_classes

    data = list(generate(12, size=32, seed=99))
    x = np.stack([d[0] for d in data])  # (192, 32, 32, 3)
    c = np.array([d[1] for d in data])
    kind = np.arange(len(x)) % 4
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 60, x.shape), 0, 255).astype(np.uint8)
    x = np.where((kind == 1)[:, None, None, None], noisy, x)
    x[kind == 2] = x[kind == 2][..., ::-1]
    c[kind == 3] = shuffle_classes(c[kind == 3], seed=1)
    y = np.array([v.plausible for v in judge_batch(x, c)], dtype=np.float32)
    assert 0.15 < y.mean() < 0.5  # mostly the untouched quarter (and some colour swaps) pass
    return x, c, y


# ----------------------------------------------------------------------------- unit


def test_reward_model_shapes_range_and_onehot():
    torch.manual_seed(0)
    bb = C.build_backbone("tiny", num_classes=16, in_px=32)
    model = R.RewardModel(bb, BONE_MARROW_16, hidden=32)
    assert model.head.mlp[0].in_features == bb.embed_dim + 16  # embedding ⊕ one-hot(c)
    images = np.random.default_rng(0).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    r = model.score(images, [0, 3, 15, 3, 7])
    assert r.shape == (5,) and r.dtype == np.float32 and ((r >= 0) & (r <= 1)).all()
    x = C.to_float_images(images)  # (5, 3, 32, 32) in [-1, 1]
    assert x.shape == (5, 3, 32, 32) and -1 <= x.min() and x.max() <= 1
    assert np.allclose(model.score(x, [0, 3, 15, 3, 7]), r, atol=1e-6)  # float input, same r
    out = model(x, torch.tensor([0, 3, 15, 3, 7]))
    assert out.shape == (5,) and out.requires_grad
    with pytest.raises(ValueError, match="class ids must be in 0..15"):
        model.score(images[:1], [16])


def test_unknown_backbone_lists_presets():
    with pytest.raises(ValueError, match="tiny, paper"):
        C.build_backbone("no_such_net", 2, 32)


def test_redrawn_classes_target_one_iff_class_kept():
    true = torch.arange(4).repeat(500)  # (2000,)
    drawn, target = R.redraw_classes(true, 4, torch.Generator().manual_seed(0))
    again, _ = R.redraw_classes(true, 4, torch.Generator().manual_seed(0))
    assert torch.equal(drawn, again)  # seeded
    assert torch.equal(target, (drawn == true).float())
    assert 0.2 < target.mean() < 0.3  # uniform over all 4 classes: the draw keeps it 1/4 of times
    assert set(drawn.tolist()) == {0, 1, 2, 3}


def test_holdout_is_stratified_and_fixed_across_fractions():
    y = np.array([1.0] * 30 + [0.0] * 70)
    train, test = R.stratified_split(y, 0.2, seed=0)
    assert len(test) == 20 and (y[test] == 1).sum() == 6 and not set(train) & set(test)
    d_full = R.split_feedback(
        np.zeros((100, 2, 2, 3), np.uint8),
        np.zeros(100, np.int64),
        y,
        (np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0)),
        0.2,
        1.0,
        0,
    )
    d_10 = R.split_feedback(
        np.zeros((100, 2, 2, 3), np.uint8),
        np.zeros(100, np.int64),
        y,
        (np.zeros((0, 2, 2, 3), np.uint8), np.zeros(0)),
        0.2,
        0.1,
        0,
    )
    assert len(d_full.syn_y) == 80 and len(d_10.syn_y) == 8 and d_10.syn_y.sum() == 2
    assert np.array_equal(d_full.test_y, d_10.test_y)
    assert len(R.take_fraction(train, y, 0.0, 0)) == 0


def test_metrics_auc_accuracy_ece():
    m = R.reward_metrics(np.array([0.9, 0.8, 0.2, 0.1]), np.array([1.0, 1.0, 0.0, 0.0]))
    assert m["auc"] == 1.0 and m["accuracy"] == 1.0 and m["ece"] == pytest.approx(0.15)
    assert R.calibration_error(np.full(10, 0.9), np.array([1.0] * 9 + [0.0])) == pytest.approx(0)
    assert np.isnan(R.reward_metrics(np.array([0.3]), np.array([1.0]))["auc"])  # one label only
    assert (m["auc_lo"], m["auc_hi"]) == (1.0, 1.0)  # every resample separates perfectly


def test_auc_interval_brackets_the_auc_and_narrows_with_data():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(3)

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % 4 == 0  # a quarter plausible
        return rng.normal(y * 1.0, 1.0), y  # overlapping scores: AUC ~0.76

    p, y = draw(80)
    lo, hi = R.auc_interval(p, y)
    assert lo < roc_auc_score(y, p) < hi and hi - lo > 0.1
    p4, y4 = draw(1280)
    lo4, hi4 = R.auc_interval(p4, y4)
    assert hi4 - lo4 < (hi - lo) / 2  # 16x the rows: about a quarter of the width
    assert np.isnan(R.auc_interval(np.array([0.2, 0.4]), np.array([True, True]))[0])


# ----------------------------------------------------------------------------- learning


def test_reward_model_learns_simulated_feedback(backbone_dir, shards, feedback):
    from pathloop.data import load_arrays

    bb = C.load_backbone(backbone_dir)
    assert bb.vocab.names == BONE_MARROW_16.names
    x, c, y = feedback
    data = R.split_feedback(x, c, y, load_arrays(shards, "train"), 0.25, 1.0, seed=0)
    torch.manual_seed(0)
    model = R.RewardModel(bb, BONE_MARROW_16)
    m = R.fit_reward(model, data, steps=300, lr=3e-3, lambda_r=1.0)
    assert m["n_holdout"] == 48
    assert m["auc"] >= 0.8, m
    assert m["accuracy"] >= 0.75, m


def test_finetuned_backbone_and_real_term_only_paths(backbone_dir, shards, feedback):
    from pathloop.data import load_arrays

    x, c, y = feedback
    real = load_arrays(shards, "train")
    data = R.split_feedback(x[:32], c[:32], y[:32], real, 0.25, 1.0, seed=0)
    model = R.RewardModel(C.load_backbone(backbone_dir), BONE_MARROW_16, hidden=16)
    before = [p.clone() for p in model.backbone.parameters()]
    m = R.fit_reward(model, data, steps=2, batch_size=4, finetune_backbone=True)
    assert np.isfinite(m["loss"]) and 0 <= m["accuracy"] <= 1
    assert any(
        not torch.equal(a, b) for a, b in zip(before, model.backbone.parameters(), strict=True)
    )
    none = R.split_feedback(x[:32], c[:32], y[:32], real, 0.25, 0.0, seed=0)  # fraction 0
    assert len(none.syn_x) == 0 and len(none.test_x) == len(data.test_x)
    model = R.RewardModel(C.load_backbone(backbone_dir), BONE_MARROW_16, hidden=16)
    assert np.isfinite(R.fit_reward(model, none, steps=2, batch_size=4)["loss"])
    with pytest.raises(ValueError, match="nothing to learn"):
        R.fit_reward(model, none, steps=1, lambda_r=0.0)


def test_subtype_classifier_beats_chance_on_m5(extra_shards, tmp_path):
    clf, m = C.train_subtype_classifier(
        extra_shards, "M5", tmp_path / "sub", C.ClassifierConfig(steps=60)
    )
    assert clf.subtypes == ("band", "segmented") and m["n_test"] == 16
    assert m["accuracy"] >= max(0.75, m["chance"] + 0.1), m
    # per-subtype recall: the share of real test images of each subtype called it
    assert set(m) >= {"recall_band", "recall_segmented"}
    assert C.subtype_recall(np.array([0, 1, 1]), np.array([0, 0, 1]), ("a", "b")) == {
        "recall_a": 0.5,
        "recall_b": 1.0,
    }
    loaded = C.load_subtype_classifier(tmp_path / "sub")
    x = C.to_float_images(np.stack([np.zeros((32, 32, 3), np.uint8)] * 2)).requires_grad_(True)
    logp = loaded.subtype_log_prob(x)  # (2, 2)
    assert logp.shape == (2, 2) and torch.allclose(logp.exp().sum(1), torch.ones(2))
    logp[:, 0].sum().backward()  # differentiable: finetuning can add its loss
    assert x.grad is not None and x.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="no subtypes"):
        C.train_subtype_classifier(extra_shards, "ER6", steps=1)


def test_guidance_classifier_gradients_and_accuracy(extra_shards, tmp_path):
    from pathloop.config import NoiseConfig

    noise = NoiseConfig()
    clf, m = C.train_guidance_classifier(
        extra_shards, noise, tmp_path / "g", C.ClassifierConfig(steps=60), classes=[ER6, M1]
    )
    assert m["accuracy_t0.05"] >= 0.8, m  # two classes: chance is 0.5
    loaded = C.load_guidance_classifier(tmp_path / "g")
    fn = C.guidance_fn(loaded)
    x_t = torch.randn(3, 3, 32, 32)
    grad = fn(x_t, torch.tensor(500), torch.tensor([ER6, M1, len(BONE_MARROW_16)]))  # + null id
    assert grad.shape == (3, 3, 32, 32) and torch.isfinite(grad).all()
    assert grad[:2].abs().sum() > 0 and grad[2].abs().sum() == 0  # null class: no guidance


# ----------------------------------------------------------------------------- Ray job


def _feedback_parquet(path: Path, x: np.ndarray, c: np.ndarray, y: np.ndarray) -> Path:
    """The columns of feedback.export_round that the reward job reads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathloop.data import encode_png, image_id

    table = pa.table(
        {
            "id": [image_id(im) for im in x],
            "image": [encode_png(im) for im in x],
            "class_id": pa.array(c, pa.int32()),
            "class_name": [BONE_MARROW_16.lookup(int(i)).name for i in c],
            "plausible": pa.array(y, pa.float64()),
            "n_raters": pa.array(np.ones(len(y)), pa.int32()),
        }
    )
    meta = {"pathloop.vocabulary": BONE_MARROW_16.model_dump_json()}
    pq.write_table(table.replace_schema_metadata(meta), path)
    return path


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory) -> str:
    """One SQLite store for the module's jobs: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


def test_run_backbone_registers_loadable_dir(shards, mlflow_uri, tmp_path):
    from pathloop.classifiers import BackboneJobConfig, run_backbone
    from pathloop.tracking import resolve_model

    res = run_backbone(
        BackboneJobConfig(
            workdir=str(tmp_path),
            shards=str(shards),
            classifier={"steps": 20},
            tracking={"tracking_uri": mlflow_uri, "register_as": "test-backbone"},
        )
    )
    assert res["model_uri"] == "models:/test-backbone/1" and "test_accuracy" in res
    bb = C.load_backbone(resolve_model(res["model_uri"], mlflow_uri))
    assert bb.vocab.names == BONE_MARROW_16.names and bb.num_classes == 16
    assert json.loads((tmp_path / "result.json").read_text())["run_id"] == res["run_id"]


def test_run_reward_on_ray_registers_loadable_model(
    ray_session, shards, feedback, mlflow_uri, tmp_path
):
    import mlflow

    from pathloop.config import load_config
    from pathloop.reward import RewardConfig, run_reward

    x, c, y = feedback
    fb = _feedback_parquet(tmp_path / "feedback.parquet", x[::3], c[::3], y[::3])  # 64 rows
    cfg = load_config(
        RewardConfig,
        None,
        [
            f"workdir={tmp_path / 'run'}",
            f"feedback={fb}",
            f"real_shards={shards}",
            f"tracking.tracking_uri={mlflow_uri}",
            "tracking.register_as=test-reward",
            "backbone_train.steps=20",
            "train.steps=10",
            "train.log_every=5",
            "train.checkpoint_every=10",
            "train.batch_size=8",
            "scaling.torch_threads=1",
        ],
    )
    res = run_reward(cfg)  # backbone=None: trains one on the real shards first
    saved = json.loads((Path(cfg.workdir).resolve() / "result.json").read_text())
    assert saved["model_uri"] == res["model_uri"] == "models:/test-reward/1"
    assert saved["step"] == 10 and {"auc", "accuracy", "ece"} <= set(saved)
    assert saved["arithmetic"]["held_out"] == 13 and saved["arithmetic"]["feedback_used"] == 51
    run = mlflow.MlflowClient(res["tracking_uri"]).get_run(res["run_id"])
    assert {"auc", "accuracy", "ece", "loss", "backbone_train_accuracy"} <= set(run.data.metrics)
    model = R.load_reward_model(res["model_uri"], res["tracking_uri"])
    assert model.meta["metrics"]["auc"] == pytest.approx(saved["auc"], nan_ok=True)
    r = model.score(x[:4], c[:4])
    assert r.shape == (4,) and ((r >= 0) & (r <= 1)).all()
    by_result = R.load_reward_model(Path(cfg.workdir) / "result.json")
    assert np.allclose(by_result.score(x[:4], c[:4]), r, atol=1e-6)


def test_to_float_images_takes_a_list_of_images():
    """Serve's scorer hands the reward model a list of (H, W, 3) images."""
    import numpy as np

    images = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    stacked = C.to_float_images(images)
    assert stacked.shape == (3, 3, 8, 8)
    assert (C.to_float_images(list(images)) == stacked).all()
