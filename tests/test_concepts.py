"""New concepts (bonus step): class-embedding extension, vocabulary, loss pieces, the job."""

import json

import numpy as np
import pytest
import torch

from pathloop.concepts import (
    ConceptsConfig,
    concepts_draw,
    extend_class_embedding,
    parent_and_subtypes,
    predicted_x0,
    run_concepts,
    subtype_ce,
)
from pathloop.config import ModelConfig, NoiseConfig, load_config
from pathloop.vocab import BONE_MARROW_16, Vocabulary

M5 = BONE_MARROW_16.lookup("M5").id


@pytest.fixture(scope="module")
def tiny_unet():
    from pathloop.diffusion import build_unet

    torch.manual_seed(0)
    return build_unet(ModelConfig(block_out_channels=(16, 32), layers_per_block=1), 16).eval()


def _out(unet, labels, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((len(labels), 3, 32, 32), generator=g)  # (B, C, H, W)
    t = torch.randint(0, 1000, (len(labels),), generator=g)  # (B,)
    with torch.no_grad():
        return unet(x, t, class_labels=torch.tensor(labels)).sample


def test_extension_keeps_old_class_and_null_outputs(tiny_unet):
    from pathloop.diffusion import null_class

    new = extend_class_embedding(tiny_unet, M5, 2).eval()
    assert new.config.num_class_embeds == 19 and null_class(new) == 18
    old_ids = list(range(16))
    assert torch.allclose(_out(new, old_ids), _out(tiny_unet, old_ids), atol=1e-6)
    # The null class moved from id 16 to id 18 and kept its embedding (CFG unchanged).
    assert torch.allclose(_out(new, [18, 18]), _out(tiny_unet, [16, 16]), atol=1e-6)
    # New rows start as copies of the parent's row, and are not the null row.
    assert torch.allclose(_out(new, [16, 17]), _out(tiny_unet, [M5, M5]), atol=1e-6)
    assert not torch.allclose(_out(new, [16]), _out(tiny_unet, [16]), atol=1e-4)
    with pytest.raises(ValueError, match="parent class id"):
        extend_class_embedding(tiny_unet, 16, 2)  # the null class is not a parent


def test_vocabulary_with_subclasses_appends_new_classes():
    v = BONE_MARROW_16.with_subclasses("neutrophil", ("band", "segmented"))
    assert len(v) == 18 and v.classes[:16] == BONE_MARROW_16.classes
    band = v.lookup("M5-band")
    assert (band.id, band.name, band.parent) == (16, "neutrophil band", "M5")
    assert v.lookup("neutrophil segmented").id == 17
    assert Vocabulary.model_validate_json(v.model_dump_json()) == v  # round-trips (classes.json)
    with pytest.raises(ValueError, match="duplicate"):
        v.with_subclasses("M5", ("band",))
    with pytest.raises(KeyError, match="unknown class"):
        BONE_MARROW_16.with_subclasses("M9", ("band",))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_predicted_x0_inverts_the_forward_process(prediction_type):
    from pathloop.diffusion import build_scheduler

    sched = build_scheduler(NoiseConfig(prediction_type=prediction_type), "ddpm")
    g = torch.Generator().manual_seed(1)
    x0, eps = torch.rand((4, 3, 8, 8), generator=g) * 2 - 1, torch.randn((4, 3, 8, 8), generator=g)
    t = torch.tensor([0, 10, 500, 900])
    x_t = sched.add_noise(x0, eps, t)
    out = eps if prediction_type == "epsilon" else sched.get_velocity(x0, eps, t)
    assert torch.allclose(predicted_x0(sched, x_t, t, out), x0, atol=1e-3)


def test_subtype_ce_is_per_sample_and_masked():
    logp = torch.log(torch.tensor([[0.25, 0.75], [0.5, 0.5], [0.9, 0.1]]))
    ce = subtype_ce(logp, torch.tensor([1, 0, 1]), torch.tensor([True, True, False]))
    assert torch.allclose(ce, torch.tensor([-np.log(0.75), -np.log(0.5), 0.0]).float())


def test_draw_splits_one_global_batch_across_ranks():
    cfg = ConceptsConfig(train={"batch_size": 8, "seed": 3}, new_frac=0.5)
    one = concepts_draw(cfg, 5, 10, 20, (3, 4, 4), 0, 1)
    two = [concepts_draw(cfg, 5, 10, 20, (3, 4, 4), r, 2) for r in range(2)]
    assert torch.equal(torch.cat([two[0][0], two[1][0]]), one[0])  # new rows
    assert torch.equal(torch.cat([two[0][1], two[1][1]]), one[1])  # replay rows
    # Each rank's noise is its new rows then its replay rows, cut from the same global draw.
    assert torch.equal(two[1][2][:2], one[2][2:4]) and torch.equal(two[1][2][2:], one[2][6:8])


def test_parent_without_subtypes_or_other_vocab_is_refused(phantom_shards):
    from pathloop.data import read_vocab

    shard_vocab = read_vocab(phantom_shards)
    cfg = ConceptsConfig(shards=str(phantom_shards), parent="ER6")
    with pytest.raises(ValueError, match="no subtype labels"):
        parent_and_subtypes(cfg, shard_vocab, shard_vocab)
    with pytest.raises(ValueError, match="not recorded"):
        parent_and_subtypes(
            cfg.model_copy(update={"parent": "M5", "subtypes": ["x"]}), *[shard_vocab] * 2
        )
    other = Vocabulary.from_names(["a", "b"])
    with pytest.raises(ValueError, match="differ from the shards"):
        parent_and_subtypes(cfg, other, shard_vocab)


def test_concepts_end_to_end_on_phantoms(ray_session, tiny_ckpt, phantom_shards, tmp_path):
    import mlflow

    from pathloop.diffusion import load_checkpoint, null_class, sample
    from pathloop.tracking import resolve_model

    cfg = load_config(
        ConceptsConfig,
        "jobs/configs/concepts.tiny.yaml",
        [
            f"workdir={tmp_path / 'c'}",
            f"pretrained={tiny_ckpt}",
            f"shards={phantom_shards}",
            "classifier.steps=5",
            "train.steps=3",
            "train.batch_size=8",
            "train.log_every=1",
            "train.checkpoint_every=3",
            "train.preview_per_class=1",
            "preview.steps=2",
            "eval.per_class=2",
            "eval.sampler.steps=2",
            "eval.drift_per_class=1",
            "scaling.torch_threads=1",
            f"tracking.tracking_uri=sqlite:///{tmp_path}/m.db",
            "tracking.register_as=test-concepts",
        ],
    )
    res = run_concepts(cfg)
    assert res["step"] == 3 and res["model_uri"] == "models:/test-concepts/1"
    assert [c["code"] for c in res["new_classes"]] == ["M5-band", "M5-segmented"]
    m = res["eval"]["metrics"]
    for reader in ("subtype_clf", "independent_clf", "judge"):  # judge: the shards are phantoms
        for s in ("band", "segmented"):
            assert 0.0 <= m[f"{reader}_acc_{s}"] <= 1.0 and 0 <= m[f"{reader}_baseline_{s}"] <= 1
    assert 0 <= m["old_class_drift"] < 1

    ck = load_checkpoint(resolve_model(res["model_uri"], res["tracking_uri"]))
    assert len(ck.vocab) == 18 and ck.vocab.lookup(17).parent == "M5"
    assert null_class(ck.unet) == 18
    x = sample(ck.unet, ck.noise, [16, 17], steps=2)
    assert x.shape == (2, 3, 32, 32) and torch.isfinite(x).all()

    run = mlflow.MlflowClient(res["tracking_uri"]).get_run(res["run_id"])
    assert run.data.tags["pathloop.parent"] == "M5"
    assert "eval_subtype_clf_acc" in run.data.metrics and "loss_subtype" in run.data.metrics
    manifest = json.loads((tmp_path / "c/samples/manifest.json").read_text())
    assert manifest["counts"]["neutrophil band"] == {"none": 2}
    assert (tmp_path / "c/concepts_grid.png").is_file()


def test_cli_names_the_problem_and_exits_2(tiny_ckpt, phantom_shards, tmp_path):
    from typer.testing import CliRunner

    from pathloop.cli import app

    res = CliRunner().invoke(
        app,
        [
            "concepts",
            f"workdir={tmp_path / 'c'}",
            f"pretrained={tiny_ckpt}",
            f"shards={phantom_shards}",
            "parent=ER6",
        ],
    )
    assert res.exit_code == 2 and "no subtype labels" in res.output
    assert not (tmp_path / "c").exists()  # refused before any run was created
