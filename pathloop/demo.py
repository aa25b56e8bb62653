"""``make demo``: does expert feedback beat the data alone, on 2 CPU cores?

It is ``pathloop experiment --config jobs/configs/experiment.demo.yaml workdir=runs/demo``:
phantoms where 30 % of the training labels name another class, which the expert sees → a
1000-step pretrained model → the simulated expert labels 256 real training cells → reward model
→ the control and feedback-data arms finetuned from the same model → the same evaluation images
for each → the paired difference to the control with its 95 % interval. Rerun it after an
interruption: finished steps are found by their outputs and skipped.
"""

from __future__ import annotations

from pathlib import Path

EXPERIMENT_DEMO = Path(__file__).resolve().parents[1] / "jobs/configs/experiment.demo.yaml"


def run_demo(workdir: Path, overrides: list[str] | None = None) -> dict:
    """The demo experiment into ``workdir``; prints the paired table and where things are."""
    from pathloop.config import load_config
    from pathloop.experiment import ExperimentConfig, run_experiment
    from pathloop.experiment_results import print_results

    cfg = load_config(ExperimentConfig, EXPERIMENT_DEMO, [f"workdir={workdir}", *(overrides or [])])
    results = run_experiment(cfg)
    print_results(results)
    return results
