"""The ``pathloop`` command: one subcommand per step, each a thin call into the library.

One error path: the library raises a user error (a bad value or key, a missing or existing
path, an unknown round or model), and ``Commands.invoke`` prints it as one ``error: ...`` line
and exits 2, whichever command ran. Any other exception is a bug and keeps its traceback.
The config-driven steps come from the one registry, ``pathloop.jobs.STEPS``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import typer
from rich.console import Console
from typer.core import TyperGroup

USER_ERROR_EXIT = 2


class Commands(TyperGroup):
    """The ``pathloop`` group: runs a subcommand and turns a user error into one line, exit 2."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except _user_errors() as err:  # evaluated only once something was raised
            _say("error", "red", one_line(err))
            raise typer.Exit(USER_ERROR_EXIT) from None


def _user_errors() -> tuple[type[Exception], ...]:
    """What a user causes and can fix. ValueError covers ConfigError, pydantic's ValidationError
    and the store's FeedbackError; FileNotFoundError covers NotAShardSetError; TimeoutError is a
    review round not labelled in time; MLLMError an endpoint refusing the key, model or URL."""
    from pathloop.experts import MLLMError

    return (ValueError, KeyError, FileNotFoundError, FileExistsError, TimeoutError, MLLMError)


def one_line(err: BaseException) -> str:
    """An error's message on one line: a KeyError without repr quotes; the indented detail lines
    of a multi-line message (e.g. one per bad config key) joined with '; '."""
    text = err.args[0] if isinstance(err, KeyError) and err.args else err
    lines = [line.strip() for line in str(text).splitlines() if line.strip()]
    if not lines:
        return type(err).__name__
    head, *rest = lines
    return f"{head} {'; '.join(rest)}" if rest else head


def _say(label: str, color: str, msg: str) -> None:
    # click.echo, not rich: no markup parsing of [..] in messages, no wrapping at 80 columns.
    typer.echo(f"{typer.style(label + ':', fg=color, bold=True)} {msg}", err=True)


app = typer.Typer(
    cls=Commands,
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
RESUME = typer.Option(False, help="Continue the run in workdir from its last checkpoint.")


def _run(name: str, config: Path | None, overrides: list[str] | None, **flags: Any) -> dict:
    """Run registered step ``name`` on its config: defaults < YAML < overrides < the flags the
    user set (a flag left at None or False keeps the config's value)."""
    from pathloop.config import load_config, updated
    from pathloop.jobs import STEPS, check_outputs

    step = STEPS[name]
    cfg = load_config(step.config_cls, config, overrides or [])
    given = {k: v for k, v in flags.items() if v is not None and v is not False}
    if given:
        cfg = updated(cfg, **given)
    for warning in check_outputs(cfg):  # only inside a Ray job
        _say("warning", "yellow", warning)
    return step.run(cfg)


def _print_result(result: dict) -> None:
    console.print_json(json.dumps(result, default=str))


# ----------------------------------------------------------------------------- data


@app.command()
def ingest(
    src: Path = typer.Argument(..., help="Image-folder tree (one folder per class) or a CSV."),
    out: Path = typer.Option(..., "--out", "-o", help="Output shard-set directory."),
    labels: Path | None = typer.Option(None, help="LABELS.csv giving split and subtype."),
    size: int = typer.Option(64, help="Output side in px, 8 to 1024 (shorter side, centre-crop)."),
    strict: bool = typer.Option(False, help="Exit 3 if any input was quarantined."),
    allow_outside_root: bool = typer.Option(
        False, help="Read CSV paths and symlinks that lead outside the source folder."
    ),
) -> None:
    """Ingest real images into Parquet shards; bad files go to OUT/quarantine.csv with a reason.

    Exit 0 done; 2 bad option or CSV (nothing written); 3 done, but --strict and something was
    quarantined; 4 nothing usable (an existing set at OUT is kept).
    """
    from rich.markup import escape

    from pathloop.data import printable
    from pathloop.ingest import ingest as run_ingest

    if not src.exists():
        raise FileNotFoundError(
            f"source {printable(src)!r} does not exist — pass an image folder or a CSV"
        )
    report = run_ingest(
        src, out, labels=labels, size=size, strict=strict, allow_outside_root=allow_outside_root
    )
    shown = escape(printable(out))  # file names are data: no rich markup, no raw bytes
    console.print(
        f"ingested [bold]{report.num_ingested}[/] images into {shown} "
        f"({report.num_duplicates} exact duplicates skipped, "
        f"{report.num_quarantined} quarantined → {shown}/quarantine.csv)"
    )
    for path, reason in report.quarantined[:20]:
        console.print(f"  [yellow]quarantined[/] {escape(path)}: {escape(reason)}", soft_wrap=True)
    if report.num_quarantined > 20:
        console.print(f"  ... and {report.num_quarantined - 20} more in quarantine.csv")
    for note in report.notes:
        _say("note", "cyan", note)
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
    scenario: str | None = typer.Option(
        None,
        help="What the expert knows that the data do not: artifacts (slide artifacts on "
        "--fraction of the training cells), strict-expert (a stricter judge profile) or "
        "label-noise (--fraction of training labels wrong).",
    ),
    fraction: float = typer.Option(0.3, help="The scenario's fraction of training cells."),
) -> None:
    """Render procedural bone-marrow phantom cells (16 classes) into a shard set."""
    from pathloop.scenarios import write_phantoms

    if size not in (32, 64):
        raise ValueError(f"--size must be 32 or 64, got {size}")
    n_test = per_class // 4 if test_per_class is None else test_per_class
    manifest = write_phantoms(
        out,
        per_class,
        test_per_class=n_test,
        size=size,
        seed=seed,
        label_noise=label_noise,
        scenario=scenario,
        scenario_fraction=fraction,
    )
    note = f" (scenario {manifest['scenario']['name']})" if manifest.get("scenario") else ""
    console.print(f"wrote {manifest['num_records']} phantom cells to {out}{note}")


@app.command()
def judge(
    shards: Path = typer.Argument(..., help="Shard set to judge (phantom or synthetic images)."),
    out: Path = typer.Option(Path("report.json"), "--out", "-o", help="Report JSON path."),
    shuffle_classes: int | None = typer.Option(
        None, help="Seed: replace each declared class with a different random class first."
    ),
    split: str | None = typer.Option(None, help="Only this split."),
    expert: str = typer.Option(
        "default", help="Judge profile: default, or strict (a strict-expert set's expert)."
    ),
) -> None:
    """Judge images against their declared class from pixels alone; write report.json."""
    from pathloop.judge import judge_shards
    from pathloop.viz import print_rate_table

    report = judge_shards(shards, shuffle_seed=shuffle_classes, split=split, expert=expert)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print_rate_table(report, title=f"judge: {shards}")
    console.print(
        f"plausible rate {report['plausible_rate']:.3f} over {report['n']} images → {out}"
    )


# ----------------------------------------------------------------------------- diffusion


@app.command()
def pretrain(
    config: Path | None = CONFIG, resume: bool = RESUME, overrides: list[str] | None = OVERRIDES
) -> None:
    """Pretrain the class-conditional diffusion model on Ray Train; log and register in MLflow."""
    _print_result(_run("pretrain", config, overrides, resume=resume))


@app.command()
def sample(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Sample a synthetic shard set (with provenance per image) from a model path or MLflow URI."""
    _print_result(_run("sample", config, overrides))


@app.command()
def finetune(
    config: Path | None = CONFIG,
    method: str | None = typer.Option(None, help="reward (Eq. 3) or dpo (preference pairs)."),
    resume: bool = RESUME,
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Finetune a pretrained model with feedback: reward-weighted (Eq. 3) or Diffusion-DPO."""
    _print_result(_run("finetune", config, overrides, method=method, resume=resume))


@app.command()
def concepts(
    config: Path | None = CONFIG, resume: bool = RESUME, overrides: list[str] | None = OVERRIDES
) -> None:
    """New concepts: split a class into subtype classes (e.g. neutrophil → band / segmented)."""
    _print_result(_run("concepts", config, overrides, resume=resume))


@app.command()
def reward(
    config: Path | None = CONFIG, resume: bool = RESUME, overrides: list[str] | None = OVERRIDES
) -> None:
    """Train the reward model (Eq. 2) on a feedback export on Ray Train; register it."""
    _print_result(_run("reward", config, overrides, resume=resume))


@app.command("guidance-classifier")
def guidance_classifier(
    config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES
) -> None:
    """Train the noise-aware classifier of the classifier-guidance baseline; register it."""
    _print_result(_run("guidance-classifier", config, overrides))


# ----------------------------------------------------------------------------- feedback

review = typer.Typer(
    help="Expert feedback: review rounds, evaluators, exports.", no_args_is_help=True
)
app.add_typer(review, name="review")
STORE = typer.Option("runs/feedback.db", "--store", help="Feedback store: SQLite path or DB URL.")


def _store(url: str, create: bool = False):
    """The feedback store at ``url``. Only commands that start a store pass ``create``: a
    mistyped ``--store`` elsewhere is refused, not opened as a new empty database."""
    from sqlalchemy.exc import ArgumentError, DatabaseError

    from pathloop.feedback import FeedbackStore

    try:
        return FeedbackStore(url, create=create)
    except (ArgumentError, DatabaseError, ModuleNotFoundError) as err:  # bad URL, driver, file
        reason = str(err).splitlines()[0]
        raise ValueError(
            f"cannot open feedback store {url!r}: {reason}; --store takes a SQLite file path or "
            "a database URL whose driver is installed (e.g. postgresql+psycopg://user@host/db)"
        ) from None


@review.command("create")
def review_create(
    samples: Path = typer.Option(..., "--samples", help="Synthetic shard set to review."),
    name: str | None = typer.Option(None, help="Round name."),
    blinded_real: Path | None = typer.Option(
        None,
        help="Blinded real-vs-synthetic round: mix these real cells (--real-split) with the "
        "samples, the same number per class; raters answer real or synthetic.",
    ),
    real_split: str = typer.Option("test", help="Split of --blinded-real to draw from."),
    out: Path | None = typer.Option(
        None, help="Folder for the blinded round's mixed shard set (default SAMPLES-blinded)."
    ),
    pairwise: bool = typer.Option(
        False, help="Pairwise round: two images of one class, which is more plausible."
    ),
    per_class: int | None = typer.Option(
        None, help="Blinded: at most this many images of each source per class; pairwise: pairs."
    ),
    seed: int = typer.Option(0, help="Seed of the blinded draw and order, or of the pairing."),
    require_criteria: bool = typer.Option(
        False, help="An implausible verdict must name a failed criterion (review UI and API)."
    ),
    store: str = STORE,
) -> None:
    """Create a review round from a sample shard set (and the store, if new); prints the id.

    Plausibility by default; --blinded-real for a blinded real-vs-synthetic test, --pairwise for
    pairwise comparisons."""
    from pathloop.data import read_manifest

    if blinded_real and pairwise:
        raise ValueError("--blinded-real and --pairwise make different rounds: pick one")
    read_manifest(samples)  # a bad --samples fails before a new store is created
    if blinded_real:
        read_manifest(blinded_real)
    fb = _store(store, create=True)
    settings = {"require_criteria": True} if require_criteria else None
    if blinded_real:
        from pathloop.blinded import write_blinded_set

        out = out or samples.with_name(samples.name + "-blinded")
        made = write_blinded_set(samples, blinded_real, out, per_class, real_split, seed)
        name = name or f"blinded {samples.name}"
        rid = fb.create_round(out, name, "blinded", settings, items=made["items"])
        left_out = ", ".join(made["classes_left_out"]) or "none"
        console.print(
            f"blinded round [bold]{rid}[/]: {made['n_real']} real + {made['n_synthetic']} "
            f"synthetic images in {out} (classes without both left out: {left_out})"
        )
    elif pairwise:
        from pathloop.pairwise import pair_items

        items = pair_items(samples, seed, per_class)
        name = name or f"pairwise {samples.name}"
        rid = fb.create_round(samples, name, "pairwise", settings, items=items)
        console.print(f"pairwise round [bold]{rid}[/]: {len(items)} pairs from {samples}")
    else:
        rid = fb.create_round(samples, name=name, settings=settings)
        console.print(f"round [bold]{rid}[/] created from {samples}")
    typer.echo(rid)


@review.command("rater")
def review_rater(
    name: str = typer.Argument(..., help="Rater name (e.g. an e-mail)."),
    expires_days: float = typer.Option(30.0, help="Days the token works, unless revoked."),
    new_token: bool = typer.Option(
        False, help="Issue an existing rater a new token (the old one stops working)."
    ),
    store: str = STORE,
) -> None:
    """Add a human rater (creating the store, if new) and print their sign-in token (shown once)."""
    fb = _store(store, create=True)
    if new_token:
        rid = next((r.id for r in fb.raters() if r.name == name), None)
        if rid is None:
            raise ValueError(f"no rater {name!r}; add one with `pathloop review rater {name}`")
        token = fb.issue_token(rid, expires_days=expires_days)
    else:
        rid, token = fb.add_rater(name, expires_days=expires_days)
    expires = next(t.expires for t in fb.tokens() if t.rater_id == rid)
    console.print(f"rater {rid} ({name}); token (shown once, expires {expires:%Y-%m-%d} UTC):")
    typer.echo(token)


@review.command("tokens")
def review_tokens(
    revoke: str | None = typer.Option(
        None, help="Revoke the token of this rater name or token id; it stops working at once."
    ),
    store: str = STORE,
) -> None:
    """List rater tokens: id, rater, issued, expires, status (never the token itself)."""
    from datetime import datetime, timezone

    fb = _store(store)
    if revoke is not None:
        t = fb.revoke_token(revoke)
        console.print(f"revoked token {t.token_id} of rater {t.rater!r}")
    now, when = datetime.now(timezone.utc), "{:%Y-%m-%d %H:%M}".format
    typer.echo(f"{'token id':<9} {'rater':<24} {'issued (UTC)':<16} {'expires (UTC)':<16} status")
    for t in fb.tokens():
        line = f"{t.token_id:<9} {t.rater:<24} {when(t.created):<16} {when(t.expires):<16} "
        typer.echo(line + t.status(now))


@review.command("judge")
def review_judge(round_id: int, store: str = STORE) -> None:
    """Label a round with the phantom judge (the simulated expert)."""
    from pathloop.experts import evaluate_round

    _print_result(evaluate_round(_store(store), round_id, "judge"))


@review.command("mllm")
def review_mllm(
    round_id: int,
    model: str = typer.Option(..., help="Model name at the OpenAI-compatible endpoint."),
    base_url: str | None = typer.Option(None, help="Endpoint; default $PATHLOOP_MLLM_BASE_URL."),
    checklist: Path | None = typer.Option(None, help="Checklist YAML; default the packaged one."),
    repeats: int = typer.Option(1, help="Calls per image, averaged like raters."),
    allow_public_api: bool = typer.Option(
        False, help="With no base URL, send the images to the public OpenAI API."
    ),
    store: str = STORE,
) -> None:
    """Score a round with a multimodal LLM against the expert checklist (MAGIC). Needs an
    endpoint (--base-url or $PATHLOOP_MLLM_BASE_URL), or --allow-public-api."""
    from pathloop.experts import evaluate_round

    opts = {"model": model, "repeats": repeats, "allow_public_api": allow_public_api}
    if base_url:
        opts["base_url"] = base_url
    if checklist:
        opts["checklist"] = str(checklist)
    _print_result(evaluate_round(_store(store), round_id, "mllm", **opts))


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
    """Per-class progress, plausibility and inter-rater agreement of a round; a blinded round's
    accuracy at telling real from synthetic (95 % interval), a pairwise round's choices."""
    stats = _store(store).round_stats(round_id)
    _print_result(stats)
    if "blinded" in stats:
        from pathloop.viz import print_blinded

        print_blinded(stats["blinded"])


@review.command("pairs")
def review_pairs(
    round_id: int,
    out: Path = typer.Option(..., "--out", "-o", help="Parquet file to write."),
    store: str = STORE,
) -> None:
    """Write a pairwise round's decided pairs as preference pairs for `finetune method=dpo
    pairs=OUT synthetic=<the round's shard set>`."""
    from pathloop.pairwise import write_preference_pairs

    fb = _store(store)
    path = write_preference_pairs(fb, round_id, out)
    console.print(f"wrote {path} (synthetic={fb.round_info(round_id).samples_dir})")


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
    baselines = tuple(baseline) if baseline else None
    result = _run("evaluate", config, overrides, model=model, baselines=baselines)
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

    header, rows = compare_runs(refs, tracking_uri, tuple(metric or MAIN_PATTERNS))
    print_tables([{"title": "compare", "columns": header, "rows": rows}])
    console.print(f"wrote {write_csv(header, rows, out)}")


@app.command()
def sweep(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Ray Tune sweep over dotted job-config keys (ASHA between Train segments); best.yaml."""
    result = _run("sweep", config, overrides)
    console.print(f"best config: {result['best_config']}  (sweep run {result['sweep_id']})")


@app.command()
def ablation(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Feedback-amount ablation (paper Fig. 4a): reward model + finetuning per fraction."""
    result = _run("ablation", config, overrides)
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
def loop(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    r"""The whole loop: data → pretrain → \[review round → feedback → reward → finetune →
    evaluate] × rounds; rerun to resume (finished steps are skipped)."""
    from pathloop.pipeline import print_summary

    print_summary(_run("loop", config, overrides))


@app.command()
def experiment(config: Path | None = CONFIG, overrides: list[str] | None = OVERRIDES) -> None:
    """Does feedback beat the data alone? Arms (control, feedback, oracle, self-training) x
    seeds from one pretrained model, paired on the same images; rerun to resume."""
    from pathloop.experiment_results import print_results

    print_results(_run("experiment", config, overrides))


@app.command()
def demo(
    workdir: Path = typer.Option(Path("runs/demo"), help="Where the demo writes everything."),
    overrides: list[str] | None = OVERRIDES,
) -> None:
    """Does feedback beat the data alone? Control and feedback-data arms on phantoms with
    slide artifacts (local Ray, SQLite MLflow), paired on the same images; 2-CPU sized."""
    from pathloop.demo import run_demo

    run_demo(workdir, overrides)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
