"""`pathloop loop` end to end with minimal settings: killed during finetuning, it resumes,
skips the finished steps and ends with the same model as an uninterrupted finetune."""

from __future__ import annotations

import re
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
    "pretrain.train.preview_per_class=1",
    "pretrain.preview.steps=2",
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
    "finetune.train.preview_per_class=1",
    "finetune.preview.steps=2",
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
@pytest.mark.timeout(1200)  # two loops: 7.5 min on a shared 2-core machine (one: 5.7)
def test_loop_resumes_after_a_kill_in_finetuning(tmp_path, monkeypatch):
    import ray.train

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)  # the default store is the point
    runs = tmp_path / "runs"  # the project's runs/: every loop under it shares runs/mlflow.db

    def cfg(*extra: str) -> LoopConfig:
        over = [f"workdir={runs / 'loop'}", *MINIMAL, *extra]
        return load_config(LoopConfig, ROOT / "jobs/configs/loop.tiny.yaml", over)

    # 1. killed at finetuning step 3 (after its step-2 checkpoint), no automatic recovery
    killed = cfg("finetune.train.fail_at_step=3", "finetune.max_failures=0")
    with pytest.raises(ray.train.TrainingFailedError):
        run_loop(killed)
    wd = runs / "loop"
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
    # the tiny sweep and ablation read their inputs from what this loop leaves
    from pathloop.sweep import AblationConfig, SweepConfig

    shipped = [
        load_config(c, ROOT / f"jobs/configs/{n}.tiny.yaml")
        for c, n in ((SweepConfig, "sweep"), (AblationConfig, "ablation"))
    ]
    inputs = {
        o.split("=", 1)[1].split()[0]
        for c in shipped
        for o in (*c.overrides, *c.reward_overrides)
        if "=runs/" in o
    }
    readme = (ROOT / "README.md").read_text()
    [loop_wd] = re.findall(
        r"pathloop loop --config jobs/configs/loop.tiny.yaml workdir=(\S+)", readme
    )
    assert len(inputs) == 5 and all(i.startswith(f"{loop_wd}/") for i in inputs), inputs
    assert all((wd / i.removeprefix(f"{loop_wd}/")).exists() for i in inputs), inputs

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
    # training previews and the evaluation name the judge's rate of the model alike
    child = {r.info.run_name: r.data.metrics for r in children}
    rate = "model/plausibility/judge/rate"
    assert rate in child["round1-finetune"] and rate in child["round1-evaluate"]
    assert not any(k.startswith("judge_plausible") for m in child.values() for k in m)
    # the report: its run's name in the title, a verdict with directions, a link to the run
    page = Path(ev["report"]).read_text()
    assert "<h1>pathloop evaluation: loop-tiny / round1-evaluate</h1>" in page
    assert "model vs baseline:" in page and "lower is better" in page
    assert f"#/experiments/{parent.info.experiment_id}/runs/{ev['run_id']}" in page

    # 5. a second loop with other settings, from this loop's model: the same store by default,
    # both parent runs with the headline metrics of their rounds, the experiment a training one
    second = load_config(
        LoopConfig,
        ROOT / "jobs/configs/loop.tiny.yaml",
        [
            f"workdir={runs / 'loop-b'}",
            "name=loop-b",
            *MINIMAL,
            f"pretrained={ft['checkpoint']}",
            "round.pool_per_class=0",
            "reward.backbone_train.steps=2",
            "reward.train.steps=2",
            "reward.train.checkpoint_every=2",
            "finetune.train.steps=2",
            "evaluate.tstr.settings=[synthetic]",
            f"evaluate.features.path={wd / 'round1/evaluate/features'}",
        ],
    )
    other = run_loop(second)
    store = f"sqlite:///{runs / 'mlflow.db'}"
    assert summary["tracking_uri"] == other["tracking_uri"] == store
    exp = client.get_experiment(parent.info.experiment_id)
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    loops = client.search_runs([exp.experiment_id], "tags.`pathloop.step` = 'loop'")
    by_name = {r.info.run_name: r for r in loops}
    assert set(by_name) == {"loop-tiny", "loop-b"}
    assert by_name["loop-tiny"].data.params["finetune.train.steps"] == "6"
    assert by_name["loop-b"].data.params["finetune.train.steps"] == "2"
    for name, s in (("loop-tiny", summary), ("loop-b", other)):
        m, evaluated = by_name[name].data.metrics, s["rounds"][0]["evaluate"]
        assert m["model/fid"] == pytest.approx(evaluated["fidelity"]["model"]["fid"])
        judge = evaluated["plausibility"]["judge"]["model"]["overall"]
        assert m[rate] == pytest.approx(judge["rate"]) and m["model/plausibility/judge/hi"] > 0
        assert {"model/prdc/precision", "model/prdc/coverage"} <= set(m)
        assert "model/tstr/synthetic/macro_f1" in m
        history = client.get_metric_history(by_name[name].info.run_id, "model/fid")
        assert [h.step for h in history] == [1] * len(history)  # step = the round


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


def _checklist_export(path: Path, passed: list[int]) -> Path:
    """A feedback export of len(passed) phantoms, two per class, image i passing passed[i] of
    the 7 criteria (the fail_* columns a judge, MLLM or per-criterion rater leaves)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from pathloop.data import encode_png
    from pathloop.vocab import CRITERIA

    n = len(passed)
    cols = {
        "id": [f"img{i}" for i in range(n)],
        "image": [encode_png(np.full((32, 32, 3), 9 * i, np.uint8)) for i in range(n)],
        "class_id": [i // 2 for i in range(n)],
    }
    for k, c in enumerate(CRITERIA):
        cols[f"fail_{c}"] = [float(k >= p) for p in passed]
    path.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(cols), path / "feedback.parquet")
    return path


@pytest.mark.parametrize("method", ["reward", "nft", "dpo"])
def test_the_round_finetunes_with_the_chosen_method(method, tmp_path):
    """finetune.method reaches the round's finetune job with the inputs it needs: the reward
    model's scores of the pool (reward, nft), or pairs from the reviewed images' checklist
    scores (dpo: no reward model, no pool)."""
    import numpy as np

    from pathloop.finetune import _finetune_data, check_reward_source
    from pathloop.pipeline import Steps, round_finetune

    cfg = load_config(
        LoopConfig,
        ROOT / "jobs/configs/loop.tiny.yaml",
        [f"workdir={tmp_path}", f"finetune.method={method}"],
    )
    export = _checklist_export(tmp_path / "round1/feedback", [7, 3, 1, 2, 5, 5, 6, 0])
    pool = tmp_path / "round1/pool"
    steps = Steps(cfg, f"sqlite:///{tmp_path}/m.db", "parent")
    ft = round_finetune(steps, 1, "model", tmp_path / "data", export, pool, "reward-model")
    assert (ft.method, ft.pretrained, ft.real) == (method, "model", str(tmp_path / "data"))
    assert ft.workdir == str(tmp_path / "round1/finetune")
    assert ft.tracking.parent_run_id == "parent" and ft.feedback_round == "loop-round1"
    check_reward_source(ft)  # run_finetune accepts it
    if method != "dpo":
        assert (ft.synthetic, ft.reward_model) == (str(pool), "reward-model")
        return
    assert (ft.synthetic, ft.reward_model) == (str(export / "feedback.parquet"), None)
    stats = _finetune_data(ft.model_copy(update={"real": None}), None, tmp_path / "data.npz")
    # 7 vs 3 and 6 vs 0: one wins; 1 vs 2: both lose (<= 2 of 7); 5 vs 5: both win
    assert stats["pair_kinds"] == {"one_wins": 2, "both_win": 1, "both_lose": 1}
    assert stats["pairs"] == 4 and stats["pairs_trained"] == 2
    pairs = np.load(tmp_path / "data.npz")["pairs"]
    winners = {int(row[0] if row[2] == 1 else row[1]) for row in pairs if row[2] != row[3]}
    assert winners == {0, 6}
