"""``make demo``: the whole loop on embedded defaults (local Ray, SQLite MLflow, phantom data).

It is ``pathloop loop --config jobs/configs/loop.tiny.yaml workdir=runs/demo``: phantoms →
pretrain → one round of judge feedback → reward model → Eq. 3 finetuning → evaluation, sized for
2 CPU cores. Rerun it after an interruption: finished steps are found by their outputs and skipped.
"""

from __future__ import annotations

from pathlib import Path

LOOP_TINY = Path(__file__).resolve().parents[1] / "jobs/configs/loop.tiny.yaml"


def run_demo(workdir: Path, overrides: list[str] | None = None) -> dict:
    """The tiny loop into ``workdir``; prints the before/after tables and where things are."""
    from pathloop.config import load_config
    from pathloop.pipeline import LoopConfig, print_summary, run_loop

    cfg = load_config(LoopConfig, LOOP_TINY, [f"workdir={workdir}", *(overrides or [])])
    summary = run_loop(cfg)
    print_summary(summary)
    return summary
