"""Every step as a Ray job: the entrypoints, the working-dir upload, cluster.yaml, and a real
local cluster that runs the tiny pretrain and sample jobs submitted through the Ray Jobs CLI."""

from __future__ import annotations

import ast
import json
import zipfile
from pathlib import Path

import pytest
import yaml

from pathloop.config import load_config

REPO = Path(__file__).resolve().parents[1]

# jobs/<script>.py → (`pathloop` command, tiny config, config model "module:Class")
STEPS = {
    "pretrain": ("pretrain", "pretrain.tiny.yaml", "pathloop.pretrain:PretrainConfig"),
    "sample": ("sample", "sample.tiny.yaml", "pathloop.sampling:SampleConfig"),
    "reward": ("reward", "reward.tiny.yaml", "pathloop.reward:RewardConfig"),
    "finetune": ("finetune", "finetune.tiny.yaml", "pathloop.finetune:FinetuneConfig"),
    "guidance_classifier": (
        "guidance-classifier",
        "guidance.tiny.yaml",
        "pathloop.classifiers:GuidanceJobConfig",
    ),
}


def _model(ref: str) -> type:
    import importlib

    module, name = ref.split(":")
    return getattr(importlib.import_module(module), name)


def _job_command(script: Path) -> str | None:
    """The step name a job script hands to ``pathloop.jobs.main``."""
    for node in ast.walk(ast.parse(script.read_text())):
        if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "main":
            return node.args[0].value
    return None


@pytest.mark.parametrize("script", sorted(STEPS))
def test_each_step_is_a_job_running_its_cli_command(script):
    from typer.main import get_command

    from pathloop.cli import app

    command, config, model = STEPS[script]
    assert _job_command(REPO / "jobs" / f"{script}.py") == command
    assert command in get_command(app).commands
    for preset in ("tiny", "paper"):
        path = REPO / "jobs" / "configs" / config.replace("tiny", preset)
        if preset == "tiny" or path.exists():
            load_config(_model(model), path)  # every preset validates against the job's model


def test_job_entry_runs_the_cli_command(phantom_shards, tmp_path):
    """``main(step, argv)`` is ``pathloop <step> argv``: a guidance classifier trains, registers,
    and loads back from its result."""
    from pathloop.classifiers import load_guidance_classifier
    from pathloop.jobs import main
    from pathloop.tracking import resolve_model_ref

    argv = [
        "--config",
        str(REPO / "jobs/configs/guidance.tiny.yaml"),
        f"workdir={tmp_path / 'g'}",
        f"shards={phantom_shards}",
        "pretrained=null",
        "classifier.steps=4",
        "classifier.batch_size=8",
        f"tracking.tracking_uri=sqlite:///{tmp_path / 'mlflow.db'}",
    ]
    with pytest.raises(SystemExit) as exit_:
        main("guidance-classifier", argv)
    assert exit_.value.code == 0
    result = json.loads((tmp_path / "g" / "result.json").read_text())
    assert result["model_uri"] == "models:/pathloop-guidance-tiny/1"
    assert {"accuracy_t0.05", "accuracy_t0.5"} <= set(result)
    clf = load_guidance_classifier(resolve_model_ref(str(tmp_path / "g" / "result.json"))[0])
    assert clf.backbone.num_classes == 16


def test_job_entry_bad_override_exits_2_naming_the_key(capsys):
    from pathloop.jobs import main

    with pytest.raises(SystemExit) as exit_:
        main("sample", ["per_clas=3"])
    assert exit_.value.code == 2
    assert "per_clas" in capsys.readouterr().err


def test_relative_outputs_warn_only_inside_a_ray_job(monkeypatch):
    from pathloop.jobs import RAY_JOB_ENV, check_outputs
    from pathloop.sampling import SampleConfig

    cfg = SampleConfig(out="runs/samples")
    monkeypatch.delenv(RAY_JOB_ENV, raising=False)
    assert check_outputs(cfg) == []
    monkeypatch.setenv(RAY_JOB_ENV, "{}")
    (warning,) = check_outputs(cfg)
    assert "out='runs/samples'" in warning and "shared storage" in warning
    assert check_outputs(SampleConfig(out="s3://bucket/samples")) == []
    assert check_outputs(SampleConfig(out="/mnt/shared/samples")) == []


def test_working_dir_upload_leaves_out_runs_venv_and_git(tmp_path):
    """What `ray job submit --working-dir .` uploads: the sources, not runs/, .venv or .git."""
    from ray._private.runtime_env.packaging import create_package

    pkg = tmp_path / "pkg.zip"
    create_package(str(REPO), pkg, include_gitignore=True)
    names = zipfile.ZipFile(pkg).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"pathloop", "jobs", "serve", "pyproject.toml"} <= tops
    assert not tops & {".git", ".venv", "runs", ".hypothesis", ".pytest_cache", "mlflow.db"}
    size_mib = pkg.stat().st_size / 2**20
    print(f"working-dir upload: {len(names)} files, {size_mib:.2f} MiB")
    assert size_mib < 5, f"upload is {size_mib:.1f} MiB: add the big paths to .rayignore"


def test_cluster_yaml_has_gpu_workers_storage_and_tracking():
    spec = yaml.safe_load((REPO / "cluster.yaml").read_text())
    for key in ("cluster_name", "provider", "available_node_types", "head_node_type"):
        assert key in spec, f"cluster.yaml lacks {key}"
    types = spec["available_node_types"]
    head = types[spec["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu = [t for t in types.values() if t["resources"].get("GPU", 0) >= 1]
    assert gpu and all(t["max_workers"] > t["min_workers"] >= 0 for t in gpu)  # autoscaled
    setup = "\n".join(spec["setup_commands"])
    assert "constraints" in setup and "pip install" in setup
    # MLflow server and shared storage reach every node through a mounted env file.
    env_file = next(k for k, v in spec["file_mounts"].items() if str(v).endswith("cluster.env"))
    assert Path(env_file).name in setup
    for var in ("MLFLOW_TRACKING_URI", "PATHLOOP_STORAGE"):
        assert (
            var in (REPO / "cluster.yaml").read_text()
            and var in (REPO / "docs/cluster.md").read_text()
        )


# ----------------------------------------------------------------------------- a real cluster


@pytest.mark.slow
@pytest.mark.timeout(1800)  # ~3 min alone; two jobs on a shared 2-core box can take longer
def test_pretrain_then_sample_as_ray_jobs(ray_cluster, phantom_shards, tmp_path):
    """`ray job submit` the tiny pretrain job, then the sample job on its registered model, on a
    local cluster; check the MLflow run, the registered model and the sample shards."""
    import mlflow

    from pathloop.data import iter_records, read_manifest

    db = f"sqlite:///{tmp_path / 'mlflow.db'}"
    pre = ray_cluster.submit(
        REPO,
        *("python", "jobs/pretrain.py", "--config", "jobs/configs/pretrain.tiny.yaml"),
        f"workdir={tmp_path / 'pretrain'}",
        f"data.shards={phantom_shards}",
        f"tracking.tracking_uri={db}",
        "tracking.register_as=jobs-test-pretrain",
        "model.block_out_channels=[16,32]",
        "model.layers_per_block=1",
        "train.steps=2",
        "train.batch_size=8",
        "train.log_every=1",
        "train.preview_per_class=1",
        "preview.steps=1",
        "scaling.torch_threads=1",
    )
    assert pre.returncode == 0 and "succeeded" in pre.stdout + pre.stderr, pre.stdout[-3000:]
    result = json.loads((tmp_path / "pretrain" / "result.json").read_text())
    assert result["model_uri"] == "models:/jobs-test-pretrain/1" and result["step"] == 2

    client = mlflow.MlflowClient(db)
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.data.tags["pathloop.step"] == "pretrain"
    assert run.data.params["train.steps"] == "2" and "loss" in run.data.metrics
    assert client.get_model_version("jobs-test-pretrain", "1").run_id == result["run_id"]

    out = tmp_path / "samples"
    sam = ray_cluster.submit(
        REPO,
        *("python", "jobs/sample.py", "--config", "jobs/configs/sample.tiny.yaml"),
        f"model={tmp_path / 'pretrain' / 'result.json'}",
        f"out={out}",
        "per_class=1",
        "classes=[M5,B2]",
        "sampler.steps=1",
    )
    assert sam.returncode == 0 and "succeeded" in sam.stdout + sam.stderr, sam.stdout[-3000:]
    manifest = read_manifest(out)
    assert manifest["num_records"] == 2 and manifest["sources"] == {"synthetic": 2}
    rows = list(iter_records(out))
    assert {r["class_name"] for r in rows} == {"neutrophil", "basophil"}
    for r in rows:
        assert r["provenance"]["model_uri"] == "models:/jobs-test-pretrain/1"
        assert r["provenance"]["checkpoint_step"] == 2 and r["provenance"]["steps"] == 1
