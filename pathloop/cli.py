"""The ``pathloop`` command: one subcommand per step, each a thin call into the library."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

app = typer.Typer(
    help="pathloop: align class-conditional diffusion models of cell patches with expert feedback.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)

OVERRIDES = typer.Argument(None, help="Dotted config overrides, e.g. optim.lr=2e-4 train.steps=100")
CONFIG = typer.Option(
    None, "--config", "-c", help="YAML config file (defaults < YAML < overrides)."
)


def _fail(msg: str, code: int = 2) -> None:
    console.print(f"[bold red]error:[/] {msg}")
    raise typer.Exit(code)


def _load(model: type, config: Path | None, overrides: list[str] | None):
    from pathloop.config import ConfigError, load_config
    from pathloop.jobs import check_outputs

    try:
        cfg = load_config(model, config, overrides or [])
    except ConfigError as err:
        _fail(str(err))
    for warning in check_outputs(cfg):  # only inside a Ray job
        console.print(f"[bold yellow]warning:[/] {warning}")
    return cfg


def _run_step(run, cfg, resume: bool = False) -> None:
    """Call a step's driver; print its result; a bad input exits 2 with the message."""
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    try:
        result = run(cfg)
    except (ValueError, KeyError, FileNotFoundError, FileExistsError) as err:
        _fail(str(err))
    console.print_json(json.dumps(result, default=str))


# ----------------------------------------------------------------------------- data


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="Image-folder tree (one folder per class) or a CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Output shard-set directory."),
    labels: Path | None = typer.Option(None, help="LABELS.csv giving split and subtype."),
    size: int = typer.Option(64, help="Output side in px (resize shorter side, centre-crop)."),
    strict: bool = typer.Option(False, help="Exit non-zero if any file was quarantined."),
) -> None:
    """Ingest real images into Parquet shards; bad files go to OUT/quarantine.csv with a reason."""
    from pathloop.ingest import ingest as run_ingest

    if not src.exists():
        _fail(f"source {str(src)!r} does not exist; pass an image folder or a CSV")
    report = run_ingest(src, out, labels=labels, size=size, strict=strict)
    console.print(
        f"ingested [bold]{report.num_ingested}[/] images into {out} "
        f"({report.num_duplicates} exact duplicates skipped, "
        f"{report.num_quarantined} quarantined → {out / 'quarantine.csv'})"
    )
    for path, reason in report.quarantined[:20]:
        console.print(f"  [yellow]quarantined[/] {path}: {reason}")
    raise typer.Exit(report.exit_code(strict))


@app.command()
def phantoms(
    out: Path = typer.Option(..., "--out", "-o", help="Output shard-set directory."),
    per_class: int = typer.Option(64, help="Training images per class."),
    test_per_class: int | None = typer.Option(None, help="Test images per class (default N/4)."),
    size: int = typer.Option(32, help="Image side in px: 32 (CPU) or 64 (paper)."),
    seed: int = typer.Option(0, help="Seed; the same seed gives the same images."),
    label_noise: float = typer.Option(
        0.0, help="Fraction of training labels redrawn as another class (annotation errors)."
    ),
) -> None:
    """Render procedural bone-marrow phantom cells (16 classes) into a shard set."""
    from pathloop.phantoms import write_phantoms

    if size not in (32, 64):
        _fail(f"--size must be 32 or 64, got {size}")
    n_test = per_class // 4 if test_per_class is None else test_per_class
    try:
        manifest = write_phantoms(
            out, per_class, test_per_class=n_test, size=size, seed=seed, label_noise=label_noise
        )
    except ValueError as e:  # e.g. --label-noise out of range, checked before anything is written
        _fail(str(e))
    console.print(f"wrote {manifest['num_records']} phantom cells to {out}")


@app.command()
def judge(
    shards: Path = typer.Argument(..., help="Shard set to judge (phantom or synthetic images)."),
    out: Path = typer.Option(Path("report.json"), "--out", "-o", help="Report JSON path."),
    shuffle_classes: int | None = typer.Option(
        None, help="Seed: replace each declared class with a different random class first."
    ),
    split: str | None = typer.Option(None, help="Only this split."),
) -> None:
    """Judge images against their declared class from pixels alone; write report.json."""
    from pathloop.judge import judge_shards
    from pathloop.viz import print_rate_table

    report = judge_shards(shards, shuffle_seed=shuffle_classes, split=split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_rate_table(report, title=f"judge: {shards}")
    console.print(
        f"plausible rate {report['plausible_rate']:.3f} over {report['n']} images → {out}"
    )


# ----------------------------------------------------------------------------- diffusion


@app.command()
def pretrain(
    config: Path | None = CONFIG,
    resume: bool = typer.Option(
        False, help="Continue the run in workdir from its last checkpoint."
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Pretrain the class-conditional diffusion model on Ray Train; log and register in MLflow."""
    from pathloop.pretrain import PretrainConfig, run_pretrain

    cfg = _load(PretrainConfig, config, overrides)
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    result = run_pretrain(cfg)
    console.print_json(json.dumps(result))


@app.command()
def sample(
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Sample a synthetic shard set (with provenance per image) from a model path or MLflow URI."""
    from pathloop.sampling import SampleConfig, run_sample

    cfg = _load(SampleConfig, config, overrides)
    result = run_sample(cfg)
    console.print_json(json.dumps(result))


@app.command()
def finetune(
    config: Path | None = CONFIG,
    method: str | None = typer.Option(None, help="reward (Eq. 3) or dpo (preference pairs)."),
    resume: bool = typer.Option(
        False, help="Continue the run in workdir from its last checkpoint."
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Finetune a pretrained model with feedback: reward-weighted (Eq. 3) or Diffusion-DPO."""
    from pathloop.finetune import FinetuneConfig, run_finetune

    extra = [f"method={method}"] if method else []
    cfg = _load(FinetuneConfig, config, [*(overrides or []), *extra])
    if resume:
        cfg = cfg.model_copy(update={"resume": True})
    try:
        result = run_finetune(cfg)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        _fail(str(err))
    console.print_json(json.dumps(result))


@app.command()
def concepts(
    config: Path | None = CONFIG,
    resume: bool = typer.Option(
        False, help="Continue the run in workdir from its last checkpoint."
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """New concepts: split a class into subtype classes (e.g. neutrophil → band / segmented)."""
    from pathloop.concepts import ConceptsConfig, run_concepts

    _run_step(run_concepts, _load(ConceptsConfig, config, overrides), resume)


@app.command()
def reward(
    config: Path | None = CONFIG,
    resume: bool = typer.Option(
        False, help="Continue the run in workdir from its last checkpoint."
    ),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train the reward model (Eq. 2) on a feedback export on Ray Train; register it."""
    from pathloop.reward import RewardConfig, run_reward

    _run_step(run_reward, _load(RewardConfig, config, overrides), resume)


@app.command("guidance-classifier")
def guidance_classifier(
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Train the noise-aware classifier of the classifier-guidance baseline; register it."""
    from pathloop.classifiers import GuidanceJobConfig, run_guidance_classifier

    _run_step(run_guidance_classifier, _load(GuidanceJobConfig, config, overrides))


# ----------------------------------------------------------------------------- feedback

review = typer.Typer(
    help="Expert feedback: review rounds, evaluators, exports.", no_args_is_help=True
)
app.add_typer(review, name="review")
STORE = typer.Option("runs/feedback.db", "--store", help="Feedback store: SQLite path or DB URL.")


def _store(url: str):
    from pathloop.feedback import FeedbackStore

    return FeedbackStore(url)


@review.command("create")
def review_create(
    samples: Path = typer.Option(..., "--samples", help="Synthetic shard set to review."),
    name: str | None = typer.Option(None, help="Round name."),
    store: str = STORE,
) -> None:
    """Create a review round from a sample shard set; prints the round id."""
    rid = _store(store).create_round(samples, name=name)
    console.print(f"round [bold]{rid}[/] created from {samples}")
    typer.echo(rid)


@review.command("rater")
def review_rater(
    name: str = typer.Argument(..., help="Rater name (e.g. an e-mail)."),
    store: str = STORE,
) -> None:
    """Add a human rater and print their sign-in token (shown once)."""
    rid, token = _store(store).add_rater(name)
    console.print(f"rater {rid} ({name}); token (shown once):")
    typer.echo(token)


@review.command("judge")
def review_judge(round_id: int, store: str = STORE) -> None:
    """Label a round with the phantom judge (the simulated expert)."""
    from pathloop.experts import evaluate_round

    console.print_json(json.dumps(evaluate_round(_store(store), round_id, "judge"), default=str))


@review.command("mllm")
def review_mllm(
    round_id: int,
    model: str = typer.Option(..., help="Model name at the OpenAI-compatible endpoint."),
    base_url: str | None = typer.Option(None, help="Endpoint; default $PATHLOOP_MLLM_BASE_URL."),
    checklist: Path | None = typer.Option(None, help="Checklist YAML; default the packaged one."),
    repeats: int = typer.Option(1, help="Calls per image, averaged like raters."),
    store: str = STORE,
) -> None:
    """Score a round with a multimodal LLM against the expert checklist (MAGIC)."""
    from pathloop.experts import evaluate_round

    opts = {"model": model, "repeats": repeats}
    if base_url:
        opts["base_url"] = base_url
    if checklist:
        opts["checklist"] = str(checklist)
    console.print_json(
        json.dumps(evaluate_round(_store(store), round_id, "mllm", **opts), default=str)
    )


@review.command("export")
def review_export(
    round_id: int,
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    how: str = typer.Option("majority", help="majority or mean (soft labels)."),
    store: str = STORE,
) -> None:
    """Export a round (images + aggregated labels + agreement) to Parquet for the reward model."""
    path = _store(store).export_round(round_id, out, how=how)
    console.print(f"wrote {path}")


@review.command("stats")
def review_stats(round_id: int, store: str = STORE) -> None:
    """Per-class progress, plausibility and inter-rater agreement of a round."""
    console.print_json(json.dumps(_store(store).round_stats(round_id), default=str))


@review.command("labelstudio-export")
def review_ls_export(
    round_id: int,
    out: Path = typer.Option(..., "--out", "-o", help="Output directory."),
    store: str = STORE,
) -> None:
    """Write Label Studio tasks.json and labeling_config.xml for a round."""
    from pathloop.labelstudio import export_tasks

    console.print(f"wrote {export_tasks(_store(store), round_id, out)}")


@review.command("labelstudio-import")
def review_ls_import(
    round_id: int,
    export: Path = typer.Argument(..., help="Label Studio JSON export."),
    store: str = STORE,
) -> None:
    """Import a Label Studio annotation export; bad items are listed, good ones kept."""
    from pathloop.labelstudio import import_annotations

    report = import_annotations(_store(store), round_id, export)
    console.print_json(report.model_dump_json())
    raise typer.Exit(1 if report.bad else 0)


# ----------------------------------------------------------------------------- evaluation


@app.command()
def evaluate(
    config: Path | None = CONFIG,
    model: str | None = typer.Option(
        None, help="Model: checkpoint dir, result.json, models:/name/version, or a shard set."
    ),
    baseline: list[str] | None = typer.Option(None, help="A baseline, as --model (repeatable)."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """PRDC, FID, train-on-synthetic/test-on-real and plausibility per class; MLflow + HTML."""
    from pathloop.evaluate import EvaluateConfig, evaluate_models

    cfg = _load(EvaluateConfig, config, overrides)
    update = {"model": model} if model else {}
    if baseline:
        update["baselines"] = tuple(baseline)
    cfg = EvaluateConfig.model_validate({**cfg.model_dump(), **update})
    try:
        result = evaluate_models(cfg)
    except (ValueError, FileNotFoundError, KeyError) as err:
        _fail(str(err))
    console.print(f"report: {result['report']}  (MLflow run {result['run_id']})")


@app.command()
def compare(
    refs: list[str] = typer.Argument(..., help="Run ids, run names, result.json or models:/ URIs."),
    tracking_uri: str | None = typer.Option(
        None, help="MLflow store; default $MLFLOW_TRACKING_URI."
    ),
    out: Path = typer.Option(Path("compare.csv"), "--out", "-o", help="CSV to write."),
    metric: list[str] | None = typer.Option(
        None, help="Metric globs to show (!glob excludes); default all but per-class rates."
    ),
) -> None:
    """Side-by-side table of the main metrics of MLflow runs or registered models."""
    from pathloop.evaluate import MAIN_PATTERNS, compare_runs
    from pathloop.report import print_tables, write_csv

    try:
        header, rows = compare_runs(refs, tracking_uri, tuple(metric or MAIN_PATTERNS))
    except ValueError as err:
        _fail(str(err))
    print_tables([{"title": "compare", "columns": header, "rows": rows}])
    console.print(f"wrote {write_csv(header, rows, out)}")


@app.command()
def sweep(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Ray Tune sweep over dotted job-config keys (ASHA between Train segments); best.yaml."""
    from pathloop.config import ConfigError
    from pathloop.sweep import SweepConfig, run_sweep

    cfg = _load(SweepConfig, config, overrides)
    try:
        result = run_sweep(cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    console.print(f"best config: {result['best_config']}  (sweep run {result['sweep_id']})")


@app.command()
def ablation(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Feedback-amount ablation (paper Fig. 4a): reward model + finetuning per fraction."""
    from pathloop.config import ConfigError
    from pathloop.sweep import AblationConfig, run_ablation

    cfg = _load(AblationConfig, config, overrides)
    try:
        result = run_ablation(cfg)
    except (ConfigError, ValueError, FileNotFoundError, RuntimeError) as err:
        _fail(str(err))
    console.print(f"rows and plots: {', '.join(result['plots'])}  (run {result['sweep_id']})")


@app.command("serve")
def serve_cmd(
    config: Path = typer.Option(Path("serve/config.yaml"), "--config", "-c", help="Serve config."),
    no_ray: bool = typer.Option(False, "--no-ray", help="Same API in plain uvicorn (no Ray)."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Start the HTTP app: generate, score, and the review UI (on 127.0.0.1 by default)."""
    if no_ray:
        from serve.local import run_local

        run_local(config, overrides or [])
    else:
        from serve.app import run

        run(config, blocking=True, overrides=overrides or [])


@app.command()
def loop(
    config: Path | None = CONFIG,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """The whole loop: data → pretrain → [review round → feedback → reward → finetune →
    evaluate] × rounds; rerun to resume (finished steps are skipped)."""
    from pathloop.pipeline import LoopConfig, print_summary, run_loop

    cfg = _load(LoopConfig, config, overrides)
    try:
        summary = run_loop(cfg)
    except (ValueError, KeyError, FileNotFoundError, TimeoutError) as err:
        _fail(str(err))
    print_summary(summary)


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes everything."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """The whole loop on embedded defaults (phantoms, local Ray, SQLite MLflow), 2-CPU sized."""
    from pathloop.demo import run_demo

    run_demo(workdir, overrides)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
