"""The evaluation job: models → samples → PRDC, FID, TSTR, plausibility → MLflow and an HTML report.

``evaluate_models(cfg)`` takes a model and any baselines (checkpoint dirs, training
``result.json`` files, ``models:/name/version`` URIs, or synthetic shard sets already sampled),
samples ``per_class`` images per class from each with the sampling job (the one
``diffusion.sample()`` loop), and measures every label against the real data:

* fidelity: FID and PRDC on the evaluation classifier's features (``metrics.py``), and PRDC
  against the held-out test split at equal counts per class (``prdc_test``);
* usefulness: train-on-synthetic/test-on-real beside its honest reference, TRTR at equal counts
  (the same classifier on as many real images per class), both over several classifier seeds
  with 95 % t intervals and their ratio; MAGIC's real + synthetic and few-shot settings;
* plausibility per class, with Wilson intervals, from evaluators (judge, MLLM), the reward model
  and any feedback-store round of the label's samples.

Everything is logged to one MLflow run (metrics named ``<label>/<group>/<metric>``) with the
report, ``metrics.json`` and the feature model as artifacts. ``compare_runs`` reads runs back.
"""

from __future__ import annotations

import hashlib
import json
import time
from numbers import Real
from pathlib import Path
from typing import Any

import numpy as np
from pydantic import Field

from pathloop.config import Frozen, SamplerConfig, TrackingConfig, updated
from pathloop.metrics import FeatureConfig, TSTRConfig

REAL = "real"


class FeatureModelConfig(FeatureConfig):
    """The evaluation classifier whose features FID and PRDC use (not the reward backbone)."""

    path: str | None = Field(
        None,
        description="An existing feature-model dir; None = train one into <workdir>/features "
        "(reused while its config and data are unchanged).",
    )


class FidelityConfig(Frozen):
    """FID and PRDC."""

    k: int = Field(5, gt=0, description="Nearest neighbours of PRDC (Naeem et al.: 5).")
    reference_split: str = Field("train", description="Real split every label is compared to.")
    real_split: str = Field(
        "test", description="Real split of the 'real' row (held-out real vs the reference)."
    )
    chunk: int = Field(2048, gt=0, description="Rows per distance block (memory vs speed).")
    equal_counts: bool = Field(
        True,
        description="Also PRDC of every label against the held-out real_split at equal counts "
        "(prdc_test): m = the smaller side's least per-class count, and BOTH sides (samples "
        "and held-out split) are subsampled to m images per class; the real row is the "
        "reference split against the held-out one.",
    )
    seeds: int = Field(
        3,
        ge=1,
        description="Subsampling seeds of the equal-count PRDC: mean and 95 % t interval; the "
        "seeds agree when neither side has more than m images per class.",
    )
    seed: int = Field(0, description="Base seed of the equal-count subsets (seed, seed + 1, ...).")


class PlausibilityConfig(Frozen):
    """Where per-class plausibility comes from."""

    evaluators: tuple[str, ...] = Field(
        ("judge",), description="Registered evaluators run on the samples (judge, mllm)."
    )
    evaluator_options: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="Options per evaluator, e.g. {mllm: {model: my-vlm}}."
    )
    reward_model: str | None = Field(
        None, description="Reward model (dir, result.json, models:/ URI) scoring the samples."
    )
    threshold: float = Field(0.5, ge=0, le=1, description="Reward at or above = plausible.")
    store: str | None = Field(
        None, description="Feedback store (path or URL): labels of rounds over a label's samples."
    )
    sources: tuple[str, ...] | None = Field(
        None, description="Label sources read from the store (human, mllm, judge); None = all."
    )
    z: float = Field(1.96, gt=0, description="Wilson interval z (1.96 = 95 %).")


class EvaluateConfig(Frozen):
    """Evaluate a model against baselines and real data; one MLflow run, one HTML report."""

    workdir: str = Field("runs/evaluate", description="Samples, feature model, report, MLflow db.")
    name: str = Field("evaluate", description="MLflow run name.")
    real: str = Field("runs/demo/data", description="Real (or phantom) shards: train + test.")
    model: str | None = Field(
        None, description="Model to evaluate: dir, result.json, models:/ URI, or a shard set."
    )
    baselines: tuple[str, ...] = Field((), description="Baselines, as model (e.g. pretrained).")
    baseline_labels: tuple[str, ...] = Field(
        (), description="Names of the baselines in tables; () = baseline, or baseline1, 2, ..."
    )
    per_class: int = Field(16, gt=0, description="Images sampled per class and model.")
    classes: list[str] | None = Field(None, description="Classes to sample; None = all.")
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    num_actors: int = Field(1, ge=1, description="Ray Data sampling actors.")
    torch_threads: int | None = Field(
        None, ge=1, description="torch threads per sampling actor; None = its reserved CPU (1)."
    )
    use_gpu: bool = Field(False, description="Sample with one GPU per actor.")
    device: str = Field("auto", description="Classifiers and distances: auto, cpu, cuda.")
    features: FeatureModelConfig = Field(default_factory=FeatureModelConfig)
    fidelity: FidelityConfig = Field(default_factory=FidelityConfig)
    tstr: TSTRConfig = Field(default_factory=TSTRConfig)
    plausibility: PlausibilityConfig = Field(default_factory=PlausibilityConfig)
    grid_per_class: int = Field(8, ge=0, description="Images per class in the report's grids.")
    ablation: str | None = Field(
        None, description="CSV/JSON rows {fraction, metric, ...} of the feedback ablation to plot."
    )
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)


# ----------------------------------------------------------------------------- inputs


def model_labels(cfg: EvaluateConfig) -> dict[str, str]:
    """label → reference: ``baseline`` (or ``baseline1``, ``baseline2``, …), then ``model``."""
    if not cfg.model:
        raise ValueError("no model to evaluate: pass --model URI (or model=... in the config)")
    names = list(cfg.baseline_labels)
    if names and len(names) != len(cfg.baselines):
        raise ValueError(
            f"baseline_labels has {len(names)} names for {len(cfg.baselines)} baselines; "
            "give one name per baseline or none"
        )
    if len(set(names)) != len(names) or "model" in names or "real" in names:
        raise ValueError(f"baseline_labels {names} must be distinct and not 'model' or 'real'")
    if not names:
        one = len(cfg.baselines) == 1
        names = ["baseline" if one else f"baseline{i + 1}" for i in range(len(cfg.baselines))]
    return {**dict(zip(names, cfg.baselines, strict=True)), "model": cfg.model}


def _is_shard_set(ref: str) -> bool:
    return (Path(ref) / "manifest.json").is_file()


def sample_dir(cfg: EvaluateConfig, ref: str, uri: str) -> Path:
    """The label's synthetic shard set: ``ref`` itself when it is one, else sampled once into
    ``<workdir>/samples/<hash of ref and sampling settings>`` and reused after (also by another
    label with the same reference)."""
    if _is_shard_set(ref):
        return Path(ref)
    from pathloop.sampling import SampleConfig, run_sample

    sc = SampleConfig(
        model=ref,
        out="",
        per_class=cfg.per_class,
        classes=cfg.classes,
        sampler=cfg.sampler,
        num_actors=cfg.num_actors,
        torch_threads=cfg.torch_threads,
        use_gpu=cfg.use_gpu,
        tracking=updated(cfg.tracking, tracking_uri=uri),
    )
    key = hashlib.sha256(
        sc.model_dump_json(exclude={"out", "tracking", "torch_threads"}).encode()
    ).hexdigest()[:10]
    out = Path(cfg.workdir) / "samples" / key
    if not (out / "manifest.json").is_file():
        t0 = time.perf_counter()
        n = run_sample(updated(sc, out=str(out)))["num_records"]
        seconds = time.perf_counter() - t0  # with Ray's actor start-up: what a user waits
        timing = {"seconds": round(seconds, 2), "images": n, "images_per_s": n / seconds}
        (out / SAMPLING_TIME).write_text(json.dumps(timing))
    return out


SAMPLING_TIME = "sampling_time.json"  # beside a sampled set's manifest: how long it took


def sampling_time(shards: Path) -> dict[str, float] | None:
    """{seconds, images, images_per_s} of a set this evaluation sampled; None for a given set."""
    f = Path(shards) / SAMPLING_TIME
    return json.loads(f.read_text()) if f.is_file() else None


def load_samples(shards: Path, vocab: Any) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) uint8, class ids in the real vocabulary) of a synthetic shard set."""
    from pathloop.data import load_arrays, read_vocab
    from pathloop.metrics import remap_ids

    images, ids = load_arrays(shards)
    if len(images) == 0:
        raise ValueError(f"{shards} holds no images to evaluate")
    return images, remap_ids(ids, read_vocab(shards), vocab)


def feature_model(cfg: EvaluateConfig) -> tuple[Any, dict]:
    """Load ``features.path``, or train the evaluation classifier into the workdir (reused
    while its settings and data are the same)."""
    from pathloop.metrics import load_feature_model, train_feature_model

    if cfg.features.path:
        path = Path(cfg.features.path)
        return load_feature_model(path), json.loads((path / "config.json").read_text())["metrics"]
    path = Path(cfg.workdir) / "features"
    settings = cfg.features.model_dump(exclude={"path"})
    meta_file = path / "config.json"
    if meta_file.is_file():
        meta = json.loads(meta_file.read_text())
        if meta.get("train") == settings and meta.get("shards") == cfg.real:
            return load_feature_model(path), meta["metrics"]
    fm_cfg = FeatureConfig.model_validate(settings)
    metrics = train_feature_model(cfg.real, path, fm_cfg)
    return load_feature_model(path), {k: v for k, v in metrics.items() if k != "path"}


# ----------------------------------------------------------------------------- measures


def embed_all(cfg: EvaluateConfig, fm: Any, real: dict, samples: dict) -> dict[str, dict]:
    """Features (N, D) of the reference and held-out real splits and of every label's samples:
    {"splits": {split: feats}, "labels": {label: feats}}."""
    from pathloop.metrics import embed

    fc = cfg.fidelity
    splits = dict.fromkeys((fc.reference_split, fc.real_split))
    return {
        "splits": {s: embed(fm, real[s][0], device=cfg.device) for s in splits},
        "labels": {lab: embed(fm, x, device=cfg.device) for lab, (x, _) in samples.items()},
    }


def fidelity_all(
    cfg: EvaluateConfig, fm: Any, real: dict, samples: dict, feats: dict | None = None
) -> dict[str, dict]:
    """FID and PRDC of every label (and the held-out real split) against the reference split;
    ``feats``: ``embed_all``'s output, computed here when None."""
    from pathloop.metrics import fid, prdc

    dev, fc = cfg.device, cfg.fidelity
    feats = feats or embed_all(cfg, fm, real, samples)
    ref = feats["splits"][fc.reference_split]
    sets = {REAL: feats["splits"][fc.real_split], **feats["labels"]}
    return {
        lab: {"fid": fid(ref, f), **prdc(ref, f, fc.k, fc.chunk, dev)} for lab, f in sets.items()
    }


def prdc_test_all(cfg: EvaluateConfig, feats: dict, real: dict, samples: dict) -> dict[str, dict]:
    """PRDC at equal counts per class against the held-out split (``metrics.prdc_equal``), over
    ``fidelity.seeds`` subsets: every label's samples, and the reference split as ``real``."""
    from pathloop.metrics import prdc_equal

    fc = cfg.fidelity
    held_out = (feats["splits"][fc.real_split], real[fc.real_split][1])
    sets = {
        REAL: (feats["splits"][fc.reference_split], real[fc.reference_split][1]),
        **{lab: (f, samples[lab][1]) for lab, f in feats["labels"].items()},
    }
    seeds = [fc.seed + i for i in range(fc.seeds)]
    return {
        lab: prdc_equal(held_out, s, fc.k, seeds, fc.chunk, cfg.device) for lab, s in sets.items()
    }


def tstr_all(cfg: EvaluateConfig, real: dict, samples: dict, num_classes: int, bar: Any) -> dict:
    """Every TSTR setting: real-only references once (label ``real``), the rest per label;
    ``synthetic`` and ``real_equal`` over ``tstr.seeds`` seeds, then their macro-F1 ratio."""
    from pathloop.metrics import REAL_ONLY, SEEDED, as_input, tstr, tstr_seeds

    px = cfg.tstr.in_px or real["train"][0].shape[1]
    train = (as_input(real["train"][0], px), real["train"][1])
    test = (as_input(real["test"][0], px), real["test"][1])  # never empty: _real_splits
    out: dict[str, dict] = {REAL: {}}
    shared: dict[tuple, dict] = {}  # labels with the same synthetic counts share real_equal
    for setting in cfg.tstr.settings:
        targets = [REAL] if setting in REAL_ONLY else list(samples)
        for lab in targets:
            bar(f"TSTR {setting}: {lab}")
            equal = setting == "real_equal"  # one run per synthetic count per class
            key = (setting, _equal_key(cfg, samples[lab][1]) if equal else lab)
            if key not in shared:
                syn = None if lab == REAL else (as_input(samples[lab][0], px), samples[lab][1])
                run = tstr_seeds if setting in SEEDED else tstr
                shared[key] = run(setting, train, test, num_classes, cfg.tstr, syn, cfg.device)
            out.setdefault(lab, {})[setting] = shared[key]
    for settings in out.values():
        if {"synthetic", "real_equal"} <= set(settings):
            f1 = settings["synthetic"]["macro_f1"], settings["real_equal"]["macro_f1"]
            settings["ratio"] = {"macro_f1": f1[0] / f1[1] if f1[1] else float("nan")}
    return out


def _equal_key(cfg: EvaluateConfig, ids: np.ndarray) -> tuple:
    """(class id, synthetic images of it that TSTR trains on) pairs of a label's samples."""
    classes, counts = np.unique(ids, return_counts=True)
    spc = cfg.tstr.synthetic_per_class
    return tuple((int(c), min(int(n), spc)) for c, n in zip(classes, counts, strict=True))


def check_equal_counts(cfg: EvaluateConfig, real_train_ids: np.ndarray, samples: dict) -> None:
    """Before any training: real_equal needs, per class, as many real train images as a label's
    synthetic set gives TSTR (a one-line error naming the fix otherwise)."""
    from pathloop.metrics import take_matching, take_per_class

    if "real_equal" not in cfg.tstr.settings:
        return
    for _, ids in samples.values():
        used = ids[take_per_class(ids, cfg.tstr.synthetic_per_class, cfg.tstr.seed)]
        take_matching(real_train_ids, used, cfg.tstr.seed)


def _store_rounds(store: Any, shards: Path) -> list[int]:
    """Ids of the store's rounds over the shard set ``shards``."""
    return [r.id for r in store.rounds() if Path(r.samples_dir).resolve() == shards.resolve()]


def plausibility_all(
    cfg: EvaluateConfig, vocab: Any, sets: dict[str, tuple], dirs: dict[str, Path], uri: str
) -> dict[str, dict]:
    """source → label → per-class table. ``sets`` maps label → (images, ids) incl. real."""
    from pathloop import metrics as M

    pc, out = cfg.plausibility, {}
    for name in pc.evaluators:
        opts = pc.evaluator_options.get(name, {})
        out[name] = {
            lab: M.plausibility_table(
                M.plausible_by_evaluator(name, x, c, vocab, **opts), c, vocab, pc.z
            )
            for lab, (x, c) in sets.items()
        }
    if pc.reward_model:
        from pathloop.reward import load_reward_model

        rm = load_reward_model(pc.reward_model, uri)
        out["reward"] = {
            lab: M.plausibility_table(
                M.plausible_by_reward(rm, x, c, vocab, pc.threshold), c, vocab, pc.z
            )
            for lab, (x, c) in sets.items()
        }
    if pc.store:
        out.update(_store_plausibility(cfg, vocab, dirs))
    return out


def _store_plausibility(cfg: EvaluateConfig, vocab: Any, dirs: dict[str, Path]) -> dict:
    from pathloop import metrics as M
    from pathloop.feedback import FeedbackStore

    pc, tables = cfg.plausibility, {}
    with FeedbackStore(pc.store) as store:
        for lab, d in dirs.items():
            for rid in _store_rounds(store, d)[-1:]:  # the newest round over these samples
                p, c, v = M.plausible_from_store(store, rid, pc.sources)
                tables[lab] = M.plausibility_table(p, M.remap_ids(c, v, vocab), vocab, pc.z)
    return {"store": tables} if tables else {}


# ----------------------------------------------------------------------------- driver


def _real_splits(cfg: EvaluateConfig) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    from pathloop.data import load_arrays

    splits = {"train", "test", cfg.fidelity.reference_split, cfg.fidelity.real_split}
    real = {s: load_arrays(cfg.real, split=s) for s in splits}
    empty = sorted(s for s, (x, _) in real.items() if len(x) == 0)
    if empty:
        raise ValueError(
            f"real shards {cfg.real} have no rows in split(s) {empty}; evaluation needs train "
            "and test splits (make them with `pathloop ingest --labels` or `pathloop phantoms`)"
        )
    return real


def _grids(cfg: EvaluateConfig, vocab: Any, sets: dict[str, tuple]) -> dict[str, dict]:
    """class code → label → the first ``grid_per_class`` images of that class."""
    n = cfg.grid_per_class
    return {
        info.code: {lab: list(x[c == info.id][:n]) for lab, (x, c) in sets.items()}
        for info in vocab.classes
        if n and any((c == info.id).any() for _, c in sets.values())
    }


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """MLflow metrics ``<label>/<group>/<name>`` of a result (NaNs left out)."""
    out: dict[str, float] = {}
    for lab, m in result["fidelity"].items():
        out.update({f"{lab}/{k}" if k == "fid" else f"{lab}/prdc/{k}": v for k, v in m.items()})
    for lab, m in result.get("prdc_test", {}).items():
        out.update({f"{lab}/prdc_test/{k}": v for k, v in m.items()})
    for lab, settings in result["tstr"].items():
        for setting, m in settings.items():
            out.update({f"{lab}/tstr/{setting}/{k}": v for k, v in m.items()})
    for source, by_label in result["plausibility"].items():
        for lab, table in by_label.items():
            for k in ("rate", "lo", "hi", "n"):
                out[f"{lab}/plausibility/{source}/{k}"] = table["overall"][k]
            for code, row in table["per_class"].items():
                out[f"{lab}/plausibility/{source}/class/{code}"] = row["rate"]
    for lab, t in result.get("sampling", {}).items():
        out.update({f"{lab}/sampling/{k}": v for k, v in t.items()})
    for k, v in result["feature_model"].items():
        out[f"features/{k}"] = v
    scalars = {k: v for k, v in out.items() if isinstance(v, Real)}  # not per-seed lists
    return {k: float(v) for k, v in scalars.items() if not np.isnan(float(v))}


def _stages(cfg: EvaluateConfig, n_models: int) -> int:
    from pathloop.metrics import REAL_ONLY

    per = sum(1 if s in REAL_ONLY else n_models for s in cfg.tstr.settings)
    return 4 + n_models + per  # features, fidelity, plausibility, report + samples + TSTR runs


def _measure(cfg: EvaluateConfig, labels: dict[str, str], uri: str, advance: Any) -> dict:
    """Everything but logging: samples, features, fidelity, TSTR, plausibility, grids."""
    from pathloop.data import read_vocab

    vocab, real = read_vocab(cfg.real), _real_splits(cfg)
    dirs = {}
    for lab, ref in labels.items():
        advance(f"samples: {lab}")
        dirs[lab] = sample_dir(cfg, ref, uri)
    samples = {lab: load_samples(d, vocab) for lab, d in dirs.items()}
    check_equal_counts(cfg, real["train"][1], samples)
    advance("feature model")
    fm, fm_metrics = feature_model(cfg)
    advance("FID and PRDC")
    feats = embed_all(cfg, fm, real, samples)
    fidelity = fidelity_all(cfg, fm, real, samples, feats)
    prdc_test = prdc_test_all(cfg, feats, real, samples) if cfg.fidelity.equal_counts else {}
    tstr = tstr_all(cfg, real, samples, len(vocab), advance)
    advance("plausibility")
    sets = {REAL: real[cfg.fidelity.real_split], **samples}
    plaus = plausibility_all(cfg, vocab, sets, dirs, uri)
    return {
        "title": f"pathloop evaluation: {cfg.tracking.run_name or cfg.name}",
        "labels": list(labels),
        "models": {REAL: cfg.real, **labels},
        "samples": {lab: str(d) for lab, d in dirs.items()},
        "sampling": {lab: t for lab, d in dirs.items() if (t := sampling_time(d)) is not None},
        "feature_model": fm_metrics,
        "fidelity": fidelity,
        "prdc_test": prdc_test,
        "tstr": tstr,
        "plausibility": plaus,
        "grids": _grids(cfg, vocab, {REAL: real["train"], **samples}),
        "notes": _notes(cfg),
    }


def _notes(cfg: EvaluateConfig) -> str:
    fc, tc = cfg.fidelity, cfg.tstr
    return (
        f"{cfg.per_class} samples per class; features: {cfg.features.arch}; reference: real "
        f"{fc.reference_split} split; TSTR: {tc.arch}, synthetic and real_equal over "
        f"{tc.seeds} classifier seeds (mean [95 % t interval]); equal-count PRDC: both sides "
        f"subsampled to the same images per class of the {fc.real_split} split, "
        f"{fc.seeds} subsets."
    )


def evaluate_models(cfg: EvaluateConfig) -> dict[str, Any]:
    """Run the whole evaluation; returns {run_id, tracking_uri, report, metrics per label, ...}
    and writes ``report.html``, ``metrics.json`` and ``result.json`` into the workdir."""
    from rich.progress import Progress

    from pathloop import report, storage, tracking
    from pathloop.config import dump_config

    workdir = Path(storage.absolute(cfg.workdir))
    cfg = updated(cfg, workdir=str(workdir), real=storage.absolute(cfg.real))
    labels = model_labels(cfg)
    workdir.mkdir(parents=True, exist_ok=True)
    dump_config(cfg, workdir / "config.yaml")
    uri = tracking.resolve_uri(cfg.tracking, workdir)
    tags = {"pathloop.step": "evaluate", **{f"pathloop.eval.{k}": v for k, v in labels.items()}}
    run_id = tracking.start_run(
        cfg.tracking, workdir, cfg.model_dump(mode="json"), tags, cfg.tracking.run_name or cfg.name
    )
    try:
        with Progress() as bar:
            task = bar.add_task("evaluate", total=_stages(cfg, len(labels)))

            def advance(what: str) -> None:
                bar.update(task, advance=1, description=what)

            result = _measure(cfg, labels, uri, advance)
            card = result["mlflow"] = tracking.run_card(uri, run_id)  # the report links it
            # e.g. "loop-tiny / round1-evaluate": the loop's config name, then the step's run
            names = [n for n in (card["parent"], card["run_name"]) if n]
            result["title"] = "pathloop evaluation: " + " / ".join(names)
            result["curve"] = report.load_curve_rows(cfg.ablation) if cfg.ablation else None
            advance("report")
            path = report.render_report(result, workdir / "report.html")
        metrics = flat_metrics(result)
        tracking.log_metrics(uri, run_id, metrics, step=0)
        saved = {k: v for k, v in result.items() if k != "grids"}
        (workdir / "metrics.json").write_text(json.dumps(saved, indent=2, default=str))
        for f in (path, workdir / "metrics.json", workdir / "config.yaml"):
            tracking.log_artifact(uri, run_id, f)
        if not cfg.features.path:
            tracking.log_artifact(uri, run_id, workdir / "features", "feature_model")
    except Exception:
        tracking.end_run(uri, run_id, "FAILED")
        raise
    tracking.end_run(uri, run_id)
    report.print_tables(report.metric_tables(result))
    out = {"run_id": run_id, "tracking_uri": uri, "report": str(path), **saved}
    (workdir / "result.json").write_text(json.dumps(out, indent=2, default=str))
    return out


# ----------------------------------------------------------------------------- compare

MAIN_PATTERNS = ("*", "!*/class/*")  # every metric but the per-class plausibility rates
# The evaluated model's headline figures: what a loop's parent run and a registered model
# version show (plausible rate per evaluator with its interval, FID, PRDC, TSTR).
HEADLINE_PATTERNS = (
    "model/plausibility/*/rate",
    "model/plausibility/*/lo",
    "model/plausibility/*/hi",
    "model/fid",
    "model/prdc/*",
    "model/tstr/*/macro_f1",  # incl. real_equal and ratio (TSTR / TRTR at equal counts)
    "model/tstr/*/accuracy",
    "model/prdc_test/precision",
    "model/prdc_test/coverage",
    "!*/class/*",
)


def headline_metrics(result: dict[str, Any]) -> dict[str, float]:
    """The model's headline metrics of an evaluation result (``HEADLINE_PATTERNS``), by the
    names its run logs them under."""
    return {k: v for k, v in flat_metrics(result).items() if _keep(k, HEADLINE_PATTERNS)}


def _client(uri: str | None) -> Any:
    import mlflow

    return mlflow.MlflowClient(uri)


def resolve_run(ref: str, uri: str | None) -> tuple[Any, str]:
    """(MLflow run, display name) of a run id, a run name (newest), a job's ``result.json`` or a
    ``models:/name/version`` URI (the run that logged the model version)."""
    client, p = _client(uri), Path(ref)
    if p.suffix == ".json" and p.is_file():
        info = json.loads(p.read_text())
        return _client(info.get("tracking_uri", uri)).get_run(info["run_id"]), ref
    if ref.startswith("models:/"):
        name, _, version = ref[len("models:/") :].partition("/")
        if not version.isdigit():
            raise ValueError(f"{ref}: use models:/<name>/<version> with a version number")
        return client.get_run(client.get_model_version(name, version).run_id), ref
    try:
        return client.get_run(ref), ref
    except Exception:  # not a run id: try it as a run name
        pass
    exps = [e.experiment_id for e in client.search_experiments()]
    runs = client.search_runs(
        exps, f"attributes.run_name = '{ref}'", order_by=["attributes.start_time DESC"]
    )
    if not runs:
        raise ValueError(
            f"{ref!r} is no run id, run name, result.json or models:/<name>/<version> URI in {uri}"
        )
    return runs[0], ref


def _keep(name: str, patterns: tuple[str, ...]) -> bool:
    from fnmatch import fnmatch

    want = [p for p in patterns if not p.startswith("!")]
    drop = [p[1:] for p in patterns if p.startswith("!")]
    return any(fnmatch(name, p) for p in want) and not any(fnmatch(name, p) for p in drop)


def compare_runs(
    refs: list[str], uri: str | None, patterns: tuple[str, ...] = MAIN_PATTERNS
) -> tuple[list[str], list[list[Any]]]:
    """Side-by-side metrics: columns ``metric`` then one per ref; rows the metrics matching
    ``patterns`` (globs, ``!glob`` excludes) of any of the runs, sorted by name."""
    runs = [resolve_run(r, uri) for r in refs]
    names = sorted({k for run, _ in runs for k in run.data.metrics if _keep(k, patterns)})
    rows = [[k, *(run.data.metrics.get(k, float("nan")) for run, _ in runs)] for k in names]
    header = ["metric", *(f"{label} ({run.info.run_name})" for run, label in runs)]
    return header, rows
