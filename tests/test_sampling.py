"""The sampling job: synthetic shards with provenance per image, deterministic, image-to-image."""

import json

import numpy as np
import pytest

from pathloop.config import SamplerConfig
from pathloop.sampling import SampleConfig, run_sample


def _run(ckpt, out, batch_size=4, **kw):
    sampler = SamplerConfig(sampler="ddim", steps=2, guidance=2.0, seed=5, batch_size=batch_size)
    return run_sample(SampleConfig(model=str(ckpt), out=str(out), sampler=sampler, **kw))


def test_sample_shards_carry_provenance(ray_session, tiny_ckpt, tmp_path):
    from pathloop.data import iter_records, read_manifest

    res = _run(tiny_ckpt, tmp_path / "s", per_class=2, classes=["M5", "ER6", "B2"])
    assert res["num_records"] == 6 and res["checkpoint_step"] == 3
    man = read_manifest(tmp_path / "s")
    assert man["sources"] == {"synthetic": 6} or "synthetic" in json.dumps(man["sources"])
    rows = list(iter_records(tmp_path / "s"))
    assert sorted(r["class_name"] for r in rows) == sorted(
        ["neutrophil"] * 2 + ["erythrocyte"] * 2 + ["basophil"] * 2
    )
    for r in rows:
        p = r["provenance"]
        assert r["source"] == "synthetic"
        assert p["model_uri"] == str(tiny_ckpt) and p["checkpoint_step"] == 3
        assert p["sampler"] == "ddim" and p["steps"] == 2 and p["guidance"] == pytest.approx(2.0)
    assert sorted(r["provenance"]["seed"] for r in rows) == list(range(5, 11))


def test_sample_job_is_deterministic(ray_session, tiny_ckpt, tmp_path):
    from pathloop.data import load_arrays

    _run(tiny_ckpt, tmp_path / "a", per_class=1, classes=["M1", "M2"])
    _run(tiny_ckpt, tmp_path / "b", per_class=1, classes=["M1", "M2"])
    xa, ya = load_arrays(tmp_path / "a")
    xb, yb = load_arrays(tmp_path / "b")
    assert np.array_equal(ya, yb) and np.abs(xa.astype(int) - xb.astype(int)).max() <= 1


def test_two_actors_write_the_one_actor_shards_in_order(ray_session, tiny_ckpt, tmp_path):
    """More actors change the speed, not the shard set: two actors finish their batches in
    either order, yet the shards hold the same images in the work table's (class, seed) order,
    which the experiment's paired verdicts rely on."""
    from pathloop.data import iter_records, load_arrays

    kw = dict(per_class=8, classes=["M1", "M2", "B2", "E1"])
    _run(tiny_ckpt, tmp_path / "one", **kw)
    _run(tiny_ckpt, tmp_path / "two", batch_size=2, num_actors=2, torch_threads=1, **kw)
    (x1, y1), (x2, y2) = load_arrays(tmp_path / "one"), load_arrays(tmp_path / "two")
    assert np.array_equal(y1, y2) and np.abs(x1.astype(int) - x2.astype(int)).max() <= 1
    seeds = [r["provenance"]["seed"] for r in iter_records(tmp_path / "two")]
    assert seeds == list(range(5, 5 + 32))


def test_image_to_image_records_its_start(ray_session, tiny_ckpt, phantom_shards, tmp_path):
    from pathloop.data import iter_records

    _run(
        tiny_ckpt,
        tmp_path / "i2i",
        per_class=2,
        classes=["M5"],
        init_from=str(phantom_shards),
        strength=0.3,
    )
    src = {r["id"]: r["class_id"] for r in iter_records(phantom_shards)}
    for r in iter_records(tmp_path / "i2i"):
        p = r["provenance"]
        assert p["strength"] == pytest.approx(0.3)
        assert p["init_id"] in src and src[p["init_id"]] != r["class_id"]  # from another class


def test_sample_job_with_a_guide_and_interval(ray_session, tiny_ckpt, tmp_path):
    """The guide travels to the actors: the model as its own guide draws the conditional
    images (guidance 1); the shard set's note records the guidance settings. The actors'
    local copies of the model and the guide are gone once loaded."""
    import tempfile
    from pathlib import Path

    from pathloop.data import load_arrays, read_manifest

    copies = Path(tempfile.gettempdir()).glob  # where the actors (on this node) unpack
    before = set(copies("pathloop-sampler-*"))

    def run(out, **sampler):
        cfg = SamplerConfig(sampler="ddim", steps=2, seed=5, batch_size=4, **sampler)
        res = run_sample(
            SampleConfig(model=str(tiny_ckpt), out=str(out), sampler=cfg, per_class=1,
                         classes=["M1", "M2"])
        )  # fmt: skip
        return res, load_arrays(out)[0]

    res, guided = run(tmp_path / "g", guidance=3.0, guide=str(tiny_ckpt), weights="raw",
                      guidance_interval=(0.2, 1.0))  # fmt: skip
    _, cond = run(tmp_path / "c", guidance=1.0)
    _, cfg = run(tmp_path / "f", guidance=3.0, guidance_interval=(0.2, 1.0))
    assert np.array_equal(guided, cond) and not np.array_equal(cfg, cond)
    assert res["guide"] == str(tiny_ckpt)
    note = read_manifest(tmp_path / "g")["source_note"]
    assert "guidance_interval=[0.2, 1.0]" in note and f"guide={tiny_ckpt}" in note
    assert "weights=raw" in note
    assert set(copies("pathloop-sampler-*")) <= before  # three jobs, no copy left behind
