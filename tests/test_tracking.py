"""MLflow plumbing on a SQLite store: the project's one default store, experiments marked as
model training, a run's card for reports, registered versions described with their lineage."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest

from pathloop import tracking
from pathloop.config import TrackingConfig


def test_the_default_store_is_the_projects_runs_directory(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    runs = tmp_path / "runs"
    for workdir in (runs / "loop", runs / "demo" / "round1" / "evaluate", runs):
        uri = tracking.resolve_uri(TrackingConfig(), workdir)
        assert uri == f"sqlite:///{runs / 'mlflow.db'}"
    alone = tmp_path / "scratch" / "job"  # outside any runs/ directory: its own store
    assert tracking.resolve_uri(TrackingConfig(), alone) == f"sqlite:///{alone / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow:5000")
    assert tracking.resolve_uri(TrackingConfig(), runs / "loop") == "http://mlflow:5000"
    given = TrackingConfig(tracking_uri="sqlite:////elsewhere.db")
    assert tracking.resolve_uri(given, runs / "loop") == "sqlite:////elsewhere.db"


def test_experiments_are_marked_as_model_training(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = mlflow.MlflowClient(uri)
    exp_id = tracking.use(uri, "fresh")
    assert client.get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    old = client.create_experiment("made-elsewhere")  # e.g. by an older pathloop: no kind
    assert "mlflow.experimentKind" not in client.get_experiment(old).tags
    assert tracking.use(uri, "made-elsewhere") == old
    assert client.get_experiment(old).tags["mlflow.experimentKind"] == "custom_model_development"


def test_run_card_links_the_run_and_its_parent(tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tc = TrackingConfig(tracking_uri=uri, experiment="cards")
    parent = tracking.start_run(tc, tmp_path, run_name="loop")
    child = tracking.start_run(tc, tmp_path, run_name="round1-evaluate", parent_run_id=parent)
    card = tracking.run_card(uri, child)
    exp_id = mlflow.MlflowClient(uri).get_run(child).info.experiment_id
    assert card == {
        "run_id": child,
        "run_name": "round1-evaluate",
        "url": f"http://127.0.0.1:5000/#/experiments/{exp_id}/runs/{child}",
        "ui": f"mlflow ui --backend-store-uri {uri}",
        "parent": "loop",
    }
    assert tracking.run_url("https://mlflow.example/", "3", "r") == (
        "https://mlflow.example/#/experiments/3/runs/r"
    )
    assert tracking.ui_command("https://mlflow.example") is None


def test_registered_version_describes_its_lineage_and_metrics(tiny_ckpt, tmp_path):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tc = TrackingConfig(tracking_uri=uri, experiment="lineage")
    parent = tracking.start_run(tc, tmp_path, run_name="loop")
    params = {"pretrained": "models:/pathloop-pretrain/4", "feedback_round": "loop-round1"}
    run = tracking.start_run(tc, tmp_path, params, run_name="round1-finetune", parent_run_id=parent)
    tracking.log_metrics(uri, run, {"loss": 0.25, "model/plausibility/judge/class/M5": 1.0}, 6)
    model_uri = tracking.log_checkpoint_model(uri, run, tiny_ckpt, "lineage-tiny")
    assert model_uri == "models:/lineage-tiny/1"
    client = mlflow.MlflowClient(uri)
    version = client.get_model_version("lineage-tiny", "1")
    text = version.description
    assert text.startswith(f"Logged by run round1-finetune ({run}), a step of run loop ({parent})")
    assert "- started from: models:/pathloop-pretrain/4" in text
    assert "- feedback round: loop-round1" in text and "loss 0.25" in text
    assert "/class/" not in text  # per-class rates stay in the run
    assert version.tags["pathloop.pretrained"] == "models:/pathloop-pretrain/4"
    assert version.tags["pathloop.parent_run_id"] == parent

    later = {"model/fid": 12.5, "model/plausibility/judge/rate": 0.625}
    tracking.describe_model_version(uri, model_uri, later, "Evaluated in round 1 of the loop")
    version = client.get_model_version("lineage-tiny", "1")
    assert "Evaluated in round 1 of the loop: model/fid 12.5, " in version.description
    assert version.tags["metric.model/plausibility/judge/rate"] == "0.625"
    with pytest.raises(ValueError, match="not models:/<name>/<version>"):
        tracking.describe_model_version(uri, f"runs:/{run}/model")


def test_model_copies_are_removed_when_the_process_exits_and_local_versions_read_in_place(
    tiny_ckpt, tmp_path
):
    import os
    import subprocess
    import sys

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    tc = TrackingConfig(tracking_uri=uri, experiment="downloads")
    run = tracking.start_run(tc, tmp_path, run_name="pretrain")
    assert tracking.log_checkpoint_model(uri, run, tiny_ckpt, "dl-tiny") == "models:/dl-tiny/1"
    script = (
        "import sys; from pathloop.tracking import resolve_model_ref as r\n"
        "a, b = (r('models:/dl-tiny/1', tracking_uri=sys.argv[1])[0] for _ in range(2))\n"
        "assert a == b and (a / 'state.json').is_file(), (a, b)\n"
        "c = r(f'runs:/{sys.argv[2]}/model', tracking_uri=sys.argv[1])[0]\n"
        "d = r(f'file://{sys.argv[3]}')[0]\n"
        "assert (c / 'state.json').is_file() and (d / 'state.json').is_file(), (c, d)\n"
        "print(a, c, d)\n"
    )
    scratch = tmp_path / "tmp"  # the child's temp dir: every copy it makes lands here
    scratch.mkdir()
    env = os.environ | {"TMPDIR": str(scratch)}
    argv = [sys.executable, "-c", script, uri, run, str(tiny_ckpt)]
    out = subprocess.run(argv, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    version, by_run, remote = (Path(p) for p in out.stdout.split())
    # a version in a store with local artifacts (or on shared storage) is read where it lies
    assert scratch not in version.parents and (version / "state.json").is_file()
    assert scratch in by_run.parents and scratch in remote.parents  # these were copied
    assert list(scratch.iterdir()) == []  # and nothing is left once the process is gone


def test_ray_workers_get_a_downloaded_model_from_the_work_dir(tiny_ckpt, tmp_path):
    wd = tmp_path / "wd"
    wd.mkdir()
    assert tracking.for_workers(tiny_ckpt, wd, "pretrained_model") == tiny_ckpt  # stays put
    copy = tracking.resolve_model_ref(f"file://{tiny_ckpt}")[0]  # the driver's own download
    assert copy != tiny_ckpt and (copy / "state.json").is_file()
    shared = tracking.for_workers(copy, wd, "pretrained_model")  # what nodes' workers can read
    assert shared == (wd / "pretrained_model").resolve() and (shared / "state.json").is_file()
