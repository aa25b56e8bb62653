"""`pathloop loop` end to end with minimal settings: killed during finetuning, it resumes,
skips the finished steps and ends with the same model as an uninterrupted finetune."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pathloop.config import load_config
from pathloop.diffusion import load_checkpoint
from pathloop.pipeline import LoopConfig, run_loop

ROOT = Path(__file__).resolve().parents[1]

MINIMAL = [
    "data.per_class=6",
    "data.test_per_class=3",
    "pretrain.model.block_out_channels=[16,32]",
    "pretrain.train.steps=4",
    "pretrain.train.batch_size=16",
    "pretrain.train.sample_every=0",
    "pretrain.train.checkpoint_every=4",
    "pretrain.tracking.register_as=null",
    "round.review_per_class=3",
    "round.pool_per_class=2",
    "round.sampler.steps=2",
    "reward.backbone_train.steps=5",
    "reward.train.steps=6",
    "reward.train.checkpoint_every=6",
    "reward.tracking.register_as=null",
    "finetune.train.steps=6",
    "finetune.train.batch_size=8",
    "finetune.train.checkpoint_every=2",
    "finetune.tracking.register_as=null",
    "evaluate.per_class=3",
    "evaluate.sampler.steps=2",
    "evaluate.features.steps=5",
    "evaluate.tstr.steps=5",
    "evaluate.tstr.settings=[real,synthetic]",
    "evaluate.grid_per_class=2",
]


def _params(ckpt: str) -> list[torch.Tensor]:
    return [p.detach().clone() for p in load_checkpoint(ckpt, ema=False).unet.parameters()]


@pytest.mark.usefixtures("ray_session")
def test_loop_resumes_after_a_kill_in_finetuning(tmp_path):
    import ray.train

    def cfg(*extra: str) -> LoopConfig:
        over = [f"workdir={tmp_path / 'loop'}", *MINIMAL, *extra]
        return load_config(LoopConfig, ROOT / "jobs/configs/loop.tiny.yaml", over)

    # 1. killed at finetuning step 3 (after its step-2 checkpoint), no automatic recovery
    killed = cfg("finetune.train.fail_at_step=3", "finetune.max_failures=0")
    with pytest.raises(ray.train.TrainingFailedError):
        run_loop(killed)
    wd = tmp_path / "loop"
    assert (wd / "pretrain/result.json").exists()
    assert (wd / "round1/reward/result.json").exists()
    assert not (wd / "round1/finetune/result.json").exists()
    done_before = {p: p.stat().st_mtime_ns for p in wd.glob("**/result.json")}

    # 2. the same command again: finished steps are skipped, finetuning resumes to its end
    summary = run_loop(killed)
    for p, mtime in done_before.items():
        assert p.stat().st_mtime_ns == mtime, f"{p} was redone"
    ft = summary["rounds"][0]["finetune"]
    assert ft["step"] == 6
    ev = summary["rounds"][0]["evaluate"]
    assert Path(ev["report"]).is_file()
    assert set(ev["labels"]) == {"baseline", "model"}
    assert "judge" in ev["plausibility"]
    from pathloop.pipeline import reward_line

    rw = summary["rounds"][0]["reward"]
    held = rw["arithmetic"]["held_out"]
    assert held > 0 and f"on {held} judged images" in reward_line(rw)
    assert {"auc", "auc_lo", "auc_hi"} <= set(rw)  # NaN when the held-out rows are one-sided
    # the review set at the sampler's guidance, the finetuning pool at round.pool_guidance
    from pathloop.data import iter_records

    def guidance(shards: Path) -> set[float]:
        return {r["provenance"]["guidance"] for r in iter_records(shards, columns=["provenance"])}

    assert guidance(wd / "round1/review") == {killed.round.sampler.guidance} == {2.0}
    assert guidance(wd / "round1/pool") == {killed.round.pool_guidance} == {1.0}

    # 3. the same finetune uninterrupted gives the same weights
    from pathloop.finetune import run_finetune

    saved = load_config(type(killed.finetune), wd / "round1/finetune/config.yaml", [])
    straight = saved.model_copy(
        update={
            "workdir": str(tmp_path / "straight"),
            "resume": False,
            "train": saved.train.model_copy(update={"fail_at_step": None}),
            "tracking": saved.tracking.model_copy(update={"parent_run_id": None}),
        }
    )
    ref = run_finetune(straight)
    for a, b in zip(_params(ft["checkpoint"]), _params(ref["checkpoint"]), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)

    # 4. one parent MLflow run with every step as its child
    import mlflow

    client = mlflow.MlflowClient(summary["tracking_uri"])
    parent = client.get_run(summary["parent_run_id"])
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
    )
    names = {r.info.run_name for r in children}
    assert {"pretrain", "round1-reward", "round1-finetune", "round1-evaluate"} <= names


@pytest.mark.parametrize("preset", ["tiny", "paper", "real"])
def test_loop_presets_load(preset):
    cfg = load_config(LoopConfig, ROOT / f"jobs/configs/loop.{preset}.yaml", [])
    assert cfg.pretrain.noise.prediction_type == "v_prediction"
    if preset == "paper":
        assert cfg.pretrain.model.preset == "paper" and cfg.reward.backbone_train.arch == "paper"
        assert cfg.pretrain.scaling.use_gpu and cfg.round.use_gpu


def test_a_given_pretrained_model_replaces_pretraining(tiny_ckpt, tmp_path):
    import json

    from pathloop import tracking
    from pathloop.config import TrackingConfig
    from pathloop.diffusion import load_checkpoint
    from pathloop.pipeline import given_model

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = tmp_path / "result.json"
    result.write_text(json.dumps({"model_uri": str(tiny_ckpt), "tracking_uri": None}))
    for ref in (str(tiny_ckpt), str(result)):
        got = given_model(ref, uri)
        assert Path(got["checkpoint"]) == Path(tiny_ckpt).resolve()
    # a models:/ URI resolves in the loop's own MLflow store
    run_id = tracking.start_run(TrackingConfig(tracking_uri=uri), tmp_path, {}, run_name="pre")
    registered = tracking.log_checkpoint_model(uri, run_id, tiny_ckpt, "loop-given")
    tracking.end_run(uri, run_id)
    got = given_model(registered, uri)
    assert got["model_uri"] == registered
    assert load_checkpoint(got["checkpoint"]).step == load_checkpoint(tiny_ckpt).step
    with pytest.raises(FileNotFoundError, match="neither an existing checkpoint"):
        given_model(str(tmp_path / "missing"), uri)


def test_label_noise_is_refused_for_data_that_is_not_generated(tmp_path):
    from pathloop.pipeline import make_data

    cfg = load_config(
        LoopConfig,
        ROOT / "jobs/configs/loop.tiny.yaml",
        ["data.source=shards", f"data.path={tmp_path}", "data.label_noise=0.2"],
    )
    with pytest.raises(ValueError, match="set data.source=phantoms or data.label_noise=0"):
        make_data(cfg, tmp_path)
