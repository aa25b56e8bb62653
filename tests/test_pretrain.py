"""Pretraining on Ray Train: MLflow registration, failure recovery, --resume, DDP equivalence."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from pathloop.config import load_config
from pathloop.pretrain import PretrainConfig, run_pretrain

TINY = [
    "model.block_out_channels=[16, 32]",
    "model.layers_per_block=1",
    "train.batch_size=8",
    "train.log_every=1",
    "train.preview_per_class=1",
    "preview.steps=2",
    "optim.warmup_steps=1",
    "scaling.torch_threads=1",
]
JUDGE = "model/plausibility/judge"  # the judge's rate of the model, as evaluations name it


def _cfg(tmp_path: Path, shards: Path, *extra: str) -> PretrainConfig:
    db = tmp_path / "mlflow.db"
    return load_config(
        PretrainConfig,
        None,
        [
            f"workdir={tmp_path / 'run'}",
            f"data.shards={shards}",
            f"tracking.tracking_uri=sqlite:///{db}",
            *TINY,
            *extra,
        ],
    )


def _params(ckpt_dir: str) -> dict[str, torch.Tensor]:
    from pathloop.diffusion import load_checkpoint

    return {
        k: v.clone() for k, v in load_checkpoint(ckpt_dir, ema=False).raw_unet.state_dict().items()
    }


def test_pretrain_registers_loadable_model(ray_session, phantom_shards, tmp_path):
    import mlflow

    from pathloop.diffusion import load_checkpoint
    from pathloop.tracking import resolve_model

    cfg = _cfg(
        tmp_path,
        phantom_shards,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=4",
        "tracking.register_as=test-pretrain",
    )
    res = run_pretrain(cfg)
    assert res["step"] == 4
    assert res["model_uri"] == "models:/test-pretrain/1"
    ck = load_checkpoint(resolve_model(res["model_uri"], res["tracking_uri"]))
    assert ck.step == 4 and len(ck.vocab) == 16 and ck.config["train"]["steps"] == 4
    client = mlflow.MlflowClient(res["tracking_uri"])
    run = client.get_run(res["run_id"])
    assert "loss" in run.data.metrics and "images_per_s" in run.data.metrics
    assert "data_wait_frac" in run.data.metrics
    assert run.data.params["optim.lr"] == str(cfg.optim.lr)
    arts = [a.path for a in client.list_artifacts(res["run_id"], "samples")]
    assert "samples/step_000004.png" in arts
    assert (Path(cfg.workdir) / "config.yaml").exists()
    # phantom data: the judge scored the preview, overall and per class
    # under the evaluation's name for the same quantity: one metric across runs
    judged = {k: v for k, v in run.data.metrics.items() if k.startswith(JUDGE)}
    assert len(judged) == 1 + 16 and all(0 <= v <= 1 for v in judged.values())
    assert f"{JUDGE}/rate" in judged and f"{JUDGE}/class/M5" in judged
    # the registered version says where it came from and how it scored
    version = client.get_model_version("test-pretrain", "1")
    assert f"Logged by run {run.info.run_name} ({res['run_id']})" in version.description
    assert "training images: " in version.description and "loss " in version.description
    assert version.tags["pathloop.run_id"] == res["run_id"]


def test_judge_rates_of_phantoms_and_of_other_vocabularies():
    from pathloop.harness import judge_rates
    from pathloop.phantoms import generate
    from pathloop.vocab import BONE_MARROW_16, Vocabulary

    rows = list(generate(per_class=2, size=32, seed=5))  # (image, class id, subtype)
    images, ids = [r[0] for r in rows], [r[1] for r in rows]
    rates = judge_rates(images, ids, BONE_MARROW_16)
    assert rates[f"{JUDGE}/rate"] >= 0.9  # rendered phantoms of their own class
    noise = [np.random.default_rng(k).integers(0, 256, (32, 32, 3), np.uint8) for k in ids]
    assert judge_rates(noise, ids, BONE_MARROW_16)[f"{JUDGE}/rate"] == 0.0
    other = Vocabulary.model_validate({"classes": [{"id": 0, "code": "X", "name": "x"}]})
    assert judge_rates(images[:1], [0], other) == {}  # the judge knows no class X


def test_worker_failure_recovers_automatically(ray_session, phantom_shards, tmp_path):
    cfg = _cfg(
        tmp_path,
        phantom_shards,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.fail_at_step=3",
        "max_failures=1",
    )
    res = run_pretrain(cfg)
    assert (Path(cfg.workdir) / ".injected_failure").read_text() == "3"  # it did fail
    assert res["step"] == 4  # and FailureConfig resumed it from the step-2 checkpoint


def test_resume_after_interruption_ends_at_same_step(ray_session, phantom_shards, tmp_path):
    cfg = _cfg(
        tmp_path,
        phantom_shards,
        "train.steps=4",
        "train.checkpoint_every=2",
        "train.sample_every=0",
        "train.fail_at_step=3",
        "max_failures=0",
    )
    import ray.train

    with pytest.raises(ray.train.TrainingFailedError):
        run_pretrain(cfg)  # interrupted after the step-2 checkpoint
    with pytest.raises(FileExistsError, match="--resume"):
        run_pretrain(cfg)  # refuses to overwrite the interrupted run
    first_run = json.loads((Path(cfg.workdir) / "run.json").read_text())["run_id"]
    res = run_pretrain(cfg.model_copy(update={"resume": True}))
    assert res["step"] == 4
    assert res["run_id"] == first_run  # same MLflow run continues
    saved = json.loads((Path(res["checkpoint"]) / "config.json").read_text())
    assert saved["train"] == cfg.model_dump(mode="json")["train"]


def test_two_workers_match_one_worker(ray_session, near_identical_shards, tmp_path):
    """Same global batch, same data: DDP over 2 gloo workers ≈ 1 worker (Adam, 3 steps)."""
    common = (
        "train.steps=3",
        "train.checkpoint_every=3",
        "train.sample_every=0",
        "data.augment.flips=false",
        "data.augment.rot90=false",
        "model.p_uncond=0.5",
    )
    one = run_pretrain(_cfg(tmp_path / "w1", near_identical_shards, *common))
    two = run_pretrain(
        _cfg(tmp_path / "w2", near_identical_shards, *common, "scaling.num_workers=2")
    )
    p1, p2 = _params(one["checkpoint"]), _params(two["checkpoint"])
    from pathloop.diffusion import build_unet

    torch.manual_seed(0)  # build_state seeds with train.seed=0 before building
    cfg = _cfg(tmp_path, near_identical_shards, *common)
    p0 = build_unet(cfg.model, 1).state_dict()
    d1 = torch.cat([(p1[k] - p0[k]).flatten() for k in p0 if p0[k].is_floating_point()])
    d2 = torch.cat([(p2[k] - p0[k]).flatten() for k in p0 if p0[k].is_floating_point()])
    assert d1.abs().mean() > 1e-4  # training moved the weights
    cos = torch.nn.functional.cosine_similarity(d1, d2, dim=0)
    assert cos > 0.99, f"2-worker update differs from 1-worker update (cosine {cos:.4f})"
    assert (d1 - d2).abs().mean() < 0.05 * d1.abs().mean()


@pytest.fixture(scope="module")
def near_identical_shards(tmp_path_factory):
    """One class, 16 images that differ in one pixel: any split across workers is the same data."""
    from pathloop.data import ShardWriter
    from pathloop.phantoms import generate
    from pathloop.vocab import Vocabulary

    out = tmp_path_factory.mktemp("near_identical")
    base, _, _ = next(generate(1, size=32, seed=5, classes=[0]))
    with ShardWriter(out, Vocabulary.from_names(["cell"])) as w:
        for i in range(16):
            img = base.copy()
            img[0, i] = np.uint8((int(img[0, i, 0]) + 1) % 256)  # keep ids distinct
            w.add(img, 0, split="train", source="phantom")
    return out


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("buffer", [0, 4096])
def test_training_batches_mix_classes_only_when_shuffled(
    ray_session, phantom_shards, buffer, cache
):
    """Shards are stored class by class: without the shuffle buffer a batch holds one or two
    classes (what made the Ray-trained model far worse than a shuffled bare loop); so with the
    images held in the worker (data.cache) unless shuffled."""
    from pathloop.data import decoded_shards, read_shards
    from pathloop.harness import shuffled_batches

    cfg = PretrainConfig.model_validate({"data": {"shuffle_buffer": buffer, "cache": cache}})
    read = decoded_shards if cache else read_shards
    batches = shuffled_batches(read(phantom_shards, split="train"), cfg, 16, 0)
    seen = [len(set(next(batches)["class_id"].tolist())) for _ in range(4)]
    batches.close()
    if buffer:
        assert min(seen) >= 5, seen  # 16 draws from 16 classes
    else:
        assert max(seen) <= 2, seen


def test_held_epochs_visit_every_image_once_per_epoch_in_a_seeded_order(
    ray_session, phantom_shards
):
    """data.cache: the worker reads its decoded share once; every epoch is a fresh seeded order
    over all of it (full batches only), augmented in the worker, the same for the same seed."""
    import itertools

    from pathloop.data import AugmentConfig, decoded_shards, held_epochs

    ds = decoded_shards(phantom_shards, split="train")
    n = ds.count()
    want = np.bincount(
        np.concatenate([b["class_id"] for b in ds.iter_batches(batch_format="numpy")])
    )

    def epochs(seed, augment=None, k=3):
        return [list(e) for e in itertools.islice(held_epochs(ds, 8, augment, seed), k)]

    plain = epochs(0)
    for ep in plain:
        assert len(ep) == n // 8 and all(b["image"].shape[0] == 8 for b in ep)
        ids = np.concatenate([b["class_id"].numpy() for b in ep])
        assert (np.bincount(ids, minlength=len(want)) <= want).all()  # no image twice
        assert len(ids) >= n - 7  # every image but the last partial batch's
        x = torch.cat([b["image"] for b in ep])
        assert x.dtype == torch.float32 and -1.0 <= x.min() and x.max() <= 1.0
    order = [torch.cat([b["image"] for b in ep]) for ep in plain]
    assert not torch.equal(order[0], order[1])  # reshuffled every epoch
    again = epochs(0)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(plain[0], again[0], strict=True))
    assert not torch.equal(plain[0][0]["image"], epochs(1, k=1)[0][0]["image"])
    flipped = epochs(0, AugmentConfig(), k=1)[0]  # same order, pixels flipped and turned
    assert torch.equal(flipped[0]["class_id"], plain[0][0]["class_id"])
    assert not torch.equal(flipped[0]["image"], plain[0][0]["image"])
    with pytest.raises(ValueError, match="lower train.batch_size"):
        next(held_epochs(ds, n + 1, None, 0))
    empty = decoded_shards(phantom_shards, split="train", classes=[0]).filter(lambda r: False)
    with pytest.raises(ValueError, match="0 images in this worker's share"):
        next(held_epochs(empty, 8, None, 0))


def test_worker_progress_lines_bypass_the_wrapped_sys_stdout(capsys, monkeypatch):
    import io

    from pathloop.harness import say

    real = io.StringIO()
    monkeypatch.setattr("sys.__stdout__", real)  # the process's own stdout, which Ray forwards
    say("[pretrain] step 1/2 loss 0.5")
    assert real.getvalue() == "[pretrain] step 1/2 loss 0.5\n"
    assert capsys.readouterr().out == ""  # not through sys.stdout, which Train V2 echoes
