"""Every MLflow call in pathloop: URI resolution, runs, params, artifacts, model registry.

The embedded default is one SQLite store per project (MLflow 3 refuses the file store):
``runs/mlflow.db``, in the nearest directory named ``runs`` above the job's work dir (every
``runs/<job>`` shares it, so runs, arms and loops compare side by side), with artifacts beside it.
``$MLFLOW_TRACKING_URI`` or ``tracking.tracking_uri`` point at a server. Experiments are marked as
model training (``mlflow.experimentKind``), so MLflow 3's UI opens them on their runs, not on
GenAI traces. Only the driver or rank 0 calls these.
"""

from __future__ import annotations

import atexit
import json
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from pathloop.config import TrackingConfig

DEFAULT_DB = "mlflow.db"
PROJECT_DIR = "runs"  # the store lives in the nearest work-dir ancestor of this name
# MLflow 3's UI picks an experiment's page by this tag; without it, an experiment with no runs
# yet opens on GenAI traces. Values: the UI's ExperimentKind (custom_model_development = training).
EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
UI_URL = "http://127.0.0.1:5000"  # where `mlflow ui` serves a local store


def project_dir(workdir: str | Path) -> Path:
    """The directory of the project's store: the nearest of ``workdir`` and its ancestors named
    ``runs`` (runs/loop, runs/demo/round1 -> runs), else ``workdir`` itself."""
    wd = Path(workdir).resolve()
    return next((d for d in (wd, *wd.parents) if d.name == PROJECT_DIR), wd)


def resolve_uri(cfg: TrackingConfig, workdir: str | Path) -> str:
    """Tracking URI: config > $MLFLOW_TRACKING_URI > sqlite:////<project dir>/mlflow.db."""
    if cfg.tracking_uri:
        return cfg.tracking_uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    db = project_dir(workdir) / DEFAULT_DB
    db.parent.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{db}"


def _artifact_root(uri: str) -> str | None:
    """Artifacts of a SQLite store live beside the .db file (not in the process's cwd)."""
    if uri.startswith("sqlite:///"):
        return (Path(uri[len("sqlite:///") :]).parent / "mlartifacts").as_uri()
    return None


def use(uri: str, experiment: str) -> str:
    """Point mlflow at ``uri`` and make sure ``experiment`` exists, marked as model training;
    returns its id."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        exp_id = client.create_experiment(
            experiment, artifact_location=_artifact_root(uri), tags=dict([EXPERIMENT_KIND])
        )
    else:
        exp_id = exp.experiment_id
        if exp.tags.get(EXPERIMENT_KIND[0]) is None:  # made before the tag, or elsewhere
            client.set_experiment_tag(exp_id, *EXPERIMENT_KIND)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def run_url(uri: str, experiment_id: str, run_id: str) -> str:
    """The run's page in the MLflow UI: at the tracking server for http(s) stores, else at
    ``mlflow ui``'s default address (``ui_command`` starts it on the store)."""
    base = uri.rstrip("/") if uri.startswith(("http://", "https://")) else UI_URL
    return f"{base}/#/experiments/{experiment_id}/runs/{run_id}"


def run_card(uri: str, run_id: str) -> dict[str, str | None]:
    """What a report says about its run: {run_id, run_name, url, ui (the command that serves
    the link, None for a server), parent (the parent run's name, or None)}."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    run = client.get_run(run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    return {
        "run_id": run_id,
        "run_name": run.info.run_name,
        "url": run_url(uri, run.info.experiment_id, run_id),
        "ui": ui_command(uri),
        "parent": client.get_run(parent).info.run_name if parent else None,
    }


def ui_command(uri: str) -> str | None:
    """The command that serves a local store's UI at ``UI_URL``; None for a tracking server."""
    if uri.startswith(("http://", "https://", "databricks")):
        return None
    return f"mlflow ui --backend-store-uri {uri}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Nested config dict → {'optim.lr': 1e-4, ...} for mlflow params."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def start_run(
    cfg: TrackingConfig,
    workdir: str | Path,
    params: dict | None = None,
    tags: dict | None = None,
    run_name: str | None = None,
    parent_run_id: str | None = None,
) -> str:
    """Create a run (driver side), log the flattened config as params, and return its id."""
    import mlflow

    uri = resolve_uri(cfg, workdir)
    exp_id = use(uri, cfg.experiment)
    client = mlflow.MlflowClient(uri)
    all_tags = dict(tags or {})
    parent_run_id = parent_run_id or cfg.parent_run_id
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id
    run = client.create_run(exp_id, run_name=run_name or cfg.run_name, tags=all_tags)
    if params:
        flat = {k: str(v)[:6000] for k, v in flatten(params).items()}
        items = list(flat.items())
        for i in range(0, len(items), 100):  # log_batch takes at most 100 params
            client.log_batch(
                run.info.run_id,
                params=[mlflow.entities.Param(k, v) for k, v in items[i : i + 100]],
            )
    return run.info.run_id


@contextmanager
def active_run(uri: str, run_id: str) -> Iterator[Any]:
    """Resume an existing run (e.g. inside the rank-0 worker) for logging."""
    import mlflow

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=run_id) as run:
        yield run


def log_metrics(uri: str, run_id: str, metrics: dict[str, float], step: int) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    ts = int(__import__("time").time() * 1000)
    client.log_batch(
        run_id,
        metrics=[mlflow.entities.Metric(k, float(v), ts, step) for k, v in metrics.items()],
    )


def run_metrics(uri: str, run_id: str) -> dict[str, float]:
    """The latest value of every metric of a run."""
    import mlflow

    return dict(mlflow.MlflowClient(uri).get_run(run_id).data.metrics)


def log_artifact(uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    p = Path(path)
    if p.is_dir():
        client.log_artifacts(run_id, str(p), artifact_path)
    else:
        client.log_artifact(run_id, str(p), artifact_path)


def log_image(uri: str, run_id: str, image: Any, artifact_file: str) -> None:
    """Log a PIL image as a PNG artifact."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / Path(artifact_file).name
        image.save(path)
        parent = str(Path(artifact_file).parent)
        log_artifact(uri, run_id, path, None if parent == "." else parent)


def set_tags(uri: str, run_id: str, tags: dict[str, Any]) -> None:
    import mlflow

    client = mlflow.MlflowClient(uri)
    for k, v in tags.items():
        client.set_tag(run_id, k, str(v))


def end_run(uri: str, run_id: str, status: str = "FINISHED") -> None:
    import mlflow

    mlflow.MlflowClient(uri).set_terminated(run_id, status=status)


# ----------------------------------------------------------------------------- models


def _pyfunc_class() -> type:
    import mlflow.pyfunc

    class CheckpointModel(mlflow.pyfunc.PythonModel):
        """A pathloop checkpoint as an MLflow model: ``predict`` takes class ids, returns PNGs.

        The checkpoint directory is the artifact; ``pathloop.tracking.resolve_model`` is the
        usual way to get it back as a local path for ``load_checkpoint``.
        """

        def load_context(self, context: Any) -> None:
            from pathloop.diffusion import load_checkpoint

            self.ckpt = load_checkpoint(context.artifacts["checkpoint"])

        def predict(self, context: Any, model_input: Any, params: dict | None = None) -> Any:
            from pathloop.diffusion import sample, to_uint8

            ids = [int(x) for x in list(model_input["class_id"])]
            p = params or {}
            x = sample(
                self.ckpt.unet,
                self.ckpt.noise,
                ids,
                steps=int(p.get("steps", 50)),
                guidance=float(p.get("guidance", 2.0)),
                seed=int(p.get("seed", 0)),
            )
            return to_uint8(x).tolist()

    return CheckpointModel


def log_checkpoint_model(
    uri: str, run_id: str, ckpt_dir: str | Path, register_as: str | None = None
) -> str:
    """Log a checkpoint directory as an MLflow model; register it when asked.

    Returns ``models:/<name>/<version>`` when registered, else ``runs:/<run_id>/model``.
    """
    import shutil

    import mlflow

    with tempfile.TemporaryDirectory() as tmp, active_run(uri, run_id):
        # The registry copy is for inference: weights, config and vocabulary, no optimizer state.
        clean = Path(tmp) / "checkpoint"
        shutil.copytree(ckpt_dir, clean, ignore=shutil.ignore_patterns("optimizer.pt"))
        mlflow.pyfunc.log_model(
            name="model",
            python_model=_pyfunc_class()(),
            artifacts={"checkpoint": str(clean)},
            pip_requirements=["pathloop"],
        )
    model_uri = f"runs:/{run_id}/model"
    if register_as:
        mv = mlflow.register_model(model_uri, register_as)
        registered = f"models:/{register_as}/{mv.version}"
        describe_model_version(uri, registered)
        return registered
    return model_uri


# A model version's lineage: the run params that name what it was made from.
LINEAGE_PARAMS = {
    "pretrained": "started from",
    "reward_model": "reward model",
    "feedback_round": "feedback round",
    "feedback": "feedback",
    "synthetic": "synthetic images",
    "real": "real images",
    "real_shards": "real images",
    "data.shards": "training images",
}


def _version(model_uri: str) -> tuple[str, str]:
    name, _, version = model_uri[len("models:/") :].partition("/")
    if not model_uri.startswith("models:/") or not version.isdigit():
        raise ValueError(f"{model_uri!r} is not models:/<name>/<version>")
    return name, version


def describe_model_version(
    uri: str, model_uri: str, metrics: dict[str, float] | None = None, source: str = ""
) -> str:
    """Write a registered version's description (shown on its registry page) and tags: the
    run that made it (name, id, parent run), what it was made from (``LINEAGE_PARAMS``), its
    run's final metrics and, when given, ``metrics`` measured later (e.g. the loop's evaluation
    of it, named by ``source``), which are also set as ``metric.<name>`` tags."""
    import mlflow

    client = mlflow.MlflowClient(uri)
    name, version = _version(model_uri)
    run = client.get_run(client.get_model_version(name, version).run_id)
    parent = run.data.tags.get("mlflow.parentRunId")
    lines = [f"Logged by run {run.info.run_name} ({run.info.run_id})"]
    if parent:
        lines[0] += f", a step of run {client.get_run(parent).info.run_name} ({parent})"
    tags = {"pathloop.run_id": run.info.run_id, "pathloop.parent_run_id": parent or ""}
    for key, what in LINEAGE_PARAMS.items():
        value = run.data.params.get(key)
        if value not in (None, "", "None"):
            lines.append(f"- {what}: {value}")
            tags[f"pathloop.{key}"] = value
    own = {k: v for k, v in run.data.metrics.items() if "/class/" not in k}
    if own:
        lines.append("Run metrics (last value): " + _metric_text(own))
    if metrics:
        lines.append(f"{source or 'Measured later'}: " + _metric_text(metrics))
        tags.update({f"metric.{k}": f"{v:.4g}" for k, v in metrics.items()})
    text = "\n".join(lines)
    client.update_model_version(name, version, description=text)
    for k, v in tags.items():
        client.set_model_version_tag(name, version, k, str(v)[:5000])
    return text


def _metric_text(metrics: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.4g}" for k, v in sorted(metrics.items()))


# Schemes MLflow resolves itself; any other ``scheme://`` is a pyarrow.fs location.
MLFLOW_SCHEMES = ("models:/", "runs:/", "mlflow-artifacts:/")


def resolve_model_ref(
    ref: str | Path, tracking: TrackingConfig | None = None, tracking_uri: str | None = None
) -> tuple[Path, str]:
    """(absolute local model dir, URI recorded in provenance) for any model reference: a
    directory, a job's result.json, an MLflow URI (``models:/name/version``, ``runs:/id/model``),
    or a directory/result.json at a pyarrow.fs URI (``s3://...``).

    An MLflow URI resolves in the store of the result.json that names it, else in
    ``tracking_uri``, else in ``tracking``'s store, else in MLflow's default."""
    from pathloop import storage

    ref = str(ref)
    if ref.endswith(".json") and storage.is_file(ref):
        info = json.loads(storage.read_text(ref))
        uri = info.get("tracking_uri") or tracking_uri
        return resolve_model_ref(info["model_uri"], tracking, uri)[0], info["model_uri"]
    if ref.startswith(MLFLOW_SCHEMES):
        if tracking_uri is None and tracking is not None:
            tracking_uri = resolve_uri(tracking, ".")
        return _download_model(ref, tracking_uri), ref
    if storage.is_uri(ref):
        return _local_copy(ref, None, lambda dest: storage.copy_to_local(ref, dest), False), ref
    p = Path(ref)
    if not p.exists():
        raise FileNotFoundError(
            f"model {ref!r} is neither an existing checkpoint directory, a result.json nor an "
            "MLflow URI (models:/<name>/<version> or runs:/<run_id>/model)"
        )
    return Path(storage.absolute(p)), ref


def resolve_model(ref: str | Path, tracking_uri: str | None = None) -> Path:
    """The local model dir of any reference ``resolve_model_ref`` takes."""
    return resolve_model_ref(ref, tracking_uri=tracking_uri)[0]


_downloads: dict[tuple[str | None, str], Path] = {}  # (store, reference) -> this process's copy
_downloads_lock = threading.Lock()
_scratch: list[Path] = []  # this process's download directory, once made


def _scratch_dir() -> Path:
    """The directory this process downloads models into, removed when the process exits, so a
    job, sweep trial or replica leaves no model copy in the temp dir. Forked children inherit
    the exit hook but not the directory: only the process that made it removes it."""
    if not _scratch or not _scratch[0].is_dir():
        root, pid = Path(tempfile.mkdtemp(prefix="pathloop-models-")).resolve(), os.getpid()
        atexit.register(lambda: os.getpid() == pid and shutil.rmtree(root, ignore_errors=True))
        _scratch[:] = [root]
    return _scratch[0]


def _local_copy(ref: str, store: str | None, fetch: Any, reuse: bool) -> Path:
    """``fetch(dest)`` -> local path in ``_scratch_dir``; with ``reuse`` (a reference that
    always names the same files), once per (store, reference) and process."""
    with _downloads_lock:
        hit = _downloads.get((store, ref)) if reuse else None
        if hit is not None and hit.exists():
            return hit
        dest = Path(tempfile.mkdtemp(dir=_scratch_dir()))
        try:
            path = Path(fetch(dest))
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise
        if reuse:
            _downloads[(store, ref)] = path
        return path


def for_workers(path: str | Path, workdir: str | Path, name: str) -> Path:
    """A resolved model dir where Ray workers on any node can read it: ``path`` itself, unless
    it is this process's download copy (the driver's temp dir, gone when the driver exits), then
    a copy in ``<workdir>/<name>``: on a cluster the work dir is on the shared filesystem."""
    path = Path(path)
    if not _scratch or _scratch[0] not in path.resolve().parents:
        return path
    dest = Path(workdir) / name
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(path, dest)
    return dest.resolve()


def _in_place(ref: str) -> Path | None:
    """Where the files of an MLflow model URI already lie on this machine (a store whose
    artifacts are local or on shared storage), else None. Those are read where they are, as
    MLflow itself does for a local version, so every node of a cluster sees the same path."""
    from urllib.parse import urlparse

    from mlflow.store.artifact.models_artifact_repo import ModelsArtifactRepository
    from mlflow.store.artifact.runs_artifact_repo import RunsArtifactRepository
    from mlflow.utils.file_utils import local_file_uri_to_path

    if ref.startswith("models:/"):
        under = ModelsArtifactRepository.get_underlying_uri(ref)
    elif ref.startswith("runs:/"):
        under = RunsArtifactRepository.get_underlying_uri(ref)
    else:
        return None
    if urlparse(under).scheme not in ("", "file"):
        return None
    path = Path(local_file_uri_to_path(under))
    return path if path.exists() else None


def _mlflow_download(ref: str, dest: Path) -> str:
    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=ref, dst_path=str(dest))


def _download_model(ref: str, tracking_uri: str | None) -> Path:
    """The pathloop checkpoint (``state.json``) of an MLflow model URI: in place where its
    files are local, else downloaded (once per process, into ``_scratch_dir``)."""
    import mlflow
    from mlflow.exceptions import MlflowException

    if tracking_uri:
        mlflow.set_tracking_uri(tracking_uri)
    store = mlflow.get_tracking_uri()
    # a version number or a run pins the files; an alias or a stage may move to another version
    pinned = re.fullmatch(r"models:/[^/@]+/\d+(/.*)?", ref) or not ref.startswith("models:/")
    try:
        local = _in_place(ref) or _local_copy(
            ref, store, partial(_mlflow_download, ref), bool(pinned)
        )
    except MlflowException as err:
        if err.error_code != "RESOURCE_DOES_NOT_EXIST":
            raise
        raise FileNotFoundError(
            f"model {ref!r} is not in the MLflow store {mlflow.get_tracking_uri()} "
            f"({err.message}); check the name, version or run id, or the tracking URI"
        ) from None
    found = sorted(p.parent for p in local.glob("**/state.json"))
    if not found:
        raise FileNotFoundError(f"{ref} holds no pathloop checkpoint (no state.json under {local})")
    return found[0].resolve()
