"""``make demo``: the main job on embedded defaults (local Ray, SQLite MLflow, phantom data).

Each step writes a stored output and is skipped when that output exists, so an interrupted demo
resumes where it stopped. It grows into ``pathloop loop`` (feedback → reward → finetune).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from rich.console import Console

console = Console()


def real_cells_dir() -> Path | None:
    """``$PATHLOOP_REAL_CELLS`` or ``../shared/data/real_cells`` beside the checkout, if present."""
    env = os.environ.get("PATHLOOP_REAL_CELLS")
    cand = Path(env) if env else Path(__file__).resolve().parents[2] / "shared/data/real_cells"
    return cand if (cand / "LABELS.csv").is_file() else None


def _step(title: str, done: Path) -> bool:
    """Print a step banner; True when the step must run (its output is missing)."""
    if done.exists():
        console.rule(f"[dim]{title}: done already ({done})")
        return False
    console.rule(f"[bold]{title}")
    return True


def run_demo(workdir: Path, pretrain_overrides: list[str] | None = None) -> dict:
    """Phantoms → real-cell ingest → judge report → tiny pretrain → sample → judge before/after."""
    from pathloop.config import load_config
    from pathloop.data import ingest
    from pathloop.loops import PretrainConfig, run_pretrain
    from pathloop.phantoms import judge_shards, write_phantoms
    from pathloop.viz import print_rate_table

    workdir = Path(workdir)
    phantoms, real = workdir / "phantoms", workdir / "real_cells"
    if _step("1. phantom cells (16 classes, 32 px)", phantoms / "manifest.json"):
        write_phantoms(phantoms, per_class=96, test_per_class=24, size=32, seed=0)
    src = real_cells_dir()
    if src is not None and _step(f"2. ingest real cells from {src}", real / "manifest.json"):
        rep = ingest(src, real, labels=src / "LABELS.csv", size=64)
        console.print(f"ingested {rep.num_ingested} real cells, quarantined {rep.num_quarantined}")
    console.rule("[bold]3. the judge on fresh phantoms")
    report = judge_shards(phantoms, split="test")
    print_rate_table(report, title="judge on phantoms (test split)")

    cfg = load_config(
        PretrainConfig,
        Path(__file__).resolve().parents[1] / "jobs/configs/pretrain.tiny.yaml",
        [f"workdir={workdir / 'pretrain'}", f"data.shards={phantoms}", *(pretrain_overrides or [])],
    )
    result_file = Path(cfg.workdir) / "result.json"
    if _step("4. pretrain the tiny diffusion model on Ray Train", result_file):
        run_pretrain(cfg.model_copy(update={"resume": (Path(cfg.workdir) / "ray").exists()}))
    result = json.loads(result_file.read_text())
    rates = compare_with_untrained(workdir, result, cfg)
    console.print(
        f"\nMLflow store: {result['tracking_uri']}  (open it with: "
        f"mlflow ui --backend-store-uri {result['tracking_uri']})\nmodel: {result['model_uri']}"
    )
    return {"pretrain": result, "judge": rates}


def compare_with_untrained(workdir: Path, result: dict, cfg) -> dict:
    """Sample both models with the same seeds and judge them: the pretrained should pass more."""
    from pathloop.diffusion import build_unet, save_checkpoint
    from pathloop.phantoms import judge_shards
    from pathloop.sampling import SampleConfig, run_sample
    from pathloop.viz import print_comparison

    untrained = workdir / "untrained"
    if not (untrained / "state.json").exists():
        from pathloop.data import read_vocab

        vocab = read_vocab(cfg.data.shards)
        save_checkpoint(
            untrained,
            build_unet(cfg.model, len(vocab)),
            step=0,
            config=cfg.model_dump(mode="json"),
            vocab=vocab,
        )
    reports = {}
    for name, model in (("untrained", str(untrained)), ("pretrained", result["checkpoint"])):
        out = workdir / f"samples-{name}"
        if _step(f"5. sample 16 per class from the {name} model", out / "manifest.json"):
            run_sample(
                SampleConfig(
                    model=model,
                    out=str(out),
                    per_class=16,
                    sampler=cfg.preview.model_copy(update={"seed": 1234}),
                )
            )
        reports[name] = judge_shards(out)
        (workdir / f"judge-{name}.json").write_text(json.dumps(reports[name], indent=2))
    print_comparison(reports["untrained"], reports["pretrained"], "untrained", "pretrained")
    return {k: v["plausible_rate"] for k, v in reports.items()}
