"""Ray Tune sweeps (λr × βr on phantoms) and the feedback-amount ablation, on local Ray."""

import itertools
import json
from pathlib import Path

import numpy as np
import pytest

from pathloop.config import ConfigError, load_config
from pathloop.sweep import (
    AblationConfig,
    Param,
    SweepConfig,
    as_override,
    check_space,
    segment_plan,
)

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- unit


def test_param_needs_exactly_one_kind_and_sane_bounds():
    from ray import tune

    assert isinstance(Param(loguniform=(1e-5, 1e-3)).to_tune(), tune.search.sample.Float)
    assert Param(grid=[0, 1]).to_tune() == {"grid_search": [0, 1]}
    for bad, msg in [
        ({}, "exactly one"),
        ({"grid": [1], "choice": [2]}, "exactly one"),
        ({"uniform": (1.0, 0.0)}, "low < high"),
        ({"loguniform": (0.0, 1.0)}, "low > 0"),
    ]:
        with pytest.raises(ValueError, match=msg):
            Param(**bad)


def test_overrides_round_trip_through_load_config():
    from pathloop.finetune import FinetuneConfig

    cfg = load_config(
        FinetuneConfig,
        None,
        [
            as_override("optim.lr", 1e-5),
            as_override("beta_r", 0),
            as_override("reward_mode", "class_norm"),
            as_override("train.bf16", False),
            as_override("feedback_fraction", 0.1),
        ],
    )
    assert cfg.optim.lr == 1e-5 and cfg.beta_r == 0.0 and cfg.reward_mode == "class_norm"
    assert cfg.train.bf16 is False and cfg.feedback_fraction == 0.1


def test_segment_plan_ends_at_total():
    assert segment_plan(10, 3) == [4, 8, 10]
    assert segment_plan(2, 4) == [1, 2]
    assert segment_plan(7, 1) == [7]


def test_every_step_builds_its_own_job_config():
    from pathloop.finetune import FinetuneConfig
    from pathloop.pretrain import PretrainConfig
    from pathloop.reward import RewardConfig

    for step, key, cls in [
        ("pretrain", "optim.lr", PretrainConfig),
        ("reward", "lambda_r", RewardConfig),
        ("finetune", "reward_mode", FinetuneConfig),
        ("reward_finetune", "reward.fraction", FinetuneConfig),
    ]:
        value = "class_norm" if key == "reward_mode" else 0.5
        measures = ["train"] if step == "reward" else None
        cfg = SweepConfig(step=step, space={key: Param(choice=[value])}, measures=measures)
        assert isinstance(check_space(cfg), cls)


def test_bad_keys_fail_before_any_trial():
    cfg = SweepConfig(step="finetune", space={"beta_rr": Param(grid=[0, 1])})
    with pytest.raises(ConfigError, match="'beta_rr' is not a field.*beta_r"):
        check_space(cfg)
    cfg = SweepConfig(step="finetune", space={"reward_mode": Param(choice=["nope"])})
    with pytest.raises(ConfigError, match="reward_mode"):
        check_space(cfg)
    with pytest.raises(ValueError, match="step=reward_finetune"):
        SweepConfig(step="finetune", space={"reward.lambda_r": Param(grid=[0, 1])})
    with pytest.raises(ValueError, match="valid measures: judge, fidelity, train"):
        SweepConfig(measures=["fid?"])
    with pytest.raises(ValueError, match="measures: \\[train\\]"):
        SweepConfig(step="reward", measures=["judge", "train"])


def test_shipped_configs_load():
    sweep = load_config(SweepConfig, ROOT / "jobs/configs/sweep.tiny.yaml")
    assert sweep.step == "reward_finetune" and set(sweep.space) == {"reward.lambda_r", "beta_r"}
    check_space(sweep)  # every override and searched key is a real config key
    abl = load_config(AblationConfig, ROOT / "jobs/configs/ablation.tiny.yaml")
    assert abl.fractions == [0.0, 0.1, 0.5, 1.0]
    assert abl.as_sweep().space["reward.fraction"].grid == [0.0, 0.1, 0.5, 1.0]


# ----------------------------------------------------------------------------- on Ray


@pytest.fixture(scope="module")
def judged_round(tmp_path_factory) -> Path:
    """A judged feedback export of 64 phantoms, half declared as another class, so the round
    holds both verdicts: store → judge evaluator → export_round (what the reward job reads)."""
    from pathloop.data import ShardWriter
    from pathloop.experts import evaluate_round
    from pathloop.feedback import FeedbackStore
    from pathloop.phantoms import generate, shuffle_classes
    from pathloop.vocab import BONE_MARROW_16

    tmp = tmp_path_factory.mktemp("round")
    data = list(generate(4, size=32, seed=21))
    c = np.array([d[1] for d in data])
    c[::2] = shuffle_classes(c[::2], seed=2)
    with ShardWriter(tmp / "samples", BONE_MARROW_16) as w:
        for (img, _, _), cid in zip(data, c, strict=True):
            w.add(img, int(cid), split="none", source="synthetic")
    store = FeedbackStore(tmp / "fb.db")
    rid = store.create_round(tmp / "samples", name="sweep-round")
    evaluate_round(store, rid, "judge")
    return Path(store.export_round(rid, tmp / "export"))


@pytest.fixture(scope="module")
def mlflow_db(tmp_path_factory) -> str:
    """One SQLite store for the module's sweeps: creating its tables takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture(scope="module")
def backbone(phantom_shards, tmp_path_factory) -> Path:
    from pathloop.classifiers import ClassifierConfig, train_backbone

    out = tmp_path_factory.mktemp("backbone") / "bb"
    train_backbone(phantom_shards, out, ClassifierConfig(steps=20))
    return out


def _stage_overrides(tiny_ckpt, judged_round, phantom_shards, backbone) -> dict:
    """The tiny settings of both jobs: 2 steps, batch 8, one thread (a trial's cost is Ray Train
    and MLflow start-up, not the steps)."""
    return {
        "reward_overrides": [
            f"feedback={judged_round}",
            f"real_shards={phantom_shards}",
            f"backbone={backbone}",
            "train.steps=2",
            "train.log_every=1",
            "train.checkpoint_every=2",
            "train.batch_size=8",
            "scaling.torch_threads=1",
        ],
        "overrides": [
            "method=reward",
            f"pretrained={tiny_ckpt}",
            f"synthetic={judged_round}",
            f"real={phantom_shards}",
            "train.steps=2",
            "train.batch_size=8",
            "train.log_every=1",
            "train.checkpoint_every=1",
            "train.preview_per_class=1",
            "preview.steps=2",
            "scaling.torch_threads=1",
        ],
    }


@pytest.mark.slow
def test_sweep_lambda_r_by_beta_r(
    ray_session, tiny_ckpt, judged_round, phantom_shards, backbone, mlflow_db, tmp_path
):
    import mlflow

    from pathloop.finetune import FinetuneConfig
    from pathloop.reward import RewardConfig
    from pathloop.sweep import run_sweep

    cfg = load_config(
        SweepConfig,
        ROOT / "jobs/configs/sweep.tiny.yaml",  # the shipped space: λr × βr, ASHA, 2 segments
        [
            f"workdir={tmp_path / 'sweep'}",
            f"tracking.tracking_uri={mlflow_db}",
            "max_concurrent=2",
            "per_class=1",
            "sampler.steps=2",
            # the trial's training loss: differs between trials, so ASHA has something to rank
            "metric=loss",
            "mode=min",
        ],
    ).model_copy(update=_stage_overrides(tiny_ckpt, judged_round, phantom_shards, backbone))
    res = run_sweep(cfg)

    assert res["trials"] == 4 and res["failed"] == 0
    rows = res["rows"]
    searched = {(r["reward.lambda_r"], r["beta_r"]) for r in rows}
    grid = [cfg.space[k].grid for k in ("reward.lambda_r", "beta_r")]  # the shipped values
    assert searched == set(itertools.product(*grid)) and len(searched) == 4
    assert all(0 <= r["plausibility"] <= 1 and np.isfinite(r["loss"]) for r in rows)
    assert all(r["step"] in (1, 2) for r in rows)  # segment ends; ASHA may stop at step 1
    assert res["best_metric"] == min(r["loss"] for r in rows)
    # max_concurrent: never more than 2 trials running at once (from Tune's own timings)
    import pandas as pd

    t = pd.read_csv(tmp_path / "sweep" / "trials.csv")
    spans = list(zip(t["timestamp"] - t["time_total_s"], t["timestamp"], strict=True))
    # others running when a trial starts (1 s slack: Tune's timestamps are whole seconds)
    assert max(sum(a + 1 < s < b - 1 for a, b in spans) for s, _ in spans) <= 1

    # every trial: a reward run and a finetune run in the one store, tagged and nested
    client = mlflow.MlflowClient(res["tracking_uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("pathloop-sweeps").experiment_id],
        f"tags.`pathloop.sweep_id` = '{res['sweep_id']}'",
    )
    by_step = {}
    for run in runs:
        by_step.setdefault(run.data.tags["pathloop.step"], []).append(run)
    assert len(by_step["finetune"]) == 4 and len(by_step["reward"]) == 4
    assert {r.data.tags["pathloop.trial_id"] for r in by_step["finetune"]} == {
        r["trial_id"] for r in rows
    }
    for run in by_step["finetune"]:
        assert run.data.tags["mlflow.parentRunId"] == res["sweep_id"]
        assert "plausibility" in run.data.metrics and "loss" in run.data.metrics
        lam = json.loads(run.data.tags["pathloop.sweep_params"])["reward.lambda_r"]
        assert float(run.data.params["beta_r"]) in grid[1] and lam in grid[0]
    assert by_step["sweep"][0].info.run_id == res["sweep_id"]

    # best.yaml is a full finetune config the CLI accepts, with the winner's values
    best = load_config(FinetuneConfig, res["best_config"])
    assert best.beta_r == res["best_params"]["beta_r"] and best.train.steps == 2
    assert Path(best.reward_model).is_file()  # the winning trial's reward model
    best_reward = load_config(RewardConfig, Path(res["best_config"]).with_name("best-reward.yaml"))
    assert best_reward.lambda_r == res["best_params"]["reward.lambda_r"]
    assert best_reward.fraction == best.feedback_fraction == 1.0


@pytest.mark.slow
def test_ablation_four_fractions(
    ray_session, tiny_ckpt, judged_round, phantom_shards, backbone, mlflow_db, tmp_path
):
    import csv

    import mlflow
    from PIL import Image

    from pathloop.sweep import run_ablation

    cfg = AblationConfig(
        workdir=str(tmp_path / "abl"),
        per_class=1,
        sampler={"steps": 2},
        fidelity={"feature_steps": 10},
        max_concurrent=2,
        tracking={"tracking_uri": mlflow_db, "experiment": "abl"},
        **_stage_overrides(tiny_ckpt, judged_round, phantom_shards, backbone),
    )
    res = run_ablation(cfg)
    rows = res["rows"]
    assert [r["fraction"] for r in rows] == [0.0, 0.1, 0.5, 1.0]
    for r in rows:
        assert 0 <= r["plausibility"] <= 1 and np.isfinite(r["loss"])
        assert 0 <= r["reward_accuracy"] <= 1  # same held-out feedback at every fraction
        assert r["plausibility_lo"] <= r["plausibility"] <= r["plausibility_hi"]  # Wilson
        assert len([k for k in r if k.startswith("plausibility_")]) == 16 + 2
        assert r["fid"] >= 0 and 0 <= r["precision"] <= 1 and 0 <= r["coverage"] <= 1
    ref = res["pretrained"]  # the starting point, measured the same way
    assert 0 <= ref["plausibility"] <= 1 and ref["fid"] >= 0 and "loss" not in ref
    from pathloop.report import load_curve_rows

    saved = load_curve_rows(tmp_path / "abl" / "ablation.json")
    assert [r["fraction"] for r in saved] == [0.0, 0.1, 0.5, 1.0]
    with (tmp_path / "abl" / "ablation.csv").open() as f:
        assert [float(r["fraction"]) for r in csv.DictReader(f)] == [0.0, 0.1, 0.5, 1.0]
    for p in res["plots"]:
        assert Image.open(p).size[0] > 100
    client = mlflow.MlflowClient(res["tracking_uri"])
    history = client.get_metric_history(res["sweep_id"], "plausibility")
    assert sorted(m.step for m in history) == [0, 10, 50, 100]  # percent of the feedback
    # each finetune run records the fraction of feedback behind its reward model, and each
    # reward run the fraction it trained on
    for r in rows:
        tags = client.get_run(r["mlflow_run_id"]).data.tags
        assert tags["pathloop.feedback_fraction"] == str(r["fraction"])
    reward_runs = client.search_runs(
        [client.get_experiment_by_name("abl").experiment_id],
        f"tags.`pathloop.sweep_id` = '{res['sweep_id']}' and tags.`pathloop.step` = 'reward'",
    )
    assert sorted(run.data.tags["pathloop.feedback_fraction"] for run in reward_runs) == [
        "0.0",
        "0.1",
        "0.5",
        "1.0",
    ]


@pytest.mark.slow
def test_a_sweep_finetunes_with_nft_and_dpo(
    ray_session, tiny_ckpt, judged_round, phantom_shards, backbone, mlflow_db, tmp_path
):
    """method=nft|dpo through a sweep end to end: each trial trains its reward model, which
    gives nft its pool rewards and dpo its pairs, and the finetune run says which it ran."""
    import mlflow

    from pathloop.finetune import FinetuneConfig
    from pathloop.sweep import run_sweep

    tiny = _stage_overrides(tiny_ckpt, judged_round, phantom_shards, backbone)
    # a 2-step reward model scores every image below MAGIC's lose bar (2 of 5): all pairs would
    # tie as both-lose and dpo would refuse; with no lose bar the higher score wins
    tiny["overrides"].append("dpo_lose_bar=0.0")
    cfg = SweepConfig(
        workdir=str(tmp_path / "methods"),
        step="reward_finetune",
        space={"method": Param(grid=["nft", "dpo"])},
        metric="loss",
        mode="min",
        segments=1,
        max_concurrent=2,
        measures=["judge", "train"],
        per_class=1,
        sampler={"steps": 2},
        tracking={"tracking_uri": mlflow_db, "experiment": "methods"},
        **tiny,
    )
    res = run_sweep(cfg)
    assert res["trials"] == 2 and res["failed"] == 0
    assert sorted(r["method"] for r in res["rows"]) == ["dpo", "nft"]
    assert all(np.isfinite(r["loss"]) and 0 <= r["plausibility"] <= 1 for r in res["rows"])
    client = mlflow.MlflowClient(res["tracking_uri"])
    runs = client.search_runs(
        [client.get_experiment_by_name("methods").experiment_id],
        f"tags.`pathloop.sweep_id` = '{res['sweep_id']}' and tags.`pathloop.step` = 'finetune'",
    )
    assert sorted(run.data.params["method"] for run in runs) == ["dpo", "nft"]
    for row in res["rows"]:
        trial = tmp_path / "methods" / "trials" / row["trial_id"] / "finetune"
        data = json.loads((trial / "result.json").read_text())["data"]
        if row["method"] == "dpo":  # pairs from the trial's reward model, some with a winner
            assert data["pairs_trained"] > 0
        else:  # every pool image carries its reward: nft learns from both sides
            assert data["pairs"] == 0 and data["synthetic_images"] == 64
    best = load_config(FinetuneConfig, res["best_config"])
    assert best.method == res["best_params"]["method"] and Path(best.reward_model).is_file()


def test_cli_sweep_names_a_bad_key_before_starting_anything(tmp_path):
    from typer.testing import CliRunner

    from pathloop.cli import app

    res = CliRunner().invoke(
        app,
        [
            "sweep",
            "--config",
            str(ROOT / "jobs/configs/sweep.tiny.yaml"),
            f"workdir={tmp_path / 'sw'}",
            "space={beta_rr: {grid: [0, 1]}}",
        ],
    )
    assert res.exit_code == 2, res.output
    assert "'beta_rr' is not a field" in res.output and "beta_r" in res.output
    assert not (tmp_path / "sw").exists()  # nothing written, no MLflow run, no Ray
    res = CliRunner().invoke(app, ["ablation", "fractions=[0, 2]"])
    assert res.exit_code == 2 and "fractions must be" in res.output


def test_a_sweep_can_search_the_finetune_method():
    from pathloop.sweep import build_configs

    space = {"method": Param(grid=["reward", "nft", "dpo"])}
    for step in ("finetune", "reward_finetune"):
        cfg = SweepConfig(step=step, space=space)
        check_space(cfg)  # every method builds a valid job config
        methods = [build_configs(cfg, {"method": m})[1].method for m in ("reward", "nft", "dpo")]
        assert methods == ["reward", "nft", "dpo"]
